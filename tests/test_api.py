"""The HTTP API end to end, against real `reft-serve serve` processes.

`server`: the default SmolLM2 with the real pyreft emoji adapter, no keys, small limits.
`guarded`: the same weights from a model directory without a chat template, started with
--api-key/--admin-key, one running row and a queue of one (for 401s, 429s and chat refusals).
"""

from __future__ import annotations

import io
import json
import re
import secrets
import tarfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server import adapter_file
from server.model import ModelShape
from tests.conftest import LOGPROB_ABS, error_of, wait_for

EMOJI_DIR = Path(__file__).parent / "data" / "pyreft-emoji"
EXPECTED = json.loads((EMOJI_DIR / "expected.json").read_text())["emoji"]
GENS = EXPECTED["generations"]
SHAPE = ModelShape("llama", 576, 30)
MODEL_ID = "SmolLM2-135M-Instruct"
VOCAB = 49152
MAX_NEW_TOKENS = 256
MAX_PROMPT_TOKENS = 512
MAX_BODY_BYTES = 65536
USER_KEY = "sk-user-" + secrets.token_hex(12)
ADMIN_KEY = "sk-admin-" + secrets.token_hex(12)
NO_TEMPLATE_ID = "smollm2-no-template"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


# ---- helpers ------------------------------------------------------------------------------------


def emoji_bytes() -> bytes:
    adapter = adapter_file.import_pyreft(EMOJI_DIR, "f2+l2", True, SHAPE, 64)
    return adapter_file.to_bytes(adapter)


def archive(fmt: str) -> bytes:
    """The pyreft save directory as a user would pack it: every file under `emoji/`."""
    buf = io.BytesIO()
    files = sorted(p for p in EMOJI_DIR.iterdir() if p.is_file())
    if fmt == "zip":
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in files:
                zf.write(p, f"emoji/{p.name}")
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for p in files:
                tf.add(p, f"emoji/{p.name}")
    return buf.getvalue()


def sse_data(r: httpx.Response) -> list[str]:
    return [line[len("data:"):].strip() for line in r.iter_lines() if line.startswith("data:")]


def metrics(client: httpx.Client) -> dict[str, list]:
    r = client.get("/metrics")
    assert r.status_code == 200
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def metric_value(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def access_lines(log: str) -> list[dict]:
    out = []
    for line in log.splitlines():
        if line.startswith("{") and '"path"' in line:
            out.append(json.loads(line))
    return out


# ---- servers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, reft_server_factory):
    root = tmp_path_factory.mktemp("api")
    registry = root / "adapters"
    registry.mkdir()
    (registry / "emoji.safetensors").write_bytes(emoji_bytes())
    env = {
        "REFT_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS), "REFT_MAX_PROMPT_TOKENS": str(MAX_PROMPT_TOKENS),
        "REFT_MAX_BODY_BYTES": str(MAX_BODY_BYTES), "REFT_SCAN_INTERVAL": "0.5", "REFT_MAX_BATCH_SIZE": "8",
        "REFT_PINNED_ADAPTERS": '["emoji"]',
    }
    srv = reft_server_factory(registry, root / "server.log", env)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-anything", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, reft_server_factory):
    from server.model import converted_gguf_dir, default_gguf_path

    root = tmp_path_factory.mktemp("guarded")
    model_dir = root / NO_TEMPLATE_ID
    model_dir.mkdir()
    for f in converted_gguf_dir(default_gguf_path()).iterdir():
        if "chat_template" not in f.name:
            (model_dir / f.name).symlink_to(f)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "chat_template" not in config
    registry = root / "adapters"
    registry.mkdir()
    (registry / "emoji.safetensors").write_bytes(emoji_bytes())
    env = {"REFT_MAX_BATCH_SIZE": "1", "REFT_MAX_QUEUE": "1", "REFT_SCAN_INTERVAL": "0"}
    args = ["--model", str(model_dir), "--api-key", USER_KEY, "--admin-key", ADMIN_KEY]
    srv = reft_server_factory(registry, root / "server.log", env, args)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def guarded_client(guarded):
    with httpx.Client(base_url=guarded.url, timeout=120, headers={"Authorization": f"Bearer {USER_KEY}"}) as c:
        yield c


# ---- readiness ----------------------------------------------------------------------------------


def test_health_is_503_while_loading_then_200(server, client):
    assert 503 in server.statuses, f"never saw 503 before readiness: {server.statuses}"
    first_ok = server.statuses.index(200)
    assert all(s == 503 for s in server.statuses[:first_ok]), server.statuses
    status, headers, body = server.health_bodies[0]
    assert status == 503
    assert body["status"] in ("loading", "failed")
    assert body["error"]["code"] == 503 and body["error"]["type"] and body["error"]["message"]
    assert headers.get("retry-after", "").isdigit()
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert client.get("/live").status_code == 200


# ---- parity with pyreft -------------------------------------------------------------------------


@pytest.mark.parametrize("i", range(len(GENS)))
def test_completions_token_ids_match_pyreft(client, i):
    g = GENS[i]
    r = client.post("/v1/completions", json={"model": "emoji", "prompt": g["prompt_ids"], "temperature": 0,
                                             "max_tokens": 32})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "emoji"
    assert body["choices"][0]["text"] == g["completion"]
    assert body["choices"][0]["finish_reason"] == "stop"  # pyreft stopped at EOS within 32 tokens
    assert body["usage"] == {"prompt_tokens": len(g["prompt_ids"]), "completion_tokens": len(g["completion_ids"]),
                             "total_tokens": len(g["prompt_ids"]) + len(g["completion_ids"]),
                             "prompt_tokens_details": {"cached_tokens": 0}}  # shorter than one prefix-cache block


def test_generate_text_prompts_match_pyreft_when_batched(client):
    def run(g):
        return client.post("/generate", json={"adapter": "emoji", "prompt": g["prompt"], "max_new_tokens": 32,
                                              "temperature": 0})

    with ThreadPoolExecutor(len(GENS)) as pool:
        responses = list(pool.map(run, GENS))
    for g, r in zip(GENS, responses, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["text"] == g["completion"]
        assert body["token_ids"] == g["completion_ids"]
        assert body["finish_reason"] == "stop" and body["adapter"] == "emoji"
        assert body["usage"] == {"prompt_tokens": len(g["prompt_ids"]), "completion_tokens": len(g["completion_ids"])}


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_uploaded_pyreft_archive_matches_pyreft(client, fmt):
    name = "emoji-" + fmt.replace(".", "")
    r = client.post("/v1/adapters", data={"name": name, "positions": "f2+l2", "share_weights": "true"},
                    files={"file": (f"emoji.{fmt}", archive(fmt), "application/octet-stream")})
    assert r.status_code == 201, r.text
    desc = r.json()
    assert desc["name"] == name and desc["version"] == 1
    assert desc["types"] == ["loreft"] and desc["layers"] == [4, 10] and desc["rank"] == 4
    assert desc["positions"] == "f2+l2" and desc["share_weights"] is True
    assert re.fullmatch(r"[0-9a-f]{64}", desc["sha256"]) and desc["bytes"] > 0
    assert client.get(f"/v1/adapters/{name}").json()["sha256"] == desc["sha256"]

    def run(g):
        return client.post("/v1/completions", json={"model": name, "prompt": g["prompt_ids"], "temperature": 0,
                                                    "max_tokens": 32})

    with ThreadPoolExecutor(len(GENS)) as pool:
        responses = list(pool.map(run, GENS))
    for g, r in zip(GENS, responses, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == g["completion"]
    assert client.delete(f"/v1/adapters/{name}").status_code == 204
    r = client.post("/v1/completions", json={"model": name, "prompt": GENS[0]["prompt_ids"], "max_tokens": 1})
    error_of(r, 404)


def test_base_and_model_id_mean_no_intervention(client):
    g = GENS[0]
    texts = {}
    for model in ("base", MODEL_ID, "emoji"):
        r = client.post("/v1/completions", json={"model": model, "prompt": g["prompt_ids"], "temperature": 0,
                                                 "max_tokens": 32})
        assert r.status_code == 200, r.text
        texts[model] = r.json()["choices"][0]["text"]
    assert texts["base"] == texts[MODEL_ID] == g["base_completion"]
    assert texts["emoji"] == g["completion"] != texts["base"]
    r = client.post("/generate", json={"adapter": None, "prompt": g["prompt_ids"], "max_new_tokens": 32})
    assert r.status_code == 200 and r.json()["text"] == g["base_completion"] and r.json()["adapter"] is None


def test_models_lists_base_and_adapters(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids[0] == MODEL_ID and "emoji" in ids
    assert all(m["object"] == "model" for m in body["data"])


# ---- the official openai client -----------------------------------------------------------------


def test_openai_completions_stream_equals_non_stream(oai):
    g = GENS[1]
    out = oai.completions.create(model="emoji", prompt=g["prompt_ids"], temperature=0, max_tokens=32)
    assert out.choices[0].text == g["completion"]
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens == len(g["prompt_ids"])
    assert out.usage.completion_tokens == len(g["completion_ids"])
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    chunks = list(oai.completions.create(model="emoji", prompt=g["prompt_ids"], temperature=0, max_tokens=32,
                                         stream=True, stream_options={"include_usage": True}))
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == g["completion"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(g["completion_ids"])


def test_openai_chat_stream_equals_non_stream(oai):
    messages = [{"role": "user", "content": "What is the capital of Spain?"}]
    texts = {}
    for model in ("emoji", "base"):
        out = oai.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12)
        text = out.choices[0].message.content
        assert text and out.choices[0].message.role == "assistant"
        assert out.choices[0].finish_reason in ("stop", "length")
        assert out.usage.prompt_tokens > 10 and 0 < out.usage.completion_tokens <= 12
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
        chunks = list(oai.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12,
                                                  stream=True, stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == out.choices[0].finish_reason
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
        texts[model] = text
    # the adapter changes the chat answer too
    assert texts["emoji"] != texts["base"]
    base = oai.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0, max_tokens=12)
    assert base.choices[0].message.content == texts["base"]


def test_openai_models_list(oai):
    ids = [m.id for m in oai.models.list()]
    assert MODEL_ID in ids and "emoji" in ids


def test_openai_n_over_the_limit_is_bad_request(oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="emoji", prompt="Hi", max_tokens=4, n=17)
    assert info.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=17)
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="no-such-adapter", prompt="Hi", max_tokens=4)


def test_openai_seed_reproduces_sampled_text(oai):
    prompt = GENS[2]["prompt_ids"]

    def sample(seed):
        out = oai.completions.create(model="base", prompt=prompt, temperature=1.3, max_tokens=8, seed=seed)
        return out.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    others = {sample(s) for s in (1, 2, 3)}
    assert others != {first}, "the seed has no effect on sampling"


def test_openai_stop_strings(oai):
    g = GENS[0]
    assert g["base_completion"] == "The capital of Spain is Madrid."
    out = oai.completions.create(model="base", prompt=g["prompt_ids"], temperature=0, max_tokens=32, stop=["Madrid"])
    assert out.choices[0].text == "The capital of Spain is "
    assert out.choices[0].finish_reason == "stop"
    chunks = list(oai.completions.create(model="base", prompt=g["prompt_ids"], temperature=0, max_tokens=32,
                                         stop=["Mad", "xyz"], stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "The capital of Spain is "


# ---- /generate streaming ------------------------------------------------------------------------


def test_generate_stream_sse_ends_with_done(client):
    g = GENS[3]
    with client.stream("POST", "/generate", json={"adapter": "emoji", "prompt": g["prompt_ids"],
                                                  "max_new_tokens": 32, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = sse_data(r)
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert "".join(e["text"] for e in events) == g["completion"]
    assert [t for e in events for t in e["token_ids"]] == g["completion_ids"]
    assert events[-1]["finish_reason"] == "stop" and events[-1]["adapter"] == "emoji"
    assert events[-1]["usage"] == {"prompt_tokens": len(g["prompt_ids"]), "completion_tokens": len(g["completion_ids"])}
    assert all(e["finish_reason"] is None for e in events[:-1])


def test_completions_stream_raw_sse_ends_with_done(client):
    with client.stream("POST", "/v1/completions", json={"model": "emoji", "prompt": GENS[0]["prompt_ids"],
                                                        "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200
        data = sse_data(r)
    assert data[-1] == "[DONE]" and len(data) >= 2
    assert json.loads(data[-2])["choices"][0]["finish_reason"] in ("stop", "length")



def test_return_token_ids_gives_prompt_and_completion_ids_streaming_or_not(client):
    """vLLM's return_token_ids: the ids the model read and wrote; streamed, the prompt's come first, once."""
    g = GENS[0]
    body = {"model": "emoji", "prompt": g["prompt_ids"], "temperature": 0, "max_tokens": 32, "return_token_ids": True}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    assert whole["prompt_token_ids"] == g["prompt_ids"] and whole["token_ids"] == g["completion_ids"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(d)["choices"][0] for d in sse_data(r)[:-1]]
    assert [c.get("prompt_token_ids") for c in chunks] == [g["prompt_ids"]] + [None] * (len(chunks) - 1)
    assert [t for c in chunks for t in c["token_ids"]] == g["completion_ids"]

    with client.stream("POST", "/v1/completions", json={**body, "stream": True, "return_token_ids": False}) as r:
        plain = [json.loads(d)["choices"][0] for d in sse_data(r)[:-1]]
    assert not any("token_ids" in c or "prompt_token_ids" in c for c in plain)
    assert client.post("/v1/completions", json={**body, "return_token_ids": False}).json()["choices"][0][
        "token_ids"] is None


def test_chat_return_token_ids_streaming_or_not(client):
    body = {"model": "emoji", "messages": [{"role": "user", "content": GENS[0]["question"]}], "temperature": 0,
            "max_tokens": 12, "return_token_ids": True}
    whole = client.post("/v1/chat/completions", json=body).json()
    assert len(whole["prompt_token_ids"]) == whole["usage"]["prompt_tokens"]
    ids = whole["choices"][0]["token_ids"]
    assert len(ids) == whole["usage"]["completion_tokens"] and 0 < len(ids) <= 12
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(d) for d in sse_data(r)[:-1]]
    assert chunks[0]["prompt_token_ids"] == whole["prompt_token_ids"]
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks for t in c["choices"][0].get("token_ids") or []] == ids


# ---- errors -------------------------------------------------------------------------------------


def test_unknown_adapter_is_404(client):
    r = client.post("/v1/completions", json={"model": "no-such", "prompt": "Hi", "max_tokens": 2})
    assert "no-such" in error_of(r, 404)
    error_of(client.post("/generate", json={"adapter": "no-such", "prompt": "Hi"}), 404)
    error_of(client.post("/v1/chat/completions", json={"model": "no-such",
                                                       "messages": [{"role": "user", "content": "Hi"}]}), 404)
    error_of(client.get("/v1/adapters/no-such"), 404)
    error_of(client.get("/no/such/route"), 404)


def test_malformed_json(client):
    for path in ("/v1/completions", "/generate", "/v1/chat/completions"):
        r = client.post(path, content=b'{"model": "emoji", "prompt": ', headers={"content-type": "application/json"})
        error_of(r, 400, 422)
        r = client.post(path, content=b"\xff\xfe not json", headers={"content-type": "application/json"})
        error_of(r, 400, 422)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "Hi"}),
    ("/v1/completions", {"model": "emoji"}),
    ("/v1/completions", {"model": "emoji", "prompt": {"text": "Hi"}}),
    ("/v1/completions", {"model": "emoji", "prompt": "Hi", "max_tokens": -1}),
    ("/v1/completions", {"model": "emoji", "prompt": "Hi", "max_tokens": "lots"}),
    ("/v1/completions", {"model": "emoji", "prompt": "Hi", "temperature": -1}),
    ("/v1/completions", {"model": "emoji", "prompt": "Hi", "top_p": 0}),
    ("/v1/completions", {"model": "emoji", "prompt": "Hi", "seed": -3}),
    ("/v1/completions", {"model": 7, "prompt": "Hi"}),
    ("/v1/chat/completions", {"model": "base", "messages": []}),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "wizard", "content": "Hi"}]}),
    ("/v1/chat/completions", {"model": "base"}),
    ("/generate", {"adapter": None}),
    ("/generate", {"adapter": None, "prompt": "Hi", "max_new_tokens": -5}),
    ("/generate", {"adapter": None, "prompt": "Hi", "temperature": -1}),
    ("/generate", {"adapter": None, "prompt": "Hi", "stop": "not-a-list"}),
    ("/generate", {"adapter": None, "prompt": "Hi", "no_such_field": 1}),
    ("/generate", [1, 2, 3]),
])
def test_validation_errors(client, path, body):
    error_of(client.post(path, json=body), 400, 422)


def test_prompt_over_limit_is_400_with_numbers(client):
    msg = error_of(client.post("/v1/completions", json={"model": "emoji", "prompt": [5] * 600, "max_tokens": 4}), 400)
    assert "600" in msg and str(MAX_PROMPT_TOKENS) in msg
    msg = error_of(client.post("/generate", json={"adapter": "emoji", "prompt": [5] * (MAX_PROMPT_TOKENS + 1)}), 400)
    assert str(MAX_PROMPT_TOKENS + 1) in msg and str(MAX_PROMPT_TOKENS) in msg
    # exactly at the limit is fine
    r = client.post("/v1/completions", json={"model": "base", "prompt": [5] * MAX_PROMPT_TOKENS, "max_tokens": 1})
    assert r.status_code == 200, r.text


def test_prompt_over_context_is_400_with_numbers(guarded_client):
    # no REFT_MAX_PROMPT_TOKENS on this server: the model's context (8192) is the limit
    r = guarded_client.post("/v1/completions", json={"model": "base", "prompt": [5] * 8100, "max_tokens": 200})
    msg = error_of(r, 400)
    assert "8100" in msg and "8192" in msg
    r = guarded_client.post("/v1/completions", json={"model": "base", "prompt": [5] * 8192, "max_tokens": 1})
    assert "8192" in error_of(r, 400)


def test_max_tokens_over_limit_is_400(client):
    msg = error_of(client.post("/v1/completions", json={"model": "emoji", "prompt": "Hi",
                                                        "max_tokens": MAX_NEW_TOKENS + 1}), 400)
    assert str(MAX_NEW_TOKENS + 1) in msg and str(MAX_NEW_TOKENS) in msg
    error_of(client.post("/generate", json={"adapter": "emoji", "prompt": "Hi", "max_new_tokens": 10_000}), 400)
    error_of(client.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "x"}],
                                                       "max_completion_tokens": MAX_NEW_TOKENS + 1}), 400)


def test_body_over_limit_is_413(client):
    big = {"model": "emoji", "prompt": "x" * (MAX_BODY_BYTES + 10), "max_tokens": 1}
    error_of(client.post("/v1/completions", json=big), 413)
    error_of(client.post("/generate", json={"adapter": None, "prompt": "x" * (MAX_BODY_BYTES + 10)}), 413)
    # just under the limit is not refused for its size
    ok = client.post("/v1/completions", json={"model": "base", "prompt": "hello " * 10, "max_tokens": 1})
    assert ok.status_code == 200



def test_chunked_body_over_limit_is_413(client):
    big = {"model": "emoji", "prompt": "x" * (MAX_BODY_BYTES + 10), "max_tokens": 1}

    def chunked():  # no Content-Length: the limit must hold while the body streams in
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 8192):
            yield payload[i:i + 8192]

    r = client.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    error_of(r, 413)


def test_token_ids_out_of_vocab_are_400(client):
    msg = error_of(client.post("/v1/completions", json={"model": "emoji", "prompt": [1, VOCAB], "max_tokens": 1}), 400)
    assert str(VOCAB) in msg
    error_of(client.post("/v1/completions", json={"model": "emoji", "prompt": [1, -1], "max_tokens": 1}), 400)
    error_of(client.post("/generate", json={"adapter": None, "prompt": [10**12]}), 400, 422)
    error_of(client.post("/generate", json={"adapter": None, "prompt": "Hi", "stop_token_ids": [VOCAB]}), 400)


def test_empty_prompt_is_400(client):
    error_of(client.post("/v1/completions", json={"model": "emoji", "prompt": [], "max_tokens": 1}), 400)
    error_of(client.post("/v1/completions", json={"model": "emoji", "prompt": [[]], "max_tokens": 1}), 400)
    error_of(client.post("/generate", json={"adapter": None, "prompt": []}), 400)


def test_empty_string_prompt_is_400(client):
    error_of(client.post("/v1/completions", json={"model": "emoji", "prompt": "", "max_tokens": 1}), 400)
    error_of(client.post("/generate", json={"adapter": "emoji", "prompt": ""}), 400)
    error_of(client.post("/v1/completions", json={"model": "emoji", "prompt": [""], "max_tokens": 1}), 400)


def test_openai_options_beyond_their_limits_are_400(client):
    for extra, word in (({"suffix": "x"}, "suffix"), ({"n": 3, "best_of": 2}, "best_of"),
                        ({"best_of": 2, "stream": True}, "stream"), ({"logprobs": 21}, "logprobs"),
                        ({"n": 17}, "16"), ({"prompt": ["a"] * 9, "n": 2}, "16"), ({"n": 0}, "n"),
                        ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency"),
                        ({"repetition_penalty": 0}, "repetition_penalty"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                        ({"logit_bias": {str(VOCAB): 1}}, "logit_bias"), ({"logit_bias": {"²": 1}}, "logit_bias"),
                        ({"logit_bias": {"٣": 1}}, "logit_bias"), ({"logit_bias": {"1" * 5000: 1}}, "logit_bias"),
                        ({"logit_bias": {"-1": 1}}, "logit_bias"),
                        ({"logit_bias": {str(i): 1 for i in range(301)}}, "300")):
        body = {"model": "emoji", "prompt": "Hi", "max_tokens": 1, **extra}
        assert word in error_of(client.post("/v1/completions", json=body), 400), extra
    chat = {"model": "emoji", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    for extra in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}, {"n": 17}):
        error_of(client.post("/v1/chat/completions", json={**chat, **extra}), 400)
    error_of(client.post("/v1/completions", json={"model": "emoji", "prompt": "Hi", "stop": [""]}), 400)


def test_chat_without_chat_template_is_400(guarded_client):
    r = guarded_client.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user",
                                                                                       "content": "Hi"}]})
    assert "chat template" in error_of(r, 400)
    r = guarded_client.post("/v1/completions", json={"model": NO_TEMPLATE_ID, "prompt": GENS[0]["prompt_ids"],
                                                     "temperature": 0, "max_tokens": 32})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == GENS[0]["base_completion"]


# ---- keys ---------------------------------------------------------------------------------------


def test_keys(guarded):
    url = guarded.url
    user = {"Authorization": f"Bearer {USER_KEY}"}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    wrong = [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {USER_KEY}"},
             {"Authorization": f"Bearer {USER_KEY}x"}, {"Authorization": "Bearer"}]
    calls = [
        ("GET", "/v1/models", None), ("GET", "/v1/adapters", None), ("GET", "/v1/adapters/emoji", None),
        ("POST", "/v1/completions", {"model": "emoji", "prompt": [1, 2, 3], "max_tokens": 1}),
        ("POST", "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}]}),
        ("POST", "/generate", {"adapter": "emoji", "prompt": [1, 2, 3], "max_new_tokens": 1}),
    ]
    with httpx.Client(base_url=url, timeout=60) as c:
        for method, path, body in calls:
            for headers in wrong:
                r = c.request(method, path, json=body, headers=headers)
                msg = error_of(r, 401)
                assert USER_KEY not in r.text and ADMIN_KEY not in r.text, msg
            for headers in (user, admin):
                r = c.request(method, path, json=body, headers=headers)
                # chat is refused for the missing template, but only after the key was accepted
                assert r.status_code == (400 if "chat" in path else 200), (path, r.status_code, r.text)
        for path in ("/health", "/metrics", "/live"):
            assert c.get(path).status_code == 200
        files = {"file": ("a.safetensors", emoji_bytes(), "application/octet-stream")}
        for headers in (*wrong, user):
            r = c.post("/v1/adapters", data={"name": "keyed"}, files=files, headers=headers)
            error_of(r, 401)
            error_of(c.delete("/v1/adapters/emoji", headers=headers), 401)
        assert c.get("/v1/adapters/keyed", headers=user).status_code == 404
        r = c.post("/v1/adapters", data={"name": "keyed"}, files=files, headers=admin)
        assert r.status_code == 201, r.text
        assert c.get("/v1/adapters/keyed", headers=user).status_code == 200
        assert c.delete("/v1/adapters/keyed", headers=admin).status_code == 204
        assert c.get("/v1/adapters/keyed", headers=admin).status_code == 404
        assert c.get("/v1/adapters/emoji", headers=user).status_code == 200
    log = guarded.log()
    assert '"status": 401' in log  # the requests above were logged ...
    assert USER_KEY not in log and ADMIN_KEY not in log  # ... and the keys never were


def test_openai_client_with_key(guarded):
    good = openai.OpenAI(base_url=guarded.url + "/v1", api_key=USER_KEY, max_retries=0)
    assert "emoji" in [m.id for m in good.models.list()]
    bad = openai.OpenAI(base_url=guarded.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---- overload -----------------------------------------------------------------------------------


def test_overload_is_429_with_retry_after(guarded, guarded_client):
    body = {"model": "base", "prompt": GENS[0]["prompt_ids"], "max_tokens": 10, "ignore_eos": True,
            "temperature": 0}
    barrier = threading.Barrier(5)

    def run(_):
        barrier.wait()
        return guarded_client.post("/v1/completions", json=body)

    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(run, range(5)))
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 429 in statuses, statuses
    assert set(statuses) <= {200, 429}, statuses
    for r in responses:
        if r.status_code == 429:
            error_of(r, 429)
            assert r.headers.get("retry-after", "").isdigit(), r.headers
        else:
            assert r.json()["usage"]["completion_tokens"] == 10
    # One running + one waiting should be the most accepted at once; a request in prefill is counted
    # neither running nor waiting, so a third can slip in (reported) — hence no upper bound here.
    # the server recovers
    r = guarded_client.post("/v1/completions", json={**body, "max_tokens": 2})
    assert r.status_code == 200
    samples = metrics(guarded_client)
    assert metric_value(samples, "reft_requests_total", status="429") >= statuses.count(429)


# ---- metrics, access log, disconnects -----------------------------------------------------------


def test_client_disconnect_mid_stream_frees_its_slot(client):
    before = metrics(client)
    assert metric_value(before, "vllm:num_requests_running") == 0
    cancelled_before = metric_value(before, "reft_requests_total", status="499")
    body = {"model": "emoji", "prompt": GENS[0]["prompt_ids"], "max_tokens": MAX_NEW_TOKENS, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.Client(base_url=client.base_url, timeout=60) as own, own.stream("POST", "/v1/completions",
                                                                                json=body) as r:
        assert r.status_code == 200
        # keep a reference to the line iterator: closing it (as a `for ... break` does) drops the connection
        lines = r.iter_lines()
        data = [line for line in (next(lines) for _ in range(12)) if line.startswith("data:")]
        assert len(data) >= 3, data
        during = metrics(client)
        assert metric_value(during, "vllm:num_requests_running") == 1
        assert metric_value(during, "reft_running_batch_size") == 1
        info = during["vllm:lora_requests_info"][0].labels
        assert info["running_lora_adapters"] == "emoji", info
        closed = time.monotonic()
    # leaving the `with` blocks closed the connection mid-stream
    freed = wait_for(lambda: metric_value(metrics(client), "vllm:num_requests_running") == 0, timeout=10)
    assert freed, "the disconnected request kept its slot"
    assert time.monotonic() - closed < 8  # far sooner than 256 tokens would take
    after = metrics(client)
    assert metric_value(after, "reft_requests_total", status="499") == cancelled_before + 1
    assert after["vllm:lora_requests_info"][0].labels["running_lora_adapters"] == ""


def test_metrics_families(client):
    client.post("/v1/completions", json={"model": "emoji", "prompt": GENS[0]["prompt_ids"], "max_tokens": 3})
    client.post("/generate", json={"adapter": None, "prompt": "Hello", "max_new_tokens": 3})
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    samples = metrics(client)
    for name in ("reft_requests_total", "reft_prompt_tokens_total", "reft_generation_tokens_total",
                 "reft_request_latency_seconds_bucket", "reft_request_latency_seconds_count",
                 "reft_request_latency_seconds_sum", "reft_time_to_first_token_seconds_bucket",
                 "reft_queue_depth", "reft_running_batch_size", "reft_resident_adapters",
                 "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:gpu_cache_usage_perc",
                 "vllm:lora_requests_info"):
        assert name in samples, f"{name} missing from /metrics"
    assert metric_value(samples, "reft_requests_total", endpoint="completions", adapter="emoji", status="200") >= 1
    assert metric_value(samples, "reft_requests_total", endpoint="generate", adapter="base", status="200") >= 1
    assert metric_value(samples, "reft_prompt_tokens_total", adapter="emoji") >= len(GENS[0]["prompt_ids"])
    assert metric_value(samples, "reft_generation_tokens_total", adapter="base") >= 3
    assert metric_value(samples, "reft_request_latency_seconds_count", adapter="emoji") >= 1
    assert metric_value(samples, "reft_request_latency_seconds_bucket", adapter="emoji", le="+Inf") >= 1
    assert metric_value(samples, "reft_time_to_first_token_seconds_count", adapter="emoji") >= 1
    assert metric_value(samples, "reft_resident_adapters") >= 1
    assert metric_value(samples, "vllm:num_requests_waiting") == 0
    assert 0 <= metric_value(samples, "vllm:gpu_cache_usage_perc") <= 1
    info = samples["vllm:lora_requests_info"]
    assert len(info) == 1
    assert set(info[0].labels) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
    assert info[0].labels["max_lora"].isdigit() and int(info[0].labels["max_lora"]) >= 1


def test_adapter_residency_metrics(client):
    """The series the llm-d router's lora-load-state scorer reads: the pinned adapter and one loaded by
    a request are on the device (gpu) and parsed in host memory (cpu); a deleted one leaves both."""
    name = "resident-" + secrets.token_hex(3)
    r = client.post("/v1/adapters", data={"name": name},
                    files={"file": ("a.safetensors", emoji_bytes(), "application/octet-stream")})
    assert r.status_code == 201, r.text
    loads = metric_value(metrics(client), "vllm:lora_adapter_load_seconds_count")
    for model in ("emoji", name):
        r = client.post("/v1/completions", json={"model": model, "prompt": GENS[0]["prompt_ids"], "max_tokens": 1})
        assert r.status_code == 200, r.text
    samples = metrics(client)
    loaded = {(s.labels["adapter_name"], s.labels["level"], s.labels["pinned"]): s.value
              for s in samples["vllm:lora_adapter_loaded"]}
    assert loaded[("emoji", "gpu", "true")] == 1 and loaded[("emoji", "cpu", "false")] == 1
    assert loaded[(name, "gpu", "false")] == 1 and loaded[(name, "cpu", "false")] == 1
    gpu = sum(v for (_, level, _), v in loaded.items() if level == "gpu")
    assert metric_value(samples, "vllm:num_gpu_loaded_lora_adapters") == gpu >= 2
    assert metric_value(samples, "vllm:max_gpu_lora_adapters") == 8  # REFT_MAX_BATCH_SIZE, as max_lora
    # the pinned adapter loaded at start-up, before the metrics; the new one's first request loads it
    assert metric_value(samples, "vllm:lora_adapter_load_seconds_count") == loads + 1
    assert metric_value(samples, "vllm:lora_adapter_load_seconds_bucket", le="+Inf") == loads + 1
    assert metric_value(samples, "vllm:lora_adapter_load_seconds_sum") > 0
    assert client.delete(f"/v1/adapters/{name}").status_code == 204
    after = metrics(client)
    assert not [s for s in after["vllm:lora_adapter_loaded"] if s.labels["adapter_name"] == name]
    assert metric_value(after, "vllm:num_gpu_loaded_lora_adapters") == gpu - 1


def test_access_log_one_json_line_per_request(server, client):
    marker = "access-" + secrets.token_hex(4)
    assert client.post("/v1/completions", json={"model": "base", "prompt": [1, 2], "max_tokens": 1}).status_code == 200
    generate_before = sum(1 for e in access_lines(server.log()) if e["path"] == "/generate")
    r = client.post("/generate", json={"adapter": "emoji", "prompt": [1, 2, 3], "max_new_tokens": 2})
    assert r.status_code == 200
    error_of(client.get(f"/v1/adapters/{marker}"), 404)
    error_of(client.post("/v1/completions", json={"model": marker, "prompt": "Hi", "max_tokens": 1}), 404)

    def settled():
        lines = access_lines(server.log())
        gen = [e for e in lines if e["path"] == "/generate"]
        return lines if len(gen) > generate_before and any(marker in e["path"] for e in lines) else None

    lines = wait_for(settled, timeout=5)
    assert lines, "access lines never appeared"
    gen = [e for e in lines if e["path"] == "/generate"]
    assert len(gen) == generate_before + 1
    entry = gen[-1]
    assert entry["method"] == "POST" and entry["status"] == 200 and entry["adapter"] == "emoji"
    assert isinstance(entry["latency_ms"], (int, float)) and entry["latency_ms"] > 0
    hits = [e for e in lines if e["path"] == f"/v1/adapters/{marker}"]
    assert len(hits) == 1 and hits[0]["status"] == 404
    for e in lines:
        assert {"path", "status", "latency_ms", "method"} <= set(e), e
        if e["path"] in ("/v1/completions", "/generate", "/v1/chat/completions") and e["status"] == 200:
            assert "adapter" in e, e
    base_line = [e for e in lines if e["path"] == "/v1/completions" and e["status"] == 200]
    assert any(e["adapter"] is None for e in base_line)  # model "base" is logged as no adapter


def test_access_log_names_adapter_of_refused_requests(server, client):
    marker = "refused-" + secrets.token_hex(4)
    error_of(client.post("/v1/completions", json={"model": marker, "prompt": "Hi", "max_tokens": 1}), 404)
    # Earlier tests' refusals are in the same log: wait for this one's line, which must name the adapter.
    lines = wait_for(lambda: [e for e in access_lines(server.log()) if e.get("status") == 404
                              and e["path"] == "/v1/completions" and e.get("adapter") == marker], timeout=10)
    assert lines, [e for e in access_lines(server.log()) if e.get("status") == 404][-3:]


# ---- logprobs, echo, n, penalties ----------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_model():
    """The same base model in this process, for plain transformers forwards."""
    from server.model import load_base_model

    return load_base_model()


def token_bytes(token: str) -> bytes:
    """A legacy logprobs token back to bytes ("bytes:\\xNN..." for part of a character)."""
    if token.startswith("bytes:"):
        return bytes(int(x, 16) for x in token[len("bytes:"):].split("\\x")[1:])
    return token.encode()


def completions(client: httpx.Client, **body) -> dict:
    r = client.post("/v1/completions", json={"model": "base", "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_logprobs_of_the_base_model_equal_a_plain_forward(client, reference_model):
    """lm-eval's loglikelihood request: echo the prompt with its tokens' logprobs, generate nothing."""
    import torch

    prompt = GENS[0]["prompt_ids"]
    body = completions(client, prompt=prompt, echo=True, logprobs=5, max_tokens=0)
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt),
                             "prompt_tokens_details": {"cached_tokens": 0}}  # an echo reuses no cached KV
    assert choice["finish_reason"] == "length" and len(lp["tokens"]) == len(prompt)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.inference_mode():
        want = reference_model.model(input_ids=torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    from server.api.token_bytes import TokenBytes

    texts = TokenBytes(reference_model.tokenizer)
    for i, token in enumerate(prompt[1:], start=1):
        assert lp["token_logprobs"][i] == pytest.approx(float(want[i - 1, token]), abs=LOGPROB_ABS)
        assert lp["tokens"][i] == texts.text_of(token)
        top = want[i - 1].topk(5)
        expected = {texts.text_of(t): float(v) for t, v in zip(top.indices.tolist(), top.values, strict=True)}
        for text, value in expected.items():
            assert lp["top_logprobs"][i][text] == pytest.approx(value, abs=LOGPROB_ABS)
    # Offsets index the echoed text; special tokens (not in the text) take no room.
    text = choice["text"]
    for token, offset in zip(prompt, lp["text_offset"], strict=True):
        if token not in texts.special:
            assert text[offset:].startswith(texts.text_of(token)), (token, offset)
    sent = completions(client, prompt="Kitties \U0001f965 ok", echo=True, logprobs=0, max_tokens=0)["choices"][0]
    assert sent["text"] == "Kitties \U0001f965 ok"
    pieces = sent["logprobs"]["tokens"]
    assert any(t.startswith("bytes:") for t in pieces)  # the emoji spans several tokens
    assert b"".join(token_bytes(t) for t in pieces[1:]).decode() == sent["text"]


def test_the_greedy_token_carries_the_highest_logprob_and_streams_the_same(client):
    body = completions(client, model="emoji", prompt=GENS[1]["prompt_ids"], logprobs=3, max_tokens=12)
    lp = body["choices"][0]["logprobs"]
    shown = [t for t in lp["tokens"] if t != "<|im_end|>"]  # the stop token is not part of the text
    assert b"".join(token_bytes(t) for t in shown).decode() == body["choices"][0]["text"]
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert value == pytest.approx(max(top.values()), abs=1e-6) and top[token] == value
    r = client.post("/v1/completions", json={"model": "emoji", "prompt": GENS[1]["prompt_ids"], "temperature": 0,
                                             "logprobs": 3, "max_tokens": 12, "stream": True})
    chunks = [json.loads(d) for d in sse_data(r) if d != "[DONE]"]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0].get("logprobs")]
    assert [t for s in streamed for t in s["tokens"]] == lp["tokens"]
    assert [v for s in streamed for v in s["token_logprobs"]] == pytest.approx(lp["token_logprobs"], abs=1e-5)
    assert [o for s in streamed for o in s["text_offset"]] == lp["text_offset"]


def test_n_choices_are_independent_and_reproducible_with_a_seed(client):
    body = {"model": "emoji", "prompt": GENS[2]["prompt_ids"], "temperature": 1.0, "seed": 11, "max_tokens": 8}
    first = completions(client, **body, n=3)
    again = completions(client, **body, n=3)
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert texts == [c["text"] for c in again["choices"]]
    assert len(set(texts)) > 1
    assert completions(client, **body)["choices"][0]["text"] == texts[0]  # choice 0 uses the seed itself
    assert first["usage"]["completion_tokens"] == 3 * 8 or first["usage"]["completion_tokens"] <= 3 * 8


def test_best_of_returns_the_most_likely_of_its_samples(client):
    body = {"model": "base", "prompt": "Once upon a time", "temperature": 1.0, "seed": 5, "max_tokens": 6,
            "ignore_eos": True}
    samples = completions(client, **body, n=4, logprobs=0)["choices"]
    best = completions(client, **body, n=2, best_of=4)
    ranked = sorted(samples, key=lambda c: sum(c["logprobs"]["token_logprobs"]), reverse=True)
    assert [c["text"] for c in best["choices"]] == [c["text"] for c in ranked[:2]]
    assert all(c["logprobs"] is None for c in best["choices"])


def test_several_prompts_answer_in_order_like_single_requests(client):
    prompts = [GENS[0]["prompt_ids"], GENS[1]["prompt_ids"], GENS[2]["prompt_ids"]]
    body = completions(client, model="emoji", prompt=prompts, max_tokens=6, n=2)
    assert [c["index"] for c in body["choices"]] == list(range(6))
    for i, prompt in enumerate(prompts):
        alone = completions(client, model="emoji", prompt=prompt, max_tokens=6)["choices"][0]["text"]
        assert body["choices"][2 * i]["text"] == body["choices"][2 * i + 1]["text"] == alone


def test_logit_bias_and_penalties_change_greedy_output(client):
    """A prompt the base model answers by looping: frequency and repetition penalties break the loop, a logit
    bias of 100 forces its token. (Presence subtracts at most 2, too little against this loop; the sampler's
    tests check its arithmetic.)"""
    prompt = "1, 1, 1, 1, 1, 1, 1, 1,"
    plain = completions(client, prompt=prompt, max_tokens=8, ignore_eos=True, logprobs=0)["choices"][0]
    tokens = plain["logprobs"]["tokens"]
    assert len(set(tokens)) <= 3, tokens  # the loop the penalties must break
    for extra in ({"frequency_penalty": 2.0}, {"repetition_penalty": 3.0}):
        penalised = completions(client, prompt=prompt, max_tokens=8, ignore_eos=True, **extra)["choices"][0]
        assert penalised["text"] != plain["text"], extra
    assert completions(client, prompt=prompt, max_tokens=10, ignore_eos=True, presence_penalty=-2.0)["choices"]
    forced = completions(client, prompt=prompt, max_tokens=3, logit_bias={"28": 100}, logprobs=0)["choices"][0]
    assert forced["logprobs"]["tokens"] == [","] * 3


def test_openai_client_reads_logprobs_echo_and_chat_logprobs(oai):
    out = oai.completions.create(model="base", prompt="The sky is", max_tokens=3, temperature=0, logprobs=2,
                                 echo=True)
    lp = out.choices[0].logprobs
    assert out.choices[0].text.startswith("The sky is")
    assert lp.token_logprobs[0] is None and len(lp.tokens) == out.usage.prompt_tokens + 3
    chat = oai.chat.completions.create(model="emoji", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3, n=2)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content
    content = chat.choices[0].logprobs.content
    shown = [t for t in content if t.token != "<|im_end|>"]
    assert b"".join(bytes(t.bytes) for t in shown).decode() == chat.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-6)
        assert t.token == (bytes(t.bytes).decode() if not t.token.startswith("bytes:") else t.token)
    chunks = list(oai.chat.completions.create(model="emoji", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4, temperature=0, logprobs=True, top_logprobs=1,
                                              stream=True))
    streamed = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed == [t.token for t in content]

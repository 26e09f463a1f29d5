"""Costly inputs over HTTP: bounded before the work, and the work around the engine kept off the event loop.

One real server with room for 8 requests (four running rows, a queue of 4), no host adapter cache
(every request that names an adapter reads it from disk) and an 8.9 MB adapter whose read
takes a few hundred milliseconds, so concurrent reads overlap.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from server import adapter_file
from server.interventions import Intervention
from server.model import ModelShape
from tests.conftest import REPO, error_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ROOM = 8  # REFT_MAX_BATCH_SIZE 4 + REFT_MAX_QUEUE 4
MAX_PROMPT_LOGPROBS = 262_144  # the default


def big_adapter() -> bytes:
    """LoReFT of rank 64 after every one of SmolLM2's 30 layers: 8.9 MB."""
    shape = ModelShape("llama", 576, 30)
    emoji = adapter_file.loads((REPO / "adapters" / "emoji.safetensors").read_bytes(), shape, 64)
    g = torch.Generator().manual_seed(0)
    ivs = []
    for layer in range(shape.num_layers):
        rotate, _ = torch.linalg.qr(torch.randn(shape.hidden_size, 64, generator=g))
        ivs.append(Intervention("loreft", layer, 64, {"rotate_layer": rotate.contiguous(),
                                                      "weight": 0.01 * torch.randn(64, shape.hidden_size, generator=g),
                                                      "bias": torch.zeros(64)}))
    return adapter_file.to_bytes(adapter_file.build(ivs, emoji.positions, emoji.share_weights, emoji.base,
                                                    emoji.dtype))


@pytest.fixture(scope="module")
def server(tmp_path_factory, reft_server_factory):
    root = tmp_path_factory.mktemp("bounds")
    registry = root / "adapters"
    registry.mkdir()
    (registry / "big.safetensors").write_bytes(big_adapter())
    env = {"REFT_MAX_BATCH_SIZE": "4", "REFT_MAX_QUEUE": "4", "REFT_HOST_ADAPTER_CACHE_BYTES": "0",
           "REFT_SCAN_INTERVAL": "0", "REFT_BATCH_WAIT_MS": "0", "REFT_MAX_PREFILL_TOKENS": "1024",
           "REFT_PREFILL_CHUNK_TOKENS": "512"}
    srv = reft_server_factory(registry, root / "server.log", env)
    yield srv
    srv.stop()


def counter(client: httpx.Client, name: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    raise KeyError(name)


def burst(url: str, bodies: list[dict], path: str = "/v1/completions") -> list[tuple[int, dict]]:
    """Send every body at once on already open connections; (status, JSON answer) each."""
    async def go() -> list[tuple[int, dict]]:
        async with httpx.AsyncClient(base_url=url, timeout=300,
                                     limits=httpx.Limits(max_connections=len(bodies))) as c:
            rs = await asyncio.gather(*[c.post(path, json=body) for body in bodies])
        return [(r.status_code, r.json()) for r in rs]

    return asyncio.run(go())


# ---- logit_bias ---------------------------------------------------------------------------------


def test_logit_bias_keys_that_are_not_ascii_token_ids_are_400(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for key in ("²", "١", "1" * 5000, " 1_0 ", "0x1f", ""):
            r = c.post("/v1/completions", json={"model": "base", "prompt": "Hi", "max_tokens": 1,
                                                "logit_bias": {key: 1}})
            message = error_of(r, 400)
            assert "logit_bias" in message and "0..49151" in message and len(message) < 300, (key[:10], message)
        r = c.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "Hi"}],
                                                 "max_tokens": 1, "logit_bias": {"²": 1}})
        assert "logit_bias" in error_of(r, 400)
        r = c.post("/v1/completions", json={"model": "base", "prompt": "Hi", "max_tokens": 1,
                                            "logit_bias": {" 42 ": 1}})
        assert r.status_code == 200, r.text


# ---- prompt logprobs ----------------------------------------------------------------------------


def test_echo_logprobs_past_the_bound_is_400_with_the_numbers(server):
    ids = list(range(1000, 1000 + 4000))
    body = {"model": "base", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 20, "n": 4}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        start = time.monotonic()
        message = error_of(c.post("/v1/completions", json=body), 400)
        assert time.monotonic() - start < 10  # refused before any prefill of 16,000 positions
        for number in ("4000", "4 choices", "21", "336000", str(MAX_PROMPT_LOGPROBS), "REFT_MAX_PROMPT_LOGPROBS"):
            assert number in message, message
        # streaming is refused alike, before its first chunk
        assert "336000" in error_of(c.post("/v1/completions", json={**body, "stream": True}), 400)


def build_locally(tokens: list[int], logprobs: int) -> float:
    """Seconds this process takes to build and serialise an echo answer of that size, as the server does."""
    from transformers import AutoTokenizer

    from server.api.logprobs import CompletionLogprobsWriter
    from server.api.protocol import CompletionChoice, CompletionResponse
    from server.api.token_bytes import TokenBytes
    from server.engine.sampling import TokenLogprobs
    from server.model import converted_gguf_dir, default_gguf_path

    tokenizer = AutoTokenizer.from_pretrained(converted_gguf_dir(default_gguf_path()))
    writer = CompletionLogprobsWriter(TokenBytes(tokenizer))
    entries = [TokenLogprobs(-1.0, tuple((t, -2.0) for t in range(logprobs))) for _ in tokens[1:]]
    start = time.monotonic()
    echoed = writer.echo("x" * len(tokens), tokens, entries)
    choice = CompletionChoice(text="x", logprobs=echoed, finish_reason="length")
    json.dumps(CompletionResponse(model="base", choices=[choice]).model_dump(mode="json"))
    return time.monotonic() - start


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, reft_server_factory):
    """bench/random_model.py's tiny Llama with SmolLM2's vocabulary: an echo answer as large as the default model's
    at a small fraction of its prefill."""
    from tests.test_bench_tools import random_model

    root = tmp_path_factory.mktemp("tiny")
    done = random_model(str(root / "model"), "--shape", "tiny", "--dtype", "float32", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    (root / "adapters").mkdir()
    env = {"REFT_MODEL": str(root / "model"), "REFT_SCAN_INTERVAL": "0", "REFT_BATCH_WAIT_MS": "0",
           "REFT_MAX_PREFILL_TOKENS": "1024", "REFT_PREFILL_CHUNK_TOKENS": "512"}
    srv = reft_server_factory(root / "adapters", root / "server.log", env)
    yield srv
    srv.stop()


def test_event_loop_answers_while_a_large_echo_answer_is_built(tiny):
    """252,000 logprob entries (6 prompts x 2,000 tokens x 21), within the default bound: built and serialised
    in a thread, so /health keeps answering meanwhile. On the event loop, a probe in flight would wait for the
    whole build (FastAPI's validation of the answer included), which takes more than `build` seconds, measured
    in this process, so the bound scales with the machine's speed and load."""
    prompts = [list(range(1000 + 2000 * i, 3000 + 2000 * i)) for i in range(6)]
    build = sum(build_locally(p, 20) for p in prompts)
    body = {"model": "base", "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 20}
    answer: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: answer.append(httpx.post(tiny.url + "/v1/completions", json=body,
                                                                      timeout=600)))
    latencies: list[float] = []
    with httpx.Client(base_url=tiny.url, timeout=60) as c:
        worker.start()
        while worker.is_alive():
            start = time.monotonic()
            assert c.get("/health").status_code == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.005)
    worker.join()
    r = answer[0]
    assert r.status_code == 200, r.text[:500]
    choices = r.json()["choices"]
    assert [len(ch["logprobs"]["tokens"]) for ch in choices] == [2000] * 6
    assert all(ch["logprobs"]["token_logprobs"][0] is None for ch in choices)
    assert all(len(top) >= 20 for top in choices[5]["logprobs"]["top_logprobs"][1:])
    print(f"\n/health during a {len(r.content) / 1e6:.1f} MB echo answer: {len(latencies)} probes, max "
          f"{1000 * max(latencies):.0f} ms; building it here takes {1000 * build:.0f} ms")
    assert max(latencies) < build, (sorted(latencies)[-5:], build)


# ---- before the engine queue --------------------------------------------------------------------


def test_requests_being_tokenised_count_toward_the_429_limit(server):
    """A burst of prompts that take long to tokenise: beyond the room for 8, the rest are refused at once, not
    after their tokenisation (here they would all fail later anyway: each prompt is over the context)."""
    text = "The quick brown fox jumps over the lazy dog, again and again. " * 1500  # ~21,000 tokens, ~0.3 s
    bodies = [{"model": "base", "prompt": text, "max_tokens": 1}] * (3 * ROOM)
    results = burst(server.url, bodies)
    statuses = [status for status, _ in results]
    refused = [body["error"]["message"] for status, body in results if status == 429]
    print(f"\nburst of {len(bodies)} long prompts: {statuses.count(429)} x 429, {statuses.count(400)} x 400")
    assert set(statuses) <= {400, 429}, statuses
    assert len(refused) >= ROOM, statuses  # at most the room's worth of prompts was tokenised at a time
    assert all("being prepared" in m for m in refused), refused[:3]
    with httpx.Client(base_url=server.url, timeout=60) as c:  # and the count went back to 0
        assert c.post("/v1/completions", json={"model": "base", "prompt": "Hi", "max_tokens": 1}).status_code == 200


def test_concurrent_first_reads_of_one_adapter_are_one(server):
    body = {"model": "big", "prompt": "Hi", "max_tokens": 0, "echo": True}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        before = counter(c, "reft_adapter_loads_total")
        results = burst(server.url, [body] * ROOM)
        assert [status for status, _ in results] == [200] * ROOM, results
        after_burst = counter(c, "reft_adapter_loads_total")
        assert c.post("/v1/completions", json=body).status_code == 200  # no host cache here: read again
        after_one = counter(c, "reft_adapter_loads_total")
    print(f"\n{ROOM} concurrent requests for an unread adapter: {after_burst - before:.0f} read(s)")
    assert after_burst - before == 1
    assert after_one - after_burst == 1


def test_answers_built_off_the_event_loop_keep_their_shape(server):
    """Answers serialised off the event loop keep the schema's shape (every field, nulls included)."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"model": "base", "prompt": "Hi", "max_tokens": 2})
        body = r.json()
        assert r.headers["content-type"] == "application/json"
        assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
        assert set(body["choices"][0]) >= {"index", "text", "logprobs", "finish_reason"}
        assert body["choices"][0]["logprobs"] is None
        r = c.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "Hi"}],
                                                 "max_tokens": 2, "logprobs": True, "top_logprobs": 2})
        assert r.status_code == 200 and json.loads(r.text)["choices"][0]["logprobs"]["content"]


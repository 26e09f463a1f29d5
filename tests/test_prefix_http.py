"""The prefix cache as clients and the router see it: OpenAI's `usage.prompt_tokens_details.cached_tokens`
on completions and chat, streaming or not, the vLLM-named counters and `vllm:cache_config_info`, and
`--no-prefix-cache`."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server import adapter_file
from tests.test_api import EMOJI_DIR, SHAPE

SYSTEM = "You answer questions about the following notes. " + "The notes say many careful things. " * 12


def samples(client: httpx.Client) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def start(tmp_path_factory, reft_server_factory, env: dict[str, str]):
    root = tmp_path_factory.mktemp("prefix")
    registry = root / "adapters"
    registry.mkdir()
    emoji = adapter_file.import_pyreft(EMOJI_DIR, "f2+l2", True, SHAPE, 64)
    (registry / "emoji.safetensors").write_bytes(adapter_file.to_bytes(emoji))
    return reft_server_factory(registry, root / "server.log", {"REFT_SCAN_INTERVAL": "0", **env})


@pytest.fixture(scope="module")
def server(tmp_path_factory, reft_server_factory):
    srv = start(tmp_path_factory, reft_server_factory, {})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def cached_of(usage: dict) -> int:
    return usage["prompt_tokens_details"]["cached_tokens"]


def test_completions_report_cached_tokens_streaming_or_not(client):
    prompt = SYSTEM + " First question: what do the notes say?"
    first = client.post("/v1/completions", json={"model": "base", "prompt": prompt, "max_tokens": 2}).json()
    assert cached_of(first["usage"]) == 0
    again = client.post("/v1/completions", json={"model": "base", "prompt": prompt, "max_tokens": 2}).json()
    whole = (first["usage"]["prompt_tokens"] - 1) // 32 * 32  # full blocks, the last token always computed
    assert whole >= 64 and cached_of(again["usage"]) == whole
    with client.stream("POST", "/v1/completions", json={"model": "base", "prompt": prompt + " And?", "max_tokens": 2,
                                                       "stream": True,
                                                       "stream_options": {"include_usage": True}}) as r:
        chunks = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    assert cached_of(chunks[-1]["usage"]) >= whole - 32


def test_chat_shares_the_system_prompt_across_adapters(oai):
    def ask(model: str, question: str, stream: bool = False):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        if not stream:
            return oai.chat.completions.create(model=model, messages=messages, max_tokens=2).usage
        chunks = list(oai.chat.completions.create(model=model, messages=messages, max_tokens=2, stream=True,
                                                  stream_options={"include_usage": True}))
        return chunks[-1].usage

    ask("base", "Warm up.")
    # emoji acts on the first two positions: none of its blocks is a base block, so it reuses only its own
    assert ask("emoji", "Who wrote them?").prompt_tokens_details.cached_tokens == 0
    assert ask("emoji", "Who wrote them?").prompt_tokens_details.cached_tokens > 0
    usage = ask("base", "When?", stream=True)
    assert usage.prompt_tokens_details.cached_tokens >= 64


def test_metrics_count_queries_and_hits_in_tokens(client):
    before = samples(client)
    prompt = SYSTEM + " Metrics question."
    for _ in range(2):
        client.post("/v1/completions", json={"model": "base", "prompt": prompt, "max_tokens": 1})
    after = samples(client)

    def total(s: dict, name: str) -> float:
        return s[name][0].value if name in s else 0.0

    queried = total(after, "vllm:prefix_cache_queries_total") - total(before, "vllm:prefix_cache_queries_total")
    hits = total(after, "vllm:prefix_cache_hits_total") - total(before, "vllm:prefix_cache_hits_total")
    assert queried > 2 * 64 and 64 <= hits < queried
    config = after["vllm:cache_config_info"][0]
    assert config.labels["block_size"] == "32" and config.labels["enable_prefix_caching"] == "True"
    assert int(config.labels["num_gpu_blocks"]) > 1000
    assert after["reft_prefix_cache_blocks"][0].value > 0


def test_no_prefix_cache_computes_every_prompt(tmp_path_factory, reft_server_factory):
    srv = start(tmp_path_factory, reft_server_factory, {"REFT_PREFIX_CACHE": "false"})
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            for _ in range(2):
                body = c.post("/v1/completions", json={"model": "base", "prompt": SYSTEM, "max_tokens": 1}).json()
                assert cached_of(body["usage"]) == 0
            assert samples(c)["vllm:cache_config_info"][0].labels["enable_prefix_caching"] == "False"
    finally:
        srv.stop()

"""The prefix cache's figures (`bench/run.py --only prefix`): three servers on one registry, the cache
on, off, and keyed by adapter (as a LoRA server must key it), measured in alternating blocks, one
server computing at a time.

- P14 shared document: a fresh 1,000-token document per block, warmed by one base request, then 32
  concurrent requests each with its own 32-token question and its own `l8` adapter: mean time to
  first token, cache on ÷ off (target ≤ 0.15), and keyed by adapter ÷ off (what a LoRA server gets).
- P15 conversations: 8 concurrent chats of 6 turns on one fresh 1,000-token system prompt, answers of
  up to 32 tokens, each turn re-sending the history, three base, three `l8` and two `f4+l4`: prefill
  positions computed ÷ prompt tokens sent (≤ 0.35) and wall time on ÷ off (≤ 0.5).
- No hits: P1's workload (32 concurrent random 64-token prompts, 32 adapters, 32 tokens) and P3's
  sequential side, fresh random prompts every run: throughput on ÷ off (≥ 0.97 each).
- The copy against the prefill it saves, in-process: copying 992 tokens of KV into a slot ÷ computing
  them (PREFIX_COPY), which is why cached blocks are copied into the row's slot, not paged.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from common import Load, ServerProcess, median, random_loreft, random_prompts

from server import adapter_file

WORDS = ("river stone lamp orchard signal harbor winter copper meadow lantern valley engine garden "
         "letter mirror window forest candle bridge thunder market silver morning question answer "
         "number system careful detail history report council season village").split()
L_ADAPTERS = [f"l8-{i:02d}" for i in range(32)]
FL_ADAPTERS = ["fl-0", "fl-1"]


def write_registry(directory: Path, shape) -> None:  # noqa: ANN001 - a ModelShape
    directory.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(L_ADAPTERS):
        adapter = random_loreft(shape, 5000 + i, positions="l8")
        (directory / f"{name}.safetensors").write_bytes(adapter_file.to_bytes(adapter))
    for i, name in enumerate(FL_ADAPTERS):
        adapter = random_loreft(shape, 6000 + i, positions="f4+l4")
        (directory / f"{name}.safetensors").write_bytes(adapter_file.to_bytes(adapter))


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def metric(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    body = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(body) for s in f.samples if s.name == name)


def ttft(client: httpx.Client, adapter: str | None, prompt: list[int]) -> tuple[float, int]:
    """Seconds to the first streamed token of one /v1/completions request, and its cached prompt tokens."""
    body = {"model": adapter or "base", "prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0, first, cached = time.perf_counter(), None, 0
    with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"POST /v1/completions -> {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            if first is None and '"text"' in line:
                first = time.perf_counter() - t0
            if '"usage"' in line and '"prompt_tokens_details"' in line:


                usage = json.loads(line[5:]).get("usage") or {}
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return (first if first is not None else time.perf_counter() - t0), cached


def shared_document(servers: dict[str, ServerProcess], pool: ThreadPoolExecutor, block: int) -> dict[str, dict]:
    """One P14 block on every server: the same fresh document and questions on each."""
    doc = random_prompts(1, 1000, seed=7000 + block)[0]
    questions = random_prompts(32, 32, seed=8000 + block)
    out = {}
    order = list(servers) if block % 2 == 0 else list(reversed(servers))
    for side in order:
        with httpx.Client(base_url=servers[side].url, timeout=600,
                          limits=httpx.Limits(max_connections=40)) as client:
            ttft(client, None, doc + [42])  # the base request that warms the document
            futures = [pool.submit(ttft, client, name, doc + q) for name, q in zip(L_ADAPTERS, questions,
                                                                                    strict=True)]
            results = [f.result() for f in futures]
        out[side] = {"mean_ttft_s": statistics.fmean(t for t, _ in results),
                     "cached_tokens": sum(c for _, c in results)}
    return out


def conversations(url: str, pool: ThreadPoolExecutor, block: int) -> dict:
    """One P15 run on one server: 8 concurrent conversations of 6 turns; wall time and prefill counters."""
    rng = random.Random(9000 + block)
    system = text(rng, 850)  # about 1,000 tokens
    models = ["base", "base", "base", L_ADAPTERS[0], L_ADAPTERS[1], L_ADAPTERS[2], *FL_ADAPTERS]
    questions = [[text(rng, 12) + "?" for _ in range(6)] for _ in models]
    positions0, tokens0 = metric(url, "reft_prefill_positions_total"), metric(url, "reft_prompt_tokens_total")

    def chat(i: int) -> int:
        messages = [{"role": "system", "content": system}]
        cached = 0
        with httpx.Client(base_url=url, timeout=600) as client:
            for q in questions[i]:
                messages.append({"role": "user", "content": q})
                r = client.post("/v1/chat/completions", json={"model": models[i], "messages": messages,
                                                              "max_tokens": 32, "temperature": 0})
                if r.status_code != 200:
                    raise RuntimeError(f"chat -> {r.status_code}: {r.text[:300]}")
                body = r.json()
                cached += body["usage"]["prompt_tokens_details"]["cached_tokens"]
                messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"] or ""})
        return cached

    t0 = time.perf_counter()
    cached = sum(f.result() for f in [pool.submit(chat, i) for i in range(len(models))])
    wall = time.perf_counter() - t0
    positions = metric(url, "reft_prefill_positions_total") - positions0
    tokens = metric(url, "reft_prompt_tokens_total") - tokens0
    return {"wall_s": wall, "positions": positions, "prompt_tokens": tokens, "cached_tokens": cached}


def no_hits(servers: dict[str, ServerProcess], rounds: int, seed0: int) -> dict[str, list[float]]:
    """P1's and P3's workloads on fresh random prompts: on ÷ off throughput, ABBA blocks."""
    ratios: dict[str, list[float]] = {"batch": [], "sequential": []}
    loads = {side: Load(servers[side].url, concurrency=40) for side in ("on", "off")}
    try:
        for rnd in range(rounds):
            for kind in ratios:
                tok_s: dict[str, float] = {"on": 0.0, "off": 0.0}
                order = ("on", "off", "off", "on") if rnd % 2 == 0 else ("off", "on", "on", "off")
                for k, side in enumerate(order):
                    seed = seed0 + 100 * rnd + 10 * k + (kind == "sequential")
                    if kind == "batch":
                        run = loads[side].concurrent(L_ADAPTERS, random_prompts(32, 64, seed), 32)
                    else:
                        run = loads[side].sequential(L_ADAPTERS[:4], random_prompts(4, 64, seed), 32)
                    tok_s[side] += run["tok_s"]
                ratios[kind].append(tok_s["on"] / tok_s["off"])
    finally:
        for load in loads.values():
            load.close()
    return ratios


def copy_against_prefill(model: str | None) -> dict[str, float]:
    """In-process: copy 992 cached tokens of KV into a slot vs prefill the same 992 tokens (medians of 5)."""
    import torch

    from server.engine.kv_cache import KVCache
    from server.engine.runner import ModelRunner, PrefillChunk
    from server.model import load_base_model

    base = load_base_model(model)
    kv = KVCache.for_model(base.model.config, base.dtype, base.device, 256 << 20)
    runner = ModelRunner(base, kv)
    n = 992
    prompt = random_prompts(1, n, seed=3)[0]
    src, dst = kv.allocate(n), kv.allocate(n)

    def timed(fn: Callable[[], object]) -> float:
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return median(samples)

    prefill = timed(lambda: runner.prefill([PrefillChunk(prompt, 0, n, src)]))
    copy = timed(lambda: kv.copy([(src.start + 32 * i, dst.start + 32 * i) for i in range(n // 32)], 32))
    with torch.inference_mode():
        same = all(torch.equal(p[:, src.start : src.start + n], p[:, dst.start : dst.start + n]) for p in kv.k)
    return {"copy_ms": 1000 * copy, "prefill_ms": 1000 * prefill, "ratio": copy / prefill, "exact": float(same),
            **reused_against_recomputed(runner, kv, prompt[:200])}


def reused_against_recomputed(runner, kv, prompt: list[int]) -> dict[str, float]:  # noqa: ANN001
    """How far reused KV is from recomputed KV: a prompt prefilled with a second row packed beside it and then
    32 greedy tokens decoded one at a time (what a cached block holds), against the prompt and those tokens
    prefilled alone in one chunk (what a request without the cache computes). Max |difference| ÷ max |value|."""
    import torch

    from server.engine.runner import DecodeRow, PrefillChunk

    n, new = len(prompt), 32
    cached, other, fresh = kv.allocate(n + new), kv.allocate(n + new), kv.allocate(n + new)
    neighbour = random_prompts(1, 77, seed=5)[0]
    logits = runner.prefill([PrefillChunk(neighbour, 0, 77, other), PrefillChunk(prompt, 0, n, cached)]).logits[1:]
    tokens = []
    for i in range(new):
        tokens.append(int(logits[0].argmax()))
        logits = runner.decode([DecodeRow(tokens[-1], n + i, cached)])
    runner.prefill([PrefillChunk(prompt + tokens, 0, n + new, fresh)])

    def diff(lo: int, hi: int) -> float:
        worst, scale = 0.0, 0.0
        for pool in (*kv.k, *kv.v):
            a, b = pool[:, cached.start + lo : cached.start + hi], pool[:, fresh.start + lo : fresh.start + hi]
            worst, scale = max(worst, float((a - b).abs().max())), max(scale, float(b.abs().max()))
        return worst / scale

    with torch.inference_mode():
        return {"kv_rel_diff_prompt": diff(0, n), "kv_rel_diff_decoded": diff(n, n + new - 1)}


def run(args, report, tmp: Path, shape) -> None:  # noqa: ANN001 - run.py's namespace and Report
    """The whole section: servers up, P14, P15, no hits, the copy; servers down."""
    registry = tmp / "prefix-registry"
    write_registry(registry, shape)
    envs = {"on": {}, "off": {"REFT_PREFIX_CACHE": "false"}, "keyed": {"REFT_PREFIX_CACHE_SCOPE": "adapter"}}
    servers = {side: ServerProcess(registry, tmp / f"prefix-{side}.log", args.model, {**args.env, **env})
               for side, env in envs.items()}
    pool = ThreadPoolExecutor(max_workers=40)
    try:
        for server in servers.values():
            server.start()
        blocks = 1 if args.quick else 3
        p14 = [shared_document(servers, pool, b) for b in range(blocks)]
        report.samples("p14", p14)
        report.figure("P14", median([b["on"]["mean_ttft_s"] / b["off"]["mean_ttft_s"] for b in p14]), "<=0.15",
                      "ratio (mean TTFT with the cache ÷ without; 32 l8 adapters on one 1,000-token document)",
                      on_ms=1000 * median([b["on"]["mean_ttft_s"] for b in p14]),
                      off_ms=1000 * median([b["off"]["mean_ttft_s"] for b in p14]),
                      cached_tokens=[b["on"]["cached_tokens"] for b in p14])
        report.figure("P14_KEYED_BY_ADAPTER", median([b["keyed"]["mean_ttft_s"] / b["off"]["mean_ttft_s"]
                                                      for b in p14]), None,
                      "ratio (the same with every block keyed by adapter, as a LoRA server must ÷ without)",
                      keyed_ms=1000 * median([b["keyed"]["mean_ttft_s"] for b in p14]))
        report.save()
        p15: list[dict] = []
        for b in range(1 if args.quick else 2):
            order = ("on", "off") if b % 2 == 0 else ("off", "on")
            p15.append({side: conversations(servers[side].url, pool, b) for side in order})
            report.samples("p15", p15)
            report.save()
        on = [b["on"] for b in p15]
        report.figure("P15", sum(r["positions"] for r in on) / sum(r["prompt_tokens"] for r in on), "<=0.35",
                      "ratio (prefill positions computed ÷ prompt tokens sent, cache on)",
                      cached_tokens=sum(r["cached_tokens"] for r in on))
        report.figure("P15_WALL", median([b["on"]["wall_s"] / b["off"]["wall_s"] for b in p15]), "<=0.5",
                      "ratio (wall time of the 8 x 6-turn run with the cache ÷ without)",
                      on_s=median([b["on"]["wall_s"] for b in p15]), off_s=median([b["off"]["wall_s"] for b in p15]))
        hits = no_hits(servers, 1 if args.quick else 3, 20_000)
        report.samples("prefix_no_hits", hits)
        report.figure("PREFIX_NOHIT_P1", median(hits["batch"]), ">=0.97",
                      "ratio (P1's batch on random prompts: throughput with the cache ÷ without)")
        report.figure("PREFIX_NOHIT_P3", median(hits["sequential"]), ">=0.97",
                      "ratio (P3's sequential side on random prompts: throughput with the cache ÷ without)")
        report.save()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for server in servers.values():
            server.stop()
    copy = copy_against_prefill(args.model)
    report.figure("PREFIX_COPY", copy["ratio"], None, "ratio (copying 992 tokens of KV ÷ computing them)", **copy)
    report.save()

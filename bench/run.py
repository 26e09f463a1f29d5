"""reft-serve benchmarks: run the real server as a subprocess and drive it over HTTP.

    .venv/bin/python bench/run.py [--quick] [--out bench/results/latest.json] [--only throughput,p2,cold,structured]

Every figure is printed as one line `NAME value target PASS/FAIL` (INFO for figures without a
target) and written, with the raw samples, the machine and the library versions, to the JSON
file. Ratios are measured side by side: the two sides of each ratio run back to back in a
block symmetric in time (ABBA or A-B-A), and a figure is the median of its blocks' ratios,
because the machine may be shared. The server and the baselines (raw transformers generate, peft, in a
worker process) never compute at the same time. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would garble the figure lines

import httpx  # noqa: E402
import prefix  # noqa: E402
from common import (  # noqa: E402
    BaselineWorker,
    Load,
    ServerProcess,
    base_config,
    base_shape,
    machine_info,
    median,
    random_loreft,
    random_prompts,
    rounded,
    versions,
    write_adapters,
)

from server import adapter_file  # noqa: E402

SECTIONS = ("throughput", "p2", "long", "hol", "echo", "cold", "registry", "structured", "prefix")
P2_SHORT_GROUPS = 3  # ABBA groups at the 32-token prompt per repetition (one at 1024)


class Report:
    """Collects figures, prints each as it is measured, and rewrites the JSON file after every section."""

    def __init__(self, out: Path, meta: dict) -> None:
        self.out = out
        self.data = dict(meta, figures={}, samples={}, notes=[])
        self.t0 = time.perf_counter()

    def figure(self, name: str, value: float, target: str | None = None, unit: str = "", **detail: object) -> None:
        passed = None
        if target is not None and value == value:  # NaN never passes
            op, bound = (target[:2], float(target[2:])) if target[:2] in (">=", "<=") else (None, None)
            passed = value >= bound if op == ">=" else value <= bound if op == "<=" else None
        verdict = "INFO" if target is None else ("PASS" if passed else "FAIL")
        print(f"{name} {rounded(value)} {target or '-'} {verdict}", flush=True)
        self.data["figures"][name] = {"value": value, "target": target, "pass": passed, "unit": unit, **detail}

    def samples(self, key: str, value: object) -> None:
        self.data["samples"][key] = value

    def note(self, text: str) -> None:
        print(f"# {text}", flush=True)
        self.data["notes"].append(text)

    def save(self) -> None:
        self.data["duration_s"] = round(time.perf_counter() - self.t0, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.out)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- throughput: P1, P3, P4, P6 ----------------------------------------------------------------------


# Each ratio is measured in blocks whose sides run back to back, so that the slow drifts of a shared
# machine (seen here: the same run moving by 15% from one minute to the next) hit both sides alike.
# Numerator and denominator of each block, and its order: ABBA where both sides are short, A-B-A else.
BLOCKS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "P1": ("adapters", "base", ("adapters", "base", "base", "adapters")),
    "P4": ("base", "raw", ("base", "raw", "raw", "base")),
    "P6": ("adapters", "peft", ("adapters", "peft", "adapters")),
    "P3": ("adapters", "sequential", ("adapters", "sequential", "adapters")),
}
TARGETS = {"P1": ">=0.99", "P3": ">=7", "P4": ">=0.9", "P6": ">=2.5"}


def throughput(args: argparse.Namespace, report: Report, load: Load, adapters: list[str],
               worker: BaselineWorker | None) -> None:
    n, plen, new = args.batch, args.prompt_len, args.new_tokens
    prompts = random_prompts(n, plen, seed=1)
    seq_n = min(args.seq_requests, n)

    def run(step: str) -> dict:
        if step == "adapters":
            return load.concurrent(adapters[:n], prompts, new)
        if step == "base":
            return load.concurrent(["base"] * n, prompts, new)
        if step == "sequential":  # the same mixed-adapter requests, one at a time (the first seq_n of them)
            return load.sequential(adapters[:seq_n], prompts[:seq_n], new)
        assert worker is not None
        reply = worker.ask({"cmd": step, "prompts": prompts, "max_new_tokens": new})
        return {"seconds": reply["seconds"], "tokens": reply["tokens"], "tok_s": reply["tokens"] / reply["seconds"]}

    log("throughput warm-up: the measured workload once, not counted (first runs at a new shape are slower)")
    run("base")
    run("adapters")
    figures = [f for f in BLOCKS if worker or f in ("P1", "P3")]
    samples: dict[str, list[dict]] = {}
    block_ratios: dict[str, list[float]] = {f: [] for f in figures}
    for rnd in range(args.rounds):
        for figure in figures[rnd % len(figures):] + figures[: rnd % len(figures)]:
            top, bottom, order = BLOCKS[figure]  # each order is symmetric in time: a linear drift cancels
            sides: dict[str, list[float]] = {top: [], bottom: []}
            for step in order:
                log(f"round {rnd + 1}/{args.rounds} {figure}: {step}")
                r = run(step)
                log(f"  {step}: {r['tokens']} tokens in {r['seconds']:.2f}s = {r['tok_s']:.2f} tok/s")
                samples.setdefault(step, []).append(dict(r, round=rnd + 1, block=figure))
                sides[step].append(r["tok_s"])
            ratio = statistics.fmean(sides[top]) / statistics.fmean(sides[bottom])
            block_ratios[figure].append(ratio)
            log(f"  {figure} block ratio {ratio:.4f}")
            report.samples("throughput", samples)
            report.samples("block_ratios", block_ratios)
            report.save()

    tok_s = {s: median([r["tok_s"] for r in rs]) for s, rs in samples.items()}
    report.data["throughput_tok_s"] = {"median": tok_s}
    for figure in figures:
        top, bottom, _ = BLOCKS[figure]
        report.figure(figure, median(block_ratios[figure]), TARGETS[figure], "ratio (median of block ratios)",
                      blocks=[round(r, 4) for r in block_ratios[figure]],
                      **{f"{top}_tok_s": tok_s[top], f"{bottom}_tok_s": tok_s[bottom]},
                      **({"sequential_requests": seq_n} if figure == "P3" else {}))
    if worker:
        report.figure("P6_PEFT_VS_RAW", tok_s["peft"] / tok_s["raw"], None, "ratio")
    for step, value in tok_s.items():
        report.figure(f"TOK_S_{step.upper()}", value, None, "tok/s")


# ---- P2: intervention overhead independent of prompt length --------------------------------------------


def p2(args: argparse.Namespace, report: Report, load: Load, adapter: str) -> None:
    lengths = (32, 1024)
    prompts = {length: random_prompts(1, length, seed=100 + length)[0] for length in lengths}
    samples: dict[int, dict[str, list[float]]] = {n: {"base": [], "adapter": [], "ratio": []} for n in lengths}
    for length in lengths:  # warm each shape once
        load.complete("base", prompts[length], 2)
    # Short requests are cheap and noisier relative to their length: measure them more often.
    groups = {32: P2_SHORT_GROUPS, 1024: 1}
    for rep in range(args.p2_reps):
        for length in lengths:
            for g in range(groups[length]):
                # ABBA (or BAAB): a linear drift of the machine's speed cancels out.
                order = ("base", "adapter", "adapter", "base") if (rep + g) % 2 == 0 else \
                    ("adapter", "base", "base", "adapter")
                lat: dict[str, float] = {"base": 0.0, "adapter": 0.0}
                for side in order:
                    model = "base" if side == "base" else adapter
                    seconds = load.complete(model, prompts[length], args.new_tokens).latency
                    samples[length][side].append(seconds)
                    lat[side] += seconds
                samples[length]["ratio"].append(lat["adapter"] / lat["base"])
                log(f"P2 rep {rep + 1}/{args.p2_reps} len {length}: base {lat['base'] / 2:.3f}s "
                    f"adapter {lat['adapter'] / 2:.3f}s")
        report.samples("p2", samples)
        report.save()
    r = {length: median(samples[length]["ratio"]) for length in lengths}
    # The noise floor: in each block the two requests of one side are the same request, yet differ. When the
    # block ratios swing as widely as these same-side pairs do, a swing is the machine, not the adapter.
    def pair_ratios(runs: list[float]) -> list[float]:  # a block's two runs of one side, in order
        return [a / b for a, b in zip(runs[::2], runs[1::2], strict=True)]

    same_side = {str(n): statistics.pstdev(pair_ratios(samples[n]["base"]) + pair_ratios(samples[n]["adapter"]))
                 for n in lengths}
    spread = {str(n): statistics.pstdev(samples[n]["ratio"]) for n in lengths}
    report.figure("P2", abs(r[1024] - r[32]) / r[32], "<=0.02", "relative", r32=r[32], r1024=r[1024],
                  same_side_pair_stdev=same_side, block_ratio_stdev=spread,
                  base_latency_s={str(k): median(v["base"]) for k, v in samples.items()},
                  adapter_latency_s={str(k): median(v["adapter"]) for k, v in samples.items()})


# ---- long and mixed prompts: P8, P9, P10 -----------------------------------------------------------------


def decode_step_after_all_started(streams: list[list[float]]) -> float:
    """Median gap between a stream's tokens, counting only steps where every stream was already decoding."""
    everyone = max(t[0] for t in streams)
    return median([b - a for t in streams for a, b in zip(t, t[1:], strict=False) if a >= everyone])


def long_context(args: argparse.Namespace, report: Report, load: Load, worker: BaselineWorker) -> None:
    """P8: decode step time with 16 rows of 1,024-token prompts, raw generate's ÷ the server's."""
    prompts = random_prompts(16, 1024, seed=11)
    new = 33

    def server_step() -> float:
        futures = [load.pool.submit(load.token_times, p, new) for p in prompts]
        return decode_step_after_all_started([f.result() for f in futures])

    def raw_step() -> float:
        times = worker.ask({"cmd": "raw_steps", "prompts": prompts, "max_new_tokens": new})["times"]
        return median([b - a for a, b in zip(times, times[1:], strict=False)])

    log("P8 warm-up: both sides once at this shape, not counted")
    server_step()
    raw_step()
    ratios, sides = [], {"server": [], "raw": []}
    for rnd in range(args.long_rounds):
        block = []
        for side in ("server", "raw", "server"):  # A-B-A: a linear drift cancels
            seconds = server_step() if side == "server" else raw_step()
            sides[side].append(seconds)
            block.append(seconds)
            log(f"P8 round {rnd + 1}/{args.long_rounds} {side}: {1000 * seconds:.0f} ms per decode step")
        ratios.append(block[1] / statistics.fmean([block[0], block[2]]))
        report.samples("p8", {"block_ratios": ratios, "step_s": sides})
        report.save()
    report.figure("P8", median(ratios), ">=1.0", "ratio (raw generate step ÷ server step, 16 x 1024 tokens)",
                  blocks=[round(r, 4) for r in ratios], server_step_ms=1000 * median(sides["server"]),
                  raw_step_ms=1000 * median(sides["raw"]))


def metric_sum(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


def padding(report: Report, load: Load, url: str) -> None:
    """P10: positions computed in prefills ÷ real prompt tokens, one 2,000-token prompt with fifteen of 100."""
    prompts = random_prompts(1, 2000, seed=12) + random_prompts(15, 100, seed=13)
    positions, tokens = metric_sum(url, "reft_prefill_positions_total"), metric_sum(url, "reft_prompt_tokens_total")
    load.concurrent(["base"] * len(prompts), prompts, 1)
    positions = metric_sum(url, "reft_prefill_positions_total") - positions
    tokens = metric_sum(url, "reft_prompt_tokens_total") - tokens
    report.figure("P10", positions / tokens, "<=1.15", "ratio (prefill positions ÷ prompt tokens)",
                  positions=positions, prompt_tokens=tokens, left_padding_would_compute=len(prompts) * 2000)


def head_of_line(args: argparse.Namespace, report: Report, load: Load) -> None:
    """P9: 16 streams decode; a 4,096-token prompt arrives. Longest gap between two tokens of any stream
    while it is prefilled ÷ its own time to first token."""
    short, long = random_prompts(16, 64, seed=21), random_prompts(1, 4096, seed=22)[0]
    ratios, rows = [], []
    for rnd in range(args.hol_rounds + 1):  # round 0 warms the shapes and is not counted
        stop = threading.Event()
        streams: list[list[float]] = [[] for _ in short]
        futures = [load.pool.submit(load.token_times, p, 400, stop, t) for p, t in zip(short, streams, strict=True)]
        deadline = time.monotonic() + 300
        while min(len(t) for t in streams) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        sent = time.perf_counter()
        first = load.token_times(long, 1)[0]
        stop.set()
        for f in futures:
            f.result()
        gaps = [b - a for t in streams for a, b in zip(t, t[1:], strict=False) if b > sent and a < first]
        ttft = first - sent
        worst = max(gaps) if gaps else float("nan")
        log(f"P9 round {rnd}/{args.hol_rounds}: ttft {ttft:.2f}s, longest stream gap {worst:.2f}s")
        if rnd:
            ratios.append(worst / ttft)
            rows.append({"ttft_s": ttft, "max_gap_s": worst, "steps_seen": len(gaps) // len(short)})
        report.samples("p9", rows)
        report.save()
    report.figure("P9", median(ratios), "<=0.25", "ratio (longest stream gap ÷ long prompt's TTFT)",
                  ttft_s=median([r["ttft_s"] for r in rows]), max_gap_s=median([r["max_gap_s"] for r in rows]))


def prompt_logprobs_cost(args: argparse.Namespace, report: Report, load: Load, server: ServerProcess) -> None:
    """What echo's prompt logprobs cost at 1,024 tokens: the LM head over every prompt position.

    The same prompt as a scoring request (echo, logprobs 1, max_tokens 0) and as a plain one-token request
    (the head at the last position only), in ABBA blocks; and the server's peak RSS before and after the
    scoring requests (VmHWM), against the analytic size of the logits [1024, V] and their log-softmax.
    """
    prompt = random_prompts(1, 1024, seed=31)[0]
    score = {"model": "base", "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 0}

    def plain() -> float:
        return load.complete("base", prompt, 1).latency

    def scoring() -> float:
        t0 = time.perf_counter()
        r = load.client.post("/v1/completions", json=score)
        if r.status_code != 200 or len(r.json()["choices"][0]["logprobs"]["tokens"]) != len(prompt):
            raise RuntimeError(f"scoring request failed: {r.status_code} {r.text[:300]}")
        return time.perf_counter() - t0

    plain()
    peak_before = server.peak_rss()
    scoring()
    peak_after = server.peak_rss()
    ratios, sides = [], {"plain": [], "echo": []}
    for _ in range(args.p2_reps):
        block = [plain(), scoring(), scoring(), plain()]
        sides["plain"] += [block[0], block[3]]
        sides["echo"] += [block[1], block[2]]
        ratios.append((block[1] + block[2]) / (block[0] + block[3]))
    vocab = base_config(args.model).vocab_size
    report.figure("ECHO_1024_TIME", median(ratios), None, "ratio (echo + logprobs, max_tokens 0 ÷ 1-token request)",
                  blocks=[round(r, 3) for r in ratios], plain_ms=1000 * median(sides["plain"]),
                  echo_ms=1000 * median(sides["echo"]))
    report.figure("ECHO_1024_PEAK_MIB", (peak_after - peak_before) / 2**20, None, "MiB (server peak RSS growth)",
                  logits_mib=1024 * vocab * 4 / 2**20, logits_and_log_softmax_mib=2 * 1024 * vocab * 4 / 2**20)


# ---- structured outputs ---------------------------------------------------------------------------------------


def step_schema(i: int) -> dict:
    """Schema i of the step figure: a different grammar each, and at least 80 tokens (40 items and their commas)
    before it may end, so that every constrained row decodes through the measured window."""
    items = [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}, {"enum": ["red", "green", "blue"]},
             {"type": "number"}][i % 4]
    return {"type": "object", "properties": {f"k{i}": {"type": "array", "items": items, "minItems": 40}},
            "required": [f"k{i}"]}


def new_schema(rep: int) -> dict:
    """A schema as clients send them (nested, $defs, enums, bounds), never seen before: its keys carry `rep`."""
    return {"$defs": {"Line": {"type": "object", "properties": {
                "sku": {"type": "string", "maxLength": 12}, "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                "kind": {"enum": ["part", "service", f"other{rep}"]}}, "required": ["sku", "qty", "kind"]}},
            "type": "object", "properties": {
                f"order_{rep}": {"type": "string", "pattern": "^ORD-[0-9]{4}$"},
                "customer": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                                              "email": {"type": "string", "format": "email"}},
                             "required": ["name"]},
                "lines": {"type": "array", "items": {"$ref": "#/$defs/Line"}, "minItems": 1, "maxItems": 5},
                "total": {"type": "number", "minimum": 0}},
            "required": [f"order_{rep}", "customer", "lines"]}


def structured(args: argparse.Namespace, report: Report, load: Load, url: str) -> None:
    """A decode step at 32 rows, half constrained by 8 schemas ÷ all free, in ABBA blocks; then a new schema's
    compile time (the server's own count) and time to first token, against the same schema again and no schema."""
    n, new = args.batch, 40
    prompts = random_prompts(n, 16, seed=41)

    def step(constrained: bool) -> float:
        futures = []
        for i, prompt in enumerate(prompts):
            extra = ({"structured_outputs": {"json": step_schema(i // 2 % 8)}, "ignore_eos": False}
                     if constrained and i % 2 else None)
            futures.append(load.pool.submit(load.token_times, prompt, new, extra=extra))
        return decode_step_after_all_started([f.result() for f in futures])

    log("structured warm-up: both sides once (the 8 schemas compile here), not counted")
    step(True)
    step(False)
    ratios, sides = [], {"free": [], "mixed": []}
    for rnd in range(args.p2_reps):
        block = [step(False), step(True), step(True), step(False)]
        sides["free"] += [block[0], block[3]]
        sides["mixed"] += [block[1], block[2]]
        ratios.append((block[1] + block[2]) / (block[0] + block[3]))
        log(f"structured step round {rnd + 1}/{args.p2_reps}: ratio {ratios[-1]:.3f}")
    report.samples("structured_step", {"block_ratios": ratios, "step_s": sides})
    report.figure("STRUCTURED_STEP", median(ratios), "<=1.15",
                  "ratio (32-row decode step, 16 rows constrained by 8 schemas ÷ all free)",
                  blocks=[round(r, 4) for r in ratios], free_step_ms=1000 * median(sides["free"]),
                  mixed_step_ms=1000 * median(sides["mixed"]))

    def ttft(schema: dict | None) -> float:
        body = {"prompt": prompts[0], "max_new_tokens": 2, "temperature": 0, "stream": True}
        if schema is not None:
            body["structured_outputs"] = {"json": schema}
        t0 = time.perf_counter()
        with load.client.stream("POST", "/generate", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and not line.endswith("[DONE]"):
                    event = json.loads(line[5:])
                    if "error" in event or r.status_code != 200:
                        raise RuntimeError(f"POST /generate -> {r.status_code}: {event}")
                    if event["token_ids"]:
                        return time.perf_counter() - t0
        raise RuntimeError("the stream ended without a token")

    rows = []
    for rep in range(args.p2_reps):
        schema = new_schema(rep)
        compiles, seconds = metric_sum(url, "reft_grammar_compiles_total"), metric_sum(
            url, "reft_grammar_compile_seconds_total")
        first = ttft(schema)
        compiles_first = metric_sum(url, "reft_grammar_compiles_total") - compiles
        compile_s = metric_sum(url, "reft_grammar_compile_seconds_total") - seconds
        again = ttft(schema)
        compiles_again = metric_sum(url, "reft_grammar_compiles_total") - compiles - compiles_first
        free = ttft(None)
        rows.append({"first_ttft_s": first, "again_ttft_s": again, "free_ttft_s": free, "compile_s": compile_s,
                     "compiles_first": compiles_first, "compiles_again": compiles_again})
    report.samples("structured_first", rows)
    report.figure("STRUCTURED_COMPILE_MS", 1000 * median([r["compile_s"] for r in rows]), None,
                  "ms (a new schema's compile, the server's count)")
    report.figure("STRUCTURED_FIRST_TTFT_MS", 1000 * median([r["first_ttft_s"] for r in rows]), None,
                  "ms (time to first token, new schema)", again_ms=1000 * median([r["again_ttft_s"] for r in rows]),
                  free_ms=1000 * median([r["free_ttft_s"] for r in rows]))
    report.figure("STRUCTURED_REPEAT_COMPILES", sum(r["compiles_again"] for r in rows), "<=0",
                  "compiles (the same schema again)", first=sum(r["compiles_first"] for r in rows))


# ---- cold adapters ------------------------------------------------------------------------------------------


def cold_latency(load: Load, names: list[str], prompt: list[int], warm_name: str) -> dict:
    """First request to each never-used adapter minus warm requests (max_tokens=1).

    The warm reference is the mean of a request to an already-warm adapter just before the cold
    one and a second request to the same adapter just after it, so slow drifts of a shared
    machine cancel out.
    """
    rows = []
    for name in names:
        before = load.complete(warm_name, prompt, 1).latency
        cold = load.complete(name, prompt, 1).latency
        after = load.complete(name, prompt, 1).latency
        warm = (before + after) / 2
        rows.append({"adapter": name, "cold_ms": cold * 1e3, "warm_ms": warm * 1e3, "diff_ms": (cold - warm) * 1e3})
    return {"median_diff_ms": median([r["diff_ms"] for r in rows]), "rows": rows}


def cold(args: argparse.Namespace, report: Report, load: Load, server: ServerProcess, cold_files: list[str],
         warm_name: str, shape) -> None:
    prompt = random_prompts(1, args.cold_prompt_len, seed=7)[0]
    for _ in range(2):
        load.complete(warm_name, prompt, 1)  # warm the shape
    # Files present in the registry at start-up (parsed by the start-up scan) and never requested.
    files = cold_latency(load, cold_files, prompt, warm_name)
    report.samples("cold_file", files)
    report.figure("COLD_FILE_MS", files["median_diff_ms"], "<=5", "ms", prompt_len=len(prompt))
    # Fresh uploads: the upload itself is not timed, only the first request after it.
    names = [f"up-{i:02d}" for i in range(len(cold_files))]
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for i, name in enumerate(names):
            data = adapter_file.to_bytes(random_loreft(shape, 5000 + i))
            r = client.post("/v1/adapters", data={"name": name},
                            files={"file": (f"{name}.safetensors", data, "application/octet-stream")})
            if r.status_code != 201:
                raise RuntimeError(f"upload {name} -> {r.status_code}: {r.text[:300]}")
    uploads = cold_latency(load, names, prompt, warm_name)
    report.samples("cold_upload", uploads)
    report.figure("COLD_UPLOAD_MS", uploads["median_diff_ms"], "<=5", "ms", prompt_len=len(prompt))
    report.save()


def cold_work(report: Report, directory: Path, names: list[str], shape) -> None:
    """The cold path's own work, timed in this process without HTTP or a model: what the server does
    on first use of an adapter it has not parsed since start-up (registry.resolve in a thread of its
    own, as the API does, then the engine's device-cache load)."""
    import torch

    from server.engine.adapter_cache import DeviceAdapterCache
    from server.registry import Registry
    from server.torch_threads import run_in_own_thread

    registry = Registry(directory, shape, max_rank=64, max_adapter_bytes=64 * 1024 * 1024)
    registry.open()
    scans = []
    for _ in range(3):  # the periodic scan (every REFT_SCAN_INTERVAL s) with nothing changed
        t0 = time.perf_counter()
        registry.scan()
        scans.append(time.perf_counter() - t0)
    report.figure("REG_SCAN_MS", median(scans) * 1e3, None, f"ms (one periodic scan of {len(registry)} files)")
    cache = DeviceAdapterCache(torch.device("cpu"), torch.float32, 256 * 1024 * 1024, set())
    rows = []
    for name in names:
        t0 = time.perf_counter()
        ref = run_in_own_thread(registry.resolve, name)
        t1 = time.perf_counter()
        cache.get(ref)
        t2 = time.perf_counter()
        registry.cached(name)
        t3 = time.perf_counter()
        rows.append({"adapter": name, "resolve_ms": (t1 - t0) * 1e3, "device_ms": (t2 - t1) * 1e3,
                     "warm_resolve_ms": (t3 - t2) * 1e3})
    report.samples("cold_work", rows)
    total = median([r["resolve_ms"] + r["device_ms"] for r in rows])
    report.figure("COLD_WORK_MS", total, "<=5", "ms (in-process: parse+validate+device load)",
                  resolve_ms=median([r["resolve_ms"] for r in rows]), device_ms=median([r["device_ms"] for r in rows]),
                  max_ms=max(r["resolve_ms"] + r["device_ms"] for r in rows))


# ---- registry scale -----------------------------------------------------------------------------------------


def registry_scale(args: argparse.Namespace, report: Report, tmp: Path, shape) -> None:
    directory = tmp / "registry-scale"
    directory.mkdir()
    data = adapter_file.to_bytes(random_loreft(shape, 9000, layers=(10,)))
    t0 = time.perf_counter()
    for i in range(args.registry_size):
        (directory / f"r{i:05d}.safetensors").write_bytes(data)
    report.figure("REG_WRITE_FILES_S", time.perf_counter() - t0, None, "s", files=args.registry_size,
                  file_bytes=len(data))
    server = ServerProcess(directory, tmp / "server-registry.log", args.model, args.env)
    try:
        log(f"registry scale: first start on {args.registry_size} adapters")
        report.figure("REG_START_COLD_S", server.start(), None, "s", adapters=args.registry_size)
        with httpx.Client(base_url=server.url, timeout=600) as client:
            pages, names, after = [], [], None
            t0 = time.perf_counter()
            while True:
                t1 = time.perf_counter()
                r = client.get("/v1/adapters", params={"limit": 100, **({"after": after} if after else {})})
                pages.append(time.perf_counter() - t1)
                r.raise_for_status()
                body = r.json()
                names += [d["name"] for d in body["data"]]
                if not body.get("has_more"):
                    break
                after = body["next_after"]
            total = time.perf_counter() - t0
            if len(names) != args.registry_size:
                report.note(f"paging returned {len(names)} adapters, expected {args.registry_size}")
            report.figure("REG_PAGE_ALL_S", total, None, "s", pages=len(pages), adapters_listed=len(names))
            report.figure("REG_PAGE_MS", median(pages) * 1e3, None, "ms (median per page of 100)",
                          max_ms=max(pages) * 1e3)
            lookups = []
            for i in range(0, args.registry_size, max(1, args.registry_size // 50)):
                t1 = time.perf_counter()
                client.get(f"/v1/adapters/r{i:05d}").raise_for_status()
                lookups.append(time.perf_counter() - t1)
            report.figure("REG_LOOKUP_MS", median(lookups) * 1e3, None, "ms (median)", n=len(lookups))
            t1 = time.perf_counter()
            client.get("/v1/models").raise_for_status()
            report.figure("REG_MODELS_LIST_MS", (time.perf_counter() - t1) * 1e3, None, "ms (GET /v1/models, all)")
            # Writes append one line to the registry journal: time uploads and deletes at this size.
            upload = adapter_file.to_bytes(random_loreft(shape, 9001, layers=(10,)))
            ups, dels = [], []
            for i in range(3):
                t1 = time.perf_counter()
                r = client.post("/v1/adapters", data={"name": f"zz-upload-{i}"},
                                files={"file": ("x.safetensors", upload, "application/octet-stream")})
                ups.append(time.perf_counter() - t1)
                if r.status_code != 201:
                    raise RuntimeError(f"upload -> {r.status_code}: {r.text[:300]}")
                t1 = time.perf_counter()
                client.delete(f"/v1/adapters/zz-upload-{i}").raise_for_status()
                dels.append(time.perf_counter() - t1)
            report.figure("REG_UPLOAD_MS", median(ups) * 1e3, None, "ms (POST /v1/adapters, median of 3)")
            report.figure("REG_DELETE_MS", median(dels) * 1e3, None, "ms (DELETE, median of 3)")
        server.stop()
        log("registry scale: second start (index warm)")
        report.figure("REG_START_WARM_S", server.start(), None, "s", adapters=args.registry_size)
        # Never requested, never parsed since this start: the file is read, parsed and validated on first use.
        step = max(1, args.registry_size // (2 * args.cold_n + 1))
        never_used = [f"r{i:05d}" for i in range(step // 2 + 1, args.registry_size, step)]
        load = Load(server.url, concurrency=4)
        try:
            prompt = random_prompts(1, args.cold_prompt_len, seed=7)[0]
            for _ in range(2):
                load.complete("r00000", prompt, 1)
            disk = cold_latency(load, never_used[: args.cold_n], prompt, "r00000")
        finally:
            load.close()
        report.samples("cold_disk", disk)
        report.figure("COLD_DISK_MS", disk["median_diff_ms"], "<=5", "ms", prompt_len=len(prompt))
        server.stop()
        cold_work(report, directory, never_used[args.cold_n : 2 * args.cold_n], shape)
    finally:
        server.stop()
        report.save()


# ---- main ---------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one round, fewer repetitions (same figures, noisier)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "latest.json")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--model", default=None, help="base model for server and baselines (default: embedded SmolLM2)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds of the throughput figures")
    p.add_argument("--seq-requests", type=int, default=None, help="requests in P3's sequential side")
    p.add_argument("--p2-reps", type=int, default=None)
    p.add_argument("--long-rounds", type=int, default=None, help="A-B-A blocks of P8")
    p.add_argument("--hol-rounds", type=int, default=None, help="measured rounds of P9")
    p.add_argument("--cold-n", type=int, default=None, help="adapters per cold-latency figure")
    p.add_argument("--cold-prompt-len", type=int, default=8,
                   help="prompt tokens of the cold-adapter requests (short: the cold cost does not depend on it)")
    p.add_argument("--registry-size", type=int, default=10_000)
    p.add_argument("--no-baselines", action="store_true", help="skip raw generate and peft (P4, P6)")
    p.add_argument("--server-env", action="append", default=[], metavar="REFT_X=V",
                   help="extra server setting (the caller's REFT_* variables are otherwise ignored)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary registries and server logs")
    args = p.parse_args()
    args.batch, args.adapters, args.prompt_len, args.new_tokens = 32, 32, 64, 32
    defaults = {"rounds": (1, 5), "seq_requests": (4, 32), "p2_reps": (3, 6), "cold_n": (5, 30), "long_rounds": (1, 3),
                "hol_rounds": (1, 3)}
    for key, (quick, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    args.env = dict(kv.split("=", 1) for kv in args.server_env)
    return args


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: stop the server and the worker, remove tmp


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    args = parse_args()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report = Report(args.out, {
        "date": started, "machine": machine_info(), "versions": versions(), "quick": args.quick,
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
    })
    log(f"reft-serve bench ({'quick' if args.quick else 'full'}): sections {args.sections}; results -> {args.out}")
    shape = base_shape(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="reft-bench-"))
    adapters = [f"a{i:02d}" for i in range(args.adapters)]
    cold_files = [f"cold-{i:02d}" for i in range(args.cold_n)]
    server = worker = load = None
    try:
        if {"throughput", "p2", "long", "hol", "echo", "cold", "structured"} & set(args.sections):
            registry = tmp / "registry"
            write_adapters(registry, shape, adapters, seed0=0)
            write_adapters(registry, shape, cold_files, seed0=1000)
            # These sections measure the engine's compute, repeating prompts between the sides of a ratio: with
            # the prefix cache on, repeats would be served from it. The `prefix` section measures the cache.
            server = ServerProcess(registry, tmp / "server.log", args.model, {"REFT_PREFIX_CACHE": "false", **args.env})
            start_s = server.start()
            report.figure("START_S", start_s, None, "s", adapters=len(adapters) + len(cold_files))
            load = Load(server.url, concurrency=max(64, args.batch))
            # Warm-up: every bench adapter resident, the batched paths exercised (short prompts: cheap).
            short = random_prompts(args.batch, 16, seed=3)
            with_adapters = load.concurrent(adapters, short, 4)
            texts_a = [load.complete(a, p, 4).text for a, p in zip(adapters[:8], short, strict=False)]
            texts_b = [load.complete("base", p, 4).text for p in short[:8]]
            changed = sum(a != b for a, b in zip(texts_a, texts_b, strict=True))
            report.data["sanity"] = {"adapters_change_output": f"{changed}/{len(texts_a)}",
                                     "warmup_s": with_adapters["seconds"]}
            report.note(f"sanity: adapters changed the greedy output of {changed}/{len(texts_a)} prompts")
            load.concurrent(["base"] * args.batch, short, 4)
        if {"throughput", "long"} & set(args.sections) and not args.no_baselines:
            log("loading raw and peft baselines in a worker process (server idle)")
            worker = BaselineWorker(tmp / "baselines.log")
            info = worker.ask({"cmd": "load", "model": args.model, "lora_adapters": args.adapters,
                               "lora_rank": 8, "seed": 0})
            report.data["baselines"] = info
            warm = random_prompts(2, 16, seed=4)
            worker.ask({"cmd": "raw", "prompts": warm, "max_new_tokens": 2})
            worker.ask({"cmd": "peft", "prompts": warm, "max_new_tokens": 2})
        if "throughput" in args.sections:
            throughput(args, report, load, adapters, worker)
        if "long" in args.sections:
            padding(report, load, server.url)
            if worker:
                long_context(args, report, load, worker)
        if worker:
            worker.close()
            worker = None
        if "hol" in args.sections:
            head_of_line(args, report, load)
        if "p2" in args.sections:
            p2(args, report, load, adapters[0])
        if "echo" in args.sections:
            prompt_logprobs_cost(args, report, load, server)
        if "cold" in args.sections:
            cold(args, report, load, server, cold_files, adapters[0], shape)
        if "structured" in args.sections:
            structured(args, report, load, server.url)
        if load:
            load.close()
            load = None
        if server:
            server.stop()
            server = None
        if "registry" in args.sections:
            registry_scale(args, report, tmp, shape)
        if "prefix" in args.sections:
            prefix.run(args, report, tmp, shape)
    finally:
        if load:
            load.close()
        if worker:
            worker.close()
        if server:
            server.stop()
        report.data["machine"]["load_avg_end"] = machine_info()["load_avg"]
        report.save()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"done in {report.data['duration_s']:.0f}s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Device figures: float32 against bfloat16, and eager against `--compile` where the server has it, in one run.

    .venv/bin/python bench/device.py [--device cpu|cuda] [--model DIR] [--quick] [--out bench/results/device.json]

Per server configuration (dtype, eager or compiled): decode tok/s at each batch size (the steady-state step
from streamed token arrival times), the time to first token of a lone request, and the step against the
weight-read bound (weight bytes ÷ the memory bandwidth this script measures on the device). Then greedy
agreement of bfloat16 with float32 on the pyreft fixture's prompts (emoji adapter) and on random LoReFT
adapters, and |Δ logprob| of float32's greedy tokens scored under both dtypes (echo, max_tokens 0); compiled
against eager text, next to eager's own text batched against one request at a time (the floor in bf16).

Every configuration's server stays up for the whole run, idle while another is measured; each round visits
them in A B C D D C B A order, so a steady drift of the machine's speed cancels in every ratio, and a ratio
is the median of its rounds'. Figures are printed as `NAME value target PASS/FAIL|INFO` (bench/run.py's
format) and written with their samples to the JSON file. See bench/README.md for the figures and targets.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would garble the figure lines

import torch  # noqa: E402
from common import (  # noqa: E402
    REPO,
    VENV_BIN,
    Load,
    ServerProcess,
    base_config,
    base_shape,
    machine_info,
    median,
    random_loreft,
    random_prompts,
    versions,
)
from run import Report, log  # noqa: E402

from server import adapter_file  # noqa: E402

FIXTURE = REPO / "tests" / "data" / "pyreft-emoji"
LABELS = {"float32": "FP32", "bfloat16": "BF16", "float16": "FP16"}
AGREEMENT_TOKENS = 32


@dataclass(frozen=True)
class Config:
    dtype: str
    compile: bool

    @property
    def label(self) -> str:
        return f"{LABELS[self.dtype]}_{'COMPILE' if self.compile else 'EAGER'}"


class DeviceServer(ServerProcess):
    """The bench server with its device, dtype and compile choice on the command line."""

    def __init__(self, config: Config, device: str, adapters: Path, log_path: Path, model: str | None,
                 env: dict[str, str]) -> None:
        super().__init__(adapters, log_path, model, env)
        self.extra = ["--device", device, "--dtype", config.dtype] + (["--compile"] if config.compile else [])

    def command(self) -> list[str]:
        return super().command() + self.extra

    def load_seconds(self) -> float:
        """The model load time the server logged ("loaded ... in X s"), NaN if it did not."""
        found = re.findall(r"loaded \S+ on \S+ as \S+ in ([0-9.]+) s", self.log_path.read_text(errors="replace"))
        return float(found[-1]) if found else float("nan")


def cuda_graph_skips(report: Report, servers: dict[Config, DeviceServer]) -> None:
    """A compiled server whose CUDA graphs torch skipped decodes launch by launch: say so, from its log."""
    for config, server in servers.items():
        if config.compile:
            text = server.log_path.read_text(errors="replace")
            skips = len(re.findall(r"skipping cudagraph|CUDA graphs skipped", text, flags=re.IGNORECASE))
            report.figure(f"CUDA_GRAPH_SKIPS_{config.label}", skips, "<=0", "log lines saying CUDA graphs were skipped")


def server_has_compile() -> bool:
    """Whether this checkout's `reft-serve serve` takes --compile (read from its --help)."""
    exe = VENV_BIN / "reft-serve"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "server.cli"]
    done = subprocess.run([*cmd, "serve", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"})
    return re.search(r"--compile(?![\w-])", done.stdout) is not None


# ---- the device: bandwidth and weight bytes ----------------------------------------------------------------


def bandwidth(device: torch.device, gib: float, reps: int) -> dict[str, float]:
    """Best-of-`reps` GB/s of a sum over a large float32 tensor (bytes read) and of a copy (read + written).

    The larger of the two is the device's bandwidth here: the best rate this process was seen to move memory
    at, so the weight-read bound it gives is a strict one.
    """
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def best(fn: Callable[[], object], nbytes: int) -> float:
        fn()  # first touch and warm-up, not counted
        sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return nbytes / min(times) / 1e9

    read, copy = best(x.sum, x.nbytes), best(functools.partial(y.copy_, x), 2 * x.nbytes)
    del x, y
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the servers started next get the memory
    return {"gbs": max(read, copy), "read_gbs": read, "copy_gbs": copy, "tensor_gib": gib}


def weight_bytes(model: str | None, dtype: str) -> int:
    """Bytes of weights one decode step reads: every parameter once (a tied embedding once, as the LM head);
    an untied input embedding is only gathered a row per token, so it is left out."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(base_config(model))
    n = sum(p.numel() for p in meta.parameters())  # parameters() yields a tied weight once
    embedding, head = meta.get_input_embeddings().weight, meta.get_output_embeddings().weight
    if embedding is not head:
        n -= embedding.numel()
    return n * getattr(torch, dtype).itemsize


# ---- speed -----------------------------------------------------------------------------------------------


def decode_step(load: Load, prompts: list[list[int]], new_tokens: int) -> float:
    """Steady-state decode step of len(prompts) concurrent streams: per stream, the time between its first and
    last token once every stream is decoding ÷ the steps between them; the median over streams. A span, not
    the median gap, so tokens that reach the client together (a lagging client thread) do not skew it."""
    futures = [load.pool.submit(load.token_times, p, new_tokens) for p in prompts]
    streams = [f.result() for f in futures]
    everyone = max(t[0] for t in streams)
    steps = []
    for times in streams:
        kept = [t for t in times if t >= everyone]
        if len(kept) >= 2:
            steps.append((kept[-1] - kept[0]) / (len(kept) - 1))
    if not steps:
        raise RuntimeError(f"no stream decoded two tokens after all {len(prompts)} had started")
    return median(steps)


def time_to_first_token(load: Load, prompt: list[int]) -> float:
    t0 = time.perf_counter()
    return load.token_times(prompt, 1)[0] - t0


@dataclass
class Visits:
    """One configuration's measurements, visit by visit."""

    ttft: list[list[float]] = field(default_factory=list)  # per visit: the lone requests' TTFTs
    step: dict[int, list[float]] = field(default_factory=dict)  # batch -> per visit


def visit(load: Load, args: argparse.Namespace, into: Visits | None) -> None:
    """Measure TTFT and each batch's decode step once (`into` None: a warm-up, not kept)."""
    prompts = random_prompts(max(args.batches), args.prompt_len, seed=1)
    ttfts = [time_to_first_token(load, random_prompts(1, args.prompt_len, seed=2)[0]) for _ in range(args.ttft_n)]
    steps = {b: decode_step(load, prompts[:b], args.new_tokens) for b in args.batches}
    if into is not None:
        into.ttft.append(ttfts)
        for b, s in steps.items():
            into.step.setdefault(b, []).append(s)


def round_ratios(a: Visits, b: Visits, key: int | None, rounds: int) -> list[float]:
    """Per round, the mean of a's two visits ÷ b's (tok/s for a batch `key`, TTFT for None: higher is slower)."""
    def per_round(v: Visits, r: int) -> float:
        if key is None:
            return statistics.fmean(x for vis in v.ttft[2 * r : 2 * r + 2] for x in vis)
        return statistics.fmean(key / s for s in v.step[key][2 * r : 2 * r + 2])

    return [per_round(a, r) / per_round(b, r) for r in range(rounds)]


def speed(args: argparse.Namespace, report: Report, loads: dict[Config, Load], bound_s: dict[str, float]) -> None:
    configs = list(loads)
    for config in configs:
        log(f"warm-up {config.label}: the measured workload once, not counted")
        visit(loads[config], args, None)
    visits = {c: Visits() for c in configs}
    for rnd in range(args.rounds):
        for config in configs + configs[::-1]:  # A B C D D C B A: a steady drift cancels in every ratio
            log(f"round {rnd + 1}/{args.rounds}: {config.label}")
            visit(loads[config], args, visits[config])
            log(f"  ttft {1e3 * median(visits[config].ttft[-1]):.0f} ms; steps " + ", ".join(
                f"b{b} {1e3 * v[-1]:.1f} ms" for b, v in visits[config].step.items()))
        report.samples("speed", {c.label: {"ttft_s": v.ttft, "step_s": v.step} for c, v in visits.items()})
        report.save()
    for config, v in visits.items():
        report.figure(f"TTFT_MS_{config.label}", 1e3 * median([x for vis in v.ttft for x in vis]), None,
                      "ms (lone request, median)", prompt_len=args.prompt_len)
        for b, steps in v.step.items():
            step = median(steps)
            report.figure(f"DECODE_MS_B{b}_{config.label}", 1e3 * step, None, "ms per decode step (median)")
            report.figure(f"DECODE_TOK_S_B{b}_{config.label}", b / step, None, "generated tok/s")
            # The compiled batch-1 step on a GPU should be within 1.5x of reading the weights once.
            target = "<=1.5" if b == 1 and config.compile and args.device == "cuda" else None
            report.figure(f"DECODE_B{b}_VS_BOUND_{config.label}", step / bound_s[config.dtype], target,
                          "ratio (decode step ÷ weight-read bound)")
    by_key = {(c.dtype, c.compile): c for c in configs}
    for compiled in (False, True):
        fp32, bf16 = by_key.get(("float32", compiled)), by_key.get(("bfloat16", compiled))
        if fp32 and bf16:
            suffix = "_COMPILE" if compiled else ""
            for b in args.batches:
                r = round_ratios(visits[bf16], visits[fp32], b, args.rounds)
                report.figure(f"BF16_VS_FP32_TOK_S_B{b}{suffix}", median(r), None, "ratio (bf16 tok/s ÷ fp32)",
                              rounds=r)
            r = round_ratios(visits[bf16], visits[fp32], None, args.rounds)
            report.figure(f"BF16_VS_FP32_TTFT{suffix}", median(r), None, "ratio (bf16 TTFT ÷ fp32)", rounds=r)
    for dtype in args.dtypes:
        eager, compiled = by_key.get((dtype, False)), by_key.get((dtype, True))
        if eager and compiled:
            for b in args.batches:
                r = round_ratios(visits[compiled], visits[eager], b, args.rounds)
                report.figure(f"COMPILE_VS_EAGER_B{b}_{LABELS[dtype]}", median(r), ">=0.95",
                              "ratio (compiled tok/s ÷ eager)", rounds=r)


# ---- agreement -------------------------------------------------------------------------------------------


def workloads(args: argparse.Namespace, random_names: list[str]) -> dict[str, list[tuple[str, list[int], bool]]]:
    """(adapter, prompt ids, ignore_eos) per request: the fixture's prompts with the emoji adapter (stopping
    at EOS, as pyreft's completions did) and with every random adapter (always AGREEMENT_TOKENS tokens)."""
    prompts = [g["prompt_ids"] for g in json.loads((FIXTURE / "expected.json").read_text())["emoji"]["generations"]]
    out = {"random": [(name, p, True) for name in random_names for p in prompts]}
    if args.model is None:  # the emoji adapter fits the default model only
        out = {"emoji": [("emoji", p, False) for p in prompts], **out}
    return out


def greedy(load: Load, requests: list[tuple[str, list[int], bool]], alone: bool = False) -> list[list[int]]:
    """Greedy token ids of every request, sent concurrently (they share the server's batches) or one at a time."""
    def one(adapter: str, prompt: list[int], ignore_eos: bool) -> list[int]:
        body = {"adapter": adapter, "prompt": prompt, "max_new_tokens": AGREEMENT_TOKENS, "temperature": 0,
                "ignore_eos": ignore_eos}
        r = load.client.post("/generate", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"POST /generate ({adapter}) -> {r.status_code}: {r.text[:300]}")
        return r.json()["token_ids"]

    if alone:
        return [one(*req) for req in requests]
    return [f.result() for f in [load.pool.submit(one, *req) for req in requests]]


def scored(load: Load, requests: list[tuple[str, list[int], bool]], completions: list[list[int]]) -> list[list[float]]:
    """The logprobs of each completion's tokens after its prompt: prompt + completion echoed, max_tokens 0."""
    def one(adapter: str, prompt: list[int], completion: list[int]) -> list[float]:
        body = {"model": adapter, "prompt": prompt + completion, "max_tokens": 0, "echo": True, "logprobs": 0,
                "temperature": 0}
        r = load.client.post("/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"POST /v1/completions (echo, {adapter}) -> {r.status_code}: {r.text[:300]}")
        return r.json()["choices"][0]["logprobs"]["token_logprobs"][-len(completion):]

    futures = [load.pool.submit(one, a, p, c) for (a, p, _), c in zip(requests, completions, strict=True)]
    return [f.result() for f in futures]


def first_divergence(a: list[int], b: list[int]) -> int:
    """Index of the first differing token; the shorter length if one is the other's prefix (equal: the length)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def agreement(report: Report, loads: dict[Config, Load], random_names: list[str], args: argparse.Namespace) -> None:
    work = workloads(args, random_names)
    tokens: dict[str, dict[Config, list[list[int]]]] = {}
    for name, requests in work.items():
        tokens[name] = {}
        for config, load in loads.items():  # one server computes at a time
            log(f"agreement {name}: {len(requests)} greedy completions on {config.label}")
            tokens[name][config] = greedy(load, requests)
    report.samples("agreement_tokens", {n: {c.label: t for c, t in by.items()} for n, by in tokens.items()})
    by_key = {(c.dtype, c.compile): c for c in loads}
    # The floor for any comparison below: eager's own text, batched vs one request at a time. A row computed
    # alone and in a batch goes through kernels of other shapes (matrix products of one row or of many; in
    # bf16, CPU attention's exponentials rounded to bf16 and vectorised over a different key length), so
    # a greedy step with two tokens closer than that rounding goes either way.
    alone_same: dict[str, float] = {}
    for dtype in args.dtypes:
        if (eager := by_key.get((dtype, False))) is None:
            continue
        log(f"agreement: the same requests one at a time on {eager.label}")
        pairs = [(a, b) for name, requests in work.items()
                 for a, b in zip(tokens[name][eager], greedy(loads[eager], requests, alone=True), strict=True)]
        alone_same[dtype] = sum(a == b for a, b in pairs) / len(pairs)
        report.figure(f"BATCH_SAME_TEXT_{LABELS[dtype]}", alone_same[dtype], None,
                      "fraction of eager's greedy completions identical batched and sent one at a time",
                      completions=len(pairs))
    fp32, bf16 = by_key.get(("float32", False)), by_key.get(("bfloat16", False))
    if fp32 and bf16:
        for name, requests in work.items():
            ref, got = tokens[name][fp32], tokens[name][bf16]
            same = [a == b for a, b in zip(ref, got, strict=True)]
            diverge = [first_divergence(a, b) for a, b in zip(ref, got, strict=True)]
            equal = sum(x == y for a, b in zip(ref, got, strict=True) for x, y in zip(a, b, strict=False))
            up = name.upper()
            report.figure(f"BF16_{up}_IDENTICAL_PCT", 100 * sum(same) / len(same), None,
                          "% of completions identical to fp32's", completions=len(same))
            report.figure(f"BF16_{up}_FIRST_DIVERGENCE", statistics.fmean(diverge), None,
                          "mean index of the first token differing from fp32's (identical: its length)",
                          max_tokens=AGREEMENT_TOKENS)
            report.figure(f"BF16_{up}_TOKENS_PCT", 100 * equal / sum(len(a) for a in ref), None,
                          "% of fp32's tokens that bf16 has at the same index")
            log(f"scoring fp32's {name} completions under both dtypes (echo)")
            lp = {c: scored(loads[c], requests, ref) for c in (fp32, bf16)}
            deltas = [abs(x - y) for a, b in zip(lp[fp32], lp[bf16], strict=True) for x, y in zip(a, b, strict=True)]
            report.samples(f"logprobs_{name}", {c.label: v for c, v in lp.items()})
            report.figure(f"BF16_{up}_DLOGPROB_MEAN", statistics.fmean(deltas), None,
                          "mean |Δ logprob| of fp32's greedy tokens, bf16 vs fp32", tokens=len(deltas))
            report.figure(f"BF16_{up}_DLOGPROB_MAX", max(deltas), None, "max |Δ logprob| of fp32's greedy tokens")
    for dtype in args.dtypes:
        eager, compiled = by_key.get((dtype, False)), by_key.get((dtype, True))
        if eager and compiled:
            pairs = [(a, b) for name in work for a, b in zip(tokens[name][eager], tokens[name][compiled], strict=True)]
            # In fp32 compiling must not change a token. In bf16 the compiled step's attention (two matrix
            # products over the gathered keys) rounds differently from eager's CPU SDPA kernel, by as much as
            # eager's own batched and alone runs differ: the figure to hold is that floor (BATCH_SAME_TEXT),
            # within the sampling error of these few completions.
            same = sum(a == b for a, b in pairs) / len(pairs)
            floor = alone_same.get(dtype, 1.0)
            slack = 2 * (floor * (1 - floor) / len(pairs)) ** 0.5  # two standard errors of a fraction
            report.figure(f"COMPILE_SAME_TEXT_{LABELS[dtype]}", same,
                          ">=1" if dtype == "float32" else f">={floor - slack:.2f}",
                          "fraction of greedy completions identical to eager's", completions=len(pairs),
                          eager_batched_vs_alone=floor)
            if fp32 and dtype != "float32":
                ref = [a for name in work for a in tokens[name][fp32]]
                for config in (eager, compiled):
                    got = [b for name in work for b in tokens[name][config]]
                    report.figure(f"VS_FP32_IDENTICAL_PCT_{config.label}",
                                  100 * sum(a == b for a, b in zip(ref, got, strict=True)) / len(ref), None,
                                  "% of completions identical to fp32 eager's", completions=len(ref))


# ---- main ------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="base model (default: embedded SmolLM2)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated server dtypes")
    p.add_argument("--no-compile", action="store_true", help="eager only, even where the server takes --compile")
    p.add_argument("--batches", default="1,32", help="comma-separated decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per decode stream (33 full, 17 quick)")
    p.add_argument("--rounds", type=int, default=None, help="A..D D..A rounds of the speed figures (3 full, 1 quick)")
    p.add_argument("--ttft-n", type=int, default=3, help="lone requests per TTFT visit")
    p.add_argument("--random-adapters", type=int, default=None, help="random LoReFT adapters (8 full, 4 quick)")
    p.add_argument("--no-agreement", action="store_true", help="skip the greedy agreement figures")
    p.add_argument("--bandwidth-gib", type=float, default=None, help="tensor size of the bandwidth test "
                   "(0.5 on CPU, 4 on a GPU)")
    p.add_argument("--kv-cache-gib", type=float, default=2.0, help="KV cache per server (several run at once)")
    p.add_argument("--start-together", action="store_true", help="start the servers at once (compiling at "
                   "start-up takes minutes; START_S then includes the others' start-up)")
    p.add_argument("--quick", action="store_true", help="one round, shorter streams, fewer adapters")
    p.add_argument("--server-env", action="append", default=[], metavar="REFT_X=V", help="extra server setting")
    p.add_argument("--logs", type=Path, default=None, help="copy each server's log here (kept on failure too)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "device.json")
    args = p.parse_args()
    for key, (quick, full) in {"new_tokens": (17, 33), "rounds": (1, 3), "random_adapters": (4, 8)}.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.bandwidth_gib is None:
        args.bandwidth_gib = 4.0 if args.device == "cuda" else 0.5
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if unknown := set(args.dtypes) - set(LABELS):
        p.error(f"unknown dtypes {sorted(unknown)}; choose from {sorted(LABELS)}")
    args.batches = sorted({int(b) for b in args.batches.split(",")})
    args.env = dict(kv.split("=", 1) for kv in args.server_env)
    return args


def write_registry(directory: Path, args: argparse.Namespace, random_names: list[str]) -> None:
    """The random LoReFT adapters (bench/run.py's kind) and, on the default model, pyreft's emoji adapter."""
    shape = base_shape(args.model)
    directory.mkdir(parents=True)
    for i, name in enumerate(random_names):
        (directory / f"{name}.safetensors").write_bytes(adapter_file.to_bytes(random_loreft(shape, 100 + i)))
    if args.model is None:
        meta = json.loads((FIXTURE / "expected.json").read_text())["emoji"]
        emoji = adapter_file.import_pyreft(FIXTURE, meta["positions"], meta["share_weights"], shape, 64)
        (directory / "emoji.safetensors").write_bytes(adapter_file.to_bytes(emoji))


def start_servers(servers: dict[Config, DeviceServer], together: bool) -> dict[Config, float]:
    """Start every server, one after another or all at once; seconds each took to /health 200."""
    if not together:
        out = {}
        for config, server in servers.items():
            log(f"starting {config.label}")
            out[config] = server.start()
        return out
    log(f"starting {', '.join(c.label for c in servers)} together")
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        futures = {config: pool.submit(server.start) for config, server in servers.items()}
        return {config: f.result() for config, f in futures.items()}


def main() -> int:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # run the finally blocks
    args = parse_args()
    compile_ok = server_has_compile()
    compiles = [False] + ([True] if compile_ok and not args.no_compile else [])
    configs = [Config(d, c) for c in compiles for d in args.dtypes]
    device = torch.device(args.device)
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(), "versions": versions(),
            "config": {k: v for k, v in vars(args).items() if k != "out"}, "server_has_compile": compile_ok,
            "configs": [c.label for c in configs]}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    report = Report(args.out, meta)
    log(f"device bench on {args.device}: {', '.join(c.label for c in configs)}"
        f"{'' if compile_ok else ' (this server has no --compile)'}; results -> {args.out}")
    bw = bandwidth(device, args.bandwidth_gib, reps=10 if device.type == "cuda" else 5)
    report.figure("BW_GBS", bw["gbs"], None, "GB/s (best of sum and copy)", **bw)
    bound_s = {}
    for dtype in args.dtypes:
        nbytes = weight_bytes(args.model, dtype)
        bound_s[dtype] = nbytes / (bw["gbs"] * 1e9)
        report.figure(f"WEIGHT_GB_{LABELS[dtype]}", nbytes / 1e9, None, "GB read per decode step")
        report.figure(f"BOUND_MS_{LABELS[dtype]}", 1e3 * bound_s[dtype], None, "ms (weight bytes ÷ bandwidth)")
    random_names = [f"r{i:02d}" for i in range(args.random_adapters)]
    env = {"REFT_KV_CACHE_BYTES": str(int(args.kv_cache_gib * 2**30)),
           "REFT_MAX_BATCH_SIZE": str(max(32, *args.batches)), **args.env}
    tmp = Path(tempfile.mkdtemp(prefix="reft-device-"))
    servers: dict[Config, DeviceServer] = {}
    loads: dict[Config, Load] = {}
    try:
        for config in configs:
            registry = tmp / config.label / "adapters"
            write_registry(registry, args, random_names)
            servers[config] = DeviceServer(config, args.device, registry, tmp / config.label / "server.log",
                                           args.model, env)
        for config, start_s in start_servers(servers, args.start_together).items():
            report.figure(f"START_S_{config.label}", start_s, None, "s (to /health 200)",
                          load_s=servers[config].load_seconds(), together=args.start_together)
            loads[config] = Load(servers[config].url, concurrency=max(64, *args.batches))
        speed(args, report, loads, bound_s)
        if not args.no_agreement:
            agreement(report, loads, random_names, args)
        if device.type == "cuda":
            cuda_graph_skips(report, servers)
    finally:
        if args.logs is not None:
            args.logs.mkdir(parents=True, exist_ok=True)
            for config, server in servers.items():
                if server.log_path.exists():
                    shutil.copyfile(server.log_path, args.logs / f"{config.label}.log")
        for load in loads.values():
            load.close()
        for server in servers.values():
            server.stop()
        report.data["machine"]["load_avg_end"] = machine_info()["load_avg"]
        report.save()
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"done in {report.data['duration_s']:.0f}s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where one batch-1 decode step's time goes, eager and compiled, against the weight-read bound.

    .venv/bin/python bench/decode_profile.py                 # eager and compiled, 64-token prompt
    .venv/bin/python bench/decode_profile.py --modes eager --steps 64

The engine's own runner and sampler run in this process (no HTTP): a 64-token prompt is
prefilled, then each step is `runner.decode` of one row plus the sampler, as the scheduler runs
them. Two measurements per mode:

- wall: median time of a step (decode + sample) over `--steps` steps, no profiler attached, and
  the calling thread's CPU time for it (with one torch thread, the step's own work: on a machine
  shared with other load, the part of the wall time that is not waiting for a core);
- breakdown: the same steps under torch.profiler, each aten op's own (self) CPU time given to the
  innermost model module or engine stage it ran in (module forward hooks push profiler ranges);
  what no op accounts for is the Python between them (transformers' module code, the runner, the
  layout and index tensors). A compiled step shows inductor's fused kernels as the time inside the
  compiled region outside any aten op.

The bound is the bytes of weights a step reads (every parameter once; the tied embedding once, as
the LM head) at the memory bandwidth given by `--gbps` (the README's measured 32 GB/s).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.engine.kv_cache import KVCache  # noqa: E402
from server.engine.runner import DecodeRow, ModelRunner, PrefillChunk  # noqa: E402
from server.engine.sampling import Sampler, SamplingParams  # noqa: E402
from server.model import load_base_model  # noqa: E402

# Innermost module class -> the categories. Linear layers are the matmuls wherever they sit.
CATEGORY = {
    "Linear": "matmuls (q,k,v,o,gate,up,down, LM head)",
    "LlamaRMSNorm": "norms",
    "SiLU": "activations (SiLU, gate*up)",
    "SiLUActivation": "activations (SiLU, gate*up)",
    "LlamaMLP": "activations (SiLU, gate*up)",
    "LlamaRotaryEmbedding": "rotary embedding",
    "Embedding": "embedding",
    "LlamaAttention": "attention (rotary apply, KV write, SDPA)",
    "LlamaDecoderLayer": "residual adds",
    "LlamaModel": "model glue (masks, positions)",
    "LlamaForCausalLM": "model glue (masks, positions)",
    "runner": "runner (layout, index tensors)",
    "sampler": "sampler",
    "compiled": "compiled step: fused kernels + wrapper",
}


def _instrument(model: torch.nn.Module) -> None:
    """A profiler range around every module's forward, named by its class."""
    for module in model.modules():
        name = type(module).__name__
        ranges: list[contextlib.AbstractContextManager] = []

        def pre(_m, _a, name=name, ranges=ranges) -> None:  # noqa: ANN001
            r = record_function(f"mod::{name}")
            r.__enter__()
            ranges.append(r)

        def post(_m, _a, _o, ranges=ranges) -> None:  # noqa: ANN001
            ranges.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def _attribute(prof: profile, steps: int) -> dict[str, float]:
    """Self CPU ms per step of every aten op, by the innermost named range above it."""
    out: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name.startswith(("mod::", "stage::", "ProfilerStep")):
            continue
        parent, stage = event.cpu_parent, None
        while parent is not None and stage is None:
            if parent.name.startswith("mod::"):
                stage = parent.name[5:]
            elif parent.name.startswith("stage::"):
                stage = parent.name[7:]
            parent = parent.cpu_parent
        if stage is None:
            continue  # ops nested in another op's range are counted in their own event; this is a top-level one
        out[CATEGORY.get(stage, stage)] += event.self_cpu_time_total / 1000 / steps
    return out


def _weights_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def run_mode(mode: str, prompt_len: int, steps: int, warm: int, profiled_steps: int, threads: list[int]) -> dict:
    base = load_base_model()
    cache = KVCache.for_model(base.model.config, base.dtype, base.device, 1 << 27)
    runner = ModelRunner(base, cache, compile_decode=mode == "compiled", max_rows=32)
    started = time.perf_counter()
    runner.warm_up()
    compile_s = time.perf_counter() - started
    sampler = Sampler(32, int(base.model.config.vocab_size), base.device)
    slot = cache.allocate(prompt_len + warm + steps + profiled_steps + 8)
    sampler.add(0, SamplingParams(max_new_tokens=10_000), [])
    prompt = torch.randint(0, 49152, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = torch.tensor([0])
    logits = runner.prefill([PrefillChunk(prompt, 0, prompt_len, slot)]).logits
    token, position = sampler(logits, rows).token_ids[0], prompt_len

    def step(profiled: bool) -> None:
        nonlocal token, position
        cm = record_function("stage::runner") if profiled and mode == "eager" else contextlib.nullcontext()
        with cm:
            logits = runner.decode([DecodeRow(token, position, slot)])
        with record_function("stage::sampler") if profiled else contextlib.nullcontext():
            token = sampler(logits, rows).token_ids[0]
        position += 1

    for _ in range(warm):
        step(False)
    # Thread counts alternate in blocks of 4 steps, so that the machine's drift hits each alike.
    times: dict[int, list[float]] = {n: [] for n in threads}
    cpu: dict[int, list[float]] = {n: [] for n in threads}
    while len(times[threads[-1]]) < steps // len(threads):
        for n in threads:
            torch.set_num_threads(n)
            for _ in range(4):
                t, c = time.perf_counter(), time.thread_time()
                step(False)
                times[n].append(time.perf_counter() - t)
                cpu[n].append(time.thread_time() - c)
    torch.set_num_threads(threads[0])  # the profiled run: the first count asked for
    if mode == "eager":
        _instrument(base.model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(profiled_steps):
            if mode == "compiled":
                with record_function("stage::compiled"):
                    step(True)
            else:
                step(True)
        profiled_ms = (time.perf_counter() - t) * 1000 / profiled_steps
    return {"mode": mode, "wall_ms": {n: 1000 * statistics.median(ts) for n, ts in times.items()},
            "cpu_ms": {n: 1000 * statistics.median(ts) for n, ts in cpu.items()},
            "profiled_ms": profiled_ms, "breakdown": _attribute(prof, profiled_steps), "compile_s": compile_s,
            "weight_bytes": _weights_bytes(base.model), "threads": threads[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=48, help="timed steps without the profiler")
    ap.add_argument("--profiled-steps", type=int, default=8)
    ap.add_argument("--threads", default="", help="torch thread counts to time, alternating (default: torch's)")
    ap.add_argument("--warm", type=int, default=8)
    ap.add_argument("--gbps", type=float, default=32.0, help="memory bandwidth for the weight-read bound")
    args = ap.parse_args()
    for mode in args.modes.split(","):
        threads = [int(n) for n in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
        r = run_mode(mode, args.prompt, args.steps, args.warm, args.profiled_steps, threads)
        bound = r["weight_bytes"] / (args.gbps * 1e9) * 1000
        print(f"\n== {mode}: weight-read bound {bound:.1f} ms ({r['weight_bytes'] / 1e6:.0f} MB at {args.gbps:g} GB/s)"
              + (f", compiled in {r['compile_s']:.1f} s" if mode == "compiled" else ""))
        for n, ms in r["wall_ms"].items():
            print(f"   step {ms:.1f} ms median ({1000 / ms:.1f} tok/s) with {n} torch threads; "
                  f"the calling thread's CPU time {r['cpu_ms'][n]:.1f} ms")
        print(f"   under the profiler ({r['threads']} threads): {r['profiled_ms']:.1f} ms a step")
        ops = sum(r["breakdown"].values())
        for name, ms in sorted(r["breakdown"].items(), key=lambda kv: -kv[1]):
            print(f"   {ms:7.2f} ms  {name}")
        print(f"   {r['profiled_ms'] - ops:7.2f} ms  Python and dispatch outside any op", flush=True)


if __name__ == "__main__":
    main()

"""Where one batch-1 decode step's time goes, native, compiled and eager, against the weight-read bound.

    .venv/bin/python bench/decode_profile.py                 # native, compiled and eager, 64-token prompt
    .venv/bin/python bench/decode_profile.py --modes eager --steps 64
    .venv/bin/python bench/decode_profile.py --modes compiled-all   # `--compile`: transformers' forward

Modes: `native` (the lone-row step through the C++ library, what `make serve` runs on a CPU), `compiled`
(the lone-row step compiled, `REFT_NATIVE_SINGLE=false`), `eager` (the lean forward, both off),
`compiled-all` (`--compile`, every step through transformers' forward, compiled).

The engine's own runner and sampler run in this process (no HTTP): a 64-token prompt is
prefilled, then each step is `runner.decode` of one row plus the sampler, as the scheduler runs
them. Per mode:

- wall: median time of a step (decode + sample) over `--steps` steps, no profiler attached, and
  the calling thread's CPU time for it (with one torch thread, the step's own work: on a machine
  shared with other load, the part of the wall time that is not waiting for a core);
- torch calls: top-level torch ops a step (views included), as the profiler records them;
- breakdown: the same steps under torch.profiler, each op's self CPU time given to a category by
  the top-level op it ran under (a matrix product's kernel under `linear`, SDPA's under SDPA),
  or to the stage it ran in (the runner's input and index tensors, the attention layout, the
  sampler). What no op accounts for is Python and dispatch between them. In `compiled` mode
  inductor's C++ kernels are timed one by one (`cpp.enable_kernel_profile`): each layer's
  products are fused with its norms, rotary, SiLU × up and adds into kernels of their own, so
  those count together; in `compiled-all` they are not timed apart from the Python. In `native` mode
  the library is built with its phase timers (`lone_row.cpp`, `PHASE_TIMERS`), which time each phase
  of the step inside the call: what they leave is the Python, ctypes and torch around the call;
- scheduler: one greedy request through the engine's real scheduler thread; its time per token
  beyond its decode steps (runner, sampler, output events and text, timed in that thread) is the
  loop's own (planning, admission, locking).

The bound is the bytes of weights a step reads (every parameter once; the tied embedding once, as
the LM head) at the memory bandwidth given by `--gbps` (the README's measured 32 GB/s).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch._inductor.config
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.engine import attention  # noqa: E402
from server.engine.adapter_cache import DeviceAdapterCache  # noqa: E402
from server.engine.attention_kernel import PROFILE_NAME  # noqa: E402
from server.engine.compiled import CompiledLoneRow  # noqa: E402
from server.engine.kv_cache import KVCache  # noqa: E402
from server.engine.lone_row import NativeLoneRow  # noqa: E402
from server.engine.loop import EngineLoop  # noqa: E402
from server.engine.panel_product import PROFILE_NAME as PANEL_PROFILE_NAME  # noqa: E402
from server.engine.runner import DecodeRow, ModelRunner, PrefillChunk  # noqa: E402
from server.engine.sampling import Sampler, SamplingParams  # noqa: E402
from server.engine.scheduler import GenerationRequest, Scheduler  # noqa: E402
from server.model import load_base_model  # noqa: E402

MATMULS = "matmuls (q/k/v, o, gate/up, down, LM head)"
ELEMENTWISE = "rotary, SiLU x up, residual adds"
# Top-level op -> category; ops not named here are views, casts and the like.
CATEGORY = {
    **dict.fromkeys(("aten::linear", "aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise",
                     "mkl::_mkl_linear", PANEL_PROFILE_NAME), MATMULS),
    "aten::scaled_dot_product_attention": "attention (SDPA)",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention (SDPA)",
    **dict.fromkeys(("aten::matmul", "aten::softmax", "aten::masked_fill", "aten::where", "aten::index",
                     "aten::_softmax"), "attention (SDPA)"),
    PROFILE_NAME: "attention (kernel)",
    "aten::index_copy_": "attention: KV write",
    **dict.fromkeys(("aten::rms_norm", "aten::pow", "aten::mean", "aten::rsqrt"), "norms"),
    **dict.fromkeys(("aten::mul", "aten::add", "aten::silu", "aten::flip", "aten::neg", "aten::cat", "aten::cos",
                     "aten::sin", "aten::add_"), ELEMENTWISE),
    "aten::embedding": "embedding",
}
FUSED_PRODUCTS = "compiled kernels with products (norms, rotary, SiLU x up, adds fused in)"
FUSED_OTHER = "compiled kernels without products (norms, rotary, KV write, adds)"
STAGES = {"layout": "attention layout (decode_layout)", "sampler": "sampler",
          "runner": "runner: input and index tensors"}


def attribute(prof: profile, steps: int) -> tuple[dict[str, float], float]:
    """Self CPU ms per step by category, and top-level ops per step."""
    out: dict[str, float] = defaultdict(float)
    top_level = 0
    for event in prof.events():
        if event.name.startswith(("stage::", "ProfilerStep")) or "Compiled" in event.name:
            continue
        chain, parent = [event], event.cpu_parent
        while parent is not None:
            chain.append(parent)
            parent = parent.cpu_parent
        stage = next((e.name[7:] for e in chain if e.name.startswith("stage::")), None)
        if stage is None:
            continue
        ops = [e for e in chain if not e.name.startswith("stage::") and "Compiled" not in e.name
               and "Torch-Compiled" not in e.name and not e.name.startswith("##")]
        outermost = ops[-1].name
        if ops[-1] is event:
            top_level += 1
        if stage in ("layout", "sampler"):
            category = STAGES[stage]
        elif stage == "runner":
            category = STAGES["runner"]
        elif kernel := next((e.name for e in ops if "cpp_fused" in e.name), None):  # `compiled`'s kernel profile
            category = FUSED_PRODUCTS if "mm" in kernel.split("_") or "bmm" in kernel.split("_") else FUSED_OTHER
        else:
            category = CATEGORY.get(outermost, "views and casts")
        out[category] += event.self_cpu_time_total / 1000 / steps
    return out, top_level / steps


def _weights_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.untyped_storage().data_ptr() not in seen:
            seen.add(p.untyped_storage().data_ptr())
            total += p.untyped_storage().nbytes()
    return total


def _ranged(name: str, fn):  # noqa: ANN001, ANN202 - any callable
    def call(*args: object, **kwargs: object) -> object:
        with record_function(f"stage::{name}"):
            return fn(*args, **kwargs)

    return call


def _scheduler_ms_per_token(base, runner: ModelRunner, prompt: list[int], tokens: int) -> tuple[float, float]:  # noqa: ANN001
    """One greedy request through the engine's scheduler thread: (ms a token, of which runner + sampler).

    Both come from the engine thread itself. Comparing its tokens with steps timed in this (main) thread
    would not do: this thread's OpenMP pool outlives its steps, and with two pools on a 2-core machine
    libgomp stops spinning between parallel regions, so the engine thread's ops run slower here than
    in the server, where it is the only long-lived torch thread (server/torch_threads.py).
    """
    adapters = DeviceAdapterCache(base.device, base.dtype, 1 << 26, set())
    policy = Scheduler(runner.cache, adapters.get, max_batch_size=1, max_queue=4, max_prefill_tokens=4096,
                       max_prompt_tokens=4096, max_context=8192)
    sch = EngineLoop(runner, policy, lambda ids: base.tokenizer.decode(ids), eos_token_ids=[])
    arrivals: list[float] = []
    done = threading.Event()
    stepped = [0.0]
    decode_part = sch._decode_part

    def timed_part(part) -> None:  # noqa: ANN001
        started = time.perf_counter()
        decode_part(part)
        stepped[0] += time.perf_counter() - started

    sch._decode_part = timed_part

    def on_event(event) -> None:  # noqa: ANN001
        arrivals.extend(time.perf_counter() for _ in event.token_ids)
        if event.finish_reason is not None:
            done.set()

    sch.start()
    try:
        sch.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=tokens, ignore_eos=True), None, on_event))
        done.wait(600)
    finally:
        sch.stop()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return 1000 * statistics.median(gaps), 1000 * stepped[0] / (tokens - 1)


def run_mode(mode: str, prompt_len: int, steps: int, warm: int, profiled_steps: int, threads: list[int]) -> dict:
    base = load_base_model()
    cache = KVCache.for_model(base.model.config, base.dtype, base.device, 1 << 27)
    runner = ModelRunner(base, cache, compile_decode=mode == "compiled-all", compile_single=mode == "compiled",
                         pack_weights=True, attention_kernel=True, max_rows=32)  # as `make serve`
    started = time.perf_counter()
    if mode == "native":  # as the server builds it, with the phase timers
        runner.lone_row = NativeLoneRow.build(runner.lean, cache, profile=True)
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": mode == "compiled"}):
        runner.warm_up()
    if mode in ("compiled", "native") and runner.lone_row is None:
        raise SystemExit(f"no {mode} lone-row step: see the warning above")
    compile_s = time.perf_counter() - started
    sampler = Sampler(32, int(base.model.config.vocab_size), base.device)
    slot = cache.allocate(prompt_len + warm + steps + 2 * profiled_steps + 8)
    sampler.add(0, SamplingParams(max_new_tokens=10_000), [])
    prompt = torch.randint(0, 49152, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = torch.tensor([0])
    logits = runner.prefill([PrefillChunk(prompt, 0, prompt_len, slot)]).logits
    token, position = sampler(logits, rows).token_ids[0], prompt_len

    def step(profiled: bool) -> None:
        nonlocal token, position
        with record_function("stage::runner") if profiled else contextlib.nullcontext():
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
    # Ranges around the model's forward and the layout, so that the runner's own ops stand apart.
    kept_layout, kept_lean = attention.decode_layout, runner.lean
    attention.decode_layout = _ranged("layout", kept_layout)
    if runner.compiled is not None:
        runner.compiled._step = _ranged("model", runner.compiled._step)
    elif isinstance(runner.lone_row, CompiledLoneRow):
        runner.lone_row._step = _ranged("model", runner.lone_row._step)
    elif runner.lean is not None:
        runner.lean = _ranged("model", runner.lean)
    else:
        runner._forward = _ranged("model", runner._forward)
    native = runner.lone_row if isinstance(runner.lone_row, NativeLoneRow) else None
    phases = native.phase_seconds() if native is not None else {}
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for _ in range(profiled_steps):
                step(True)
            profiled_ms = (time.perf_counter() - t) * 1000 / profiled_steps
    finally:
        attention.decode_layout, runner.lean = kept_layout, kept_lean
    breakdown, calls = attribute(prof, profiled_steps)
    if native is not None:
        for name, seconds in native.phase_seconds().items():
            breakdown[f"native: {name}"] = 1000 * (seconds - phases[name]) / profiled_steps
    cache.free(slot)
    scheduler_ms, engine_step_ms = _scheduler_ms_per_token(base, runner, prompt, steps)
    return {"mode": mode, "wall_ms": {n: 1000 * statistics.median(ts) for n, ts in times.items()},
            "cpu_ms": {n: 1000 * statistics.median(ts) for n, ts in cpu.items()}, "calls": calls,
            "profiled_ms": profiled_ms, "breakdown": breakdown, "compile_s": compile_s,
            "scheduler_ms": scheduler_ms, "engine_step_ms": engine_step_ms,
            "weight_bytes": _weights_bytes(base.model), "threads": threads[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="native,compiled,eager")
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
              + (f", built or compiled in {r['compile_s']:.1f} s" if mode != "eager" else ""))
        for n, ms in r["wall_ms"].items():
            print(f"   step {ms:.1f} ms median ({1000 / ms:.1f} tok/s, {ms / bound:.2f}x the bound) with {n} torch "
                  f"threads; the calling thread's CPU time {r['cpu_ms'][n]:.1f} ms")
        print(f"   {r['calls']:.0f} top-level torch ops a step; under the profiler ({r['threads']} threads): "
              f"{r['profiled_ms']:.1f} ms a step")
        ops = sum(r["breakdown"].values())
        for name, ms in sorted(r["breakdown"].items(), key=lambda kv: -kv[1]):
            print(f"   {ms:7.2f} ms {100 * ms / r['profiled_ms']:5.1f}%  {name}")
        rest = r["profiled_ms"] - ops
        print(f"   {rest:7.2f} ms {100 * rest / r['profiled_ms']:5.1f}%  Python and dispatch outside any op"
              + (" (and inductor's fused kernels)" if mode == "compiled-all" else "")
              + (" or phase (the ctypes call, the rotary table's row)" if mode == "native" else ""))
        print(f"   scheduler: {r['scheduler_ms']:.1f} ms a token through the engine thread, of which its decode "
              f"step (runner, sampler, output events) {r['engine_step_ms']:.1f} ms "
              f"({r['scheduler_ms'] - r['engine_step_ms']:+.1f} ms)", flush=True)

if __name__ == "__main__":
    main()

"""A decode step of many streams, in-process: as the server runs it (the panel products of
`REFT_PANEL_PRODUCTS` on the packed weight copies of `REFT_PACKED_WEIGHTS`, and the decode attention
kernel of `REFT_ATTENTION_KERNEL`) against oneDNN's products on its packed copies, no packed copies, and
SDPA's attention, side by side, and where the served step's time goes.

    .venv/bin/python bench/many_streams.py                      # 16 rows of 1,024-token contexts
    .venv/bin/python bench/many_streams.py --rows 32 --context 64
    .venv/bin/python bench/many_streams.py --dtype bfloat16     # as `--dtype bfloat16` serves it

The four runners share the model and one KV cache: every row's prompt is prefilled once, then the
steps take turns, each feeding the same token at the same position of every row (so each writes the
same KV columns and reads the same keys). Prints each side's median step, its ratio to the served one,
how far its logits differ, and one profiled served step by kind of op (the categories of `decode_profile.py`).
This is the step `LLAMA_LONG` and `P8` time through HTTP (`bench/llamacpp.py`, `bench/run.py --only
long`); here it stands without the server, the sampler or the other side's load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_profile import attribute  # noqa: E402

from server.engine.kv_cache import KVCache  # noqa: E402
from server.engine.runner import DecodeRow, ModelRunner, PrefillChunk  # noqa: E402
from server.model import load_base_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens of every row")
    ap.add_argument("--steps", type=int, default=20, help="timed steps of each side")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args()
    base = load_base_model(dtype=args.dtype)
    cache = KVCache.for_model(base.model.config, base.dtype, base.device, 1 << 31)
    sides = {"served": ModelRunner(base, cache, pack_weights=True, panel_products=True, attention_kernel=True),
             "oneDNN's packed copies": ModelRunner(base, cache, pack_weights=True, attention_kernel=True),
             "no packed copies": ModelRunner(base, cache, attention_kernel=True),
             "SDPA attention": ModelRunner(base, cache, pack_weights=True, panel_products=True)}
    if sides["served"].kernel is None:
        raise SystemExit("the decode attention kernel could not be built here (the log says why)")
    gen = torch.Generator().manual_seed(0)
    slots = [cache.allocate(args.context + 8) for _ in range(args.rows)]
    for slot in slots:
        prompt = torch.randint(100, 49000, (args.context,), generator=gen).tolist()
        sides["served"].prefill([PrefillChunk(prompt, 0, args.context, slot)])
    rows = [DecodeRow(7, args.context, slot) for slot in slots]
    times: dict[str, list[float]] = {name: [] for name in sides}
    logits: dict[str, torch.Tensor] = {}
    for step in range(args.steps + 3):
        for name, runner in list(sides.items())[:: 1 if step % 2 else -1]:  # a drift hits every side alike
            started = time.perf_counter()
            logits[name] = runner.decode(rows)
            if step >= 3:  # the first steps warm caches and oneDNN's primitives
                times[name].append(time.perf_counter() - started)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    print(f"{args.rows} rows x {args.context} keys, {args.dtype}, {torch.get_num_threads()} torch threads; "
          f"packed copies: "
          f"{sides['served'].lean.packed_bytes / 2**20:.0f} MiB")
    for name in sides:
        versus = "" if name == "served" else (
            f" ({ms[name] / ms['served']:.3f}x the served step; logits differ from its by at most "
            f"{(logits[name] - logits['served']).abs().max().item():.2e})")
        print(f"   step {name}: {ms[name]:.1f} ms{versus}")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            with record_function("stage::model"):
                sides["served"].decode(rows)
    breakdown, calls = attribute(prof, 3)
    print(f"   the served step under the profiler, {calls:.0f} top-level torch ops:")
    for name, spent in sorted(breakdown.items(), key=lambda kv: -kv[1]):
        print(f"   {spent:7.2f} ms  {name}")


if __name__ == "__main__":
    main()

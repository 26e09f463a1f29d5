"""Few-row products on this CPU: F.linear, `lean_decode.split_linear`, `onednn_linear` (over the weight as it
is and over its `packed_weight` copy) and, in float32, the panel products (`panel_product.py`), per weight shape.

    .venv/bin/python bench/matvec.py                  # the default model's shapes, 1-512 rows
    .venv/bin/python bench/matvec.py --rows 1 --reps 40
    .venv/bin/python bench/matvec.py --dtype bfloat16  # the products of `--dtype bfloat16` (AMX, where the CPU has it)

Why it exists: a decode step of few rows is a handful of matrix products per layer that read every
weight once, so its floor is the memory bandwidth. This prints, per shape (30 weights of a layer's
shape read back to back, as a step reads them; the LM head once), each way's time and the bytes of
weight it read a second, beside the machine's plain streaming read (`torch.sum` over 540 MB) on one
thread and on all of torch's, and the products' GFLOPS (past a few rows they are bound by arithmetic, not by
reading). `SPLIT_ROWS` and `PANEL_ROWS` in lean_decode.py come from its rows table, per dtype.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.engine.lean_decode import onednn_linear, packed_weight, split_linear  # noqa: E402
from server.engine.panel_product import PanelLibrary  # noqa: E402

# SmolLM2-135M: fused q/k/v, o, fused gate/up, down (30 layers each), the tied LM head.
SHAPES = {"q/k/v": ((960, 576), 30), "o": ((576, 576), 30), "gate/up": ((3072, 576), 30),
          "down": ((576, 1536), 30), "LM head": ((49152, 576), 1)}


def timed(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def streaming_gbps(threads: int, reps: int) -> float:
    torch.set_num_threads(threads)
    data = torch.randn(135_000_000)
    return data.numel() * 4 / timed(data.sum, reps) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128,512")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; plain streaming read: "
          f"{streaming_gbps(1, 5):.1f} GB/s on 1 thread, {streaming_gbps(threads, 5):.1f} GB/s on {threads}")
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    library = PanelLibrary.build() if dtype == torch.float32 else None
    for name, ((out, inp), count) in SHAPES.items():
        weights = [torch.randn(out, inp, generator=gen).to(dtype) for _ in range(count)]
        packed = [packed_weight(w) for w in weights]
        panels = [library.pack(w) for w in weights] if library is not None else []
        nbytes = out * inp * dtype.itemsize * count
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, inp, generator=gen).to(dtype)
            blocks = [w.view(threads, -1, inp) for w in weights]
            ways = {"F.linear": lambda x=x, ws=weights: [F.linear(x, w) for w in ws],
                    "split": lambda x=x, bs=blocks: [split_linear(x, b) for b in bs],
                    "oneDNN": lambda x=x, ws=weights: [onednn_linear(x, w) for w in ws],
                    "packed": lambda x=x, ps=packed: [onednn_linear(x, p) for p in ps],
                    **({"panels": lambda x=x, ps=panels: [p(x) for p in ps]} if panels else {})}
            seconds = {way: timed(fn, args.reps) for way, fn in ways.items()}
            flops = 2 * out * inp * count * rows
            print(f"{name:8s} [{out}, {inp}] x{count} rows {rows:3d}: " + ", ".join(
                f"{way} {1e6 * t / count:7.0f} us ({nbytes / t / 1e9:5.1f} GB/s, {flops / t / 1e9:4.0f} GFLOPS)"
                for way, t in seconds.items()),
                flush=True)


if __name__ == "__main__":
    main()

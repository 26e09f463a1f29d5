"""Decode attention of many streams, alone: the server's kernel (`attention_kernel.py`) and SDPA, against the cost
of reading the keys and values and against the other ways torch offers to compute it.

    .venv/bin/python bench/decode_attention.py                    # 16 rows of 1,024 keys, the default model's shape
    .venv/bin/python bench/decode_attention.py --rows 4 --context 1024
    .venv/bin/python bench/decode_attention.py --dtype bfloat16   # pools as `--dtype bfloat16` holds them

Every layer's keys and values sit in a `KVCache` shaped for the default model, each row in its slot as the engine
places it, so a pass over the layers reads them from memory, not from the CPU's caches, as a decode step does. Each
way runs over every layer, in rounds that take the ways in turn; the figures are medians over the rounds:

- `read`: the columns attention reads, summed (`Tensor.sum` of each group's keys and values): the cost of reading
  them, the floor of any attention over those keys and values;
- `kernel`: `attention.attention` with the runner's `KernelDecode` layout, what the server runs on a CPU;
- `sdpa`: `attention.attention` with the step's `decode_layout`, what the server runs without the kernel;
- `bmm`: per key head, the scores as one `bmm` over the rows, a softmax, and a second `bmm` with the values;
- `inductor`: the same attention written as products summed over the head dimension, compiled by torch.compile
  (dynamic shapes), so that inductor writes the loops.

Prints each way's time, its ratio to SDPA's and how far its output is from SDPA's. A way that wins here must still
win inside the step, where the products and the norms share the caches and the threads: check it there
(`bench/many_streams.py`; docs/internals/decode-profile.md#many-streams says which did not).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.engine import attention  # noqa: E402
from server.engine.attention_kernel import DecodeKernel, RowColumns  # noqa: E402
from server.engine.kv_cache import KVCache  # noqa: E402
from server.model import load_base_model  # noqa: E402

Way = Callable[[Tensor, int], Tensor]  # (queries [1, heads, rows, dim], layer) -> [1, rows, heads, dim]


def summed_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """q [slots, kv_heads, g, d], k and v [slots, kv_heads, keys, d] -> [slots, kv_heads, g, d], as sums."""
    scores = (q[:, :, :, None, :] * k[:, :, None, :, :]).sum(-1) * scale
    return (scores.softmax(-1)[..., None] * v[:, :, None]).sum(3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024, help="keys of every row")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the pools' and queries'")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    config = load_base_model().model.config
    cache = KVCache.for_model(config, dtype, torch.device("cpu"), 1 << 31)
    heads, kv_heads, dim = config.num_attention_heads, cache.kv_heads, cache.head_dim
    scale = dim**-0.5
    gen = torch.Generator().manual_seed(0)
    slots = [cache.allocate(args.context + 8) for _ in range(args.rows)]
    for pools in (cache.k, cache.v):
        for pool in pools:
            for slot in slots:
                pool[:, slot.start : slot.start + args.context] = torch.randn(kv_heads, args.context, dim,
                                                                             generator=gen)
    layout = attention.decode_layout(slots, [args.context] * args.rows, cache.block_tokens, torch.device("cpu"))
    queries = [torch.randn(1, heads, args.rows, dim, generator=gen).to(dtype) for _ in range(cache.layers)]

    def views(layer: int, group: attention.DecodeGroup) -> tuple[Tensor, Tensor]:
        columns = slice(group.start, group.start + group.slots * group.slot_size)
        k, v = (pool[layer][:, columns].view(kv_heads, group.slots, group.slot_size, dim)[:, :, : group.kv_len]
                for pool in (cache.k, cache.v))
        return k, v  # [kv_heads, slots, keys, dim]

    def grouped(per_group: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Way:
        """A way over `layout`'s groups: per_group(queries [slots, kv_heads, g, d], k, v as `views`)."""

        def run(q: Tensor, layer: int) -> Tensor:
            out = q.new_empty(args.rows, heads, dim)
            for g in layout.decode:
                if g.mask is not None or g.slot_index is not None:
                    raise SystemExit("the rows' slots are not one dense group of equal lengths; try other --rows")
                grouped_q = q[0].index_select(1, g.query_index).transpose(0, 1).unflatten(1, (kv_heads, -1))
                k, v = views(layer, g)
                out.index_copy_(0, g.query_index, per_group(grouped_q.contiguous(), k, v).flatten(1, 2))
            return out.unsqueeze(0)

        return run

    def read(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return q + k.sum() + v.sum()

    def bmm(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = []
        for h in range(kv_heads):  # a key head's rows are one strided batch; two heads' are not
            scores = torch.bmm(q[:, h], k[h].transpose(1, 2)) * scale
            out.append(torch.bmm(scores.softmax(-1), v[h]))
        return torch.stack(out, 1)

    compiled = torch.compile(summed_attention, dynamic=True)

    def sdpa(q: Tensor, layer: int) -> Tensor:
        return attention.attention(None, q, cache.k[layer], cache.v[layer], None, scaling=scale,
                                   **{attention.LAYOUT_KWARG: layout})[0]

    kernel = DecodeKernel.build(heads // kv_heads, dim)
    if kernel is None:
        raise SystemExit("the decode attention kernel could not be built here (the log says why)")
    kernel_layout = attention.KernelDecode(kernel, RowColumns.of([s.start for s in slots], [args.context] * args.rows,
                                                                 torch.device("cpu")))

    def served(q: Tensor, layer: int) -> Tensor:
        return attention.attention(None, q, cache.k[layer], cache.v[layer], None, scaling=scale,
                                   **{attention.LAYOUT_KWARG: kernel_layout})[0]

    ways: dict[str, Way] = {
        "read": grouped(read), "kernel": served, "sdpa": sdpa, "bmm": grouped(bmm),
        "inductor": grouped(lambda q, k, v: compiled(q, k.transpose(0, 1), v.transpose(0, 1), scale)),
    }
    ms: dict[str, list[float]] = {name: [] for name in ways}
    outputs: dict[str, Tensor] = {}
    with torch.inference_mode():
        for round_ in range(args.rounds + 1):  # the first round compiles and warms up
            for name, way in ways.items():
                started = time.perf_counter()
                for layer, q in enumerate(queries):
                    outputs[name] = way(q, layer)
                if round_:
                    ms[name].append(1000 * (time.perf_counter() - started))
    sdpa_ms = statistics.median(ms["sdpa"])
    read_bytes = 2 * cache.layers * args.rows * args.context * kv_heads * dim * dtype.itemsize
    print(f"{args.rows} rows x {args.context} keys, {args.dtype}, {cache.layers} layers, {torch.get_num_threads()} "
          "torch threads; "
          f"keys and values read: {read_bytes / 1e6:.0f} MB a step")
    for name, times in ms.items():
        median = statistics.median(times)
        diff = "" if name in ("read", "sdpa") else (
            f", output within {(outputs[name] - outputs['sdpa']).abs().max().item():.1e} of SDPA's (last layer)")
        rate = f", {read_bytes / median / 1e6:.1f} GB/s" if name == "read" else ""
        print(f"   {name:9s} {median:7.1f} ms  ({median / sdpa_ms:.2f}x SDPA's time){rate}{diff}")


if __name__ == "__main__":
    main()

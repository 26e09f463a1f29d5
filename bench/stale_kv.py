"""What keeping stale KV columns harmless costs: zeroing a slot's written columns when it is freed,
against sanitising the columns eager decode reads behind its mask at every step.

    .venv/bin/python bench/stale_kv.py [--reps 15] [--blocks 5]

Eager decode steps of the default model at batch 1 and 32 (rows of 40 to 80 tokens in 128-token
slots, so the batch-32 step reads shorter rows' slots up to the longest row), timed in blocks
that alternate three variants side by side:
  clear:     the engine as it is (the runner records each row's written extent; `free` zeroes it)
  none:      that bookkeeping switched off (what the step cost without any protection)
  sanitise:  none, plus keys and values past each row's length replaced by zeros inside attention
Prints the median step per variant and batch, then the median time `KVCache.free` takes to zero
a row of 100 and of 1,000 written tokens. Medians of block medians.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from server.engine.kv_cache import KVCache
from server.engine.runner import DecodeRow, ModelRunner, PrefillChunk
from server.model import load_base_model

SDPA = F.scaled_dot_product_attention


def sanitising_sdpa(q, k, v, attn_mask=None, **kw):  # noqa: ANN001, ANN201 - F.scaled_dot_product_attention's own
    if attn_mask is not None and attn_mask.dim() == 4:  # a decode group: [slots, 1, 1, kv_len]
        keep = attn_mask.view(attn_mask.shape[0], 1, -1, 1)
        k, v = k.masked_fill(~keep, 0.0), v.masked_fill(~keep, 0.0)
    return SDPA(q, k, v, attn_mask=attn_mask, **kw)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--blocks", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = load_base_model(device="cpu", dtype="float32")
    cache = KVCache.for_model(base.model.config, base.dtype, base.device, 1 << 30)
    runner = ModelRunner(base, cache)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 40000) for _ in range(rng.randint(40, 80))] for _ in range(32)]
    slots = [cache.allocate(128) for _ in prompts]
    runner.prefill([PrefillChunk(p, 0, len(p), s) for p, s in zip(prompts, slots, strict=True)])
    rows = {n: [DecodeRow(7, len(p), s) for p, s in zip(prompts[:n], slots[:n], strict=True)] for n in (1, 32)}
    writing = KVCache.writing

    def variant(name: str) -> None:
        KVCache.writing = (lambda self, slot, end: None) if name != "clear" else writing  # type: ignore[method-assign]
        F.scaled_dot_product_attention = sanitising_sdpa if name == "sanitise" else SDPA  # what attention.py calls

    def median_ms(step: Callable[[], object]) -> float:
        step()
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            step()
            times.append(1000 * (time.perf_counter() - start))
        return statistics.median(times)

    names = ("clear", "none", "sanitise")
    blocks: dict[tuple[str, int], list[float]] = {(v, n): [] for v in names for n in rows}
    for block in range(args.blocks):
        for n, batch in rows.items():
            for name in names:
                variant(name)
                blocks[(name, n)].append(median_ms(lambda batch=batch: runner.decode(batch)))
            print(f"block {block} batch {n}: " + "  ".join(f"{name} {blocks[(name, n)][-1]:.1f} ms" for name in names),
                  flush=True)
    variant("clear")
    print(f"threads {torch.get_num_threads()}; decode step, median of {args.blocks} block medians of {args.reps}")
    for n in rows:
        ms = {name: statistics.median(blocks[(name, n)]) for name in names}
        print(f"batch {n:2d}: " + "  ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
              + f"  clear/none {ms['clear'] / ms['none']:.3f}  sanitise/none {ms['sanitise'] / ms['none']:.3f}")
    for tokens in (100, 1000):
        times = []
        for _ in range(args.reps):
            slot = cache.allocate(tokens)
            cache.writing(slot, tokens)
            for pool in (*cache.k, *cache.v):
                pool[:, slot.start : slot.start + tokens] = 1.0
            start = time.perf_counter()
            cache.free(slot)
            times.append(1000 * (time.perf_counter() - start))
        print(f"free of a row of {tokens} written tokens: {statistics.median(times):.2f} ms (median of {args.reps})")


if __name__ == "__main__":
    main()

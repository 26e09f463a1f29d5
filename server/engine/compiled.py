"""The decode step under torch.compile (`--compile`, `REFT_COMPILE`).

Why: a decode step of a small batch computes little; run eagerly, it spends its time in the
framework (dispatching a few hundred small ops, and on a GPU launching a kernel for each), not in
reading the weights, which is the floor. Compiled, inductor fuses the elementwise work and, on a
GPU (`mode="reduce-overhead"`), the step is replayed as a CUDA graph: one launch.

What is captured: the base model's forward for one decode step, over the engine's KV cache, with
attention as `attention.indexed_decode` (index tensors, not a Python layout). Shapes are the only
thing that changes between steps: the batch is padded up to a bucket (padding rows write and read
a scratch slot of their own) and the keys up to a power of two, and both sizes are symbolic, so
dynamo compiles once for one row and once for more (it specialises size 1), during `warm_up()` at
start-up, and never again as rows join and leave. A GPU records one CUDA graph per (bucket, keys)
pair it meets: a small fixed set.

Not captured: prefill (it carries the interventions, a per-step plan of Python objects, and its
shapes vary widely; it stays eager). The decoder layers' intervention hooks run inside the traced
forward but return at once without a plan, so they add nothing to the graph.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch._dynamo.utils import counters

from server.engine.attention import DecodeIndex
from server.engine.kv_cache import KVCache, Slot

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MIN_KEYS = 16  # never 1: dynamo would specialise a size-1 key dimension into a graph of its own

DecodeForward = Callable[[Tensor, Tensor, Tensor, DecodeIndex], Tensor]


class CompiledDecode:
    """Runs decode steps of up to `max_rows` rows through one compiled forward."""

    def __init__(self, forward: DecodeForward, cache: KVCache, max_rows: int, device: torch.device) -> None:
        self.device = device
        self.buckets = [b for b in BATCH_BUCKETS if b < max_rows] + [max_rows]
        self.scratch: Slot = cache.allocate(1)  # padding rows write their keys here, and read only them
        # The step writes every layer's pool in place. CUDA graph trees replay a graph only if each input it
        # mutates keeps one address, and dynamo cannot know that of plain tensors: unmarked, the pools are
        # mutated inputs and the GPU skips its graphs ("mutated inputs"), running the step launch by launch.
        for pool in (*cache.k, *cache.v):
            torch._dynamo.mark_static_address(pool)
        mode = "reduce-overhead" if device.type == "cuda" else None
        self._step = torch.compile(forward, fullgraph=True, dynamic=True, mode=mode)

    @torch.inference_mode()  # as in serving: grad mode is part of what a compiled graph is guarded on
    def warm_up(self) -> None:
        """Compile now, for one row and for several, so that no request waits for it.

        On a GPU each shape runs three times, because CUDA graph trees run a new shape eagerly once, record
        it on the second call and replay it from the third: start-up then shows whether torch kept the graphs.
        """
        start, skipped = time.perf_counter(), counters["inductor"]["cudagraph_skips"]
        for rows in (1, 2):
            for _ in range(3 if self.device.type == "cuda" else 1):
                self([(0, position, self.scratch) for position in range(rows)])
        log.info("decode step compiled in %.1f s", time.perf_counter() - start)
        if self.device.type == "cuda" and counters["inductor"]["cudagraph_skips"] > skipped:
            # torch falls back to running the compiled kernels one by one: correct, but launch-bound at small batches
            log.warning("compiled decode: CUDA graphs skipped (torch's 'skipping cudagraphs' message says why); "
                        "decode steps run without them")

    def __call__(self, rows: Sequence[tuple[int, int, Slot]]) -> Tensor:
        """rows: (token, position, slot) per decode row. Next-token logits [len(rows), V]."""
        n = len(rows)
        bucket = next(b for b in self.buckets if b >= n)
        pad = [(0, 0, self.scratch)] * (bucket - n)
        tokens, positions, slots = zip(*(list(rows) + pad), strict=True)
        lengths = [p + 1 for p in positions]
        keys = max(MIN_KEYS, 1 << (max(lengths) - 1).bit_length())

        def tensor(values: Sequence[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device)

        index = DecodeIndex(tensor([s.start for s in slots]), tensor(lengths),
                            torch.arange(keys, device=self.device))
        columns = tensor([s.start + p for s, p in zip(slots, positions, strict=True)])
        # The model's constants that are Python floats (each norm's eps, attention's scale) stay constants:
        # with dynamic=True dynamo would make them graph inputs, 0-dim CPU tensors, and a CPU tensor in the
        # graph makes inductor split the step's CUDA graph around it or skip the graph.
        with torch._dynamo.config.patch(specialize_float=True):
            logits = self._step(tensor(tokens)[None], tensor(positions)[None], columns, index)
        return logits[:n]

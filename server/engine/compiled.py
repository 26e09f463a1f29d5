"""Decode steps under torch.compile: a lone row's lean step by default on a CPU, every step with `--compile`.

Why: a decode step of a small batch computes little; run eagerly, it spends its time in the
framework (dispatching a few hundred small ops, and on a GPU launching a kernel for each), not in
reading the weights, which is the floor. Compiled, inductor fuses the elementwise work and, on a
GPU (`mode="reduce-overhead"`), the step is replayed as a CUDA graph: one launch.

`CompiledLoneRow` (on a CPU where the native lone-row step, `lone_row.py`, is off or cannot be built;
`--no-compile-single` turns it off): the step of one row
alone, the one person chatting with the server, through the lean forward (`LeanDecode.one_row`) up
to the LM head, whose product runs after the graph in the form timed for it. Inductor fuses each
decoder layer's norms, rotary, KV writes, SiLU x up and residual adds into a few C++ kernels between
its products, which take the form `LeanDecode.tune` chose for one row: split products become
inductor's own vectorised loops, F.linear a call to MKL. The step runs about 1.2x the eager lean
step and reaches the weight-read floor's neighbourhood (docs/internals/decode-profile.md). Its
shapes are fixed but for the row's first column and key count, two ints made symbolic
(`dynamic_sources`), so one graph serves every slot and length and start-up compiles it once: about
40 s on the 2-core CPU, about 10 s when inductor's on-disk cache (under the server's cache
directory) already holds it. The step skips dynamo's guards: about 400 tensors are read from the
model and the cache at each call, and checking them cost about 1 ms a step. That is sound because
one call site feeds it: one row, int64 tensors on the model's device, in inference mode, with the
pools and weights it was compiled on (both fixed for the process). `warm_up` checks the compiled
step against the eager one at a second slot and length, and runs eagerly, with a warning, if it
differs or cannot be compiled (no C++ compiler, say).

`CompiledDecode` (`--compile`, `REFT_COMPILE`): every decode step, through transformers' forward
over the engine's KV cache, with attention as `attention.indexed_decode` (index tensors, not a
Python layout). Shapes are the only thing that changes between steps: the batch is padded up to a
bucket (padding rows write and read a scratch slot of their own) and the keys up to a power of
two, and both sizes are symbolic, so dynamo compiles once for one row and once for more (it
specialises size 1), during `warm_up()` at start-up, and never again as rows join and leave. A GPU
records one CUDA graph per (bucket, keys) pair it meets: a small fixed set.

Not captured: prefill (it carries the interventions, a per-step plan of Python objects, and its
shapes vary widely; it stays eager). The decoder layers' intervention hooks run inside the traced
forward but return at once without a plan, so they add nothing to the graph.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch._dynamo.utils import counters
from torch._inductor.cpp_builder import get_cpp_compiler  # underscored, but torch is pinned

from server.engine.attention import DecodeIndex
from server.engine.kv_cache import KVCache, Slot
from server.engine.lean_decode import LeanDecode

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MIN_KEYS = 16  # never 1: dynamo would specialise a size-1 key dimension into a graph of its own

# `LeanDecode.one_row`'s ints that vary from step to step: symbolic in the graph, so it never specialises on them.
LONE_ROW_DYNAMIC = "L['start'],L['kv_len']"
LONE_ROW_CHECK_ABS = 1e-3  # compiled against eager logits at warm-up: float rounding is ~1e-5, a wrong slot is O(1)

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


class CompiledLoneRow:
    """The decode step of one row alone (`LeanDecode.one_row`) through one compiled graph."""

    def __init__(self, lean: LeanDecode, cache: KVCache) -> None:
        self.lean, self.cache = lean, cache
        # Guards are skipped, so nothing tells one instance's graph from another's, and dynamo keeps compiled
        # code per code object: a second runner in the process (other pools, other weights) would run the first
        # one's graph. A copy of `_forward`'s code gives each instance its own.
        forward = CompiledLoneRow._forward
        own = types.FunctionType(forward.__code__.replace(), forward.__globals__, forward.__name__)
        self._step = torch.compile(types.MethodType(own, self), fullgraph=True, dynamic=False,
                                   options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})

    def _forward(self, ids: Tensor, positions: Tensor, columns: Tensor, start: int, kv_len: int) -> Tensor:
        return self.lean.one_row(self.cache, ids, positions, columns, start, kv_len)

    @torch.inference_mode()
    def warm_up(self) -> bool:
        """Compile now and check the result; False (and a warning) if the step must run eagerly instead.

        The trace runs at the second of two fresh slots and at position 2, so neither int is 0 or 1, values
        dynamo would specialise on; the check then runs at the first slot, at another position."""
        try:  # before tracing, which takes most of the compile time: inductor's CPU kernels need a C++ compiler
            get_cpp_compiler()
        except Exception as exc:  # noqa: BLE001 - inductor's InvalidCxxCompiler, or whatever its probe raises
            log.warning("no C++ compiler for torch.compile (%s); the lone-row decode step runs eagerly", exc)
            return False
        start = time.perf_counter()
        slots = [self.cache.allocate(8), self.cache.allocate(8)]
        try:
            for slot in slots:
                self.cache.writing(slot, 8)
            self(3, 2, slots[1])
            compiled = self(5, 6, slots[0])
            eager = self.lean.one_row_logits(self.cache, 5, 6, slots[0])
            error = (compiled - eager).abs().max().item()
            if not error <= LONE_ROW_CHECK_ABS:
                log.warning("the compiled lone-row decode step differs from the eager one by %.3g; decoding eagerly",
                            error)
                return False
        except Exception:  # noqa: BLE001 - any failure to compile or run it (a compiler error, say) leaves the eager step
            log.warning("could not compile the lone-row decode step; decoding eagerly", exc_info=True)
            return False
        finally:
            for slot in slots:
                self.cache.free(slot)
        log.info("lone-row decode step compiled in %.1f s", time.perf_counter() - start)
        return True

    def __call__(self, token: int, position: int, slot: Slot) -> Tensor:
        """Next-token logits [1, V] for `token` fed at `position` of `slot`: the compiled graph's hidden state, then
        the LM head's product, eagerly in its own form (`LeanDecode.one_row`)."""
        with torch.compiler.config.patch(dynamic_sources=LONE_ROW_DYNAMIC):
            hidden = self._step(*self.lean.row_inputs(token, position, slot), slot.start, position + 1)
        return self.lean.head(hidden).float()

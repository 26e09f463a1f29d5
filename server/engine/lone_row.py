"""The decode step of one row alone, on a CPU in float32, as one call into a C++ library built at start-up.

Why: one person chatting alone sees the speed of this step, and it is the model's weights read once
(540 MB with the default model): its floor is the memory bandwidth. Through torch, even compiled
(`compiled.CompiledLoneRow`), its products are MKL's or oneDNN's one-row products, one library call
each, and the fastest of them read the weights at 18-19 GB/s on a 2-core Xeon, where a plain read
streams 23 GB/s: that, not the framework between them, kept the step behind llama.cpp's server.
`lone_row.cpp` runs the whole step (the lean forward's ops, in its order: lean_decode.py) with
products written to read at the streaming rate: 8 weight rows side by side per thread, each with
its own vector accumulators, prefetching down the rows: on that Xeon they read the default model's
weights at 27-28 GB/s, and the whole step took 20 ms against the compiled step's 26-34
(`bench/decode_profile.py`, docs/internals/decode-profile.md). Attention is the attention kernel's
own task (`decode_attention.h`). The LM head is in the step too.

What it computes is the lean forward's logits for one row, in float32; only the order of sums differs, by
float rounding (`warm_up` checks it against the eager step, `CHECK_ABS`). It takes the pools and weights it was
built on, fixed for the process; rotary's values come from the model's own rotary module, as a table of
positions computed once (`ROTARY_ROWS`, and again at twice the position whenever a row reaches past it).
Threads: OpenMP in torch's runtime, as many as torch's, as the attention kernel's.

Built for this CPU at start-up (about 1 s; `cpp_library.py`), for Llama-family models the lean
forward serves (`lean_decode.supports`), in float32, on a CPU. Without a compiler, where the build
or the check fails, or with `REFT_NATIVE_SINGLE=false`, the runner compiles the lone-row step with
torch.compile instead (`REFT_COMPILE_SINGLE`), and failing that runs it eagerly.
"""

from __future__ import annotations

import ctypes
import logging
import time
from pathlib import Path

import torch
from torch import Tensor

from server.engine import cpp_library
from server.engine.kv_cache import KVCache, Slot
from server.engine.lean_decode import LeanDecode

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lone_row.cpp")
ENTRY_POINT = "reft_lone_row"
ROTARY_ROWS = 4096  # the first table of rotary values: 2 MiB with the default model
CHECK_ABS = 1e-3  # against the eager step's logits at warm-up: float rounding is ~1e-5, a wrong slot is O(1)


class _Shape(ctypes.Structure):
    """`Shape` in lone_row.cpp."""

    _fields_ = [(name, ctypes.c_int64) for name in
                ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "capacity")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_SIGNATURE = [ctypes.POINTER(_Shape), _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr,
              ctypes.c_int]


def _layer_tensors(lean: LeanDecode) -> list[Tensor]:
    """Each layer's weights in `reft_lone_row`'s order: input norm, q/k/v, o, post-attention norm, gate/up, down."""
    return [t for layer in lean.layers for t in (layer.input_norm, layer.qkv.weight, layer.o.weight, layer.post_norm,
                                                 layer.gate_up.weight, layer.down.weight)]


class NativeLoneRow:
    """The lone-row decode step through `lone_row.cpp`: `__call__` is `LeanDecode`'s step and LM head for one row."""

    def __init__(self, library: ctypes.CDLL, lean: LeanDecode, cache: KVCache) -> None:
        self.library, self.lean, self.cache = library, lean, cache
        self.function = getattr(library, ENTRY_POINT)
        self.function.argtypes, self.function.restype = _SIGNATURE, None
        head = lean.head.weight
        intermediate = lean.layers[0].down.weight.shape[1]
        self.shape = _Shape(len(lean.layers), lean.embed.shape[1], lean.heads, lean.kv_heads, lean.head_dim,
                            intermediate, head.shape[0], cache.capacity, lean.eps, lean.scaling)
        # What the library reads, as it reads them; these references keep every tensor alive as long as the step.
        self._tensors = _layer_tensors(lean)
        self._weights = (_ptr * len(self._tensors))(*(t.data_ptr() for t in self._tensors))
        self._pools = (_ptr * (2 * len(lean.layers)))(*(p.data_ptr() for pair in zip(cache.k, cache.v, strict=True)
                                                        for p in pair))
        scratch = 2 * self.shape.hidden + (2 * lean.heads + 2 * lean.kv_heads) * lean.head_dim + 3 * intermediate
        self._scratch = torch.empty(scratch, dtype=torch.float32)
        self._cos = self._sin = torch.empty(0, lean.head_dim)

    @classmethod
    def build(cls, lean: LeanDecode, cache: KVCache, *, profile: bool = False) -> NativeLoneRow | None:
        """Build the library for this model's shape; None where it does not apply (not float32 on a CPU, weights or
        pools not contiguous) or cannot be built (a warning says which). `profile`: time each phase of the steps
        (`phase_seconds`; bench/decode_profile.py)."""
        tensors = [lean.embed, lean.final_norm, lean.head.weight, *cache.k, *cache.v, *_layer_tensors(lean)]
        if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
            return None
        group, dim = lean.heads // lean.kv_heads, lean.head_dim
        defines = (f"REFT_GROUP={group}", f"REFT_DIM={dim}", *(("PHASE_TIMERS",) if profile else ()))
        library = cpp_library.build(SOURCE, defines, "the lone-row decode step", "it runs through torch")
        return None if library is None else cls(library, lean, cache)

    def phase_seconds(self) -> dict[str, float]:
        """Seconds spent in each phase of the steps so far, by name, where built with `profile`."""
        first = ctypes.c_char.in_dll(self.library, "reft_phase_names")
        names = ctypes.cast(ctypes.addressof(first), ctypes.c_char_p).value.decode().split(",")
        seconds = (ctypes.c_double * len(names)).in_dll(self.library, "reft_phase_seconds")
        return dict(zip(names, seconds, strict=True))

    @torch.inference_mode()
    def warm_up(self) -> bool:
        """Check the step against the eager one at two fresh slots; False (and a warning) if they differ."""
        start = time.perf_counter()
        slots = [self.cache.allocate(8), self.cache.allocate(8)]
        try:
            for slot in slots:
                self.cache.writing(slot, 8)
            error = 0.0
            for token, position, slot in ((3, 0, slots[1]), (5, 1, slots[1]), (7, 0, slots[0]), (9, 1, slots[0])):
                eager = self.lean.one_row_logits(self.cache, token, position, slot)
                error = max(error, (self(token, position, slot) - eager).abs().max().item())
        finally:
            for slot in slots:
                self.cache.free(slot)
        if not error <= CHECK_ABS:
            log.warning("the native lone-row decode step differs from the eager one by %.3g; it runs through torch",
                        error)
            return False
        log.info("native lone-row decode step built and checked in %.1f s", time.perf_counter() - start)
        return True

    def __call__(self, token: int, position: int, slot: Slot) -> Tensor:
        """Next-token logits [1, V] for `token` fed at `position` of `slot` (the slot holds its earlier keys)."""
        if not (0 <= token < self.lean.embed.shape[0] and 0 <= position < slot.size):
            raise ValueError(f"token {token} at position {position} is outside the vocabulary or slot")
        cos, sin = self._rotary(position)
        logits = torch.empty(1, self.shape.vocab, dtype=torch.float32)
        self.function(ctypes.byref(self.shape), self._weights, self._pools, self.lean.embed.data_ptr(),
                      self.lean.final_norm.data_ptr(), self.lean.head.weight.data_ptr(), token,
                      slot.start + position, slot.start, position + 1, cos.data_ptr(), sin.data_ptr(),
                      self._scratch.data_ptr(), logits.data_ptr(), torch.get_num_threads())
        return logits

    def _rotary(self, position: int) -> tuple[Tensor, Tensor]:
        """The model's rotary values at `position` [head_dim] each, from a table of every position up to twice the
        highest asked for so far (the rotary module's own arithmetic, one position per row: the same floats as one
        position at a time)."""
        if position >= self._cos.shape[0]:
            rows = max(2 * position, ROTARY_ROWS)
            positions = torch.arange(rows, device=self.lean.embed.device)[None]
            cos, sin = self.lean.rotary(self.lean.embed[:1], positions)
            self._cos, self._sin = cos[0].contiguous(), sin[0].contiguous()
        return self._cos[position], self._sin[position]

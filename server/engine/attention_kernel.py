"""Decode attention on a CPU through a small C++ kernel (`decode_attention.cpp`), built at start-up.

Why not SDPA, as everywhere else: a decode step of many streams spends about half its time in attention,
which reads every row's float32 keys and values, and SDPA's CPU kernel took twice as long as a plain
read of them. For one query row it runs its products as matrix products three rows high (the query
heads sharing a key head), where BLAS is slow. Every other way torch offers was measured no faster
(`bench/decode_attention.py`: two `bmm`s and a softmax per key head, the attention written as sums for
torch.compile, oneDNN's matmul per row). The kernel reads each row's keys once for all the query heads
that share them, then its values once: at 16 rows of 1,024 keys it took 0.56x SDPA's time, 1.16x the
plain read (and 0.45x at 32 rows of 64 keys; 2-core AMD EPYC, the default model's shape); 0.83x SDPA's
time on a 2-core Xeon, where the loops must have the group and head size as compile-time constants:
it is built for the served model's shape (`decode_attention.cpp` says why).

What it computes is SDPA's result for one query per row, in float32, each row against exactly its own
columns [start, start + length): no mask, and no column past a row's keys is read. Only the order of its
sums differs, by float rounding (outputs within about 1e-6 of SDPA's; `check` holds it to `CHECK_ABS`).
Over bfloat16 pools (`--dtype bfloat16`) it reads the stored values, computes in float32 and rounds the
result once; SDPA's CPU kernel also rounds its probabilities to bfloat16 before the values' product, so
the two differ by about one bfloat16 rounding of the result (`CHECK_ABS_BF16`).

Built for this CPU at every start (about 0.7 s; `cpp_library.py`). Threads: as many as torch's. Without a
compiler, or if the build or the check fails, the runner keeps SDPA and says so.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from server.engine import cpp_library

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.cpp")
PROFILE_NAME = "reft::decode_attention"
CHECK_ABS = 1e-4  # against SDPA at start-up: float rounding is ~1e-6, a wrong column is O(1)
CHECK_ABS_BF16 = 2e-2  # bfloat16 results of |x| < 4 are 1/64 apart; a wrong column is O(1)
ENTRY_POINTS = {torch.float32: "reft_decode_attention", torch.bfloat16: "reft_decode_attention_bf16"}

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_SIGNATURE = [_ptr, _ptr, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, ctypes.c_float, ctypes.c_int, _ptr]


@dataclass(frozen=True)
class RowColumns:
    """Each decode row's keys: columns [starts[b], starts[b] + lengths[b]) of a layer's pool, checked once a step."""

    starts: Tensor  # [N] int64
    lengths: Tensor  # [N] int64, this step's key included
    end: int  # one past the last column any row reads

    @classmethod
    def of(cls, starts: Sequence[int], lengths: Sequence[int], device: torch.device) -> RowColumns:
        if len(starts) != len(lengths) or any(s < 0 or n < 1 for s, n in zip(starts, lengths, strict=True)):
            raise ValueError(f"decode rows need a first column >= 0 and >= 1 key each: {starts}, {lengths}")
        return cls(torch.tensor(starts, dtype=torch.int64, device=device),
                   torch.tensor(lengths, dtype=torch.int64, device=device),
                   max((s + n for s, n in zip(starts, lengths, strict=True)), default=0))


@dataclass(frozen=True)
class DecodeKernel:
    """The loaded kernel: `__call__` is one layer's decode attention for every row of a step."""

    functions: dict[torch.dtype, ctypes._CFuncPtr]  # per storage dtype of the pools (`ENTRY_POINTS`)

    @classmethod
    def build(cls, group: int = 3, dim: int = 64) -> DecodeKernel | None:
        """Compile and load the kernel, then `check` it at the model's shape (query heads per key head, head size;
        the default model's by default) in both dtypes; None (and a warning) where that fails."""
        started = time.perf_counter()
        shape = (f"REFT_GROUP={group}", f"REFT_DIM={dim}")  # the loops compiled for this shape
        loaded = cpp_library.build(SOURCE, shape, "the decode attention kernel", "decode attention runs through SDPA")
        if loaded is None:
            return None
        functions = {dtype: getattr(loaded, name) for dtype, name in ENTRY_POINTS.items()}
        for function in functions.values():
            function.argtypes, function.restype = _SIGNATURE, None
        kernel = cls(functions)
        for dtype, limit in ((torch.float32, CHECK_ABS), (torch.bfloat16, CHECK_ABS_BF16)):
            error = kernel.check(dtype, group, dim)
            if not error <= limit:
                log.warning("the decode attention kernel differs from SDPA by %.3g in %s; decode attention runs "
                            "through SDPA", error, dtype)
                return None
        log.info("decode attention kernel built and checked in %.1f s", time.perf_counter() - started)
        return kernel

    def __call__(self, query: Tensor, key: Tensor, value: Tensor, columns: RowColumns, scaling: float) -> Tensor:
        """query [1, heads, N, dim] (row b's query at index b); key, value: a layer's pools [kv_heads, capacity, dim];
        `columns`: each row's. Returns [1, N, heads, dim], as `attention.attention` does."""
        # The kernel trusts these (a wrong dtype, stride or column reads the wrong memory): checked at each call.
        if not (key.dtype == value.dtype == query.dtype and key.dtype in self.functions and key.is_contiguous()
                and value.is_contiguous() and key.shape == value.shape and key.shape[2] == query.shape[3]
                and query.shape[1] % key.shape[0] == 0 and columns.starts.numel() == query.shape[2]
                and columns.end <= key.shape[1]):
            raise ValueError("the decode attention kernel needs float32 or bfloat16 contiguous pools holding every "
                             "row's columns and a query of their dtype, one row per row of columns")
        if torch.autograd._profiler_enabled():  # named for bench/decode_profile.py; a ctypes call is no torch op
            with torch.profiler.record_function(PROFILE_NAME):
                return self._run(query, key, value, columns, scaling)
        return self._run(query, key, value, columns, scaling)

    def _run(self, query: Tensor, key: Tensor, value: Tensor, columns: RowColumns, scaling: float) -> Tensor:
        kv_heads, capacity, dim = key.shape
        heads, rows = query.shape[1], query.shape[2]
        q = query[0].transpose(0, 1).contiguous()  # [N, heads, dim] = [N, kv_heads, group, dim]
        out = torch.empty_like(q)
        self.functions[key.dtype](q.data_ptr(), key.data_ptr(), value.data_ptr(), capacity,
                                  columns.starts.data_ptr(), columns.lengths.data_ptr(), rows, kv_heads,
                                  heads // kv_heads, dim, scaling, torch.get_num_threads(), out.data_ptr())
        return out.unsqueeze(0)

    def check(self, dtype: torch.dtype = torch.float32, group: int = 3, dim: int = 64) -> float:
        """Largest difference from SDPA (in float32, over the same stored values) over rows of 1 to 300 keys in a
        pool of `dtype` whose other columns hold NaN, `group` query heads per key head of `dim` values."""
        gen = torch.Generator().manual_seed(0)
        kv_heads, capacity = 3, 1024
        key, value = (torch.full((kv_heads, capacity, dim), float("nan"), dtype=dtype) for _ in range(2))
        starts, lengths = [5, 400, 700], [1, 300, 77]
        query = torch.randn(1, kv_heads * group, len(starts), dim, generator=gen).to(dtype)
        error = 0.0
        for s, n in zip(starts, lengths, strict=True):
            key[:, s : s + n] = torch.randn(kv_heads, n, dim, generator=gen).to(dtype)
            value[:, s : s + n] = torch.randn(kv_heads, n, dim, generator=gen).to(dtype)
        with torch.inference_mode():
            got = self(query, key, value, RowColumns.of(starts, lengths, key.device), dim**-0.5).float()
            for b, (s, n) in enumerate(zip(starts, lengths, strict=True)):
                q = query[:, :, b : b + 1].reshape(1, kv_heads, group, dim).float()
                want = torch.nn.functional.scaled_dot_product_attention(
                    q, key[None, :, s : s + n].float(), value[None, :, s : s + n].float(), scale=dim**-0.5)
                error = max(error, (got[0, b] - want.reshape(-1, dim)).abs().max().item())
        return error

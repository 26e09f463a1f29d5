"""Products of a decode step of many streams, on a CPU in float32, through a C++ library built at start-up.

Why: a decode step of many streams is, above all, each layer's products of a few dozen rows against
weights read once from memory (540 MB with the default model), and the fastest of torch's forms,
oneDNN's matmul over its own packed copy of the weight (`lean_decode.packed_weight`), ran them at
110-140 GFLOPS at 32 rows on a 2-core Xeon: neither as fast as the cores multiply (220 GFLOPS on
large products) nor as fast as the memory streams (the weights at 23 GB/s would take 23 ms a step,
oneDNN's products took 63-75). `panel_product.cpp` packs each weight in panels of output columns, computes each
block of rows as one tile of register accumulators, and streams the weights evenly by prefetching the
next panel while the current one is computed: 0.64-0.78x oneDNN's time for the default model's
products at 2 to 32 rows, 0.85-0.92x at 64 to 128 (`bench/matvec.py`; `bench/many_streams.py` times the
whole step both ways). Past that oneDNN's and MKL's products win (prefill chunks, where the tiles re-read
the rows too often), so the copy replaces oneDNN's packed copy rather than adding to it, and
`lean_decode.Product` takes it for steps of up to `PANEL_ROWS` rows.

What it computes is F.linear's result; only the order of the sums differs, by float rounding: each output is one
sum over the inputs in order, the same for any number of rows. `PanelLibrary.build` checks it against F.linear at
odd shapes before any product uses it (`CHECK_ABS`). Threads: OpenMP in torch's runtime, as many as torch's.

Built for this CPU once per process (about 0.5 s; `cpp_library.py`). Without a compiler, where the build or the
check fails, or with `REFT_PANEL_PRODUCTS=false`, the packed copies are oneDNN's, as before.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from server.engine import cpp_library

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("panel_product.cpp")
PROFILE_NAME = "reft::panel_product"
CHECK_ABS = 1e-4  # against F.linear at start-up, on products of about unit size: rounding is ~1e-6
CHECK_SHAPES = ((1, 37, 5), (5, 64, 40), (13, 130, 97), (40, 576, 960))  # rows, in, out: every tile and tail

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_SIGNATURE = [_ptr, _i64, _i64, _ptr, _i64, _ptr, ctypes.c_int]


@dataclass(frozen=True)
class PanelWeight:
    """A weight [out, in] packed for `reft_panel_product`: `__call__(x)` is F.linear(x, weight)."""

    function: ctypes._CFuncPtr
    panels: Tensor  # [ceil(out / width), in, width], zeros past `out`
    out: int

    def __call__(self, x: Tensor) -> Tensor:
        """x [rows, in], float32 on a CPU (the library reads it as such: checked here) -> [rows, out]."""
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != self.panels.shape[1]:
            raise ValueError(f"the panel products take float32 CPU rows of {self.panels.shape[1]} inputs, "
                             f"not {x.dtype} {tuple(x.shape)} on {x.device}")
        if torch.autograd._profiler_enabled():  # named for bench/decode_profile.py; a ctypes call is no torch op
            with torch.profiler.record_function(PROFILE_NAME):
                return self._run(x.contiguous())
        return self._run(x.contiguous())

    def _run(self, x: Tensor) -> Tensor:
        y = torch.empty(x.shape[0], self.out, dtype=x.dtype)
        self.function(x.data_ptr(), x.shape[0], x.shape[1], self.panels.data_ptr(), self.out, y.data_ptr(),
                      torch.get_num_threads())
        return y


@dataclass(frozen=True)
class PanelLibrary:
    """The loaded library: `pack` turns a float32 CPU weight into a `PanelWeight`."""

    function: ctypes._CFuncPtr
    width: int  # output columns per panel: 32 with AVX-512, 16 with AVX2

    @staticmethod
    @functools.cache
    def build() -> PanelLibrary | None:
        """Compile and load the library and check it (once per process: it is built for this CPU); None, with a
        warning, where that fails."""
        started = time.perf_counter()
        loaded = cpp_library.build(SOURCE, (), "the panel products", "many-stream products run through oneDNN")
        if loaded is None:
            return None
        function = loaded.reft_panel_product
        function.argtypes, function.restype = _SIGNATURE, None
        library = PanelLibrary(function, loaded.reft_panel_width())
        error = library.check()
        if error > CHECK_ABS:
            log.warning("the panel products differ from F.linear by %.2e (more than %.0e): many-stream products run "
                        "through oneDNN", error, CHECK_ABS)
            return None
        log.info("panel products built and checked in %.1f s", time.perf_counter() - started)
        return library

    def pack(self, weight: Tensor) -> PanelWeight:
        """The panel copy of `weight` [out, in] (as many bytes, and at most `width` - 1 rows of zeros more)."""
        out, inputs = weight.shape
        count = -(-out // self.width)
        padded = torch.zeros(count * self.width, inputs, dtype=weight.dtype)
        padded[:out] = weight.detach()
        return PanelWeight(self.function, padded.view(count, self.width, inputs).transpose(1, 2).contiguous(), out)

    def check(self) -> float:
        """The largest difference from F.linear over `CHECK_SHAPES`."""
        generator = torch.Generator().manual_seed(0)
        worst = 0.0
        for rows, inputs, out in CHECK_SHAPES:
            x = torch.randn(rows, inputs, generator=generator)
            weight = torch.randn(out, inputs, generator=generator) / inputs**0.5
            worst = max(worst, (self.pack(weight)(x) - torch.nn.functional.linear(x, weight)).abs().max().item())
        return worst

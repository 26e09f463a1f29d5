"""The CPU decode attention kernel (`attention_kernel.py`): SDPA's answer for each row, from exactly its columns.

Columns outside a row's range (another row's, a freed slot's, the row's own future ones) hold NaN here:
the kernel must never read them. The reference is plain SDPA over the row's own keys, with the query
heads paired to key heads as transformers' `repeat_kv` pairs them.
"""

from __future__ import annotations

import functools
import sys

import pytest
import torch
import torch.nn.functional as F

from server.engine import attention, attention_kernel, cpp_library
from server.engine.attention_kernel import DecodeKernel, RowColumns
from server.engine.kv_cache import KVCache, Slot

CPU = torch.device("cpu")
DIM = 16


@functools.cache
def kernel_for(group: int, dim: int) -> DecodeKernel:
    """The kernel as the runner builds it for a model of this shape (its loops compiled for it)."""
    built = DecodeKernel.build(group, dim)
    assert built is not None, "the kernel did not build: the log says why (this machine has the C++ compiler)"
    return built


@pytest.fixture(scope="module")
def kernel() -> DecodeKernel:
    """Built for the default model's shape (3 query heads per key head, 64 dims): any other shape it is given runs
    through its run-time loops (`attend_any`)."""
    return kernel_for(3, 64)


# Per pool dtype, how close to float32 SDPA over the same stored values: float rounding in float32; in bfloat16, the
# kernel's result rounded once to the nearest bfloat16 (at most one unit in the last place, 2^-8 relative).
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 8e-3, "atol": 1e-3}}


def pools(kv_heads: int, tokens: int = 8192, dtype: torch.dtype = torch.float32, dim: int = DIM) -> KVCache:
    cache = KVCache(layers=1, kv_heads=kv_heads, head_dim=dim, dtype=dtype, device=CPU,
                    budget_bytes=tokens * 2 * kv_heads * dim * dtype.itemsize)
    cache.k[0].fill_(float("nan"))
    cache.v[0].fill_(float("nan"))
    return cache


def rows(cache: KVCache, lengths: list[int], heads: int, seed: int) -> tuple[list[Slot], torch.Tensor]:
    """A slot per length (reserved with room to spare), its first `length` columns random; a random query."""
    gen = torch.Generator().manual_seed(seed)
    slots = [cache.allocate(n + 5) for n in lengths]
    for slot, n in zip(slots, lengths, strict=True):
        for pool in (cache.k[0], cache.v[0]):
            pool[:, slot.start : slot.start + n] = torch.randn(cache.kv_heads, n, cache.head_dim, generator=gen)
    return slots, torch.randn(1, heads, len(lengths), cache.head_dim, generator=gen).to(cache.dtype)


def reference(cache: KVCache, slots: list[Slot], lengths: list[int], query: torch.Tensor) -> torch.Tensor:
    """SDPA per row in float32 over the stored values (bfloat16 ones widened)."""
    heads, query = query.shape[1], query.float()
    out = []
    for b, (slot, n) in enumerate(zip(slots, lengths, strict=True)):
        k, v = (pool[:, slot.start : slot.start + n].float().repeat_interleave(heads // cache.kv_heads, 0)[None]
                for pool in (cache.k[0], cache.v[0]))
        out.append(F.scaled_dot_product_attention(query[:, :, b : b + 1], k, v,
                                                  scale=cache.head_dim**-0.5)[0, :, 0])
    return torch.stack(out)[None]  # [1, rows, heads, dim]


def run(layout: attention.Layout, cache: KVCache, query: torch.Tensor) -> torch.Tensor:
    return attention.attention(torch.nn.Module(), query, cache.k[0], cache.v[0], None, scaling=cache.head_dim**-0.5,
                               **{attention.LAYOUT_KWARG: layout})[0]


def kernel_layout(kernel: DecodeKernel, slots: list[Slot], lengths: list[int]) -> attention.KernelDecode:
    return attention.KernelDecode(kernel, RowColumns.of([s.start for s in slots], lengths, CPU))


@pytest.mark.parametrize("built_for_the_shape", [False, True])  # compiled loops, or the run-time ones but at (3, 64)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [DIM, 64])
@pytest.mark.parametrize(("kv_heads", "heads"), [(3, 9), (4, 4), (1, 8)])
@pytest.mark.parametrize("lengths", [[1], [2, 1], [37, 5, 130, 1, 64], [3000, 17, 700]])
def test_each_row_gets_sdpa_over_exactly_its_own_columns(kernel, kv_heads, heads, lengths, dtype, dim,
                                                         built_for_the_shape):
    if built_for_the_shape:
        kernel = kernel_for(heads // kv_heads, dim)
    cache = pools(kv_heads, dtype=dtype, dim=dim)
    slots, query = rows(cache, lengths, heads, seed=len(lengths))
    got = run(kernel_layout(kernel, slots, lengths), cache, query)
    assert got.shape == (1, len(lengths), heads, dim) and got.dtype == dtype
    assert torch.isfinite(got).all(), "a column outside some row's range reached its output"
    torch.testing.assert_close(got.float(), reference(cache, slots, lengths, query), **TOLERANCE[dtype])


def test_bfloat16_results_are_rounded_as_torch_rounds(kernel):
    """Two equal keys: each value weighs exactly 1/2, so the float32 result is exact and its bfloat16 one is
    torch's rounding of it (to nearest, ties to even), bit for bit."""
    cache = pools(2, dtype=torch.bfloat16)
    slots, query = rows(cache, [2], 4, seed=3)
    start = slots[0].start
    cache.k[0][:, start + 1] = cache.k[0][:, start]
    got = run(kernel_layout(kernel, slots, [2]), cache, query)
    values = cache.v[0][:, start : start + 2].float()
    want = ((values[:, 0] + values[:, 1]) / 2).to(torch.bfloat16).repeat_interleave(2, 0)  # [heads, dim]
    assert torch.equal(got[0, 0], want)


def test_it_gives_what_the_grouped_sdpa_layout_gives(kernel):
    """The same step both ways the runner can lay it out: rows in one block, in another block, in a run of blocks.

    Zeros, not NaN, outside the rows: the grouped layout reads a shorter row's slot up to its group's longest row
    (behind a mask), and relies on the cache zeroing what a freed slot held (kv_cache.py)."""
    cache = pools(3, tokens=1 << 14)
    cache.k[0].zero_()
    cache.v[0].zero_()
    lengths = [40, 12, 33, 100, 600, 900]
    slots, query = rows(cache, lengths, 9, seed=7)
    assert len({s.block for s in slots}) > 1
    grouped = attention.decode_layout(slots, lengths, cache.block_tokens, CPU)
    torch.testing.assert_close(run(kernel_layout(kernel, slots, lengths), cache, query),
                               run(grouped, cache, query), rtol=1e-5, atol=1e-5)


def test_inputs_it_cannot_read_safely_are_refused(kernel):
    cache = pools(3)
    slots, query = rows(cache, [8, 9], 9, seed=1)
    columns = RowColumns.of([s.start for s in slots], [8, 9], CPU)
    key, value = cache.k[0], cache.v[0]
    past_the_pool = RowColumns.of([0, cache.capacity - 3], [8, 9], CPU)
    for bad in (
        (query, key.transpose(0, 1).contiguous().transpose(0, 1), value, columns),  # a strided pool
        (query.double(), key, value, columns),
        (query.bfloat16(), key, value, columns),  # a query of another dtype than the pools'
        (query.double(), key.double(), value.double(), columns),  # a dtype it has no entry point for
        (query[:, :, :1], key, value, columns),  # fewer queries than rows
        (query, key, value, past_the_pool),
    ):
        with pytest.raises(ValueError, match="decode attention kernel needs"):
            kernel(*bad, DIM**-0.5)
    for starts, lengths in (([-1, 5], [8, 9]), ([0, 5], [8, 0]), ([0], [8, 9])):
        with pytest.raises(ValueError, match="decode rows need"):
            RowColumns.of(starts, lengths, CPU)


def test_without_a_compiler_it_is_not_built(monkeypatch, caplog):
    def no_compiler() -> str:
        raise RuntimeError("No working C++ compiler found")

    monkeypatch.setattr(cpp_library, "get_cpp_compiler", no_compiler)
    assert DecodeKernel.build() is None
    assert "no C++ compiler for the decode attention kernel" in caplog.text


def test_loading_it_keeps_subnormal_floats(kernel):
    """Linked with -ffast-math, the library would turn on flush-to-zero for the whole process at load time: torch's
    float32 arithmetic and Python's own would then round subnormals to zero (and hypothesis refuses to run)."""
    assert kernel is not None
    tiny = sys.float_info.min
    assert tiny / 4 > 0.0
    subnormal = torch.tensor([1e-39], dtype=torch.float32)
    assert (subnormal * 0.5).item() > 0.0
    assert subnormal.item() > 0.0


@pytest.mark.parametrize("stage", ["COMPILE_FLAGS", "LINK_FLAGS"])
def test_a_failing_build_is_reported(monkeypatch, caplog, stage):
    monkeypatch.setattr(cpp_library, stage, (*getattr(cpp_library, stage), "-no-such-flag"))
    assert DecodeKernel.build() is None
    assert "could not build the decode attention kernel" in caplog.text
    assert "no-such-flag" in caplog.text  # the compiler's own message


def test_a_kernel_that_computes_something_else_is_refused(monkeypatch, tmp_path, caplog):
    """The start-up check against SDPA: here the source scales the scores twice over."""
    wrong = tmp_path / "decode_attention.cpp"
    wrong.write_text(attention_kernel.SOURCE.read_text())
    header = attention_kernel.SOURCE.with_suffix(".h").read_text()
    assert header.count("* scale;") == 2  # the compiled shapes' loops and the run-time ones
    wrong.with_suffix(".h").write_text(header.replace("* scale;", "* scale * 2.f;"))
    monkeypatch.setattr(attention_kernel, "SOURCE", wrong)
    assert DecodeKernel.build() is None
    assert "differs from SDPA" in caplog.text

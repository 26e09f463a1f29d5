"""The panel products (`panel_product.py`): many-stream decode products through a C++ library, on by default.

The library reads rows and packed weights through raw pointers, so these tests hold it to F.linear at every
tile size and tail, check that a row's result does not depend on the rows beside it, and check where the runner
takes it and where it falls back to oneDNN's packed copies.
"""

from __future__ import annotations

import logging

import pytest
import torch

from server.engine import cpp_library, lean_decode, panel_product
from server.engine.kv_cache import KVCache
from server.engine.panel_product import PanelLibrary
from server.engine.runner import ModelRunner
from server.model import BaseModel, ModelShape
from tests.test_lean_decode import tiny_llama


@pytest.fixture(scope="module")
def library() -> PanelLibrary:
    built = PanelLibrary.build()
    assert built is not None, "not built or refused: see the warning in the log"
    return built


@pytest.fixture
def rebuilt():
    """`PanelLibrary.build` run afresh (it is built once per process), and forgotten again after the test."""
    PanelLibrary.build.cache_clear()
    yield PanelLibrary.build
    PanelLibrary.build.cache_clear()


@pytest.mark.parametrize(("inputs", "out"), [(576, 960), (37, 5), (130, 97), (1536, 576)])
def test_every_row_count_equals_f_linear(library, inputs, out):
    """1 to 40 rows: one tile and every tail, then two to four balanced blocks; out not a multiple of the width."""
    weight = torch.randn(out, inputs) / inputs**0.5
    packed = library.pack(weight)
    assert packed.panels.shape == (-(-out // library.width), inputs, library.width)
    for rows in range(1, 41):
        x = torch.randn(rows, inputs)
        torch.testing.assert_close(packed(x), torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_a_rows_result_does_not_depend_on_the_rows_beside_it(library):
    """Each output is one sum over the inputs in order, whatever the tile it falls in: equal bit for bit."""
    weight = torch.randn(200, 300)
    packed = library.pack(weight)
    x = torch.randn(64, 300)
    alone = torch.cat([packed(x[i : i + 1]) for i in range(64)])
    for rows in (2, 7, 12, 13, 32, 64):
        assert torch.equal(packed(x[:rows]), alone[:rows])


def test_inputs_it_cannot_read_are_refused(library):
    weight = torch.randn(64, 32)
    packed = library.pack(weight)
    for x in (torch.randn(3, 32, dtype=torch.float64), torch.randn(3, 31), torch.randn(32)):
        with pytest.raises(ValueError, match="float32 CPU rows of 32 inputs"):
            packed(x)
    assert packed(torch.randn(0, 32)).shape == (0, 64)  # a step can have no rows of a kind
    x = torch.randn(32, 40).t()  # a view whose rows are not contiguous: copied first
    torch.testing.assert_close(packed(x), torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_products_take_the_panel_copy_instead_of_onednns(library):
    weight = torch.randn(96, 40)
    product = lean_decode.Product.of(weight, pack=True, panels=library)
    assert product.panels is not None and product.packed_bytes == weight.nbytes
    assert product.onednn is None or product.onednn is weight  # no second packed copy
    assert "panels" in product.forms
    assert [product.form(n) for n in (1, 2, 3, lean_decode.PANEL_ROWS, lean_decode.PANEL_ROWS + 1)] == [
        *(["split"] * 2 if product.blocks is not None else ["panels"] * 2), "panels", "panels",
        "onednn" if product.onednn is not None else "linear"]
    for rows in (1, 3, 17, lean_decode.PANEL_ROWS + 4):
        x = torch.randn(rows, 40)
        torch.testing.assert_close(product(x), torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-5)
    # without pack, no copy of either kind; in bfloat16, oneDNN's
    assert lean_decode.Product.of(weight, panels=library).panels is None
    assert lean_decode.Product.of(weight.to(torch.bfloat16), pack=True, panels=library).panels is None


@pytest.mark.parametrize(("pack", "panels", "expected"), [(True, True, True), (True, False, False),
                                                         (False, True, False)])
def test_a_runner_packs_in_panels_only_where_asked(library, pack, panels, expected):
    model = tiny_llama()
    cpu = torch.device("cpu")
    base = BaseModel(model, None, model.model.layers, ModelShape("llama", 32, 2), "tiny", cpu, torch.float32, 64)
    cache = KVCache.for_model(model.config, torch.float32, cpu, 1 << 20)
    runner = ModelRunner(base, cache, pack_weights=pack, panel_products=panels)
    held = [p.panels is not None for layer in runner.lean.layers for p in layer.products]
    assert set(held) == {expected} and (runner.lean.head.panels is not None) == expected


def test_a_library_that_computes_something_else_is_not_used(rebuilt, monkeypatch, caplog):
    monkeypatch.setattr(PanelLibrary, "check", lambda self: 0.5)
    with caplog.at_level(logging.WARNING, logger="server.engine.panel_product"):
        assert rebuilt() is None
    assert "differ from F.linear by 5.00e-01" in caplog.text


def test_without_a_compiler_the_products_stay_onednns(rebuilt, monkeypatch):
    monkeypatch.setattr(cpp_library, "build", lambda *args: None)
    assert rebuilt() is None
    assert panel_product.PanelLibrary.build() is None  # remembered for the process, until cleared


def test_start_up_timing_skips_onednns_product_beside_a_panel_copy(library, monkeypatch):
    """Beside a panel copy oneDNN's product reads the plain weight, which the panel products beat by 2x: not timed."""
    timed: list[set[str]] = []
    choose = lean_decode.choose_forms

    def record(default, medians):  # noqa: ANN001, ANN202 - choose_forms' signature
        timed.extend(set(at) for at in medians.values())
        return choose(default, medians)

    monkeypatch.setattr(lean_decode, "choose_forms", record)
    lean_decode.LeanDecode(tiny_llama(), pack=True, panels=library).tune()
    assert timed and all("panels" in forms and "onednn" not in forms for forms in timed)
    timed.clear()
    lean_decode.LeanDecode(tiny_llama(), pack=True).tune()
    assert timed and all("onednn" in forms for forms in timed)

"""The native lone-row decode step (`lone_row.NativeLoneRow`, on by default on a CPU in float32).

It reads the model's weights and the cache's pools through raw pointers, so these tests decode at many slots
and lengths against the eager lean step, check pyreft's greedy tokens through it, and check that the runner
falls back (to the compiled step, or the eager one) wherever it cannot be built or computes something else.
"""

from __future__ import annotations

import pytest
import torch

from server.engine import cpp_library, lone_row
from server.engine.compiled import CompiledLoneRow
from server.engine.kv_cache import KVCache
from server.engine.lone_row import NativeLoneRow
from server.engine.runner import ModelRunner, PrefillChunk
from server.model import load_base_model
from tests.test_compile_single import (
    lone_row_agrees_with_the_eager_step,
    pyreft_tokens_one_request_at_a_time,
    second_runner_agrees_with_its_eager_step,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def native():
    base = load_base_model()
    runner = ModelRunner(base, KVCache.for_model(base.model.config, base.dtype, base.device, 1 << 28),
                         native_single=True, pack_weights=True, attention_kernel=True)
    runner.warm_up()
    assert isinstance(runner.lone_row, NativeLoneRow), "not built or refused: see the warning in the log"
    return base, runner


def test_native_and_eager_agree_at_every_slot_and_length(native):
    _, runner = native
    lone_row_agrees_with_the_eager_step(runner)


def test_rotary_values_past_the_first_table_are_the_model_s(native):
    """Positions past `ROTARY_ROWS` rebuild the table: the values there are the rotary module's at that position."""
    base, runner = native
    step: NativeLoneRow = runner.lone_row
    position = lone_row.ROTARY_ROWS + 123
    cos, sin = step._rotary(position)
    want_cos, want_sin = runner.lean.rotary(runner.lean.embed[:1], torch.tensor([[position]]))
    assert torch.equal(cos, want_cos[0, 0]) and torch.equal(sin, want_sin[0, 0])
    assert step._cos.shape[0] >= 2 * position


def test_a_second_runner_reads_its_own_pools(native):
    """The step holds its runner's pool addresses: another runner, with pools of another size, has its own."""
    runner = second_runner_agrees_with_its_eager_step(native[1], native_single=True)
    assert isinstance(runner.lone_row, NativeLoneRow)


def test_pyreft_greedy_tokens_through_the_native_lone_row(native, monkeypatch):
    base, runner = native
    pyreft_tokens_one_request_at_a_time(base, runner, monkeypatch)


def test_a_token_or_position_outside_the_vocabulary_or_slot_is_refused(native):
    """The library writes the row's keys at its column: a position past the slot would write another row's."""
    base, runner = native
    slot = runner.cache.allocate(16)
    try:
        for token, position in ((-1, 3), (base.model.config.vocab_size, 3), (7, slot.size), (7, -1)):
            with pytest.raises(ValueError, match="outside the vocabulary or slot"):
                runner.lone_row(token, position, slot)
    finally:
        runner.cache.free(slot)


def test_a_step_that_computes_something_else_is_refused(native, monkeypatch, tmp_path, caplog):
    """The warm-up check against the eager step: here the library skips the last layer's MLP. The runner then
    compiles the lone-row step instead (with `compile_single`), or decodes eagerly (without)."""
    _, runner = native
    source = lone_row.SOURCE.read_text()
    assert source.count("product(w[5], act, x, hidden, inter, threads);") == 1
    wrong = tmp_path / "lone_row.cpp"
    skip_last_mlp = "if (layer == s->layers - 1) for (int64_t e = 0; e < hidden; e++) x[e] = 0;"
    wrong.write_text(source.replace("product(w[5], act, x, hidden, inter, threads);",
                                    "product(w[5], act, x, hidden, inter, threads);\n" + skip_last_mlp))
    (tmp_path / "decode_attention.h").write_text(lone_row.SOURCE.with_name("decode_attention.h").read_text())
    monkeypatch.setattr(lone_row, "SOURCE", wrong)
    used = runner.cache.used_tokens
    refused = NativeLoneRow.build(runner.lean, runner.cache)
    assert refused is not None and refused.warm_up() is False
    assert runner.cache.used_tokens == used
    assert "differs from the eager one" in caplog.text
    for compile_single, fallback in ((False, type(None)), (True, CompiledLoneRow)):
        other = ModelRunner(load_base_model(), runner.cache, native_single=True, compile_single=compile_single)
        assert isinstance(other.lone_row, NativeLoneRow)
        monkeypatch.setattr(CompiledLoneRow, "warm_up", lambda self: True)  # its compile is test_compile_single's
        other.warm_up()
        assert isinstance(other.lone_row, fallback)


def test_without_a_compiler_the_runner_compiles_the_step_instead(native, monkeypatch, caplog):
    _, runner = native

    def no_compiler() -> str:
        raise RuntimeError("No working C++ compiler found")

    monkeypatch.setattr(cpp_library, "get_cpp_compiler", no_compiler)
    assert NativeLoneRow.build(runner.lean, runner.cache) is None
    assert "no C++ compiler for the lone-row decode step" in caplog.text
    other = ModelRunner(load_base_model(), runner.cache, native_single=True, compile_single=True)
    assert isinstance(other.lone_row, CompiledLoneRow)


def test_it_is_built_only_in_float32_on_a_cpu(native):
    """bfloat16 weights (`--dtype bfloat16`): the step's arithmetic is float32 only; the runner does not build it."""
    _, runner = native
    lean = runner.lean
    kept = lean.final_norm
    lean.final_norm = kept.to(torch.bfloat16)
    try:
        assert NativeLoneRow.build(lean, runner.cache) is None
    finally:
        lean.final_norm = kept


def test_the_profiling_build_times_every_phase_of_its_steps(native):
    """bench/decode_profile.py's build: the same step, with each phase's seconds summed inside the call."""
    _, runner = native
    timed = NativeLoneRow.build(runner.lean, runner.cache, profile=True)
    assert timed is not None and timed.warm_up()
    before = timed.phase_seconds()
    slot = runner.cache.allocate(40)
    try:
        runner.prefill([PrefillChunk(list(range(100, 120)), 0, 20, slot)])
        got = timed(7, 20, slot)
        torch.testing.assert_close(got, runner.lone_row(7, 20, slot), rtol=0, atol=1e-5)
    finally:
        runner.cache.free(slot)
    after = timed.phase_seconds()
    assert list(after) == ["norms", "q/k/v product", "rotary and KV write", "attention", "o product",
                           "residual adds", "gate/up product", "SiLU x up", "down product", "LM head"]
    assert all(after[name] > before[name] for name in after)
    assert not hasattr(runner.lone_row.library, "reft_phase_seconds")  # the server's build has no timers

"""build_engine in-process: what it leaves behind besides the engine itself."""

from __future__ import annotations

import gc

import pytest

from server.bootstrap import build_engine
from server.config import Settings

pytestmark = pytest.mark.slow


def test_build_engine_freezes_what_it_loaded(tmp_path):
    gc.unfreeze()
    engine = build_engine(Settings(adapters=str(tmp_path), device="cpu", dtype="float32"))
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # the model, tokenizer and registry: never walked by the collector again
        assert engine.loop.num_running == 0
        assert engine.registry is not None and len(engine.registry) == 0
    finally:
        engine.loop.stop()
        gc.unfreeze()


@pytest.mark.parametrize("on", [True, False])
def test_the_attention_kernel_setting_reaches_the_runner(tmp_path, caplog, on):
    """On by default (`Settings.attention_kernel`): built at start-up, and said so."""
    settings = Settings(adapters=str(tmp_path), device="cpu", dtype="float32", compile_single=False,
                        packed_weights=False, **({} if on else {"attention_kernel": False}))
    with caplog.at_level("INFO", logger="server.engine.attention_kernel"):
        engine = build_engine(settings)
    try:
        assert (engine.loop.runner.kernel is not None) == on
        assert ("decode attention kernel built" in caplog.text) == on
    finally:
        engine.loop.stop()
        gc.unfreeze()


@pytest.mark.parametrize("packed", [True, False])
def test_the_packed_weights_setting_reaches_the_runner(tmp_path, caplog, packed):
    """On by default (`Settings.packed_weights`); its memory is logged, since it is the weights' bytes again."""
    settings = Settings(adapters=str(tmp_path), device="cpu", dtype="float32", compile_single=False,
                        **({} if packed else {"packed_weights": False}))
    with caplog.at_level("INFO", logger="server.bootstrap"):
        engine = build_engine(settings)
    try:
        lean = engine.loop.runner.lean
        assert lean is not None and (lean.packed_bytes > 0) == packed
        assert ("Packed weight copies" in caplog.text) == packed
    finally:
        engine.loop.stop()
        gc.unfreeze()

"""build_engine in-process: what it leaves behind besides the engine itself."""

from __future__ import annotations

import gc

from server.bootstrap import build_engine
from server.config import Settings


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

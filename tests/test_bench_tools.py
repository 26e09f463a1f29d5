"""bench/random_model.py writes a model directory the server loads (the GPU benchmark's base model)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from server.model import load_base_model
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def random_model(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "random_model.py"), *args], capture_output=True,
                          text=True, timeout=300)


def test_random_model_is_a_servable_llama(tmp_path):
    out = tmp_path / "tiny"
    done = random_model(str(out), "--shape", "tiny", "--dtype", "float32", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    base = load_base_model(str(out), device="cpu", dtype="float32")
    assert (base.shape.model_type, base.shape.hidden_size, base.shape.num_layers) == ("llama", 64, 2)
    assert base.tokenizer.chat_template and base.model.config.vocab_size >= len(base.tokenizer)
    again = random_model(str(out), "--shape", "tiny")
    assert again.returncode != 0 and "exists" in again.stderr

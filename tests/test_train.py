"""server/train.py: loss goes down, the result is a valid native adapter, R stays orthonormal."""

from __future__ import annotations

import json

import pytest
import torch

from server import adapter_file
from server.model import load_base_model
from server.train import TrainableIntervention, read_jsonl, train_adapter

EXAMPLES = [
    ("What is the capital of France?", "Arr, Paris, matey!"),
    ("How are you today?", "Shipshape, me hearty!"),
    ("What is 2 plus 2?", "Arr, four, matey!"),
]


@pytest.fixture(scope="module")
def base():
    return load_base_model(device="cpu", dtype="float32")


def _train(base, kind: str, epochs: int = 6):
    losses: list[float] = []
    adapter = train_adapter(
        base, EXAMPLES, layers=[4, 10], rank=2, positions="f1+l1", kind=kind, epochs=epochs, lr=1e-2,
        progress=False, on_epoch=lambda _e, loss: losses.append(loss),
    )
    return adapter, losses


def _orthonormal_error(R: torch.Tensor) -> float:
    return (R.T @ R - torch.eye(R.shape[1])).abs().max().item()


def test_loreft_trains_round_trips_and_stays_orthonormal(base, tmp_path):
    adapter, losses = _train(base, "loreft")
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert [iv.layer for iv in adapter.interventions] == [4, 10]
    for iv in adapter.interventions:
        assert _orthonormal_error(iv.tensors["rotate_layer"]) < 1e-4
    path = tmp_path / "a.safetensors"
    adapter_file.save(adapter, path)
    again = adapter_file.load(path, base.shape, max_rank=8)
    assert again.metadata() == adapter.metadata()
    for a, b in zip(adapter.interventions, again.interventions, strict=True):
        assert a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_second_type_direft(base):
    adapter, losses = _train(base, "direft", epochs=4)
    assert losses[-1] < losses[0]
    assert adapter.types == ["direft"]
    assert _orthonormal_error(adapter.interventions[0].tensors["rotate_layer"]) < 1e-4


@pytest.mark.parametrize("kind", ["loreft", "noreft", "consreft", "lobireft", "direft", "nodireft"])
def test_every_type_builds_tensors_the_format_accepts(base, kind):
    torch.manual_seed(0)
    module = TrainableIntervention(kind, layer=3, d=base.shape.hidden_size, r=4)
    tensors = {k: v.detach().clone() for k, v in module.current().tensors.items()}
    iv = adapter_file.make_intervention(0, kind, 3, 4, tensors, base.shape, 4, "float32")
    assert iv.type == kind


def test_unshared_prefix_suffix_doubles_the_layers(base):
    adapter = train_adapter(base, EXAMPLES[:1], layers=[2], rank=1, positions="f1+l1", share_weights=False,
                            epochs=1, progress=False)
    assert [iv.layer for iv in adapter.interventions] == [2, 2]


def test_read_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=":3:"):
        read_jsonl(path)
    path.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    assert read_jsonl(path) == [("q", "a")]


def test_bad_arguments_are_refused(base):
    with pytest.raises(ValueError, match="unknown intervention type"):
        train_adapter(base, EXAMPLES, layers=[1], rank=2, positions="f1", kind="nope", progress=False)
    with pytest.raises(ValueError, match="layers"):
        train_adapter(base, EXAMPLES, layers=[99], rank=2, positions="f1", progress=False)

"""server/train.py and `reft-serve train`: data checks with line numbers, the step-wise Trainer,
seeded reproducibility, valid native output, every intervention type trainable."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from server import adapter_file
from server.cli import app
from server.model import load_base_model
from server.registry import atomic_write
from server.tokens import chat_ids
from server.train import (
    DataError,
    TrainableIntervention,
    TrainConfig,
    Trainer,
    default_layers,
    encode,
    load_examples,
    read_records,
    records_from_rows,
    step_tokens,
    total_steps,
)

PAIRS = [
    ("What is the capital of France?", "Arr, Paris, matey!"),
    ("How are you today?", "Shipshape, me hearty!"),
    ("What is 2 plus 2?", "Arr, four, matey!"),
]


def _write_jsonl(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


def _chat_rows():
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in PAIRS]


@pytest.fixture(scope="module")
def base():
    return load_base_model(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def examples(base, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    _write_jsonl(path, _chat_rows())
    return load_examples(path, base)


def _config(**kw) -> TrainConfig:
    return TrainConfig(**{"layers": (4, 10), "rank": 2, "positions": "f1+l1", "share_weights": True, "epochs": 6,
                          "lr": 1e-2, "batch_size": 3, **kw})


# ---- data -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("lines", "message"), [
    ([], "no examples"),
    (["", "   "], "no examples"),
    ([{"prompt": "q", "completion": "a"}, "{not json"], ":2: not JSON"),
    ([{"prompt": "q", "completion": "a"}, "", {"prompt": "x"}], ":3: missing field 'completion'"),
    ([{"completion": "a"}], ":1: missing field 'prompt'"),
    ([{"prompt": "q", "completion": 3}], ":1: 'prompt' and 'completion' must be strings"),
    ([{"prompt": "q", "completion": ""}], ":1: 'prompt' and 'completion' must not be empty"),
    ([[1, 2]], ":1: expected a JSON object, got list"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], ":1: 'messages' must be a list of at least two"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}], "role 'assistant'"),
    ([{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}], ":1: messages[0] must be an object"),
])
def test_bad_data_is_refused_with_its_line_number(tmp_path, lines, message):
    path = tmp_path / "d.jsonl"
    _write_jsonl(path, lines)
    with pytest.raises(DataError, match=rf"^{path}.*{re.escape(message)}"):
        read_records(path)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot be read"):
        read_records(tmp_path / "nope.jsonl")


def test_example_longer_than_the_context_is_refused_with_its_line_number(base, tmp_path):
    path = tmp_path / "d.jsonl"
    _write_jsonl(path, [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": "word " * base.max_context}])
    with pytest.raises(DataError, match=rf"{path}:2: .* exceed the model's context of {base.max_context}"):
        load_examples(path, base)


def test_prompts_are_tokenized_as_the_server_tokenizes_them(base, tmp_path):
    path = tmp_path / "d.jsonl"
    _write_jsonl(path, [{"prompt": "<|im_start|>user\nhi<|im_end|>\n", "completion": "yo"},
                        {"prompt": "plain text", "completion": "yo"}, *_chat_rows()[:1]])
    templated, plain, chat = encode(read_records(path), base)
    tok = base.tokenizer
    assert templated.prompt_ids == tok("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert plain.prompt_ids == tok("plain text", add_special_tokens=True)["input_ids"]  # as /v1/completions does
    text = tok.apply_chat_template(_chat_rows()[0]["messages"][:1], tokenize=False, add_generation_prompt=True)
    assert chat.prompt_ids == chat_ids(tok, _chat_rows()[0]["messages"][:1])
    assert chat.prompt_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert chat.completion_ids == tok(PAIRS[0][1], add_special_tokens=False)["input_ids"] + [2]  # + EOS


# ---- the trainer ------------------------------------------------------------------------------


def test_steps_lower_the_loss_and_the_result_round_trips(base, examples, tmp_path):
    trainer = Trainer(base, examples, _config())
    assert (trainer.total_steps, trainer.steps_per_epoch) == (6, 1)
    losses = []
    while not trainer.done:
        losses.append(trainer.step())
    assert trainer.epoch == 6 and losses[-1] < losses[0]
    with pytest.raises(RuntimeError, match="finished"):
        trainer.step()
    adapter = trainer.adapter()
    assert [iv.layer for iv in adapter.interventions] == [4, 10]
    for iv in adapter.interventions:
        R = iv.tensors["rotate_layer"]
        assert (R.T @ R - torch.eye(2)).abs().max().item() < 1e-4
    path = tmp_path / "a.safetensors"
    atomic_write(path, adapter_file.to_bytes(adapter))
    again = adapter_file.load(path, base.shape, max_rank=8)
    assert again.metadata() == adapter.metadata()
    for a, b in zip(adapter.interventions, again.interventions, strict=True):
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_same_seed_same_bytes_other_seed_other_bytes(base, examples):
    def run(seed: int) -> bytes:
        trainer = Trainer(base, examples, _config(epochs=2, batch_size=2, seed=seed))
        while not trainer.done:
            trainer.step()
        return adapter_file.to_bytes(trainer.adapter())

    state = torch.random.get_rng_state()
    assert run(3) == run(3) != run(4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone


def test_minibatches_shuffle_and_count_epochs(base, examples):
    trainer = Trainer(base, examples, _config(epochs=2, batch_size=2))
    assert (trainer.steps_per_epoch, trainer.total_steps) == (2, 4)
    trainer.step()
    assert trainer.epoch == 0
    trainer.step()
    assert trainer.epoch == 1


@pytest.mark.parametrize("kind", ["loreft", "noreft", "consreft", "lobireft", "direft", "nodireft"])
def test_every_type_trains_one_step_into_a_valid_adapter(base, examples, kind):
    trainer = Trainer(base, examples, _config(kind=kind, epochs=1, layers=(3,)))
    assert torch.isfinite(torch.tensor(trainer.step()))
    assert trainer.adapter().types == [kind]


@pytest.mark.parametrize("kind", ["loreft", "noreft", "consreft", "lobireft", "direft", "nodireft"])
def test_every_type_builds_tensors_the_format_accepts(base, kind):
    torch.manual_seed(0)
    module = TrainableIntervention(kind, layer=3, d=base.shape.hidden_size, r=4)
    tensors = {k: v.detach().clone() for k, v in module.current().tensors.items()}
    assert adapter_file.make_intervention(0, kind, 3, 4, tensors, base.shape, 4, "float32").type == kind


def test_unshared_prefix_suffix_doubles_the_layers(base, examples):
    trainer = Trainer(base, examples[:1], _config(layers=(2,), rank=1, share_weights=False, epochs=1))
    trainer.step()
    assert [iv.layer for iv in trainer.adapter().interventions] == [2, 2]


def test_default_layers():
    assert default_layers(30) == [4, 10]
    assert default_layers(2) == [0]


@pytest.mark.parametrize(("kw", "message"), [
    ({"kind": "nope"}, "unknown intervention type"),
    ({"layers": (99,)}, "layers"),
    ({"rank": 0}, "rank 0"),
    ({"epochs": 0}, "epochs"),
    ({"positions": "x3"}, "positions"),
])
def test_bad_settings_are_refused(base, examples, kw, message):
    with pytest.raises(ValueError, match=message):
        Trainer(base, examples, _config(**kw))


def test_no_examples_is_refused(base):
    with pytest.raises(ValueError, match="no training examples"):
        Trainer(base, [], _config())


# ---- gradient accumulation ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A randomly initialised two-layer Llama (bench/random_model.py's "tiny"): the sums checked below do not
    depend on the weights, and its steps take milliseconds."""
    out = tmp_path_factory.mktemp("tiny") / "model"
    subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / "random_model.py"), str(out),
                    "--shape", "tiny", "--dtype", "float32", "--device", "cpu"], check=True, capture_output=True)
    return load_base_model(str(out), device="cpu", dtype="float32")


def _uneven_examples(base):
    rows = [{"prompt": "q " * (3 + 5 * i), "completion": "a " * (1 + 3 * (i % 3))} for i in range(7)]
    return encode(records_from_rows(rows), base)


@pytest.mark.parametrize(("kind", "max_tokens"), [("loreft", 1), ("consreft", 40)])
def test_micro_steps_accumulate_to_the_whole_step(tiny, kind, max_tokens):
    examples = _uneven_examples(tiny)
    config = TrainConfig(kind=kind, layers=(0, 1), rank=2, positions="f1+l1", epochs=2, batch_size=4, lr=0.05)
    whole, parts = Trainer(tiny, examples, config), Trainer(tiny, examples, config)
    assert whole.total_steps == 4  # batches of 4 and 3 examples, twice
    for _ in range(whole.total_steps):
        expected = whole.step()
        micro = [parts.accumulate(max_tokens)]
        while micro[-1].loss is None:
            micro.append(parts.accumulate(max_tokens))
        assert len(micro) > 1 and all(m.tokens <= max_tokens for m in micro if max_tokens > 1)
        assert micro[-1].loss == pytest.approx(expected, rel=1e-5)
        assert parts.steps_done == whole.steps_done
        for a, b in zip(whole.params, parts.params, strict=True):
            torch.testing.assert_close(b.grad, a.grad)  # the step's (clipped) gradients, summed in another order
            # AdamW divides each gradient by its own running magnitude, which magnifies float rounding
            torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5)
    assert whole.done and parts.done


def test_step_after_micro_steps_finishes_the_batch(tiny):
    examples = _uneven_examples(tiny)
    config = TrainConfig(layers=(1,), rank=1, positions="l1", epochs=1, batch_size=7)
    whole, parts = Trainer(tiny, examples, config), Trainer(tiny, examples, config)
    assert parts.accumulate(1).loss is None and parts.steps_done == 0
    assert parts.step() == pytest.approx(whole.step(), rel=1e-5) and parts.done


def test_the_bounds_of_a_run_are_known_before_it_starts(tiny):
    examples = _uneven_examples(tiny)
    lengths = sorted((len(e.prompt_ids) + len(e.completion_ids) for e in examples), reverse=True)
    assert step_tokens(examples, 3) == sum(lengths[:3]) and step_tokens(examples, 99) == sum(lengths)
    for epochs, batch in ((1, 1), (3, 4), (2, 7), (5, 100)):
        config = TrainConfig(layers=(1,), rank=1, positions="l1", epochs=epochs, batch_size=batch)
        assert total_steps(len(examples), config) == Trainer(tiny, examples, config).total_steps


# ---- the command ------------------------------------------------------------------------------


def test_cli_trains_and_writes_a_loadable_adapter(base, tmp_path):
    data, out = tmp_path / "d.jsonl", tmp_path / "sub" / "a.safetensors"
    _write_jsonl(data, _chat_rows()[:2])
    result = CliRunner().invoke(app, ["train", str(data), str(out), "--type", "direft", "--layers", "3",
                                      "--positions", "l1", "--rank", "2", "--epochs", "1", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 1 x direft on layers 3, rank 2, positions l1" in result.output
    adapter = adapter_file.load(out, base.shape, max_rank=8)
    assert adapter.types == ["direft"] and str(adapter.positions) == "l1"
    assert not [p for p in out.parent.iterdir() if p != out]  # the temporary file is gone


@pytest.mark.parametrize(("lines", "message"), [
    ([], "no examples"),
    ([{"prompt": "q", "completion": "a"}, "nope"], "d.jsonl:2: not JSON"),
])
def test_cli_refuses_bad_data_and_writes_nothing(tmp_path, lines, message):
    data, out = tmp_path / "d.jsonl", tmp_path / "a.safetensors"
    _write_jsonl(data, lines)
    result = CliRunner().invoke(app, ["train", str(data), str(out)])
    assert result.exit_code == 1 and message in result.output and not out.exists()


def test_cli_refuses_bad_layers(tmp_path):
    data = tmp_path / "d.jsonl"
    _write_jsonl(data, _chat_rows())
    result = CliRunner().invoke(app, ["train", str(data), str(tmp_path / "a.safetensors"), "--layers", "4,x"])
    assert result.exit_code == 2 and "comma-separated layer numbers" in result.output

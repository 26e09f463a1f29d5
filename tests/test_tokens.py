"""Tokenisation rules shared by serving and training: a trained completion ends with an id the server stops at."""

from __future__ import annotations

import pytest
from transformers import GenerationConfig

from server import tokens
from server.model import BaseModel, load_base_model
from server.train import TrainConfig, Trainer, encode, records_from_rows

pytestmark = pytest.mark.slow  # every test here reads the default model's tokenizer and generation config

ENDOFTEXT, IM_START, IM_END = 0, 1, 2  # SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>
CHAT = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}
TEXT = {"prompt": "Say hi:", "completion": " hi"}


@pytest.fixture(scope="module")
def base() -> BaseModel:
    return load_base_model()


def generation_config(base: BaseModel, monkeypatch: pytest.MonkeyPatch, **kw: object) -> None:
    monkeypatch.setattr(base.model, "generation_config", GenerationConfig(**kw))


def test_chat_completions_end_as_the_template_ends_a_turn(base, monkeypatch):
    """Llama 3.1's generation config lists <|end_of_text|> before <|eot_id|>, the token its chat template closes
    an answer with: an answer trained to end with the first would end unlike every answer the model knows."""
    generation_config(base, monkeypatch, eos_token_id=[ENDOFTEXT, IM_END])
    chat, text = encode(records_from_rows([CHAT, TEXT]), base)
    assert chat.completion_ids[-1] == IM_END
    assert text.completion_ids[-1] == ENDOFTEXT


def test_without_a_generation_config_eos_training_ends_where_serving_stops(base, monkeypatch):
    """Serving falls back to the tokenizer's EOS when the generation config names none; training must too."""
    generation_config(base, monkeypatch)
    chat, text = encode(records_from_rows([CHAT, TEXT]), base)
    assert chat.completion_ids[-1] == IM_END
    assert text.completion_ids[-1] == base.tokenizer.eos_token_id


@pytest.mark.parametrize("eos", [None, IM_END, [ENDOFTEXT, IM_END], [IM_END, ENDOFTEXT]])
def test_serving_stops_at_every_id_training_ends_a_completion_with(base, monkeypatch, eos):
    generation_config(base, monkeypatch, eos_token_id=eos)
    stops = tokens.stop_ids(base.tokenizer, base.model.generation_config)
    examples = encode(records_from_rows([CHAT, TEXT]), base)
    assert {e.completion_ids[-1] for e in examples} <= set(stops)
    assert Trainer(base, examples, TrainConfig(epochs=1)).pad in stops


def test_smollm2_stops_at_im_end_only(base):
    """The served model's own configuration: one EOS, <|im_end|>, which also closes a chat turn."""
    assert tokens.eos_ids(base.tokenizer, base.model.generation_config) == [IM_END]
    assert tokens.turn_end_id(base.tokenizer) == IM_END
    assert tokens.stop_ids(base.tokenizer, base.model.generation_config) == [IM_END]


def test_a_bos_the_text_carries_is_not_doubled(base):
    tok = base.tokenizer
    plain = tokens.text_ids(tok, "Hi")
    assert tokens.text_ids(tok, tok.bos_token + "Hi") == plain
    assert plain == tok("Hi", add_special_tokens=True)["input_ids"]

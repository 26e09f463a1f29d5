"""Request models turn themselves into the engine's SamplingParams; each bound is declared once (no server)."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from server.api.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest
from server.api.serving import Limits, ServingError
from server.engine import bounds
from server.engine.sampling import Sampler, SamplingParams

LIMITS = Limits(max_new_tokens=256, max_context=1024, vocab_size=100)
CHAT = [{"role": "user", "content": "Hi"}]
RANGES = [bounds.TEMPERATURE, bounds.TOP_P, bounds.TOP_K, bounds.PRESENCE_PENALTY, bounds.FREQUENCY_PENALTY,
          bounds.REPETITION_PENALTY, bounds.LOGPROBS]


def just_outside(bound: bounds.Range) -> list[float]:
    values = [bound.low if bound.open_low else bound.low - 1, math.nan, math.inf]
    return values + ([bound.high + 1] if math.isfinite(bound.high) else [])


@pytest.mark.parametrize("bound", RANGES, ids=lambda b: b.name)
def test_the_api_and_the_sampler_refuse_the_same_values(bound):
    """One range per parameter: what a request may not ask for, no row may hold (repetition_penalty was
    (0, 100] over HTTP and any finite number > 0 in the sampler)."""
    sampler = Sampler(1, LIMITS.vocab_size, "cpu")
    for value in just_outside(bound):
        value = int(value) if isinstance(bound.low, int) and math.isfinite(value) else value
        with pytest.raises((ServingError, ValidationError)):
            CompletionRequest(model="base", prompt="Hi", **{bound.name: value})
        with pytest.raises(ValueError, match=bound.name):
            sampler.check(SamplingParams(**{bound.name: value}))
    inside = bound.high if math.isfinite(bound.high) else bound.low + 1
    CompletionRequest(model="base", prompt="Hi", **{bound.name: inside})
    sampler.check(SamplingParams(**{bound.name: inside}))


def test_bounds_that_were_400_stay_400_with_the_numbers():
    for extra, words in (({"presence_penalty": 2.5}, ("presence_penalty", "-2..2", "2.5")),
                         ({"repetition_penalty": 101}, ("repetition_penalty", "(0, 100]", "101")),
                         ({"logprobs": 21}, ("logprobs", "0..20", "21")), ({"n": 0}, ("n", "0")),
                         ({"prompt": ["a"] * 9, "n": 2}, ("18", "16")), ({"stop": [""]}, ("stop", "16"))):
        with pytest.raises(ServingError) as info:
            CompletionRequest(**{"model": "base", "prompt": "Hi", **extra})
        assert info.value.status == 400 and all(w in info.value.message for w in words), (extra, info.value.message)
    with pytest.raises(ServingError, match="top_logprobs must lie in 0..20"):
        ChatCompletionRequest(model="base", messages=CHAT, logprobs=True, top_logprobs=21)


def test_bounds_that_were_422_are_pydantic_constraints_in_the_schema():
    schema = CompletionRequest.model_json_schema()["properties"]
    assert schema["temperature"]["minimum"] == 0 and schema["temperature"]["maximum"] == bounds.TEMPERATURE.high
    assert schema["top_p"]["exclusiveMinimum"] == 0 and schema["top_p"]["maximum"] == 1
    assert GenerateRequest.model_json_schema()["properties"]["top_k"]["minimum"] == 0
    with pytest.raises(ValidationError):
        GenerateRequest(prompt="Hi", temperature=-1)


def test_completion_to_sampling_params():
    req = CompletionRequest(model="base", prompt="Hi", max_tokens=None, n=2, best_of=3, seed=5, stop="x",
                            stop_token_ids=[7], logit_bias={" 12 ": 1.5}, repetition_penalty=1.2, echo=True)
    params = req.to_sampling_params(LIMITS, prompt_length=1000)
    assert params == SamplingParams(
        max_new_tokens=24, temperature=1.0, seed=5, stop=("x",), stop_token_ids=(7,), logit_bias=((12, 1.5),),
        repetition_penalty=1.2, logprobs=0, prompt_logprobs=None)  # best_of ranks by logprob: 0 alternatives
    assert req.copies == 3


def test_chat_and_generate_to_sampling_params():
    chat = ChatCompletionRequest(model="base", messages=CHAT, max_tokens=9, max_completion_tokens=4, logprobs=True)
    assert chat.to_sampling_params(LIMITS, 10) == SamplingParams(max_new_tokens=4, temperature=1.0, logprobs=0)
    gen = GenerateRequest(prompt="Hi", stop=["a"], ignore_eos=True)
    assert gen.to_sampling_params(LIMITS, 10) == SamplingParams(max_new_tokens=64, stop=("a",), ignore_eos=True)


@pytest.mark.parametrize(("body", "words"), [
    ({"max_tokens": 257}, ("257", "256")),
    ({"stop_token_ids": [100]}, ("stop_token_ids", "0..99")),
    ({"logit_bias": {"100": 1}}, ("logit_bias", "0..99")),
    ({"logit_bias": {"²": 1}}, ("logit_bias",)),
])
def test_what_only_the_server_knows_is_checked_against_its_limits(body, words):
    with pytest.raises(ServingError) as info:
        CompletionRequest(model="base", prompt="Hi", **body).to_sampling_params(LIMITS, 3)
    assert info.value.status == 400 and all(w in info.value.message for w in words), info.value.message

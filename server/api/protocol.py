"""Request and response models of every endpoint: OpenAI-compatible, native, and adapters.

A generation request checks its own bounds when it is parsed and turns itself into the engine's
`SamplingParams` (`to_sampling_params`, as vLLM's protocol models do), checking there what only the
running server knows: its max_tokens, the model's context and vocabulary. Routes parse, convert, submit.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.api.serving import Limits, ServingError
from server.engine.bounds import (
    FREQUENCY_PENALTY,
    LOGPROBS,
    PRESENCE_PENALTY,
    REPETITION_PENALTY,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    Range,
)
from server.engine.sampling import SamplingParams

# Request bounds of the API alone; the sampling parameters' ranges are server/engine/bounds.py's. A value
# outside a pydantic constraint is refused with 422, one the validators below refuse (ServingError) with 400.
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 64
MAX_CHOICES = 16  # prompts x (best_of or n) per request: each choice is a row of its own in the engine
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
TOKEN_ID_DIGITS = 9
TOKEN_ID = re.compile(rf"\s*[0-9]{{1,{TOKEN_ID_DIGITS}}}\s*")  # a logit_bias key
SEED = {"ge": 0, "le": 2**63 - 1}


class ErrorBody(BaseModel):
    message: str
    type: str
    code: int | str


class ErrorResponse(BaseModel):
    error: ErrorBody


class JsonSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema."""

    model_config = ConfigDict(populate_by_name=True)

    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema", description="a JSON Schema; the output validates against it")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: free text, any JSON object, or JSON validating against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one of json (a schema), regex, choice, grammar (EBNF), json_object."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    json_: dict | str | None = Field(None, alias="json", description="a JSON Schema (an object or its JSON text)")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1, max_length=1024)
    grammar: str | None = Field(None, description="an EBNF grammar (xgrammar's dialect, root rule `root`)")
    json_object: bool | None = None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    temperature: float = Field(1.0, **TEMPERATURE.constraints(), description="0 = greedy")
    top_p: float = Field(1.0, **TOP_P.constraints())
    top_k: int = Field(0, **TOP_K.constraints(), description="extension: 0 = off")
    seed: int | None = Field(None, **SEED, description="choice i > 0 of n uses a seed derived from it")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP_STRINGS} stop strings")
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS, description="extension")
    ignore_eos: bool = Field(False, description="extension: keep generating past the EOS token")
    n: int = Field(1, description=f"independent choices per prompt (at most {MAX_CHOICES} choices in all per "
                                  "request)")
    stream: bool = False
    presence_penalty: float = Field(0.0, description=f"{PRESENCE_PENALTY}: subtracted once from each token already "
                                                     "generated")
    frequency_penalty: float = Field(0.0, description=f"{FREQUENCY_PENALTY}: subtracted per occurrence in the "
                                                      "generated tokens")
    repetition_penalty: float = Field(
        1.0, description=f"extension, {REPETITION_PENALTY}: above 1 divides positive logits (and multiplies negative "
                         "ones) of tokens in the prompt or the output")
    logit_bias: dict[str, float] | None = Field(
        None, description=f"token id (as a string) -> bias added to its logit, clamped to -100..100; at most "
                          f"{MAX_LOGIT_BIAS}")
    return_token_ids: bool = Field(
        False, description="extension (as vLLM's): also return the prompt's and the completion's token ids")
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(None, description="extension (as vLLM's)")

    @model_validator(mode="after")
    def _check_sampling(self) -> Self:
        if self.n < 1:
            raise ServingError(400, f"n must be at least 1; got {self.n}")
        _check_stops(self.stop)
        for bound, value in ((PRESENCE_PENALTY, self.presence_penalty), (FREQUENCY_PENALTY, self.frequency_penalty),
                             (REPETITION_PENALTY, self.repetition_penalty)):
            _check_range(bound, value)
        if self.logit_bias and len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ServingError(400, f"logit_bias takes at most {MAX_LOGIT_BIAS} entries; got {len(self.logit_bias)}")
        return self

    def _to_sampling_params(self, limits: Limits, prompt_length: int, max_tokens: int | None,
                            logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        return _sampling_params(
            limits, prompt_length, max_tokens, self.stop, self.stop_token_ids, self.logit_bias,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
            ignore_eos=self.ignore_eos, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )


def _check_range(bound: Range, value: float | None, name: str | None = None) -> None:
    if value is not None and value not in bound:
        raise ServingError(400, bound.refusal(value, name))


def _check_stops(stop: str | list[str] | None) -> None:
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise ServingError(400, f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")


def _check_choices(prompts: int, copies: int) -> None:
    if prompts * copies > MAX_CHOICES:
        raise ServingError(400, f"{prompts} prompts x {copies} choices is {prompts * copies}; a request may ask "
                                f"for at most {MAX_CHOICES}")


def _sampling_params(
    limits: Limits, prompt_length: int, max_tokens: int | None, stop: str | list[str] | None,
    stop_token_ids: list[int] | None, logit_bias: dict[str, float] | None, **fields: object,
) -> SamplingParams:
    """The engine's parameters of a request, checked against what only the running server knows: its token
    limit, the model's context (the default max_tokens fills it) and its vocabulary."""
    if max_tokens is None:
        max_tokens = max(1, min(limits.max_new_tokens, limits.max_context - prompt_length))
    if max_tokens > limits.max_new_tokens:
        raise ServingError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_new_tokens}")
    bad = [t for t in stop_token_ids or [] if not 0 <= t < limits.vocab_size]
    if bad:
        raise ServingError(400, f"stop_token_ids must lie in 0..{limits.vocab_size - 1}; got {bad[:5]}")
    return SamplingParams(
        max_new_tokens=max_tokens, stop=tuple([stop] if isinstance(stop, str) else stop or ()),
        stop_token_ids=tuple(stop_token_ids or ()), logit_bias=_logit_bias(logit_bias, limits.vocab_size),
        **fields,  # type: ignore[arg-type]
    )


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} → ((id, bias), ...), refusing what is not a token id of this model."""
    out = []
    for key, value in (bias or {}).items():
        # ASCII digits only: str.isdigit and int() accept other scripts' digits and "²", and int() refuses
        # more than 4,300 digits; a token id has at most TOKEN_ID_DIGITS.
        token = int(key) if TOKEN_ID.fullmatch(key) else None
        if token is None or not 0 <= token < vocab_size:
            raise ServingError(400, f"logit_bias keys must be token ids in 0..{vocab_size - 1}; "
                                    f"got {key[:32]!r}{'...' if len(key) > 32 else ''} ({len(key)} characters)")
        out.append((token, value))
    return tuple(out)


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(_Sampling):
    model: str = Field(..., description="an adapter name, or the base model's id / 'base' for no intervention")
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        ..., description="text or token ids; a list of them is several prompts, choices in order")
    max_tokens: int | None = Field(16, ge=0, description="0 generates nothing (with echo: score the prompt)")
    echo: bool = Field(False, description="return the prompt before the completion (and its logprobs)")
    logprobs: int | None = Field(
        None, description=f"{LOGPROBS}: each token's logprob and this many most likely alternatives")
    suffix: str | None = None
    best_of: int | None = Field(None, description="sample this many per prompt, return the n most likely (no stream)")
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _check_completion(self) -> Self:
        if self.suffix is not None:
            raise ServingError(400, "suffix is not supported: the base model has no fill-in-the-middle mode")
        if self.best_of is not None and self.best_of < self.n:
            raise ServingError(400, f"best_of ({self.best_of}) must be at least n ({self.n})")
        if self.stream and self.copies > self.n:
            raise ServingError(400, "best_of > n cannot stream: the best are known only once all are done")
        _check_range(LOGPROBS, self.logprobs)
        _check_choices(len(self.prompts()), self.copies)
        return self

    @property
    def copies(self) -> int:
        """Choices sampled per prompt: best_of, of which the n most likely are returned, or n."""
        return self.best_of or self.n

    def prompts(self) -> list[str | list[int]]:
        """OpenAI's prompt forms → a list of prompts (text, or token ids)."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            return list(self.prompt)
        if isinstance(self.prompt, list) and not self.prompt:
            raise ServingError(400, "the prompt is empty")
        return [self.prompt]

    def to_sampling_params(self, limits: Limits, prompt_length: int) -> SamplingParams:
        """`prompt_length`: the longest prompt's, which bounds the default max_tokens."""
        # best_of ranks its samples by their logprob, so it needs them even when the answer does not show them.
        logprobs = self.logprobs if self.logprobs is not None or self.copies == self.n else 0
        return self._to_sampling_params(limits, prompt_length, self.max_tokens, logprobs,
                                        self.logprobs if self.echo else None)


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(..., description="the arguments as JSON text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = Field(None, description="a JSON Schema of the arguments")
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolChoiceFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's earlier tool calls")
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="return each generated token's logprob")
    top_logprobs: int | None = Field(None, description=f"{LOGPROBS} most likely alternatives per token (with "
                                                        "logprobs)")
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools, none without")
    parallel_tool_calls: bool | None = Field(None, description="accepted; at most one call is made per answer")

    @model_validator(mode="after")
    def _check_chat(self) -> Self:
        if self.top_logprobs is not None and not self.logprobs:
            raise ServingError(400, "top_logprobs needs logprobs: true")
        _check_range(LOGPROBS, self.top_logprobs, "top_logprobs")
        _check_choices(1, self.n)
        return self

    def to_sampling_params(self, limits: Limits, prompt_length: int) -> SamplingParams:
        return self._to_sampling_params(limits, prompt_length, self.max_completion_tokens or self.max_tokens,
                                        (self.top_logprobs or 0) if self.logprobs else None)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="prompt tokens whose KV came from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: one entry per token; the echoed prompt's first token has no logprob (null)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None
    prompt_token_ids: list[int] | None = Field(None, description="with return_token_ids (streaming: first chunk)")
    token_ids: list[int] | None = Field(None, description="with return_token_ids (streaming: this chunk's)")


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    token_ids: list[int] | None = Field(None, description="with return_token_ids")


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = Field(None, description="with return_token_ids: the rendered chat's ids")


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    token_ids: list[int] | None = None  # with return_token_ids: this chunk's


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids: on the first chunk


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "reft-serve"
    parent: str | None = None
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str | list[str] | None = Field(
        None, description="adapter name; a list (or 'a+b') applies several in that order; null = base model")
    prompt: str | list[int] = Field(..., description="text, or token ids")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, **TEMPERATURE.constraints(), description="0 = greedy")
    top_p: float = Field(1.0, **TOP_P.constraints())
    top_k: int = Field(0, **TOP_K.constraints())
    stop: list[str] = Field(default_factory=list, description=f"up to {MAX_STOP_STRINGS} stop strings")
    stop_token_ids: list[int] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    seed: int | None = Field(None, **SEED)
    ignore_eos: bool = False
    stream: bool = False
    structured_outputs: StructuredOutputs | None = Field(None, description="constrain the output (as vLLM's)")

    @model_validator(mode="after")
    def _check_generate(self) -> Self:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ServingError(400, "the prompt is empty")
        _check_stops(self.stop)
        return self

    def to_sampling_params(self, limits: Limits, prompt_length: int) -> SamplingParams:
        return _sampling_params(limits, prompt_length, self.max_new_tokens, self.stop, self.stop_token_ids, None,
                                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                                ignore_eos=self.ignore_eos)


class GenerateUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    adapter: str | list[str] | None
    usage: GenerateUsage


class AdapterDescription(BaseModel):
    name: str
    version: int
    types: list[str]
    layers: list[int]
    rank: int
    positions: str
    share_weights: bool
    bytes: int
    sha256: str
    created: float


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterDescription]
    has_more: bool = False
    next_after: str | None = None


class Health(BaseModel):
    status: str


class TrainRequest(BaseModel):
    """A training job: the same options as `reft-serve train`, the examples inline."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="the adapter to register when training ends")
    data: list[dict] = Field(..., min_length=1, max_length=10_000,
                             description='examples: {"prompt", "completion"} or {"messages": [...]}')
    type: Literal["loreft", "noreft", "consreft", "lobireft", "direft", "nodireft"] = "loreft"
    layers: list[int] | None = Field(None, min_length=1, max_length=64, description="default: two in the lower third")
    positions: str = "f2+l2"
    share_weights: bool = False
    rank: int = Field(4, ge=1, le=256)
    epochs: int = Field(60, ge=1, le=10_000)
    lr: float = Field(4e-3, gt=0, le=1.0)
    batch_size: int = Field(10, ge=1, le=1024)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    replace: bool = Field(False, description="replace an adapter of that name when done")


class TrainJob(BaseModel):
    id: str
    name: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled", "conflict"]
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float | None = None
    error: str | None = None
    adapter: AdapterDescription | None = None
    created: float
    finished: float | None = None

"""Request and response models of every endpoint: OpenAI-compatible, native, and adapters."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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

    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="extension: 0 = off")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="choice i > 0 of n uses a seed derived from it")
    stop: str | list[str] | None = Field(None, description="up to 16 stop strings")
    stop_token_ids: list[int] | None = Field(None, max_length=64, description="extension")
    ignore_eos: bool = Field(False, description="extension: keep generating past the EOS token")
    n: int = Field(1, description="independent choices per prompt (at most 16 choices in all per request)")
    stream: bool = False
    presence_penalty: float = Field(0.0, description="-2..2: subtracted once from each token already generated")
    frequency_penalty: float = Field(0.0, description="-2..2: subtracted per occurrence in the generated tokens")
    repetition_penalty: float = Field(
        1.0, description="extension, > 0: above 1 divides positive logits (and multiplies negative ones) of tokens "
                         "in the prompt or the output")
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string) -> bias added to its logit, clamped to -100..100; at most 300")
    return_token_ids: bool = Field(
        False, description="extension (as vLLM's): also return the prompt's and the completion's token ids")
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(None, description="extension (as vLLM's)")


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(_Sampling):
    model: str = Field(..., description="an adapter name, or the base model's id / 'base' for no intervention")
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        ..., description="text or token ids; a list of them is several prompts, choices in order")
    max_tokens: int | None = Field(16, ge=0, description="0 generates nothing (with echo: score the prompt)")
    echo: bool = Field(False, description="return the prompt before the completion (and its logprobs)")
    logprobs: int | None = Field(
        None, description="0-20: each token's logprob and this many most likely alternatives")
    suffix: str | None = None
    best_of: int | None = Field(None, description="sample this many per prompt, return the n most likely (no stream)")
    stream_options: StreamOptions | None = None


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
    top_logprobs: int | None = Field(None, description="0-20 most likely alternatives per token (with logprobs)")
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools, none without")
    parallel_tool_calls: bool | None = Field(None, description="accepted; at most one call is made per answer")


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
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    ignore_eos: bool = False
    stream: bool = False
    structured_outputs: StructuredOutputs | None = Field(None, description="constrain the output (as vLLM's)")


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

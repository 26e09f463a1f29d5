"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions (HTTP only)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from server.api import tools
from server.api.dependencies import disconnect_waiter, require_api_key, require_capacity, require_serving
from server.api.logprobs import CompletionLogprobsWriter, chat_logprobs, merge
from server.api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    Usage,
)
from server.api.serving import Event, Result, Serving, ServingError, Submission
from server.api.structured import constraint_of

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503)}


def _usage(prompt: int, completion: int, cached: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def _track(request: Request, adapter: str | None, prompt_tokens: int | None) -> None:
    request.state.access = {"adapter": adapter, "prompt_tokens": prompt_tokens}


def _sse(chunks: AsyncIterator[str]) -> EventSourceResponse:
    async def with_done() -> AsyncIterator[dict]:
        try:
            async for chunk in chunks:
                yield {"data": chunk}
        except ServingError as exc:
            yield {"data": json.dumps({"error": {"message": exc.message, "type": exc.kind, "code": exc.status}})}
        yield {"data": "[DONE]"}

    return EventSourceResponse(with_done(), ping=15)


@router.get("/models", response_model=ModelList, responses=ERRORS)
def list_models(serving: Serving = Depends(require_serving)) -> ModelList:
    now = int(time.time())
    cards = [ModelCard(id=serving.model_id, created=now, root=serving.model_id)]
    cards += [
        ModelCard(id=r.name, created=int(r.created), parent=serving.model_id, root=serving.model_id)
        for r in serving.registry.list()
    ]
    return ModelList(data=cards)


@router.post("/completions", response_model=CompletionResponse, responses=ERRORS)
async def completions(
    req: CompletionRequest, request: Request, serving: Serving = Depends(require_capacity),
    until_disconnect: Callable[[], Awaitable[None]] = Depends(disconnect_waiter),
):
    prompts = req.prompts()
    name = serving.adapter_name(req.model)
    _track(request, name, None)
    with serving.admitted("completions"):
        grammar = await serving.grammar(constraint_of(req.response_format, req.structured_outputs))
        ref = await serving.resolve(name)
        ids = [await serving.encode(p) for p in prompts]
        copies = req.copies
        params = req.to_sampling_params(serving.limits, max(len(i) for i in ids))
        _track(request, name, sum(len(i) for i in ids))
        echoes = [Echo(p if isinstance(p, str) else serving.decode(i), i) if req.echo else None
                  for p, i in zip(prompts, ids, strict=True)]
    submissions = serving.fan_out(ids, params, copies, ref, "completions", until_disconnect, grammar)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse(_completion_chunks(serving, submissions, req, echoes, ids, include_usage))
    results = await serving.complete_all(submissions)
    completion_tokens = sum(r.completion_tokens for r in results)
    request.state.access["completion_tokens"] = completion_tokens
    # With echo and logprobs an answer holds up to REFT_MAX_PROMPT_LOGPROBS entries: built off the event loop.
    return await run_in_threadpool(_completion_response, serving, req, ids, echoes, results, copies)


def _completion_response(serving: Serving, req: CompletionRequest, ids: list[list[int]], echoes: list[Echo | None],
                         results: list[Result], copies: int) -> Response:
    choices = []
    for p, echo in enumerate(echoes):
        group = results[p * copies : (p + 1) * copies]
        if copies > req.n:
            group = sorted(group, key=lambda r: r.cumulative_logprob, reverse=True)[: req.n]
        for j, result in enumerate(group):
            choice = _completion_choice(serving, p * req.n + j, result, echo, req.logprobs is not None)
            if req.return_token_ids:
                choice.prompt_token_ids, choice.token_ids = ids[p], result.token_ids
            choices.append(choice)
    response = CompletionResponse(model=req.model, choices=choices,
                                  usage=_usage(sum(len(i) for i in ids), sum(r.completion_tokens for r in results),
                                               sum(r.cached_tokens for r in results[::copies])))
    return _json(response)


def _json(response: BaseModel) -> Response:
    """The response serialised here (in the caller's thread), not again by FastAPI on the event loop."""
    return Response(response.model_dump_json(), media_type="application/json")


@dataclass(frozen=True)
class Echo:
    """A prompt returned before its completion: its text (as sent, or decoded from the ids) and token ids."""

    text: str
    ids: list[int]


def _completion_choice(serving: Serving, index: int, result: Result, echo: Echo | None,
                       with_logprobs: bool) -> CompletionChoice:
    text = echo.text + result.text if echo else result.text
    logprobs = None
    if with_logprobs:
        writer = CompletionLogprobsWriter(serving.tokens)
        echoed = writer.echo(echo.text, echo.ids, result.prompt_logprobs) if echo else None
        logprobs = writer.piece(result.token_ids, result.logprobs)
        logprobs = merge(echoed, logprobs) if echoed else logprobs
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=result.finish_reason)


async def _completion_chunks(serving: Serving, submissions: list[Submission], req: CompletionRequest,
                             echoes: list[Echo | None], ids: list[list[int]],
                             include_usage: bool) -> AsyncIterator[str]:
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    writers = [CompletionLogprobsWriter(serving.tokens) for _ in submissions]
    started, given, completion_tokens = set(), set(), 0  # choices begun; choices given their prompt's ids
    cached: dict[int, int] = {}  # choice -> its prompt tokens reused from the prefix cache

    def chunk(index: int, event: Event, echo: Echo | None) -> str | None:
        text, logprobs = (echo.text + event.text if echo else event.text), None
        if req.logprobs is not None:
            echoed = writers[index].echo(echo.text, echo.ids, event.prompt_logprobs) if echo else None
            logprobs = writers[index].piece(event.token_ids, event.logprobs)
            logprobs = merge(echoed, logprobs) if echoed else logprobs
        # With return_token_ids, a token whose text is still held back (half a character) is sent at once.
        token_ids = event.token_ids if req.return_token_ids else []
        if not (text or event.finish_reason is not None or (logprobs and logprobs.tokens) or token_ids):
            return None
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=event.finish_reason)
        if req.return_token_ids:
            choice.token_ids = token_ids
            choice.prompt_token_ids = ids[index // req.n] if index not in given else None
            given.add(index)
        return CompletionResponse(id=cid, created=created, model=req.model, choices=[choice]).model_dump_json(
            exclude_none=True)

    async for index, event in serving.merged(submissions):
        echo = echoes[index // req.n] if index not in started else None  # the prompt goes before the first piece
        started.add(index)
        if event.finish_reason is not None:
            completion_tokens += event.completion_tokens
            cached[index] = event.cached_tokens
        # The piece with an echoed prompt's logprobs may be large: built off the event loop.
        data = (await run_in_threadpool(chunk, index, event, echo) if echo and req.logprobs is not None
                else chunk(index, event, echo))
        if data is not None:
            yield data
    if include_usage:
        final = CompletionResponse(id=cid, created=created, model=req.model, choices=[],
                                   usage=_usage(sum(len(i) for i in ids), completion_tokens,
                                                sum(cached.get(p * req.n, 0) for p in range(len(ids)))))
        yield final.model_dump_json()


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def chat_completions(
    req: ChatCompletionRequest, request: Request, serving: Serving = Depends(require_capacity),
    until_disconnect: Callable[[], Awaitable[None]] = Depends(disconnect_waiter),
):
    name = serving.adapter_name(req.model)
    _track(request, name, None)
    offered = tools.active(req.tools, req.tool_choice)
    call = tools.constraint(req.tools or [], req.tool_choice) if offered else None
    output = constraint_of(req.response_format, req.structured_outputs)
    if call is not None and output is not None:
        raise ServingError(400, "tool_choice required or a named function constrains the answer to a call; "
                                "it cannot be combined with response_format or structured_outputs")
    with serving.admitted("chat"):
        grammar = await serving.grammar(call or output)
        ref = await serving.resolve(name)
        messages, tool_specs = tools.render(req.messages, req.tools if offered else None,
                                            getattr(serving.tokenizer, "chat_template", None) or "")
        ids = await serving.chat_ids(messages, tool_specs)
        params = req.to_sampling_params(serving.limits, len(ids))
        _track(request, name, len(ids))
    submissions = serving.fan_out([ids], params, req.n, ref, "chat", until_disconnect, grammar)
    answer = Answer(req, offered, call is not None)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse(_chat_chunks(serving, submissions, req, ids, include_usage, answer))
    results = await serving.complete_all(submissions)
    completion_tokens = sum(r.completion_tokens for r in results)
    request.state.access["completion_tokens"] = completion_tokens
    # Up to 16 choices x max_tokens x 21 logprobs: built off the event loop.
    return await run_in_threadpool(_chat_response, serving, req, ids, results, answer)


def _chat_response(serving: Serving, req: ChatCompletionRequest, ids: list[int], results: list[Result],
                   answer: Answer) -> Response:
    return _json(ChatCompletionResponse(
        model=req.model,
        choices=[ChatChoice(index=i, message=answer.message(r.text), finish_reason=answer.finish(r),
                            logprobs=chat_logprobs(r.token_ids, r.logprobs, serving.tokens) if req.logprobs
                            else None, token_ids=r.token_ids if req.return_token_ids else None)
                 for i, r in enumerate(results)],
        usage=_usage(len(ids), sum(r.completion_tokens for r in results), results[0].cached_tokens),
        prompt_token_ids=ids if req.return_token_ids else None,
    ))


@dataclass(frozen=True)
class Answer:
    """A chat answer as the client sees it: a message, or tool calls when tools were offered and the model
    made one (always, when `call`: a tool_choice of required or a named function constrained it to one)."""

    req: ChatCompletionRequest
    offered: bool
    call: bool

    def calls(self, text: str) -> list | None:
        return tools.parse(text, self.req.tools or [], self.call) if self.offered else None

    def message(self, text: str) -> ChatMessageOut:
        calls = self.calls(text)
        return ChatMessageOut(content=None, tool_calls=calls) if calls else ChatMessageOut(content=text)

    def finish(self, result: Result) -> str | None:
        return "tool_calls" if self.calls(result.text) else result.finish_reason

    def stream(self) -> tools.StreamedAnswer | None:
        """A choice's stream of deltas when tools are offered; None for plain text, sent as it comes."""
        return tools.StreamedAnswer(self.req.tools or [], self.call) if self.offered else None


async def _chat_chunks(serving: Serving, submissions: list[Submission], req: ChatCompletionRequest,
                       ids: list[int], include_usage: bool, answer: Answer) -> AsyncIterator[str]:
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(index: int, delta: ChatDelta, finish: str | None = None, logprobs: ChatLogprobs | None = None,
              token_ids: list[int] | None = None, prompt_token_ids: list[int] | None = None) -> str:
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs,
                                 token_ids=token_ids)
        return ChatCompletionChunk(id=cid, created=created, model=req.model, choices=[choice],
                                   prompt_token_ids=prompt_token_ids).model_dump_json(exclude_none=True)

    for index in range(len(submissions)):
        yield chunk(index, ChatDelta(role="assistant", content=""),
                    token_ids=[] if req.return_token_ids else None,
                    prompt_token_ids=ids if req.return_token_ids and index == 0 else None)
    completion_tokens, cached = 0, 0
    streams = [answer.stream() for _ in submissions]
    # A token's logprobs and id go with the chunk that carries its text or, while that is held back (a call not
    # yet known to be one), with the next chunk sent; with return_token_ids, a token whose text is still held back
    # (half a character) has its id sent at once.
    waiting: list[list] = [[] for _ in submissions]
    waiting_ids: list[list[int]] = [[] for _ in submissions]

    def flush(index: int) -> tuple[ChatLogprobs | None, list[int] | None]:
        entries, token_ids = waiting[index], waiting_ids[index]
        waiting[index], waiting_ids[index] = [], []
        return (ChatLogprobs(content=entries) if req.logprobs else None), (token_ids if req.return_token_ids else None)

    async for index, event in serving.merged(submissions):
        if req.logprobs:
            waiting[index] += chat_logprobs(event.token_ids, event.logprobs, serving.tokens).content
        waiting_ids[index] += event.token_ids if req.return_token_ids else []
        if streams[index] is not None:
            deltas, finish = streams[index].feed(event.text, event.finish_reason)
        else:
            deltas = [ChatDelta(content=event.text)] if event.text or waiting[index] or waiting_ids[index] else []
            finish = event.finish_reason
        for delta in deltas:
            logprobs, token_ids = flush(index)
            yield chunk(index, delta, logprobs=logprobs, token_ids=token_ids)
        if finish is not None:
            completion_tokens += event.completion_tokens
            cached = event.cached_tokens if index == 0 else cached
            logprobs, token_ids = flush(index)
            yield chunk(index, ChatDelta(), finish, logprobs=logprobs if logprobs and logprobs.content else None,
                        token_ids=token_ids or None)
    if include_usage:
        final = ChatCompletionChunk(id=cid, created=created, model=req.model, choices=[],
                                    usage=_usage(len(ids), completion_tokens, cached))
        yield final.model_dump_json()

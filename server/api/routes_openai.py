"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions (HTTP only)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Depends, Request
from sse_starlette.sse import EventSourceResponse

from server.api.dependencies import disconnect_waiter, require_api_key, require_capacity, require_serving
from server.api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
)
from server.api.serving import Serving, ServingError, Submission

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503)}


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _refuse_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    if req.n != 1:
        raise ServingError(400, "n > 1 is not supported; send separate requests")
    if req.logprobs not in (None, False, 0):
        raise ServingError(400, "logprobs are not supported")
    if req.presence_penalty or req.frequency_penalty:
        raise ServingError(400, "presence_penalty and frequency_penalty are not supported")
    if isinstance(req, CompletionRequest):
        if req.echo or req.suffix is not None or (req.best_of not in (None, 1)):
            raise ServingError(400, "echo, suffix and best_of are not supported")


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
        for r in serving.engine.registry.list()
    ]
    return ModelList(data=cards)


@router.post("/completions", response_model=CompletionResponse, responses=ERRORS)
async def completions(
    req: CompletionRequest, request: Request, serving: Serving = Depends(require_capacity),
    until_disconnect: Callable[[], Awaitable[None]] = Depends(disconnect_waiter),
):
    _refuse_unsupported(req)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ServingError(400, "one prompt per request: batch by sending concurrent requests")
        prompt = prompt[0]
    if isinstance(prompt, list) and not prompt:
        raise ServingError(400, "the prompt is empty")
    name = serving.adapter_name(req.model)
    _track(request, name, None)
    ref = await serving.resolve(name)
    ids = await serving.encode(prompt)
    params = serving.params(
        len(ids), req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
        stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
    )
    _track(request, name, len(ids))
    if not req.stream:
        result = await serving.complete(ids, params, ref, "completions", until_disconnect)
        request.state.access["completion_tokens"] = result.completion_tokens
        return CompletionResponse(
            model=req.model, choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)],
            usage=_usage(result.prompt_tokens, result.completion_tokens),
        )
    submission = serving.submit(ids, params, ref, "completions", until_disconnect)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return _sse(_completion_chunks(submission, req.model, include_usage))


async def _completion_chunks(submission: Submission, model: str, include_usage: bool) -> AsyncIterator[str]:
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    async for event in submission.events():
        chunk = CompletionResponse(
            id=cid, created=created, model=model,
            choices=[CompletionChoice(text=event.text, finish_reason=event.finish_reason)],
        )
        if event.finish_reason is not None:
            chunk.usage = _usage(event.prompt_tokens, event.completion_tokens)
        if event.text or event.finish_reason is not None:
            yield chunk.model_dump_json(exclude_none=not include_usage)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def chat_completions(
    req: ChatCompletionRequest, request: Request, serving: Serving = Depends(require_capacity),
    until_disconnect: Callable[[], Awaitable[None]] = Depends(disconnect_waiter),
):
    _refuse_unsupported(req)
    name = serving.adapter_name(req.model)
    _track(request, name, None)
    ref = await serving.resolve(name)
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    for m in messages:
        if isinstance(m.get("content"), list):
            m["content"] = "".join(p.get("text", "") for p in m["content"] if p.get("type") == "text")
    ids = await serving.chat_ids(messages)
    params = serving.params(
        len(ids), req.max_completion_tokens or req.max_tokens, temperature=req.temperature, top_p=req.top_p,
        top_k=req.top_k, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
    )
    _track(request, name, len(ids))
    if not req.stream:
        result = await serving.complete(ids, params, ref, "chat", until_disconnect)
        request.state.access["completion_tokens"] = result.completion_tokens
        return ChatCompletionResponse(
            model=req.model,
            choices=[ChatChoice(message=ChatMessageOut(content=result.text), finish_reason=result.finish_reason)],
            usage=_usage(result.prompt_tokens, result.completion_tokens),
        )
    submission = serving.submit(ids, params, ref, "chat", until_disconnect)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return _sse(_chat_chunks(submission, req.model, include_usage))


async def _chat_chunks(submission: Submission, model: str, include_usage: bool) -> AsyncIterator[str]:
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: ChatDelta, finish: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=cid, created=created, model=model, choices=[ChatChunkChoice(delta=delta, finish_reason=finish)]
        )

    yield chunk(ChatDelta(role="assistant", content="")).model_dump_json(exclude_none=True)
    async for event in submission.events():
        if event.text:
            yield chunk(ChatDelta(content=event.text)).model_dump_json(exclude_none=True)
        if event.finish_reason is not None:
            yield chunk(ChatDelta(), event.finish_reason).model_dump_json(exclude_none=True)
            if include_usage:
                final = ChatCompletionChunk(
                    id=cid, created=created, model=model, choices=[],
                    usage=_usage(event.prompt_tokens, event.completion_tokens),
                )
                yield final.model_dump_json()

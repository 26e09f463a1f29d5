"""The native endpoint: POST /generate (HTTP only)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Depends, Request
from sse_starlette.sse import EventSourceResponse

from server.api.dependencies import disconnect_waiter, require_api_key, require_capacity
from server.api.protocol import ErrorResponse, GenerateRequest, GenerateResponse, GenerateUsage
from server.api.serving import Serving, ServingError, Submission
from server.api.structured import constraint_of

router = APIRouter(tags=["native"], dependencies=[Depends(require_api_key)])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503)}


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(
    req: GenerateRequest, request: Request, serving: Serving = Depends(require_capacity),
    until_disconnect: Callable[[], Awaitable[None]] = Depends(disconnect_waiter),
):
    """Generate with one adapter (or none). With `stream: true`, SSE events of text deltas, then `[DONE]`."""
    request.state.access = {"adapter": req.adapter}
    with serving.admitted("generate"):
        grammar = await serving.grammar(constraint_of(None, req.structured_outputs))
        ref = await serving.resolve(req.adapter)
        ids = await serving.encode(req.prompt)
        params = req.to_sampling_params(serving.limits, len(ids))
    request.state.access = {"adapter": req.adapter, "prompt_tokens": len(ids)}
    if not req.stream:
        result = await serving.complete(ids, params, ref, "generate", until_disconnect, grammar)
        request.state.access["completion_tokens"] = result.completion_tokens
        return GenerateResponse(
            text=result.text, token_ids=result.token_ids, finish_reason=result.finish_reason, adapter=req.adapter,
            usage=GenerateUsage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
        )
    submission = serving.submit(ids, params, ref, "generate", until_disconnect, grammar)
    return EventSourceResponse(_events(submission, req.adapter), ping=15)


async def _events(submission: Submission, adapter: str | list[str] | None) -> AsyncIterator[dict]:
    try:
        async for event in submission.events():
            body = {"text": event.text, "token_ids": list(event.token_ids), "finish_reason": event.finish_reason}
            if event.finish_reason is not None:
                body["adapter"] = adapter
                body["usage"] = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens}
            yield {"data": json.dumps(body)}
    except ServingError as exc:
        yield {"data": json.dumps({"error": {"message": exc.message, "type": exc.kind, "code": exc.status}})}
    yield {"data": "[DONE]"}

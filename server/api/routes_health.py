"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.dependencies import require_metrics_key
from server.api.protocol import ErrorResponse, Health

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, responses={503: {"model": ErrorResponse}})
def health(request: Request) -> JSONResponse:
    """Readiness: 200 while serving; 503 before (or if start-up failed), while draining, or once the engine died."""
    state = request.app.state.reft
    if state.serving is None:
        reason = f"start-up failed: {state.load_error}" if state.load_error else "loading"
        body = {"status": "loading" if not state.load_error else "failed",
                "error": {"message": reason, "type": "unavailable", "code": 503}}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    if state.serving.draining or not state.serving.alive:
        reason = "the server is shutting down" if state.serving.draining else "the engine thread has stopped"
        body = {"status": "unavailable", "error": {"message": reason, "type": "unavailable", "code": 503}}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/live", response_model=Health, responses={503: {"model": ErrorResponse}})
def live(request: Request) -> JSONResponse:
    """Liveness: 200 while loading, serving or draining; 503 once start-up failed or the engine thread died,
    which no amount of waiting mends, so the kubelet restarts the process."""
    state = request.app.state.reft
    if state.load_error is not None:
        reason = f"start-up failed: {state.load_error}"
    elif state.serving is not None and not state.serving.alive:
        reason = "the engine thread has stopped"
    else:
        return JSONResponse({"status": "alive"})
    return JSONResponse({"status": "failed", "error": {"message": reason, "type": "unavailable", "code": 503}},
                        status_code=503)


@router.get("/metrics", response_class=Response, responses={401: {"model": ErrorResponse}},
            dependencies=[Depends(require_metrics_key)])
def metrics(request: Request) -> Response:
    """Prometheus text format; needs `Authorization: Bearer <metrics key>` once REFT_METRICS_KEY is set."""
    return Response(generate_latest(request.app.state.reft.metrics.registry), media_type=CONTENT_TYPE_LATEST)

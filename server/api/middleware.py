"""ASGI middleware: what must be decided before FastAPI reads a body, and the access log.

Overload too: a generation request that meets a full queue is answered 429 from the headers,
so a burst past the queue costs the server almost nothing per refused request.

FastAPI reads (and for multipart, spools to a temporary file) the whole body before any
dependency runs. `RequestGate` therefore finds the route from the path and method, checks the
Host and Origin, the key the route declares and the Content-Length against the limit, and
answers 401/403/413 without
calling `receive()` once: no byte of a refused body is read, let alone written to disk, and a
client that sent only the headers gets its answer. Bodies without a length are cut off at the
limit while they stream in.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.dependencies import (
    Access,
    check_access,
    check_browser,
    endpoint_label,
    route_access,
    route_generates,
)
from server.api.errors import error_response
from server.api.serving import ServingError
from server.config import Settings

access_log = logging.getLogger("reft.access")

UPLOAD_PATH = "/v1/adapters"
MULTIPART_OVERHEAD = 64 * 1024


class RequestGate:
    """Host and Origin, authentication and size limits, decided from the headers alone.

    `routes` are the API's routes as their routers declare them (path, methods, dependencies);
    the first that matches the path and method says which key the call needs.
    """

    def __init__(self, app: ASGIApp, settings: Settings, routes: Sequence[BaseRoute]) -> None:
        self.app, self.settings = app, settings
        self.routes = [(route, route_access(route), route_generates(route)) for route in routes]

    def _route(self, scope: Scope) -> tuple[Access, bool]:
        """(access needed, whether it generates) for the route that will answer."""
        partial = Access.OPEN
        for route, access, generates in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return access, generates
            if match is Match.PARTIAL:  # path matched, method did not: a 405 follows, never a body read
                partial = max(partial, access)
        return partial, False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        access, generates = self._route(scope)
        state = scope["app"].state.reft
        try:
            check_browser(access, self.settings, headers.get(b"host", b"").decode("latin-1"),
                          origin.decode("latin-1") if (origin := headers.get(b"origin")) is not None else None)
            check_access(access, self.settings, authorization)
            if access >= Access.API and state.draining:
                raise ServingError(503, "the server is shutting down", "unavailable", {"Connection": "close"})
            if generates and state.serving is not None:  # a full queue answers 429 before the body is read
                state.serving.check_capacity(endpoint_label(scope["path"]))
        except ServingError as exc:
            return await error_response(exc.status, exc.message, exc.kind, exc.headers)(scope, receive, send)
        upload = scope["path"].rstrip("/") == UPLOAD_PATH and scope["method"] == "POST"
        limit = self.settings.max_adapter_bytes + MULTIPART_OVERHEAD if upload else self.settings.max_body_bytes
        length = headers.get(b"content-length")
        too_large = error_response(413, f"request body is over the limit of {limit} bytes")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await too_large(scope, receive, send)
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await too_large(scope, receive, send)


class _BodyTooLarge(StarletteHTTPException):
    """An HTTPException: FastAPI re-raises those from body parsing (any other exception becomes a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over the limit of {limit} bytes")


class AccessLog:
    """One JSON line per request: method, path, status, latency, adapter and tokens (never keys)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            info = scope.get("state", {}).get("access", {})
            access_log.info(json.dumps({
                "ts": round(time.time(), 3), "method": scope["method"], "path": scope["path"], "status": status,
                "latency_ms": round((time.perf_counter() - start) * 1000, 2), **info,
            }))

"""Request dependencies: readiness, and who may call what. Routes import these; nothing here imports a route.

Access is declared once per route by depending on `require_api_key`, `require_admin` or
`require_metrics_key`. The same policy (`check_access`) runs twice: in `RequestGate`, which
finds the route from the path and method and refuses before a byte of the body is read, and in
the dependency itself, so a route is never served unchecked whatever middleware is installed.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.dependencies.models import Dependant
from pydantic import SecretStr
from starlette.routing import BaseRoute

from server.api.serving import Serving, ServingError
from server.config import Settings

ENDPOINT_LABELS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/generate": "generate"}
ADMIN_DISABLED = (
    "adapter changes are disabled on a server reachable from the network without an admin key: "
    "start it with --admin-key (REFT_ADMIN_KEY) and send 'Authorization: Bearer <admin key>', "
    "or bind it to a loopback address (--host 127.0.0.1)"
)


class Access(enum.IntEnum):
    OPEN = 0
    METRICS = 1  # open unless REFT_METRICS_KEY is set
    API = 2  # the API key (or the admin key) once REFT_API_KEY is set
    ADMIN = 3  # changes to the registry: see `check_access`


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, None for anything else."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def matches(token: str | None, *keys: SecretStr | None) -> bool:
    """Constant-time comparison against every configured key (each compared, none short-circuited)."""
    if token is None:
        return False
    given = token.encode()
    results = [hmac.compare_digest(given, k.get_secret_value().encode()) for k in keys if k is not None]
    return any(results)


def _unauthorized(message: str) -> ServingError:
    return ServingError(401, message, "authentication_error", {"WWW-Authenticate": "Bearer"})


def check_access(access: Access, settings: Settings, authorization: str | None) -> None:
    """Raise the ServingError (401/403) that refuses a call needing `access`; return if it may go on.

    Admin calls need the admin key when one is set; without one they are allowed only on a
    loopback bind (then like any API call). An API key never authorises an admin call.
    """
    token = bearer_token(authorization)
    if access is Access.ADMIN:
        if settings.admin_key is not None:
            if not matches(token, settings.admin_key):
                raise _unauthorized("this call needs the admin key: 'Authorization: Bearer <admin key>'")
            return
        if not is_loopback(settings.host):
            raise ServingError(403, ADMIN_DISABLED, "permission_error")
        access = Access.API
    if access is Access.API and settings.api_key is not None and not matches(token, settings.api_key,
                                                                             settings.admin_key):
        raise _unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")
    if access is Access.METRICS and settings.metrics_key is not None and not matches(
        token, settings.metrics_key, settings.admin_key
    ):
        raise _unauthorized("/metrics needs the metrics key: 'Authorization: Bearer <metrics key>'")


def _settings(request: Request) -> Settings:
    return request.app.state.reft.settings


def require_api_key(request: Request) -> None:
    check_access(Access.API, _settings(request), request.headers.get("authorization"))


def require_admin(request: Request) -> None:
    """For every call that changes what is served: upload, delete, and any future train/load/unload."""
    check_access(Access.ADMIN, _settings(request), request.headers.get("authorization"))


def require_metrics_key(request: Request) -> None:
    check_access(Access.METRICS, _settings(request), request.headers.get("authorization"))


def require_serving(request: Request) -> Serving:
    """The Serving object once the model is loaded; 503 with Retry-After before (or if start-up failed)."""
    state = request.app.state.reft
    if state.serving is None:
        message = f"start-up failed: {state.load_error}" if state.load_error else "the model is still loading"
        raise ServingError(503, message, "unavailable", {"Retry-After": "5"})
    return state.serving


def require_capacity(request: Request) -> Serving:
    """Serving, once it has room for another request: 429/503 before tokenising or resolving anything."""
    serving = require_serving(request)
    serving.check_capacity(endpoint_label(request.url.path))
    return serving


def endpoint_label(path: str) -> str:
    """The `endpoint` label of a generation path in the metrics."""
    return ENDPOINT_LABELS.get(path.rstrip("/"), "other")


def disconnect_waiter(request: Request) -> Callable[[], Awaitable[None]]:
    """A coroutine function that returns once the client has disconnected (the body is read by then)."""

    async def until_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return until_disconnect


DECLARED: dict[Callable, Access] = {require_api_key: Access.API, require_admin: Access.ADMIN,
                                    require_metrics_key: Access.METRICS}


def _calls(route: BaseRoute) -> set[Callable]:
    """Every dependency a route runs, nested ones included."""
    calls: set[Callable] = set()
    stack: list[Dependant] = [route.dependant] if hasattr(route, "dependant") else []
    while stack:
        dependant = stack.pop()
        calls.add(dependant.call)
        stack.extend(dependant.dependencies)
    return calls


def route_access(route: BaseRoute) -> Access:
    """The strictest access a route declares through its dependencies (OPEN for docs and the like)."""
    return max((DECLARED.get(call, Access.OPEN) for call in _calls(route)), default=Access.OPEN)


def route_generates(route: BaseRoute) -> bool:
    """Whether the route submits to the engine (and so is refused with 429/503 when it has no room)."""
    return require_capacity in _calls(route)

"""Request dependencies: readiness, and who may call what. Routes import these; nothing here imports a route.

Access is declared once per route by depending on `require_api_key`, `require_admin` or
`require_metrics_key`. The same policy (`check_access`, `check_browser`) runs twice: in
`RequestGate`, which finds the route from the path and method and refuses before a byte of the
body is read, and in the dependency itself, so a route is never served unchecked whatever
middleware is installed.

Browsers are callers too. A page in the user's browser can POST a multipart form to a loopback
server without a CORS preflight, and through DNS rebinding (its own name resolving to this
server) it can read any answer. `check_browser` refuses both: a request whose `Host` names a host
this server does not answer to (rebinding always carries the attacker's name, never an IP
address), and an admin call whose `Origin` is another site's page. Clients that are not
browsers send no `Origin` and are unaffected.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

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


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host: str, settings: Settings) -> bool:
    """Whether a request's `Host` header names this server.

    localhost and IP addresses always do: a browser sends the name its page was loaded from, so
    only a name (never an address) can be a rebinding page's, and probes and scrapes (kubelet,
    Prometheus, the router) address a pod by its IP. Other names must be in `allowed_hosts`,
    which by default allows any name on a network bind (the names that reach a replica there, a
    Service's, a gateway's, are not knowable here, and every call it serves needs a key that a
    page cannot read or make the browser send) and none on a loopback bind (where the network
    position is the only credential). No Host at all is no browser's request.
    """
    if not host:
        return True
    try:
        name = (urlsplit("//" + host).hostname or "").rstrip(".")
    except ValueError:  # a malformed [IPv6] literal
        return False
    if name == "localhost" or _is_ip(name):
        return True
    if settings.allowed_hosts is None:
        return not is_loopback(settings.host)
    for pattern in (p.lower().rstrip(".") for p in settings.allowed_hosts):
        if pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


def origin_allowed(origin: str, host: str, settings: Settings) -> bool:
    """Whether a page of `origin` may make an admin call that reached this server as `host`.

    A page of this server itself (the /ui playground) is: its Origin carries the request's own
    Host, which `host_allowed` has checked. Either scheme counts, as a TLS-terminating proxy
    shows the server http while the browser's page is https.
    """
    allowed = [a.strip().lower().rstrip("/") for a in settings.allowed_origins or ()]
    origin = origin.strip().lower().rstrip("/")
    if "*" in allowed or origin in allowed:
        return True
    scheme, sep, authority = origin.partition("://")
    return bool(sep and host) and scheme in ("http", "https") and authority == host.strip().lower()


def check_browser(access: Access, settings: Settings, host: str | None, origin: str | None) -> None:
    """Raise the 403 that refuses a request with a foreign `Host`, or an admin call with a foreign `Origin`."""
    host = host or ""
    if not host_allowed(host, settings):
        names = ", ".join(settings.allowed_hosts or ()) or "none: REFT_ALLOWED_HOSTS is not set"
        raise ServingError(403, f"the Host header {host!r} is not a name of this server: it answers to localhost, "
                                f"IP addresses and the names in REFT_ALLOWED_HOSTS ({names}); set REFT_ALLOWED_HOSTS "
                                f"(--allowed-hosts) to add names, '*' for any", "permission_error")
    if access is Access.ADMIN and origin is not None and not origin_allowed(origin, host, settings):
        extra = ", ".join(settings.allowed_origins or ()) or "none: REFT_ALLOWED_ORIGINS is not set"
        raise ServingError(403, f"admin calls from pages of the Origin {origin!r} are not allowed: only from this "
                                f"server's own origin (http://{host} or https://{host}), the origins in "
                                f"REFT_ALLOWED_ORIGINS ({extra}), or without an Origin header (curl, SDKs); set "
                                f"REFT_ALLOWED_ORIGINS (--allowed-origins) to add origins", "permission_error")


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


def _check(request: Request, access: Access) -> None:
    settings, headers = _settings(request), request.headers
    check_browser(access, settings, headers.get("host"), headers.get("origin"))
    check_access(access, settings, headers.get("authorization"))


def require_api_key(request: Request) -> None:
    _check(request, Access.API)


def require_admin(request: Request) -> None:
    """For every call that changes what is served: upload, delete, and any future train/load/unload."""
    _check(request, Access.ADMIN)


def require_metrics_key(request: Request) -> None:
    _check(request, Access.METRICS)


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

"""Request dependencies: readiness and keys. Routes import these; nothing here imports a route or the app."""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from server.api.serving import Serving, ServingError
from server.config import Settings


def require_serving(request: Request) -> Serving:
    """The Serving object once the model is loaded; 503 with Retry-After before (or if start-up failed)."""
    state = request.app.state.reft
    if state.serving is None:
        message = f"start-up failed: {state.load_error}" if state.load_error else "the model is still loading"
        raise ServingError(503, message, "unavailable", {"Retry-After": "5"})
    return state.serving


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


def require_api_key(request: Request) -> None:
    settings: Settings = request.app.state.reft.settings
    token = bearer_token(request.headers.get("authorization"))
    if settings.api_key is not None and not matches(token, settings.api_key, settings.admin_key):
        raise ServingError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error")


def require_admin_key(request: Request) -> None:
    settings: Settings = request.app.state.reft.settings
    if settings.admin_key is not None:
        if not matches(bearer_token(request.headers.get("authorization")), settings.admin_key):
            raise ServingError(401, "this call needs the admin key: 'Authorization: Bearer <admin key>'",
                               "authentication_error")
    else:
        require_api_key(request)

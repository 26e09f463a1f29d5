"""The contract's error shape, shared by the app's handlers and the middleware that answers before routing."""

from __future__ import annotations

from fastapi.responses import JSONResponse

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "request_too_large", 415: "invalid_request_error", 422: "invalid_request_error",
               429: "overloaded", 499: "cancelled", 500: "server_error", 503: "unavailable"}


def error_response(status: int, message: str, kind: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind or ERROR_TYPES.get(status, "error"), "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)

"""One error shape for every failure: `{"error": {"code", "message", "param"}}`.

Validation errors name the offending field as a dotted path (`optim.learning_rate`), the same
path the job spec uses. A database that cannot be reached (or a connection it dropped) answers
503 `store_unavailable` with `Retry-After`, so clients retry. Unexpected exceptions are logged and
answered as a JSON 500, never as an HTML page or a dropped connection.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("opsd.api")

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "service_unavailable",
}


class APIError(Exception):
    """Raise from a route to answer with the standard error body."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param}}


def error_response(
    status: int, code: str, message: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message, param), status_code=status, headers=headers)


def _param_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return error_response(
                400, "invalid_json", f"request body is not valid JSON: {first['msg']}"
            )
        param = _param_of(first.get("loc", ()))
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        if first.get("type") == "missing":
            message = "required field is missing"
        elif first.get("type") == "extra_forbidden":
            message = "unknown field"
        if param:
            message = f"{param}: {message}"
        if len(errors) > 1:
            others = [p for e in errors[1:] if (p := _param_of(e.get("loc", ())))]
            if others:
                message += f" (also invalid: {', '.join(others[:10])})"
        return error_response(422, "invalid_request", message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(sa.exc.OperationalError)
    @app.exception_handler(sa.exc.InterfaceError)
    @app.exception_handler(sa.exc.TimeoutError)
    async def _store_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("store unavailable: %s", exc)
        return error_response(
            503,
            "store_unavailable",
            "the job store is unavailable; retry later",
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal server error")

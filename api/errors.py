"""One error shape for every failure: `{"error": {"code", "message", "param"}}`.

Validation errors name the offending field as a dotted path (`optim.learning_rate`), the same
path the job spec uses. A database that cannot be reached (or a connection it dropped) answers
503 `store_unavailable` with `Retry-After`, so clients retry. Unexpected exceptions are logged and
answered as a JSON 500, never as an HTML page or a dropped connection.
"""

from __future__ import annotations

import logging
import secrets
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
    """Raise from a route to answer with the standard error body (and optional headers)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers


class StoreTimeout(Exception):
    """The store did not answer within the API's store timeout (it hangs, or is far away)."""


def new_error_id() -> str:
    """An id for one system error: the answer carries it, the log line has the details."""
    return "err_" + secrets.token_hex(8)


def system_error_response(status: int, code: str, message: str) -> tuple[JSONResponse, str]:
    """A system error: a code and an id for the logs, nothing about the system itself."""
    error_id = new_error_id()
    body = error_body(code, f"{message} (error id {error_id})")
    body["error"]["id"] = error_id
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers), error_id


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param}}


def error_response(
    status: int, code: str, message: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message, param), status_code=status, headers=headers)


def _param_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc if p != "[key]"]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    # a rejected key may hold what JSON output cannot carry (an unpaired surrogate)
    return ".".join(parts).encode("utf-8", "replace").decode("utf-8") or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.param, headers=exc.headers)

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
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route that matched the path only; the
            # path may have several routes (GET /jobs and POST /jobs): list them all.
            headers["Allow"] = ", ".join(allowed_methods(request))
        return error_response(exc.status_code, code, message, headers=headers or None)

    @app.exception_handler(sa.exc.OperationalError)
    @app.exception_handler(sa.exc.InterfaceError)
    @app.exception_handler(sa.exc.TimeoutError)
    @app.exception_handler(sa.exc.DBAPIError)
    @app.exception_handler(StoreTimeout)
    async def _store_down(_: Request, exc: Exception) -> JSONResponse:
        response, error_id = system_error_response(
            503, "store_unavailable", "the job store is unavailable; retry later"
        )
        log.warning("store unavailable [%s]: %s: %s", error_id, type(exc).__name__, exc)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        response, error_id = system_error_response(500, "internal_error", "internal server error")
        log.exception("unhandled error [%s]", error_id, exc_info=exc)
        return response


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app serves at this request's path."""
    from starlette.routing import Match

    scope = dict(request.scope)
    methods: set[str] = set()
    for route in request.app.router.routes:
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            scope["method"] = method
            match, _ = route.matches(scope)
            if match == Match.FULL:
                methods.add(method)
    return sorted(methods)

"""ASGI middleware: a request body size limit answered with the standard JSON 413."""

from __future__ import annotations

import json
from typing import Any

from api.errors import error_body


class BodySizeLimit:
    """Reject bodies over `max_bytes` (by Content-Length, and by counting chunked bodies).

    `overrides` gives other limits to some `(method, path)` pairs (file uploads).
    """

    def __init__(
        self, app: Any, max_bytes: int, overrides: dict[tuple[str, str], int] | None = None
    ) -> None:
        self.app = app
        self.default_max_bytes = max_bytes
        self.overrides = dict(overrides or {})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = (scope.get("method", ""), scope.get("path", "").rstrip("/") or "/")
        await _Limited(self.app, self.overrides.get(route, self.default_max_bytes))(
            scope, receive, send
        )


class _Limited:
    """One request under one body limit."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                too_big = False
            if too_big:
                await self._reject(send)
                return
        received = 0
        rejected = False

        async def counting_receive() -> dict:
            nonlocal received, rejected
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    rejected = True
                    raise _TooLarge
            return message

        answered = False

        async def tracking_send(message: dict) -> None:
            # Once the body was cut off, whatever the app answers (FastAPI turns the failed read
            # into a 400) is replaced by one 413.
            nonlocal answered
            if rejected:
                if not answered:
                    answered = True
                    await self._reject(send)
                return
            if message["type"] == "http.response.start":
                answered = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not answered:
                answered = True
                await self._reject(send)

    async def _reject(self, send: Any) -> None:
        body = json.dumps(
            error_body("payload_too_large", f"request body exceeds {self.max_bytes} bytes")
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass

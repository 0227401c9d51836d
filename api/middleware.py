"""ASGI middleware: a request body size limit answered with the standard JSON 413, and JSON
bodies accepted whatever Content-Type the client sent (curl's `-d` says form-urlencoded)."""

from __future__ import annotations

import json
from typing import Any

from api.errors import error_body


class BodySizeLimit:
    """Reject bodies over `max_bytes` (by Content-Length, and by counting chunked bodies)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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


# Bodies of these types are never JSON documents (uploads stream through untouched).
_NEVER_JSON = (b"multipart/",)


def _is_json_type(content_type: bytes) -> bool:
    main = content_type.split(b";", 1)[0].strip().lower()
    return main == b"application/json" or (
        main.startswith(b"application/") and main.endswith(b"+json")
    )


class JsonBodyAnyContentType:
    """Treat a request body that parses as JSON as JSON, whatever its Content-Type says.

    `curl -d '{...}'` sends `application/x-www-form-urlencoded` unless told otherwise, and
    FastAPI only parses `application/json` (and `+json`) bodies as JSON: every JSON-body route
    would answer 422 "Input should be a valid dictionary" to a correct document. This middleware
    reads a request body sent without a JSON type (at most what the size limit outside it let
    through; multipart uploads are left alone), and when the whole body is valid JSON it
    forwards the request with `Content-Type: application/json`. Anything else goes on unchanged,
    so a route expecting a form still gets its form.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers") or [])
        content_type = next((v for k, v in headers if k == b"content-type"), b"")
        if _is_json_type(content_type) or content_type.lower().startswith(_NEVER_JSON):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-body
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body.strip() and _parses_as_json(body):
            headers = [(k, v) for k, v in headers if k != b"content-type"]
            headers.append((b"content-type", b"application/json"))
            scope = {**scope, "headers": headers}
        replayed = {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, _replay([replayed], receive), send)


def _parses_as_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return False
    return True


def _replay(messages: list[dict], receive: Any) -> Any:
    """A `receive` that hands out `messages` first, then defers to the real one."""
    pending = list(messages)

    async def replaying_receive() -> dict:
        if pending:
            return pending.pop(0)
        return await receive()

    return replaying_receive

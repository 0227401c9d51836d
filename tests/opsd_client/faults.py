"""A faulty network hop for the SDK's retry, idempotency and reconnection tests.

`FaultProxy` is a real HTTP server on a loopback port that forwards every request to the real
service, except the ones its plan says to spoil: answer an error status without forwarding
(a proxy or load balancer turning the request away), forward and then answer an error anyway
(the service did the work but the answer was lost), or cut an event stream after a few events
(a dropped connection). It records what it saw, so tests can check the headers the SDK sent.
Nothing here imitates the service: every answer that is not a planned fault is the service's.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-encoding",
    "host",
    "accept-encoding",
}


@dataclass
class Fault:
    """What to do to the next request matching `method` and `path` (a prefix)."""

    method: str
    path: str
    status: int | None = None  # answer this status (with the standard error body)
    forward_first: bool = False  # ...after forwarding the request to the service
    retry_after: str | None = None
    cut_after_events: int | None = None  # forward an event stream, then drop the connection


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    fault: Fault | None


@dataclass
class FaultProxy:
    upstream: str
    plan: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._http = httpx.Client(base_url=self.upstream, timeout=60)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection; streams end by closing

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self)

            def do_POST(self) -> None:
                proxy._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def requests_to(self, method: str, path: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.path.startswith(path)]

    # ------------------------------------------------------------------------------ internals
    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for index, fault in enumerate(self.plan):
                if fault.method == method and path.startswith(fault.path):
                    return self.plan.pop(index)
        return None

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("content-length") or 0)
        body = handler.rfile.read(length) if length else b""
        method, path = handler.command, handler.path
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP}
        fault = self._take_fault(method, path)
        with self._lock:
            self.seen.append(Seen(method, path.split("?")[0], dict(headers), fault))
        if fault is not None and fault.status is not None:
            if fault.forward_first:
                self._http.request(method, path, content=body, headers=headers)
            self._error(handler, fault)
            return
        request = self._http.build_request(method, path, content=body, headers=headers)
        response = self._http.send(request, stream=True)
        try:
            handler.send_response(response.status_code)
            for name, value in response.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    handler.send_header(name, value)
            handler.end_headers()
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                for chunk in response.iter_bytes():
                    handler.wfile.write(chunk)
                handler.wfile.flush()
                return
            blocks = 0
            for line in response.iter_lines():
                handler.wfile.write(line.encode() + b"\n")
                handler.wfile.flush()
                if line == "" and fault is not None and fault.cut_after_events is not None:
                    blocks += 1
                    if blocks > fault.cut_after_events:  # the first block is `retry:`
                        return  # the connection closes mid-stream, without `event: end`
        finally:
            response.close()

    def _error(self, handler: BaseHTTPRequestHandler, fault: Fault) -> None:
        status = fault.status or 503
        payload = json.dumps(
            {"error": {"code": "proxy_error", "message": f"proxy answered {status}", "param": None}}
        ).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        if fault.retry_after is not None:
            handler.send_header("Retry-After", fault.retry_after)
        handler.end_headers()
        handler.wfile.write(payload)

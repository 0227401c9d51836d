"""A small parser for `text/event-stream` (the WHATWG server-sent events format).

Fed one line at a time (without the line ending), it returns a `ServerSentEvent` when a blank
line completes one. Comment lines (`: keep-alive`) are ignored; `retry:` updates the suggested
reconnection delay; `id:` persists across events as the stream's last event id.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str
    id: str | None


class SSEDecoder:
    """Incremental decoder: `decode(line)` returns a completed event or None."""

    def __init__(self) -> None:
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None
        self._event = ""
        self._data: list[str] = []
        self._has_fields = False

    def decode(self, line: str) -> ServerSentEvent | None:
        if not line:
            if not self._has_fields:
                return None
            event = ServerSentEvent(
                event=self._event or "message",
                data="\n".join(self._data),
                id=self.last_event_id,
            )
            self._event, self._data, self._has_fields = "", [], False
            if not event.data and event.event == "message":
                return None
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
            self._has_fields = True
        elif name == "data":
            self._data.append(value)
            self._has_fields = True
        elif name == "id":
            if "\x00" not in value:
                self.last_event_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

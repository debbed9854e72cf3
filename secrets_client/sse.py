"""Server-Sent Events: an incremental decoder of a `text/event-stream` body, as the WHATWG HTML
standard's "event stream interpretation" says, bounding what a hostile stream can make it hold.

Fed the raw bytes as they arrive (`SSEDecoder.feed`), it returns the events each chunk completes.
Lines end with CRLF, LF or CR (a CRLF split between two chunks is one line end); a line starting
with ``:`` is a comment; ``field: value`` loses one leading space of its value; a field without
``:`` has the empty value; ``data`` lines are joined with ``\\n``; ``id`` persists from event to
event (one holding NUL is ignored); ``retry`` takes digits only; unknown fields are ignored; an
event without data is not dispatched (its ``id`` still counts); a UTF-8 BOM opening the stream is
skipped and invalid UTF-8 becomes U+FFFD. httpx-sse reads through `iter_lines`, which holds a line
of any length: a line over `max_line` bytes or an event over `max_event` bytes of data raises
`ClientError` `invalid_stream` here instead.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from secrets_client.errors import ClientError

__all__ = ["MAX_EVENT", "MAX_LINE", "SSEDecoder", "ServerSentEvent"]

MAX_LINE = 1 << 20  # bytes in one line, its line end excluded
MAX_EVENT = 1 << 20  # bytes of data in one event, the joining newlines included

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


class ServerSentEvent(NamedTuple):
    """One dispatched event: `event` is ``"message"`` unless the stream named a type; `id` is
    the last event ID at dispatch (``""`` if none yet); `retry` the last valid ``retry`` in ms."""

    event: str
    data: str
    id: str
    retry: int | None


class SSEDecoder:
    """`feed(chunk)` -> the events completed; `last_event_id` and `retry` as the stream set them
    (an ``id`` counts from the blank line that ends its event, dispatched or not).

    What an incomplete last event holds when the stream ends is dropped, as the standard says:
    just stop feeding. One decoder per connection; carry `last_event_id` over by hand.
    """

    def __init__(self, *, max_line: int = MAX_LINE, max_event: int = MAX_EVENT) -> None:
        self.max_line = max_line
        self.max_event = max_event
        self.last_event_id = ""
        self.retry: int | None = None
        self._id = ""  # the "last event ID buffer": it becomes last_event_id at the blank line
        self._buffer = bytearray()
        self._started = False  # past the optional BOM
        self._after_cr = False  # the last chunk ended with CR: a LF opening the next ends no line
        self._type = ""
        self._data: list[str] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if not chunk:
            return []
        if self._after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._after_cr = False
        buffer = self._buffer
        buffer += chunk
        if not self._started:
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                return []  # perhaps the start of a BOM: wait for more
            if buffer.startswith(_BOM):
                del buffer[: len(_BOM)]
            self._started = True
        events: list[ServerSentEvent] = []
        start = 0
        for end in _LINE_END.finditer(buffer):
            if end.start() - start > self.max_line:
                raise _too_long(self.max_line)
            event = self._line(bytes(buffer[start : end.start()]))
            if event is not None:
                events.append(event)
            start = end.end()
        if start == len(buffer) and start and buffer[-1] == 0x0D:
            self._after_cr = True  # a CR ends the chunk: its LF may open the next one
        del buffer[:start]
        if len(buffer) > self.max_line:
            raise _too_long(self.max_line)
        return events

    def _line(self, raw: bytes) -> ServerSentEvent | None:
        if not raw:
            return self._dispatch()
        if raw[0] == 0x3A:  # ":" a comment (keep-alives)
            return None
        line = raw.decode("utf-8", errors="replace")
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._size += len(raw) + 1  # the line and its joining newline: a bound on the data
            if self._size > self.max_event:
                raise ClientError(
                    "invalid_stream", f"an event's data exceeds {self.max_event} bytes"
                )
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, event_type = self._data, self._type
        self._data, self._type, self._size = [], "", 0
        self.last_event_id = self._id
        if not data:
            return None
        text = "\n".join(data)
        return ServerSentEvent(event_type or "message", text, self.last_event_id, self.retry)


def _too_long(limit: int) -> ClientError:
    return ClientError("invalid_stream", f"a line of the event stream exceeds {limit} bytes")

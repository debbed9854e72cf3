"""uvicorn's httptools protocol, with each response's writes coalesced into one send.

uvicorn writes a response's status line and headers, then its body, each with its own
`transport.write`, and uvloop sends each at once: two `send` system calls per response, and on
loopback each carries the receiver's TCP work too. Profiled on cached reads, the first of the two
was a quarter of the service's CPU. Here a transport proxy keeps what is written during one turn
of the event loop and sends it as one write at the end of that turn (a `call_soon`), so a
response written in one go (every JSON answer here) leaves in one segment.

When the answers of reads leave at the end of the turn, those of every connection served in that
turn leave together and their next requests come back together: measured with wrk on cached
reads, 50-59 µs of CPU per request against 67-84 for uvicorn's own protocol, and against 75-90
when each answer was sent as soon as it was whole. The answer to any other method (a change)
is sent as soon as it is whole instead (uvicorn says when, through `on_response_complete`),
since the rest of the turn (its audit record and log line, the change event's publish) would
add a few hundred µs to its latency (PATCH p50 measured 2.0-2.7 ms sent at once against
2.9-3.2 ms at the end of the turn). A close sends what is kept first; flow control stays the
transport's.

Request heads are held to HEAD_LIMIT bytes and HEAD_TIMEOUT seconds each. httptools keeps
appending a request line and headers for as long as they come (a long header's value is
concatenated read by read), so without a bound two connections held 8 MiB each. The protocol
counts what it feeds the parser while a head is open and feeds a read longer than 4 KiB in
pieces, never past the limit: then 414 or 431, and nothing more is parsed on that connection. A
read that holds a whole head, as nearly every one does, costs two comparisons more than
uvicorn's own path, and a timer is armed only for a head left incomplete at the end of a read.
The pieces also stop where uvicorn pauses reading (a pipelined request queued, a body the app
has not read), so a burst of pipelined requests is parsed no further ahead than one piece.
A new connection that sends nothing is closed after the keep-alive timeout, like an idle one.
How `serve` runs the app on it is service.http.serving.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from schemas.api import ErrorBody
from schemas.errors import TooLarge

__all__ = ["HEAD_LIMIT", "HEAD_TIMEOUT", "HttpProtocol"]

HEAD_LIMIT = 16 * 1024
"""Bytes of request line and headers together one request may send: beyond, 414 or 431."""

HEAD_TIMEOUT = 10.0
"""Seconds from the first byte of a request head to its end: beyond, the connection is closed."""


class _CoalescingTransport:
    """Forwards everything to `transport`; `write`s made in one loop turn become one."""

    __slots__ = ("_kept", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._kept: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._kept:
            self._loop.call_soon(self._send)
        self._kept.append(bytes(data))

    def send_now(self) -> None:
        """Send what is kept (the response is complete)."""
        self._send()

    def _send(self) -> None:
        kept, self._kept = self._kept, []
        if kept and not self._transport.is_closing():
            self._transport.write(kept[0] if len(kept) == 1 else b"".join(kept))

    def close(self) -> None:
        self._send()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        # is_closing, get_extra_info, pause_reading, set_protocol, abort, ...
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's HttpToolsProtocol on a `_CoalescingTransport`, with bounded request heads.

    Pass as `uvicorn.Config(http=)`. `head_limit` and `head_timeout` are class attributes so that
    tests can shrink them.
    """

    head_limit = HEAD_LIMIT
    head_timeout = HEAD_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._coalescing = _CoalescingTransport(transport, self.loop)
        coalescing: Any = self._coalescing
        super().connection_made(coalescing)
        self.flow = _FlowControl(coalescing, self._resumed)
        self._head_used = 0  # bytes of the open head so far (an upper bound); 0: none is open
        # The most a read may hold to be parsed whole; larger ones go through _receive_in_pieces.
        # 0 while bytes wait in _unparsed (new ones go behind them), -1 once a head was refused.
        self._head_room = _PIECE
        self._unparsed = b""  # the rest of a read, kept while uvicorn has reading paused
        self._head_deadline: asyncio.TimerHandle | None = None
        # A connection that never sends a byte is idle like a kept-alive one: the same timeout.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # The hot path: a whole head in one read. Beyond uvicorn's own work, two comparisons.
        if len(data) > self._head_room:
            self._receive_in_pieces(data)
            return
        scope = self.scope
        _parse(self, data)
        # A head was open before, or one began that is still open (uvicorn puts the method in
        # the scope when a head ends).
        if self._head_used or (self.scope is not scope and "method" not in self.scope):
            self._count_head(len(data), began=self.scope is not scope)

    def _receive_in_pieces(self, data: bytes) -> None:
        """Feed `data` (after what waits in `_unparsed`) to the parser `_PIECE` bytes at a time,
        counting each, and stop where uvicorn pauses reading: a queued pipelined request, or a
        body the app has not read yet. What is left waits in `_unparsed` for the resume."""
        if self._head_room < 0:
            return  # refused or timed out: nothing more is parsed
        if self._unparsed:
            data, self._unparsed = self._unparsed + data, b""
        view = memoryview(data)
        start, end = 0, len(data)
        while start < end:
            if self.flow.read_paused:
                self._unparsed = bytes(view[start:])
                self._head_room = 0
                if self._head_deadline is not None:  # what waits is not the client's delay
                    self._head_deadline.cancel()
                    self._head_deadline = None
                return
            if self._head_used >= self.head_limit:  # an open head at the limit, and more comes
                self._refuse_head()
                return
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return  # a parse error closed it, or it became a WebSocket
            stop = min(end, start + _PIECE, start + self.head_limit - self._head_used)
            scope = self.scope
            piece: Any = view[start:stop]  # httptools takes any buffer: no copy
            _parse(self, piece)
            if self.scope is not scope or self._head_used:
                self._count_head(stop - start, began=self.scope is not scope)
            start = stop
        self._head_room = min(_PIECE, self.head_limit - self._head_used)

    def _resumed(self) -> None:
        if self._unparsed:  # parse it in a turn of its own, not inside uvicorn's callback
            self.loop.call_soon(self._receive_in_pieces, b"")

    def _count_head(self, size: int, *, began: bool) -> None:
        """After `size` bytes were parsed: count them against the head still open, if one is.

        A head that began within them is counted as all of them: exact when it began at their
        start, as every head does unless pipelined behind another request in the same read,
        and at most `_PIECE` bytes over otherwise.
        """
        if "method" in self.scope or self.transport.is_closing():
            # uvicorn puts the method in the scope when the head ends: none is open.
            self._head_used = 0
            self._head_room = _PIECE
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None
            return
        if began:
            self._head_used = size
            if self._head_deadline is not None:
                self._head_deadline.cancel()
            self._head_deadline = self.loop.call_later(self.head_timeout, self._head_too_slow)
        else:
            self._head_used += size
            if self._head_deadline is None:  # it was parsed ahead while reading was paused
                self._head_deadline = self.loop.call_later(self.head_timeout, self._head_too_slow)
        self._head_room = min(_PIECE, self.head_limit - self._head_used)

    def _refuse_head(self) -> None:
        """414 or 431 with `Connection: close`, after the answers to the requests before it."""
        self._head_room = -1
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        # 414 when the URL is most of what came and no header line has ended (httptools calls
        # on_url with the URL before on_header with any header), else 431.
        if not self.headers and len(self.url) * 2 > self.head_limit:
            status, detail = 414, f"the request line exceeds {self.head_limit} bytes"
        else:
            status, detail = 431, f"the request line and headers exceed {self.head_limit} bytes"
        self.logger.warning("Request head refused (%d): %s.", status, detail)
        body = _error_encoder.encode(ErrorBody(error=TooLarge.code, detail=detail))
        lines = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            lines += [name, b": ", value, b"\r\n"]
        lines += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
        refusal = b"".join(lines)
        if self.cycle is None or (self.cycle.response_complete and not self.pipeline):
            self._send_refusal(refusal)
        else:  # after the answer to the last request parsed before it (uvicorn's self.cycle)

            def answered() -> None:
                self.on_response_complete()
                self._send_refusal(refusal)

            self.cycle.on_response = answered

    def _send_refusal(self, refusal: bytes) -> None:
        self.transport.write(refusal)
        self.transport.close()

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        self._head_room = -1
        self.logger.warning(
            "Request head not complete within %s s: connection closed.", self.head_timeout
        )
        self.transport.close()

    def on_response_complete(self) -> None:
        if self.cycle is not None and self.cycle.scope["method"] not in _BATCHED:
            self._coalescing.send_now()  # a change's answer: before the turn's other work
        super().on_response_complete()


_parse = HttpToolsProtocol.data_received  # uvicorn's: feeds httptools, answers its errors

_BATCHED = frozenset({"GET", "HEAD"})
"""Methods whose answers leave at the end of the loop's turn, with the other reads'."""

_PIECE = 4096
"""The most fed to the parser at once: a longer read is fed in pieces, so that a head pipelined
behind another request in one read is counted at most this much over its size, and no more
pipelined requests are parsed ahead of their turn than one piece holds."""


class _FlowControl(FlowControl):
    """uvicorn's FlowControl, which also says when reading resumes."""

    def __init__(self, transport: Any, on_resume: Callable[[], None]) -> None:
        super().__init__(transport)
        self._on_resume = on_resume

    def resume_reading(self) -> None:
        # uvicorn's own three lines (it runs after every answer), then the call.
        if self.read_paused:
            self.read_paused = False
            self._transport.resume_reading()
            self._on_resume()


_error_encoder = msgspec.json.Encoder()

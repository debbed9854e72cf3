"""The watch stream's protocol, without I/O: the request to send, what each server-sent event
means (a change, a `reset`, an `end`), and how long to wait before connecting again.

Both clients drive a `WatchSession` over their own httpx streaming responses, one connection
after another; it carries the resume point (`Last-Event-ID`) from one to the next.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple, Protocol, TypeVar

import msgspec

from events.listener import Change, decode_change
from secrets_client.api import watch_url
from secrets_client.errors import ClientError
from secrets_client.sse import MAX_EVENT, MAX_LINE, SSEDecoder

__all__ = [
    "FIRST_DELAY",
    "MAX_DELAY",
    "Attempt",
    "Backoff",
    "OnConnect",
    "StreamState",
    "StreamEnd",
    "StreamReset",
    "WatchItem",
    "WatchSession",
]

FIRST_DELAY = 0.1  # seconds before the first new attempt after a failure, doubling ...
MAX_DELAY = 5.0  # ... up to this
MAX_RETRY_AFTER = 60.0  # a 429's Retry-After is honoured up to this many seconds
# Refusals that another attempt cannot change: a bad prefix, no grant below it, no such route.
_PERMANENT = frozenset({400, 403, 404, 405})


class StreamReset(NamedTuple):
    """The events after the resume point are gone from the stream: whatever was derived from
    them (a cache) must be forgotten. The stream goes on from `first_sequence`."""

    reason: str
    first_sequence: int


class StreamEnd(NamedTuple):
    """The service ended the stream: `token_expired`, `overflow` (this reader fell behind) or
    `shutdown`. Connect again (with a fresh token), resuming after the last event."""

    reason: str


WatchItem = Change | StreamReset | StreamEnd


class _Reset(msgspec.Struct):
    reason: str = ""
    first_sequence: int = 0


class _End(msgspec.Struct):
    reason: str = ""


log = logging.getLogger("secrets.client")

T = TypeVar("T")
_reset_decoder = msgspec.json.Decoder(_Reset)
_end_decoder = msgspec.json.Decoder(_End)


class WatchSession:
    """One watch of `prefix` across connections: `headers()` for the next request, `open()`
    when its answer is a stream, then `feed(chunk)` with each chunk of the body.

    `last_sequence` is the stream sequence to resume after (the last change delivered, or an
    `id` the service sent on its own); None until there is one. A change at or before it is
    not delivered twice.
    """

    def __init__(
        self,
        prefix: str = "",
        *,
        after: int | None = None,
        max_line: int = MAX_LINE,
        max_event: int = MAX_EVENT,
    ) -> None:
        if after is not None and (isinstance(after, bool) or after < 0):
            raise ClientError("invalid_request", "a resume point is a stream sequence >= 0")
        self.url = watch_url(prefix)
        self.last_sequence = after
        self._limits = (max_line, max_event)
        self._decoder = SSEDecoder(max_line=max_line, max_event=max_event)

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
        if self.last_sequence is not None:
            headers["Last-Event-ID"] = str(self.last_sequence)
        return headers

    def open(self, content_type: str | None) -> None:
        """A 200 arrived: check that it is an event stream, and start a new decoder."""
        if (content_type or "").partition(";")[0].strip().lower() != "text/event-stream":
            raise ClientError(
                "invalid_stream", f"expected text/event-stream, got {content_type or 'no type'}"
            )
        max_line, max_event = self._limits
        self._decoder = SSEDecoder(max_line=max_line, max_event=max_event)

    def feed(self, chunk: bytes) -> list[WatchItem]:
        """The items `chunk` completes; ClientError `invalid_stream` if it breaks the rules."""
        decoder = self._decoder
        items: list[WatchItem] = []
        for sse in decoder.feed(chunk):
            if sse.event == "reset":
                reset = _decode(_reset_decoder, sse.data, "reset")
                self.last_sequence = max(reset.first_sequence - 1, 0)
                items.append(StreamReset(reset.reason, reset.first_sequence))
            elif sse.event == "end":
                items.append(StreamEnd(_decode(_end_decoder, sse.data, "end").reason))
            else:
                sequence = _sequence(sse.id)
                if self.last_sequence is not None and sequence <= self.last_sequence:
                    continue  # seen already
                try:
                    event = decode_change(sse.data.encode())
                except msgspec.DecodeError:
                    # The type only: the data of a broken event is not worth echoing.
                    raise ClientError(
                        "invalid_stream", f"event {sequence} is not a change event"
                    ) from None
                self.last_sequence = sequence
                items.append(Change(event, sequence))
        # An `id` the service sent without data (say, at the start) is a resume point too.
        given = decoder.last_event_id
        if given.isascii() and given.isdigit():
            sequence = int(given)
            if self.last_sequence is None or sequence > self.last_sequence:
                self.last_sequence = sequence
        return items


class Backoff:
    """How long to wait before the next connection, and when to give up.

    A `persistent` stream (a client's cache) never gives up. Otherwise (`watch()`), the first
    connection's failure is raised, and later a refusal that another attempt cannot change
    (400, 403, 404, 405) or a second 401 in a row. A 401 is retried at once the first time: the
    token provider is asked again for each connection, so an expired token is replaced.
    """

    def __init__(
        self, *, persistent: bool, first: float = FIRST_DELAY, cap: float = MAX_DELAY
    ) -> None:
        self.persistent = persistent
        self.first = first
        self.cap = cap
        self.connections = 0
        self.failures = 0  # in a row, since the last connection
        self._next = first
        self._unauthorized = 0

    def connected(self) -> None:
        if self.failures:
            log.info("watch stream up again", extra={"failures": self.failures})
        self.connections += 1
        self.failures = 0
        self._next = self.first
        self._unauthorized = 0

    def after_end(self, reason: str) -> float:
        """Seconds to wait after the service ended the stream."""
        if reason == "token_expired":
            return 0.0  # the next connection carries the token provider's next token
        log.info("watch stream ended by the service: %s", reason, extra={"reason": reason})
        return self._step()

    def after_failure(self, error: ClientError) -> float:
        """Seconds to wait after `error` (a refusal, a transport failure, a broken stream), or
        `error` raised."""
        if not self.persistent and (
            self.connections == 0
            or error.status in _PERMANENT
            or (error.status == 401 and self._unauthorized > 0)
        ):
            raise error
        self.failures += 1
        # Once per outage at WARNING (the codes only: a detail may name the URL); then quieter.
        log.log(
            logging.WARNING if self.failures == 1 else logging.DEBUG,
            "watch stream down, connecting again: %s",
            error.error,
            extra={"error": error.error, "status": error.status, "failures": self.failures},
        )
        if error.status == 401:
            self._unauthorized += 1
            if self._unauthorized == 1:
                return 0.0
        delay = self._step()
        if error.status in (429, 503) and error.retry_after is not None:
            delay = max(delay, min(error.retry_after, MAX_RETRY_AFTER))
        return delay

    def _step(self) -> float:
        delay = self._next
        self._next = min(delay * 2, self.cap)
        return delay


OnConnect = Callable[[int | None], None]
"""Called when a watch connection has begun, with the sequence it resumes after (None: from now)."""


class StreamState(Protocol):
    """Told when a stream is up (it delivers events) and down: a client's cache."""

    def stream_up(self, *, resumed: bool) -> None: ...

    def stream_down(self) -> None: ...


class Attempt:
    """One connection of a `WatchSession`: `headers` to send (the token's to be added), `open`
    on a 200, `feed` each chunk (until `ended`), then `close` and wait `delay()` seconds. The
    stream is up at its first chunk: `state` and `on_connect` are told then.

    Set `failure` to the ClientError that ended the connection, if one did; a stream that stops
    with neither a failure nor an `end` event was cut.
    """

    def __init__(
        self,
        session: WatchSession,
        backoff: Backoff,
        state: StreamState | None = None,
        on_connect: OnConnect | None = None,
    ) -> None:
        self.session = session
        self.backoff = backoff
        self.state = state
        self.on_connect = on_connect
        self.after = session.last_sequence
        self.headers = session.headers()
        self.resumed = "Last-Event-ID" in self.headers
        self.ended: str | None = None
        self.failure: ClientError | None = None
        self._up = False

    def open(self, content_type: str | None) -> None:
        self.session.open(content_type)

    def feed(self, chunk: bytes) -> list[Change | StreamReset]:
        if not self._up:  # up once the service speaks: its stream has begun
            self._up = True
            self.backoff.connected()
            if self.state is not None:
                self.state.stream_up(resumed=self.resumed)
            if self.on_connect is not None:
                self.on_connect(self.after)
        items: list[Change | StreamReset] = []
        for item in self.session.feed(chunk):
            if isinstance(item, StreamEnd):
                self.ended = item.reason  # the last item: the service closes the stream
            else:
                items.append(item)
        return items

    def close(self) -> None:
        """The connection is over (or never was): the stream is down from now."""
        if self.state is not None:
            self.state.stream_down()

    def delay(self) -> float:
        """Seconds to wait before the next connection; raises the failure if the watch gives up."""
        if self.failure is None and self.ended is None:
            self.failure = ClientError("unreachable", "the watch stream was cut")
        if self.failure is not None:
            return self.backoff.after_failure(self.failure)
        return self.backoff.after_end(self.ended or "")


def _decode(decoder: msgspec.json.Decoder[T], data: str, name: str) -> T:
    try:
        return decoder.decode(data)
    except msgspec.DecodeError:
        detail = f"the data of a {name!r} event does not decode"
        raise ClientError("invalid_stream", detail) from None


def _sequence(raw: str) -> int:
    if raw.isascii() and raw.isdigit() and int(raw) > 0:
        return int(raw)
    raise ClientError("invalid_stream", "a change event without a stream sequence as its id")

"""Receive secret change events in another process, resuming where it stopped: `ChangeListener`.

A listener reads the JetStream change stream for a path pattern, in stream order, from a stream
sequence, a time, or (by default) from now on. Each `Change` carries the decoded event and its
stream sequence; persist the sequence and start the next run from ``sequence + 1`` to miss nothing
across a restart and see nothing twice::

    url = "nats://127.0.0.1:4222"
    async with ChangeListener(url, "app/**", start_sequence=saved + 1) as changes:
        async for change in changes:
            print(change.type, change.path, change.version)
            saved = change.sequence

Patterns are path globs (`schemas.globs.PathGlob`): ``"app/**"``, ``"app/*/db"``, ``"**"``.
What NATS wildcards cannot say (``db-*``, ``app/**/db``) is subscribed more widely and filtered
here. Events never carry secret data: read the secret itself through the service.

Authentication and TLS: a user and password may stand in the URL
(``nats://listener:secret@host:4222``; never shown in errors or logs), `credentials` names a NATS
credentials file (user JWT and NKEY seed), and `tls_ca`, `tls_cert`, `tls_key` make the connection
TLS, checked against that CA, with a client certificate for mutual TLS. The user needs only to
read: see the README for the NATS permissions a listener needs.

Each payload must name the path its subject names; one that does not (a forgery by someone who
may publish on another path's subject) is skipped and counted, as are payloads that do not decode.

Forward compatibility: an event whose ``type`` this version does not know (the service adds types
with later features, e.g. a future ``"secret.rotated"``) arrives as an `UnknownChange` holding the
common fields, so a listener built today keeps running; check ``change.known`` or match on the
event class to act only on the types you handle. Payloads that are not events at all, or known
types with invalid fields, are skipped and counted in `ChangeListener.skipped`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime
from types import TracebackType
from typing import Self

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from events.bus import CHANGE_STREAM
from events.connection import (
    check_credentials,
    connect_options,
    describe_error,
    is_telling,
    tls_context,
)
from events.subjects import path_from_subject, pattern_subject
from schemas.errors import ConfigError
from schemas.events import EVENT_TYPES, ChangeEvent, event_decoder
from schemas.globs import PathGlob
from schemas.secret import redact_url

__all__ = ["Change", "ChangeListener", "UnknownChange", "decode_change"]

log = logging.getLogger("secrets.events.listener")

_RECONNECT_WAIT = 0.5  # seconds between reconnection attempts; attempts never stop


class UnknownChange(msgspec.Struct, frozen=True, kw_only=True):
    """An event of a type this version does not know: the fields every change event shares.

    Only ``type`` and ``path`` are required; the rest default to empty (``version`` to 0), so a
    future type that drops one still decodes. Unknown extra fields are ignored.
    """

    type: str
    path: str
    version: int = 0
    event_id: str = ""
    actor: str = ""
    instance_id: str = ""
    time: str = ""


_unknown_decoder = msgspec.json.Decoder(UnknownChange)


def decode_change(data: bytes) -> ChangeEvent | UnknownChange:
    """Decode a change payload as the listener does: a known event, else an `UnknownChange`.

    Raises `msgspec.DecodeError` for anything else: not JSON, no ``type`` or ``path``, or a known
    type whose fields are invalid (an `UnknownChange` never stands in for a broken known event).
    """
    try:
        event: ChangeEvent = event_decoder.decode(data)
        return event
    except msgspec.ValidationError:
        pass  # perhaps a type added after this client was written
    other = _unknown_decoder.decode(data)
    if other.type in EVENT_TYPES:
        raise msgspec.ValidationError(f"invalid {other.type!r} event")
    return other


class Change(msgspec.Struct, frozen=True):
    """One change event and its JetStream stream sequence (resume from ``sequence + 1``)."""

    event: ChangeEvent | UnknownChange
    sequence: int

    @property
    def path(self) -> str:
        return self.event.path

    @property
    def version(self) -> int:
        return self.event.version

    @property
    def type(self) -> str:
        """The event type, e.g. ``"secret.updated"``, known to this version or not."""
        if isinstance(self.event, UnknownChange):
            return self.event.type
        return str(self.event.__struct_config__.tag)

    @property
    def known(self) -> bool:
        """False for an `UnknownChange`: a type added to the service after this client."""
        return not isinstance(self.event, UnknownChange)


class ChangeListener:
    """Async iterator over the change events for a path pattern, in stream order.

    Start from exactly one of: `start_sequence` (a stream sequence, e.g. the last one handled
    plus one; ``1`` replays all the stream still holds), `start_time` (timezone-aware), or neither
    for the events published from `__aenter__` on (``deliver_new=True`` says so explicitly).

    `__aenter__` connects, reconnecting forever once connected; it raises `ConnectionError` if
    NATS, JetStream or the stream is not reachable within `connect_timeout` seconds (None: wait
    forever). The ordered consumer recreates itself from the last sequence it saw when the server
    goes quiet for two `heartbeat` intervals (a server restart, a lost connection), and messages
    already seen are dropped here, so a reconnect neither loses nor repeats changes.

    `last_sequence` is the stream sequence of the last message consumed: the last change
    delivered, or a later message passed over (not matching, undecodable); before any, the
    sequence just before the start. Resuming from ``last_sequence + 1`` is always safe.
    Iteration ends when the listener is closed (leaving the ``async with`` block, or `aclose`
    from another task); a connection closed by anything else raises `ConnectionError`.
    """

    def __init__(
        self,
        servers: str | Sequence[str],
        pattern: str = "**",
        *,
        prefix: str = "secrets",
        start_sequence: int | None = None,
        start_time: datetime | None = None,
        deliver_new: bool = False,
        stream: str = CHANGE_STREAM,
        connect_timeout: float | None = 10.0,
        heartbeat: float = 5.0,
        name: str | None = None,
        credentials: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_hostname: str | None = None,
        tls_first: bool = False,
    ) -> None:
        starts = sum(x is not None for x in (start_sequence, start_time)) + deliver_new
        if starts > 1:
            raise ValueError("give at most one of start_sequence, start_time and deliver_new")
        if start_sequence is not None and start_sequence < 1:
            raise ValueError("start_sequence counts from 1")
        if start_time is not None and start_time.utcoffset() is None:
            raise ValueError("start_time must be timezone-aware")
        if heartbeat <= 0:
            raise ValueError("heartbeat is a positive number of seconds")
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.pattern = pattern
        self.glob = PathGlob(pattern)
        self.subject = _subscription_subject(prefix, self.glob)
        self.prefix = prefix
        self.stream = stream
        self.start_sequence = start_sequence
        self.start_time = start_time
        self.connect_timeout = connect_timeout
        self.heartbeat = heartbeat
        self.name = name
        if credentials is not None:
            try:
                check_credentials(credentials)
            except ConfigError as exc:
                raise ValueError(f"NATS credentials file: {exc.problem}") from None
        self.credentials = credentials
        self.tls_hostname = tls_hostname
        self.tls_first = tls_first
        self._tls = tls_context(tls_ca, tls_cert, tls_key, required=tls_first)
        self._last_error: Exception | None = None
        self.last_sequence = 0
        self.skipped = 0
        self._nc: NATS | None = None
        self._sub: JetStreamContext.PushSubscription | None = None
        self._waiter: asyncio.Task[Msg] | None = None
        self._entered = False
        self._closing = False

    def __repr__(self) -> str:
        return (
            f"ChangeListener(pattern={self.pattern!r}, subject={self.subject!r}, "
            f"last_sequence={self.last_sequence})"
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("a ChangeListener is entered once; make a new one to resume")
        self._entered = True
        nc = NATS()
        self._nc = nc
        try:
            await asyncio.wait_for(self._open(nc), self.connect_timeout)
        except BaseException as exc:
            await self.aclose()
            if isinstance(exc, NotFoundError):
                raise ConnectionError(f"JetStream stream {self.stream!r} not found") from exc
            if isinstance(exc, NatsError):
                raise ConnectionError(f"cannot subscribe to {self.subject}: {exc}") from exc
            if isinstance(exc, TimeoutError):
                servers = ", ".join(redact_url(url) for url in self.servers)
                why = "" if self._last_error is None else f": {describe_error(self._last_error)}"
                raise ConnectionError(
                    f"NATS at {servers} not ready within {self.connect_timeout}s{why}"
                ) from exc
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _open(self, nc: NATS) -> None:
        options = connect_options(
            self.credentials, self._tls, self.tls_hostname, tls_first=self.tls_first
        )
        await nc.connect(
            servers=self.servers,
            name=self.name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=_RECONNECT_WAIT,  # type: ignore[arg-type]  # typed int, takes float
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            **options,
        )
        js = nc.jetstream()
        start = await self._start_sequence(js)
        self.last_sequence = start - 1
        # Whatever the requested start, subscribe by sequence: the ordered consumer restarts
        # by sequence after a reset, and `last_sequence` is a resume point from the outset.
        self._sub = await js.subscribe(
            self.subject,
            stream=self.stream,
            ordered_consumer=True,
            idle_heartbeat=self.heartbeat,
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            config=js_api.ConsumerConfig(opt_start_seq=start),
        )

    async def _start_sequence(self, js: JetStreamContext) -> int:
        info = await js.stream_info(self.stream)
        first, last = info.state.first_seq, info.state.last_seq
        if self.start_time is not None:
            return await self._sequence_at(js, self.start_time)
        if self.start_sequence is None:
            return last + 1
        if self.start_sequence < first:
            log.warning(
                "change events before the stream's first sequence have expired",
                extra={"start_sequence": self.start_sequence, "first_sequence": first},
            )
        elif self.start_sequence > last + 1:
            log.warning(
                "start sequence beyond the stream's end: was the stream recreated?",
                extra={"start_sequence": self.start_sequence, "last_sequence": last},
            )
        return self.start_sequence

    async def _sequence_at(self, js: JetStreamContext, when: datetime) -> int:
        """The first stream sequence stored at or after `when` (last + 1 if none yet)."""
        # A consumer created by start time reports the sequence just before its start.
        probe = await js.add_consumer(
            self.stream,
            js_api.ConsumerConfig(
                deliver_policy=js_api.DeliverPolicy.BY_START_TIME,
                opt_start_time=when,
                ack_policy=js_api.AckPolicy.NONE,
                mem_storage=True,
                num_replicas=1,
                inactive_threshold=30.0,  # cleans up if the delete below never arrives
            ),
        )
        try:
            await js.delete_consumer(self.stream, probe.name)
        except NatsError:
            pass
        delivered = probe.delivered
        return 1 if delivered is None else delivered.stream_seq + 1

    async def aclose(self) -> None:
        """Stop: unsubscribe, close the connection, and end any iteration in progress."""
        self._closing = True
        if self._waiter is not None:
            self._waiter.cancel()
        sub, self._sub = self._sub, None
        nc, self._nc = self._nc, None
        if sub is not None and nc is not None and not nc.is_closed:
            try:
                await sub.unsubscribe()
            except NatsError:
                pass
        if nc is not None and not nc.is_closed:
            # Not drain(): it would wait for buffered messages nobody will read; they are
            # replayed from `last_sequence + 1` next time anyway.
            await nc.close()

    # -- iteration -------------------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Change:
        while True:
            msg = await self._next_msg()
            try:
                sequence = msg.metadata.sequence.stream
            except (NatsError, ValueError):
                self.skipped += 1
                log.warning("message without JetStream metadata skipped")
                continue
            if sequence <= self.last_sequence:
                continue  # already seen: the ordered consumer restarted earlier than needed
            self.last_sequence = sequence
            try:
                event = decode_change(msg.data)
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                # One poison payload in the stream must not end every replay that reaches it.
                self.skipped += 1
                log.warning("undecodable change event skipped", extra={"sequence": sequence})
                continue
            if not self._subject_names(msg.subject, event.path):
                self.skipped += 1
                log.warning("change event skipped: its path is not its subject's")
                continue
            if not self.glob.matches(event.path):
                continue  # subscribed more widely than the pattern
            return Change(event, sequence)

    def _subject_names(self, subject: str, path: str) -> bool:
        try:
            return path_from_subject(self.prefix, subject) == path
        except ValueError:
            return False

    async def _next_msg(self) -> Msg:
        if not self._entered:
            raise RuntimeError("enter the listener first: 'async with ChangeListener(...)'")
        sub = self._sub
        if sub is None or self._closing:
            raise StopAsyncIteration
        # A task of our own, so that aclose() from another task can end this wait.
        self._waiter = asyncio.ensure_future(sub.next_msg(timeout=None))
        try:
            return await self._waiter
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closing and (task is None or task.cancelling() == 0):
                raise StopAsyncIteration from None
            raise
        except ConnectionClosedError:
            if self._closing:
                raise StopAsyncIteration from None
            raise ConnectionError("the NATS connection was closed") from None
        finally:
            self._waiter = None

    # -- connection callbacks --------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        if self._last_error is None or is_telling(exc):
            self._last_error = exc
        log.warning("NATS error", extra={"error_type": type(exc).__name__})

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("NATS disconnected: reconnecting", extra={"subject": self.subject})

    async def _on_reconnected(self) -> None:
        log.info("NATS reconnected: the ordered consumer resumes from its last sequence")


def _subscription_subject(prefix: str, glob: PathGlob) -> str:
    """`pattern_subject` of the glob, or of the narrowest wider glob NATS can express."""
    try:
        return pattern_subject(prefix, glob.pattern)
    except ValueError:
        pass
    wider: list[str] = []
    for segment in glob.segments:
        if segment == "**":
            break  # a `**` before the end: everything below what came before
        wider.append("*" if "*" in segment else segment)
    else:
        return pattern_subject(prefix, "/".join(wider))
    return pattern_subject(prefix, "/".join([*wider, "**"]))

"""The service's side of the bus: publish change events, apply other instances' events.

One NATS connection per instance. Writes are announced on `<prefix>.changed.<path>` through
JetStream (stored in SECRETS_EVENTS for replay); every instance listens on a core subscription,
which is the fastest path, and replays from the stream after a reconnect.

Whatever arrives is a claim from whoever could publish: an event is dropped (and counted by
reason in `dropped`) unless it decodes, names the path its subject names, and keeps its numbers
in range. What it claims about Vault is checked by the handler (`SecretsManager`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import api as js_api
from nats.js.errors import Error as JsError

from events.connection import (
    TlsFileError,
    check_credentials,
    connect_options,
    describe_error,
    is_telling,
    tls_context,
)
from events.kv import NatsKv, ensure_bucket
from events.subjects import approvals_subject, changed_subject, path_from_subject
from schemas.approvals import ApprovalEvent, approval_event_encoder
from schemas.errors import ConfigError
from schemas.events import (
    ChangeEvent,
    LifecycleEvent,
    NewVersionEvent,
    SecretDeleted,
    SecretDestroyed,
    SecretRotated,
    SecretRotationFailed,
    SecretUndeleted,
    event_decoder,
    event_encoder,
)
from schemas.paths import is_valid_path
from schemas.secret import redact_url

__all__ = [
    "APPROVALS_STREAM",
    "AUDIT_STREAM",
    "CHANGE_STREAM",
    "DROP_REASONS",
    "MAX_EVENT_VERSION",
    "MAX_EVENT_VERSIONS",
    "ChangeHandler",
    "EventBus",
    "check_event",
    "ensure_stream",
]

log = logging.getLogger("secrets.events")

CHANGE_STREAM = "SECRETS_EVENTS"
AUDIT_STREAM = "SECRETS_AUDIT"
APPROVALS_STREAM = "SECRETS_APPROVALS"
APPROVALS_MAX_AGE = 90 * 86400  # seconds JetStream keeps approval events, for notifiers away
AUDIT_MAX_AGE = 90 * 86400  # seconds JetStream keeps audit records; export them to keep more
DRAIN_TIMEOUT = 5  # seconds aclose lets NATS drain the subscriptions before it closes

MAX_EVENT_VERSION: Final = 2**53  # beyond any real KV version, and JSON's exact integer range
MAX_EVENT_VERSIONS: Final = 1000  # versions one lifecycle event may name
# Longest accepted text fields: event ids are kept (to apply a replayed one once) and pending
# claims hold events, so a megabyte-long field must not be.
_MAX_FIELD = {"event_id": 64, "instance_id": 128, "actor": 512, "time": 64}
_MAX_ROTATION_FIELD = {"error": 64, "state": 16}
# Why an event was dropped: the closed label set of secrets_events_dropped_total. The bus drops
# the first three; the handler the rest, after asking Vault (see SecretsManager.apply_change).
DROP_REASONS: Final = (
    "undecodable",  # not JSON, not a known event type, or fields of the wrong type
    "subject_mismatch",  # the payload's path is not the path its subject names
    "out_of_range",  # a version below 1 (0 for lifecycle) or above 2^53, too many versions,
    # or a text field too long
    "beyond_vault",  # claims a version (or a deletion) that Vault does not hold
    "verify_overflow",  # too many claims waiting for Vault: evicted only, never applied
    "unverified",  # Vault did not answer the check: evicted only, never applied
)


class ChangeHandler(Protocol):
    """What the bus drives: the manager (see SecretsManager). Events reach it only once they
    passed `check_event` and their path matched their subject; what they claim is unverified."""

    def apply_change(self, path: str, version: int) -> None: ...

    def apply_lifecycle(self, event: LifecycleEvent) -> None: ...

    def bus_down(self) -> None: ...

    def bus_up(self, *, replayed: bool = False) -> None: ...


async def ensure_stream(
    js: Any,
    prefix: str,
    *,
    name: str = CHANGE_STREAM,
    max_age: float = 7 * 86400,
    replicas: int = 1,
    kind: str = "changed",
) -> None:
    """Create the stream of `<prefix>.<kind>.>` (change events by default), or update it to
    this config if it differs: safe to call at every start."""
    config = js_api.StreamConfig(
        name=name,
        subjects=[f"{prefix}.{kind}.>"],
        storage=js_api.StorageType.FILE,
        max_age=max_age,
        duplicate_window=120,
        num_replicas=replicas,
    )
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(config)
        return
    if _settings(info.config) != _settings(config):
        # Each update is a round of the JetStream cluster's consensus: only when needed.
        await js.update_stream(config)


def _settings(config: js_api.StreamConfig) -> tuple[Any, ...]:
    return (
        tuple(config.subjects or ()),
        config.storage,
        config.max_age,
        config.duplicate_window,
        config.num_replicas,
    )


class EventBus:
    """Publisher (an EventSink for the manager) and subscriber for one instance."""

    def __init__(
        self,
        servers: Sequence[str],
        prefix: str,
        *,
        instance_id: str,
        publish_attempts: int = 6,
        publish_timeout: float = 1.0,
        replicas: int = 1,
        credentials: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_hostname: str | None = None,
        tls_first: bool = False,
        buckets: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`servers` may carry a user and password (``nats://user:pass@host:4222``); they are
        never logged. `credentials` is a NATS credentials file (user JWT and NKEY seed).
        `tls_ca` (a PEM bundle), `tls_cert` and `tls_key` (a client certificate, for mutual TLS)
        make the connection TLS and check the server against that CA (`tls_hostname`: the name
        its certificate must carry, when not the one in the URL). `tls_first` starts TLS before
        the server's greeting (the server's `tls` block needs `handshake_first: true`), so that
        nobody on the path can strip TLS and read the credentials sent next. `buckets` (name ->
        ttl seconds) are key-value buckets made at connect, beside the streams, then in `kv`."""
        self.servers = list(servers)
        self.prefix = prefix
        self.instance_id = instance_id
        self.publish_attempts = publish_attempts
        self.publish_timeout = publish_timeout
        self.replicas = replicas
        self.credentials = credentials
        self.tls_hostname = tls_hostname
        self.tls_first = tls_first
        self.buckets = dict(buckets or {})
        self.kv: dict[str, NatsKv] = {}
        if credentials is not None:
            check_credentials(credentials)
        try:
            self._tls = tls_context(tls_ca, tls_cert, tls_key, required=tls_first)
        except TlsFileError as exc:
            setting = "SECRETS_NATS_TLS_CA" if exc.which == "ca" else "SECRETS_NATS_TLS_CERT"
            raise ConfigError(setting, str(exc)) from None
        self._last_error: Exception | None = None
        self._clock = clock
        self.nc: NATS | None = None
        self.js: Any = None
        self._handler: ChangeHandler | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._disconnected_at: float | None = None
        self.published = 0
        self.publish_failures = 0
        self.received = 0
        # reason -> events dropped for it here (the handler keeps its own reasons)
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS[:3], 0)
        self.disconnects = 0
        self.on_received: Callable[[ChangeEvent], None] | None = None
        # Told False when the connection drops and True when it is back (the watch feed).
        self.state_listeners: list[Callable[[bool], None]] = []
        # Told, for each live (not replayed) event, the seconds from its `time` to receipt.
        self.lag_observer: Callable[[float], None] | None = None

    def __repr__(self) -> str:
        servers = ", ".join(redact_url(url) for url in self.servers)
        return (
            f"EventBus(servers=[{servers}], prefix={self.prefix!r}, "
            f"instance_id={self.instance_id!r})"
        )

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def connect(self, handler: ChangeHandler, *, connect_timeout: float = 5.0) -> None:
        self._handler = handler
        options = connect_options(
            self.credentials, self._tls, self.tls_hostname, tls_first=self.tls_first
        )
        nc = NATS()
        try:
            # Bounded here: with endless reconnects, nats-py retries a first connection forever
            # too, so a wrong SECRETS_NATS_URL would hang the start instead of naming it.
            await asyncio.wait_for(
                nc.connect(
                    servers=self.servers,
                    name=f"secrets-service-{self.instance_id}",
                    connect_timeout=connect_timeout,  # type: ignore[arg-type]  # takes a float
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,  # type: ignore[arg-type]
                    # aclose drains: bounded well inside a shutdown's grace (nats-py's is 30 s,
                    # which a subscription stuck behind a slow reconnect could use up).
                    drain_timeout=DRAIN_TIMEOUT,
                    allow_reconnect=True,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                    **options,
                ),
                connect_timeout * (len(self.servers) + 1),
            )
        except (OSError, NatsError, TimeoutError) as exc:
            await nc.close()  # the attempt's socket, if one is open
            why = describe_error(self._last_error or exc)
            raise ConfigError("SECRETS_NATS_URL", f"cannot connect to NATS: {why}") from None
        self.nc = nc
        self.js = self.nc.jetstream()
        # A JetStream cluster that is starting too (a fresh deployment) may answer nothing or
        # "unavailable" for some seconds while it elects leaders: wait for it, within bounds.
        deadline = time.monotonic() + 3 * connect_timeout
        while True:
            try:
                await ensure_stream(self.js, self.prefix, replicas=self.replicas)
                await ensure_stream(
                    self.js,
                    self.prefix,
                    name=AUDIT_STREAM,
                    kind="audit",
                    max_age=AUDIT_MAX_AGE,
                    replicas=self.replicas,
                )
                await ensure_stream(
                    self.js,
                    self.prefix,
                    name=APPROVALS_STREAM,
                    kind="approvals",
                    max_age=APPROVALS_MAX_AGE,
                    replicas=self.replicas,
                )
                for name, ttl in self.buckets.items():
                    self.kv[name] = await ensure_bucket(
                        self.js, name, ttl=ttl, replicas=self.replicas
                    )
                break
            except (NatsError, JsError, TimeoutError) as exc:
                if self._last_error is not None and is_telling(self._last_error):
                    why = describe_error(self._last_error)  # e.g. a permission it lacks
                    raise ConfigError("SECRETS_NATS_URL", f"JetStream refused: {why}") from None
                if time.monotonic() >= deadline:
                    raise ConfigError(
                        "SECRETS_NATS_URL",
                        f"JetStream unavailable ({type(exc).__name__}): run with -js",
                    ) from None
                log.warning("JetStream not ready yet", extra={"error_type": type(exc).__name__})
                await asyncio.sleep(0.5)
        await self.nc.subscribe(f"{self.prefix}.changed.>", cb=self._on_message)
        handler.bus_up(replayed=True)  # nothing cached yet: nothing to drop

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)
        if self.nc is not None and not self.nc.is_closed:
            try:
                await self.nc.drain()
            except (NatsError, TimeoutError):
                await self.nc.close()

    # -- publishing ------------------------------------------------------------------------

    def publish(self, event: ChangeEvent) -> None:
        """Announce a write Vault already accepted: in the background, retried, never raising."""
        self._spawn(self._publish(event))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        # Kept until done (the loop holds tasks only weakly); aclose waits for the rest.
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, event: ChangeEvent) -> None:
        subject = changed_subject(self.prefix, event.path)
        what = {"path": event.path, "version": event.version}
        await self._publish_stored(subject, event_encoder.encode(event), event.event_id, what)

    def publish_approval(self, event: ApprovalEvent) -> None:
        """Announce a change request's transition on `<prefix>.approvals.<path>` (stored by
        SECRETS_APPROVALS): in the background, retried, never raising."""
        subject = approvals_subject(self.prefix, event.path)
        what = {"path": event.path, "change_id": event.id}
        payload = approval_event_encoder.encode(event)
        self._spawn(self._publish_stored(subject, payload, event.event_id, what))

    async def _publish_stored(
        self, subject: str, payload: bytes, event_id: str, what: dict[str, Any]
    ) -> None:
        headers = {"Nats-Msg-Id": event_id}  # JetStream drops a retried duplicate
        delay = 0.05
        for attempt in range(1, self.publish_attempts + 1):
            try:
                if self.js is None:
                    raise ConnectionError("not connected")
                await self.js.publish(
                    subject, payload, timeout=self.publish_timeout, headers=headers
                )
                self.published += 1
                return
            except (NatsError, JsError, TimeoutError, ConnectionError) as exc:
                log.warning(
                    "event publish failed",
                    extra={**what, "attempt": attempt, "error_type": type(exc).__name__},
                )
                if attempt < self.publish_attempts:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
        self.publish_failures += 1
        log.error("event not published; other instances fall back to the version check", extra=what)

    async def publish_audit(self, op: str, payload: bytes, *, acknowledged: bool = True) -> bool:
        """Publish audit records on `<prefix>.audit.<op>` (stored by SECRETS_AUDIT): `payload`
        is one record, or several of that op, one JSON object per line.

        With `acknowledged`, True only once JetStream confirmed it stored the payload; without,
        True once it is handed to the connection (a plain publish: no round trip, for records
        written in the background). `op` must be a subject token. Never raises.
        """
        if self.js is None or self.nc is None or not self.connected:
            return False
        subject = f"{self.prefix}.audit.{op}"
        try:
            if acknowledged:
                await self.js.publish(subject, payload, timeout=self.publish_timeout)
            else:
                await self.nc.publish(subject, payload)
        except (NatsError, JsError, TimeoutError, ConnectionError) as exc:
            log.warning("audit publish failed", extra={"error_type": type(exc).__name__})
            return False
        return True

    # -- receiving -------------------------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        self._handle(msg.data, msg.subject, live=True)

    def _handle(self, data: bytes, subject: str | None = None, *, live: bool = False) -> None:
        """Check one message and hand its event to the handler.

        `subject` is the message's: the event is dropped unless its path is the one the subject
        names. Both callers here pass it; None is for payloads fed in directly (tests).
        """
        try:
            event = event_decoder.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            self._drop("undecodable")
            return
        self.received += 1
        if subject is not None and not self._subject_names(subject, event.path):
            self._drop("subject_mismatch")
            return
        reason = check_event(event)
        if reason is not None:
            self._drop(reason)
            return
        if live and self.lag_observer is not None:
            self._observe_lag(event.time)
        if self.on_received is not None:
            self.on_received(event)
        if event.instance_id == self.instance_id or self._handler is None:
            # Our own write: the cache and listeners already know. A forged event naming our
            # id is ignored just the same, which changes nothing here (not even an eviction).
            return
        if isinstance(event, NewVersionEvent):
            self._handler.apply_change(event.path, event.version)
        elif isinstance(event, SecretDeleted | SecretUndeleted | SecretDestroyed):
            self._handler.apply_lifecycle(event)
        # A failed rotation changed nothing in Vault: there is nothing to apply.

    def _subject_names(self, subject: str, path: str) -> bool:
        try:
            return path_from_subject(self.prefix, subject) == path
        except ValueError:
            return False  # not the canonical subject of any path

    def _drop(self, reason: str) -> None:
        count = self.dropped[reason] = self.dropped[reason] + 1
        # At 1, 2, 4, 8, ... and without the path: a flood of these must not flood the log.
        if count & (count - 1) == 0:
            log.warning("change event dropped", extra={"reason": reason, "count": count})

    def _observe_lag(self, sent: str) -> None:
        try:
            at = datetime.fromisoformat(sent).timestamp()
        except ValueError:
            return
        if self.lag_observer is not None:
            self.lag_observer(max(0.0, self._clock() - at))

    async def _on_disconnected(self) -> None:
        self.disconnects += 1
        if self._disconnected_at is None:
            self._disconnected_at = self._clock()
        log.warning("NATS disconnected: cached entries now served within the fallback TTL")
        if self._handler is not None:
            self._handler.bus_down()
        for listener in self.state_listeners:
            listener(False)

    async def _on_reconnected(self) -> None:
        since = self._disconnected_at
        self._disconnected_at = None
        log.info("NATS reconnected: cache dropped, replaying missed events")
        if self._handler is not None:
            # Invalidations may have been missed: drop the cache first, then tell listeners
            # what changed meanwhile.
            self._handler.bus_up(replayed=False)
        if since is not None:
            self._spawn(self._replay(since - 2.0))
        for listener in self.state_listeners:
            listener(True)

    async def _replay(self, since: float) -> None:
        """Feed the events stored since `since` (epoch seconds) to the handler."""
        if self.js is None:
            return
        start = datetime.fromtimestamp(since, UTC)
        try:
            # Up to the last sequence the stream's leader reports, not until `num_pending` says
            # 0: a consumer on a replica still catching up counts against its own lagging copy.
            last = int((await self.js.stream_info(CHANGE_STREAM)).state.last_seq)
            sub = await self.js.subscribe(
                f"{self.prefix}.changed.>",
                stream=CHANGE_STREAM,  # named: no stream lookup, one permission fewer
                ordered_consumer=True,
                deliver_policy=js_api.DeliverPolicy.BY_START_TIME,
                config=js_api.ConsumerConfig(opt_start_time=start),
            )
        except (NatsError, JsError, TimeoutError) as exc:
            log.warning(
                "replay failed", extra={"error_type": type(exc).__name__, "error": str(exc)}
            )
            return
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except TimeoutError:
                    break
                self._handle(msg.data, msg.subject)
                if msg.metadata.sequence.stream >= last:
                    break
        except (NatsError, JsError) as exc:
            log.warning("replay interrupted", extra={"error_type": type(exc).__name__})
        finally:
            try:
                await sub.unsubscribe()
            except (NatsError, JsError):
                pass

    async def _on_error(self, exc: Exception) -> None:
        if self._last_error is None or is_telling(exc):
            self._last_error = exc  # a refusal is not hidden by the reset that follows it
        extra = {"error_type": type(exc).__name__, "error": describe_error(exc)}
        log.warning("NATS error", extra=extra)


def check_event(event: ChangeEvent) -> str | None:
    """Why `event` must be dropped (a `DROP_REASONS` entry), or None if its numbers are sane.

    A write names a version from 1 to 2^53; a lifecycle event the path's current version (0
    when its whole history is gone) and at most `MAX_EVENT_VERSIONS` versions, each from 1 to
    2^53; the path is a valid secret path; no text field is longer than its kind ever is. The
    schema already refuses negative
    numbers and wrong types, and the subject check the path's length.
    """
    if not is_valid_path(event.path):  # the path rules every route applies, for events too
        return "out_of_range"
    lowest = 1 if isinstance(event, NewVersionEvent) else 0
    if not lowest <= event.version <= MAX_EVENT_VERSION:
        return "out_of_range"
    versions = getattr(event, "versions", ())
    if len(versions) > MAX_EVENT_VERSIONS or any(v > MAX_EVENT_VERSION for v in versions):
        return "out_of_range"
    if any(len(getattr(event, name)) > limit for name, limit in _MAX_FIELD.items()):
        return "out_of_range"
    if isinstance(event, SecretRotated) and not event.previous_version < event.version:
        return "out_of_range"
    if isinstance(event, SecretRotationFailed) and any(
        len(getattr(event, name)) > limit for name, limit in _MAX_ROTATION_FIELD.items()
    ):
        return "out_of_range"
    return None

"""The service's side of the bus: publish change events, apply other instances' events.

One NATS connection per instance. Writes are announced on `<prefix>.changed.<path>` through
JetStream (stored in SECRETS_EVENTS for replay); every instance listens on a core subscription,
which is the fastest path, and replays from the stream after a reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import api as js_api
from nats.js.errors import Error as JsError

from events.subjects import changed_subject
from schemas.events import (
    ChangeEvent,
    LifecycleEvent,
    SecretCreated,
    SecretUpdated,
    event_decoder,
    event_encoder,
)
from service.errors import ConfigError

__all__ = ["AUDIT_STREAM", "CHANGE_STREAM", "ChangeHandler", "EventBus", "ensure_stream"]

log = logging.getLogger("secrets.events")

CHANGE_STREAM = "SECRETS_EVENTS"
AUDIT_STREAM = "SECRETS_AUDIT"
AUDIT_MAX_AGE = 90 * 86400  # seconds JetStream keeps audit records; export them to keep more


class ChangeHandler(Protocol):
    """What the bus drives: the manager (see SecretsManager)."""

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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.servers = list(servers)
        self.prefix = prefix
        self.instance_id = instance_id
        self.publish_attempts = publish_attempts
        self.publish_timeout = publish_timeout
        self.replicas = replicas
        self._clock = clock
        self.nc: NATS | None = None
        self.js: Any = None
        self._handler: ChangeHandler | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._disconnected_at: float | None = None
        self.published = 0
        self.publish_failures = 0
        self.received = 0
        self.decode_errors = 0
        self.disconnects = 0
        self.on_received: Callable[[ChangeEvent], None] | None = None
        # Told, for each live (not replayed) event, the seconds from its `time` to receipt.
        self.lag_observer: Callable[[float], None] | None = None

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def connect(self, handler: ChangeHandler, *, connect_timeout: float = 5.0) -> None:
        self._handler = handler
        try:
            # Bounded here: with endless reconnects, nats-py retries a first connection forever
            # too, so a wrong SECRETS_NATS_URL would hang the start instead of naming it.
            self.nc = await asyncio.wait_for(
                nats.connect(
                    servers=self.servers,
                    name=f"secrets-service-{self.instance_id}",
                    connect_timeout=connect_timeout,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    allow_reconnect=True,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                ),
                connect_timeout * (len(self.servers) + 1),
            )
        except (OSError, NatsError, TimeoutError) as exc:
            raise ConfigError(
                "SECRETS_NATS_URL", f"cannot connect to NATS: {type(exc).__name__}"
            ) from None
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
                break
            except (NatsError, JsError, TimeoutError) as exc:
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
        task = asyncio.get_running_loop().create_task(self._publish(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, event: ChangeEvent) -> None:
        subject = changed_subject(self.prefix, event.path)
        payload = event_encoder.encode(event)
        headers = {"Nats-Msg-Id": event.event_id}  # JetStream drops a retried duplicate
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
                    extra={
                        "path": event.path,
                        "version": event.version,
                        "attempt": attempt,
                        "error_type": type(exc).__name__,
                    },
                )
                if attempt < self.publish_attempts:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
        self.publish_failures += 1
        log.error(
            "event not published; other instances fall back to the version check",
            extra={"path": event.path, "version": event.version},
        )

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
        self._handle(msg.data, live=True)

    def _handle(self, data: bytes, *, live: bool = False) -> None:
        try:
            event = event_decoder.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            self.decode_errors += 1
            log.warning("undecodable change event dropped")
            return
        self.received += 1
        if live and self.lag_observer is not None:
            self._observe_lag(event.time)
        if self.on_received is not None:
            self.on_received(event)
        if event.instance_id == self.instance_id or self._handler is None:
            return  # our own write: the cache and listeners already know
        if isinstance(event, SecretCreated | SecretUpdated):
            self._handler.apply_change(event.path, event.version)
        else:
            self._handler.apply_lifecycle(event)

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

    async def _on_reconnected(self) -> None:
        since = self._disconnected_at
        self._disconnected_at = None
        log.info("NATS reconnected: cache dropped, replaying missed events")
        if self._handler is not None:
            # Invalidations may have been missed: drop the cache first, then tell listeners
            # what changed meanwhile.
            self._handler.bus_up(replayed=False)
        if since is not None:
            task = asyncio.get_running_loop().create_task(self._replay(since - 2.0))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _replay(self, since: float) -> None:
        """Feed the events stored since `since` (epoch seconds) to the handler."""
        if self.js is None:
            return
        start = datetime.fromtimestamp(since, UTC)
        try:
            sub = await self.js.subscribe(
                f"{self.prefix}.changed.>",
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
                self._handle(msg.data)
                if msg.metadata.num_pending == 0:
                    break
        except (NatsError, JsError) as exc:
            log.warning("replay interrupted", extra={"error_type": type(exc).__name__})
        finally:
            try:
                await sub.unsubscribe()
            except (NatsError, JsError):
                pass

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS error", extra={"error_type": type(exc).__name__})

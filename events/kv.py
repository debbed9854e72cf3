"""JetStream key-value buckets of the service (the poller's lease, the cluster's cache interest):
creating them beside the streams, and `NatsKv`, one bucket with nats errors turned into ours.

The compare-and-set is JetStream's: `create` stores a key only if it holds no value, `update`
only if its last revision is the one given. A bucket's `ttl` (the stream's max_age) removes a
value not rewritten within it, which is how a dead instance's lease and interest lapse.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any, NamedTuple, Protocol

import nats.js.errors
from nats.errors import Error as NatsError
from nats.js import api as js_api
from nats.js.errors import Error as JsError
from nats.js.kv import KeyValue

from events.connection import describe_error

__all__ = [
    "INTEREST_BUCKET",
    "LEASE_BUCKET",
    "KvConflict",
    "KvEntry",
    "KvError",
    "KvStore",
    "NatsKv",
    "ensure_bucket",
]

LEASE_BUCKET = "SECRETS_POLLER"
INTEREST_BUCKET = "SECRETS_INTEREST"
_KV_DEL = "DEL"
_KV_PURGE = "PURGE"


class KvError(Exception):
    """The bucket did not answer, or refused (no permission, not connected). Its text names
    what went wrong, never the error's own text (which may hold a server URL)."""


class KvConflict(KvError):
    """A compare-and-set lost: the key holds a value (`create`) or another revision (`update`)."""


class KvEntry(NamedTuple):
    """One value seen by a watch; `value` is None for a deletion. `age`: seconds since the
    bucket stored it, by the server's clock (0 when unknown)."""

    key: str
    value: bytes | None
    revision: int
    age: float = 0.0


class KvStore(Protocol):
    """What the poller needs of a bucket (`NatsKv`; a fake in the unit tests)."""

    async def create(self, key: str, value: bytes) -> int: ...

    async def update(self, key: str, value: bytes, revision: int) -> int: ...

    async def put(self, key: str, value: bytes) -> int: ...

    async def delete(self, key: str, revision: int | None = None) -> None: ...

    def watch(self, pattern: str) -> AsyncGenerator[KvEntry | None, None]: ...


async def ensure_bucket(js: Any, name: str, *, ttl: float, replicas: int = 1) -> NatsKv:
    """Create bucket `name` (one value a key, values kept `ttl` seconds), or bring an existing
    one to that ttl and replication: safe to call at every start. Raises nats errors (the
    bus's start-up loop waits out a JetStream cluster that is still electing)."""
    stream = f"KV_{name}"
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        config = js_api.KeyValueConfig(bucket=name, ttl=ttl, replicas=replicas, history=1)
        return NatsKv(await js.create_key_value(config))
    current = info.config
    if current.max_age != ttl or current.num_replicas != replicas:
        # Each update is a round of the JetStream cluster's consensus: only when needed.
        current.max_age = ttl
        current.num_replicas = replicas
        current.duplicate_window = min(current.duplicate_window or ttl, ttl)
        await js.update_stream(current)
    return NatsKv(await js.key_value(name))


class NatsKv:
    """One JetStream bucket: every nats error becomes `KvConflict` or `KvError` here."""

    def __init__(self, kv: KeyValue, *, timeout: float = 2.0) -> None:
        self._kv = kv
        self.timeout = timeout

    async def create(self, key: str, value: bytes) -> int:
        try:
            return await asyncio.wait_for(self._kv.create(key, value), self.timeout)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise KvConflict(key) from None
        except (NatsError, JsError, TimeoutError, ConnectionError) as exc:
            raise KvError(describe_error(exc)) from None

    async def update(self, key: str, value: bytes, revision: int) -> int:
        try:
            return await asyncio.wait_for(self._kv.update(key, value, last=revision), self.timeout)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise KvConflict(key) from None
        except (NatsError, JsError, TimeoutError, ConnectionError) as exc:
            raise KvError(describe_error(exc)) from None

    async def put(self, key: str, value: bytes) -> int:
        try:
            return await asyncio.wait_for(self._kv.put(key, value), self.timeout)
        except (NatsError, JsError, TimeoutError, ConnectionError) as exc:
            raise KvError(describe_error(exc)) from None

    async def delete(self, key: str, revision: int | None = None) -> None:
        try:
            await asyncio.wait_for(self._kv.delete(key, last=revision), self.timeout)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise KvConflict(key) from None
        except (NatsError, JsError, TimeoutError, ConnectionError) as exc:
            raise KvError(describe_error(exc)) from None

    async def watch(self, pattern: str) -> AsyncGenerator[KvEntry | None, None]:
        """The current value of every key matching `pattern`, then None, then each change as
        it is made, until the caller stops iterating. A value expired by the ttl is not told:
        watchers age what they hold themselves."""
        try:
            watcher = await asyncio.wait_for(self._kv.watch(pattern), self.timeout)
        except (NatsError, JsError, TimeoutError, ConnectionError) as exc:
            raise KvError(describe_error(exc)) from None
        try:
            async for entry in watcher:
                if entry is None:
                    yield None
                    continue
                deleted = entry.operation in (_KV_DEL, _KV_PURGE)
                value = None if deleted else (entry.value or b"")
                stored: Any = entry.created  # a datetime, although typed int
                age = max(0.0, time.time() - stored.timestamp()) if stored else 0.0
                yield KvEntry(entry.key, value, entry.revision or 0, age)
        finally:
            try:
                await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it bare
            except (NatsError, JsError, TimeoutError, ConnectionError):
                pass

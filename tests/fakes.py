"""Fakes at the seams, each checked against its protocol at the end: KV v2 in memory and a spy
(VaultBackend), an event sink, a bus handler, an audit publisher; a clock; forged event bytes.

No server, no thread, no network: each fake records what it was asked so tests can count calls.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from events.kv import KvConflict, KvEntry, KvError
from schemas.api import SecretMetadata, VersionMetadata
from schemas.audit import AuditRecord, audit_decoder
from schemas.errors import NotFound, VaultUnavailable, VersionConflict
from schemas.events import ChangeEvent, LifecycleEvent, SecretUpdated, event_encoder
from schemas.secret import Secret, SecretData

if TYPE_CHECKING:
    from events.bus import ChangeHandler
    from events.kv import KvStore
    from service.audit.log import AuditPublisher
    from service.core import EventSink
    from service.rotation.logins import Logins
    from service.vault import VaultBackend

__all__ = [
    "FakeClock",
    "FakeKeyValue",
    "FakeLogins",
    "FakePublisher",
    "FakeVault",
    "RecordingHandler",
    "RecordingSink",
    "SpyBackend",
    "forged",
    "lifecycle_event",
]


class FakeVault:
    """KV v2 in memory, following the `service.vault.VaultBackend` protocol.

    Versions start at 1. `write(path, data, cas)` succeeds only if `cas` is the current version
    (0: the path must not exist yet), else VersionConflict(current_version=...). Data is stored
    as JSON, as Vault stores it, so a value JSON cannot hold fails here as it would over HTTP.

    A read takes its snapshot when called, then waits `delay` seconds: Vault has answered and the
    response is on its way, which is the window where a change event can overtake it.
    `calls["read"]` etc. count every call, including failed ones.

    Versions can be soft-deleted, undeleted and destroyed as in KV v2: reading one that is
    deleted or destroyed (or the latest, when it is) raises NotFound; unknown versions are
    passed over silently, as Vault does.
    """

    def __init__(self, *, delay: float = 0.0, write_delay: float = 0.0) -> None:
        self.delay = delay
        self.write_delay = write_delay
        self.calls: Counter[str] = Counter()
        self.closed = False
        self._versions: dict[str, list[Secret]] = {}
        self._failures = 0
        # KV v2 lifecycle: path -> {version: deletion time}, path -> destroyed versions.
        self._deleted: dict[str, dict[int, str]] = {}
        self._destroyed: dict[str, set[int]] = {}

    # -- test hooks --------------------------------------------------------------------------

    def fail_next(self, times: int = 1) -> None:
        """Make the next `times` calls (any method) raise VaultUnavailable."""
        self._failures += times

    def seed(self, path: str, data: Mapping[str, Any], *, at: datetime | None = None) -> Secret:
        """Write the next version of `path` directly, as another instance would: not counted.

        `at`: its created_time (default now)."""
        return self._store(path, data, at)

    def current(self, path: str) -> int:
        return len(self._versions.get(path, ()))

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    # -- VaultBackend ------------------------------------------------------------------------

    async def read(self, path: str, version: int | None = None) -> Secret:
        self.calls["read"] += 1
        failing = self._take_failure()
        versions = list(self._versions.get(path, ()))
        gone = set(self._deleted.get(path, {})) | self._destroyed.get(path, set())
        if self.delay:
            await asyncio.sleep(self.delay)
        if failing:  # after the delay, as a timeout would: concurrent readers share it
            raise VaultUnavailable("the secrets backend is unavailable", path=path)
        if not versions:
            raise NotFound("no secret at this path", path=path)
        number = len(versions) if version is None else version
        if number in gone:
            raise NotFound("no secret at this path", path=path)  # as raise_on_deleted_version
        if version is None:
            return versions[-1]
        if not 1 <= version <= len(versions):
            raise NotFound("no such version", path=path)
        return versions[version - 1]

    async def write(self, path: str, data: Mapping[str, Any], cas: int) -> Secret:
        self._enter("write")
        current = self.current(path)
        if cas != current:
            raise VersionConflict(
                f"the current version is {current}, not {cas}",
                path=path,
                current_version=current,
            )
        secret = self._store(path, data)
        if self.write_delay:
            await asyncio.sleep(self.write_delay)
        return secret

    async def current_version(self, path: str) -> int:
        self._enter("current_version")
        return self.current(path)

    async def read_metadata(self, path: str) -> SecretMetadata:
        self._enter("read_metadata")
        versions = self._versions.get(path)
        if not versions:
            raise NotFound("no secret at this path", path=path)
        deleted = self._deleted.get(path, {})
        destroyed = self._destroyed.get(path, set())
        return SecretMetadata(
            path=path,
            current_version=len(versions),
            created_time=versions[0].created_time,
            updated_time=versions[-1].created_time,
            versions=tuple(
                VersionMetadata(
                    version=s.version,
                    created_time=s.created_time,
                    deletion_time=deleted.get(s.version),
                    deleted=s.version in deleted,
                    destroyed=s.version in destroyed,
                )
                for s in versions
            ),
        )

    async def list_keys(self, prefix: str) -> list[str]:
        self._enter("list_keys")
        keys: set[str] = set()
        for path in self._versions:
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1 :] if prefix else path
            head, slash, _ = rest.partition("/")
            keys.add(head + slash)
        if not keys:
            raise NotFound("nothing under this prefix", path=prefix)
        return sorted(keys)

    async def delete_versions(self, path: str, versions: Sequence[int]) -> None:
        """KV v2: unknown, deleted and destroyed versions are passed over silently."""
        self._enter("delete_versions")
        now = datetime.now(UTC).isoformat(timespec="microseconds")
        deleted = self._deleted.setdefault(path, {})
        for version in self._known_versions(path, versions):
            if version not in self._destroyed.get(path, ()):
                deleted.setdefault(version, now)

    async def undelete_versions(self, path: str, versions: Sequence[int]) -> None:
        self._enter("undelete_versions")
        for version in versions:
            self._deleted.get(path, {}).pop(version, None)

    async def destroy_versions(self, path: str, versions: Sequence[int]) -> None:
        self._enter("destroy_versions")
        for version in self._known_versions(path, versions):
            self._destroyed.setdefault(path, set()).add(version)
            self._deleted.get(path, {}).pop(version, None)

    def _known_versions(self, path: str, versions: Sequence[int]) -> list[int]:
        return [v for v in versions if 1 <= v <= self.current(path)]

    async def ping(self) -> None:
        self._enter("ping")

    async def aclose(self) -> None:
        self.calls["aclose"] += 1
        self.closed = True

    # -- internals ---------------------------------------------------------------------------

    def _enter(self, method: str) -> None:
        self.calls[method] += 1
        if self._take_failure():
            raise VaultUnavailable("the secrets backend is unavailable")

    def _take_failure(self) -> bool:
        if self._failures:
            self._failures -= 1
            return True
        return False

    def _store(self, path: str, data: Mapping[str, Any], at: datetime | None = None) -> Secret:
        stored = json.loads(json.dumps(dict(data)))  # TypeError for what JSON cannot hold
        versions = self._versions.setdefault(path, [])
        secret = Secret(
            path=path,
            version=len(versions) + 1,
            data=SecretData(stored),
            created_time=(at or datetime.now(UTC)).isoformat(timespec="microseconds"),
        )
        versions.append(secret)
        return secret


class SpyBackend:
    """Another VaultBackend (the real one, in integration tests) with every path it was asked
    about recorded, in order."""

    def __init__(self, inner: VaultBackend) -> None:
        self.inner = inner
        self.paths: list[str] = []

    async def read(self, path: str, version: int | None = None) -> Secret:
        self.paths.append(path)
        return await self.inner.read(path, version)

    async def write(self, path: str, data: Mapping[str, Any], cas: int) -> Secret:
        self.paths.append(path)
        return await self.inner.write(path, data, cas)

    async def current_version(self, path: str) -> int:
        self.paths.append(path)
        return await self.inner.current_version(path)

    async def read_metadata(self, path: str) -> SecretMetadata:
        self.paths.append(path)
        return await self.inner.read_metadata(path)

    async def list_keys(self, prefix: str) -> list[str]:
        self.paths.append(prefix)
        return await self.inner.list_keys(prefix)

    async def delete_versions(self, path: str, versions: Sequence[int]) -> None:
        self.paths.append(path)
        await self.inner.delete_versions(path, versions)

    async def undelete_versions(self, path: str, versions: Sequence[int]) -> None:
        self.paths.append(path)
        await self.inner.undelete_versions(path, versions)

    async def destroy_versions(self, path: str, versions: Sequence[int]) -> None:
        self.paths.append(path)
        await self.inner.destroy_versions(path, versions)

    async def ping(self) -> None:
        await self.inner.ping()

    async def aclose(self) -> None:
        await self.inner.aclose()


class RecordingSink:
    """An EventSink that keeps every event published, in order."""

    def __init__(self) -> None:
        self.events: list[ChangeEvent] = []

    def publish(self, event: ChangeEvent) -> None:
        self.events.append(event)


class FakePublisher:
    """An AuditPublisher (the NATS side of the audit log): keeps what it was given; `ok = False`
    makes it refuse."""

    def __init__(self) -> None:
        self.ok = True
        self.connected = True
        self.delay = 0.0
        self.published: list[tuple[str, bytes]] = []
        self.acknowledged: list[bool] = []

    async def publish_audit(self, op: str, payload: bytes, *, acknowledged: bool = True) -> bool:
        self.acknowledged.append(acknowledged)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.ok:
            self.published.append((op, payload))
        return self.ok

    def records(self) -> list[AuditRecord]:
        """What was published, record by record: a payload holds one or more, a line each."""
        return [
            audit_decoder.decode(line) for _, data in self.published for line in data.split(b"\n")
        ]


class RecordingHandler:
    """A ChangeHandler (what the bus drives, the manager's place) that keeps what it was handed,
    in order: `calls` every event, `changes` the (path, version) of each apply_change."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.changes: list[tuple[str, int]] = []

    def apply_change(self, path: str, version: int) -> None:
        self.calls.append(("change", (path, version)))
        self.changes.append((path, version))

    def apply_lifecycle(self, event: LifecycleEvent) -> None:
        self.calls.append(("lifecycle", event))

    def bus_down(self) -> None: ...

    def bus_up(self, *, replayed: bool = False) -> None: ...


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeLogins:
    """The database a postgres rotation changes, in memory: role -> the password it accepts
    (None: no password login). `fail` makes `apply` raise it, as a database that is down."""

    def __init__(self) -> None:
        self.passwords: dict[str, str | None] = {}
        self.retired: dict[str, float] = {}  # role -> grace it was given when retired
        self.calls: list[str] = []
        self.fail: Exception | None = None

    def plan(
        self, data: Mapping[str, Any], new_password: str, *, alternating: bool
    ) -> dict[str, Any]:
        if not alternating:
            return {"password": new_password}
        username = str(data["username"])
        twin = username[: -len("_clone")] if username.endswith("_clone") else username + "_clone"
        return {"username": twin, "password": new_password}

    async def apply(
        self,
        base: Mapping[str, Any],
        pending: Mapping[str, Any],
        master: Mapping[str, Any] | None,
    ) -> None:
        self.calls.append("apply")
        if self.fail is not None:
            raise self.fail
        self.passwords[str(pending.get("username", base["username"]))] = str(pending["password"])

    async def finish(
        self,
        base: Mapping[str, Any],
        pending: Mapping[str, Any],
        master: Mapping[str, Any] | None,
        grace: float,
    ) -> None:
        self.calls.append("finish")
        if master is not None:
            self.retired[str(base["username"])] = grace

    async def undo(
        self,
        latest: Mapping[str, Any] | None,
        base: Mapping[str, Any],
        pending: Mapping[str, Any],
        master: Mapping[str, Any] | None,
    ) -> None:
        self.calls.append("undo")
        if self.fail is not None:
            raise self.fail
        role = str(pending.get("username", base["username"]))
        if latest is not None and latest.get("username") == role:
            self.passwords[role] = str(latest["password"])
        else:
            self.passwords[role] = None if master is not None else str(base["password"])


def lifecycle_event(
    kind: type[Any], *versions: int, version: int = 3, event_id: str = "ev-1", path: str = "app/db"
) -> Any:
    """A lifecycle event of `kind` (SecretDeleted, ...) as another instance publishes it."""
    return kind(
        event_id=event_id,
        path=path,
        version=version,
        versions=versions,
        actor="bob",
        instance_id="elsewhere",
        time="2026-11-28T00:00:00+00:00",
    )


def forged(kind: type[Any] = SecretUpdated, **fields: Any) -> bytes:
    """The payload of a `kind` event as a forger publishes it: `fields` over a fresh event id,
    actor `mallory`, instance `forger` and the time now."""
    values: dict[str, Any] = {
        "event_id": uuid.uuid4().hex,
        "actor": "mallory",
        "instance_id": "forger",
        "time": datetime.now(UTC).isoformat(),
    }
    values.update(fields)
    return event_encoder.encode(kind(**values))


class FakeKeyValue:
    """A JetStream key-value bucket in memory, following `events.kv.KvStore`.

    `create` and `update` compare and set on revisions as JetStream does; a value not rewritten
    within `ttl` seconds of `clock` is gone, as the bucket's max_age removes it (and, as there,
    watchers are not told). A watch yields the current values of its keys (with their age),
    None, then each change. `down = True` makes every call raise KvError; `calls` counts them
    by method.
    """

    def __init__(
        self, *, ttl: float = math.inf, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.clock = clock
        self.down = False
        self.calls: Counter[str] = Counter()
        self.revision = 0
        self._values: dict[str, tuple[int, bytes, float]] = {}  # key -> revision, value, at
        self._watchers: list[tuple[str, asyncio.Queue[KvEntry | None]]] = []

    def value(self, key: str) -> bytes | None:
        """What `key` holds now (None: nothing, or expired)."""
        live = self._live(key)
        return None if live is None else live[1]

    def keys(self) -> list[str]:
        return sorted(k for k in list(self._values) if self._live(k) is not None)

    def _live(self, key: str) -> tuple[int, bytes, float] | None:
        found = self._values.get(key)
        if found is not None and self.clock() - found[2] >= self.ttl:
            del self._values[key]
            return None
        return found

    def _enter(self, method: str) -> None:
        self.calls[method] += 1
        if self.down:
            raise KvError("bucket unreachable")

    def _store(self, key: str, value: bytes | None) -> int:
        self.revision += 1
        if value is None:
            self._values.pop(key, None)
        else:
            self._values[key] = (self.revision, value, self.clock())
        for pattern, queue in self._watchers:
            if _matches(pattern, key):
                queue.put_nowait(KvEntry(key, value, self.revision))
        return self.revision

    async def create(self, key: str, value: bytes) -> int:
        self._enter("create")
        if self._live(key) is not None:
            raise KvConflict(key)
        return self._store(key, value)

    async def update(self, key: str, value: bytes, revision: int) -> int:
        self._enter("update")
        live = self._live(key)
        if live is None or live[0] != revision:
            raise KvConflict(key)
        return self._store(key, value)

    async def put(self, key: str, value: bytes) -> int:
        self._enter("put")
        return self._store(key, value)

    async def delete(self, key: str, revision: int | None = None) -> None:
        self._enter("delete")
        live = self._live(key)
        if revision and (live is None or live[0] != revision):
            raise KvConflict(key)
        self._store(key, None)

    async def watch(self, pattern: str) -> AsyncGenerator[KvEntry | None, None]:
        self._enter("watch")
        queue: asyncio.Queue[KvEntry | None] = asyncio.Queue()
        for key in self.keys():
            revision, value, at = self._values[key]
            queue.put_nowait(KvEntry(key, value, revision, self.clock() - at))
        queue.put_nowait(None)
        watcher = (pattern, queue)
        self._watchers.append(watcher)
        try:
            while True:
                yield await queue.get()
        finally:
            self._watchers.remove(watcher)


def _matches(pattern: str, key: str) -> bool:
    """A NATS subject pattern: `*` one token, `>` the rest."""
    want, have = pattern.split("."), key.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or token not in ("*", have[i]):
            return False
    return len(want) == len(have)


if TYPE_CHECKING:
    # mypy proves each fake stands in for the protocol it replaces (tests are type-checked,
    # strict): a method missing or with another signature fails the check before a test runs.
    _vault: VaultBackend = FakeVault()
    _spy: VaultBackend = SpyBackend(FakeVault())
    _sink: EventSink = RecordingSink()
    _handler: ChangeHandler = RecordingHandler()
    _publisher: AuditPublisher = FakePublisher()
    _logins: Logins = FakeLogins()
    _kv: KvStore = FakeKeyValue()

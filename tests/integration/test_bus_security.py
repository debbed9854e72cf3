"""Forged bus messages: whoever can publish on the change subjects must not be able to stop an
instance caching a path, silence its listeners, or make it flood Vault.

The integration tests publish forged messages with a plain nats-py connection to a real
nats-server, next to real instances (SecretsManager + EventBus) on a real OpenBao.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import msgspec
import nats as nats_client
import pytest
from prometheus_client import generate_latest

from devstack import NatsEndpoint, OpenBaoEndpoint
from events.bus import EventBus, check_event
from events.subjects import changed_subject
from schemas.api import SecretMetadata
from schemas.errors import VaultUnavailable
from schemas.events import SecretDestroyed, SecretUpdated, event_encoder
from schemas.secret import Secret, SecretData
from service.core.manager import SecretsManager
from service.obs.metrics import Metrics
from service.vault.backend import HvacBackend
from tests.fakes import FakeVault, RecordingHandler, eventually
from tests.support import metric_value, record_figures

PREFIX = "secrets"
SETTLE = 10.0  # seconds allowed for events and checks to land on this noisy machine


class CountingVault:
    """A real backend that counts the manager's calls; metadata reads can be held back."""

    def __init__(self, inner: HvacBackend) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.hold: asyncio.Event | None = None

    async def read(self, path: str, version: int | None = None) -> Secret:
        self.calls["read"] += 1
        return await self.inner.read(path, version)

    async def write(self, path: str, data: Mapping[str, Any], cas: int) -> Secret:
        self.calls["write"] += 1
        return await self.inner.write(path, data, cas)

    async def current_version(self, path: str) -> int:
        self.calls["metadata"] += 1
        await self._held()
        return await self.inner.current_version(path)

    async def read_metadata(self, path: str) -> SecretMetadata:
        self.calls["metadata"] += 1
        await self._held()
        return await self.inner.read_metadata(path)

    async def _held(self) -> None:
        if self.hold is not None:
            await self.hold.wait()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Instance:
    def __init__(
        self, manager: SecretsManager, bus: EventBus, vault: CountingVault, *, listen: bool = True
    ) -> None:
        self.manager = manager
        self.bus = bus
        self.vault = vault
        self.metrics = Metrics()
        self.metrics.bind(manager=manager, bus=bus)
        self.heard: list[tuple[str, dict[str, Any] | None]] = []

        async def listener(path: str, value: SecretData | None) -> None:
            self.heard.append((path, None if value is None else dict(value.reveal())))

        if listen:
            manager.add_listener("test", listener)

    def dropped(self, reason: str) -> float:
        text = generate_latest(self.metrics.registry).decode()
        return metric_value(text, "secrets_events_dropped_total", reason=reason)

    def settled(self) -> bool:
        return self.manager.pending_checks == 0


@contextlib.asynccontextmanager
async def instance(
    openbao: OpenBaoEndpoint,
    nats: NatsEndpoint,
    name: str,
    *,
    listen: bool = True,
    **options: Any,
) -> AsyncIterator[Instance]:
    vault = CountingVault(HvacBackend(openbao.addr, token=openbao.root_token))
    bus = EventBus([nats.url], PREFIX, instance_id=name)
    manager = SecretsManager(vault, events=bus, instance_id=name, **options)
    try:
        await bus.connect(manager)
        yield Instance(manager, bus, vault, listen=listen)
    finally:
        await manager.aclose()
        await bus.aclose()
        await vault.inner.aclose()


@contextlib.asynccontextmanager
async def forger(nats: NatsEndpoint) -> AsyncIterator[Any]:
    nc = await nats_client.connect(nats.url)
    try:
        yield nc
    finally:
        await nc.close()


def forged(kind: type[Any] = SecretUpdated, **fields: Any) -> bytes:
    values: dict[str, Any] = {
        "event_id": uuid.uuid4().hex,
        "actor": "mallory",
        "instance_id": "forger",
        "time": datetime.now(UTC).isoformat(),
    }
    values.update(fields)
    return event_encoder.encode(kind(**values))


def unique_path(tag: str) -> str:
    return f"forged/{tag}-{uuid.uuid4().hex[:8]}/key"


async def received(bus: EventBus, count: int) -> None:
    await eventually(lambda: bus.received >= count, timeout=SETTLE)


async def cached_on_b(a: Instance, b: Instance, path: str, writes: int = 1) -> None:
    """Write `writes` versions of `path` through A (`{"v": "1"}`, ...), wait until B's listeners
    heard the last, and have B cache it."""
    for n in range(1, writes + 1):
        await a.manager.set(path, {"v": str(n)}, n - 1)
    await eventually(lambda: (path, {"v": str(writes)}) in b.heard, timeout=SETTLE)
    await b.manager.get(path)


async def written_by_a(a: Instance, b: Instance, path: str, n: int) -> None:
    """Write `{"v": "<n>"}` as version n of `path` through A; return once B received its event."""
    start = b.bus.received
    await a.manager.set(path, {"v": str(n)}, n - 1)
    await received(b.bus, start + 1)


async def forge(nats: NatsEndpoint, inst: Instance, subject: str, payload: bytes) -> None:
    """Publish `payload` on `subject` as a forger would; return once `inst` received it and
    settled what it checks."""
    start = inst.bus.received
    async with forger(nats) as nc:
        await nc.publish(subject, payload)
        await nc.flush()
    await received(inst.bus, start + 1)
    await eventually(inst.settled, timeout=SETTLE)


async def reads_for(inst: Instance, path: str, times: int, version: int | None = None) -> int:
    """How many Vault reads `times` gets of `path` took."""
    before = inst.vault.calls["read"]
    for _ in range(times):
        await inst.manager.get(path, version)
    return inst.vault.calls["read"] - before


@pytest.fixture
async def pair(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint
) -> AsyncIterator[tuple[Instance, Instance]]:
    tag = uuid.uuid4().hex[:6]
    async with instance(openbao, nats, f"a-{tag}") as a, instance(openbao, nats, f"b-{tag}") as b:
        yield a, b


@pytest.fixture
async def quiet_pair(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint
) -> AsyncIterator[tuple[Instance, Instance]]:
    """Two instances; the second has no in-process listener."""
    tag = uuid.uuid4().hex[:6]
    async with (
        instance(openbao, nats, f"a-{tag}") as a,
        instance(openbao, nats, f"b-{tag}", listen=False) as b,
    ):
        yield a, b


# -- through a real nats-server ------------------------------------------------------------------


async def test_an_event_whose_payload_path_is_not_its_subjects_path_is_dropped_and_counted(
    pair: tuple[Instance, Instance], nats: NatsEndpoint
) -> None:
    a, b = pair
    path, other = unique_path("victim"), unique_path("other")
    await cached_on_b(a, b, path)
    # On another path's subject (which a publisher may be allowed), naming the victim.
    await forge(nats, b, changed_subject(PREFIX, other), forged(path=path, version=7))
    assert b.manager.cached_document(path) is not None, "the victim's entry was evicted"
    assert await reads_for(b, path, 3) == 0
    assert b.dropped("subject_mismatch") == 1
    assert b.vault.calls["metadata"] == 0, "a mismatched event costs no Vault read"


@pytest.mark.parametrize(
    ("version", "reason"), [(2**62, "out_of_range"), (1000, "beyond_vault")], ids=["2^62", "1000"]
)
async def test_a_forged_far_version_neither_stops_caching_nor_silences_listeners(
    pair: tuple[Instance, Instance], nats: NatsEndpoint, version: int, reason: str
) -> None:
    a, b = pair
    path = unique_path("far")
    await cached_on_b(a, b, path)
    await forge(nats, b, changed_subject(PREFIX, path), forged(path=path, version=version))
    # Evicted at most once (an eviction only costs a re-read), then cached again.
    assert await reads_for(b, path, 4) <= 1
    assert await reads_for(b, path, 4) == 0
    assert b.dropped(reason) == 1
    # A real write elsewhere still evicts here, and listeners hear of it.
    await a.manager.set(path, {"v": "2"}, 1)
    await eventually(lambda: (path, {"v": "2"}) in b.heard, timeout=SETTLE)
    assert (await b.manager.get(path)).data == {"v": "2"}
    assert await reads_for(b, path, 3) == 0


async def test_a_forged_next_version_is_rolled_back_and_the_real_one_is_still_heard(
    pair: tuple[Instance, Instance], nats: NatsEndpoint
) -> None:
    # One above what this instance knows: the fast path applies it at once, then checks it.
    a, b = pair
    path = unique_path("next")
    await cached_on_b(a, b, path)
    await forge(nats, b, changed_subject(PREFIX, path), forged(path=path, version=2))
    assert await reads_for(b, path, 4) <= 1
    assert await reads_for(b, path, 4) == 0
    assert b.dropped("beyond_vault") == 1
    await a.manager.set(path, {"v": "2"}, 1)
    await eventually(lambda: (path, {"v": "2"}) in b.heard, timeout=SETTLE)
    assert (await b.manager.get(path)).data == {"v": "2"}


async def test_a_forged_destroyed_event_for_a_live_version_does_not_stop_caching_it(
    pair: tuple[Instance, Instance], nats: NatsEndpoint
) -> None:
    a, b = pair
    path = unique_path("destroyed")
    await cached_on_b(a, b, path, writes=2)
    await b.manager.get(path, 1)
    heard_before = list(b.heard)
    payload = forged(SecretDestroyed, path=path, version=2, versions=(1, 2))
    await forge(nats, b, changed_subject(PREFIX, path), payload)
    for version in (None, 1):
        assert await reads_for(b, path, 3, version) <= 1
        assert await reads_for(b, path, 3, version) == 0, f"version {version} is not cached"
    assert b.heard == heard_before, "listeners were told of a destruction that did not happen"
    assert b.dropped("beyond_vault") == 1


async def test_a_flood_of_forged_events_for_distinct_paths_makes_a_bounded_number_of_vault_calls(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint
) -> None:
    flood = 10_000
    tag = uuid.uuid4().hex[:6]
    paths = [f"flood-{tag}/p{i}" for i in range(flood)]
    async with instance(openbao, nats, f"b-{tag}") as b, forger(nats) as nc:
        # One flooded path is real: it must stay cacheable after the flood.
        real = paths[-1]
        await b.manager.set(real, {"v": "1"}, 0)
        b.vault.hold = asyncio.Event()  # Vault answers no metadata read until the flood is in
        before = Counter(b.vault.calls)
        start = b.bus.received
        for i, path in enumerate(paths):
            await nc.publish(changed_subject(PREFIX, path), forged(path=path, version=5 + i))
        await nc.flush()
        await eventually(lambda: b.bus.received >= start + flood, timeout=60)
        in_flight = b.vault.calls - before
        b.vault.hold.set()
        await eventually(b.settled, timeout=60)
        await asyncio.sleep(0.2)  # listener reads started by settled checks
        calls = sum((b.vault.calls - before).values())
        limit = 2 * SecretsManager.VERIFY_QUEUE + SecretsManager.VERIFY_CONCURRENCY
        record_figures(
            "forged_flood",
            events=flood,
            metadata_in_flight=in_flight["metadata"],
            vault_calls=calls,
            overflowed=b.dropped("verify_overflow"),
        )
        assert in_flight["metadata"] <= SecretsManager.VERIFY_CONCURRENCY
        assert calls <= limit, f"{calls} Vault calls for {flood} forged events"
        assert b.dropped("verify_overflow") >= flood - SecretsManager.VERIFY_QUEUE
        assert await reads_for(b, real, 4) <= 1
        assert await reads_for(b, real, 4) == 0


async def test_an_event_claiming_our_own_instance_id_changes_nothing_here(
    pair: tuple[Instance, Instance], nats: NatsEndpoint
) -> None:
    a, b = pair
    path = unique_path("own")
    await cached_on_b(a, b, path)
    spoofed = forged(path=path, version=2**40, instance_id=b.manager.instance_id)
    await forge(nats, b, changed_subject(PREFIX, path), spoofed)
    assert await reads_for(b, path, 3) == 0
    await a.manager.set(path, {"v": "2"}, 1)
    await eventually(lambda: (path, {"v": "2"}) in b.heard, timeout=SETTLE)


async def test_writes_elsewhere_evict_on_an_instance_without_listeners_at_no_vault_cost(
    quiet_pair: tuple[Instance, Instance],
) -> None:
    a, b = quiet_pair
    path = unique_path("quiet")
    await written_by_a(a, b, path, 1)
    await b.manager.get(path)
    before = Counter(b.vault.calls)
    for version in (2, 3, 4):
        await written_by_a(a, b, path, version)
        assert b.manager.cached_document(path) is None, "the write elsewhere was not evicted"
    assert b.manager.pending_checks == 0
    assert b.vault.calls - before == Counter(), "the events cost Vault calls"
    # The next read confirms the newest version: one read, no metadata read, cached after.
    assert (await b.manager.get(path)).data == {"v": "4"}
    assert await reads_for(b, path, 3) == 0
    assert b.vault.calls - before == Counter(read=1)


async def test_a_forged_next_version_on_an_instance_without_listeners_ends_with_the_real_value(
    quiet_pair: tuple[Instance, Instance], nats: NatsEndpoint
) -> None:
    a, b = quiet_pair
    path = unique_path("quiet-next")
    await written_by_a(a, b, path, 1)
    await b.manager.get(path)
    before = Counter(b.vault.calls)
    await forge(nats, b, changed_subject(PREFIX, path), forged(path=path, version=2))
    assert b.manager.cached_document(path) is None
    assert b.vault.calls - before == Counter(), "the forged event cost a Vault call by itself"
    # The read meets the claim: one metadata read refutes it, and the real value is cached.
    assert (await b.manager.get(path)).data == {"v": "1"}
    assert b.vault.calls - before == Counter(read=1, metadata=1)
    assert await reads_for(b, path, 3) == 0
    assert b.dropped("beyond_vault") == 1
    # The real version 2 is still evicted and read when it comes.
    await written_by_a(a, b, path, 2)
    assert (await b.manager.get(path)).data == {"v": "2"}
    assert await reads_for(b, path, 3) == 0


# -- the bus's own checks (no server) ------------------------------------------------------------

VICTIM = "app/db.main"
VICTIM_SUBJECT = "secrets.changed.app.db%2Emain"


def offline_bus() -> tuple[EventBus, RecordingHandler]:
    bus = EventBus(["nats://unused"], PREFIX, instance_id="me")
    handler = RecordingHandler()
    bus._handler = handler
    return bus, handler


@pytest.mark.parametrize(
    "subject",
    [
        "secrets.changed.app.other",  # another path's subject
        "secrets.changed.app.db.main",  # app/db/main: three segments, not app/db.main
        "secrets.changed.app.db%2emain",  # a non-canonical escape
        "other.changed.app.db%2Emain",  # another prefix
        "secrets.audit.write",
    ],
)
def test_an_event_on_a_subject_that_names_another_path_never_reaches_the_handler(
    subject: str,
) -> None:
    bus, handler = offline_bus()
    seen: list[Any] = []
    bus.on_received = seen.append
    bus._handle(forged(path=VICTIM, version=2), subject)
    assert handler.calls == [] and seen == []
    assert bus.dropped["subject_mismatch"] == 1


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        (SecretUpdated, {"version": 0}),
        (SecretUpdated, {"version": 2**53 + 1}),
        (SecretUpdated, {"version": 2**62}),
        (SecretDestroyed, {"version": 2**53 + 1, "versions": (1,)}),
        (SecretDestroyed, {"version": 3, "versions": (1, 2**53 + 1)}),
        (SecretDestroyed, {"version": 3, "versions": tuple(range(1, 1002))}),
        (SecretDestroyed, {"version": 3, "versions": (1,), "event_id": "e" * 100_000}),
        (SecretUpdated, {"version": 2, "actor": "a" * 100_000}),
    ],
    ids=[
        "v0",
        "v2^53+1",
        "v2^62",
        "current-too-big",
        "a-version-too-big",
        "1001-versions",
        "long-event-id",
        "long-actor",
    ],  # fmt: skip
)
def test_an_event_whose_numbers_are_out_of_range_is_dropped(
    kind: type[Any], fields: dict[str, Any]
) -> None:
    bus, handler = offline_bus()
    lags: list[float] = []
    bus.lag_observer = lags.append
    bus._handle(forged(kind, path=VICTIM, **fields), VICTIM_SUBJECT, live=True)
    assert handler.calls == [] and lags == []
    assert bus.dropped["out_of_range"] == 1


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        (SecretUpdated, {"version": 2**53}),
        (SecretDestroyed, {"version": 0, "versions": (1, 2)}),  # the history is gone
        (SecretDestroyed, {"version": 3, "versions": tuple(range(1, 1001))}),
    ],
)
def test_events_at_the_edges_of_the_ranges_are_handed_on(
    kind: type[Any], fields: dict[str, Any]
) -> None:
    bus, handler = offline_bus()
    bus._handle(forged(kind, path=VICTIM, **fields), VICTIM_SUBJECT)
    assert len(handler.calls) == 1
    assert sum(bus.dropped.values()) == 0


def test_every_drop_reason_is_exported_from_a_closed_set_and_publish_failures_apart() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from events.bus import DROP_REASONS
    from tests.fakes import FakeVault

    bus, _ = offline_bus()
    manager = SecretsManager(FakeVault(), events=bus)
    metrics = Metrics()
    metrics.bind(manager=manager, bus=bus)
    bus._handle(b"not json", VICTIM_SUBJECT)
    bus._handle(forged(path=VICTIM, version=2), "secrets.changed.elsewhere")
    families = {
        f.name: f
        for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())
    }
    dropped = {s.labels["reason"]: s.value for s in families["secrets_events_dropped"].samples}
    assert set(dropped) == set(DROP_REASONS)
    assert dropped["undecodable"] == 1 and dropped["subject_mismatch"] == 1
    failed = {s.labels["stage"] for s in families["secrets_events_failed"].samples}
    assert failed == {"publish"}


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://svc:s3cr3t@nats-1:4222", "nats://***@nats-1:4222"),
        ("tls://s3cr3t@nats-1:4222", "tls://***@nats-1:4222"),  # a lone user name: a token
        ("nats://svc:s3cr3t@[::1]:4222", "nats://***@[::1]:4222"),
        ("nats://nats-1:4222", "nats://nats-1:4222"),
    ],
)
def test_a_password_in_a_nats_url_never_shows_in_the_bus_repr(url: str, shown: str) -> None:
    bus = EventBus([url], PREFIX, instance_id="me")
    assert "s3cr3t" not in repr(bus)
    assert shown in repr(bus)


# -- the manager's checks against Vault (in-memory Vault) ------------------------------------------

PATH = "app/db"


Fake = tuple[FakeVault, Callable[[], SecretsManager]]
"""The `fake` fixture: an in-memory Vault, and a builder of managers over it."""


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    vault = FakeVault()
    managers: list[SecretsManager] = []

    def build() -> SecretsManager:
        manager = SecretsManager(vault)
        managers.append(manager)
        return manager

    yield vault, build
    for manager in managers:
        await manager.aclose()


def settled(manager: SecretsManager) -> bool:
    return manager.pending_checks == 0


async def test_a_jump_is_evicted_at_once_and_applied_once_vault_shows_it(fake: Fake) -> None:
    vault, build = fake
    manager = build()
    for n in (1, 2, 3):
        vault.seed(PATH, {"n": n})
    assert (await manager.get(PATH)).version == 3
    heard: list[Any] = []
    manager.add_listener("l", lambda p, v: heard.append(None if v is None else v["n"]))
    vault.seed(PATH, {"n": 4})  # its event was lost
    vault.seed(PATH, {"n": 5})
    manager.apply_change(PATH, 5)
    assert manager.cached_document(PATH) is None, "not evicted before apply_change returned"
    await eventually(lambda: settled(manager) and heard == [5])
    assert (await manager.get(PATH)).version == 5
    assert manager.events_dropped == {}


async def test_claims_on_one_path_share_one_check(fake: Fake) -> None:
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    await manager.get(PATH)
    for version in range(10, 1010):
        manager.apply_change(PATH, version)
    assert manager.pending_checks == 1
    await eventually(lambda: settled(manager))
    assert vault.calls["current_version"] == 1
    assert manager.events_dropped == {"beyond_vault": 1}


async def test_claims_beyond_the_queue_only_evict_and_are_counted(fake: Fake) -> None:
    vault, build = fake
    manager = build()
    manager.add_listener("l", lambda p, v: None)  # with listeners, every claim is checked
    extra = 300
    for i in range(SecretsManager.VERIFY_QUEUE + extra):
        manager.apply_change(f"app/flood-{i}", 7)
    assert manager.pending_checks == SecretsManager.VERIFY_QUEUE
    assert manager.events_dropped["verify_overflow"] == extra
    await eventually(lambda: settled(manager), timeout=10)
    assert vault.calls["current_version"] == SecretsManager.VERIFY_QUEUE
    assert manager.events_dropped["beyond_vault"] == SecretsManager.VERIFY_QUEUE
    # What is left is what was not checked: unconfirmed, for the first read to judge.
    assert manager._known.keys() == manager._unconfirmed.keys(), "a refuted claim was kept"
    assert len(manager._unconfirmed) == extra


async def test_a_check_vault_does_not_answer_applies_nothing_but_the_eviction(fake: Fake) -> None:
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    await manager.get(PATH)
    heard: list[Any] = []
    manager.add_listener("l", lambda p, v: heard.append(v))
    vault.fail_next()
    manager.apply_change(PATH, 2)  # the next version, with listeners: checked at once
    await eventually(lambda: settled(manager))
    assert manager.events_dropped == {"unverified": 1}
    reads = vault.calls["read"]
    await manager.get(PATH)  # it meets the claim, still unconfirmed: Vault refutes it
    await manager.get(PATH)
    assert vault.calls["read"] == reads + 1, "the path is no longer cached"
    assert manager.events_dropped == {"unverified": 1, "beyond_vault": 1}
    assert heard == []


async def test_a_listeners_read_confirms_the_next_version_without_a_metadata_read(
    fake: Fake,
) -> None:
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    await manager.get(PATH)
    heard: list[Any] = []
    manager.add_listener("l", lambda p, v: heard.append(v["n"] if v else None))
    vault.seed(PATH, {"n": 2})
    manager.apply_change(PATH, 2)
    await eventually(lambda: settled(manager) and heard == [2])
    assert vault.calls["current_version"] == 0 and vault.calls["read_metadata"] == 0


async def test_a_forged_destruction_of_versions_vault_has_not_reached_marks_nothing(
    fake: Fake,
) -> None:
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    await manager.get(PATH)
    event = SecretDestroyed(
        event_id="e", path=PATH, version=5, versions=(2, 3, 4, 5), actor="m",
        instance_id="forger", time="t",
    )  # fmt: skip
    manager.apply_lifecycle(event)
    await eventually(lambda: settled(manager))
    vault.seed(PATH, {"n": 2})  # version 2 now really exists
    manager.apply_change(PATH, 2)
    await eventually(lambda: settled(manager))
    reads = vault.calls["read"]
    assert (await manager.get(PATH)).version == 2
    assert (await manager.get(PATH)).version == 2
    assert vault.calls["read"] == reads + 1, "version 2 is never cached"
    assert manager.events_dropped == {"beyond_vault": 1}


async def test_a_forged_undelete_does_not_tell_listeners_a_deleted_version_is_back(
    fake: Fake,
) -> None:
    from schemas.events import SecretUndeleted

    vault, build = fake
    manager = build()
    for n in (1, 2):
        vault.seed(PATH, {"n": n})
    await manager.delete(PATH, [2])
    heard: list[Any] = []
    manager.add_listener("l", lambda p, v: heard.append(v))
    event = SecretUndeleted(
        event_id="u", path=PATH, version=2, versions=(2,), actor="m", instance_id="forger",
        time="t",
    )  # fmt: skip
    manager.apply_lifecycle(event)
    await eventually(lambda: settled(manager))
    await asyncio.sleep(0.02)
    assert heard == []
    assert manager.events_dropped == {"beyond_vault": 1}


async def test_forged_lifecycle_claims_on_a_path_cannot_crowd_out_a_real_deletion(
    fake: Fake,
) -> None:
    from schemas.errors import NotFound
    from schemas.events import SecretDeleted

    vault, build = fake
    manager = build()
    for n in (1, 2, 3):
        vault.seed(PATH, {"n": n})
    await manager.get(PATH, 1)
    await manager.get(PATH, 2)
    for i in range(40):
        manager.apply_lifecycle(
            SecretDestroyed(
                event_id=f"forged-{i}",
                path=PATH,
                version=3,
                versions=(1,),
                actor="m",
                instance_id="forger",
                time="t",
            )  # fmt: skip
        )
    await vault.delete_versions(PATH, [2])  # by another instance, which announces it
    manager.apply_lifecycle(
        SecretDeleted(
            event_id="real",
            path=PATH,
            version=3,
            versions=(2,),
            actor="a",
            instance_id="b",
            time="t",
        )  # fmt: skip
    )
    await eventually(lambda: settled(manager))
    assert vault.calls["read_metadata"] == 1, "one check for all the claims on the path"
    assert manager.events_dropped == {"beyond_vault": 1}
    with pytest.raises(NotFound):
        await manager.get(PATH, 2)
    reads = vault.calls["read"]
    await manager.get(PATH, 1)
    await manager.get(PATH, 1)
    assert vault.calls["read"] == reads + 1, "version 1 is still cached after one re-read"


# -- the next version, confirmed lazily: by the first read that needs it -------------------------


async def test_an_event_for_the_next_version_costs_no_vault_call_until_someone_reads(
    fake: Fake,
) -> None:
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    await manager.get(PATH)
    calls = vault.total_calls
    vault.seed(PATH, {"n": 2})  # another instance writes, and its event comes
    manager.apply_change(PATH, 2)
    assert manager.cached_document(PATH) is None, "not evicted before apply_change returned"
    await asyncio.sleep(0.02)  # room for any background check to run
    assert manager.pending_checks == 0
    assert manager.unconfirmed_claims == 1  # secrets_events_unconfirmed
    assert vault.total_calls == calls, "the event cost a Vault call by itself"
    assert (await manager.get(PATH)).version == 2
    assert (await manager.get(PATH)).version == 2
    assert manager.unconfirmed_claims == 0
    assert vault.total_calls == calls + 1, "the read confirms it: one read, no metadata read"
    assert vault.calls["current_version"] == 0
    assert manager.events_dropped == {}


async def test_a_forged_next_version_costs_one_metadata_read_when_a_read_meets_it(
    fake: Fake,
) -> None:
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    await manager.get(PATH)
    calls = Counter(vault.calls)
    manager.apply_change(PATH, 2)  # forged: Vault holds version 1 only
    await asyncio.sleep(0.02)
    assert vault.calls == calls
    assert (await manager.get(PATH)).version == 1
    assert vault.calls - calls == Counter(read=1, current_version=1)
    assert (await manager.get(PATH)).version == 1
    assert vault.calls - calls == Counter(read=1, current_version=1), "not cached again"
    assert manager.events_dropped == {"beyond_vault": 1}
    vault.seed(PATH, {"n": 2})  # the real version 2 is still evicted and read
    manager.apply_change(PATH, 2)
    assert (await manager.get(PATH)).data == {"n": 2}
    assert manager.events_dropped == {"beyond_vault": 1}


@pytest.mark.parametrize("known", [True, False], ids=["a-known-path", "a-path-never-read"])
async def test_a_forged_far_version_without_listeners_does_not_stop_caching(
    fake: Fake, known: bool
) -> None:
    # On a path read here it is a jump, checked at once; on one never read here it is
    # recorded unconfirmed, and the first read refutes it. Either way: one metadata read.
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    if known:
        await manager.get(PATH)
    manager.apply_change(PATH, 2**62)
    await eventually(lambda: settled(manager))
    reads = vault.calls["read"]
    assert (await manager.get(PATH)).version == 1
    assert (await manager.get(PATH)).version == 1
    assert vault.calls["read"] == reads + 1, "the path is no longer cached"
    assert vault.calls["current_version"] == 1
    assert manager.events_dropped == {"beyond_vault": 1}


async def test_with_listeners_a_forged_next_version_is_never_heard_and_the_real_one_is(
    fake: Fake,
) -> None:
    vault, build = fake
    manager = build()
    heard: list[Any] = []
    manager.add_listener("l", lambda p, v: heard.append(None if v is None else v["n"]))
    await manager.set(PATH, {"n": 1}, 0)
    await eventually(lambda: heard == [1])
    manager.apply_change(PATH, 2)  # forged
    await eventually(lambda: settled(manager))
    await asyncio.sleep(0.02)
    assert heard == [1]
    assert manager.events_dropped == {"beyond_vault": 1}
    vault.seed(PATH, {"n": 2})
    manager.apply_change(PATH, 2)
    await eventually(lambda: heard == [1, 2])


@pytest.mark.parametrize("written", ["elsewhere", "here"])
async def test_a_listener_added_after_a_forged_next_version_still_hears_the_real_one(
    fake: Fake, written: str
) -> None:
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    await manager.get(PATH)
    manager.apply_change(PATH, 2)  # forged, while nobody listens: recorded unconfirmed
    heard: list[Any] = []
    manager.add_listener("l", lambda p, v: heard.append(None if v is None else v["n"]))
    if written == "elsewhere":
        vault.seed(PATH, {"n": 2})  # the real version 2, and its event
        manager.apply_change(PATH, 2)
    else:
        await manager.set(PATH, {"n": 2}, 1)
    await eventually(lambda: settled(manager) and heard == [2])
    assert (await manager.get(PATH)).version == 2


async def test_a_thousand_next_version_events_on_a_thousand_paths_cost_no_vault_call(
    fake: Fake,
) -> None:
    vault, build = fake
    manager = build()
    paths = [f"app/svc-{i}/db" for i in range(1000)]
    for path in paths:
        await manager.set(path, {"n": 1}, 0)
    calls = vault.total_calls
    for version in (2, 3):  # two writes elsewhere on each path
        for path in paths:
            vault.seed(path, {"n": version})
            manager.apply_change(path, version)
    await asyncio.sleep(0.05)
    assert manager.pending_checks == 0
    assert vault.total_calls == calls
    assert (await manager.get(paths[7])).version == 3
    assert vault.total_calls == calls + 1
    assert manager.events_dropped == {}


async def test_unconfirmed_versions_are_bounded_and_the_oldest_is_forgotten_at_no_vault_cost(
    fake: Fake,
) -> None:
    vault, build = fake
    manager = build()
    manager.UNCONFIRMED_MAX = 10
    for i in range(15):
        manager.apply_change(f"app/p-{i}", 4)  # paths this instance knows nothing of
    assert vault.total_calls == 0
    assert len(manager._unconfirmed) == 10
    assert set(manager._known) == set(manager._unconfirmed), "a forgotten claim was kept"
    vault.seed("app/p-0", {"n": 1})  # forgotten: a read caches what Vault holds
    assert (await manager.get("app/p-0")).version == 1
    assert (await manager.get("app/p-0")).version == 1
    assert vault.total_calls == 1


async def test_a_version_a_write_or_read_shows_confirms_what_events_claimed(fake: Fake) -> None:
    vault, build = fake
    manager = build()
    await manager.set(PATH, {"n": 1}, 0)
    vault.seed(PATH, {"n": 2})
    manager.apply_change(PATH, 2)
    assert PATH in manager._unconfirmed
    await manager.set(PATH, {"n": 3}, 2)  # our own write of a newer version
    assert PATH not in manager._unconfirmed
    vault.seed(PATH, {"n": 4})
    manager.apply_change(PATH, 4)
    assert (await manager.get(PATH)).version == 4
    assert PATH not in manager._unconfirmed
    assert vault.calls["current_version"] == 0


async def test_a_read_whose_check_vault_does_not_answer_is_served_but_not_cached(
    fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    await manager.get(PATH)
    manager.apply_change(PATH, 2)  # forged

    async def unanswered(path: str) -> int:
        raise VaultUnavailable("the secrets backend is unavailable", path=path)

    monkeypatch.setattr(vault, "current_version", unanswered)
    assert (await manager.get(PATH)).version == 1
    assert manager.cached_document(PATH) is None, "cached although the claim stands"
    assert manager.events_dropped == {"unverified": 1}
    monkeypatch.undo()
    reads = vault.calls["read"]
    assert (await manager.get(PATH)).version == 1  # this read's check refutes the claim
    assert (await manager.get(PATH)).version == 1
    assert vault.calls["read"] == reads + 1
    assert manager.events_dropped == {"unverified": 1, "beyond_vault": 1}


async def test_the_version_check_judges_an_unconfirmed_version_of_a_path_it_reads_anyway(
    fake: Fake,
) -> None:
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    await manager.get(PATH, 1)  # a pinned version keeps the path in the version check
    manager.apply_change(PATH, 2)  # forged
    await manager.check_versions()
    assert manager.events_dropped == {"beyond_vault": 1}
    calls = Counter(vault.calls)
    assert (await manager.get(PATH)).version == 1
    assert (await manager.get(PATH)).version == 1
    assert vault.calls - calls == Counter(read=1), "no metadata read: the check settled it"


@pytest.mark.parametrize(
    "path", ["app/../db", "app//db", "/app/db", "app/db/", "a b/c", "a/" * 17 + "x", "x" * 600]
)
def test_an_event_for_a_path_no_route_would_accept_is_dropped(path: str) -> None:
    # Its subject, percent-encoded by hand: `changed_subject` refuses such a path itself.
    tokens = [quote(segment, safe="") or "%00" for segment in path.split("/")]
    subject = f"{PREFIX}.changed." + ".".join(tokens)
    bus, handler = offline_bus()
    bus._handle(forged(SecretUpdated, path=path, version=2), subject)
    bus._handle(forged(SecretUpdated, path=path, version=2))  # no subject to compare with
    assert handler.calls == []
    assert sum(bus.dropped.values()) == 2
    assert (
        check_event(
            msgspec.json.decode(forged(SecretUpdated, path=path, version=2), type=SecretUpdated)
        )
        == "out_of_range"
    )

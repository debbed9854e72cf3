"""Forged bus messages: whoever can publish on the change subjects must not be able to stop an
instance caching a path, silence its listeners, or make it flood Vault.

Forged messages go out on a plain nats-py connection to a real nats-server, next to real
instances (SecretsManager + EventBus) on a real OpenBao. The bus's own checks and the manager's,
without a server: tests/unit/events/test_bus.py and tests/unit/service/core/test_coherence.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from typing import Any

import nats as nats_client
import pytest
from prometheus_client import generate_latest

from devstack import NatsEndpoint, OpenBaoEndpoint
from events.bus import EventBus
from events.subjects import changed_subject
from schemas.api import SecretMetadata
from schemas.events import SecretDestroyed
from schemas.secret import Secret, SecretData
from service.core.manager import SecretsManager
from service.obs.metrics import Metrics
from service.vault.backend import HvacBackend
from tests.fakes import forged
from tests.support import eventually, metric_value, record_figures

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

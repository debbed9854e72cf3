"""`ClusterPoller`: one instance polls Vault for the union of cached paths and announces each
change once; followers read nothing; without NATS (or the buckets) each polls its own paths."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import pytest

from events.kv import INTEREST_BUCKET, LEASE_BUCKET, KvStore
from schemas.events import SecretDeleted, SecretUpdated
from service.core.manager import SecretsManager
from service.core.poller import ClusterPoller, Mode, interest_ttl, lease_ttl
from service.core.watcher import cache_targets
from tests.fakes import FakeClock, FakeKeyValue, FakeVault, RecordingSink
from tests.support import eventually

INTERVAL = 1.0
PATHS = [f"app/p{i}" for i in range(30)]


@dataclass
class FakeBus:
    """What the poller reads of the bus: connected, disconnects, and its buckets."""

    kv: Mapping[str, KvStore]
    connected: bool = True
    disconnects: int = 0


@dataclass
class Instance:
    manager: SecretsManager
    sink: RecordingSink
    bus: FakeBus
    poller: ClusterPoller
    running: list[asyncio.Task[None]] = field(default_factory=list)


@dataclass
class Cluster:
    vault: FakeVault
    clock: FakeClock
    lease: FakeKeyValue
    interest: FakeKeyValue
    instances: list[Instance] = field(default_factory=list)

    def add(self, name: str, *, buckets: bool = True) -> Instance:
        sink = RecordingSink()
        manager = SecretsManager(self.vault, events=sink, instance_id=name)
        kv: Mapping[str, KvStore] = (
            {LEASE_BUCKET: self.lease, INTEREST_BUCKET: self.interest} if buckets else {}
        )
        bus = FakeBus(kv)
        poller = ClusterPoller(
            manager.watcher,
            lambda: cache_targets(manager.cache),
            INTERVAL,
            bus=bus,
            prefix="secrets",
            instance_id=name,
            clock=self.clock,
        )
        instance = Instance(manager, sink, bus, poller)
        self.instances.append(instance)
        return instance

    async def settle(self) -> None:
        """Every instance flushes its interest and steps the election; the leader's watch of
        the interest bucket has caught up."""
        for instance in self.instances:
            await instance.poller.flush()
        for instance in self.instances:
            await instance.poller.step()
        leading = [
            i.poller.union
            for i in self.instances
            if i.poller.leader and i.bus.connected and not self.interest.down
        ]
        await eventually(lambda: all(union.ready for union in leading))

    async def round(self) -> int:
        """One round on every instance; the metadata reads it made."""
        before = self.vault.calls["read_metadata"]
        for instance in self.instances:
            await instance.poller.round()
        return self.vault.calls["read_metadata"] - before


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    clock = FakeClock()
    made = Cluster(
        FakeVault(),
        clock,
        FakeKeyValue(ttl=lease_ttl(INTERVAL), clock=clock),
        FakeKeyValue(ttl=interest_ttl(INTERVAL), clock=clock),
    )
    yield made
    for instance in made.instances:
        for task in instance.running:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await instance.poller.stop()
        await instance.manager.aclose()


async def cache_all(cluster: Cluster) -> None:
    for path in PATHS:
        cluster.vault.seed(path, {"v": "1"})
    for instance in cluster.instances:
        for path in PATHS:
            await instance.manager.get(path)


async def caching(cluster: Cluster, names: str) -> list[Instance]:
    """Instances `names`, each caching every path of PATHS, settled: one leads."""
    made = [cluster.add(name) for name in names]
    await cache_all(cluster)
    await cluster.settle()
    return made


def leader(cluster: Cluster) -> Instance:
    (found,) = [i for i in cluster.instances if i.poller.leader]
    return found


async def test_three_instances_caching_the_same_paths_read_each_once_a_round(
    cluster: Cluster,
) -> None:
    await caching(cluster, "abc")
    assert [i.poller.current_mode() for i in cluster.instances] == [
        Mode.LEADER,
        Mode.FOLLOWER,
        Mode.FOLLOWER,
    ]
    assert await cluster.round() == len(PATHS)
    assert leader(cluster).poller.watcher.last_round_paths == len(PATHS)


async def test_a_write_made_straight_to_vault_is_announced_once_by_the_leader_alone(
    cluster: Cluster,
) -> None:
    await caching(cluster, "abc")
    cluster.vault.seed("app/p7", {"v": "2"})
    await cluster.round()
    await cluster.round()  # the followers still report version 1: no second announcement
    announced = [e for i in cluster.instances for e in i.sink.events]
    assert [(type(e), e.path, e.version, e.actor) for e in announced] == [
        (SecretUpdated, "app/p7", 2, "vault-direct")
    ]
    assert announced[0].instance_id == leader(cluster).manager.instance_id


async def test_a_write_through_an_instance_is_not_announced_again_while_reports_catch_up(
    cluster: Cluster,
) -> None:
    first, second = await caching(cluster, "ab")
    await second.manager.set("app/p2", {"v": "2"}, 1)  # announced by second itself
    first.manager.apply_change("app/p2", 2)  # its event reached first
    await cluster.round()  # second's report still says version 1: found, not yet told
    for instance in cluster.instances:
        await instance.poller.flush()  # within half an interval
    union = first.poller.union
    await eventually(lambda: union.targets()["app/p2"].latest != 1)
    await cluster.round()
    await cluster.round()
    direct = [e for i in cluster.instances for e in i.sink.events if e.actor == "vault-direct"]
    assert direct == []


async def test_a_version_deleted_straight_in_vault_is_announced_once(cluster: Cluster) -> None:
    await caching(cluster, "ab")
    await cluster.vault.delete_versions("app/p3", [1])
    await cluster.round()
    await cluster.round()
    announced = [e for i in cluster.instances for e in i.sink.events]
    assert [(type(e), e.path) for e in announced] == [(SecretDeleted, "app/p3")]
    assert isinstance(announced[0], SecretDeleted) and announced[0].versions == (1,)


async def test_the_leader_covers_paths_only_followers_cache(cluster: Cluster) -> None:
    first, second = cluster.add("a"), cluster.add("b")
    cluster.vault.seed("app/only-b", {"v": "1"})
    await second.manager.get("app/only-b")
    await cluster.settle()
    assert first.poller.leader
    cluster.vault.seed("app/only-b", {"v": "2"})
    await cluster.round()
    await cluster.round()
    assert [(e.path, e.version) for e in first.sink.events] == [("app/only-b", 2)]
    assert second.sink.events == []


async def test_without_nats_every_instance_polls_its_own_paths(cluster: Cluster) -> None:
    await caching(cluster, "abc")
    for instance in cluster.instances:
        instance.bus.connected = False
    await cluster.settle()
    assert {i.poller.current_mode() for i in cluster.instances} == {Mode.LOCAL}
    assert await cluster.round() == 3 * len(PATHS)


async def test_an_instance_whose_interest_is_not_recorded_polls_its_own_paths(
    cluster: Cluster,
) -> None:
    await caching(cluster, "ab")
    cluster.interest.down = True
    cluster.vault.seed("app/new", {"v": "1"})
    await cluster.instances[1].manager.get("app/new")  # b has a shard to write, and cannot
    await cluster.settle()
    modes = [i.poller.current_mode() for i in cluster.instances]
    assert modes == [Mode.LEADER, Mode.LOCAL]
    assert await cluster.round() == len(PATHS) + len(PATHS) + 1


async def test_an_unreachable_lease_bucket_makes_every_instance_poll_its_own_paths(
    cluster: Cluster,
) -> None:
    await caching(cluster, "ab")
    cluster.lease.down = True
    cluster.clock.advance(lease_ttl(INTERVAL))
    await cluster.settle()
    assert [i.poller.current_mode() for i in cluster.instances] == [Mode.LOCAL, Mode.LOCAL]


async def test_an_instance_without_the_buckets_polls_its_own_paths_as_before(
    cluster: Cluster,
) -> None:
    alone = cluster.add("a", buckets=False)
    await cache_all(cluster)
    await cluster.settle()
    assert alone.poller.current_mode() is Mode.LOCAL and not alone.poller.leader
    assert await cluster.round() == len(PATHS)


async def test_when_the_leader_dies_another_takes_over_after_the_lease_ttl(
    cluster: Cluster,
) -> None:
    await caching(cluster, "abc")
    dead = leader(cluster)
    cluster.instances.remove(dead)
    await dead.poller.step()
    dead.bus.connected = False  # it neither refreshes nor releases: killed
    await dead.poller.step()
    await dead.manager.aclose()
    await cluster.settle()
    assert not any(i.poller.leader for i in cluster.instances), "the lease has not lapsed yet"
    cluster.clock.advance(lease_ttl(INTERVAL))
    await cluster.settle()
    heir = leader(cluster)
    cluster.vault.seed("app/p1", {"v": "2"})
    assert await cluster.round() == len(PATHS)
    await cluster.round()
    assert [(e.path, e.version) for e in heir.sink.events] == [("app/p1", 2)]


async def test_a_stopping_leader_gives_the_lease_up_and_withdraws_its_interest(
    cluster: Cluster,
) -> None:
    first, second = cluster.add("a"), cluster.add("b")
    await cache_all(cluster)
    first.running.append(asyncio.get_running_loop().create_task(first.poller.run()))
    await eventually(lambda: first.poller.leader and bool(cluster.interest.keys()))
    before = set(cluster.interest.keys())
    first.running.pop().cancel()
    await eventually(lambda: not first.poller.leader and cluster.lease.keys() == [])
    assert not any(k.startswith("secrets.a.") for k in cluster.interest.keys())
    assert before
    await second.poller.step()
    assert second.poller.leader, "taken at once, not a TTL later"


async def test_a_new_leader_reads_the_interest_recorded_before_it_took_the_lease(
    cluster: Cluster,
) -> None:
    first, second = cluster.add("a"), cluster.add("b")
    cluster.vault.seed("app/x", {"v": "1"})
    await second.manager.get("app/x")
    await second.poller.flush()
    await first.poller.step()  # a leads
    cluster.instances.remove(first)
    await first.poller.stop()
    await cluster.settle()
    assert second.poller.leader
    await first.manager.aclose()
    targets = second.poller.union.targets()
    assert "app/x" in targets


async def test_a_new_leader_does_not_announce_again_what_a_dead_instance_still_reports(
    cluster: Cluster,
) -> None:
    await caching(cluster, "abc")
    first = leader(cluster)
    cluster.vault.seed("app/p1", {"v": "2"})
    await first.poller.round()
    await first.poller.round()
    assert [(e.path, e.version) for e in first.sink.events] == [("app/p1", 2)]
    cluster.instances.remove(first)
    for other in cluster.instances:
        other.manager.apply_change("app/p1", 2)  # the event reached them: they evict
    first.bus.connected = False  # it dies before its interest says it evicted too
    await first.poller.step()
    await first.manager.aclose()
    cluster.clock.advance(lease_ttl(INTERVAL))
    await cluster.settle()
    heir = leader(cluster)
    await cluster.round()
    await cluster.round()
    assert heir.sink.events == [], "the dead instance's stale version was announced again"

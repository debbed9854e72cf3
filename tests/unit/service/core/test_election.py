"""`Lease`: one holder at a time through the bucket's compare-and-set, lapsing by its TTL."""

from __future__ import annotations

from events.kv import KvConflict
from service.core.election import Lease
from tests.fakes import FakeClock, FakeKeyValue

TTL = 3.0
KEY = "secrets.lease"


def leases(*names: str) -> tuple[FakeClock, FakeKeyValue, list[Lease]]:
    clock = FakeClock()
    kv = FakeKeyValue(ttl=TTL, clock=clock)
    return clock, kv, [Lease(kv, KEY, name, ttl=TTL, clock=clock) for name in names]


async def test_the_first_instance_takes_the_lease_and_the_next_finds_it_held() -> None:
    _, kv, (a, b) = leases("a", "b")
    assert await a.step()
    assert not await b.step()
    assert a.held and not b.held
    assert a.answered and b.answered  # held by another is an answer: b need not poll
    assert kv.value(KEY) == b"a"


async def test_the_holder_keeps_the_lease_by_updating_it_at_its_revision() -> None:
    clock, kv, (a, b) = leases("a", "b")
    await a.step()
    for _ in range(5):
        clock.advance(TTL / 3)
        assert await a.step()
        assert not await b.step()
    assert kv.calls["update"] == 5
    assert a.terms == 1


async def test_a_lease_no_longer_refreshed_lapses_and_another_instance_takes_it() -> None:
    clock, _, (a, b) = leases("a", "b")
    await a.step()
    clock.advance(TTL)  # a stopped refreshing (dead, or cut off)
    assert not a.held, "a must count itself out before the bucket lets the lease go"
    assert await b.step()
    assert not await a.step(), "a's update at its old revision fails: b's write came since"
    assert b.held and not a.held


async def test_a_released_lease_is_taken_at_the_next_step_without_waiting_for_the_ttl() -> None:
    _, _, (a, b) = leases("a", "b")
    await a.step()
    await a.release()
    assert not a.held
    assert await b.step()


async def test_an_unreachable_bucket_is_no_answer_and_the_holder_lets_go_before_it_lapses() -> None:
    clock, kv, (a,) = leases("a")
    await a.step()
    kv.down = True
    clock.advance(TTL / 3)
    assert await a.step(), "still within the TTL of its last refresh"
    assert a.answered is False
    clock.advance(TTL)
    assert not await a.step()
    kv.down = False
    clock.advance(TTL)  # the bucket let it lapse meanwhile
    assert await a.step()
    assert a.answered and a.terms == 2


async def test_the_fake_bucket_refuses_a_second_create_and_a_stale_update() -> None:
    _, kv, _ = leases()
    revision = await kv.create(KEY, b"x")
    for attempt in (kv.create(KEY, b"y"), kv.update(KEY, b"y", revision + 1)):
        try:
            await attempt
        except KvConflict:
            continue
        raise AssertionError("a compare-and-set that should fail succeeded")

"""The tasks the manager does not await: `BackgroundTasks` and `SingleFlight`."""

from __future__ import annotations

import asyncio

import pytest

from service.tasks import BackgroundTasks, SingleFlight


async def test_background_tasks_are_kept_while_running_and_let_go_once_done() -> None:
    tasks = BackgroundTasks()
    release = asyncio.Event()
    task = tasks.spawn(release.wait())
    assert len(tasks) == 1
    release.set()
    assert await task is True
    await asyncio.sleep(0)  # done callbacks run on the next turn of the loop
    assert len(tasks) == 0


async def test_closing_background_tasks_cancels_those_still_running_after_the_timeout() -> None:
    tasks = BackgroundTasks()
    finished = tasks.spawn(asyncio.sleep(0))
    stuck = tasks.spawn(asyncio.Event().wait())
    await tasks.aclose(timeout=0.05)
    with pytest.raises(asyncio.CancelledError):
        await stuck
    assert finished.done() and not finished.cancelled()


async def test_single_flight_callers_of_one_key_share_one_task() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    release = asyncio.Event()
    starts: list[str] = []

    async def fetch() -> int:
        starts.append("fetch")
        await release.wait()
        return len(starts)

    waiting = [asyncio.ensure_future(flights.run("k", fetch)) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiting) == [1, 1, 1]
    assert starts == ["fetch"]


async def test_after_forget_the_next_caller_starts_a_new_flight_and_the_old_one_finishes() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    release = asyncio.Event()

    async def old() -> str:
        await release.wait()
        return "old"

    async def new() -> str:
        return "new"

    first = asyncio.ensure_future(flights.run("k", old))
    await asyncio.sleep(0)
    flights.forget("k")
    assert await flights.run("k", new) == "new"
    release.set()
    assert await first == "old"


async def test_a_caller_that_gives_up_does_not_cancel_the_flight_others_share() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    release = asyncio.Event()

    async def fetch() -> str:
        await release.wait()
        return "value"

    impatient = asyncio.ensure_future(flights.run("k", fetch))
    patient = asyncio.ensure_future(flights.run("k", fetch))
    await asyncio.sleep(0)
    impatient.cancel()
    release.set()
    assert await patient == "value"
    assert impatient.cancelled()

"""AuditLog: queued and batched writes, confirmation, fail-closed health, overflow, recovery."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO, cast

import pytest

from schemas.audit import AuditRecord, audit_decoder
from schemas.errors import AuditUnavailable
from service.audit import AuditLog, LineSink
from tests.fakes import FakePublisher
from tests.support import eventually


class FlakyStream:
    """A binary stream whose writes fail with ENOSPC while `fail` is set."""

    def __init__(self) -> None:
        self.fail = False
        self.data = b""

    def write(self, data: bytes) -> int:
        if self.fail:
            raise OSError(28, "No space left on device")
        self.data += data
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def records(self) -> list[AuditRecord]:
        return [audit_decoder.decode(line) for line in self.data.splitlines()]


MakeLog = Callable[..., Awaitable[AuditLog]]


@pytest.fixture
async def make() -> AsyncIterator[MakeLog]:
    made: list[AuditLog] = []

    async def build(**kwargs: Any) -> AuditLog:
        audit = AuditLog(instance_id="i-1", **kwargs)
        await audit.start()
        made.append(audit)
        return audit

    yield build
    for audit in made:
        await audit.aclose()


def record(audit: AuditLog, op: str = "read", **overrides: Any) -> AuditRecord:
    fields: dict[str, Any] = {
        "request_id": "r-1",
        "op": op,
        "method": "GET",
        "path": "app/db",
        "version": 3,
        "allowed": True,
        "outcome": "ok",
        "status": 200,
        "reason": None,
        "sub": "alice",
        "client_id": "cli",
        "source": "127.0.0.1",
    }
    fields.update(overrides)
    return audit.record(**fields)


def line_sink(stream: FlakyStream) -> LineSink:
    return LineSink(cast(BinaryIO, stream), "file")


# -- writing ----------------------------------------------------------------------------------


async def test_submitted_records_reach_the_file_and_nats_as_json(make: MakeLog) -> None:
    stream, nats = FlakyStream(), FakePublisher()
    audit = await make(line=line_sink(stream), publisher=nats)
    audit.submit(record(audit, "read"))
    audit.submit(record(audit, "write", method="PATCH", version=4))
    await eventually(lambda: len(stream.records()) == 2 and len(nats.published) == 2)
    first, second = stream.records()
    assert (first.op, first.path, first.version, first.sub, first.client_id) == (
        "read", "app/db", 3, "alice", "cli",
    )  # fmt: skip
    assert first.instance_id == "i-1" and first.time.endswith("+00:00")
    assert second.op == "write" and second.version == 4
    assert [op for op, _ in nats.published] == ["read", "write"]
    assert audit_decoder.decode(nats.published[1][1]) == second
    assert audit.written == {"stdout": 0, "file": 2, "nats": 2}
    assert nats.acknowledged == [False, False]  # background records: no round trip each


async def test_a_confirmed_record_waits_for_the_jetstream_acknowledgement(make: MakeLog) -> None:
    nats = FakePublisher()
    audit = await make(line=None, publisher=nats)
    assert await audit.confirm(record(audit, "write"))
    assert nats.acknowledged == [True]


async def test_a_burst_is_written_in_batches_and_in_order(make: MakeLog) -> None:
    stream, nats = FlakyStream(), FakePublisher()
    audit = await make(line=line_sink(stream), publisher=nats, batch_size=64)
    for n in range(500):
        audit.submit(record(audit, request_id=f"r-{n}"))
    await eventually(lambda: len(stream.records()) == 500 and len(nats.records()) == 500)
    assert [r.request_id for r in stream.records()] == [f"r-{n}" for n in range(500)]
    assert [r.request_id for r in nats.records()] == [f"r-{n}" for n in range(500)]
    # A plain publish per batch of 64 (not per record), each record a JSON line in it.
    assert len(nats.published) == 8 and nats.published[0][1].count(b"\n") == 63
    assert audit.written == {"stdout": 0, "file": 500, "nats": 500}


async def test_an_unknown_op_is_recorded_as_other(make: MakeLog) -> None:
    audit = await make(line=None, publisher=FakePublisher())
    assert record(audit, "frobnicate").op == "other"


async def test_closing_writes_what_is_still_queued() -> None:
    stream = FlakyStream()
    audit = AuditLog(line=line_sink(stream), publisher=None)
    await audit.start()
    for n in range(10):
        audit.submit(record(audit, request_id=f"r-{n}"))
    await audit.aclose()
    assert len(stream.records()) == 10


# -- confirmation and fail-closed -----------------------------------------------------------


async def test_confirm_succeeds_when_any_one_sink_accepts(make: MakeLog) -> None:
    stream, nats = FlakyStream(), FakePublisher()
    audit = await make(line=line_sink(stream), publisher=nats)
    stream.fail = True
    assert await audit.confirm(record(audit, "write"))
    stream.fail, nats.ok = False, False
    assert await audit.confirm(record(audit, "write"))
    assert audit.healthy


async def test_confirm_does_not_wait_for_the_slower_sink(make: MakeLog) -> None:
    stream, nats = FlakyStream(), FakePublisher()
    nats.delay = 0.5
    audit = await make(line=line_sink(stream), publisher=nats)
    started = asyncio.get_running_loop().time()
    assert await audit.confirm(record(audit, "write"))
    assert asyncio.get_running_loop().time() - started < 0.4
    await eventually(lambda: len(nats.published) == 1)


async def test_when_no_sink_can_record_writes_are_refused_and_reads_are_not(
    make: MakeLog,
) -> None:
    stream, nats = FlakyStream(), FakePublisher()
    audit = await make(line=line_sink(stream), publisher=nats)
    stream.fail, nats.ok = True, False
    assert not await audit.confirm(record(audit, "write"))
    assert not audit.healthy
    with pytest.raises(AuditUnavailable) as refused:
        audit.check("write")
    assert refused.value.status == 503 and refused.value.code == "backend_unavailable"
    for op in ("delete", "destroy", "rollback", "undelete", "anything-new"):
        with pytest.raises(AuditUnavailable):
            audit.check(op)
    audit.check("read")
    audit.check("list")
    assert audit.refused == 6


async def test_a_disconnected_bus_counts_as_a_failing_sink(make: MakeLog) -> None:
    nats = FakePublisher()
    audit = await make(line=None, publisher=nats)
    assert audit.healthy
    nats.connected = False
    assert not audit.healthy


async def test_fail_closed_all_refuses_reads_too_and_none_refuses_nothing(make: MakeLog) -> None:
    stream = FlakyStream()
    stream.fail = True
    strict = await make(line=line_sink(stream), publisher=None, fail_closed="all")
    assert not await strict.confirm(record(strict))
    with pytest.raises(AuditUnavailable):
        strict.check("read")
    assert strict.must_confirm("read") and strict.must_confirm("write")
    lax = await make(line=line_sink(stream), publisher=None, fail_closed="none")
    assert not await lax.confirm(record(lax))
    lax.check("write")
    assert not lax.must_confirm("write")


async def test_a_sink_that_works_again_makes_the_log_healthy_again(make: MakeLog) -> None:
    stream = FlakyStream()
    audit = await make(line=line_sink(stream), publisher=None)
    stream.fail = True
    assert not await audit.confirm(record(audit, "write"))
    assert not audit.healthy
    stream.fail = False
    assert await audit.confirm(record(audit, "write"))
    assert audit.healthy
    assert audit.failed["file"] == 1 and audit.written["file"] == 1


async def test_a_full_queue_drops_counts_and_refuses_until_drained(make: MakeLog) -> None:
    stream = FlakyStream()
    audit = await make(line=line_sink(stream), publisher=None, queue_size=4)
    for n in range(10):  # no await in between: the writer cannot run
        audit.submit(record(audit, request_id=f"r-{n}"))
    assert audit.dropped == 6
    assert not audit.healthy
    with pytest.raises(AuditUnavailable):
        audit.check("write")
    await eventually(lambda: audit.healthy)
    assert len(stream.records()) == 4


def unauthenticated(audit: AuditLog, n: int) -> AuditRecord:
    """The record of a request refused at authentication: no verified principal."""
    return record(
        audit, request_id=f"noise-{n}", allowed=False, outcome="unauthenticated", status=401,
        reason="missing_token", sub=None, client_id=None,
    )  # fmt: skip


async def test_a_flood_of_unauthenticated_records_never_refuses_audited_writes(
    make: MakeLog,
) -> None:
    stream = FlakyStream()
    publisher = FakePublisher()
    publisher.delay = 3600  # stalled: a batch published to NATS never finishes
    audit = await make(line=line_sink(stream), publisher=publisher, queue_size=40, timeout=0.5)
    for n in range(1000):  # no await in between: the writer cannot run
        audit.submit(unauthenticated(audit, n))
    assert audit.healthy
    audit.check("write")  # not refused
    assert audit.noise_dropped == 1000 - 40 // 4
    assert audit.dropped == 0
    # Authenticated records still have the rest of the queue, and a write is confirmed.
    for n in range(30):
        audit.submit(record(audit, request_id=f"r-{n}"))
    assert audit.dropped == 0 and audit.healthy
    assert await audit.confirm(record(audit, "write", request_id="w-1"))
    await eventually(lambda: "w-1" in [r.request_id for r in stream.records()])


async def test_dropped_unauthenticated_records_never_mark_the_queue_backlogged(
    make: MakeLog,
) -> None:
    stream = FlakyStream()
    audit = await make(line=line_sink(stream), publisher=None, queue_size=8)
    for n in range(6):
        audit.submit(record(audit, request_id=f"r-{n}"))
    for n in range(100):
        audit.submit(unauthenticated(audit, n))
    assert audit.healthy and audit.dropped == 0
    assert audit.noise_dropped == 100 - 2  # the queue held 6 + 2, its whole size
    audit.check("write")
    await eventually(lambda: len(stream.records()) == 8)
    # Once written, the noise budget is free again.
    audit.submit(unauthenticated(audit, 100))
    await eventually(lambda: len(stream.records()) == 9)


async def test_without_any_sink_nothing_is_confirmed_or_refused(make: MakeLog) -> None:
    audit = await make(line=None, publisher=None)
    assert not audit.must_confirm("write")
    assert await audit.confirm(record(audit, "write"))
    audit.submit(record(audit))
    audit.check("write")


# -- where a confirmed record is written from ---------------------------------------------


class NotedFile:
    """A real file or pipe end that notes which thread wrote each time; `hold` makes the next
    write wait (with `entered` set) until `release` is set."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.threads: list[int] = []
        self.hold = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail = False

    def fileno(self) -> int:
        return self.raw.fileno()

    def write(self, data: bytes) -> int:
        self.threads.append(threading.get_ident())
        if self.hold:
            self.hold = False
            self.entered.set()
            self.release.wait(5)
        if self.fail:
            raise OSError(28, "No space left on device")
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        self.raw.close()


def noted_file(tmp_path: Path) -> NotedFile:
    return NotedFile(open(tmp_path / "audit.log", "ab"))  # closed by the sink (owned)


async def test_a_confirmed_record_goes_to_a_regular_file_from_the_event_loop_itself(
    make: MakeLog, tmp_path: Path
) -> None:
    stream = noted_file(tmp_path)
    audit = await make(line=LineSink(cast(BinaryIO, stream), "file", owned=True), publisher=None)
    confirmed = record(audit, "write", request_id="w-1")
    assert await audit.confirm(confirmed)
    assert stream.threads == [threading.get_ident()]  # no worker thread
    assert audit_decoder.decode((tmp_path / "audit.log").read_bytes()) == confirmed
    assert audit.written["file"] == 1
    audit.submit(record(audit, request_id="r-1"))  # a batch still goes through the thread
    await eventually(lambda: len(stream.threads) == 2)
    assert stream.threads[1] != threading.get_ident()


async def test_a_confirmed_record_goes_to_a_pipe_from_a_worker_thread(make: MakeLog) -> None:
    read_end, write_end = os.pipe()
    stream = NotedFile(os.fdopen(write_end, "wb"))
    try:
        audit = await make(
            line=LineSink(cast(BinaryIO, stream), "stdout", owned=True), publisher=None
        )
        confirmed = record(audit, "write")
        assert await audit.confirm(confirmed)
        assert len(stream.threads) == 1 and stream.threads[0] != threading.get_ident()
        assert audit_decoder.decode(os.read(read_end, 65536)) == confirmed
    finally:
        os.close(read_end)


async def test_a_confirmed_record_waits_for_a_batch_being_written_and_never_splits_it(
    make: MakeLog, tmp_path: Path
) -> None:
    stream = noted_file(tmp_path)
    audit = await make(line=LineSink(cast(BinaryIO, stream), "file", owned=True), publisher=None)
    stream.hold = True
    for n in range(50):
        audit.submit(record(audit, request_id=f"r-{n}"))
    await asyncio.to_thread(stream.entered.wait, 5)  # the batch is being written
    confirming = asyncio.ensure_future(audit.confirm(record(audit, "write", request_id="w-1")))
    await asyncio.sleep(0.05)
    assert not confirming.done()  # not written from the loop while the batch holds the sink
    stream.release.set()
    assert await confirming
    written = [r.request_id for r in map(audit_decoder.decode, stream_lines(tmp_path))]
    assert written == [f"r-{n}" for n in range(50)] + ["w-1"]


async def test_stdout_is_written_from_the_event_loop_only_while_it_is_a_regular_file(
    make: MakeLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = noted_file(tmp_path)
    audit = await make(line=LineSink(None, "stdout"), publisher=None)
    try:
        monkeypatch.setattr(sys, "stdout", SimpleNamespace(buffer=stream))
        assert await audit.confirm(record(audit, "write"))
        assert stream.threads == [threading.get_ident()]
        monkeypatch.setattr(sys, "stdout", SimpleNamespace(buffer=FlakyStream()))  # no fd
        assert await audit.confirm(record(audit, "write"))
        assert len(cast(FlakyStream, sys.stdout.buffer).records()) == 1
        assert audit.written["stdout"] == 2
    finally:
        stream.close()


async def test_a_failed_write_to_a_regular_file_leaves_the_record_to_jetstream(
    make: MakeLog, tmp_path: Path
) -> None:
    stream, nats = noted_file(tmp_path), FakePublisher()
    stream.fail = True
    audit = await make(line=LineSink(cast(BinaryIO, stream), "file", owned=True), publisher=nats)
    assert await audit.confirm(record(audit, "write"))
    assert nats.acknowledged == [True] and len(nats.records()) == 1
    assert audit.failed["file"] == 1 and audit.written["nats"] == 1
    nats.ok = False
    assert not await audit.confirm(record(audit, "write"))
    assert not audit.healthy


async def test_jetstream_still_gets_a_record_written_directly_to_the_file(
    make: MakeLog, tmp_path: Path
) -> None:
    stream, nats = noted_file(tmp_path), FakePublisher()
    nats.delay = 0.05
    audit = await make(line=LineSink(cast(BinaryIO, stream), "file", owned=True), publisher=nats)
    confirmed = record(audit, "write")
    assert await audit.confirm(confirmed)
    assert nats.published == []  # the file took it: not waiting for the acknowledgement
    await eventually(lambda: nats.records() == [confirmed])
    assert nats.acknowledged == [True]


def stream_lines(tmp_path: Path) -> list[bytes]:
    return (tmp_path / "audit.log").read_bytes().splitlines()


# -- NATS messages of the background writer --------------------------------------------------


async def test_background_records_go_to_nats_as_lines_one_message_per_run_of_one_op(
    make: MakeLog,
) -> None:
    nats = FakePublisher()
    audit = await make(line=None, publisher=nats)
    for n, op in enumerate(["read", "read", "write", "read"]):
        audit.submit(record(audit, op, request_id=f"r-{n}"))
    await eventually(lambda: len(nats.records()) == 4)
    assert [(op, data.count(b"\n") + 1) for op, data in nats.published] == [
        ("read", 2), ("write", 1), ("read", 1),
    ]  # fmt: skip
    assert [r.request_id for r in nats.records()] == ["r-0", "r-1", "r-2", "r-3"]


async def test_a_long_run_is_split_into_messages_of_at_most_64_kib(make: MakeLog) -> None:
    nats = FakePublisher()
    audit = await make(line=None, publisher=nats)
    for n in range(400):
        audit.submit(record(audit, request_id=f"r-{n}", path="app/" + "p" * 500))
    await eventually(lambda: len(nats.records()) == 400)
    assert len(nats.published) >= 4
    assert all(len(data) <= 64 * 1024 for _, data in nats.published)
    assert [r.request_id for r in nats.records()] == [f"r-{n}" for n in range(400)]

"""AuditLog: queued and batched writes, confirmation, fail-closed health, overflow, recovery."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest

from schemas.audit import AuditRecord, audit_decoder
from service.audit import AuditLog, LineSink
from service.errors import AuditUnavailable, ConfigError
from tests.fakes import eventually


class FakePublisher:
    """The NATS side: keeps what it was given; `ok = False` makes it refuse."""

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


MakeLog = Callable[..., AuditLog]


@pytest.fixture
async def make() -> AsyncIterator[MakeLog]:
    made: list[AuditLog] = []

    async def build(**kwargs: Any) -> AuditLog:
        audit = AuditLog(instance_id="i-1", **kwargs)
        await audit.start()
        made.append(audit)
        return audit

    yield build  # type: ignore[misc]
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
    await eventually(lambda: len(stream.records()) == 500 and len(nats.published) == 500)
    assert [r.request_id for r in stream.records()] == [f"r-{n}" for n in range(500)]


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


async def test_without_any_sink_nothing_is_confirmed_or_refused(make: MakeLog) -> None:
    audit = await make(line=None, publisher=None)
    assert not audit.must_confirm("write")
    assert await audit.confirm(record(audit, "write"))
    audit.submit(record(audit))
    audit.check("write")


# -- the line sink ----------------------------------------------------------------------------


def test_the_file_sink_appends_to_a_file_only_its_owner_can_read(tmp_path: Path) -> None:
    target = tmp_path / "audit.log"
    target.write_bytes(b"earlier\n")
    os.chmod(target, 0o600)
    sink = LineSink.open(f"file:{target}")
    assert sink is not None and sink.name == "file"
    sink.write(b"later\n")
    sink.close()
    assert target.read_bytes() == b"earlier\nlater\n"
    fresh = tmp_path / "new.log"
    new_sink = LineSink.open(f"file:{fresh}")
    assert new_sink is not None
    new_sink.close()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600


def test_stdout_and_none_sinks(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert LineSink.open("none") is None
    sink = LineSink.open("stdout")
    assert sink is not None and sink.name == "stdout"
    sink.write(b'{"a":1}\n')
    assert capsysbinary.readouterr().out == b'{"a":1}\n'


def test_an_unwritable_audit_file_is_a_config_error_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        LineSink.open(f"file:{tmp_path / 'missing-dir' / 'audit.log'}")
    assert error.value.setting == "SECRETS_AUDIT_SINK"

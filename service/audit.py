"""The audit trail: one record for every secret access and change, allowed or denied.

Records go to a line sink (SECRETS_AUDIT_SINK: JSON lines on stdout or appended to a file) and
to NATS on `<prefix>.audit.<op>`, stored in the JetStream stream SECRETS_AUDIT. Each sink is an
audit device in Vault's sense: a record is recorded once *any* of them accepted it.

Off the hot path: a record is queued, and one background task writes what gathered every 50 ms
(sooner when a batch fills): one write to the line sink per batch, and a plain NATS publish per
record, without waiting for JetStream's acknowledgement. A read pays for building a small
struct (its time formatted cheaply, `service.timestamps`) and a queue put; the struct holds
only strings and numbers, so the garbage collector never tracks the records waiting in the
queue. What SECRETS_AUDIT_FAIL_CLOSED covers (`writes` by default, `all`, or `none`) is
confirmed instead, each record on its own, JetStream's acknowledgement included:

- before the operation, a covered request is refused with 503 when every sink is known to be
  failing (the last write to it failed, NATS is disconnected, or the queue overflowed), so
  Vault is not even asked;
- after it, the response is held until a sink has accepted the record; if none does, the
  client gets 503 in place of the answer. As with Vault's audit devices, a write may then have
  happened although the client saw an error: writes are check-and-set, so a retry with the same
  version answers 409 rather than writing twice.

`writes` is the default because a change that nobody can trace is worse than a change refused,
while refusing reads whenever the log hiccups would make the audit log the availability bottle
neck of every consumer (reads are still audited, best effort, and counted when dropped). `all`
is for deployments where every read of a secret must be provably on record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from typing import BinaryIO, Protocol

import anyio
from anyio import to_thread

from schemas.audit import AuditRecord, audit_encoder
from service.errors import AuditUnavailable, ConfigError
from service.timestamps import utc_now

__all__ = ["AUDIT_OPS", "FAIL_CLOSED_MODES", "READ_OPS", "AuditLog", "AuditPublisher", "LineSink"]

log = logging.getLogger("secrets.audit")

READ_OPS = frozenset({"read", "list", "versions"})
"""Ops that change nothing; every other op counts as a write for SECRETS_AUDIT_FAIL_CLOSED."""

AUDIT_OPS = READ_OPS | {"write", "delete", "undelete", "destroy", "rollback", "other"}
"""The closed set of op names in records and subjects; anything else is recorded as `other`."""

FAIL_CLOSED_MODES = ("writes", "all", "none")


class AuditPublisher(Protocol):
    """The NATS side (EventBus): True once JetStream acknowledged the record or, without
    `acknowledged`, once the connection took it. Never raises."""

    @property
    def connected(self) -> bool: ...

    async def publish_audit(
        self, op: str, payload: bytes, *, acknowledged: bool = True
    ) -> bool: ...


class LineSink:
    """JSON lines to a binary stream, flushed after each batch. Called from worker threads.

    Without a stream it writes to whatever `sys.stdout` is at the time.
    """

    def __init__(self, stream: BinaryIO | None, name: str, *, owned: bool = False) -> None:
        self.stream = stream
        self.name = name  # "stdout" or "file": a metric label
        self._owned = owned

    @classmethod
    def open(cls, spec: str) -> LineSink | None:
        """`stdout`, `file:<path>` (appended to, created 0600) or `none` (None)."""
        if spec == "none":
            return None
        if spec == "stdout":
            return cls(None, "stdout")
        path = spec.removeprefix("file:")
        try:
            fd = _open_append(path)
        except OSError as exc:
            raise ConfigError(
                "SECRETS_AUDIT_SINK", f"cannot open {path!r}: {exc.strerror}"
            ) from None
        return cls(fd, "file", owned=True)

    def write(self, data: bytes) -> None:
        stream = self.stream if self.stream is not None else sys.stdout.buffer
        stream.write(data)
        stream.flush()

    def close(self) -> None:
        if self._owned and self.stream is not None:
            with contextlib.suppress(OSError):
                self.stream.close()


def _open_append(path: str) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    return os.fdopen(fd, "ab")


class AuditLog:
    """Queues, writes and confirms audit records; knows whether any sink is working."""

    def __init__(
        self,
        *,
        line: LineSink | None,
        publisher: AuditPublisher | None,
        fail_closed: str = "writes",
        instance_id: str = "",
        queue_size: int = 10_000,
        batch_size: int = 1024,
        flush_interval: float = 0.05,
        timeout: float = 2.0,
    ) -> None:
        if fail_closed not in FAIL_CLOSED_MODES:
            raise ValueError(f"fail_closed must be one of {FAIL_CLOSED_MODES}")
        self.line = line
        self.publisher = publisher
        self._enabled = line is not None or publisher is not None
        self.fail_closed = fail_closed
        self.instance_id = instance_id
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.timeout = timeout
        self._queue: asyncio.Queue[AuditRecord] = asyncio.Queue(queue_size)
        self._limiter = anyio.CapacityLimiter(1)  # one write at a time keeps lines whole
        self._writer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[bool]] = set()
        self._line_ok = True
        self._nats_ok = True
        self._backlogged = False
        # Plain ints for the metrics collector: records by sink and result, and dropped ones.
        self.written: dict[str, int] = {"stdout": 0, "file": 0, "nats": 0}
        self.failed: dict[str, int] = {"stdout": 0, "file": 0, "nats": 0}
        self.dropped = 0
        self.refused = 0

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def healthy(self) -> bool:
        """False when every configured sink is known to be failing, or records were dropped."""
        if self._backlogged:
            return False
        if self.line is not None and self._line_ok:
            return True
        return self.publisher is not None and self._nats_ok and self.publisher.connected

    def must_confirm(self, op: str | None) -> bool:
        """Whether a request doing `op` must not be answered before its record is accepted."""
        if op is None or not self._enabled or self.fail_closed == "none":
            return False
        return self.fail_closed == "all" or op not in READ_OPS

    def check(self, op: str) -> None:
        """Before doing `op`: raise AuditUnavailable if it is covered and no sink works."""
        if self.must_confirm(op) and not self.healthy:
            self.refused += 1
            raise AuditUnavailable()

    def record(
        self,
        *,
        request_id: str,
        op: str,
        method: str,
        path: str | None,
        version: int | None,
        allowed: bool,
        outcome: str,
        status: int,
        reason: str | None,
        sub: str | None,
        client_id: str | None,
        source: str | None,
    ) -> AuditRecord:
        return AuditRecord(
            time=utc_now(),
            request_id=request_id,
            op=op if op in AUDIT_OPS else "other",
            method=method,
            path=path,
            version=version,
            allowed=allowed,
            outcome=outcome,
            status=status,
            reason=reason,
            sub=sub,
            client_id=client_id,
            source=source,
            instance_id=self.instance_id,
        )

    # -- writing ---------------------------------------------------------------------------

    def submit(self, record: AuditRecord) -> None:
        """Queue `record` for the background writer; never blocks, never raises."""
        if not self.enabled:
            return
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.dropped += 1
            if not self._backlogged:
                log.error("audit queue full: records dropped, fail-closed operations refused")
            self._backlogged = True

    async def confirm(self, record: AuditRecord) -> bool:
        """Write `record` now; True as soon as one sink accepted it (the others carry on)."""
        if not self.enabled:
            return True
        payload = audit_encoder.encode(record)
        loop = asyncio.get_running_loop()
        attempts: list[asyncio.Task[bool]] = []
        if self.line is not None:
            attempts.append(loop.create_task(self._write_line(payload + b"\n", 1)))
        if self.publisher is not None:
            attempts.append(loop.create_task(self._publish([record], [payload], acked=True)))
        for task in attempts:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        for next_done in asyncio.as_completed(attempts):
            if await next_done:
                return True
        return False

    async def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        """Write what is queued (for up to `timeout` seconds), then stop and close the file."""
        if self._writer is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), self.timeout)
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.timeout)
        if self.line is not None:
            self.line.close()

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            if self._queue.qsize() < self.batch_size and self.flush_interval > 0:
                # Quiet: let records gather, so that one write (one thread hop) carries many.
                await asyncio.sleep(self.flush_interval)
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            try:
                await self._deliver(batch)
            except Exception:  # noqa: BLE001 - the writer must outlive any one batch
                log.exception("audit batch failed")
            finally:
                for _ in batch:
                    self._queue.task_done()
            if self._backlogged and self._queue.qsize() < self._queue.maxsize // 2:
                self._backlogged = False
                log.warning("audit queue drained: accepting fail-closed operations again")

    async def _deliver(self, batch: list[AuditRecord]) -> None:
        payloads = [audit_encoder.encode(record) for record in batch]
        jobs = []
        if self.line is not None:
            jobs.append(self._write_line(b"".join(p + b"\n" for p in payloads), len(batch)))
        if self.publisher is not None:
            jobs.append(self._publish(batch, payloads, acked=False))
        await asyncio.gather(*jobs)

    async def _write_line(self, data: bytes, count: int) -> bool:
        assert self.line is not None
        sink = self.line
        try:
            with anyio.fail_after(self.timeout):
                await to_thread.run_sync(
                    sink.write, data, limiter=self._limiter, abandon_on_cancel=True
                )
        except (OSError, ValueError, TimeoutError) as exc:
            # ValueError: the stream was closed under us.
            self.failed[sink.name] += count
            if self._line_ok:
                log.error(
                    "audit sink failed", extra={"sink": sink.name, "error_type": type(exc).__name__}
                )
            self._line_ok = False
            return False
        self.written[sink.name] += count
        if not self._line_ok:
            log.warning("audit sink recovered", extra={"sink": sink.name})
        self._line_ok = True
        return True

    async def _publish(
        self, batch: list[AuditRecord], payloads: list[bytes], *, acked: bool
    ) -> bool:
        assert self.publisher is not None
        publish = self.publisher.publish_audit
        if acked:
            results = await asyncio.gather(
                *(publish(r.op, p) for r, p in zip(batch, payloads, strict=True))
            )
        else:
            # Handed to the connection one after the other: no round trip per record.
            results = [
                await publish(r.op, p, acknowledged=False)
                for r, p in zip(batch, payloads, strict=True)
            ]
        ok = sum(results)
        self.written["nats"] += ok
        self.failed["nats"] += len(results) - ok
        if acked:
            # Only an acknowledgement proves JetStream stores records; a plain publish that
            # fails means a lost connection, which `healthy` sees through `connected`.
            self._nats_ok = ok == len(results)
        return ok == len(results)

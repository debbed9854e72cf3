"""The audit trail: `AuditLog` queues a record for every secret access and change, allowed or
denied, writes it to the line sink and to NATS, and refuses (fail-closed) when none can take it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

import anyio
from anyio import to_thread

from schemas.audit import OPS, READ_OPS, AuditRecord, audit_encoder
from schemas.errors import AuditUnavailable
from service.audit.sinks import LineSink
from service.tasks import BackgroundTasks
from service.timestamps import utc_now

__all__ = ["DROP_REASONS", "FAIL_CLOSED_MODES", "AuditLog", "AuditPublisher"]

log = logging.getLogger("secrets.audit")

FAIL_CLOSED_MODES = ("writes", "all", "none")

DROP_REASONS = ("queue_full", "unauthenticated_flood")
"""Why records are dropped (a metric label): the queue overflowed, or the unauthenticated
requests' share of it did (which never refuses anything)."""

_UNAUTHENTICATED = "unauthenticated"  # the outcome of a 401: no principal was verified


_MESSAGE_BYTES = 64 * 1024
"""At most this much of a batch per NATS message, far below NATS's default max_payload (1 MiB)."""


class AuditPublisher(Protocol):
    """The NATS side (EventBus): True once JetStream acknowledged the payload or, without
    `acknowledged`, once the connection took it. Never raises.

    A payload is one record, or (not acknowledged) several records of one op, a line each."""

    @property
    def connected(self) -> bool: ...

    async def publish_audit(
        self, op: str, payload: bytes, *, acknowledged: bool = True
    ) -> bool: ...


class AuditLog:
    """Queues, writes and confirms audit records (one for every secret access and change, allowed
    or denied); knows whether any sink is working.

    Records go to a line sink (SECRETS_AUDIT_SINK: JSON lines on stdout or appended to a file) and
    to NATS on `<prefix>.audit.<op>`, stored in the JetStream stream SECRETS_AUDIT. Each sink is an
    audit device in Vault's sense: a record is recorded once *any* of them accepted it.

    Off the hot path: a record is encoded and queued, and one background task writes what gathered
    every 50 ms (sooner when a batch fills): one write to the line sink per batch, and a plain NATS
    publish per run of records of one op (JSON lines, one object per line, up to 64 KiB a message),
    without waiting for JetStream's acknowledgement. A read pays for building a small struct (its
    time formatted cheaply, `service.timestamps`), encoding it and a list append; a queued record is
    bytes, which the garbage collector never tracks. What SECRETS_AUDIT_FAIL_CLOSED covers (`writes`
    by default, `all`, or `none`) is confirmed instead, each record on its own (one record per NATS
    message), JetStream's acknowledgement included:

    - before the operation, a covered request is refused with 503 when every sink is known to be
      failing (the last write to it failed, NATS is disconnected, or the queue overflowed), so Vault
      is not even asked;
    - after it, the response is held until a sink has accepted the record; if none does, the client
      gets 503 in place of the answer. As with Vault's audit devices, a write may then have happened
      although the client saw an error: writes are check-and-set, so a retry with the same version
      answers 409 rather than writing twice.

    A line sink on a regular file takes a confirmed record from the event loop itself (a few µs; the
    record is the OS's once `write` returned); a pipe or a terminal, whose writes can block, from a
    worker thread, as do batches.

    Records of requests refused at authentication (outcome `unauthenticated`: nobody verified) are
    noise anyone can make: they may take at most a quarter of the queue at once, and beyond that are
    dropped and counted apart (`noise_dropped`), never marking the queue overflowed. A flood of 401s
    can then neither crowd out nor refuse the records of authenticated requests.

    `writes` is the default because a change that nobody can trace is worse than a change refused,
    while refusing reads whenever the log hiccups would make the audit log the availability bottle
    neck of every consumer (reads are still audited, best effort, and counted when dropped). `all`
    is for deployments where every read of a secret must be provably on record.
    """

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
        self.queue_size = queue_size
        # (op, encoded record, unauthenticated): a list and an event, cheaper per record than
        # an asyncio.Queue; `_noise` counts the unauthenticated ones queued.
        self._queue: list[tuple[str, bytes, bool]] = []
        self._noise = 0
        self._queued = asyncio.Event()
        self._closing = False
        self._limiter = anyio.CapacityLimiter(1)  # one worker thread writes, in order
        self._writer: asyncio.Task[None] | None = None
        self._tasks = BackgroundTasks()  # confirmations' attempts still running
        self._line_ok = True
        self._nats_ok = True
        self._backlogged = False
        # Plain ints for the metrics collector: records by sink and result, and dropped ones.
        self.written: dict[str, int] = {"stdout": 0, "file": 0, "nats": 0}
        self.failed: dict[str, int] = {"stdout": 0, "file": 0, "nats": 0}
        self.dropped = 0
        self.noise_dropped = 0  # unauthenticated records beyond their share: never refuses
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
        at: str | None = None,
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
        client_request_id: str | None = None,
        change_id: str | None = None,
        bypass_reason: str | None = None,
    ) -> AuditRecord:
        """The record of a request; `at`: its time (`service.timestamps.utc_now()`) if known."""
        return AuditRecord(
            time=at or utc_now(),
            request_id=request_id,
            op=op if op in OPS else "other",
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
            client_request_id=client_request_id,
            change_id=change_id,
            bypass_reason=bypass_reason,
        )

    # -- writing ---------------------------------------------------------------------------

    def submit(self, record: AuditRecord) -> None:
        """Queue `record` for the background writer; never blocks, never raises."""
        if not self._enabled:
            return
        noise = record.outcome == _UNAUTHENTICATED
        if noise:
            # Anyone can send requests without a token: their records get a share of the
            # queue, and a flood of them is dropped without refusing anyone else.
            if self._noise >= self.queue_size // 4 or len(self._queue) >= self.queue_size:
                if not self.noise_dropped:
                    log.warning("audit queue: unauthenticated requests' records dropped")
                self.noise_dropped += 1
                return
            self._noise += 1
        elif len(self._queue) >= self.queue_size:
            self.dropped += 1
            if not self._backlogged:
                log.error("audit queue full: records dropped, fail-closed operations refused")
            self._backlogged = True
            return
        self._queue.append((record.op, audit_encoder.encode(record), noise))
        if not self._queued.is_set():
            self._queued.set()

    async def confirm(self, record: AuditRecord) -> bool:
        """Write `record` now; True as soon as one sink accepted it (the others carry on)."""
        if not self.enabled:
            return True
        payload = audit_encoder.encode(record)
        loop = asyncio.get_running_loop()
        attempts: list[asyncio.Task[bool]] = []
        if self.publisher is not None:
            attempts.append(loop.create_task(self._publish_one(record.op, payload)))
        if self.line is not None:
            try:
                direct = self.line.try_write_now(payload + b"\n")
            except (OSError, ValueError) as exc:  # ValueError: the stream was closed under us
                self._line_written(1, exc)
            else:
                if direct:
                    self._line_written(1, None)
                    for task in attempts:  # JetStream stores it too, in the background
                        self._tasks.keep(task)
                    return True
                attempts.append(loop.create_task(self._write_line(payload + b"\n", 1)))
        for task in attempts:
            self._tasks.keep(task)
        for next_done in asyncio.as_completed(attempts):
            if await next_done:
                return True
        return False

    async def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        """Write what is queued (for up to `timeout` seconds), then stop and close the file."""
        if self._writer is not None:
            self._closing = True
            self._queued.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._writer), self.timeout)
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        await self._tasks.aclose(self.timeout)
        if self.line is not None:
            self.line.close()

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._queued.clear()
                await self._queued.wait()
                continue
            if len(self._queue) < self.batch_size and self.flush_interval > 0:
                if not self._closing:
                    # Quiet: let records gather, so that one write (one thread hop) carries many.
                    await asyncio.sleep(self.flush_interval)
            batch = self._queue[: self.batch_size]
            del self._queue[: self.batch_size]
            if self._noise:
                self._noise -= sum(noise for _, _, noise in batch)
            try:
                await self._deliver(batch)
            except Exception:  # noqa: BLE001 - the writer must outlive any one batch
                log.exception("audit batch failed")
            if self._backlogged and len(self._queue) < self.queue_size // 2:
                self._backlogged = False
                log.warning("audit queue drained: accepting fail-closed operations again")

    async def _deliver(self, batch: list[tuple[str, bytes, bool]]) -> None:
        jobs: list[Coroutine[Any, Any, object]] = []
        if self.line is not None:
            lines = b"\n".join([payload for _, payload, _ in batch]) + b"\n"
            jobs.append(self._write_line(lines, len(batch)))
        if self.publisher is not None:
            jobs.append(self._publish_batch(batch))
        await asyncio.gather(*jobs)

    async def _write_line(self, data: bytes, count: int) -> bool:
        assert self.line is not None
        try:
            with anyio.fail_after(self.timeout):
                await to_thread.run_sync(
                    self.line.write, data, limiter=self._limiter, abandon_on_cancel=True
                )
        except (OSError, ValueError, TimeoutError) as exc:
            # ValueError: the stream was closed under us.
            return self._line_written(count, exc)
        return self._line_written(count, None)

    def _line_written(self, count: int, error: Exception | None) -> bool:
        """Count a write of `count` records to the line sink (failed with `error` unless None)
        and follow the sink's health; True if it succeeded."""
        assert self.line is not None
        sink = self.line.name
        if error is not None:
            self.failed[sink] += count
            if self._line_ok:
                log.error(
                    "audit sink failed", extra={"sink": sink, "error_type": type(error).__name__}
                )
            self._line_ok = False
            return False
        self.written[sink] += count
        if not self._line_ok:
            log.warning("audit sink recovered", extra={"sink": sink})
        self._line_ok = True
        return True

    async def _publish_one(self, op: str, payload: bytes) -> bool:
        assert self.publisher is not None
        ok = await self.publisher.publish_audit(op, payload)
        if ok:
            self.written["nats"] += 1
        else:
            self.failed["nats"] += 1
        # Only an acknowledgement proves JetStream stores records; a plain publish that fails
        # means a lost connection, which `healthy` sees through `connected`.
        self._nats_ok = ok
        return ok

    async def _publish_batch(self, batch: list[tuple[str, bytes, bool]]) -> None:
        """A plain publish (no round trip) per run of records of one op, as lines, in order."""
        run: list[bytes] = []
        run_op = ""
        size = 0
        for op, payload, _ in batch:
            if run and (op != run_op or size + len(payload) > _MESSAGE_BYTES):
                await self._publish_run(run_op, run)
                run, size = [], 0
            run_op = op
            run.append(payload)
            size += len(payload) + 1
        if run:
            await self._publish_run(run_op, run)

    async def _publish_run(self, op: str, payloads: list[bytes]) -> None:
        assert self.publisher is not None
        if await self.publisher.publish_audit(op, b"\n".join(payloads), acknowledged=False):
            self.written["nats"] += len(payloads)
        else:
            self.failed["nats"] += len(payloads)

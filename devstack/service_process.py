"""`secrets-service serve` as a child process, configured by environment, for tests and
benchmarks that need the real entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from devstack.processes import (
    POLL_INTERVAL,
    DevStackError,
    ManagedProcess,
    ProcessLog,
    check_port_free,
    child_env,
    end_process,
    spawn,
)


class ServiceProcess(ManagedProcess):
    """`python -m service serve` as a child process, configured by `environ` (SECRETS_*).

    For tests and the soak that need a real process: one to SIGKILL, or to measure from /proc.
    With SECRETS_TLS_CERT in `environ` it serves HTTPS: `url` is https, and the readiness probe
    trusts `tls_ca` (a PEM CA file; the system's CAs without it).
    """

    def __init__(
        self,
        environ: Mapping[str, str],
        *,
        log_path: Path | None = None,
        tls_ca: str | Path | None = None,
        module: str = "service",
    ) -> None:
        """`module`: what `python -m` runs with `serve` (tests run a wrapper of the service)."""
        import ssl  # only here: the rest of the dev stack speaks plain HTTP

        self.environ = dict(environ)
        self.port = int(self.environ.get("SECRETS_PORT", "8080"))
        scheme = "https" if self.environ.get("SECRETS_TLS_CERT") else "http"
        self.url = f"{scheme}://{self.environ.get('SECRETS_HOST', '127.0.0.1')}:{self.port}"
        self.verify: ssl.SSLContext | bool = (
            True if tls_ca is None else ssl.create_default_context(cafile=str(tls_ca))
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.module = module
        self._log = ProcessLog(log_path, "secrets-service-")

    def __repr__(self) -> str:
        pid = None if self.process is None else self.process.pid
        return f"ServiceProcess(url={self.url!r}, pid={pid})"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise DevStackError(f"secrets-service at {self.url} is not running")
        return self.process.pid

    @property
    def log_path(self) -> Path | None:
        return self._log.path

    def log_tail(self) -> str:
        return self._log.tail()

    def start(self, timeout: float = 30.0) -> None:
        """Start it and return once /healthz answers (the lifespan has opened everything)."""
        if self.process is not None and self.process.poll() is None:
            raise DevStackError(f"secrets-service at {self.url} is already running")
        check_port_free(self.port, "secrets-service")
        env = {**child_env(("SECRETS_",)), **self.environ}
        argv = [sys.executable, "-m", self.module, "serve"]
        self.process = process = spawn(argv, self._log, env)
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0, trust_env=False, verify=self.verify) as client:
            while True:
                if process.poll() is not None:
                    tail = self._log.tail()
                    self.stop()
                    raise DevStackError(
                        f"secrets-service at {self.url} exited with code {process.returncode} "
                        f"while starting; log tail:\n{tail}"
                    )
                try:
                    if client.get(f"{self.url}/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() >= deadline:
                    tail = self._log.tail()
                    self.stop()
                    raise DevStackError(
                        f"secrets-service at {self.url} not up in {timeout}s; log tail:\n{tail}"
                    )
                time.sleep(POLL_INTERVAL)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown code runs. The log stays until stop()."""
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            end_process(process)
        self._log.close()

    def rss_bytes(self) -> int:
        """Resident memory, from /proc (Linux)."""
        return int(self._status_field("VmRSS").split()[0]) * 1024

    def threads(self) -> int:
        return int(self._status_field("Threads"))

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def _status_field(self, name: str) -> str:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == name:
                return value.strip()
        raise DevStackError(f"no {name} in /proc/{self.pid}/status")

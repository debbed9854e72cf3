"""The compose stack's images, read without a Docker engine: each is upstream's unless a variable
names another; the service's is built from the Dockerfile on the PYTHON_IMAGE argument and runs as
a numeric non-root user on a read-only root with a tmpfs HOME, its healthcheck gating Prometheus;
and `docker compose config` (or docker-compose's) resolves the file as these tests read it, only
with the operator's variables exported. The topology and wiring are test_compose.py's."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

import pytest
import yaml

from tests.support import skip_unless_required
from tests.unit.compose_support import (
    COMPOSE,
    INSTANCES,
    OPERATOR_ENV,
    dockerfile,
    final_stage,
    image_env,
    load_stack,
    resolved,
)

# Service name prefix -> the variable choosing its image, and the upstream repository it names
# by default (the service's own image is built here, under that name).
IMAGES = {
    "openbao-": ("OPENBAO_IMAGE", "openbao/openbao"),
    "nats-": ("NATS_IMAGE", "nats"),
    "prometheus": ("PROMETHEUS_IMAGE", "prom/prometheus"),
    "secrets-": ("SECRETS_IMAGE", "secrets-service"),
}
# What a test machine exports instead (make compose-test: devstack/containers.py's images).
LOCAL_IMAGES = {
    "OPENBAO_IMAGE": "local/openbao:test",
    "NATS_IMAGE": "local/nats:test",
    "PROMETHEUS_IMAGE": "local/prometheus:test",
    "SECRETS_IMAGE": "local/secrets-service:test",
    "SECRETS_PYTHON_IMAGE": "local/debian:test",
    "SECRETS_COMPOSE_CERTS": "/srv/stack-certs",
}


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    return load_stack()


def _image_variable(name: str) -> tuple[str, str]:
    (variable, upstream) = next(v for prefix, v in IMAGES.items() if name.startswith(prefix))
    return variable, upstream


# -- the images --------------------------------------------------------------------------------


def test_every_image_is_upstreams_by_default_and_chosen_by_a_variable(
    stack: dict[str, Any],
) -> None:
    for name, service in stack["services"].items():
        variable, upstream = _image_variable(name)
        match = re.fullmatch(r"\$\{(\w+):-([^}]+)\}", service["image"])
        assert match is not None, f"{name}'s image {service['image']} is not chosen by a variable"
        assert match.group(1) == variable, name
        repository, _, tag = match.group(2).partition(":")
        assert repository == upstream, name
        assert tag, f"{name}'s default image has no tag"
        if not name.startswith("secrets-"):
            assert tag != "latest", f"{name}'s upstream image is not pinned"
    # Only the service's image is built (from the repository's Dockerfile).
    built = {name for name, service in stack["services"].items() if "build" in service}
    assert built == set(INSTANCES)


# -- the Dockerfile ----------------------------------------------------------------------------


def test_the_service_image_builds_on_the_python_image_argument_as_a_numeric_non_root_user(
    stack: dict[str, Any],
) -> None:
    steps = dockerfile()
    # A global ARG (before the first FROM), so every stage's FROM may use it.
    assert steps[0][0] == "ARG"
    argument, _, default = steps[0][1].partition("=")
    assert argument == "PYTHON_IMAGE"
    stages = [arguments.split() for keyword, arguments in steps if keyword == "FROM"]
    assert len(stages) == 2 and all(stage[0] == "${PYTHON_IMAGE}" for stage in stages)
    for name in INSTANCES:
        build = stack["services"][name]["build"]
        assert build["context"] == ".."
        assert build["args"] == {"PYTHON_IMAGE": f"${{SECRETS_PYTHON_IMAGE:-{default}}}"}
    final = final_stage(steps)
    users = [arguments for keyword, arguments in final if keyword == "USER"]
    assert users, "the final stage runs as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert gid.isdigit() and int(gid) != 0, users[-1]
    # The operator gives that uid the keys the service reads (the compose file's header).
    assert f"sudo chown {uid} compose/certs/service-key.pem" in COMPOSE.read_text()
    (entrypoint,) = (json.loads(a) for keyword, a in final if keyword == "ENTRYPOINT")
    assert entrypoint == ["secrets-service", "serve"]
    copied = {arguments for keyword, arguments in steps if keyword == "COPY"}
    for package in ("service", "events", "schemas", "secrets_client", "client"):
        assert f"{package} ./{package}" in copied
    assert not any(a.startswith(("devstack", "tests")) for a in copied)


def test_the_service_containers_run_read_only_writing_only_to_a_tmpfs_home(
    stack: dict[str, Any],
) -> None:
    env = image_env(dockerfile())
    assert env["HOME"] == "/tmp"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # no .pyc written next to the code
    for name in INSTANCES:
        service = stack["services"][name]
        assert service["read_only"] is True, name
        assert service["tmpfs"] == ["/tmp"], name
        for volume in service["volumes"]:
            assert resolved(volume).endswith(":ro"), f"{name} mounts {volume} writable"
        assert "user" not in service, "the image's non-root user stands"


def test_prometheus_starts_once_the_instances_report_ready_through_the_images_healthcheck(
    stack: dict[str, Any],
) -> None:
    steps = dockerfile()
    (check,) = (arguments for keyword, arguments in final_stage(steps) if keyword == "HEALTHCHECK")
    command = json.loads(check.partition(" CMD ")[2])
    assert command[0] == "python3"
    assert "/readyz" in command[-1] and "SECRETS_PORT" in command[-1]  # the instance's own port
    needs = stack["services"]["prometheus"]["depends_on"]
    assert needs == {name: {"condition": "service_healthy"} for name in INSTANCES}
    for name in INSTANCES:
        assert "healthcheck" not in stack["services"][name], "the image's check is the one"


# -- docker compose itself ---------------------------------------------------------------------


def _compose_command() -> list[str]:
    """`docker compose` (v2), else `docker-compose` (v1, Debian's package)."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy is None:
        skip_unless_required("neither docker compose nor docker-compose is installed")
    return [legacy]


def _compose_config(*options: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    # `config` reads and resolves the file only: no engine is asked.
    return subprocess.run(
        [*_compose_command(), "-f", str(COMPOSE), "config", *options],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **env},
    )  # fmt: skip


def test_docker_compose_accepts_the_file_with_the_operators_variables_and_only_with_them() -> None:
    result = _compose_config("-q", env=OPERATOR_ENV)
    assert result.returncode == 0, result.stderr
    for variable in OPERATOR_ENV:
        missing = {k: v for k, v in OPERATOR_ENV.items() if k != variable}
        result = _compose_config("-q", env=missing)
        assert result.returncode != 0, f"{variable} should be required"
        assert variable in result.stderr


def test_docker_compose_resolves_the_file_as_these_tests_read_it(stack: dict[str, Any]) -> None:
    result = _compose_config(env=OPERATOR_ENV)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)["services"]
    assert set(printed) == set(stack["services"])
    for name, service in stack["services"].items():
        got = printed[name]
        assert got["image"] == resolved(service["image"]), name
        assert got["network_mode"] == "host", name
        assert "ports" not in got, name
        wanted = {k: resolved(v) for k, v in service.get("environment", {}).items()}
        assert {k: str(v) for k, v in got.get("environment", {}).items()} == wanted, name
        if "command" in service:
            assert got["command"] == [resolved(a) for a in service["command"]], name
        assert got.get("read_only", False) == service.get("read_only", False), name


def test_a_variable_chooses_each_image_the_base_of_the_service_and_the_certificates() -> None:
    result = _compose_config(env=OPERATOR_ENV | LOCAL_IMAGES)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)["services"]
    for name, service in printed.items():
        variable, _ = _image_variable(name)
        assert service["image"] == LOCAL_IMAGES[variable], name
        sources = [_volume_source(v) for v in service["volumes"]]
        assert any(s.startswith(LOCAL_IMAGES["SECRETS_COMPOSE_CERTS"]) for s in sources), name
        assert not any(s.endswith("/certs") for s in sources), name
    for name in INSTANCES:
        assert printed[name]["build"]["args"] == {
            "PYTHON_IMAGE": LOCAL_IMAGES["SECRETS_PYTHON_IMAGE"]
        }


def _volume_source(volume: str | dict[str, Any]) -> str:
    """A resolved volume's source: v1 prints "source:target:mode", v2 a mapping."""
    if isinstance(volume, dict):
        return str(volume["source"])
    return volume.split(":")[0]

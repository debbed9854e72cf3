"""Under SECRETS_TEST_CONTAINERS=1 the `openbao` and `nats` fixtures are containers of the chosen
images on the host's network, and a run leaves none of its containers behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from devstack import NatsEndpoint, OpenBaoEndpoint
from devstack.containers import docker
from tests.servers import (
    PID_LABEL,
    ContainerNats,
    ContainerOpenBao,
    containers_requested,
    nats_image,
    openbao_image,
)

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not containers_requested(), reason="SECRETS_TEST_CONTAINERS is not 1: fixtures are processes"
)


def _inspect(container_id: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = json.loads(docker("inspect", container_id).stdout)
    return found[0]


def _labelled(pid: int) -> list[str]:
    listed = docker("ps", "--all", "--quiet", "--no-trunc", "--filter", f"label={PID_LABEL}={pid}")
    return listed.stdout.split()


def _assert_running_here_on_the_host_network(container_id: str, image: str) -> None:
    assert container_id in _labelled(os.getpid())  # `docker ps` lists it, as this run's
    inspected = _inspect(container_id)
    assert inspected["State"]["Running"] is True
    assert inspected["Config"]["Image"] == image
    assert inspected["HostConfig"]["NetworkMode"] == "host"
    assert not inspected["HostConfig"]["PortBindings"]


def test_openbao_fixture_is_a_running_container_of_its_image_on_the_host_network(
    openbao: OpenBaoEndpoint,
) -> None:
    assert isinstance(openbao, ContainerOpenBao)
    assert openbao.addr.startswith("http://127.0.0.1:")
    _assert_running_here_on_the_host_network(openbao.container_id, openbao_image())


def test_nats_fixture_is_a_running_container_of_its_image_on_the_host_network(
    nats: NatsEndpoint,
) -> None:
    assert isinstance(nats, ContainerNats)
    assert nats.url.startswith("nats://127.0.0.1:")
    _assert_running_here_on_the_host_network(nats.container_id, nats_image())


def test_a_container_run_removes_every_container_it_started() -> None:
    # The two tests above in a child pytest: it starts both containers (they pass only then),
    # and once it is done the engine knows no container labelled with its pid.
    selected = [
        f"{__file__}::test_openbao_fixture_is_a_running_container_of_its_image_on_the_host_network",
        f"{__file__}::test_nats_fixture_is_a_running_container_of_its_image_on_the_host_network",
    ]
    argv = [sys.executable, "-m", "pytest", *selected, "-q", "-p", "no:cacheprovider"]
    with subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as child:
        try:
            output, _ = child.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            child.kill()
            raise
    assert child.returncode == 0, output
    assert "2 passed" in output, output
    assert _labelled(child.pid) == []

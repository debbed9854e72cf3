"""Scheduled rotation across three instances, each on its own node of a three-node NATS cluster,
sharing one OpenBao: a due rotation makes exactly one version per period, whichever instance
gets there first, and every instance hears `secret.rotated` for it."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from devstack import NatsServer, OidcIssuer, OpenBaoEndpoint
from schemas.events import ChangeEvent, SecretRotated
from tests.support import backend_for, cluster_services, record_figures, vault_write, write_policy

EVERY = 2.0
WATCH = 11.0  # seconds the schedule runs: five periods and some
POLICY = f"""\
[auth]
roles_claim = "roles"

[roles.admin]
read = ["**"]
write = ["**"]
rotate = ["**"]

[[rotation.rules]]
paths = ["sched/*"]
generator = "token"
fields = ["api_key"]
every = "{EVERY:g}s"
"""


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    return write_policy(tmp_path, POLICY)


async def test_three_instances_make_one_version_per_period(
    openbao: OpenBaoEndpoint,
    oidc: OidcIssuer,
    nats_cluster: list[NatsServer],
    policy_file: Path,
) -> None:
    path = f"sched/{uuid.uuid4().hex[:8]}"
    async with cluster_services(
        openbao, oidc, nats_cluster, policy_file, "rot", rotation_scan_interval="0.5"
    ) as services:
        heard: list[list[ChangeEvent]] = [[] for _ in services]
        for events, svc in zip(heard, services, strict=True):
            svc.state.bus.on_received = events.append
        vault_write(openbao, path, {"api_key": "first-key-value-000000000000", "owner": "ci"})
        started = time.monotonic()
        await asyncio.sleep(WATCH)
        elapsed = time.monotonic() - started
        rotated_by = [svc.state.rotation.rotations["ok"] for svc in services]
        async with backend_for(openbao.addr, token=openbao.root_token) as vault:
            meta = await vault.read_metadata(path)
            latest = await vault.read(path)
        await asyncio.sleep(0.5)  # the last events reach every node
    times = [datetime.fromisoformat(v.created_time) for v in meta.versions]
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]
    rotations = meta.current_version - 1
    record_figures(
        "rotation_three_instances",
        every_s=EVERY,
        watched_s=round(elapsed, 2),
        versions_made=rotations,
        rotations_by_instance=rotated_by,
        min_gap_s=round(min(gaps), 3),
        max_gap_s=round(max(gaps), 3),
    )
    # Never two versions in one period; and the schedule kept up (a period, plus the wake-up).
    assert min(gaps) >= EVERY - 0.05, gaps
    assert rotations >= int(elapsed / (EVERY + 0.75)), gaps
    assert sum(rotated_by) == rotations  # each version made by exactly one instance
    assert latest.data["owner"] == "ci"
    for events in heard:
        versions = sorted(e.version for e in events if isinstance(e, SecretRotated))
        # Each instance hears every rotation (its own come back to it from the stream too).
        assert set(range(2, meta.current_version + 1)) <= set(versions)

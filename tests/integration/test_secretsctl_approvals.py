"""`secretsctl` change requests and break-glass as a user runs them: the installed command, a child
process, against the real stack, on paths under an `[[approvals.rules]]` entry (issue 13)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import pytest

from devstack import NatsEndpoint, OidcIssuer, OpenBaoEndpoint
from tests.integration.test_secretsctl import Ctl, Result
from tests.support import running_service, service_settings, write_policy

# The dev issuer's personas: reader (app-reader) acts as the approver here. The writer may approve
# too, so that the refusal of its own approval is `self_approval`, not a missing grant.
POLICY = """\
[roles.app-reader]
read = ["prod/**"]
approve = ["prod/**"]

[roles.app-writer]
read = ["prod/**", "app/**"]
write = ["prod/**", "app/**"]
approve = ["prod/**"]

[roles.admin]
read = ["prod/**"]
write = ["prod/**"]
bypass = ["prod/**"]

[[approvals.rules]]
paths = ["prod/**"]
required = 1
expires = "1h"
"""
CANARY = "canary-9a4f21-only-in-vault"
UNKNOWN_ID = "0" * 32


@pytest.fixture(scope="module")
async def ctl(
    openbao: OpenBaoEndpoint,
    nats: NatsEndpoint,
    oidc: OidcIssuer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Ctl]:
    policy = write_policy(tmp_path_factory.mktemp("secretsctl-approvals"), POLICY)
    settings = service_settings(openbao, nats, oidc, policy, audit_sink="none")
    tokens = {who: oidc.mint(who) for who in ("reader", "writer", "admin")}
    async with running_service(settings) as svc:
        yield Ctl(svc.url, tokens, nats.url)


def fresh(top: str = "prod") -> str:
    return f"{top}/ctl-{uuid.uuid4().hex[:10]}/db"


def printed(*results: Result) -> str:
    return "".join(r.stdout + r.stderr for r in results)


async def bypass_put(ctl: Ctl, path: str, version: int, value: str) -> Result:
    put = await ctl(
        "put",
        path,
        "--version",
        str(version),
        "--bypass-reason",
        "INC-8: outage",
        who="admin",
        stdin=json.dumps({"password": value}),
    )
    assert put.code == 0, put
    return put


async def test_a_proposal_approved_by_another_is_applied_and_its_value_never_printed(
    ctl: Ctl,
) -> None:
    path = fresh()
    value = json.dumps({"password": CANARY})
    proposed = await ctl("propose", path, "--version", "0", "--reason", "new key", stdin=value)
    assert proposed.code == 0, proposed
    request = proposed.json
    change_id = request["id"]
    assert (request["state"], request["path"], request["approvals"]) == ("pending", path, [])
    assert (request["base_version"], request["required"]) == (0, 1)

    own = await ctl("approve", change_id)
    assert own.code == 5 and own.error["error"] == "self_approval", own
    early = await ctl("apply", change_id)
    assert early.code == 4 and early.error["error"] == "change_conflict", early

    approved = await ctl("approve", change_id, who="reader")
    assert approved.code == 0, approved
    assert approved.json["state"] == "approved"
    assert len(approved.json["approvals"]) == 1

    applied = await ctl("apply", change_id)
    assert applied.code == 0, applied
    assert (applied.json["state"], applied.json["applied_version"]) == ("applied", 1)
    # A retried apply answers the same request and writes nothing more.
    again = await ctl("apply", change_id)
    assert again.code == 0 and again.json["applied_version"] == 1, again
    late = await ctl("approve", change_id, who="reader")
    assert late.code == 4 and late.error["error"] == "change_conflict", late

    got = await ctl("get", path, who="reader")
    assert got.code == 0 and got.json["data"] == {"password": CANARY}, got
    assert got.json["version"] == 1

    listed = await ctl("changes", "--state", "applied")
    assert listed.code == 0, listed
    assert change_id in [c["id"] for c in listed.json["changes"]]
    assert {c["state"] for c in listed.json["changes"]} == {"applied"}
    by_path = await ctl("changes", "--path", path, who="reader")
    assert [c["id"] for c in by_path.json["changes"]] == [change_id]

    shown = await ctl("change", change_id, who="reader")
    assert shown.code == 0, shown
    assert shown.json["fields"] == ["password"]
    assert shown.json["state"] == "applied" and shown.json["reason"] == "new key"
    # The value was only ever read back by `get`: no other answer or error carries it.
    steps = (proposed, own, early, approved, applied, again, late, listed, by_path, shown)
    assert CANARY not in printed(*steps)


async def test_a_direct_put_exits_9_unless_a_bypass_holder_gives_a_reason(ctl: Ctl) -> None:
    path = fresh()
    value = json.dumps({"password": "v1"})
    plain = await ctl("put", path, "--version", "0", stdin=value)
    assert plain.code == 9 and plain.error["error"] == "approval_required", plain
    admin_plain = await ctl("put", path, "--version", "0", who="admin", stdin=value)
    assert admin_plain.code == 9, admin_plain
    writer_reason = await ctl(
        "put", path, "--version", "0", "--bypass-reason", "INC-8", stdin=value
    )
    assert writer_reason.code == 9, writer_reason  # no secrets:bypass
    bypassed = await bypass_put(ctl, path, 0, "v1")
    assert bypassed.json == {"path": path, "version": 1}
    assert (await ctl("versions", path, who="reader")).json["current_version"] == 1


async def test_every_change_command_on_a_covered_path_exits_9_and_bypass_works_for_them_too(
    ctl: Ctl,
) -> None:
    path = fresh()
    await bypass_put(ctl, path, 0, "v1")
    await bypass_put(ctl, path, 1, "v2")
    for args in (
        ("delete", path),
        ("undelete", path, "--versions", "1"),
        ("rollback", path, "--to", "1", "--version", "2"),
    ):
        refused = await ctl(*args)
        assert refused.code == 9 and refused.error["error"] == "approval_required", refused
    reason = ("--bypass-reason", "INC-9: revert")
    rolled = await ctl("rollback", path, "--to", "1", "--version", "2", *reason, who="admin")
    assert rolled.json == {"path": path, "version": 3}, rolled
    deleted = await ctl("delete", path, *reason, who="admin")
    assert deleted.json == {"path": path, "versions": [3]}, deleted
    assert (await ctl("undelete", path, "--versions", "3", *reason, who="admin")).code == 0


async def test_a_proposal_overtaken_by_a_write_is_refused_at_apply_and_turns_stale(
    ctl: Ctl,
) -> None:
    path = fresh()
    await bypass_put(ctl, path, 0, "before")
    proposed = await ctl(
        "propose", path, "--version", "1", "--reason", "r", stdin=json.dumps({"password": CANARY})
    )
    change_id = proposed.json["id"]
    assert (await ctl("approve", change_id, who="reader")).code == 0
    await bypass_put(ctl, path, 1, "meanwhile")
    stale = await ctl("apply", change_id)
    assert stale.code == 4, stale
    assert (await ctl("change", change_id)).json["state"] == "stale"
    got = await ctl("get", path, who="reader")
    assert got.json["version"] == 2 and got.json["data"] == {"password": "meanwhile"}
    assert CANARY not in printed(proposed, stale)


async def test_a_rejected_or_cancelled_proposal_can_no_longer_be_applied(ctl: Ctl) -> None:
    path = fresh()
    value = json.dumps({"password": "x"})
    first = (await ctl("propose", path, "--version", "0", "--reason", "r", stdin=value)).json
    rejected = await ctl("reject", first["id"], who="reader")
    assert rejected.code == 0 and rejected.json["state"] == "rejected", rejected
    second = (await ctl("propose", path, "--version", "0", "--reason", "r", stdin=value)).json
    not_yours = await ctl("cancel", second["id"], who="reader")
    assert not_yours.code == 5, not_yours
    cancelled = await ctl("cancel", second["id"])
    assert cancelled.code == 0 and cancelled.json["state"] == "cancelled", cancelled
    for change_id in (first["id"], second["id"]):
        refused = await ctl("apply", change_id)
        assert refused.code == 4 and refused.error["error"] == "change_conflict", refused
    assert (await ctl("get", path, who="reader")).code == 3


async def test_a_path_no_rule_covers_takes_no_proposal_and_takes_a_direct_put(ctl: Ctl) -> None:
    path = fresh("app")
    value = json.dumps({"password": "v"})
    proposed = await ctl("propose", path, "--version", "0", "--reason", "r", stdin=value)
    assert proposed.code == 7 and proposed.error["error"] == "no_approval_rule", proposed
    assert (await ctl("put", path, "--version", "0", stdin=value)).code == 0


async def test_an_unknown_or_malformed_change_id_exits_3_or_7(ctl: Ctl) -> None:
    unknown = await ctl("change", UNKNOWN_ID, who="reader")
    assert unknown.code == 3, unknown
    malformed = await ctl("approve", "../secrets/prod/db:destroy", who="reader")
    assert malformed.code == 7 and malformed.error["error"] == "invalid_request", malformed

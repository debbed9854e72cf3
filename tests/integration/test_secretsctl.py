"""`secretsctl` as a user runs it: the installed command, a child process, against the real stack
(OpenBao, NATS, OIDC tokens, the service). Exit codes and JSON output are the interface."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from devstack import NatsEndpoint, OidcIssuer, OpenBaoEndpoint, free_port
from secrets_client.secretsctl import EXIT_CODES
from tests.support import running_service, service_settings, write_policy

POLICY = """\
[roles.app-reader]
read = ["app/**"]

[roles.app-writer]
read = ["app/**"]
write = ["app/**"]

[roles.admin]
read = ["**"]
write = ["**"]
destroy = ["**"]
rotate = ["**"]

[[rotation.rules]]
paths = ["app/*/db"]
generator = "password"
"""
CANARY = "canary-0c7e55-never-printed"
SCRIPT = Path(sys.executable).parent / "secretsctl"
# The installed console script; `python -m secrets_client.secretsctl` when the venv predates it.
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "secrets_client.secretsctl"]


class Result:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code = code
        self.stdout = stdout
        self.stderr = stderr

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def error(self) -> Any:
        return json.loads(self.stderr.splitlines()[-1])

    def __repr__(self) -> str:
        return f"Result(code={self.code}, stdout={self.stdout!r}, stderr={self.stderr!r})"


class Ctl:
    def __init__(self, url: str, tokens: dict[str, str], nats_url: str) -> None:
        self.url = url
        self.tokens = tokens
        self.nats_url = nats_url

    def env(self, who: str | None = "writer", **extra: str) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SECRETS_URL": self.url}
        if who is not None:
            env["SECRETS_TOKEN"] = self.tokens[who]
        env.update(extra)
        return env

    async def __call__(
        self, *args: str, who: str | None = "writer", stdin: str | None = None, **extra: str
    ) -> Result:
        proc = await asyncio.create_subprocess_exec(
            *COMMAND,
            *args,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env(who, **extra),
        )
        out, err = await asyncio.wait_for(
            proc.communicate(None if stdin is None else stdin.encode()), 30
        )
        assert proc.returncode is not None
        return Result(proc.returncode, out.decode(), err.decode())


@pytest.fixture(scope="module")
async def ctl(
    openbao: OpenBaoEndpoint,
    nats: NatsEndpoint,
    oidc: OidcIssuer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Ctl]:
    policy = write_policy(tmp_path_factory.mktemp("secretsctl"), POLICY)
    settings = service_settings(openbao, nats, oidc, policy, audit_sink="none")
    tokens = {who: oidc.mint(who) for who in ("reader", "writer", "admin")}
    async with running_service(settings) as svc:
        yield Ctl(svc.url, tokens, nats.url)


def fresh() -> str:
    return f"app/ctl-{uuid.uuid4().hex[:10]}/db"


# -- the command itself --------------------------------------------------------------------------


async def test_help_documents_every_exit_code_and_the_environment(ctl: Ctl) -> None:
    result = await ctl("--help", who=None)
    assert result.code == 0
    for code, meaning in EXIT_CODES.items():
        assert f"  {code}  {meaning}" in result.stdout
    for variable in ("SECRETS_URL", "SECRETS_TOKEN"):
        assert variable in result.stdout
    assert "NATS_URL" not in result.stdout  # watch goes through the service now
    assert sorted(EXIT_CODES) == list(range(10))


async def test_usage_errors_exit_2(ctl: Ctl) -> None:
    results = await asyncio.gather(
        ctl("put", fresh()),  # --version is required
        ctl("get", fresh(), "--version", "0"),
        ctl("frobnicate"),
    )
    assert [r.code for r in results] == [2, 2, 2]


# -- reads and writes ----------------------------------------------------------------------------


async def test_put_from_stdin_and_from_a_file_then_get(ctl: Ctl, tmp_path: Path) -> None:
    path = fresh()
    created = await ctl("put", path, "--version", "0", stdin='{"password": "first-Value1"}')
    assert created.code == 0, created
    assert created.json == {"path": path, "version": 1}
    value = tmp_path / "value.json"
    value.write_text('{"password": "second-Value2"}')
    updated = await ctl("put", path, "--version", "1", "--file", str(value))
    assert updated.json["version"] == 2
    got = await ctl("get", path, who="reader")
    assert got.code == 0 and got.json["data"] == {"password": "second-Value2"}
    old = await ctl("get", path, "--version", "1", who="reader")
    assert old.json["data"] == {"password": "first-Value1"}


async def test_a_stale_put_exits_4_with_the_current_version_on_stderr(ctl: Ctl) -> None:
    path = fresh()
    await ctl("put", path, "--version", "0", stdin='{"k": "v1"}')
    stale = await ctl("put", path, "--version", "0", stdin='{"k": "v2"}')
    assert stale.code == 4, stale
    assert stale.stdout == ""
    assert stale.error["error"] == "version_conflict" and stale.error["current_version"] == 1


async def test_not_found_forbidden_and_unauthenticated_have_their_own_codes(ctl: Ctl) -> None:
    missing, forbidden, no_token, bad = await asyncio.gather(
        ctl("get", fresh(), who="reader"),
        ctl("get", "ops/x/db", who="reader"),
        ctl("get", fresh(), who=None),
        ctl("get", fresh(), who=None, SECRETS_TOKEN=f"not.a.{CANARY}"),
    )
    assert missing.code == 3 and missing.error["status"] == 404
    assert forbidden.code == 5 and forbidden.error["error"] == "forbidden"
    assert no_token.code == 6
    assert bad.code == 6 and bad.error["error"] == "unauthenticated"
    assert CANARY not in bad.stdout + bad.stderr


async def test_invalid_input_exits_7_without_echoing_the_value(ctl: Ctl) -> None:
    path = fresh()
    not_json, not_object, rejected, *bad_paths = await asyncio.gather(
        ctl("put", path, "--version", "0", stdin=f'{{"password": "{CANARY}"'),
        ctl("put", path, "--version", "0", stdin=f'["{CANARY}"]'),
        ctl("put", path, "--version", "0", stdin='{"password": ""}'),
        *(ctl("get", bad, who="reader") for bad in ("app/../etc", "app/db:versions", "/app/db")),
    )
    assert not_json.code == 7 and CANARY not in not_json.stderr
    assert not_object.code == 7 and CANARY not in not_object.stderr
    assert rejected.code == 7 and rejected.error["status"] == 422
    for result in bad_paths:
        assert result.code == 7 and result.error["error"] == "invalid_path", result


async def test_an_unreachable_service_exits_8(ctl: Ctl) -> None:
    result = await ctl("get", fresh(), SECRETS_URL=f"http://127.0.0.1:{free_port()}")
    assert result.code == 8 and result.error["error"] == "unreachable"
    assert ctl.tokens["writer"] not in result.stderr


# -- history and lifecycle -----------------------------------------------------------------------


async def test_versions_delete_undelete_destroy_and_rollback(ctl: Ctl) -> None:
    path = fresh()
    for version, value in enumerate(["v1", "v2", "v3"]):
        put = await ctl("put", path, "--version", str(version), stdin=json.dumps({"k": value}))
        assert put.code == 0, put

    deleted = await ctl("delete", path)
    assert deleted.json == {"path": path, "versions": [3]}
    assert (await ctl("get", path, who="reader")).code == 3
    assert (await ctl("undelete", path, "--versions", "3")).json["versions"] == [3]
    assert (await ctl("delete", path, "--versions", "1,2")).json["versions"] == [1, 2]

    history = await ctl("versions", path, who="reader")
    assert history.json["current_version"] == 3
    states = [(v["version"], v["deleted"]) for v in history.json["versions"]]
    assert states == [(1, True), (2, True), (3, False)]

    assert (await ctl("destroy", path, "--versions", "1")).code == 5  # writer: no destroy grant
    assert (await ctl("destroy", path, "--versions", "1", who="admin")).code == 0
    assert (await ctl("undelete", path, "--versions", "1")).code == 3  # destroyed

    assert (await ctl("rollback", path, "--to", "2", "--version", "3")).code == 3  # deleted
    await ctl("undelete", path, "--versions", "2")
    stale = await ctl("rollback", path, "--to", "2", "--version", "2")
    assert stale.code == 4 and stale.error["current_version"] == 3
    rolled = await ctl("rollback", path, "--to", "2", "--version", "3")
    assert rolled.json == {"path": path, "version": 4}
    assert (await ctl("get", path, who="reader")).json["data"] == {"k": "v2"}


async def test_rotate_and_rotation_show_the_versions_and_the_state(ctl: Ctl) -> None:
    path = fresh()
    put = await ctl("put", path, "--version", "0", stdin=json.dumps({"password": CANARY}))
    assert put.code == 0, put
    assert (await ctl("rotate", path)).code == 5  # writer: no rotate grant
    stale = await ctl("rotate", path, "--version", "7", who="admin")
    assert stale.code == 4 and stale.error["current_version"] == 1
    rotated = await ctl("rotate", path, who="admin")
    assert rotated.json == {"path": path, "version": 2, "previous_version": 1}
    assert CANARY not in rotated.stdout + rotated.stderr
    again = await ctl("rotate", path, "--version", "2", who="admin")
    assert again.json["version"] == 3
    state = await ctl("rotation", path, who="reader")
    assert state.code == 0
    assert state.json["state"] == "idle" and state.json["failures"] == 0
    assert state.json["next_rotation"] is None  # on request only
    no_rule = await ctl("rotation", "app/other", who="reader")
    assert no_rule.code == 7 and no_rule.error["error"] == "no_rotation_rule"


async def test_list_shows_folders_with_a_trailing_slash_and_the_top(ctl: Ctl) -> None:
    base = f"app/ctl-{uuid.uuid4().hex[:10]}"
    for key in ("db", "nested/key"):
        await ctl("put", f"{base}/{key}", "--version", "0", stdin='{"k": "v"}')
    listed = await ctl("list", base, who="reader")
    assert listed.json == {"prefix": base, "keys": ["db", "nested/"]}
    top = await ctl("list", who="reader")
    assert top.code == 0 and "app/" in top.json["keys"]
    assert (await ctl("list", "ops", who="reader")).code == 5


# -- watch ---------------------------------------------------------------------------------------


async def test_watch_prints_one_json_line_per_change(ctl: Ctl) -> None:
    base = f"app/ctl-{uuid.uuid4().hex[:10]}"
    proc = await asyncio.create_subprocess_exec(
        *COMMAND,
        "watch",
        f"{base}/**",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=ctl.env("reader"),  # the service's watch stream: no NATS settings needed
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        ready = json.loads(await asyncio.wait_for(proc.stderr.readline(), 15))
        assert ready["watching"] == f"{base}/**"
        path = f"{base}/db"
        await ctl("put", path, "--version", "0", stdin='{"k": "v"}')
        # Changes outside the pattern, accepted, that the watch must leave out: one beside the
        # prefix, one below it that the glob does not match.
        elsewhere = await ctl(
            "put", f"app/elsewhere-{uuid.uuid4().hex[:6]}", "--version", "0", stdin='{"k": "v"}'
        )
        assert elsewhere.code == 0, elsewhere
        await ctl("put", base, "--version", "0", stdin='{"k": "v"}')  # `base/**` is below base
        await ctl("delete", path)
        lines = [await asyncio.wait_for(proc.stdout.readline(), 10) for _ in range(2)]
    finally:
        proc.terminate()
        await proc.wait()
    changes = [json.loads(line) for line in lines]
    assert [(c["type"], c["path"], c["version"]) for c in changes] == [
        ("secret.created", path, 1),
        ("secret.deleted", path, 1),
    ]
    assert changes[1]["versions"] == [1]
    assert changes[0]["sequence"] < changes[1]["sequence"]
    assert all("data" not in c for c in changes)


async def test_watch_from_a_sequence_replays_the_changes_since(ctl: Ctl) -> None:
    base = f"app/ctl-{uuid.uuid4().hex[:10]}"
    for n in range(2):
        await ctl("put", f"{base}/db", "--version", str(n), stdin='{"k": "v"}')
    first = await _first_line(ctl, "watch", base)  # from now on: nothing yet
    assert first is None
    proc = await asyncio.create_subprocess_exec(
        *COMMAND,
        "watch",
        base,
        "--from-sequence",
        "1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=ctl.env("reader"),
    )
    assert proc.stdout is not None
    try:
        lines = [await asyncio.wait_for(proc.stdout.readline(), 10) for _ in range(2)]
    finally:
        proc.terminate()
        await proc.wait()
    assert [json.loads(line)["version"] for line in lines] == [1, 2]


async def _first_line(ctl: Ctl, *args: str) -> str | None:
    """The first stdout line of a command within a second of it starting to watch, or None."""
    proc = await asyncio.create_subprocess_exec(
        *COMMAND,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=ctl.env("reader"),
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        await asyncio.wait_for(proc.stderr.readline(), 15)
        try:
            return (await asyncio.wait_for(proc.stdout.readline(), 1)).decode() or None
        except TimeoutError:
            return None
    finally:
        proc.terminate()
        await proc.wait()


async def test_watch_with_the_service_unreachable_exits_8(ctl: Ctl) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}"
    result = await ctl("watch", "--connect-timeout", "0.5", who="reader", SECRETS_URL=unreachable)
    assert result.code == 8 and result.error["error"] == "unreachable"


async def test_watch_refusals_exit_with_their_codes(ctl: Ctl) -> None:
    results = await asyncio.gather(
        ctl("watch", who=None),  # no SECRETS_TOKEN
        ctl("watch", "ops", who="reader"),  # nothing readable below it: 403
        ctl("watch", "app/../x", who="reader"),  # checked before any request
        ctl("watch", "app/**/**", who="reader"),  # not a glob
        ctl("watch", who="reader", SECRETS_TOKEN="not-a-jwt"),
    )
    assert [r.code for r in results] == [6, 5, 7, 7, 6], results
    assert results[1].error["error"] == "forbidden"

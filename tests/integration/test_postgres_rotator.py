"""The PostgreSQL rotator against a real PostgreSQL 16 (pgserver's binaries): each change proven
by logging in over TCP with SCRAM; grace, undo and retries converge; a server down or silent
fails "unreachable" and changes nothing; no password reaches a message, repr or log line."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator

import asyncpg
import pytest

from devstack import BinaryNotFound, PostgresServer, free_port
from service.rotation.postgres import PostgresError, PostgresRotator
from tests import support
from tests.support import (
    eventually,
    login_error,
    logs_in,
    make_login,
    make_pair,
    password,
    role_name,
    skip_unless_required,
)

listening_port = support.listening_port

AUTH_FAILED = "password authentication failed"


@pytest.fixture(scope="module")
def own_server() -> Iterator[PostgresServer]:
    """A server of this module's own, to take down; it logs every statement, so that what
    reaches PostgreSQL can be read back."""
    server = PostgresServer(settings={"log_statement": "all", "log_connections": "on"})
    try:
        server.start()
    except BinaryNotFound as exc:
        skip_unless_required(f"PostgreSQL is not available: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fragile(own_server: PostgresServer) -> PostgresServer:
    """The module's own server, running (a test before may have left it down)."""
    if own_server.process is None:
        own_server.start()
    return own_server


def stored_password(server: PostgresServer, role: str) -> str:
    return server.sql(
        f"SELECT coalesce(rolpassword, 'NULL') FROM pg_authid WHERE rolname = '{role}'"
    )


# --- single user -------------------------------------------------------------------------------


async def test_single_user_apply_makes_the_new_password_log_in_and_the_old_one_fail(
    postgres: PostgresServer,
) -> None:
    rotator = PostgresRotator()
    base = make_login(postgres)
    pending = rotator.plan(base, password(), alternating=False)

    await rotator.apply(base, pending, None)

    assert await logs_in(postgres, base["username"], pending["password"])
    reason = await login_error(postgres, base["username"], base["password"])
    assert reason is not None and AUTH_FAILED in reason
    assert stored_password(postgres, base["username"]).startswith("SCRAM-SHA-256$4096:")


async def test_single_user_apply_twice_leaves_the_same_state(postgres: PostgresServer) -> None:
    rotator = PostgresRotator()
    base = make_login(postgres)
    pending = rotator.plan(base, password(), alternating=False)
    await rotator.apply(base, pending, None)
    after_first = stored_password(postgres, base["username"])

    await rotator.apply(base, pending, None)  # a retry after a crash that came after the change

    assert stored_password(postgres, base["username"]) == after_first
    assert await logs_in(postgres, base["username"], pending["password"])


async def test_single_user_apply_with_an_unknown_current_password_fails_and_changes_nothing(
    postgres: PostgresServer,
) -> None:
    rotator = PostgresRotator()
    base = make_login(postgres)
    before = stored_password(postgres, base["username"])
    wrong = {**base, "password": password()}

    with pytest.raises(PostgresError) as caught:
        await rotator.apply(wrong, rotator.plan(wrong, password(), alternating=False), None)

    assert caught.value.code == "login_failed"
    assert base["username"] in str(caught.value) and f":{postgres.port}" in str(caught.value)
    assert stored_password(postgres, base["username"]) == before


async def test_a_password_outside_ascii_logs_in_as_postgresql_prepares_it(
    postgres: PostgresServer,
) -> None:
    rotator = PostgresRotator()
    base = make_login(postgres)
    pending = rotator.plan(base, "p\u00e4ss\u00a0w\u00f6rd-\u2168-\u03a9", alternating=False)

    await rotator.apply(base, pending, None)

    assert await logs_in(postgres, base["username"], pending["password"])


async def test_single_user_undo_gives_the_role_back_the_password_latest_holds(
    postgres: PostgresServer,
) -> None:
    rotator = PostgresRotator()
    base = make_login(postgres)
    pending = rotator.plan(base, password(), alternating=False)
    await rotator.apply(base, pending, None)
    human = {**base, "password": password()}  # a person's write won the race

    await rotator.undo(human, base, pending, None)
    await rotator.undo(human, base, pending, None)  # and its retry

    assert await logs_in(postgres, base["username"], human["password"])
    assert not await logs_in(postgres, base["username"], pending["password"])
    assert not await logs_in(postgres, base["username"], base["password"])


@pytest.mark.parametrize("latest_names", ["another role", "nothing: the secret is gone"])
async def test_single_user_undo_falls_back_to_the_base_password(
    postgres: PostgresServer, latest_names: str
) -> None:
    rotator = PostgresRotator()
    base = make_login(postgres)
    pending = rotator.plan(base, password(), alternating=False)
    await rotator.apply(base, pending, None)
    latest = {**base, "username": role_name()} if latest_names == "another role" else None

    await rotator.undo(latest, base, pending, None)

    assert await logs_in(postgres, base["username"], base["password"])
    assert not await logs_in(postgres, base["username"], pending["password"])


async def test_single_user_undo_before_apply_ran_changes_nothing(postgres: PostgresServer) -> None:
    rotator = PostgresRotator()
    base = make_login(postgres)
    before = stored_password(postgres, base["username"])
    pending = rotator.plan(base, password(), alternating=False)

    await rotator.undo(base, base, pending, None)

    assert stored_password(postgres, base["username"]) == before


# --- alternating users -------------------------------------------------------------------------


async def test_alternating_apply_creates_the_twin_with_the_base_roles_grants(
    postgres: PostgresServer,
) -> None:
    rotator = PostgresRotator()
    base, master = make_pair(postgres)
    table = role_name("tbl")
    postgres.sql(
        f"CREATE TABLE {table} (v int); INSERT INTO {table} VALUES (7);"
        f'GRANT SELECT ON {table} TO "{base["username"]}";'
    )
    pending = rotator.plan(base, password(), alternating=True)
    assert pending["username"] == base["username"] + "_clone"

    await rotator.apply(base, pending, master)

    conn = await asyncpg.connect(
        host=postgres.host,
        port=postgres.port,
        user=pending["username"],
        password=pending["password"],
        database="postgres",
        ssl=False,
    )
    try:
        assert await conn.fetchval(f"SELECT v FROM {table}") == 7
    finally:
        await conn.close()
    assert await logs_in(postgres, base["username"], base["password"])


async def test_alternating_apply_twice_leaves_the_same_logins(postgres: PostgresServer) -> None:
    rotator = PostgresRotator()
    base, master = make_pair(postgres)
    pending = rotator.plan(base, password(), alternating=True)

    await rotator.apply(base, pending, master)
    await rotator.apply(base, pending, master)

    assert await logs_in(postgres, pending["username"], pending["password"])
    assert await logs_in(postgres, base["username"], base["password"])
    assert (
        postgres.sql(f"SELECT count(*) FROM pg_roles WHERE rolname = '{pending['username']}'")
        == "1"
    )


async def test_alternating_finish_keeps_the_previous_login_through_grace_then_retires_it(
    postgres: PostgresServer,
) -> None:
    rotator = PostgresRotator()
    base, master = make_pair(postgres)
    pending = rotator.plan(base, password(), alternating=True)
    await rotator.apply(base, pending, master)

    await rotator.finish(base, pending, master, 2.0)

    assert await logs_in(postgres, pending["username"], pending["password"])
    assert await logs_in(postgres, base["username"], base["password"])  # within the grace
    await eventually(
        lambda: _refused(postgres, base["username"], base["password"]), timeout=15, interval=0.2
    )
    assert await logs_in(postgres, pending["username"], pending["password"])


async def _refused(server: PostgresServer, role: str, secret: str) -> bool:
    reason = await login_error(server, role, secret)
    return reason is not None and AUTH_FAILED in reason


async def test_a_retried_finish_does_not_stretch_the_grace(postgres: PostgresServer) -> None:
    rotator = PostgresRotator()
    base, master = make_pair(postgres)
    pending = rotator.plan(base, password(), alternating=True)
    await rotator.apply(base, pending, master)
    query = f"SELECT rolvaliduntil FROM pg_roles WHERE rolname = '{base['username']}'"

    await rotator.finish(base, pending, master, 600.0)
    first = postgres.sql(query)
    await rotator.finish(base, pending, master, 600.0)

    assert first != "" and postgres.sql(query) == first
    twin_until = f"SELECT rolvaliduntil FROM pg_roles WHERE rolname = '{pending['username']}'"
    assert postgres.sql(twin_until) == "infinity"


async def test_alternating_rotates_back_from_the_twin_to_the_base_role(
    postgres: PostgresServer,
) -> None:
    rotator = PostgresRotator()
    first_base, master = make_pair(postgres)
    first = rotator.plan(first_base, password(), alternating=True)
    await rotator.apply(first_base, first, master)
    await rotator.finish(first_base, first, master, 0.0)
    base = {**first_base, **first}  # the version the first rotation wrote

    pending = rotator.plan(base, password(), alternating=True)
    assert pending["username"] == first_base["username"]
    await rotator.apply(base, pending, master)
    await rotator.finish(base, pending, master, 0.0)

    assert await logs_in(postgres, first_base["username"], pending["password"])
    await eventually(lambda: _refused(postgres, first["username"], first["password"]), timeout=15)


@pytest.mark.parametrize("latest_is", ["the base version", "gone"])
async def test_alternating_undo_leaves_the_twin_without_a_password(
    postgres: PostgresServer, latest_is: str
) -> None:
    rotator = PostgresRotator()
    base, master = make_pair(postgres)
    pending = rotator.plan(base, password(), alternating=True)
    await rotator.apply(base, pending, master)
    latest = base if latest_is == "the base version" else None

    await rotator.undo(latest, base, pending, master)
    await rotator.undo(latest, base, pending, master)

    assert stored_password(postgres, pending["username"]) == "NULL"
    assert not await logs_in(postgres, pending["username"], pending["password"])
    assert await logs_in(postgres, base["username"], base["password"])


async def test_alternating_undo_gives_the_twin_the_password_latest_holds_for_it(
    postgres: PostgresServer,
) -> None:
    rotator = PostgresRotator()
    base, master = make_pair(postgres)
    pending = rotator.plan(base, password(), alternating=True)
    await rotator.apply(base, pending, master)
    human = {**base, "username": pending["username"], "password": password()}

    await rotator.undo(human, base, pending, master)

    assert await logs_in(postgres, pending["username"], human["password"])
    assert not await logs_in(postgres, pending["username"], pending["password"])


async def test_alternating_undo_before_apply_ran_creates_nothing(postgres: PostgresServer) -> None:
    rotator = PostgresRotator()
    base, master = make_pair(postgres)
    pending = rotator.plan(base, password(), alternating=True)

    await rotator.undo(base, base, pending, master)

    count = f"SELECT count(*) FROM pg_roles WHERE rolname = '{pending['username']}'"
    assert postgres.sql(count) == "0"


async def test_a_master_without_createrole_is_refused_and_nothing_changes(
    postgres: PostgresServer,
) -> None:
    rotator = PostgresRotator()
    base = make_login(postgres)
    master = make_login(postgres)  # may log in, may not create roles
    pending = rotator.plan(base, password(), alternating=True)

    with pytest.raises(PostgresError) as caught:
        await rotator.apply(base, pending, master)

    assert caught.value.code == "refused"
    assert master["username"] in str(caught.value)
    count = f"SELECT count(*) FROM pg_roles WHERE rolname = '{pending['username']}'"
    assert postgres.sql(count) == "0"
    assert await logs_in(postgres, base["username"], base["password"])


# --- a server down, silent, and what reaches messages and logs --------------------------------


async def test_a_server_that_is_down_fails_unreachable_at_once_and_nothing_changed(
    fragile: PostgresServer,
) -> None:
    rotator = PostgresRotator(timeout=5.0)
    base, master = make_pair(fragile)
    single = rotator.plan(base, password(), alternating=False)
    double = rotator.plan(base, password(), alternating=True)
    fragile.kill()
    try:
        steps: list[Callable[[], Awaitable[None]]] = [
            lambda: rotator.apply(base, single, None),
            lambda: rotator.apply(base, double, master),
            lambda: rotator.finish(base, double, master, 1.0),
            lambda: rotator.undo(base, base, double, master),
        ]
        for step in steps:
            started = time.monotonic()
            with pytest.raises(PostgresError) as caught:
                await step()
            # Refused connections fail at once, well before the rotator's timeout.
            assert time.monotonic() - started < rotator.timeout
            assert caught.value.code == "unreachable"
            assert f"127.0.0.1:{fragile.port}" in str(caught.value)
    finally:
        fragile.start()

    assert await logs_in(fragile, base["username"], base["password"])
    assert not await logs_in(fragile, base["username"], single["password"])
    count = f"SELECT count(*) FROM pg_roles WHERE rolname = '{double['username']}'"
    assert fragile.sql(count) == "0"


async def test_a_server_that_never_answers_fails_unreachable_after_the_timeout(
    listening_port: int,
) -> None:
    rotator = PostgresRotator(timeout=0.5)
    base = {
        "host": "127.0.0.1",
        "port": listening_port,
        "dbname": "postgres",
        "username": "app",
        "password": password(),
    }

    with pytest.raises(PostgresError) as caught:
        await rotator.apply(base, rotator.plan(base, password(), alternating=False), None)

    assert caught.value.code == "unreachable"
    assert "no answer in 0.5s" in str(caught.value)


async def test_no_password_reaches_a_message_a_repr_a_log_line_or_the_servers_log(
    fragile: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    canary = f"canary-{secrets.token_hex(8)}"
    rotator = PostgresRotator(timeout=2.0)
    base, master = make_pair(fragile)
    base = {**base, "password": canary + "-base"}
    fragile.create_login(base["username"], base["password"])
    master_secret = {**master, "password": canary + "-master"}
    fragile.create_login(master["username"], master_secret["password"], createrole=True)
    single = rotator.plan(base, canary + "-single", alternating=False)
    double = rotator.plan(base, canary + "-double", alternating=True)
    shown: list[str] = [repr(rotator), repr(single), str(single), repr(double)]

    await rotator.apply(base, double, master_secret)
    await rotator.finish(base, double, master_secret, 60.0)
    await rotator.undo(base, base, double, master_secret)
    await rotator.apply(base, single, None)
    nobody_there = free_port()
    failures: list[Callable[[], Awaitable[None]]] = [
        # The current password is wrong, but the pending one already works: done.
        lambda: rotator.apply({**base, "password": canary + "-wrong"}, single, None),
        lambda: rotator.apply(base, {"password": canary + "-other"}, None),
        lambda: rotator.apply(base, double, {**master_secret, "password": canary + "-bad"}),
        lambda: rotator.apply(base, double, {**base, **single}),  # a master without CREATEROLE
        lambda: rotator.apply({**base, "port": nobody_there}, single, None),
    ]
    codes: list[str] = []
    for step in failures:
        try:
            await step()
        except PostgresError as exc:
            codes.append(exc.code)
            shown += [str(exc), repr(exc), str(exc.__cause__), repr(exc.__cause__)]
        else:
            codes.append("ok")

    assert codes == ["ok", "login_failed", "login_failed", "refused", "unreachable"]
    assert fragile.log_path is not None
    server_log = fragile.log_path.read_text(errors="replace")
    assert "ALTER ROLE" in server_log  # the statements were logged: as verifiers only
    for text in [*shown, caplog.text, server_log]:
        assert canary not in text

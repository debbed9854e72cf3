"""The PostgreSQL launcher's checks before anything runs: role names that are not plain are
refused before any SQL, and a server not started has no socket to offer. Started for real:
tests/integration/test_postgres_rotator.py."""

from __future__ import annotations

import pytest

from devstack import DevStackError, PostgresServer
from devstack.postgres import quote_ident, quote_literal


@pytest.mark.parametrize("role", ["bad-name", 'x"; DROP ROLE postgres; --', "", "1app", "a" * 64])
def test_create_login_refuses_a_role_name_that_is_not_plain_before_any_sql(role: str) -> None:
    with pytest.raises(ValueError, match="not a plain role name"):
        PostgresServer(port=1).create_login(role, "pw")


def test_a_server_not_started_has_no_socket_directory() -> None:
    with pytest.raises(DevStackError, match="was not started"):
        _ = PostgresServer(port=1).socket_dir


def test_quoting_doubles_the_quote_characters() -> None:
    assert quote_ident('a"b') == '"a""b"'
    assert quote_literal("it's") == "'it''s'"

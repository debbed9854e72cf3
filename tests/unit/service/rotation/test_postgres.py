"""The PostgreSQL rotator without a server: role names and twins, the pending fields, secrets
checked field by field (messages never hold a value), reprs without passwords, and the steps
that must refuse, or do nothing, before any connection. With a server: tests/integration."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from service.rotation.postgres import (
    PendingFields,
    PostgresError,
    PostgresRotator,
    quote_ident,
    twin,
)

CANARY = "canary-Zq81-secret"
# Port 1 on loopback: nothing listens there, so a step that did connect would fail "unreachable".
SECRET: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 1,
    "dbname": "app",
    "username": "app",
    "password": CANARY,
}
MASTER: dict[str, Any] = {**SECRET, "username": "admin", "password": CANARY + "-master"}


def test_the_twin_of_a_role_is_its_clone_and_back() -> None:
    assert twin("app") == "app_clone"
    assert twin("app_clone") == "app"
    assert twin(twin("reporting_ro")) == "reporting_ro"


def test_a_role_whose_clone_would_pass_63_characters_cannot_alternate() -> None:
    assert twin("a" * 57) == "a" * 57 + "_clone"
    with pytest.raises(PostgresError) as caught:
        twin("a" * 58)
    assert caught.value.code == "bad_secret"
    assert "63" in str(caught.value) and "'username'" in str(caught.value)
    assert "a" * 58 not in str(caught.value)


def test_quote_ident_quotes_and_doubles_embedded_quotes() -> None:
    assert quote_ident("app") == '"app"'
    assert quote_ident('we"ird') == '"we""ird"'


def test_plan_single_user_changes_only_the_password() -> None:
    assert PostgresRotator().plan(SECRET, "n3w", alternating=False) == {"password": "n3w"}


def test_plan_alternating_switches_to_the_twin_role() -> None:
    rotator = PostgresRotator()
    assert rotator.plan(SECRET, "n3w", alternating=True) == {
        "username": "app_clone",
        "password": "n3w",
    }
    back = {**SECRET, "username": "app_clone"}
    assert rotator.plan(back, "n3w", alternating=True)["username"] == "app"


def test_plan_accepts_a_port_written_as_digits() -> None:
    plan = PostgresRotator().plan({**SECRET, "port": "5432"}, "n3w", alternating=False)
    assert plan == {"password": "n3w"}


def test_the_pending_fields_encode_as_a_plain_json_object() -> None:
    pending = PostgresRotator().plan(SECRET, "n3w", alternating=True)
    assert isinstance(pending, dict)
    plain = {"username": "app_clone", "password": "n3w"}
    assert json.loads(msgspec.json.encode(pending)) == plain
    assert json.loads(json.dumps(pending)) == plain
    assert {**SECRET, **pending}["password"] == "n3w"


def test_the_repr_of_pending_fields_shows_the_role_but_not_the_password() -> None:
    pending = PostgresRotator().plan(SECRET, CANARY, alternating=True)
    for shown in (repr(pending), str(pending), f"{pending}", repr([pending])):
        assert CANARY not in shown
        assert "app_clone" in shown
        assert "**redacted**" in shown


def test_the_rotator_repr_holds_its_settings_only() -> None:
    assert repr(PostgresRotator(timeout=2.0)) == "PostgresRotator(timeout=2.0, ssl='prefer')"


BAD_FIELDS = [
    ("host", None),
    ("host", ""),
    ("host", 42),
    ("host", CANARY + "\x00"),
    ("port", None),
    ("port", CANARY),
    ("port", "0"),
    ("port", 70000),
    ("port", True),
    ("port", 5432.0),
    ("dbname", None),
    ("dbname", ["app"]),
    ("username", None),
    ("username", CANARY),  # a hyphen: not a plain role name
    ("username", "1app"),
    ("username", "a" * 64),
    ("username", "app;drop"),
    ("password", None),
    ("password", ""),
    ("password", 12345),
    ("password", CANARY + "\ud800"),  # a lone surrogate: not encodable as UTF-8
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_a_bad_field_is_a_bad_secret_naming_the_field_and_never_the_value(
    field: str, value: Any
) -> None:
    data = dict(SECRET)
    if value is None:
        del data[field]
    else:
        data[field] = value
    with pytest.raises(PostgresError) as caught:
        PostgresRotator().plan(data, "n3w", alternating=False)
    error = caught.value
    assert error.code == "bad_secret"
    assert repr(field) in str(error)
    for shown in (str(error), repr(error)):
        assert CANARY not in shown
        if isinstance(value, str) and value:
            assert value not in shown


def test_an_empty_new_password_is_refused() -> None:
    with pytest.raises(PostgresError) as caught:
        PostgresRotator().plan(SECRET, "", alternating=False)
    assert caught.value.code == "bad_secret"


async def test_apply_checks_the_secret_before_connecting() -> None:
    with pytest.raises(PostgresError) as caught:
        await PostgresRotator().apply({**SECRET, "port": "x"}, {"password": "n3w"}, None)
    assert caught.value.code == "bad_secret"


async def test_apply_single_user_refuses_pending_fields_that_change_the_role() -> None:
    pending = {"username": "other", "password": "n3w"}
    with pytest.raises(PostgresError) as caught:
        await PostgresRotator().apply(SECRET, pending, None)
    assert caught.value.code == "bad_secret"
    assert "'username'" in str(caught.value)


async def test_apply_alternating_refuses_pending_fields_that_do_not_name_the_twin() -> None:
    pending = {"username": "other", "password": "n3w"}
    with pytest.raises(PostgresError) as caught:
        await PostgresRotator().apply(SECRET, pending, MASTER)
    assert caught.value.code == "bad_secret"


async def test_apply_alternating_checks_the_master_secret_and_never_shows_its_password() -> None:
    pending = {"username": "app_clone", "password": "n3w"}
    with pytest.raises(PostgresError) as caught:
        await PostgresRotator().apply(SECRET, pending, {**MASTER, "port": None})
    assert caught.value.code == "bad_secret"
    assert "master secret" in str(caught.value)
    assert CANARY not in str(caught.value)


async def test_undo_alternating_never_takes_the_password_of_the_live_role() -> None:
    # Pending fields naming the base role itself would have undo set its PASSWORD NULL.
    with pytest.raises(PostgresError) as caught:
        await PostgresRotator().undo(None, SECRET, {"username": "app", "password": "x"}, MASTER)
    assert caught.value.code == "bad_secret"


async def test_undo_single_user_refuses_pending_fields_that_change_the_role() -> None:
    with pytest.raises(PostgresError) as caught:
        await PostgresRotator().undo(None, SECRET, {"username": "other", "password": "x"}, None)
    assert caught.value.code == "bad_secret"


async def test_finish_refuses_pending_fields_that_do_not_name_the_twin() -> None:
    with pytest.raises(PostgresError) as caught:
        await PostgresRotator().finish(SECRET, {"username": "app"}, MASTER, 1.0)
    assert caught.value.code == "bad_secret"


async def test_finish_without_a_master_is_a_no_op() -> None:
    await PostgresRotator().finish(SECRET, {"password": "n3w"}, None, 10.0)


async def test_finish_refuses_a_negative_grace() -> None:
    with pytest.raises(ValueError, match="grace"):
        await PostgresRotator().finish(SECRET, {"username": "app_clone"}, MASTER, -1.0)


async def test_undo_without_pending_fields_has_nothing_to_undo() -> None:
    await PostgresRotator().undo(SECRET, SECRET, {}, None)


async def test_a_server_that_is_not_there_is_unreachable_and_the_message_holds_no_password() -> (
    None
):
    with pytest.raises(PostgresError) as caught:
        await PostgresRotator(timeout=2.0).apply(SECRET, {"password": CANARY + "-new"}, None)
    error = caught.value
    assert error.code == "unreachable"
    assert "127.0.0.1:1" in str(error) and "'app'" in str(error)
    assert CANARY not in str(error) and CANARY not in repr(error)
    assert CANARY not in str(error.__cause__)


def test_a_postgres_error_carries_its_code() -> None:
    error = PostgresError("refused", "PostgreSQL refused role 'app' at h:1/db")
    assert error.code == "refused"
    assert repr(error) == "PostgresError('refused', \"PostgreSQL refused role 'app' at h:1/db\")"


def test_pending_fields_compare_as_the_dict_they_are() -> None:
    assert PendingFields(password="x") == {"password": "x"}

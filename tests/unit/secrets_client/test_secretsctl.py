"""secrets_client/secretsctl.py: the console script, the JSON lines `watch` logs, and the request
each command sends (an httpx.MockTransport behind the client). The command run against the real
stack: tests/integration/test_secretsctl.py and test_secretsctl_approvals.py."""

from __future__ import annotations

import io
import json
import logging
from importlib.metadata import entry_points
from typing import Any

import httpx
import pytest

from devstack import free_port
from secrets_client import ClientError, SecretsClient, secretsctl


def test_secretsctl_is_an_installed_console_script() -> None:
    [script] = entry_points(group="console_scripts", name="secretsctl")
    assert script.value == "secrets_client.secretsctl:main"


def test_watch_log_lines_carry_the_listeners_fields_and_never_an_exceptions_text() -> None:
    stream = io.StringIO()
    secretsctl._log_json_lines(stream)
    try:
        log = logging.getLogger("secrets.listener")
        log.warning("start sequence expired", extra={"start_sequence": 3, "first_sequence": 9})
        try:
            raise ConnectionError("nats://user:hunter2@nats:4222 refused")
        except ConnectionError:
            log.warning("NATS error", exc_info=True)
    finally:
        logging.getLogger().handlers.clear()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first == {
        "level": "WARNING",
        "logger": "secrets.listener",
        "message": "start sequence expired",
        "start_sequence": 3,
        "first_sequence": 9,
    }
    assert second["exc_type"] == "ConnectionError"
    assert "hunter2" not in stream.getvalue()


# -- change requests and break glass (issue 13) --------------------------------------------------

CHANGE_ID = "0b5e9c2f4d6a4e1f8a3b7c9d2e4f6a8b"


def sent_by(argv: list[str], stdin: str = '{"k": "v"}') -> httpx.Request:
    """The one request `secretsctl <argv>` makes, caught by an httpx.MockTransport."""
    requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json={})

    args = secretsctl._parser().parse_args(argv)
    transport = httpx.MockTransport(answer)
    with SecretsClient("http://secrets.test", token="t", transport=transport) as client:
        secretsctl._command(client, args, io.StringIO(stdin))
    [request] = requests
    return request


CHANGE_COMMANDS = [
    (
        ["put", "prod/db", "--version", "3"],
        "PATCH",
        "/secrets/prod/db",
        {"data": {"k": "v"}, "version": 3},
    ),
    (["delete", "prod/db"], "DELETE", "/secrets/prod/db", None),
    (["delete", "prod/db", "--versions", "1,2"], "DELETE", "/secrets/prod/db?versions=1%2C2", None),
    (
        ["undelete", "prod/db", "--versions", "2"],
        "POST",
        "/secrets/prod/db:undelete",
        {"versions": [2]},
    ),
    (
        ["destroy", "prod/db", "--versions", "1"],
        "POST",
        "/secrets/prod/db:destroy",
        {"versions": [1]},
    ),
    (
        ["rollback", "prod/db", "--to", "2", "--version", "4"],
        "POST",
        "/secrets/prod/db:rollback",
        {"to_version": 2, "version": 4},
    ),
    (["rotate", "prod/db"], "POST", "/secrets/prod/db:rotate", None),
    (["rotate", "prod/db", "--version", "4"], "POST", "/secrets/prod/db:rotate", {"version": 4}),
]


@pytest.mark.parametrize(("argv", "method", "target", "body"), CHANGE_COMMANDS)
def test_each_change_command_sends_its_request_and_the_bypass_reason_only_when_given(
    argv: list[str], method: str, target: str, body: Any
) -> None:
    plain = sent_by(argv)
    bypassing = sent_by([*argv, "--bypass-reason", "  INC-8: outage  "])
    for request in (plain, bypassing):
        assert (request.method, request.url.raw_path.decode()) == (method, target)
        assert (json.loads(request.content) if request.content else None) == body
    assert "X-Bypass-Reason" not in plain.headers
    assert bypassing.headers["X-Bypass-Reason"] == "INC-8: outage"


def test_propose_sends_the_value_from_stdin_the_version_and_the_reason() -> None:
    argv = ["propose", "prod/db", "--version", "0", "--reason", "new vendor key"]
    request = sent_by(argv, stdin='{"password": "s3cret"}')
    assert (request.method, request.url.raw_path) == ("POST", b"/secrets/prod/db:propose")
    assert json.loads(request.content) == {
        "data": {"password": "s3cret"},
        "version": 0,
        "reason": "new vendor key",
    }


@pytest.mark.parametrize(
    ("argv", "method", "target"),
    [
        (["changes"], "GET", "/changes"),
        (
            ["changes", "--state", "pending", "--path", "prod/db"],
            "GET",
            "/changes?state=pending&path=prod%2Fdb",
        ),
        (["change", CHANGE_ID], "GET", f"/changes/{CHANGE_ID}"),
        (["approve", CHANGE_ID], "POST", f"/changes/{CHANGE_ID}:approve"),
        (["reject", CHANGE_ID], "POST", f"/changes/{CHANGE_ID}:reject"),
        (["cancel", CHANGE_ID], "POST", f"/changes/{CHANGE_ID}:cancel"),
        (["apply", CHANGE_ID], "POST", f"/changes/{CHANGE_ID}:apply"),
    ],
)
def test_the_change_request_commands_reach_their_routes(
    argv: list[str], method: str, target: str
) -> None:
    request = sent_by(argv)
    assert (request.method, request.url.raw_path.decode()) == (method, target)


def test_a_bad_change_id_exits_7_before_any_request() -> None:
    # Nobody listens on the port: a request would exit 8 (unreachable).
    stderr = io.StringIO()
    environ = {"SECRETS_TOKEN": "t", "SECRETS_URL": f"http://127.0.0.1:{free_port()}"}
    code = secretsctl.run(["approve", "../secrets/prod/db"], environ, stderr=stderr)
    assert code == 7
    assert json.loads(stderr.getvalue())["error"] == "invalid_request"


def test_a_bypass_reason_that_is_not_printable_ascii_exits_7_before_any_request() -> None:
    stderr = io.StringIO()
    environ = {"SECRETS_TOKEN": "t", "SECRETS_URL": f"http://127.0.0.1:{free_port()}"}
    argv = ["delete", "prod/db", "--bypass-reason", "panne générale"]
    assert secretsctl.run(argv, environ, stderr=stderr) == 7
    assert json.loads(stderr.getvalue())["error"] == "invalid_request"


@pytest.mark.parametrize(
    "argv",
    [
        ["propose", "prod/db", "--version", "0", "--reason", "   "],
        ["propose", "prod/db", "--version", "0"],  # --reason is required
        ["put", "prod/db", "--version", "0", "--bypass-reason", ""],
        ["put", "prod/db", "--version", "0", "--bypass-reason", "x" * 1001],
        ["changes", "--state", "merged"],
        ["approve"],
    ],
)
def test_a_blank_reason_an_unknown_state_or_a_missing_id_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        secretsctl.run(argv, {"SECRETS_TOKEN": "t"})
    assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_approval_required_exits_9_and_the_help_says_so() -> None:
    refusal = ClientError("approval_required", "propose it", status=428)
    assert secretsctl._exit_code(refusal) == secretsctl.EXIT_APPROVAL == 9
    text = secretsctl._parser().format_help()
    for code, meaning in secretsctl.EXIT_CODES.items():
        assert f"  {code}  {meaning}" in text
    assert sorted(secretsctl.EXIT_CODES) == list(range(10))
    assert "secretsctl propose" in text and "--bypass-reason" in text

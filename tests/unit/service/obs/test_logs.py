"""JsonFormatter: one JSON object per line, the request's context, and what it refuses to print."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import pytest

from schemas.secret import Secret, SecretData, redact_url
from service.http.trace import RequestTrace
from service.obs.logs import JsonFormatter, log_context

CANARY = "canary-41aa-log-never-shows"


def formatted(msg: str = "hello", *args: Any, exc: bool = False, **extra: Any) -> dict[str, Any]:
    exc_info = None
    if exc:
        try:
            raise ValueError(f"dependency says {CANARY}")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("secrets.test", logging.INFO, __file__, 1, msg, args, exc_info)
    record.__dict__.update(extra)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def test_a_line_has_time_level_logger_and_message() -> None:
    out = formatted("hello %s", "world")
    assert out["level"] == "INFO" and out["logger"] == "secrets.test"
    assert out["message"] == "hello world"
    assert out["time"].endswith("+00:00")


def test_a_line_logged_within_a_request_carries_the_request_context() -> None:
    token = log_context.set(
        RequestTrace(request_id="r-9", actor="alice", path="app/db", op="read", version=2)
    )
    try:
        out = formatted(status=200, outcome="ok", duration_ms=1.5)
    finally:
        log_context.reset(token)
    assert {k: out[k] for k in ("request_id", "actor", "path", "op", "version")} == {
        "request_id": "r-9", "actor": "alice", "path": "app/db", "op": "read", "version": 2,
    }  # fmt: skip
    assert (out["status"], out["outcome"], out["duration_ms"]) == (200, "ok", 1.5)
    assert "request_id" not in formatted()


def test_fields_named_like_values_or_credentials_are_dropped() -> None:
    out = formatted(
        data=CANARY, value=CANARY, password=CANARY, token=CANARY, Authorization=CANARY, ok=1
    )
    assert CANARY not in json.dumps(out)
    assert out["ok"] == 1
    assert not {"data", "value", "password", "token", "Authorization"} & set(out)


def test_a_container_is_shown_by_its_type_only() -> None:
    out = formatted(items={"password": CANARY}, listed=[CANARY], pair=(CANARY,))
    assert CANARY not in json.dumps(out)
    assert (out["items"], out["listed"], out["pair"]) == ("<dict>", "<list>", "<tuple>")


def test_secret_types_never_print_their_data_even_as_message_arguments() -> None:
    data = SecretData({"password": CANARY})
    secret = Secret(path="app/db", version=1, data=data, created_time="2026-01-01T00:00:00Z")
    out = formatted("read %s %r", secret, data, held=data, secret_obj=secret)
    assert CANARY not in json.dumps(out)
    assert "**redacted**" in out["message"]


def test_an_exception_is_shown_by_its_type_never_its_message() -> None:
    out = formatted("failed", exc=True)
    assert out["exc_type"] == "ValueError"
    assert CANARY not in json.dumps(out)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://svc:pass@vault:8200/v1", "https://***@vault:8200/v1"),
        ("nats://u:p@n1:4222,nats://n2:4222", "nats://***@n1:4222,nats://n2:4222"),
        ("tls://token@n3", "tls://***@n3"),
        ("user:pass@n4:4222", "***@n4:4222"),
        ("https://a@b@vault/x", "https://***@vault/x"),
        ("https://vault:8200", "https://vault:8200"),
        ("https://vault/p@th?q=a@b#f@g", "https://vault/p@th?q=a@b#f@g"),  # no userinfo there
    ],
)
def test_credentials_in_a_url_are_never_shown(url: str, shown: str) -> None:
    assert redact_url(url) == shown

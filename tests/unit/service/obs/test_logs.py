"""JsonFormatter: one JSON object per line, the request's context, and what it refuses to print;
the request log line (`log_request`) and its batching handler."""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from datetime import datetime
from typing import Any

import pytest

from schemas.secret import Secret, SecretData, redact_url
from service.http.trace import RequestTrace
from service.obs.logs import BatchingStreamHandler, JsonFormatter, log_context, log_request

CANARY = "canary-41aa-log-never-shows"
PATH = "app/db"


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


# -- the request log line --------------------------------------------------------------------------


def capture() -> tuple[logging.Logger, io.StringIO, logging.Handler]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("secrets.test.hot")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream, handler


def test_log_request_writes_the_line_logger_info_with_the_context_would() -> None:
    logger, stream, _ = capture()
    trace = RequestTrace(request_id="r-1", actor="alice", path=PATH, op="read", version=2)
    ctx = trace.log_fields()
    answer = {"method": "GET", "status": 200, "outcome": "ok", "duration_ms": 0.05}
    token = log_context.set(trace)
    try:
        logger.info("request", extra=answer)
    finally:
        log_context.reset(token)
    log_request(logger, {**ctx, **answer, "password": CANARY, "items": [CANARY]})
    classic, fast = (json.loads(line) for line in stream.getvalue().splitlines())
    for line in (classic, fast):
        del line["time"]
    assert fast.pop("items") == "<list>"  # containers by type, named fields dropped, as always
    assert fast == classic
    assert CANARY not in stream.getvalue()


def test_log_request_below_the_level_makes_no_record() -> None:
    logger, stream, _ = capture()
    logger.setLevel(logging.WARNING)
    log_request(logger, {"request_id": "r-2"})
    assert stream.getvalue() == ""


def batching(name: str) -> tuple[logging.Logger, io.StringIO, BatchingStreamHandler]:
    stream = io.StringIO()
    handler = BatchingStreamHandler(stream, interval=60)  # written on close only
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream, handler


@pytest.mark.parametrize(
    "extra",
    [
        {},  # every field shown as it is: encoded whole
        {"password": CANARY, "items": [CANARY], "data": CANARY, "_private": CANARY},
    ],
)
def test_log_request_to_batching_handlers_skips_the_record_but_writes_the_same_line(
    monkeypatch: pytest.MonkeyPatch, extra: dict[str, object]
) -> None:
    formatted: list[logging.LogRecord] = []
    format_record = JsonFormatter.format

    def noting(self: JsonFormatter, record: logging.LogRecord) -> str:
        formatted.append(record)
        return format_record(self, record)

    monkeypatch.setattr(JsonFormatter, "format", noting)
    logger, stream, handler = batching("secrets.test.hot.batching")
    fields = {
        "request_id": "r-1", "actor": "al\"ice\n", "client_id": None, "path": PATH,
        "op": "read", "version": 2, **extra, "method": "GET", "status": 200, "outcome": "ok",
        "duration_ms": 0.051,
    }  # fmt: skip
    try:
        handler.addFilter(lambda record: True)  # a filter: the record path, as before
        log_request(logger, dict(fields))
        assert len(formatted) == 1
        handler.filters.clear()
        log_request(logger, dict(fields))
        assert len(formatted) == 1  # no record made, nor formatted
    finally:
        handler.close()
    classic, fast = stream.getvalue().splitlines()
    assert fast[:9] == classic[:9] == '{"time":"'
    assert fast[38:] == classic[38:]  # all but the time, byte for byte
    assert datetime.fromisoformat(json.loads(fast)["time"]).tzinfo is not None
    assert CANARY not in stream.getvalue()
    assert list(json.loads(fast))[:4] == ["time", "level", "logger", "message"]


def test_log_request_honours_a_batching_handler_s_level_and_filters() -> None:
    logger, stream, handler = batching("secrets.test.hot.filtered")
    try:
        handler.addFilter(lambda record: False)
        log_request(logger, {"request_id": "r-1"})
        handler.filters.clear()
        handler.setLevel(logging.WARNING)
        log_request(logger, {"request_id": "r-2"})
        handler.setLevel(logging.NOTSET)
        log_request(logger, {"request_id": "r-3"})
    finally:
        handler.close()
    assert [json.loads(line)["request_id"] for line in stream.getvalue().splitlines()] == ["r-3"]


def test_the_batching_handler_keeps_order_writes_warnings_at_once_and_the_rest_on_close() -> None:
    stream = io.StringIO()
    handler = BatchingStreamHandler(stream, interval=60)  # the writer thread will not fire
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("secrets.test.batching")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.info("first")
        log_request(logger, {"request_id": "r-3", "status": 200})
        assert stream.getvalue() == ""  # queued
        logger.warning("third")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [line["message"] for line in lines] == ["first", "request", "third"]
        assert lines[1]["request_id"] == "r-3" and lines[1]["status"] == 200
        logger.info("fourth")
    finally:
        handler.close()
    assert json.loads(stream.getvalue().splitlines()[-1])["message"] == "fourth"


def test_the_batching_handler_writes_a_quiet_period_s_lines_within_its_interval() -> None:
    stream = io.StringIO()
    handler = BatchingStreamHandler(stream, interval=0.01)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("secrets.test.batching.quiet")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.info("alone")
        deadline = time.monotonic() + 5
        while "alone" not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert json.loads(stream.getvalue())["message"] == "alone"
    finally:
        handler.close()

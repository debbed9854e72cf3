"""The request trace and its recorder, without servers: the log line's fields in their fixed
order, the state that decides the audit record, and the record built from a trace."""

from __future__ import annotations

import io
import json
import logging

import pytest
from msgspec import UNSET

from service.audit import AuditLog
from service.auth import Principal
from service.http.recorder import Recorder
from service.http.trace import RequestTrace, TraceState, caller_request_id
from service.obs.logs import BatchingStreamHandler, JsonFormatter, log_request

READER = Principal(
    subject="alice", client_id=None, roles=frozenset({"reader"}), scopes=None, expires_at=0.0
)


def test_a_trace_s_log_fields_keep_the_line_s_order_whatever_order_they_were_set_in() -> None:
    trace = RequestTrace(request_id="r-1")
    trace.reason = "no_grant"
    trace.version = None  # several versions: shown as null, unlike a version never set
    trace.op = "delete"
    trace.path = "app/db"
    trace.authenticated(READER)
    assert list(trace.log_fields().items()) == [
        ("request_id", "r-1"),
        ("actor", "alice"),
        ("client_id", None),
        ("path", "app/db"),
        ("op", "delete"),
        ("version", None),
        ("reason", "no_grant"),
    ]


def test_a_trace_is_audited_once_authenticated_or_refused_at_authentication() -> None:
    received = RequestTrace(request_id="r-1")
    assert received.state is TraceState.RECEIVED
    refused = RequestTrace(request_id="r-2")
    refused.unauthenticated("expired")
    assert refused.state is TraceState.UNAUTHENTICATED and refused.reason == "expired"
    authenticated = RequestTrace(request_id="r-3")
    authenticated.authenticated(READER)
    authenticated.reason = "no_grant"  # a 403 after authentication stays authenticated
    assert authenticated.state is TraceState.AUTHENTICATED


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"x-request-id", b"job-42:retry.1")], "job-42:retry.1"),
        ([(b"x-request-id", b"two words")], UNSET),
        ([(b"x-request-id", b"x" * 129)], UNSET),
        ([], UNSET),
    ],
)
def test_only_a_well_formed_caller_request_id_is_kept(
    headers: list[tuple[bytes, bytes]], expected: object
) -> None:
    assert caller_request_id({"headers": headers}) == expected


@pytest.mark.parametrize("batching", [True, False])
def test_log_request_writes_a_trace_as_the_line_of_its_fields(batching: bool) -> None:
    stream = io.StringIO()
    handler: logging.Handler = (
        BatchingStreamHandler(stream, interval=60) if batching else logging.StreamHandler(stream)
    )
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"secrets.test.trace.{batching}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    plain = RequestTrace(request_id="r-1", client_request_id="c-1", path="app/db", op="read")
    plain.authenticated(READER)
    plain.version = 3
    listed = RequestTrace(request_id="r-2", op="delete", versions=[1, 2], version=None)
    for trace in (plain, listed):
        trace.method, trace.status, trace.outcome, trace.duration_ms = "GET", 200, "ok", 0.05
        log_request(logger, trace)
        log_request(logger, trace.log_fields())
    handler.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    for line in lines:
        del line["time"]
    assert lines[0] == lines[1] and lines[2] == lines[3]
    assert list(lines[0]) == [
        "level", "logger", "message", "request_id", "client_request_id", "actor", "client_id",
        "path", "op", "version", "method", "status", "outcome", "duration_ms",
    ]  # fmt: skip
    assert lines[2]["versions"] == "<list>"  # a container by its type, as for any line


def test_an_audit_record_of_a_401_takes_its_op_from_the_verb_and_leaves_the_rest_empty() -> None:
    audit = AuditLog(line=None, publisher=None)
    trace = RequestTrace(request_id="r-1", client_request_id="c-1")
    trace.unauthenticated("missing_token")
    scope = {"method": "GET", "path": "/secrets/app/db:versions", "client": ("10.0.0.1", 5)}
    record = Recorder.audit_record(audit, trace, scope, 401, "unauthenticated")
    assert (record.op, record.allowed, record.outcome, record.reason) == (
        "versions", False, "unauthenticated", "missing_token",
    )  # fmt: skip
    assert (record.path, record.version, record.sub, record.client_id) == (None,) * 4
    assert (record.source, record.client_request_id) == ("10.0.0.1", "c-1")

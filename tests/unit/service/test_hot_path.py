"""The pieces of the cached-read hot path, without servers: the cache's sync lookup, secrets kept
as their document, timestamps, the request log line and its batching handler, plain metrics."""

from __future__ import annotations

import io
import json
import logging
import pickle
import time
from datetime import UTC, datetime

import pytest
from prometheus_client import Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from schemas.secret import REDACTED, SecretData
from service.core.manager import SecretsManager
from service.http.trace import RequestTrace
from service.obs.logs import BatchingStreamHandler, JsonFormatter, log_context, log_request
from service.obs.metrics import Metrics
from service.timestamps import to_millis, utc_micros, utc_millis, utc_now
from tests.fakes import FakeClock, FakeVault

PATH = "app/db"
CANARY = "canary-5e0b-hot-path"


# -- SecretsManager.cached_document ----------------------------------------------------------------


async def test_cached_document_answers_a_hit_and_counts_it_but_leaves_a_miss_uncounted() -> None:
    vault = FakeVault()
    vault.seed(PATH, {"password": CANARY})
    manager = SecretsManager(vault)
    assert manager.cached_document(PATH) is None
    assert (manager.cache.hits, manager.cache.misses) == (0, 0)  # the caller's get counts it
    secret, body = await manager.get_document(PATH)
    assert manager.cache.misses == 1
    found = manager.cached_document(PATH)
    assert found is not None
    assert found[1] == body and found[0].version == secret.version == 1
    assert (manager.cache.hits, manager.cache.misses) == (1, 1)
    assert vault.calls["read"] == 1


async def test_cached_document_honours_the_ttl_and_the_fallback_ttl_while_the_bus_is_down() -> None:
    clock = FakeClock()
    vault = FakeVault()
    vault.seed(PATH, {"password": CANARY})
    manager = SecretsManager(vault, cache_ttl=300, fallback_ttl=5, clock=clock)
    await manager.get(PATH)
    clock.advance(6)
    assert manager.cached_document(PATH) is not None
    manager.bus_down()
    assert manager.cached_document(PATH) is None  # older than the fallback TTL


# -- a cached secret is kept as its JSON document ----------------------------------------------


def test_secret_data_from_a_document_decodes_only_when_read() -> None:
    document = json.dumps({"path": PATH, "version": 3, "data": {"password": CANARY}}).encode()
    data = SecretData.from_document(document)
    assert data._data is None  # nothing decoded yet: the cache holds the bytes only
    assert data == {"password": CANARY}
    assert data["password"] == CANARY and list(data) == ["password"] and len(data) == 1
    assert data.reveal() == {"password": CANARY}
    assert data == SecretData({"password": CANARY})
    assert CANARY not in repr(data) and CANARY not in str(data) and REDACTED in repr(data)
    with pytest.raises(TypeError):
        pickle.dumps(data)


async def test_a_hit_returns_the_data_written_though_the_cache_holds_only_the_document() -> None:
    manager = SecretsManager(FakeVault())
    written = await manager.set(PATH, {"password": CANARY, "n": 1}, 0)
    entry = manager.cache.get(PATH, None, 300)
    assert entry is not None and entry.secret.data._data is None
    hit = await manager.get(PATH)
    assert hit.version == written.version and hit.data == {"password": CANARY, "n": 1}
    assert CANARY not in repr(hit)


# -- timestamps ------------------------------------------------------------------------------------


def test_timestamps_read_as_datetime_isoformat_writes_them() -> None:
    ns = 1_795_900_000_123_456_789
    expected = datetime.fromtimestamp(ns // 1000 / 1e6, UTC).isoformat(timespec="microseconds")
    assert utc_micros(ns) == expected == "2026-11-28T21:06:40.123456+00:00"
    assert utc_millis(1_795_900_000.5, 500.0) == "2026-11-28T21:06:40.500+00:00"
    # One reading serves a request's audit record (µs) and its log line (ms).
    assert (
        to_millis(utc_micros(ns))
        == utc_millis(ns / 1e9, 123.456)
        == "2026-11-28T21:06:40.123+00:00"
    )
    parsed = datetime.fromisoformat(utc_now())
    assert parsed.tzinfo is not None and abs(parsed.timestamp() - time.time()) < 5


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


# -- operation metrics as plain numbers ------------------------------------------------------------


def test_operation_metrics_expose_what_prometheus_client_objects_would() -> None:
    metrics = Metrics()
    reference = Histogram(
        "secrets_operation_seconds",
        "Operation latency by op",
        ["op"],
        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        registry=None,
    )
    for seconds in (0.0001, 0.0005, 0.003, 0.2, 9.0):
        metrics.observe_operation("read", "ok", seconds)
        reference.labels("read").observe(seconds)
    metrics.observe_operation("nonsense", "weird", 0.001)
    text = generate_latest(metrics.registry).decode()
    ours = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("secrets_operation")
    }
    assert ours[("secrets_operations_total", (("op", "read"), ("outcome", "ok")))] == 5
    assert ours[("secrets_operations_total", (("op", "other"), ("outcome", "error")))] == 1
    for family in reference.collect():
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            assert ours[(s.name, tuple(sorted(s.labels.items())))] == pytest.approx(s.value)

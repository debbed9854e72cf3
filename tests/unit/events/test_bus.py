"""EventBus without a server: publish retries and failures, what it does with what arrives (its
own checks of subject, ranges and paths, each drop counted), its repr and its settings errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
import pytest
from nats.errors import TimeoutError as NatsTimeout
from prometheus_client import generate_latest

from devstack import free_port
from events.bus import EventBus, check_event
from schemas.errors import ConfigError
from schemas.events import (
    SecretCreated,
    SecretDeleted,
    SecretDestroyed,
    SecretUpdated,
    event_encoder,
)
from service.core.manager import SecretsManager
from service.obs.metrics import Metrics
from tests.fakes import RecordingHandler, forged, lifecycle_event

PREFIX = "secrets"


# -- publishing and applying -----------------------------------------------------------------------


class FlakyJetStream:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[tuple[str, bytes, dict[str, str]]] = []

    async def publish(
        self, subject: str, payload: bytes, timeout: float, headers: dict[str, str]
    ) -> None:
        self.calls.append((subject, payload, headers))
        if len(self.calls) <= self.failures:
            raise NatsTimeout()


def event(instance: str = "other", version: int = 2) -> SecretUpdated:
    return SecretUpdated(
        event_id="e1",
        path="app/db.main",
        version=version,
        actor="alice",
        instance_id=instance,
        time="2026-11-28T00:00:00+00:00",
    )


async def settle(bus: EventBus) -> None:
    while bus._tasks:
        await asyncio.sleep(0.01)


async def test_a_failed_publish_is_retried_until_it_succeeds() -> None:
    bus = EventBus(["nats://unused"], "secrets", instance_id="me", publish_attempts=4)
    js = FlakyJetStream(failures=2)
    bus.js = js
    bus.publish(event())
    await settle(bus)
    assert len(js.calls) == 3
    assert bus.published == 1 and bus.publish_failures == 0
    subject, payload, headers = js.calls[-1]
    assert subject == "secrets.changed.app.db%2Emain"
    assert headers == {"Nats-Msg-Id": "e1"}  # the stream drops a retried duplicate


async def test_a_publish_that_keeps_failing_is_counted_and_never_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus(["nats://unused"], "secrets", instance_id="me", publish_attempts=3)
    bus.js = FlakyJetStream(failures=99)
    bus.publish(event())
    await settle(bus)
    assert bus.published == 0 and bus.publish_failures == 1
    assert "event not published" in caplog.text


async def test_publishing_while_never_connected_is_counted_as_a_failure() -> None:
    bus = EventBus(["nats://unused"], "secrets", instance_id="me", publish_attempts=2)
    bus.publish(event())
    await settle(bus)
    assert bus.publish_failures == 1


def test_an_event_from_another_instance_is_applied() -> None:
    bus = EventBus(["nats://unused"], "secrets", instance_id="me")
    handler = RecordingHandler()
    bus._handler = handler
    bus._handle(event_encoder.encode(event("other", 7)), "secrets.changed.app.db%2Emain")
    assert handler.changes == [("app/db.main", 7)]
    assert bus.received == 1


def test_our_own_event_is_not_applied_again() -> None:
    bus = EventBus(["nats://unused"], "secrets", instance_id="me")
    handler = RecordingHandler()
    bus._handler = handler
    bus._handle(event_encoder.encode(event("me")), "secrets.changed.app.db%2Emain")
    assert handler.changes == []


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b'{"type": "secret.updated"}',
        b'{"type": "nope", "path": "x"}',
        b'{"type": "secret.updated", "path": "\xff\xfe"}',  # invalid UTF-8 in a string
        b'{"type": "secret.updated", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
)
def test_an_undecodable_event_is_dropped_and_counted(payload: bytes) -> None:
    bus = EventBus(["nats://unused"], "secrets", instance_id="me")
    handler = RecordingHandler()
    bus._handler = handler
    bus._handle(payload, "secrets.changed.app.db%2Emain")
    assert handler.changes == [] and bus.dropped["undecodable"] == 1


def test_the_event_payload_has_no_data_field() -> None:
    decoded: dict[str, Any] = json.loads(event_encoder.encode(event()))
    assert set(decoded) == {"type", "event_id", "path", "version", "actor", "instance_id", "time"}


async def test_an_unreachable_nats_at_start_is_a_config_error_not_a_hang() -> None:
    # nats-py retries a first connection forever when reconnects are endless: bounded here.
    bus = EventBus([f"nats://127.0.0.1:{free_port()}"], "secrets", instance_id="me")
    started = asyncio.get_running_loop().time()
    with pytest.raises(ConfigError) as info:
        await bus.connect(RecordingHandler(), connect_timeout=0.2)
    assert info.value.setting == "SECRETS_NATS_URL"
    assert asyncio.get_running_loop().time() - started < 2.0


# -- the bus's own checks of what arrives ----------------------------------------------------------


VICTIM = "app/db.main"


VICTIM_SUBJECT = "secrets.changed.app.db%2Emain"


def offline_bus() -> tuple[EventBus, RecordingHandler]:
    bus = EventBus(["nats://unused"], PREFIX, instance_id="me")
    handler = RecordingHandler()
    bus._handler = handler
    return bus, handler


@pytest.mark.parametrize(
    "subject",
    [
        "secrets.changed.app.other",  # another path's subject
        "secrets.changed.app.db.main",  # app/db/main: three segments, not app/db.main
        "secrets.changed.app.db%2emain",  # a non-canonical escape
        "other.changed.app.db%2Emain",  # another prefix
        "secrets.audit.write",
    ],
)
def test_an_event_on_a_subject_that_names_another_path_never_reaches_the_handler(
    subject: str,
) -> None:
    bus, handler = offline_bus()
    seen: list[Any] = []
    bus.on_received = seen.append
    bus._handle(forged(path=VICTIM, version=2), subject)
    assert handler.calls == [] and seen == []
    assert bus.dropped["subject_mismatch"] == 1


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        (SecretUpdated, {"version": 0}),
        (SecretUpdated, {"version": 2**53 + 1}),
        (SecretUpdated, {"version": 2**62}),
        (SecretDestroyed, {"version": 2**53 + 1, "versions": (1,)}),
        (SecretDestroyed, {"version": 3, "versions": (1, 2**53 + 1)}),
        (SecretDestroyed, {"version": 3, "versions": tuple(range(1, 1002))}),
        (SecretDestroyed, {"version": 3, "versions": (1,), "event_id": "e" * 100_000}),
        (SecretUpdated, {"version": 2, "actor": "a" * 100_000}),
    ],
    ids=[
        "v0",
        "v2^53+1",
        "v2^62",
        "current-too-big",
        "a-version-too-big",
        "1001-versions",
        "long-event-id",
        "long-actor",
    ],  # fmt: skip
)
def test_an_event_whose_numbers_are_out_of_range_is_dropped(
    kind: type[Any], fields: dict[str, Any]
) -> None:
    bus, handler = offline_bus()
    lags: list[float] = []
    bus.lag_observer = lags.append
    bus._handle(forged(kind, path=VICTIM, **fields), VICTIM_SUBJECT, live=True)
    assert handler.calls == [] and lags == []
    assert bus.dropped["out_of_range"] == 1


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        (SecretUpdated, {"version": 2**53}),
        (SecretDestroyed, {"version": 0, "versions": (1, 2)}),  # the history is gone
        (SecretDestroyed, {"version": 3, "versions": tuple(range(1, 1001))}),
    ],
)
def test_events_at_the_edges_of_the_ranges_are_handed_on(
    kind: type[Any], fields: dict[str, Any]
) -> None:
    bus, handler = offline_bus()
    bus._handle(forged(kind, path=VICTIM, **fields), VICTIM_SUBJECT)
    assert len(handler.calls) == 1
    assert sum(bus.dropped.values()) == 0


def test_every_drop_reason_is_exported_from_a_closed_set_and_publish_failures_apart() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from events.bus import DROP_REASONS
    from tests.fakes import FakeVault

    bus, _ = offline_bus()
    manager = SecretsManager(FakeVault(), events=bus)
    metrics = Metrics()
    metrics.bind(manager=manager, bus=bus)
    bus._handle(b"not json", VICTIM_SUBJECT)
    bus._handle(forged(path=VICTIM, version=2), "secrets.changed.elsewhere")
    families = {
        f.name: f
        for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())
    }
    dropped = {s.labels["reason"]: s.value for s in families["secrets_events_dropped"].samples}
    assert set(dropped) == set(DROP_REASONS)
    assert dropped["undecodable"] == 1 and dropped["subject_mismatch"] == 1
    failed = {s.labels["stage"] for s in families["secrets_events_failed"].samples}
    assert failed == {"publish"}


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://svc:s3cr3t@nats-1:4222", "nats://***@nats-1:4222"),
        ("tls://s3cr3t@nats-1:4222", "tls://***@nats-1:4222"),  # a lone user name: a token
        ("nats://svc:s3cr3t@[::1]:4222", "nats://***@[::1]:4222"),
        ("nats://nats-1:4222", "nats://nats-1:4222"),
    ],
)
def test_a_password_in_a_nats_url_never_shows_in_the_bus_repr(url: str, shown: str) -> None:
    bus = EventBus([url], PREFIX, instance_id="me")
    assert "s3cr3t" not in repr(bus)
    assert shown in repr(bus)


@pytest.mark.parametrize(
    "path", ["app/../db", "app//db", "/app/db", "app/db/", "a b/c", "a/" * 17 + "x", "x" * 600]
)
def test_an_event_for_a_path_no_route_would_accept_is_dropped(path: str) -> None:
    # Its subject, percent-encoded by hand: `changed_subject` refuses such a path itself.
    tokens = [quote(segment, safe="") or "%00" for segment in path.split("/")]
    subject = f"{PREFIX}.changed." + ".".join(tokens)
    bus, handler = offline_bus()
    bus._handle(forged(SecretUpdated, path=path, version=2), subject)
    bus._handle(forged(SecretUpdated, path=path, version=2))  # no subject to compare with
    assert handler.calls == []
    assert sum(bus.dropped.values()) == 2
    assert (
        check_event(
            msgspec.json.decode(forged(SecretUpdated, path=path, version=2), type=SecretUpdated)
        )
        == "out_of_range"
    )


# -- settings refused at construction --------------------------------------------------------------


def test_a_file_that_is_not_a_credentials_file_is_a_config_error_naming_the_setting(
    tmp_path: Path,
) -> None:
    bogus = tmp_path / "bogus.creds"
    bogus.write_text("not a credentials file")
    with pytest.raises(ConfigError) as info:
        EventBus(["nats://127.0.0.1:4222"], PREFIX, instance_id="x", credentials=str(bogus))
    assert info.value.setting == "SECRETS_NATS_CREDS"


def test_a_tls_file_that_does_not_load_is_a_config_error_naming_its_setting(
    tmp_path: Path,
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not PEM")
    with pytest.raises(ConfigError) as ca:
        EventBus(["nats://127.0.0.1:4222"], PREFIX, instance_id="x", tls_ca=str(junk))
    assert ca.value.setting == "SECRETS_NATS_TLS_CA"
    with pytest.raises(ConfigError) as cert:
        EventBus(
            ["nats://127.0.0.1:4222"],
            PREFIX,
            instance_id="x",
            tls_cert=str(junk),
            tls_key=str(junk),
        )
    assert cert.value.setting == "SECRETS_NATS_TLS_CERT"


def test_the_bus_hands_lifecycle_events_to_apply_lifecycle_and_writes_to_apply_change() -> None:
    path = "app/db"
    bus = EventBus(["nats://unused"], "secrets", instance_id="me")
    handler = RecordingHandler()
    bus._handler = handler
    deleted = lifecycle_event(SecretDeleted, 3, path=path)
    created = SecretCreated(
        event_id="e2", path=path, version=1, actor="a", instance_id="other", time="t"
    )
    bus._handle(event_encoder.encode(deleted))
    bus._handle(event_encoder.encode(created))
    assert handler.calls == [("lifecycle", deleted), ("change", (path, 1))]

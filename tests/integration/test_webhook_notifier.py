"""The example webhook notifier against a real nats-server and a real HTTP receiver: approval
events published as the service publishes them reach the webhook once, in order, signed; retries,
skips and restarts. Each test has its own prefix and stream, created as the service creates it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats as nats_client
import pytest
from aiohttp import web
from nats.js import JetStreamContext

from devstack import NatsEndpoint, NatsServer, OidcIssuer, OpenBaoEndpoint, free_port
from events.bus import ensure_stream
from events.subjects import approvals_subject
from examples.webhook_notifier import NotifierOptions, WebhookNotifier, sign
from schemas.approvals import (
    ApprovalEvent,
    ChangeApplied,
    ChangeApproved,
    ChangeProposed,
    approval_event_encoder,
)
from tests.support import (
    LogCapture,
    bearer,
    eventually,
    running_service,
    service_settings,
    write_policy,
)

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"webhook-signing-key-for-tests"
README_HEADING = "Notifications (webhook example)\n"
POLICY = """\
[roles.app-reader]
read = ["prod/**"]
approve = ["prod/**"]

[roles.app-writer]
read = ["prod/**"]
write = ["prod/**"]

[[approvals.rules]]
paths = ["prod/**"]
required = 1
expires = "1h"
"""


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def event_id(self) -> str:
        return str(self.json["event"]["event_id"])


@dataclass
class Receiver:
    """A webhook that records every request and answers the next of `statuses` (then 200)."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(Received(dict(request.headers), body))
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)

    @property
    def event_ids(self) -> list[str]:
        return [r.event_id for r in self.requests]


@dataclass
class Bus:
    js: JetStreamContext
    prefix: str
    stream: str

    async def publish(self, event: ApprovalEvent | bytes, path: str | None = None) -> None:
        """Publish as the service does, on the subject of the event's path (or of `path`)."""
        data = event if isinstance(event, bytes) else approval_event_encoder.encode(event)
        subject_path = path if path is not None else getattr(event, "path", "")
        await self.js.publish(
            approvals_subject(self.prefix, subject_path), data, stream=self.stream
        )


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recorder = Receiver()
    app = web.Application()
    app.router.add_post("/hook/T0/secret-token", recorder.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    recorder.url = f"http://127.0.0.1:{port}/hook/T0/secret-token"
    try:
        yield recorder
    finally:
        await runner.cleanup()


@pytest.fixture
async def bus(nats: NatsEndpoint) -> AsyncIterator[Bus]:
    nc = await nats_client.connect(nats.url)
    js = nc.jetstream()
    tag = uuid.uuid4().hex[:8]
    prefix, stream = f"wh{tag}", f"APPROVALS_{tag.upper()}"
    await ensure_stream(js, prefix, name=stream, kind="approvals")
    try:
        yield Bus(js, prefix, stream)
    finally:
        await js.delete_stream(stream)
        await nc.close()


def options(nats: NatsEndpoint, bus: Bus, receiver: Receiver, **overrides: Any) -> NotifierOptions:
    base = NotifierOptions(
        servers=[nats.url],
        webhook=receiver.url,
        prefix=bus.prefix,
        stream=bus.stream,
        durable="notifier",
        retry_delay=0.05,
        connect_timeout=10.0,
    )
    return replace(base, **overrides)


@contextlib.asynccontextmanager
async def running(opts: NotifierOptions) -> AsyncIterator[WebhookNotifier]:
    """The notifier as a task, its consumer created; cancelled (as SIGTERM does) at the end."""
    notifier = WebhookNotifier(opts)
    task = asyncio.ensure_future(notifier.run())
    try:
        await eventually(lambda: notifier.ready.is_set() or task.done())
        if task.done():
            task.result()  # its error, if it stopped
        yield notifier
        assert not task.done(), "the notifier stopped on its own"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


_counter: Iterator[int] = iter(range(1, 1_000_000))


def event(
    kind: type[ApprovalEvent] = ChangeProposed, path: str = "prod/db", **fields: Any
) -> ApprovalEvent:
    number = next(_counter)
    values: dict[str, Any] = {
        "event_id": f"ev-{number}-{uuid.uuid4().hex[:6]}",
        "id": f"chg-{number}",
        "path": path,
        "state": "pending",
        "actor": "alice",
        "base_version": 3,
        "required": 2,
        "instance_id": "svc-A",
        "time": "2025-01-01T00:00:00+00:00",
    }
    return kind(**{**values, **fields})


async def test_each_approval_event_reaches_the_webhook_once_in_order_and_signed(
    nats: NatsEndpoint, bus: Bus, receiver: Receiver
) -> None:
    events = [
        event(ChangeProposed, path="prod/db.main"),
        event(ChangeApproved, path="prod/db.main", state="pending", actor="bob", approvals=1),
        event(ChangeApproved, path="prod/db.main", state="approved", actor="carol", approvals=2),
        event(ChangeApplied, path="prod/db.main", state="applied", applied_version=4),
    ]
    async with running(options(nats, bus, receiver, secret=SECRET)) as notifier:
        for item in events:
            await bus.publish(item)
        await eventually(lambda: notifier.delivered == len(events))
        info = await bus.js.consumer_info(bus.stream, "notifier")
    assert receiver.event_ids == [e.event_id for e in events]  # each once, in stream order
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)
    for sent, got in zip(events, receiver.requests, strict=True):
        assert got.json["event"] == msgspec.to_builtins(sent)
        expected = hmac.new(SECRET, got.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(got.headers["X-Signature"], f"sha256={expected}")
        assert got.headers["Content-Type"] == "application/json"
    texts = [r.json["text"] for r in receiver.requests]
    assert texts[0] == "change.proposed prod/db.main: pending by alice (0/2 approvals)"
    assert texts[2] == "change.approved prod/db.main: approved by carol (2/2 approvals)"
    assert texts[3].startswith("change.applied prod/db.main: applied")


async def test_a_webhook_answering_500_twice_gets_the_event_again_and_the_next_one_waits(
    nats: NatsEndpoint, bus: Bus, receiver: Receiver
) -> None:
    first, second = event(), event(ChangeApproved, actor="bob", approvals=1)
    receiver.statuses = [500, 500]
    async with running(options(nats, bus, receiver)) as notifier:
        await bus.publish(first)
        await bus.publish(second)
        await eventually(lambda: notifier.delivered == 2)
    # Redelivered by JetStream after each nak; the second event only once the first was acked.
    assert receiver.event_ids == [first.event_id] * 3 + [second.event_id]
    assert (notifier.dropped, notifier.skipped) == (0, 0)
    assert all("X-Signature" not in r.headers for r in receiver.requests)  # no secret: unsigned


async def test_a_webhook_failing_every_attempt_drops_the_event_after_max_deliver_and_moves_on(
    nats: NatsEndpoint, bus: Bus, receiver: Receiver
) -> None:
    doomed, next_one = event(), event()
    receiver.statuses = [503, 500, 502]
    async with running(options(nats, bus, receiver, max_deliver=3)) as notifier:
        await bus.publish(doomed)
        await bus.publish(next_one)
        await eventually(lambda: notifier.delivered == 1)
    assert receiver.event_ids == [doomed.event_id] * 3 + [next_one.event_id]
    assert notifier.dropped == 1


async def test_undecodable_unknown_and_forged_messages_are_skipped_without_stopping_the_notifier(
    nats: NatsEndpoint, bus: Bus, receiver: Receiver
) -> None:
    good = event(path="prod/api")
    future = {**msgspec.to_builtins(event()), "type": "change.escalated"}
    async with running(options(nats, bus, receiver)) as notifier:
        await bus.publish(b"\xff not json {", path="prod/api")
        await bus.publish(json.dumps(future).encode(), path="prod/db")  # a type added later
        await bus.publish(approval_event_encoder.encode(event(path="prod/db")), path="dev/db")
        await bus.publish(json.dumps({"type": "change.proposed"}).encode(), path="prod/db")
        await bus.publish(good)
        await eventually(lambda: notifier.delivered == 1)
        info = await bus.js.consumer_info(bus.stream, "notifier")
    assert receiver.event_ids == [good.event_id]
    assert notifier.skipped == 4
    assert (info.num_pending, info.num_ack_pending) == (0, 0)  # skipped ones are acked


async def test_a_notifier_restarted_with_the_same_durable_resumes_after_the_last_acked_event(
    nats: NatsEndpoint, bus: Bus, receiver: Receiver
) -> None:
    before = [event(), event()]
    while_down = [event(ChangeApproved, approvals=1), event(ChangeApproved, approvals=2)]
    async with running(options(nats, bus, receiver, durable="chat")) as notifier:
        for item in before:
            await bus.publish(item)
        await eventually(lambda: notifier.delivered == 2)

    async def no_pull_waiting() -> bool:
        # The stopped notifier's last fetch stays a waiting pull request until the server has
        # seen its connection close; an event published before then goes to that dead request
        # and is redelivered only after ack_wait.
        info = await bus.js.consumer_info(bus.stream, "chat")
        return bool(info.num_waiting == 0)

    await eventually(no_pull_waiting)
    for item in while_down:
        await bus.publish(item)
    async with running(options(nats, bus, receiver, durable="chat")) as restarted:
        await eventually(lambda: restarted.delivered == 2)
        after = event(ChangeApplied, state="applied")
        await bus.publish(after)
        await eventually(lambda: restarted.delivered == 3)
    expected = [e.event_id for e in [*before, *while_down, after]]
    assert receiver.event_ids == expected  # none of the acked ones again


async def test_a_notifier_without_its_stream_fails_at_start_naming_it(
    nats: NatsEndpoint, bus: Bus, receiver: Receiver
) -> None:
    notifier = WebhookNotifier(options(nats, bus, receiver, stream="NO_SUCH_STREAM"))
    with pytest.raises(ConnectionError, match="NO_SUCH_STREAM"):
        await asyncio.wait_for(notifier.run(), 15)


async def test_the_command_delivers_signed_events_and_stops_cleanly_on_sigterm(
    nats: NatsEndpoint, bus: Bus, receiver: Receiver
) -> None:
    proposed = event()
    await bus.publish(proposed)  # before the notifier exists: --deliver-all still sends it
    command = [
        sys.executable, "-m", "examples.webhook_notifier", "--nats", nats.url,
        "--prefix", bus.prefix, "--stream", bus.stream, "--webhook", receiver.url,
        "--durable", "cli", "--deliver-all",
    ]  # fmt: skip
    environ = {**os.environ, "WEBHOOK_SECRET": SECRET.decode()}  # not on the command line
    process = await asyncio.create_subprocess_exec(
        *command, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        await eventually(lambda: len(receiver.requests) == 1 or process.returncode is not None)
        assert receiver.event_ids == [proposed.event_id]
        got = receiver.requests[0]
        assert (
            got.headers["X-Signature"]
            == "sha256=" + hmac.new(SECRET, got.body, hashlib.sha256).hexdigest()
        )
        await eventually(lambda: _acked(bus, "cli"))
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, output.decode()
    assert b"secret-token" not in output  # the webhook URL's path is never logged


async def _acked(bus: Bus, durable: str) -> bool:
    info = await bus.js.consumer_info(bus.stream, durable)
    return info.ack_floor.stream_seq == 1 if info.ack_floor else False


def readme_grants() -> str:
    """The nats-server user block the README gives the notifier (the first block after its
    heading), its password variable left in."""
    section = (ROOT / "README.md").read_text().split(README_HEADING, 1)[1]
    return section.split("```\n", 2)[1]


async def test_the_readme_grants_are_all_a_notifier_needs(
    nats: NatsEndpoint, receiver: Receiver, tmp_path: Path
) -> None:
    del nats  # only for its skip when nats-server is missing: this test runs its own server
    password = uuid.uuid4().hex
    notifier_user = readme_grants().replace("$WEBHOOK_NOTIFIER_NATS_PASSWORD", json.dumps(password))
    admin = '{ user: admin, password: "admin-pw" }'
    server = NatsServer(
        config=f"authorization {{ users = [ {admin}\n{notifier_user} ] }}",
        log_path=tmp_path / "nats.log",
    )
    server.start()
    nc = None
    try:
        nc = await nats_client.connect(f"nats://admin:admin-pw@127.0.0.1:{server.port}")
        published = Bus(nc.jetstream(), "secrets", "SECRETS_APPROVALS")
        await ensure_stream(published.js, "secrets", name="SECRETS_APPROVALS", kind="approvals")
        opts = NotifierOptions(
            servers=[f"nats://notifier:{password}@127.0.0.1:{server.port}"],
            webhook=receiver.url,
            durable="approvals-webhook",  # the README's defaults: prefix, stream, this durable
        )
        with LogCapture() as logs:
            async with running(opts) as notifier:
                proposed = event()
                await published.publish(proposed)
                await eventually(lambda: notifier.delivered == 1)
            async with running(opts) as restarted:  # the durable exists now: INFO, not CREATE
                await published.publish(later := event(ChangeApproved, approvals=1))
                await eventually(lambda: restarted.delivered == 1)
        assert receiver.event_ids == [proposed.event_id, later.event_id]
        assert "Permissions Violation" not in logs.text
        assert "Permissions Violation" not in (tmp_path / "nats.log").read_text(errors="replace")
        assert password not in logs.text
    finally:
        if nc is not None:
            await nc.close()
        server.stop()


async def test_a_proposal_made_over_http_reaches_the_webhook_as_the_service_announces_it(
    openbao: OpenBaoEndpoint,
    nats: NatsEndpoint,
    oidc: OidcIssuer,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    settings = service_settings(openbao, nats, oidc, write_policy(tmp_path, POLICY))
    tokens = {who: oidc.mint(who) for who in ("reader", "writer")}
    path, canary = f"prod/wh-{uuid.uuid4().hex[:8]}/db", f"canary-{uuid.uuid4().hex}"
    durable = f"e2e-{uuid.uuid4().hex[:8]}"
    opts = NotifierOptions(
        servers=[nats.url], webhook=receiver.url, prefix=settings.nats_prefix, durable=durable,
        secret=SECRET,
    )  # fmt: skip
    async with (
        running_service(settings) as svc,  # it makes SECRETS_APPROVALS at its start
        running(opts) as notifier,
        httpx.AsyncClient(base_url=svc.url, timeout=15) as client,
    ):
        body = {"data": {"password": canary}, "version": 0, "reason": "new database"}
        proposed = await client.post(
            f"/secrets/{path}:propose", json=body, headers=bearer(tokens["writer"])
        )
        assert proposed.status_code == 201, proposed.text
        change = proposed.json()["id"]
        approved = await client.post(f"/changes/{change}:approve", headers=bearer(tokens["reader"]))
        assert approved.status_code == 200, approved.text
        await eventually(lambda: notifier.delivered == 2)
    nc = await nats_client.connect(nats.url)
    try:  # the durable outlives the notifier, by design: this test's is removed
        await nc.jetstream().delete_consumer(opts.stream, durable)
    finally:
        await nc.close()
    mine = [r for r in receiver.requests if r.json["event"]["path"] == path]
    assert [r.json["event"]["type"] for r in mine] == ["change.proposed", "change.approved"]
    first, second = (r.json["event"] for r in mine)
    assert (first["id"], first["state"], first["required"]) == (change, "pending", 1)
    assert (second["state"], second["approvals"]) == ("approved", 1)
    assert mine[0].json["text"].startswith(f"change.proposed {path}: pending by ")
    for request in mine:
        assert request.headers["X-Signature"] == sign(SECRET, request.body)
        assert canary.encode() not in request.body

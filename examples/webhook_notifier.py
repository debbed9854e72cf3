"""An example approval notifier: each change-request event of the JetStream stream
SECRETS_APPROVALS (subjects `<prefix>.approvals.>`) POSTed as JSON to a webhook.

It never sees secret data: approval events carry ids, paths, states, actors and counts, never a
value. Run it beside the service, with a NATS user that may read the stream::

    python -m examples.webhook_notifier --nats nats://127.0.0.1:4222 --prefix secrets \\
        --webhook https://hooks.example.com/T0/B0/xyz --durable approvals-chat

Each event becomes ``{"text": "<one line>", "event": {...}}`` (what Slack and Mattermost incoming
webhooks accept); with a secret (`--secret`, better the WEBHOOK_SECRET environment variable:
a command line is visible to other users) it is signed, ``X-Signature: sha256=<hex HMAC-SHA256
of the body>``. The durable consumer remembers what was acknowledged, so a restart resumes after
the last event the webhook accepted; one event at a time, in stream order. A webhook that fails
gets the event again later (JetStream redelivery, the delay doubling) until `--max-deliver`
attempts, then the event is dropped and logged. Delivery is at least once: deduplicate on
``event.event_id``. The webhook URL (often a credential itself) is never logged, only its host.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import httpx
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from events.bus import APPROVALS_STREAM
from events.connection import check_credentials, connect_options, describe_error, tls_context
from events.subjects import approvals_subject
from schemas.approvals import APPROVAL_EVENT_TYPES, ApprovalEvent, approval_event_decoder
from schemas.errors import ConfigError
from schemas.paths import is_valid_path

__all__ = ["NotifierOptions", "WebhookNotifier", "event_text", "main", "sign"]

log = logging.getLogger("secrets.examples.webhook_notifier")


class _Typed(msgspec.Struct):
    type: str = ""


_type_decoder = msgspec.json.Decoder(_Typed)  # only to tell an unknown type from garbage


@dataclass(frozen=True)
class NotifierOptions:
    servers: Sequence[str]
    webhook: str
    prefix: str = "secrets"
    durable: str = "webhook-notifier"
    stream: str = APPROVALS_STREAM
    secret: bytes | None = None  # signs each body (X-Signature) when given
    max_deliver: int = 10  # attempts per event, then it is dropped (and logged)
    retry_delay: float = 1.0  # seconds before the second attempt, doubling, at most max_delay
    max_delay: float = 300.0
    timeout: float = 10.0  # seconds the webhook has to answer
    deliver_all: bool = False  # a new durable starts at the stream's first event, not its end
    credentials: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_hostname: str | None = None
    tls_first: bool = False
    connect_timeout: float = 30.0  # seconds to reach NATS at the start


def event_text(event: ApprovalEvent) -> str:
    """The human line: ``change.approved prod/db: approved by bob (2/2 approvals)``."""
    tag = event.__struct_config__.tag
    actor = event.actor.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (
        f"{tag} {event.path}: {event.state} by {actor or 'the service'} "
        f"({event.approvals}/{event.required} approvals)"
    )


def sign(secret: bytes, body: bytes) -> str:
    """The X-Signature value: a receiver recomputes it and compares with hmac.compare_digest."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookNotifier:
    """Consume the approvals stream with a durable pull consumer and POST each event.

    `run()` works until cancelled; `ready` is set once the consumer exists. Counters: `delivered`
    (accepted by the webhook), `skipped` (undecodable, unknown type, forged path), `dropped`
    (the webhook failed `max_deliver` times).
    """

    def __init__(self, options: NotifierOptions, http: httpx.AsyncClient | None = None) -> None:
        approvals_subject(options.prefix, "probe")  # ValueError for a prefix the bus refuses
        if options.max_deliver < 1 or options.retry_delay < 0 or options.timeout <= 0:
            raise ValueError("max_deliver is at least 1, retry_delay and timeout positive")
        if options.credentials is not None:
            try:
                check_credentials(options.credentials)
            except ConfigError as exc:
                raise ValueError(f"NATS credentials file: {exc.problem}") from None
        self.options = options
        self._host = httpx.URL(options.webhook).host  # what logs name: the URL may be a secret
        self._tls = tls_context(
            options.tls_ca, options.tls_cert, options.tls_key, required=options.tls_first
        )
        self._http = http or httpx.AsyncClient(timeout=options.timeout)
        self._own_http = http is None
        self.ready = asyncio.Event()
        self.delivered = self.skipped = self.dropped = 0

    async def run(self) -> None:
        """Consume until cancelled. Raises `ConnectionError` if NATS or the stream is not there
        at the start; once running, lost connections are retried forever."""
        opts = self.options
        nc = NATS()
        try:
            await self._connect(nc)
            start = js_api.DeliverPolicy.ALL if opts.deliver_all else js_api.DeliverPolicy.NEW
            config = js_api.ConsumerConfig(
                deliver_policy=start,
                ack_policy=js_api.AckPolicy.EXPLICIT,
                # One event in flight: the next waits until this one is acked or given up on,
                # so retries keep the stream's order.
                max_ack_pending=1,
                max_deliver=opts.max_deliver,
                ack_wait=opts.timeout + 20.0,  # never redelivered while the webhook is asked
            )
            try:
                # An existing durable is used as it is: delete it to change its settings.
                sub = await nc.jetstream().pull_subscribe(
                    f"{opts.prefix}.approvals.>", durable=opts.durable, stream=opts.stream,
                    config=config,
                )  # fmt: skip
            except NotFoundError:
                raise ConnectionError(f"no JetStream stream {opts.stream!r} (the service "
                                      "makes it at its start)") from None  # fmt: skip
            self.ready.set()
            while True:
                try:
                    msgs = await sub.fetch(1, timeout=5.0)
                except TimeoutError:
                    continue  # nothing new
                except NatsError as exc:
                    log.warning("fetch failed: %s", describe_error(exc))
                    await asyncio.sleep(1.0)  # reconnecting: the connection retries on its own
                    continue
                for msg in msgs:
                    await self._handle(msg)
        finally:
            await nc.close()
            if self._own_http:
                await self._http.aclose()

    async def _connect(self, nc: NATS) -> None:
        opts = self.options
        errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            errors[:] = [exc]
            log.warning("NATS error: %s", describe_error(exc))

        options = connect_options(
            opts.credentials, self._tls, opts.tls_hostname, tls_first=opts.tls_first
        )
        try:
            # Bounded: with endless reconnects nats-py would retry a first connection forever.
            await asyncio.wait_for(
                nc.connect(servers=list(opts.servers), name=f"webhook-notifier-{opts.durable}",
                           max_reconnect_attempts=-1, error_cb=on_error, **options),
                opts.connect_timeout,
            )  # fmt: skip
        except (OSError, NatsError, TimeoutError) as exc:
            why = describe_error(errors[0] if errors else exc)
            raise ConnectionError(f"cannot connect to NATS: {why}") from None

    async def _handle(self, msg: Msg) -> None:
        attempt = msg.metadata.num_delivered or 1
        sequence = msg.metadata.sequence.stream
        event = self._decode(msg)
        if event is None:
            self.skipped += 1
            await self._settle(msg.ack_sync)
            return
        if await self._post(event):
            if await self._settle(msg.ack_sync):
                self.delivered += 1
                log.info("event %d delivered: %s", sequence, event_text(event))
        elif attempt >= self.options.max_deliver:
            self.dropped += 1
            log.error("webhook failed %d times: event %s dropped", attempt, event.event_id)
            await self._settle(msg.term)
        else:
            delay = min(self.options.retry_delay * 2 ** (attempt - 1), self.options.max_delay)
            log.warning("webhook failed (attempt %d): event %d again in %.1fs",
                        attempt, sequence, delay)  # fmt: skip
            await self._settle(lambda: msg.nak(delay=delay))

    def _decode(self, msg: Msg) -> ApprovalEvent | None:
        """The event, or None (logged) if it is not one this version knows, or names a path
        other than its subject's (a forgery by someone who may publish elsewhere)."""
        sequence = msg.metadata.sequence.stream
        try:
            event: ApprovalEvent = approval_event_decoder.decode(msg.data)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            try:
                kind = _type_decoder.decode(msg.data).type
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                kind = ""
            if kind.startswith("change.") and kind not in APPROVAL_EVENT_TYPES:
                # Added to the service after this notifier was written: not an error.
                log.info("event %d of a type this notifier does not know: skipped", sequence)
            else:
                log.warning("undecodable message %d skipped", sequence)
            return None
        if not is_valid_path(event.path):
            log.warning("event %d skipped: invalid path", sequence)
            return None
        if msg.subject != approvals_subject(self.options.prefix, event.path):
            log.warning("event %d skipped: its path is not its subject's", sequence)
            return None
        return event

    async def _post(self, event: ApprovalEvent) -> bool:
        body = msgspec.json.encode({"text": event_text(event), "event": event})
        headers = {"Content-Type": "application/json", "User-Agent": "secrets-webhook-notifier"}
        if self.options.secret is not None:
            headers["X-Signature"] = sign(self.options.secret, body)
        try:
            response = await self._http.post(self.options.webhook, content=body, headers=headers)
        except httpx.HTTPError as exc:
            # The type only: httpx's messages hold the URL, whose path may be a credential.
            log.warning("webhook at %s unreachable: %s", self._host, type(exc).__name__)
            return False
        if response.is_success:
            return True
        log.warning("webhook at %s answered %d", self._host, response.status_code)
        return False

    async def _settle(self, how: Callable[[], Awaitable[object]]) -> bool:
        """Ack, nak or term; False (logged) if NATS did not take it: the event comes again."""
        try:
            await how()
        except (NatsError, TimeoutError) as exc:
            log.warning("acknowledgement lost: %s", describe_error(exc))
            return False
        return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.webhook_notifier")
    parser.add_argument("--nats", required=True, help="NATS URL(s), comma-separated")
    parser.add_argument("--prefix", default="secrets", help="subject prefix (SECRETS_NATS_PREFIX)")
    parser.add_argument("--webhook", required=True, help="the URL each event is POSTed to")
    parser.add_argument("--durable", default="webhook-notifier", help="durable consumer name")
    parser.add_argument("--stream", default=APPROVALS_STREAM)
    parser.add_argument("--secret", help="HMAC key for X-Signature (or WEBHOOK_SECRET)")
    parser.add_argument("--max-deliver", type=int, default=10, help="attempts per event")
    parser.add_argument("--retry-delay", type=float, default=1.0, help="first retry, seconds")
    parser.add_argument("--timeout", type=float, default=10.0, help="webhook timeout, seconds")
    parser.add_argument("--deliver-all", action="store_true", help="a new durable starts with "
                        "the oldest event kept, not the next one")  # fmt: skip
    parser.add_argument("--creds", help="NATS credentials file (user JWT and NKEY seed)")
    parser.add_argument("--tls-ca", help="PEM CA bundle the NATS server is checked against")
    parser.add_argument("--tls-cert", help="client certificate (mutual TLS), with --tls-key")
    parser.add_argument("--tls-key")
    parser.add_argument("--tls-hostname", help="the name the server's certificate carries")
    parser.add_argument("--tls-first", action="store_true", help="TLS before NATS's greeting")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # httpx logs each request's URL at INFO, and the webhook's URL may be a credential.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    secret = args.secret or os.environ.get("WEBHOOK_SECRET")
    options = NotifierOptions(
        servers=args.nats.split(","), webhook=args.webhook, prefix=args.prefix,
        durable=args.durable, stream=args.stream, secret=secret.encode() if secret else None,
        max_deliver=args.max_deliver, retry_delay=args.retry_delay, timeout=args.timeout,
        deliver_all=args.deliver_all, credentials=args.creds, tls_ca=args.tls_ca,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_hostname=args.tls_hostname,
        tls_first=args.tls_first,
    )  # fmt: skip
    try:
        asyncio.run(_serve(WebhookNotifier(options)))
    except (ValueError, OSError) as exc:
        print(f"webhook notifier: {exc}", file=sys.stderr)
        return 2
    return 0


async def _serve(notifier: WebhookNotifier) -> None:
    task = asyncio.ensure_future(notifier.run())
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        log.info("stopped: the durable consumer resumes after the last event acknowledged")


if __name__ == "__main__":
    raise SystemExit(main())

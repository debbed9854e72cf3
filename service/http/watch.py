"""`GET /secrets/{prefix}:watch` and `GET /secrets:watch`: Server-Sent Events of every change
the caller may read at or below the prefix, `id` the JetStream sequence (`Last-Event-ID`
resumes), a `: keep-alive` comment every SECRETS_WATCH_HEARTBEAT seconds, and an `end` event
when the token expires, the reader falls behind, or the service stops. Events never carry
values, as on NATS; service.watch.feed does the fan-out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import msgspec
from nats.errors import Error as NatsError
from nats.js.errors import Error as JsError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from schemas.errors import BackendUnavailable, Forbidden, InvalidRequest
from schemas.paths import is_reserved
from service.auth import Policy, Principal
from service.auth.policy import READ
from service.http.access import start_op
from service.settings import Settings
from service.watch.feed import STOP, Frame, Watch, WatchFeed

__all__ = ["watch"]

_MAX_SEQUENCE = 2**63 - 1
_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


async def watch(request: Request, principal: Principal, prefix: str) -> Response:
    # Not `require`: like a listing, a prefix is judged by what could lie below it.
    start_op(request, "watch")
    policy: Policy = request.state.policy
    globs = policy.grants(principal.roles, principal.scopes, READ)
    readable = any(glob.could_match_under(prefix) or glob.matches(prefix) for glob in globs)
    if is_reserved(prefix) or not readable:
        raise Forbidden(path=prefix)
    after = _last_event_id(request.headers.get("last-event-id"))
    feed: WatchFeed = request.state.watch_feed
    if not feed.ready:
        raise BackendUnavailable("the change stream is unavailable; retry shortly")

    def may_read(path: str) -> bool:
        return policy.allows(principal.roles, principal.scopes, READ, path)

    stream = feed.open(principal.subject, prefix, may_read)
    settings: Settings = request.app.state.settings
    body = _events(feed, stream, after, principal.expires_at, settings.watch_heartbeat)
    return StreamingResponse(body, media_type="text/event-stream", headers=_HEADERS)


async def _events(
    feed: WatchFeed, stream: Watch, after: int | None, expires_at: float, heartbeat: float
) -> AsyncIterator[bytes]:
    try:
        yield b"retry: 1000\n\n"
        sent = 0
        if after is None:
            # A resume point from the first byte: a client that reconnects before any event
            # came resumes from here rather than starting over.
            yield b"id: %d\n\n" % await feed.last_sequence()
        else:
            try:
                async for item in feed.replay(stream, after):
                    if isinstance(item, int):
                        yield _control("reset", {"reason": "history_gone", "first_sequence": item})
                        continue
                    yield _frame(item)
            except (BackendUnavailable, NatsError, JsError):
                yield _control("end", {"reason": "unavailable"})
                return
            sent = stream.floor
        while True:
            if stream.overflowed.is_set() and stream.queue.empty():
                yield _control("end", {"reason": "overflow"})
                return
            left = expires_at - time.time()
            if left <= 0:
                yield _control("end", {"reason": "token_expired"})
                return
            try:
                # asyncio.timeout, not wait_for: no task per event (measured in the profile).
                async with asyncio.timeout(min(heartbeat, left)):
                    frame = await stream.queue.get()
            except TimeoutError:
                if not stream.overflowed.is_set():
                    yield b": keep-alive\n\n"
                continue
            if frame is STOP:
                yield _control("end", {"reason": stream.end_reason})
                return
            if frame[0] <= sent:
                continue  # replayed already
            sent = frame[0]
            yield _frame(frame)
    except asyncio.CancelledError:
        raise  # the client went away, or the service stops
    finally:
        feed.close(stream)


def _frame(frame: Frame) -> bytes:
    sequence, kind, data = frame
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (sequence, kind.encode(), data)


def _control(kind: str, body: dict[str, object]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), msgspec.json.encode(body))


def _last_event_id(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > _MAX_SEQUENCE:
        raise InvalidRequest("Last-Event-ID must be a stream sequence (digits)")
    return int(raw)

"""secrets_client/stream.py without I/O: what a watch session sends, what each server-sent event
becomes (a change with its sequence, a reset, an end), and the reconnection delays and give-ups."""

from __future__ import annotations

import json

import pytest

from events.listener import Change, UnknownChange
from schemas.events import SecretDeleted, SecretUpdated
from secrets_client import ClientError
from secrets_client.stream import Backoff, StreamEnd, StreamReset, WatchSession


def change(
    sequence: int, path: str = "app/db", type: str = "secret.updated", **extra: object
) -> str:
    event = {
        "event_id": f"e{sequence}",
        "type": type,
        "path": path,
        "version": sequence,
        "actor": "alice",
        "instance_id": "i1",
        "time": "2025-01-01T00:00:00Z",
        **extra,
    }
    return f"id: {sequence}\nevent: {type}\ndata: {json.dumps(event)}\n\n"


def opened(prefix: str = "", after: int | None = None) -> WatchSession:
    session = WatchSession(prefix, after=after)
    session.open("text/event-stream; charset=utf-8")
    return session


def test_the_url_names_the_prefix_and_the_first_request_has_no_last_event_id() -> None:
    assert WatchSession().url == "/secrets:watch"
    session = WatchSession("app/db.main")
    assert session.url == "/secrets/app/db.main:watch"
    assert session.headers() == {"Accept": "text/event-stream", "Cache-Control": "no-store"}
    assert WatchSession(after=41).headers()["Last-Event-ID"] == "41"


@pytest.mark.parametrize("prefix", ["app/../db", "app/", "app:watch", "/app"])
def test_a_bad_prefix_is_refused_before_any_request(prefix: str) -> None:
    with pytest.raises(ClientError) as raised:
        WatchSession(prefix)
    assert raised.value.error == "invalid_path"


def test_changes_arrive_typed_with_their_sequence_and_move_the_resume_point() -> None:
    session = opened()
    text = "retry: 1000\n\n" + change(5) + ": keep-alive\n\n"
    text += change(6, type="secret.deleted", versions=[6])
    items = session.feed(text.encode())
    assert [type(i.event) for i in items if isinstance(i, Change)] == [
        SecretUpdated,
        SecretDeleted,
    ]
    assert [i.sequence for i in items if isinstance(i, Change)] == [5, 6]
    assert session.headers()["Last-Event-ID"] == "6"


def test_a_change_at_or_before_the_resume_point_is_not_delivered_twice() -> None:
    session = opened(after=6)
    items = session.feed((change(5) + change(6) + change(7)).encode())
    assert [i.sequence for i in items if isinstance(i, Change)] == [7]


def test_an_unknown_type_arrives_as_unknown_change() -> None:
    [item] = opened().feed(change(3, type="secret.tagged").encode())
    assert isinstance(item, Change) and isinstance(item.event, UnknownChange)
    assert (item.type, item.path, item.known) == ("secret.tagged", "app/db", False)


def test_reset_and_end_become_their_items_and_a_reset_resumes_from_the_oldest_kept() -> None:
    session = opened(after=3)
    text = 'event: reset\ndata: {"reason": "history_gone", "first_sequence": 50}\n\n'
    text += 'event: end\ndata: {"reason": "token_expired"}\n\n'
    assert session.feed(text.encode()) == [
        StreamReset("history_gone", 50),
        StreamEnd("token_expired"),
    ]
    assert session.headers()["Last-Event-ID"] == "49"


def test_an_id_sent_without_data_is_a_resume_point() -> None:
    session = opened()
    assert session.feed(b"retry: 1000\nid: 77\n\n") == []
    assert session.headers()["Last-Event-ID"] == "77"


@pytest.mark.parametrize(
    "text",
    [
        "id: 1\ndata: not json\n\n",
        'id: 1\ndata: {"type": "secret.updated", "path": "app/db"}\n\n',  # known, fields missing
        'id: x\ndata: {"type": "secret.tagged", "path": "app/db"}\n\n',
        'data: {"type": "secret.tagged", "path": "app/db"}\n\n',  # no id at all
        "event: reset\ndata: []\n\n",
    ],
)
def test_an_event_that_breaks_the_wire_format_raises_invalid_stream(text: str) -> None:
    with pytest.raises(ClientError) as raised:
        opened().feed(text.encode())
    assert raised.value.error == "invalid_stream"


@pytest.mark.parametrize("content_type", [None, "application/json", "text/html"])
def test_an_answer_that_is_not_an_event_stream_raises_invalid_stream(
    content_type: str | None,
) -> None:
    with pytest.raises(ClientError) as raised:
        WatchSession().open(content_type)
    assert raised.value.error == "invalid_stream"


# -- Backoff -------------------------------------------------------------------------------


def unreachable() -> ClientError:
    return ClientError("unreachable", "cannot reach")


def refusal(status: int, retry_after: float | None = None) -> ClientError:
    error = ClientError("refused", "no", status=status)
    error.retry_after = retry_after
    return error


def test_delays_double_from_a_tenth_of_a_second_up_to_five_and_start_over_once_connected() -> None:
    backoff = Backoff(persistent=True)
    delays = [backoff.after_failure(unreachable()) for _ in range(9)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    backoff.connected()
    assert backoff.after_failure(unreachable()) == 0.1


def test_an_expired_token_is_replaced_at_once_then_with_backoff() -> None:
    backoff = Backoff(persistent=True)
    backoff.connected()
    assert backoff.after_end("token_expired") == 0.0
    assert backoff.after_failure(refusal(401)) == 0.0
    assert backoff.after_failure(refusal(401)) == 0.1


def test_a_429_waits_its_retry_after_within_a_minute() -> None:
    backoff = Backoff(persistent=True)
    assert backoff.after_failure(refusal(429, retry_after=7)) == 7
    assert backoff.after_failure(refusal(429, retry_after=3600)) == 60


def test_a_persistent_stream_never_gives_up() -> None:
    backoff = Backoff(persistent=True)
    for status in (400, 401, 401, 403, 404, 503):
        assert backoff.after_failure(refusal(status)) >= 0


def test_a_watch_raises_its_first_connections_failure() -> None:
    with pytest.raises(ClientError):
        Backoff(persistent=False).after_failure(unreachable())


@pytest.mark.parametrize("status", [400, 403, 404])
def test_a_watch_gives_up_on_a_refusal_that_another_attempt_cannot_change(status: int) -> None:
    backoff = Backoff(persistent=False)
    backoff.connected()
    assert backoff.after_failure(unreachable()) == 0.1
    assert backoff.after_failure(refusal(503)) == 0.2
    with pytest.raises(ClientError):
        backoff.after_failure(refusal(status))


def test_a_watch_gives_up_on_a_second_401_in_a_row() -> None:
    backoff = Backoff(persistent=False)
    backoff.connected()
    assert backoff.after_failure(refusal(401)) == 0.0
    with pytest.raises(ClientError):
        backoff.after_failure(refusal(401))

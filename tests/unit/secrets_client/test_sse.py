"""secrets_client/sse.py: the event stream interpretation of the WHATWG HTML standard (its own
examples first), line ends split across chunks, and the bounds a hostile stream runs into."""

from __future__ import annotations

import pytest

from secrets_client import ClientError
from secrets_client.sse import ServerSentEvent, SSEDecoder


def decode(text: bytes | str, *, chunk: int | None = None, **limits: int) -> list[ServerSentEvent]:
    """All the events of `text`, fed whole or `chunk` bytes at a time."""
    raw = text.encode() if isinstance(text, str) else text
    decoder = SSEDecoder(**limits)
    size = chunk or max(len(raw), 1)
    events: list[ServerSentEvent] = []
    for start in range(0, len(raw), size):
        events += decoder.feed(raw[start : start + size])
    return events


def pairs(events: list[ServerSentEvent]) -> list[tuple[str, str, str]]:
    return [(e.event, e.data, e.id) for e in events]


# -- the standard's examples ---------------------------------------------------------------


def test_data_lines_of_one_event_are_joined_with_newlines() -> None:
    events = decode("data: YHOO\ndata: +2\ndata: 10\n\n")
    assert pairs(events) == [("message", "YHOO\n+2\n10", "")]


def test_an_id_persists_until_changed_and_an_empty_id_clears_it() -> None:
    text = ": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\n"
    text += "data:  third event\n\ndata: fourth event\n\n"
    assert pairs(decode(text)) == [
        ("message", "first event", "1"),
        ("message", "second event", ""),
        ("message", " third event", ""),  # only one space after the colon is dropped
        ("message", "fourth event", ""),
    ]


def test_a_field_alone_has_the_empty_value_and_an_unfinished_last_event_is_dropped() -> None:
    events = decode("data\n\ndata\ndata\n\ndata:")
    assert [e.data for e in events] == ["", "\n"]


def test_a_space_after_the_colon_is_optional() -> None:
    assert [e.data for e in decode("data:test\n\ndata: test\n\n")] == ["test", "test"]


def test_event_names_the_type_and_resets_after_each_event() -> None:
    events = decode("event: secret.updated\ndata: {}\n\ndata: x\n\nevent\ndata: y\n\n")
    assert [e.event for e in events] == ["secret.updated", "message", "message"]


def test_comments_unknown_fields_and_events_without_data_dispatch_nothing() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b": keep-alive\n\nfoo: bar\n\nretry: 1000\n\nid: 7\n\n") == []
    assert (decoder.retry, decoder.last_event_id) == (1000, "7")  # both still count


def test_retry_takes_digits_only_and_an_id_holding_nul_is_ignored() -> None:
    [event] = decode("retry: 10x\nretry: -5\nid: 3\nid: 4\x005\ndata: d\n\n")
    assert (event.retry, event.id) == (None, "3")


def test_an_id_counts_only_once_its_event_has_ended() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"id: 1\ndata: a\n\nid: 2\ndata: b\n")
    assert decoder.last_event_id == "1"  # event 2 may yet be cut off: do not resume after it
    assert [e.id for e in decoder.feed(b"\n")] == ["2"]


# -- line ends and encoding ---------------------------------------------------------------


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
def test_lf_crlf_and_cr_all_end_lines(end: str) -> None:
    text = f"id: 1{end}event: e{end}data: a{end}data: b{end}{end}"
    assert pairs(decode(text)) == [("e", "a\nb", "1")]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7])
def test_any_chunking_gives_the_same_events_a_crlf_split_in_two_included(chunk: int) -> None:
    text = "\ufeffid: 9\r\nevent: x\r\ndata: é\r\ndata: 2\r\n\r\n: c\r\ndata: z\r\r"
    expected = [("x", "é\n2", "9"), ("message", "z", "9")]
    assert pairs(decode(text, chunk=chunk)) == expected


def test_a_bom_is_skipped_only_at_the_start_of_the_stream() -> None:
    events = decode(b"\xef\xbb\xbfdata: a\n\n\xef\xbb\xbfdata: b\n\n")
    assert [e.data for e in events] == ["a"]  # the second line's field is "\ufeffdata": unknown


def test_invalid_utf8_becomes_the_replacement_character() -> None:
    [event] = decode(b"data: \xff\xfe ok\n\n")
    assert event.data == "\ufffd\ufffd ok"


# -- hostile streams -----------------------------------------------------------------------


def test_a_line_over_the_bound_raises_invalid_stream_even_fed_in_small_pieces() -> None:
    decoder = SSEDecoder(max_line=1000)
    with pytest.raises(ClientError) as raised:
        for _ in range(200):
            decoder.feed(b"data: " + b"x" * 10)
    assert raised.value.error == "invalid_stream"
    assert "1000" in raised.value.detail


def test_a_complete_line_over_the_bound_raises_invalid_stream() -> None:
    with pytest.raises(ClientError) as raised:
        decode(b": " + b"x" * 2000 + b"\n", max_line=1000)
    assert raised.value.error == "invalid_stream"


def test_an_event_whose_data_lines_add_up_over_the_bound_raises_invalid_stream() -> None:
    line = b"data: " + b"x" * 90 + b"\n"
    with pytest.raises(ClientError) as raised:
        decode(line * 20, max_line=1000, max_event=1000)
    assert raised.value.error == "invalid_stream"


def test_endless_comments_and_dispatched_events_hold_no_memory() -> None:
    decoder = SSEDecoder(max_line=100, max_event=100)
    for _ in range(10_000):
        decoder.feed(b": keep-alive\n\ndata: small\n\n")
    assert len(decoder._buffer) == 0 and decoder._data == []


def test_a_line_within_the_bound_decodes() -> None:
    [event] = decode(b"data: " + b"x" * 994 + b"\n\n", max_line=1000)
    assert len(event.data) == 994

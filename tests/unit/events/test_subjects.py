"""NATS subject encoding of paths, its inverse, and subscription patterns from policy globs."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from events.subjects import (
    changed_subject,
    decode_path,
    encode_path,
    path_from_subject,
    pattern_subject,
)
from schemas.errors import InvalidPath
from schemas.paths import MAX_SEGMENTS, is_valid_path

SEGMENT_ALPHABET = string.ascii_letters + string.digits + "_.-"

segments = st.text(alphabet=SEGMENT_ALPHABET, min_size=1, max_size=12)
# Dots are drawn often, so that ".", ".." and "a.b" segments all turn up.
dotty_segments = st.text(alphabet="a.-_", min_size=1, max_size=4)
valid_paths = (
    st.lists(st.one_of(segments, dotty_segments), min_size=1, max_size=MAX_SEGMENTS)
    .map("/".join)
    .filter(is_valid_path)
)


@given(valid_paths)
def test_decoding_an_encoded_path_gives_the_path_back(path: str) -> None:
    assert decode_path(encode_path(path)) == path


@given(valid_paths)
def test_an_encoded_path_is_one_safe_token_per_segment(path: str) -> None:
    encoded = encode_path(path)
    assert not any(char in encoded for char in "*>" + string.whitespace)
    tokens = encoded.split(".")
    assert len(tokens) == path.count("/") + 1
    assert all(tokens)


@given(valid_paths)
def test_a_change_subject_round_trips_through_its_path(path: str) -> None:
    assert path_from_subject("secrets", changed_subject("secrets", path)) == path


@pytest.mark.parametrize(
    ("path", "encoded"),
    [
        ("app", "app"),
        ("app/db", "app.db"),
        ("app/db.main", "app.db%2Emain"),
        ("app/db.main/password", "app.db%2Emain.password"),
        ("a/.../b", "a.%2E%2E%2E.b"),
        ("A-1/_x", "A-1._x"),
    ],
)
def test_a_path_encodes_with_dots_between_segments_and_escaped_within(
    path: str, encoded: str
) -> None:
    assert encode_path(path) == encoded
    assert decode_path(encoded) == path


@pytest.mark.parametrize("path", ["", "app/../x", "app//x", "/app", "app/d b", "app/*", "app/>"])
def test_encoding_an_invalid_path_raises_invalid_path(path: str) -> None:
    with pytest.raises(InvalidPath):
        encode_path(path)


@pytest.mark.parametrize(
    "tokens",
    [
        "",
        "app..db",
        ".app",
        "app.",
        "app.*",
        "app.>",
        "app.d b",
        "app.%2E%2E",  # decodes to a ".." segment
        "app.%2e",  # lowercase hex is not canonical
        "app.%41",  # "A" needs no escape: not canonical
        "app.%2Fx",  # an escaped "/" would smuggle in a segment
        "app.%25",  # "%" is not in the path alphabet
        "app.%",
        "app.%2",
        "app.%ZZ",
        "app.db:versions",
    ],
)
def test_decoding_anything_encode_path_would_not_produce_raises_value_error(tokens: str) -> None:
    with pytest.raises(ValueError):
        decode_path(tokens)


def test_a_change_subject_is_prefix_changed_and_the_encoded_path() -> None:
    assert changed_subject("secrets", "app/db.main") == "secrets.changed.app.db%2Emain"
    assert changed_subject("acme.secrets", "app/db") == "acme.secrets.changed.app.db"


def test_the_path_is_read_back_from_a_change_subject() -> None:
    assert path_from_subject("secrets", "secrets.changed.app.db%2Emain") == "app/db.main"
    assert path_from_subject("acme.secrets", "acme.secrets.changed.app") == "app"


@pytest.mark.parametrize(
    "subject",
    ["other.changed.app", "secrets.deleted.app", "secrets.changed.", "secrets.changed", "secrets"],
)
def test_a_subject_that_is_not_a_change_under_the_prefix_raises_value_error(subject: str) -> None:
    with pytest.raises(ValueError):
        path_from_subject("secrets", subject)


@pytest.mark.parametrize("prefix", ["", "a..b", ".a", "a.", "se*", "se>", "se crets"])
def test_a_prefix_with_empty_tokens_wildcards_or_spaces_raises_value_error(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        changed_subject(prefix, "app")


@pytest.mark.parametrize(
    ("glob", "subject"),
    [
        ("app/**", "secrets.changed.app.>"),
        ("app/*/db", "secrets.changed.app.*.db"),
        ("app/*", "secrets.changed.app.*"),
        ("**", "secrets.changed.>"),
        ("*/db.main", "secrets.changed.*.db%2Emain"),
        ("app/db", "secrets.changed.app.db"),
    ],
)
def test_a_policy_glob_becomes_a_nats_wildcard_subject(glob: str, subject: str) -> None:
    assert pattern_subject("secrets", glob) == subject


@pytest.mark.parametrize("glob", ["**/db", "app/**/db"])
def test_a_double_star_before_the_end_cannot_be_a_subscription(glob: str) -> None:
    with pytest.raises(ValueError, match="last segment"):
        pattern_subject("secrets", glob)


def test_a_star_inside_a_segment_cannot_be_a_subscription() -> None:
    with pytest.raises(ValueError, match="inside a segment"):
        pattern_subject("secrets", "app/db-*")


@pytest.mark.parametrize("glob", ["", "app//x", "app/../x", "app/**/**"])
def test_an_invalid_glob_cannot_be_a_subscription(glob: str) -> None:
    with pytest.raises(ValueError):
        pattern_subject("secrets", glob)

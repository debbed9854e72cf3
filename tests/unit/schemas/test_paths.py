"""The path rule every route applies before any backend call, and custom-method splitting."""

from __future__ import annotations

import pytest

from schemas.errors import InvalidPath
from schemas.paths import (
    MAX_PATH_LENGTH,
    MAX_SEGMENTS,
    is_valid_path,
    split_custom_method,
    validate_path,
    validate_prefix,
)

VALID = [
    "a",
    "app/db",
    "app/db/password",
    "APP_1/db-main/pass.word",
    "app/.hidden",
    "app/trailing.",
    "app/.../x",
    "a" * MAX_PATH_LENGTH,
    "/".join(["s"] * MAX_SEGMENTS),
]

INVALID = {
    "empty": "",
    "traversal": "app/../admin",
    "leading traversal": "../etc/passwd",
    "trailing traversal": "app/..",
    "lone dot-dot": "..",
    "dot segment": "app/./db",
    "lone dot": ".",
    "dot then segment": "./x",
    "leading slash": "/app/db",
    "trailing slash": "app/db/",
    "double slash": "app//db",
    "lone slash": "/",
    "513 characters": "a" * (MAX_PATH_LENGTH + 1),
    "17 segments": "/".join(["s"] * (MAX_SEGMENTS + 1)),
    "10,000 characters": "a" * 10_000,
    "NUL": "app/db\x00",
    "NUL inside": "app\x00/db",
    "fullwidth letters": "\uff41\uff50\uff50/db",
    "cyrillic a": "\u0430pp/db",
    "percent-encoded traversal": "%2e%2e/admin",
    "percent sign": "app/db%20x",
    "tomcat path parameter": "..;/admin",
    "semicolon": "app;x/db",
    "space": "app/my db",
    "tab": "app/\tdb",
    "trailing newline": "app/db\n",
    "backslash": "app\\db",
    "backslash traversal": "..\\admin",
    "colon": "app/db:versions",
    "query": "app/db?x=1",
    "fragment": "app/db#x",
    "tilde": "~/db",
    "unicode slash": "app\u2215db",
    "non-breaking space": "app/\u00a0db",
}


@pytest.mark.parametrize("path", VALID)
def test_a_valid_path_is_returned_unchanged(path: str) -> None:
    assert validate_path(path) is path
    assert is_valid_path(path)


@pytest.mark.parametrize("path", INVALID.values(), ids=INVALID.keys())
def test_an_invalid_path_raises_invalid_path(path: str) -> None:
    with pytest.raises(InvalidPath):
        validate_path(path)
    assert not is_valid_path(path)


INVALID_PREFIXES = {name: path for name, path in INVALID.items() if path != ""}


@pytest.mark.parametrize("path", INVALID_PREFIXES.values(), ids=INVALID_PREFIXES.keys())
def test_an_invalid_path_is_refused_as_a_prefix_too(path: str) -> None:
    with pytest.raises(InvalidPath):
        validate_prefix(path)


@pytest.mark.parametrize("path", INVALID.values(), ids=INVALID.keys())
def test_an_invalid_path_error_never_echoes_the_input(path: str) -> None:
    with pytest.raises(InvalidPath) as caught:
        validate_path(path)
    detail = caught.value.detail
    assert len(detail) < 100
    assert caught.value.path is None
    if len(path) > 3:
        assert path not in detail


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("", "empty"),
        ("a" * 10_000, "512 characters"),
        ("/app", "start or end"),
        ("app/", "start or end"),
        ("app//db", "empty segment"),
        ("/".join(["s"] * 17), "16 segments"),
        ("app/../db", "'..'"),
        ("app/d b", "ASCII letters"),
    ],
)
def test_an_invalid_path_error_names_the_rule_broken(path: str, words: str) -> None:
    with pytest.raises(InvalidPath, match=words):
        validate_path(path)


def test_the_error_is_a_400_invalid_path() -> None:
    with pytest.raises(InvalidPath) as caught:
        validate_path("..")
    assert (caught.value.status, caught.value.code) == (400, "invalid_path")


def test_the_empty_prefix_means_the_top_of_the_tree() -> None:
    assert validate_prefix("") == ""


def test_a_valid_prefix_is_returned_unchanged() -> None:
    assert validate_prefix("app/db") == "app/db"


def test_a_path_without_a_colon_has_no_custom_method() -> None:
    assert split_custom_method("app/db") == ("app/db", None)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("app/db:versions", ("app/db", "versions")),
        ("app/db:rollback", ("app/db", "rollback")),
        ("a:x", ("a", "x")),
    ],
)
def test_a_custom_method_is_split_off_the_path(raw: str, expected: tuple[str, str]) -> None:
    assert split_custom_method(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "app/db:",
        "app/db:Versions",
        "app/db:ver-sions",
        "app/db:v1",
        "app/db:versions/x",
        "app/db:ver sions",
        "app/db:versi\u043ens",
    ],
)
def test_a_custom_method_must_be_lowercase_letters(raw: str) -> None:
    with pytest.raises(InvalidPath, match="lowercase"):
        split_custom_method(raw)


@pytest.mark.parametrize("raw", ["app/db:versions:x", "app:db:versions", "::", "a::b"])
def test_more_than_one_colon_is_an_invalid_path(raw: str) -> None:
    with pytest.raises(InvalidPath, match="at most one ':'"):
        split_custom_method(raw)


def test_splitting_leaves_the_path_part_for_validate_path_to_judge() -> None:
    path, verb = split_custom_method("../x:versions")
    assert verb == "versions"
    with pytest.raises(InvalidPath):
        validate_path(path)

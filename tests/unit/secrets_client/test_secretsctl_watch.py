"""`secretsctl watch` without a service: what a pattern watches (the prefix asked of the service,
the glob filtered here) and the refusals made before any request. Against the real stack:
tests/integration/test_secretsctl.py."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from devstack import free_port
from secrets_client import secretsctl


@pytest.fixture(autouse=True)
def root_logger_restored() -> Iterator[None]:
    # `watch` sends log records to its stderr as JSON lines, through the root logger.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.parametrize(
    ("pattern", "prefix", "matches", "misses"),
    [
        ("", "", None, None),
        ("app", "app", None, None),
        ("app/db", "app/db", None, None),
        ("**", "", "x/y", None),
        ("app/**", "app", "app/x/y", "app"),
        ("app/*/db", "app", "app/x/db", "app/x/y"),
        ("app/db-*", "app", "app/db-main", "app/api"),
    ],
)
def test_a_pattern_is_watched_from_its_literal_start_and_a_glob_filtered_here(
    pattern: str, prefix: str, matches: str | None, misses: str | None
) -> None:
    watched, glob = secretsctl._watch_scope(pattern)
    assert watched == prefix
    if matches is None:
        assert glob is None  # a prefix: the service sends exactly what lies at or below it
    else:
        assert glob is not None and glob.matches(matches)
        assert misses is None or not glob.matches(misses)


@pytest.mark.parametrize(
    ("argv", "environ", "code", "error"),
    [
        (["watch"], {}, 6, "missing_token"),
        (["watch", "app/**/**"], {"SECRETS_TOKEN": "t"}, 7, "invalid_request"),
        (["watch", "app/../db"], {"SECRETS_TOKEN": "t"}, 7, "invalid_path"),
    ],
)
def test_watch_refuses_before_any_request(
    argv: list[str], environ: dict[str, str], code: int, error: str
) -> None:
    # Nobody listens on the port: a request would exit 8 (unreachable).
    stderr = io.StringIO()
    environ = {**environ, "SECRETS_URL": f"http://127.0.0.1:{free_port()}"}
    assert secretsctl.run(argv, environ, stderr=stderr) == code
    assert json.loads(stderr.getvalue().splitlines()[-1])["error"] == error


def test_the_help_names_no_nats_setting_any_more() -> None:
    text = secretsctl._parser().format_help()
    assert "SECRETS_TOKEN" in text and "NATS" not in text.replace("NATS unavailable", "")

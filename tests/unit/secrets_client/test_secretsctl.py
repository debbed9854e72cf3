"""secrets_client/secretsctl.py: the console script, and the JSON lines `watch` logs. The
command run against the real stack: tests/integration/test_secretsctl.py."""

from __future__ import annotations

import io
import json
import logging
from importlib.metadata import entry_points

from secrets_client import secretsctl


def test_secretsctl_is_an_installed_console_script() -> None:
    [script] = entry_points(group="console_scripts", name="secretsctl")
    assert script.value == "secrets_client.secretsctl:main"


def test_watch_log_lines_carry_the_listeners_fields_and_never_an_exceptions_text() -> None:
    stream = io.StringIO()
    secretsctl._log_json_lines(stream)
    try:
        log = logging.getLogger("secrets.listener")
        log.warning("start sequence expired", extra={"start_sequence": 3, "first_sequence": 9})
        try:
            raise ConnectionError("nats://user:hunter2@nats:4222 refused")
        except ConnectionError:
            log.warning("NATS error", exc_info=True)
    finally:
        logging.getLogger().handlers.clear()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first == {
        "level": "WARNING",
        "logger": "secrets.listener",
        "message": "start sequence expired",
        "start_sequence": 3,
        "first_sequence": 9,
    }
    assert second["exc_type"] == "ConnectionError"
    assert "hunter2" not in stream.getvalue()

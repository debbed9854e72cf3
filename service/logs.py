"""Structured logging: one JSON object per line, with the request's context attached.

Each line has `time`, `level`, `logger` and `message`; inside a request also `request_id` and
whatever the routes learnt (`actor`, `client_id`, `path`, `op`, `version`, `reason`); the
per-request line adds `method`, `status`, `outcome` and `duration_ms`.

Values are kept out by construction: they travel as SecretData, which prints as
'**redacted**'. Behind that, the formatter is a second line of defence: it drops fields whose
names suggest a value or a credential, renders only plain scalars (anything else becomes its type
name, so no container's repr can carry a value out), and gives an exception's type, never its
message, since messages from dependencies may quote what they were given.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from datetime import UTC, datetime
from typing import Any

import msgspec

__all__ = ["JsonFormatter", "configure_logging", "request_context"]

request_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "request_context", default=None
)

_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_FORBIDDEN = frozenset(
    {
        "data", "value", "values", "secret", "token", "password", "body", "authorization",
        "headers", "claims", "credentials", "jwt", "payload",
    }
)  # fmt: skip
_encode = msgspec.json.Encoder().encode


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ctx = request_context.get()
        if ctx:
            for key, value in ctx.items():
                _put(out, key, value)
        for key, value in record.__dict__.items():
            if key in _STANDARD or key.startswith("_"):
                continue
            _put(out, key, value)
        if record.exc_info and record.exc_info[0] is not None:
            # The type only: exception messages from dependencies are not ours to trust.
            out["exc_type"] = record.exc_info[0].__name__
        return _encode(out).decode()


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    if key.lower() in _FORBIDDEN:
        return
    if value is None or isinstance(value, str | int | float | bool):
        out[key] = value
    else:
        out[key] = f"<{type(value).__name__}>"


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True

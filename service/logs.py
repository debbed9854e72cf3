"""Structured logging: one JSON object per line, with the request's context attached.

Values are kept out by construction (SecretData prints as '**redacted**'); the formatter
also refuses fields whose names suggest a value, as a second line of defence.
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
_FORBIDDEN = frozenset({"data", "value", "secret", "token", "password", "body", "authorization"})
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
            out.update(ctx)
        for key, value in record.__dict__.items():
            if key in _STANDARD or key.startswith("_"):
                continue
            if key.lower() in _FORBIDDEN:
                out[key] = "**redacted**"
            elif value is None or isinstance(value, str | int | float | bool):
                out[key] = value
            else:
                out[key] = str(value)
        if record.exc_info and record.exc_info[0] is not None:
            # The type only: exception messages from dependencies are not ours to trust.
            out["exc_type"] = record.exc_info[0].__name__
        return _encode(out).decode()


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

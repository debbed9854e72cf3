"""Where audit lines land on this host: `LineSink`, JSON lines appended to a file (created 0600)
or written to stdout, one whole line per write, from the event loop or a worker thread."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import threading
from typing import BinaryIO

from schemas.errors import ConfigError

__all__ = ["LineSink"]


class LineSink:
    """JSON lines to a binary stream, flushed after each write. One write at a time: a line is
    never split by another write, whichever thread makes it.

    Without a stream it writes to whatever `sys.stdout` is at the time.
    """

    def __init__(self, stream: BinaryIO | None, name: str, *, owned: bool = False) -> None:
        self.stream = stream
        self.name = name  # "stdout" or "file": a metric label
        self._owned = owned
        self._lock = threading.Lock()
        self._regular = _is_regular(stream) if stream is not None else None

    @classmethod
    def open(cls, spec: str) -> LineSink | None:
        """`stdout`, `file:<path>` (appended to, created 0600) or `none` (None)."""
        if spec == "none":
            return None
        if spec == "stdout":
            return cls(None, "stdout")
        path = spec.removeprefix("file:")
        try:
            fd = _open_append(path)
        except OSError as exc:
            raise ConfigError(
                "SECRETS_AUDIT_SINK", f"cannot open {path!r}: {exc.strerror}"
            ) from None
        return cls(fd, "file", owned=True)

    def write(self, data: bytes) -> None:
        with self._lock:
            self._write(data)

    def try_write_now(self, data: bytes) -> bool:
        """Write `data` if that cannot block: the stream is a regular file and no other write is
        under way (a batch from the worker thread). True once written, False if not tried;
        raises as `write` does."""
        regular = self._regular if self._regular is not None else _is_regular(None)
        if not regular or not self._lock.acquire(blocking=False):
            return False
        try:
            self._write(data)
        finally:
            self._lock.release()
        return True

    def _write(self, data: bytes) -> None:
        stream = self.stream if self.stream is not None else sys.stdout.buffer
        stream.write(data)
        stream.flush()

    def close(self) -> None:
        if self._owned and self.stream is not None:
            with contextlib.suppress(OSError):
                self.stream.close()


def _open_append(path: str) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    return os.fdopen(fd, "ab")


def _is_regular(stream: BinaryIO | None) -> bool:
    """Whether `stream` (None: stdout as it is now) is a regular file: a write to it never
    waits for a reader."""
    try:
        fd = (stream if stream is not None else sys.stdout.buffer).fileno()
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except (OSError, ValueError, AttributeError):  # no descriptor (io.UnsupportedOperation)
        return False

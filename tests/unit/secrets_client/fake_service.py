"""A tiny HTTP server on a loopback port speaking the part of the API the clients' caches use:
`GET` and `PATCH /secrets/{path}`, and the watch stream, whose events, cuts and refusals the test
drives. Threaded, so the blocking client (from the test's thread) and the async one (from the
test's loop) reach it over real sockets alike."""

from __future__ import annotations

import json
import queue
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeService", "wait_until"]

_SECRET = re.compile(r"/secrets/(?P<path>[^:?]+)(?:\?.*)?$")
_WATCH = re.compile(r"/secrets(?:/(?P<prefix>[^:]+))?:watch$")


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `condition` until it holds; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition still false after {timeout} s")
        time.sleep(0.005)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-answer: nothing to report


class _Stream:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.frames: queue.Queue[bytes | None] = queue.Queue()

    def wants(self, path: str) -> bool:
        return not self.prefix or path == self.prefix or path.startswith(self.prefix + "/")


class FakeService:
    """`secrets`: path -> (version, data). Writes (by the API or `write`) are told on every
    open stream matching them, and kept in `history` so that `Last-Event-ID` resumes.

    What the test looks at: `reads` (paths read), `watch_headers` (each watch request's
    headers), `tokens` (each request's bearer token). What it sets: `refused_tokens` (401),
    `watch_status` (a refusal status for watch requests instead of a stream), `stale_reads`
    (reads answered with the previous version, as an instance whose cache lags).
    """

    def __init__(self) -> None:
        self.secrets: dict[str, tuple[int, dict[str, Any]]] = {}
        self.history: list[tuple[int, str, bytes]] = []  # (sequence, path, frame)
        self.reads: list[str] = []
        self.watch_headers: list[dict[str, str]] = []
        self.tokens: list[str] = []
        self.refused_tokens: set[str] = set()
        self.watch_status: int | None = None
        self.stale_reads = 0  # reads to answer with the version before the current one
        self.streams: list[_Stream] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.server = _Server(("127.0.0.1", 0), _handler(self))
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,))

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeService:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.cut()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    # -- what the test drives -------------------------------------------------------------

    def write(self, path: str, data: dict[str, Any]) -> int:
        """A new version of `path`, as another instance would write it: its event is sent."""
        with self.lock:
            version = self.secrets.get(path, (0, {}))[0] + 1
            self.secrets[path] = (version, data)
            kind = "secret.created" if version == 1 else "secret.updated"
            self._announce(path, kind, version)
        return version

    def send(self, raw: bytes) -> None:
        """Raw bytes to every open stream (a reset, an end, something broken)."""
        with self.lock:
            for stream in self.streams:
                stream.frames.put(raw)

    def cut(self) -> None:
        """Every open stream ends at once, without an `end` event (a lost connection)."""
        with self.lock:
            for stream in self.streams:
                stream.frames.put(None)
            self.streams.clear()

    def live(self) -> int:
        with self.lock:
            return len(self.streams)

    # -- inside ---------------------------------------------------------------------------

    def _announce(self, path: str, kind: str, version: int) -> None:
        sequence = len(self.history) + 1
        event = {
            "event_id": f"e{sequence}",
            "type": kind,
            "path": path,
            "version": version,
            "actor": "writer",
            "instance_id": "fake",
            "time": "2025-01-01T00:00:00Z",
        }
        frame = f"id: {sequence}\nevent: {kind}\ndata: {json.dumps(event)}\n\n".encode()
        self.history.append((sequence, path, frame))
        for stream in self.streams:
            if stream.wants(path):
                stream.frames.put(frame)


def _handler(service: FakeService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet

        def _json(self, status: int, body: Any) -> None:
            content = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def _token(self) -> str | None:
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            with service.lock:
                service.tokens.append(token)
            if token in service.refused_tokens:
                self._json(401, {"error": "unauthenticated", "detail": "token expired"})
                return None
            return token

        def do_GET(self) -> None:
            if self._token() is None:
                return
            watch = _WATCH.match(self.path)
            if watch:
                self._watch(watch.group("prefix") or "")
                return
            found = _SECRET.match(self.path)
            assert found, self.path
            path = found.group("path")
            with service.lock:
                service.reads.append(path)
                stored = service.secrets.get(path)
                stale = service.stale_reads > 0
                service.stale_reads -= stale
            if stored is None:
                self._json(404, {"error": "not_found", "detail": "no such secret"})
                return
            version, data = stored
            if stale:  # as an instance that has not heard of the last change yet
                version, data = version - 1, {"stale": True}
            body = {"path": path, "version": version, "data": data, "created_time": "t"}
            self._json(200, body)

        def do_PATCH(self) -> None:
            if self._token() is None:
                return
            found = _SECRET.match(self.path)
            assert found, self.path
            path = found.group("path")
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with service.lock:
                current = service.secrets.get(path, (0, {}))[0]
            if request["version"] != current:
                body = {"error": "version_conflict", "detail": "stale", "current_version": current}
                self._json(409, body)
                return
            version = service.write(path, request["data"])
            self._json(200, {"path": path, "version": version})

        def _client_gone(self) -> bool:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""

        def _watch(self, prefix: str) -> None:
            with service.lock:
                service.watch_headers.append(dict(self.headers))
                status = service.watch_status
            if status is not None:
                self._json(status, {"error": "refused", "detail": f"watch refused: {status}"})
                return
            stream = _Stream(prefix)
            after = self.headers.get("Last-Event-ID")
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")  # the body ends when the connection does
            self.end_headers()
            self.close_connection = True
            with service.lock:
                frames = [b"retry: 1000\n\n"]
                if after is not None:
                    missed = [(p, f) for s, p, f in service.history if s > int(after)]
                    frames += [frame for path, frame in missed if stream.wants(path)]
                service.streams.append(stream)
            try:
                for frame in frames:
                    self.wfile.write(frame)
                self.wfile.flush()
                while not service.stopping.is_set():
                    try:
                        next_frame = stream.frames.get(timeout=0.05)
                    except queue.Empty:
                        if self._client_gone():
                            return
                        continue
                    if next_frame is None:
                        return
                    self.wfile.write(next_frame)
                    self.wfile.flush()
            except OSError:
                pass  # the client went away
            finally:
                with service.lock:
                    if stream in service.streams:
                        service.streams.remove(stream)

    return Handler

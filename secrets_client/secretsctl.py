"""`secretsctl`: the command line client of the HTTP API, `watch` included (its SSE stream).

Configured by environment only, so neither the token nor a value lands in shell history or in
the process list; output is JSON, and the exit code says what went wrong (see `--help`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import IO, Any, NoReturn

import msgspec

from schemas.approvals import CHANGE_STATES
from schemas.globs import PathGlob
from secrets_client.api import DEFAULT_URL, secret_url
from secrets_client.client import SecretsClient
from secrets_client.errors import ClientError

__all__ = ["EXIT_CODES", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_FORBIDDEN = 5
EXIT_UNAUTHENTICATED = 6
EXIT_INVALID = 7
EXIT_UNAVAILABLE = 8
EXIT_APPROVAL = 9

EXIT_CODES: Mapping[int, str] = {
    EXIT_OK: "success",
    EXIT_ERROR: "any other error",
    EXIT_USAGE: "usage error (bad arguments)",
    EXIT_NOT_FOUND: "not found (404)",
    EXIT_CONFLICT: "conflict (409): a stale version (the body on stderr holds current_version), "
    "a rotation already under way, or a change request whose state forbids the action",
    EXIT_FORBIDDEN: "forbidden (403): no grant for this path, or approving your own change",
    EXIT_UNAUTHENTICATED: "unauthenticated (401), or SECRETS_TOKEN not set",
    EXIT_INVALID: "invalid input (400, 413, 422), checked locally or by the service",
    EXIT_UNAVAILABLE: "service, Vault or NATS unavailable (503, connection failure, timeout), "
    "or a rotation failed (502 rotation_failed: the old credential stands)",
    EXIT_APPROVAL: "approval required (428): propose the change (secretsctl propose), "
    "or break glass with --bypass-reason",
}

_BY_STATUS = {
    400: EXIT_INVALID,
    401: EXIT_UNAUTHENTICATED,
    403: EXIT_FORBIDDEN,
    404: EXIT_NOT_FOUND,
    409: EXIT_CONFLICT,
    413: EXIT_INVALID,
    422: EXIT_INVALID,
    428: EXIT_APPROVAL,
    502: EXIT_UNAVAILABLE,
    503: EXIT_UNAVAILABLE,
    504: EXIT_UNAVAILABLE,
}

_EPILOG = (
    f"""\
environment:
  SECRETS_URL          the service's base URL (default {DEFAULT_URL})
  SECRETS_TOKEN        bearer token (JWT) for every command, watch included

output:
  stdout: the service's JSON answer (watch: one JSON object per line, per change,
          with its stream "sequence")
  stderr: JSON lines; on failure the last is {{"error", "detail", "status"?, ...}}

exit codes:
"""
    + "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items())
    + """

examples:
  secretsctl get app/db
  secretsctl put app/db --version 3 --file new.json      # or: ... < new.json
  secretsctl versions app/db
  secretsctl list app                                    # folders end in '/'
  secretsctl delete app/db --versions 2,3                # default: the current version
  secretsctl rollback app/db --to 2 --version 4
  secretsctl rotate app/db                               # or --version 4: only from v4
  secretsctl rotation app/db                             # state, last and next rotation
  secretsctl watch app                                   # app and everything below it
  secretsctl watch 'app/*/db' --from-sequence 120        # a glob; replay from sequence 120
  secretsctl propose prod/db --version 3 --reason "INC-7: new vendor key" --file new.json
  secretsctl changes --state pending                     # field names only, never values
  secretsctl approve 0b5e9c2f4d6a4e1f8a3b7c9d2e4f6a8b    # an approver, never the requester
  secretsctl apply 0b5e9c2f4d6a4e1f8a3b7c9d2e4f6a8b      # CAS: stale if prod/db moved on
  secretsctl put prod/db --version 3 --bypass-reason "INC-8: outage" < new.json
"""
)


class _Failure(Exception):
    def __init__(self, code: int, body: Mapping[str, Any]) -> None:
        super().__init__(body.get("detail", ""))
        self.code = code
        self.body = body


def main(argv: Sequence[str] | None = None) -> NoReturn:
    sys.exit(run(argv, os.environ))


def run(
    argv: Sequence[str] | None,
    environ: Mapping[str, str],
    *,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run one command; return the exit code. Streams default to the process's own."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    args = _parser().parse_args(argv)
    try:
        if args.command == "watch":
            return _watch(args, environ, stdout, stderr)
        body = _dispatch(args, environ, stdin)
    except _Failure as failure:
        _print(stderr, failure.body, compact=True)
        return failure.code
    _print(stdout, body)
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secretsctl",
        description="Read, write and manage secrets through the secrets service.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds per request (default 10)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    get = sub.add_parser("get", help="read the current (or a given) version")
    get.add_argument("path")
    get.add_argument("--version", type=_positive, help="read this version")

    put = sub.add_parser(
        "put",
        help="write the next version (CAS); the value is a JSON object from --file or stdin",
    )
    put.add_argument("path")
    put.add_argument(
        "--version",
        type=_nonnegative,
        required=True,
        help="the current version you last saw (0: the path must not exist yet)",
    )
    put.add_argument(
        "--file", default="-", help="JSON file holding the value, an object ('-': stdin)"
    )

    versions = sub.add_parser("versions", help="version history: each version and its state")
    versions.add_argument("path")

    lst = sub.add_parser("list", help="keys under a prefix you may read; folders end in '/'")
    lst.add_argument("prefix", nargs="?", default="", help="default: the top of the tree")

    delete = sub.add_parser("delete", help="soft-delete the current version (or --versions)")
    delete.add_argument("path")
    delete.add_argument("--versions", type=_version_list, help="comma-separated, e.g. 1,2")

    for name, text in (
        ("undelete", "restore soft-deleted versions"),
        ("destroy", "remove the data of versions for good (needs secrets:destroy)"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("path")
        cmd.add_argument(
            "--versions", type=_version_list, required=True, help="comma-separated, e.g. 1,2"
        )

    rollback = sub.add_parser(
        "rollback", help="write an earlier version's data as the next version (CAS)"
    )
    rollback.add_argument("path")
    rollback.add_argument("--to", type=_positive, required=True, help="the version to restore")
    rollback.add_argument(
        "--version", type=_positive, required=True, help="the current version you last saw"
    )

    rotate = sub.add_parser(
        "rotate", help="rotate now under the path's [[rotation.rules]] entry (secrets:rotate)"
    )
    rotate.add_argument("path")
    rotate.add_argument(
        "--version", type=_positive, help="rotate only if this is still the current version"
    )
    rotation = sub.add_parser(
        "rotation", help="rotation state: idle, running, failed or stalled; last and next"
    )
    rotation.add_argument("path")
    for name in ("put", "delete", "undelete", "destroy", "rollback", "rotate"):
        sub.choices[name].add_argument(
            "--bypass-reason",
            type=_bypass_reason,
            metavar="TEXT",
            help="break glass on a path under an approval rule (needs secrets:bypass): "
            "change it without a change request, audited with this reason",
        )

    propose = sub.add_parser(
        "propose",
        help="ask for a write on a path under an approval rule; the value as for put",
    )
    propose.add_argument("path")
    propose.add_argument(
        "--version",
        type=_nonnegative,
        required=True,
        help="the current version you last saw (0: the path must not exist yet)",
    )
    propose.add_argument(
        "--reason", type=_reason, required=True, metavar="TEXT", help="shown to approvers"
    )
    propose.add_argument(
        "--file", default="-", help="JSON file holding the value, an object ('-': stdin)"
    )
    changes = sub.add_parser(
        "changes", help="change requests you may see (field names only, never values)"
    )
    changes.add_argument("--state", choices=CHANGE_STATES)
    changes.add_argument("--path", help="only the requests on this path")
    for name, text in (
        ("change", "one change request: state, approvals, changed field names"),
        ("approve", "approve a change request (secrets:approve; never your own)"),
        ("reject", "reject a change request (secrets:approve)"),
        ("cancel", "withdraw your own change request"),
        ("apply", "write an approved change request (CAS on its base version)"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("id", help="the change request's id (32 hex digits)")

    watch = sub.add_parser(
        "watch",
        help="print the changes you may read as JSON lines until interrupted (the service's "
        "watch stream; reconnects by itself)",
    )
    watch.add_argument(
        "pattern",
        nargs="?",
        default="",
        help="a prefix (that path and all below it) or a path glob such as 'app/*/db' "
        "(default: everything)",
    )
    watch.add_argument(
        "--from-sequence",
        type=_positive,
        help="replay from this stream sequence (default: changes from now on)",
    )
    watch.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        help="seconds to reach the service at the start (default 10); later, reconnects are "
        "retried forever",
    )
    return parser


# -- HTTP commands -----------------------------------------------------------------------


def _dispatch(args: argparse.Namespace, environ: Mapping[str, str], stdin: IO[str]) -> Any:
    token = _token(environ)
    url = environ.get("SECRETS_URL", "").strip() or DEFAULT_URL
    try:
        # One command, one request or two: nothing to cache, so no watch stream either.
        with SecretsClient(url, token=token, timeout=args.timeout, cache=False) as client:
            return _command(client, args, stdin)
    except ClientError as exc:
        raise _Failure(_exit_code(exc), exc.body) from None


def _command(client: SecretsClient, args: argparse.Namespace, stdin: IO[str]) -> Any:
    """The API's answer to one command, as it gave it."""
    command: str = args.command
    if command == "list":
        return client.list(args.prefix)
    if command == "changes":
        return client.changes(state=args.state, path=args.path)
    by_id = {
        "change": client.change,
        "approve": client.approve,
        "reject": client.reject,
        "cancel": client.cancel,
        "apply": client.apply,
    }
    if command in by_id:
        return by_id[command](args.id)
    path: str = args.path
    if command == "get":
        version = None if args.version is None else {"version": str(args.version)}
        return client.request("GET", secret_url(path), params=version)
    if command == "versions":
        return client.versions(path)
    if command == "rotation":
        return client.rotation(path)
    if command == "propose":
        data = _read_value(args.file, stdin)
        return client.propose(path, data, version=args.version, reason=args.reason)
    return _change(client, args, stdin)


def _change(client: SecretsClient, args: argparse.Namespace, stdin: IO[str]) -> Any:
    """put, delete, undelete, destroy, rollback, rotate: built here rather than by the client's
    methods, so that --bypass-reason can ride along as the X-Bypass-Reason header."""
    command: str = args.command
    url = secret_url(args.path)
    params = None
    body: Any = None
    if command == "put":
        body = {"data": _read_value(args.file, stdin), "version": args.version}
    elif command == "delete" and args.versions is not None:
        params = {"versions": ",".join(map(str, args.versions))}
    elif command in ("undelete", "destroy"):
        url, body = f"{url}:{command}", {"versions": args.versions}
    elif command == "rollback":
        url, body = f"{url}:rollback", {"to_version": args.to, "version": args.version}
    elif command == "rotate":
        url = f"{url}:rotate"
        body = None if args.version is None else {"version": args.version}
    method = {"put": "PATCH", "delete": "DELETE"}.get(command, "POST")
    reason = args.bypass_reason
    headers = None if reason is None else {"X-Bypass-Reason": reason}
    return client.request(method, url, params=params, json=body, headers=headers)


def _token(environ: Mapping[str, str]) -> str:
    token = environ.get("SECRETS_TOKEN", "").strip()
    if not token:
        _fail(EXIT_UNAUTHENTICATED, "missing_token", "set SECRETS_TOKEN to a bearer token")
    return token


def _exit_code(exc: ClientError) -> int:
    if exc.status:
        return _BY_STATUS.get(exc.status, EXIT_ERROR)
    if exc.error in ("timeout", "unreachable"):
        return EXIT_UNAVAILABLE
    if exc.error == "invalid_url":
        return EXIT_USAGE
    if exc.error in ("invalid_stream", "invalid_response"):
        return EXIT_ERROR  # the service's answer broke the rules
    return EXIT_INVALID  # the path, checked here before any request


def _read_value(source: str, stdin: IO[str]) -> dict[str, Any]:
    if source == "-":
        if stdin.isatty():
            _fail(EXIT_USAGE, "usage", "pipe the JSON value on stdin, or give --file PATH")
        text = stdin.read()
        where = "stdin"
    else:
        where = source
        try:
            with open(source, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as exc:
            _fail(EXIT_USAGE, "usage", f"cannot read {source!r}: {type(exc).__name__}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        # Position only: the text is a secret value.
        _fail(EXIT_INVALID, "invalid_request", f"{where} is not JSON (line {exc.lineno})")
    if not isinstance(value, dict):
        _fail(EXIT_INVALID, "invalid_request", f"{where} must hold a JSON object of fields")
    return value


# -- watch -------------------------------------------------------------------------------


def _watch(
    args: argparse.Namespace, environ: Mapping[str, str], stdout: IO[str], stderr: IO[str]
) -> int:
    # Reconnections and lost events are reported on stderr as JSON lines too (log records).
    _log_json_lines(stderr)
    try:
        token = _token(environ)
        prefix, glob = _watch_scope(args.pattern)
    except _Failure as failure:
        _print(stderr, failure.body, compact=True)
        return failure.code
    after = None if args.from_sequence is None else args.from_sequence - 1

    first = True

    def connected(resumed_after: int | None) -> None:
        nonlocal first
        if first:
            start = {"watching": args.pattern, "from_sequence": args.from_sequence}
            _print(stderr, start, compact=True)
            first = False
        else:
            _print(stderr, {"reconnected": args.pattern, "after": resumed_after}, compact=True)

    url = environ.get("SECRETS_URL", "").strip() or DEFAULT_URL
    try:
        with SecretsClient(url, token=token, timeout=args.connect_timeout, cache=False) as client:
            for change in client.watch(prefix, after=after, on_connect=connected):
                if glob is None or glob.matches(change.path):
                    event = msgspec.to_builtins(change.event)
                    _print(stdout, {"sequence": change.sequence, **event}, compact=True)
    except ClientError as exc:
        _print(stderr, exc.body, compact=True)
        return _exit_code(exc)
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        return EXIT_OK  # the reader went away (`| head`)
    return EXIT_OK


def _watch_scope(pattern: str) -> tuple[str, PathGlob | None]:
    """The prefix to watch and the glob to filter by: a pattern without `*` is a prefix (that
    path and all below it); a glob is watched from its literal leading segments."""
    if "*" not in pattern:
        return pattern, None
    try:
        glob = PathGlob(pattern)
    except ValueError as exc:
        _fail(EXIT_INVALID, "invalid_request", str(exc))
    literal = []
    for segment in glob.segments:
        if "*" in segment:
            break
        literal.append(segment)
    return "/".join(literal), glob


# -- helpers -----------------------------------------------------------------------------


_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


class _JsonLines(logging.Formatter):
    """A log record as one JSON object: level, logger, message and the scalar fields the
    client adds (`extra=`: reason, first_sequence); never an exception's text."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and isinstance(value, str | int | float | bool):
                line[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            line["exc_type"] = record.exc_info[0].__name__
        return json.dumps(line, separators=(",", ":"))


def _log_json_lines(stream: IO[str]) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_JsonLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def _fail(code: int, error: str, detail: str) -> NoReturn:
    raise _Failure(code, {"error": error, "detail": detail})


def _print(stream: IO[str], value: Any, *, compact: bool = False) -> None:
    text = json.dumps(value, separators=(",", ":")) if compact else json.dumps(value, indent=2)
    stream.write(text + "\n")
    stream.flush()


def _positive(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return int(raw)


def _nonnegative(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()):
        raise argparse.ArgumentTypeError("must be an integer >= 0")
    return int(raw)


def _reason(raw: str, limit: int = 1000) -> str:
    text = raw.strip()
    if not text or len(text) > limit:
        raise argparse.ArgumentTypeError(f"must be 1 to {limit} characters, not blank")
    return text


def _bypass_reason(raw: str) -> str:
    # A header (X-Bypass-Reason), as the service takes it; the client refuses what is not
    # printable ASCII there.
    return _reason(raw, 500)


def _version_list(raw: str) -> list[int]:
    return [_positive(part.strip()) for part in raw.split(",")]


if __name__ == "__main__":
    main()

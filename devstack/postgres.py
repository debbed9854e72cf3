"""A PostgreSQL 16 server process from the `pgserver` wheel's binaries on a free loopback port:
password (SCRAM) logins over TCP, the superuser over its own unix socket; ready when it answers."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from devstack.processes import (
    POLL_INTERVAL,
    STOP_GRACE,
    BinaryNotFound,
    DevStackError,
    ManagedProcess,
    ProcessLog,
    check_port_free,
    child_env,
    free_port,
)

SERVICE_ACCOUNT = "pgrun"
SUPERUSER = "postgres"
_ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
# Small and quick: a test server needs no durability against power loss, nor much memory. Not
# synchronous_commit=off, though: a commit must reach the kernel before it returns, or kill()
# would lose it (the page cache outlives a killed process, WAL buffers in shared memory do not).
DEFAULT_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "full_page_writes": "off",
    "shared_buffers": "16MB",
    "max_connections": "50",
    "password_encryption": "scram-sha-256",
    "unix_socket_permissions": "0700",
}


class PgserverNotFound(BinaryNotFound):
    """The `pgserver` wheel (PostgreSQL's binaries) is not installed, or lacks a binary."""

    def __init__(self, detail: str) -> None:
        super().__init__("postgres", "pgserver")
        self.args = (
            f"PostgreSQL binaries not found ({detail}); install pgserver (pip install pgserver)",
        )


def postgres_bin_dir() -> Path:
    """pgserver's `pginstall/bin`, located without importing pgserver (whose import has work
    of its own to do)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise PgserverNotFound("no pgserver package")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    for name in ("initdb", "postgres", "psql"):
        if not os.access(bin_dir / name, os.X_OK):
            raise PgserverNotFound(f"no {name} in {bin_dir}")
    return bin_dir


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    # standard_conforming_strings is on (the default since 9.1): only quotes need doubling.
    return "'" + value.replace("'", "''") + "'"


class PostgresServer(ManagedProcess):
    """`postgres` on 127.0.0.1:`port` with a fresh data directory, initialised by `initdb`.

    The superuser `postgres` logs in over the unix socket in `socket_dir` without a password
    (`--auth-local=trust`); every TCP login needs a SCRAM password (`--auth-host=scram-sha-256`).
    `kill()` takes the server down hard and keeps its data: `start()` brings it back with its
    roles. `stop()` shuts it down and deletes the data. As root, initdb and postgres run as the
    system account `pgrun` (initdb refuses root), created on first use.
    """

    host = "127.0.0.1"
    superuser = SUPERUSER

    def __init__(
        self,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        account: str = SERVICE_ACCOUNT,
    ) -> None:
        self.port = free_port() if port is None else port
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self._account = account
        self._root: Path | None = None
        self._log = ProcessLog(log_path, "postgres-")

    def __repr__(self) -> str:
        pid = None if self.process is None else self.process.pid
        return f"PostgresServer(host={self.host!r}, port={self.port}, pid={pid})"

    @property
    def log_path(self) -> Path | None:
        return self._log.path

    @property
    def socket_dir(self) -> Path:
        return self._dirs()[1]

    @property
    def data_dir(self) -> Path:
        return self._dirs()[0]

    def _dirs(self) -> tuple[Path, Path]:
        if self._root is None:
            raise DevStackError(f"PostgreSQL on port {self.port} was not started")
        return self._root / "data", self._root / "sock"

    def secret(self, role: str, password: str, *, dbname: str = "postgres") -> dict[str, Any]:
        """The shape of a rotated PostgreSQL secret, for a login to this server."""
        return {
            "host": self.host,
            "port": self.port,
            "dbname": dbname,
            "username": role,
            "password": password,
        }

    def postgres_argv(self, bin_dir: Path) -> list[str]:
        data_dir, socket_dir = self._dirs()
        argv = [str(bin_dir / "postgres"), "-D", str(data_dir), "-p", str(self.port)]
        argv += ["-k", str(socket_dir), "-c", f"listen_addresses={self.host}"]
        for name, value in self.settings.items():
            argv += ["-c", f"{name}={value}"]
        return argv

    def initdb_argv(self, bin_dir: Path) -> list[str]:
        return [
            str(bin_dir / "initdb"),
            "-D",
            str(self._dirs()[0]),
            "-U",
            SUPERUSER,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (initialising a data directory first, unless a killed server left
        one) and return once the superuser's query over the socket answers."""
        if self.process is not None and self.process.poll() is None:
            raise DevStackError(f"PostgreSQL at {self.host}:{self.port} is already running")
        bin_dir = postgres_bin_dir()
        check_port_free(self.port, "PostgreSQL")
        run_as = _RunAs.for_account(self._account, bin_dir)
        try:
            if self._root is None:
                self._root = Path(tempfile.mkdtemp(prefix="postgres-"))
                socket_dir = self._dirs()[1]
                socket_dir.mkdir(mode=0o700)
                run_as.own(self._root, socket_dir)
                self._initdb(bin_dir, run_as, timeout)
            self.process = run_as.popen(self.postgres_argv(bin_dir), self._log.open(), _env())
            self._wait_ready(bin_dir, timeout)
        except BaseException:
            self.stop()
            raise

    def _initdb(self, bin_dir: Path, run_as: _RunAs, timeout: float) -> None:
        result = run_as.run(self.initdb_argv(bin_dir), _env(), timeout)
        if result.returncode != 0:
            raise DevStackError(
                f"initdb for PostgreSQL on port {self.port} failed with code "
                f"{result.returncode}:\n{result.stdout.decode(errors='replace').strip()}"
            )

    def _wait_ready(self, bin_dir: Path, timeout: float) -> None:
        process = self.process
        assert process is not None
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            # A port taken in between, or a bad setting, makes postgres exit at once.
            if process.poll() is not None:
                raise DevStackError(
                    f"PostgreSQL at {self.host}:{self.port} exited with code "
                    f"{process.returncode} while starting; log tail:\n{self._log.tail()}"
                )
            try:
                if self._psql(bin_dir, "SELECT 1", timeout=5.0) == "1":
                    return
            except DevStackError as exc:
                last = str(exc)
            if time.monotonic() >= deadline:
                raise DevStackError(
                    f"PostgreSQL at {self.host}:{self.port} answered no query in {timeout}s: "
                    f"{last}; log tail:\n{self._log.tail()}"
                )
            time.sleep(POLL_INTERVAL)

    def sql(self, script: str, *, dbname: str = "postgres") -> str:
        """Run `script` as the superuser over the socket (psql, stopping at the first error);
        the unaligned, tuples-only output."""
        return self._psql(postgres_bin_dir(), script, dbname=dbname)

    def _psql(
        self, bin_dir: Path, script: str, *, dbname: str = "postgres", timeout: float = 30.0
    ) -> str:
        argv = [str(bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        argv += ["-h", str(self.socket_dir), "-p", str(self.port), "-U", SUPERUSER, "-d", dbname]
        # On stdin, not in argv: a script may hold a password, and argv is public in /proc.
        try:
            result = subprocess.run(
                argv,
                input=script.encode(),
                capture_output=True,
                env={**_env(), "PGCONNECT_TIMEOUT": "5"},
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise DevStackError(f"psql on port {self.port} gave no answer in {timeout}s") from None
        if result.returncode != 0:
            raise DevStackError(
                f"psql on port {self.port} failed with code {result.returncode}: "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result.stdout.decode().strip()

    def create_login(
        self, role: str, password: str, *, createrole: bool = False, dbname: str = "postgres"
    ) -> None:
        """Make `role` a LOGIN role with a SCRAM `password` (and CREATEROLE if asked) that may
        connect to `dbname`; a role of that name already there is altered to match."""
        if not _ROLE_NAME.fullmatch(role):
            raise ValueError(f"not a plain role name: {role!r}")
        ident = quote_ident(role)
        script = (
            # The script holds the password: keep it out of the server's log whatever the
            # server's log_statement says.
            "SET log_statement = 'none';\n"
            f"SELECT 'CREATE ROLE {ident}' WHERE NOT EXISTS "
            f"(SELECT FROM pg_roles WHERE rolname = {quote_literal(role)})\n\\gexec\n"
            f"ALTER ROLE {ident} LOGIN {'CREATEROLE' if createrole else 'NOCREATEROLE'} "
            f"PASSWORD {quote_literal(password)} VALID UNTIL 'infinity';\n"
            f"GRANT CONNECT ON DATABASE {quote_ident(dbname)} TO {ident};\n"
        )
        try:
            self.sql(script, dbname=dbname)
        except DevStackError as exc:
            # psql quotes the failing line back, and that line may be the one with the password.
            raise DevStackError(str(exc).replace(password, "**redacted**")) from None

    def kill(self) -> None:
        """SIGKILL the server and its backends, as a crashed host would; the data stays."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            backends = list(_children(process.pid))
            process.kill()
            for pid in backends:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        process.wait()
        self._log.close()

    def stop(self) -> None:
        """Shut down (fast: open sessions are ended) and delete the data directory."""
        process, self.process = self.process, None
        if process is not None:
            _fast_shutdown(process)
        self._log.close()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None


def _env() -> dict[str, str]:
    # The caller's PGHOST/PGPASSWORD/PGDATA... must not steer initdb, postgres or psql.
    return {**child_env(("PG",)), "LC_ALL": "C"}


def _fast_shutdown(process: subprocess.Popen[bytes]) -> None:
    # SIGTERM is PostgreSQL's "smart" shutdown, which waits for every client to leave; SIGINT
    # ends their sessions.
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _children(pid: int) -> Iterator[int]:
    """The pids whose parent is `pid` (Linux /proc; nothing elsewhere)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                    # "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if len(fields) > 1 and fields[1] == str(pid):
                yield int(entry.name)


class _RunAs:
    """Whom initdb and postgres run as: ourselves, or (when we are root) a system account.

    Dropping privileges in the child (Popen's user/group) rather than through `runuser`: runuser
    forks and stays the parent, so our signals would reach it and not the postmaster, and a
    SIGKILL would orphan the server.
    """

    def __init__(self, entry: pwd.struct_passwd | None) -> None:
        self._entry = entry

    @classmethod
    def for_account(cls, account: str, bin_dir: Path) -> _RunAs:
        if os.geteuid() != 0:
            return cls(None)
        entry = _ensure_account(account)
        _make_readable(bin_dir.parent)
        return cls(entry)

    def _user_args(self) -> dict[str, Any]:
        if self._entry is None:
            return {}
        return {"user": self._entry.pw_uid, "group": self._entry.pw_gid, "extra_groups": []}

    def own(self, *paths: Path) -> None:
        if self._entry is not None:
            for path in paths:
                os.chown(path, self._entry.pw_uid, self._entry.pw_gid)

    def run(
        self, argv: list[str], env: Mapping[str, str], timeout: float
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            timeout=timeout,
            # initdb and postgres refuse a data directory the caller's cwd cannot reach.
            cwd="/",
            **self._user_args(),
        )

    def popen(self, argv: list[str], out: Any, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        # As processes.spawn: the caller's process group, so Ctrl-C stops the server too.
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd="/",
            **self._user_args(),
        )


def _ensure_account(account: str) -> pwd.struct_passwd:
    """The system account `account`, created (once: a second caller finds it) if missing."""
    for _ in range(20):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(account)
        result = subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--user-group",
                "--shell",
                "/usr/sbin/nologin",
                account,
            ],
            capture_output=True,
        )
        # 9: created meanwhile by another process; 10: /etc/passwd locked by one, try again.
        if result.returncode not in (0, 9, 10):
            raise DevStackError(
                f"useradd {account} failed with code {result.returncode}: "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        time.sleep(POLL_INTERVAL)
    raise DevStackError(f"could not create the system account {account}")


def _make_readable(install_dir: Path) -> None:
    """`chmod -R a+rX` on pgserver's install folder, and search permission on its parents, so
    that the system account can run the binaries (a root-only venv has neither)."""
    for parent in install_dir.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)
    for dirpath, _dirnames, filenames in os.walk(install_dir):
        directory = Path(dirpath)
        mode = directory.stat().st_mode
        if mode & 0o555 != 0o555:
            directory.chmod(mode | 0o555)
        for name in filenames:
            path = directory / name
            mode = path.lstat().st_mode
            if path.is_symlink():
                continue
            # a+X: execute for all only where some execute bit is already set.
            wanted = mode | 0o444 | (0o111 if mode & 0o111 else 0)
            if wanted != mode:
                path.chmod(wanted)

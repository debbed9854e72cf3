"""The PostgreSQL side of rotation: a role's new password made live as a SCRAM-SHA-256 verifier
computed here (never the plaintext) and proven by a login; one role, or `<user>`/`<user>_clone`.

Every step is idempotent: a retry after a crash at any point converges on the same end state.
"""

from __future__ import annotations

import math
import re
import ssl as ssl_module
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg

from schemas.secret import REDACTED
from service.rotation.scram import scram_verifier

__all__ = [
    "PendingFields",
    "PostgresError",
    "PostgresRotator",
    "quote_ident",
    "twin",
]

ErrorCode = Literal["bad_secret", "unreachable", "login_failed", "refused"]
SslMode = Literal["disable", "prefer", "require", "verify-ca", "verify-full"]

ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
MAX_ROLE_LENGTH = 63  # NAMEDATALEN - 1: PostgreSQL would truncate a longer name silently
TWIN_SUFFIX = "_clone"
_VERIFIER = re.compile(r"SCRAM-SHA-256\$[0-9]+:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+")
_APPLICATION_NAME = "secrets-service rotation"

# The previous role's expiry, computed by the server's clock (no skew with ours) and kept if
# already earlier: a retried `finish` never stretches the grace. format() quotes the name and
# the timestamp; the statement comes back to be executed, since ALTER ROLE takes no parameters.
_EXPIRE_SQL = """
SELECT format('ALTER ROLE %I VALID UNTIL %L', rolname, (now() + make_interval(secs => $2))::text)
FROM pg_roles
WHERE rolname = $1
  AND (rolvaliduntil IS NULL OR rolvaliduntil > now() + make_interval(secs => $2))
"""


class PostgresError(Exception):
    """A PostgreSQL step failed. `code`: "bad_secret" (a secret lacks or garbles a field),
    "unreachable" (no connection, or it broke), "login_failed" (the server refused the login),
    "refused" (a statement was refused, e.g. no privilege). Messages name host, port and role,
    never a password."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code

    def __repr__(self) -> str:
        return f"PostgresError({self.code!r}, {str(self)!r})"


class PendingFields(dict[str, str]):
    """The fields a rotation will write: a plain dict of str (JSON and msgspec encode it as one)
    whose repr shows the role but not the password."""

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{key}={value if key == 'username' else REDACTED!r}" for key, value in self.items()
        )
        return f"PendingFields({shown})"

    __str__ = __repr__


# --- role names and the secret's fields ----------------------------------------------------------


def quote_ident(name: str) -> str:
    """`name` as a quoted SQL identifier (exact case, no keyword clash)."""
    return '"' + name.replace('"', '""') + '"'


def twin(username: str) -> str:
    """The other role of an alternating pair: `app` <-> `app_clone`."""
    if username.endswith(TWIN_SUFFIX) and len(username) > len(TWIN_SUFFIX):
        return username[: -len(TWIN_SUFFIX)]
    other = username + TWIN_SUFFIX
    if len(other) > MAX_ROLE_LENGTH:
        raise _bad(
            "the secret",
            "username",
            f"is too long to alternate: with {TWIN_SUFFIX!r} it must fit in {MAX_ROLE_LENGTH} "
            "characters",
        )
    return other


@dataclass(frozen=True, slots=True)
class _Login:
    """Where and as whom to log in; its repr never shows the password."""

    host: str
    port: int
    dbname: str
    username: str
    password: str

    def __repr__(self) -> str:
        return f"_Login({self.where}, password={REDACTED!r})"

    @property
    def where(self) -> str:
        return f"role {self.username!r} at {self.host}:{self.port}/{self.dbname}"


def _bad(what: str, field: str, problem: str) -> PostgresError:
    return PostgresError("bad_secret", f"{what}: field {field!r} {problem}")


def _text(data: Mapping[str, Any], field: str, what: str) -> str:
    value = data.get(field)
    if value is None:
        raise _bad(what, field, "is missing")
    if not isinstance(value, str) or not value:
        raise _bad(what, field, "must be a non-empty string")
    if "\x00" in value:
        raise _bad(what, field, "must not hold a NUL character")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise _bad(what, field, "is not valid Unicode text") from None
    return value


def _role(data: Mapping[str, Any], what: str) -> str:
    name = _text(data, "username", what)
    if not ROLE_NAME.fullmatch(name):
        raise _bad(what, "username", "must be a role name of 1-63 letters, digits or _")
    return name


def _port(data: Mapping[str, Any], what: str) -> int:
    value = data.get("port")
    if value is None:
        raise _bad(what, "port", "is missing")
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise _bad(what, "port", "must be a port number, 1-65535")
    return value


def _login(data: Mapping[str, Any] | None, what: str) -> _Login:
    if data is None:
        raise PostgresError("bad_secret", f"{what} is missing")
    return _Login(
        host=_text(data, "host", what),
        port=_port(data, what),
        dbname=_text(data, "dbname", what),
        username=_role(data, what),
        password=_text(data, "password", what),
    )


def _paired(current: _Login, target: _Login, master: Mapping[str, Any] | None) -> _Login:
    """`target`, once its role is checked against the mode: the same role without a master,
    the twin with one (never the live role, whose login an undo would otherwise remove)."""
    if master is None and target.username != current.username:
        raise _bad("the pending fields", "username", "must stay the same without a master")
    if master is not None and target.username != twin(current.username):
        raise _bad("the pending fields", "username", "must name the twin role")
    return target


def _scrub(text: str, hidden: Iterable[str]) -> str:
    """`text` without any of `hidden` in it (a server message quoting a value back)."""
    for value in hidden:
        if value:
            text = text.replace(value, REDACTED)
    return text


# --- the rotator ---------------------------------------------------------------------------------


class PostgresRotator:
    """Makes a pending password live in PostgreSQL, retires the previous login, or undoes.

    Single-user: the role changes its own password (`ALTER ROLE CURRENT_USER`). Alternating
    (given a master secret: a CREATEROLE role with ADMIN on the app's role, or a superuser):
    the master gives the twin role the new password, and later expires the previous role.
    """

    def __init__(
        self, *, timeout: float = 5.0, ssl: SslMode | ssl_module.SSLContext = "prefer"
    ) -> None:
        self.timeout = timeout
        self.ssl = ssl

    def __repr__(self) -> str:
        ssl = self.ssl if isinstance(self.ssl, str) else "SSLContext"
        return f"PostgresRotator(timeout={self.timeout}, ssl={ssl!r})"

    def plan(
        self, data: Mapping[str, Any], new_password: str, *, alternating: bool
    ) -> PendingFields:
        """The pending fields: {"password": p}, or with alternating {"username": twin,
        "password": p} where twin is `username_clone` for `username` and back. Checks every
        field of `data` first (PostgresError "bad_secret")."""
        current = _login(data, "the secret")
        _text({"password": new_password}, "password", "the new values")
        if not alternating:
            return PendingFields(password=new_password)
        return PendingFields(username=twin(current.username), password=new_password)

    async def apply(
        self,
        base: Mapping[str, Any],
        pending: Mapping[str, Any],
        master: Mapping[str, Any] | None,
    ) -> None:
        """Make the pending login live, then prove it by logging in with it. Either completes
        (login proven) or raises PostgresError.

        Single-user (master None): log in as the role with base's password (or, on a retry
        after the change, pending's), ALTER ROLE CURRENT_USER PASSWORD <verifier>. Alternating:
        as master, create the twin if missing (LOGIN, IN ROLE <base role>, so it inherits its
        grants), ALTER ROLE twin LOGIN PASSWORD <verifier> VALID UNTIL 'infinity'."""
        current = _login(base, "the secret")
        target = _paired(current, _login({**base, **pending}, "the pending fields"), master)
        if master is None:
            await self._set_own_password(target, [current.password])
        else:
            admin = _login(master, "the master secret")
            hidden = (admin.password, target.password)
            async with self._session(admin, hidden) as conn:
                await self._ensure_role(conn, admin, target.username, current.username, hidden)
                await self._execute(
                    conn,
                    admin,
                    f"ALTER ROLE {quote_ident(target.username)} LOGIN PASSWORD "
                    f"{_verifier_literal(target.password)} VALID UNTIL 'infinity'",
                    hidden,
                )
        await self._prove(target)

    async def finish(
        self,
        base: Mapping[str, Any],
        pending: Mapping[str, Any],
        master: Mapping[str, Any] | None,
        grace: float,
    ) -> None:
        """Alternating only (no-op otherwise): the previous role VALID UNTIL now + `grace`
        seconds by the server's clock (kept if already earlier), the new one VALID UNTIL
        'infinity'. Idempotent."""
        if master is None:
            return
        if not math.isfinite(grace) or grace < 0:
            raise ValueError(f"grace must be a finite number of seconds >= 0, not {grace}")
        previous = _login(base, "the secret").username
        new = _role(pending, "the pending fields")
        if new != twin(previous):
            raise _bad("the pending fields", "username", "must name the twin role")
        admin = _login(master, "the master secret")
        hidden = (admin.password,)
        async with self._session(admin, hidden) as conn:
            await self._execute(
                conn, admin, f"ALTER ROLE {quote_ident(new)} VALID UNTIL 'infinity'", hidden
            )
            statement = await self._fetchval(
                conn, admin, _EXPIRE_SQL, hidden, previous, float(grace)
            )
            if statement is not None:
                await self._execute(conn, admin, str(statement), hidden)

    async def undo(
        self,
        latest: Mapping[str, Any] | None,
        base: Mapping[str, Any],
        pending: Mapping[str, Any],
        master: Mapping[str, Any] | None,
    ) -> None:
        """A human write won: leave no credential that no version holds. The role `pending`
        names gets the password `latest` holds if `latest` (None: the secret is gone) names that
        role, else PASSWORD NULL (alternating) / base's password (single-user). Idempotent; no
        pending fields (nothing planned yet): nothing to do."""
        if not pending:
            return
        current = _login(base, "the secret")
        planned = _paired(current, _login({**base, **pending}, "the pending fields"), master)
        kept: str | None = None
        if latest is not None and latest.get("username") == planned.username:
            try:
                kept = _text(latest, "password", "the latest version")
            except PostgresError:
                kept = None  # no usable credential in it: as if it named another role
        if master is None:
            wanted = current.password if kept is None else kept
            restored = _Login(current.host, current.port, current.dbname, current.username, wanted)
            await self._set_own_password(restored, [planned.password, current.password])
            await self._prove(restored)
            return
        admin = _login(master, "the master secret")
        hidden = tuple(p for p in (admin.password, planned.password, kept) if p is not None)
        role = quote_ident(planned.username)
        async with self._session(admin, hidden) as conn:
            if kept is None:
                exists = await self._fetchval(
                    conn,
                    admin,
                    "SELECT 1 FROM pg_roles WHERE rolname = $1",
                    hidden,
                    planned.username,
                )
                if exists is not None:
                    await self._execute(conn, admin, f"ALTER ROLE {role} PASSWORD NULL", hidden)
                return
            await self._ensure_role(conn, admin, planned.username, current.username, hidden)
            await self._execute(
                conn,
                admin,
                f"ALTER ROLE {role} LOGIN PASSWORD {_verifier_literal(kept)} "
                "VALID UNTIL 'infinity'",
                hidden,
            )

    # -- steps --------------------------------------------------------------------------------

    async def _set_own_password(self, target: _Login, others: Iterable[str]) -> None:
        """Give `target`'s role `target.password`, logging in as it with any of `others` or,
        last (a retry after the change: then nothing is left to do), with that password.

        The usual password first: each failed try is a "password authentication failed" line
        in the server's log, which should not follow every healthy rotation."""
        hidden = (*others, target.password)
        first_failure: PostgresError | None = None
        for password in dict.fromkeys(hidden):
            attempt = _Login(target.host, target.port, target.dbname, target.username, password)
            try:
                async with self._session(attempt, hidden) as conn:
                    if password != target.password:
                        await self._execute(
                            conn,
                            attempt,
                            "ALTER ROLE CURRENT_USER PASSWORD "
                            f"{_verifier_literal(target.password)}",
                            hidden,
                        )
                    return
            except PostgresError as exc:
                if exc.code != "login_failed":
                    raise
                first_failure = first_failure or exc
        assert first_failure is not None
        raise PostgresError(
            "login_failed",
            f"PostgreSQL refused every password known for {target.where}: {first_failure}",
        )

    async def _prove(self, target: _Login) -> None:
        """Log in as `target`: the new password works for new connections."""
        async with self._session(target, (target.password,)) as conn:
            who = await self._fetchval(conn, target, "SELECT current_user", (target.password,))
        if who != target.username:
            raise PostgresError("refused", f"logging in as {target.where} gave role {who!r}")

    async def _ensure_role(
        self,
        conn: asyncpg.Connection,
        admin: _Login,
        role: str,
        member_of: str,
        hidden: Iterable[str],
    ) -> None:
        exists = await self._fetchval(
            conn, admin, "SELECT 1 FROM pg_roles WHERE rolname = $1", hidden, role
        )
        if exists is not None:
            return
        try:
            await conn.execute(
                f"CREATE ROLE {quote_ident(role)} LOGIN IN ROLE {quote_ident(member_of)}"
            )
        except asyncpg.DuplicateObjectError:
            pass  # created by a concurrent attempt in between: as good
        except Exception as exc:
            raise self._failure(exc, admin, hidden, f"creating role {role!r}") from exc

    # -- connections and errors ----------------------------------------------------------------

    @asynccontextmanager
    async def _session(
        self, login: _Login, hidden: Iterable[str]
    ) -> AsyncIterator[asyncpg.Connection]:
        hidden = tuple(hidden)
        try:
            conn = await asyncpg.connect(
                host=login.host,
                port=login.port,
                user=login.username,
                password=login.password,
                database=login.dbname,
                timeout=self.timeout,
                command_timeout=self.timeout,
                ssl=self.ssl,
                server_settings={"application_name": _APPLICATION_NAME},
            )
        except Exception as exc:
            raise self._failure(exc, login, hidden, "logging in") from exc
        try:
            yield conn
        finally:
            try:
                await conn.close(timeout=self.timeout)
            except Exception:
                conn.terminate()

    async def _execute(
        self, conn: asyncpg.Connection, login: _Login, statement: str, hidden: Iterable[str]
    ) -> None:
        try:
            await conn.execute(statement)
        except Exception as exc:
            raise self._failure(exc, login, hidden, "running a statement") from exc

    async def _fetchval(
        self,
        conn: asyncpg.Connection,
        login: _Login,
        query: str,
        hidden: Iterable[str],
        *args: Any,
    ) -> Any:
        try:
            return await conn.fetchval(query, *args)
        except Exception as exc:
            raise self._failure(exc, login, hidden, "running a query") from exc

    def _failure(
        self, exc: BaseException, login: _Login, hidden: Iterable[str], doing: str
    ) -> PostgresError:
        """Our error for a driver or network failure: what, where and as whom; no value."""
        where = f"{login.where} ({doing})"
        if isinstance(exc, TimeoutError):
            return PostgresError(
                "unreachable", f"PostgreSQL for {where}: no answer in {self.timeout}s"
            )
        if isinstance(exc, OSError):
            detail = _scrub(str(exc) or type(exc).__name__, hidden)
            return PostgresError("unreachable", f"PostgreSQL for {where}: {detail}")
        if isinstance(exc, asyncpg.PostgresError):
            sqlstate = getattr(exc, "sqlstate", None) or "?"
            detail = _scrub(f"{sqlstate} {exc}", hidden)
            if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
                return PostgresError("login_failed", f"PostgreSQL refused {where}: {detail}")
            if isinstance(exc, _CONNECTION_ERRORS):
                return PostgresError("unreachable", f"PostgreSQL for {where}: {detail}")
            return PostgresError("refused", f"PostgreSQL refused {where}: {detail}")
        if isinstance(exc, asyncpg.InterfaceError):
            detail = _scrub(str(exc), hidden)
            return PostgresError("unreachable", f"PostgreSQL for {where}: {detail}")
        detail = _scrub(f"{type(exc).__name__}: {exc}", hidden)
        return PostgresError("unreachable", f"PostgreSQL for {where}: {detail}")


# Server errors that say the connection, not the statement, failed: the server is going away,
# not up yet, or full.
_CONNECTION_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)


def _verifier_literal(password: str) -> str:
    verifier = scram_verifier(password)
    # Built here, of base64 and fixed text: nothing to escape, checked all the same.
    assert _VERIFIER.fullmatch(verifier), "a SCRAM verifier of an unexpected shape"
    return f"'{verifier}'"

"""The service's own Vault identity: how it logs in (a token, AppRole or a JWT read from a file),
when it renews its token or logs in again, and whether it holds a valid token right now."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Final, Protocol

import anyio

from schemas.errors import ConfigError, SecretsError, VaultAccessDenied, VaultUnavailable

__all__ = [
    "AUTH_METHODS",
    "AppRoleLogin",
    "AuthCalls",
    "Grant",
    "JwtLogin",
    "LoginMethod",
    "TokenLogin",
    "VaultIdentity",
    "login_method",
]

log = logging.getLogger("secrets.vault")

AUTH_METHODS: Final = ("token", "approle", "jwt")
"""SECRETS_VAULT_AUTH's values."""

RENEW_AT: Final = 2 / 3
"""The share of a token's TTL after which it is renewed (or replaced): a third is left to retry."""


@dataclass(frozen=True)
class Grant:
    """A token and its lease as Vault told it: `ttl` seconds (0: it never expires)."""

    token: str = field(repr=False)
    ttl: int
    renewable: bool


class AuthCalls(Protocol):
    """Vault's token endpoints, as the backend calls them (errors: schemas.errors only)."""

    async def log_in(self, mount: str, credentials: Mapping[str, str]) -> Grant:
        """POST auth/<mount>/login with `credentials`."""
        ...

    async def renew_self(self) -> Grant:
        """auth/token/renew-self with the token in use."""
        ...

    async def lookup_self(self) -> Grant:
        """auth/token/lookup-self with the token in use."""
        ...

    def use(self, token: str | None) -> None:
        """Send `token` with every request from now on."""
        ...


@dataclass(frozen=True)
class TokenLogin:
    """SECRETS_VAULT_TOKEN: given, never replaced; renewed while Vault allows."""

    token: str | None = field(repr=False)
    name: ClassVar[str] = "token"

    async def credentials(self) -> Mapping[str, str] | None:
        return None  # nothing to log in with


@dataclass(frozen=True)
class AppRoleLogin:
    """SECRETS_VAULT_ROLE_ID + SECRETS_VAULT_SECRET_ID, at auth/<mount>/login."""

    role_id: str
    secret_id: str = field(repr=False)
    mount: str = "approle"
    name: ClassVar[str] = "approle"

    async def credentials(self) -> Mapping[str, str] | None:
        return {"role_id": self.role_id, "secret_id": self.secret_id}


@dataclass(frozen=True)
class JwtLogin:
    """SECRETS_VAULT_ROLE + SECRETS_VAULT_JWT_FILE, at auth/<mount>/login. The file is read at
    each login: Kubernetes rewrites a projected service-account token in place before it expires.
    """

    role: str
    jwt_file: str
    mount: str = "jwt"
    name: ClassVar[str] = "jwt"

    async def credentials(self) -> Mapping[str, str] | None:
        def read() -> str:
            with open(self.jwt_file, encoding="utf-8") as f:
                return f.read().strip()

        try:
            jwt = await anyio.to_thread.run_sync(read)
        except (OSError, UnicodeDecodeError) as exc:
            problem = getattr(exc, "strerror", None) or "not UTF-8"
            raise ConfigError("SECRETS_VAULT_JWT_FILE", f"cannot read it: {problem}") from None
        if not jwt:
            raise ConfigError("SECRETS_VAULT_JWT_FILE", "the file is empty")
        return {"role": self.role, "jwt": jwt}


LoginMethod = TokenLogin | AppRoleLogin | JwtLogin


def login_method(
    kind: str | None = None,
    *,
    token: str | None = None,
    role_id: str | None = None,
    secret_id: str | None = None,
    role: str | None = None,
    jwt_file: str | None = None,
    mount: str | None = None,
) -> LoginMethod:
    """The login method SECRETS_VAULT_AUTH names; without one, AppRole when both its ids are
    given (as before SECRETS_VAULT_AUTH existed), else the token. Settings checked the values."""
    if kind is None:
        kind = "approle" if role_id and secret_id else "token"
    if kind == "approle" and role_id and secret_id:
        return AppRoleLogin(role_id, secret_id, mount or "approle")
    if kind == "jwt" and role and jwt_file:
        return JwtLogin(role, jwt_file, mount or "jwt")
    if kind == "token":
        return TokenLogin(token)
    raise ConfigError("SECRETS_VAULT_AUTH", f"{kind!r} lacks its credentials")


class VaultIdentity:
    """The service's token: obtained by `start`, kept alive by `run` (or `tick`), replaced by
    `replace` when Vault refused it.

    A renewable token with a TTL is renewed (renew-self) at 2/3 of it. A renewal that gives back
    less than the TTL before has met the token's max TTL: a login method then logs in again at
    2/3 of what is left, a given token can only be reported (it ends at its max TTL). A login
    method also logs in again when renewal is refused or the token is not renewable; a 403 on
    a request makes it log in again only once lookup-self refuses the token too, at most once
    per `relogin_interval` (no caller can make the service mint tokens). Failed attempts are
    retried with backoff, up to `relogin_interval` apart.

    `clock` is monotonic seconds; tests pass a fake one and drive `tick` themselves.
    """

    def __init__(
        self,
        method: LoginMethod,
        calls: AuthCalls,
        *,
        relogin_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.method = method
        self._calls = calls
        self._relogin_interval = relogin_interval
        self._clock = clock
        self._lock = asyncio.Lock()
        self._rescheduled = asyncio.Event()
        self.token: str | None = method.token if isinstance(method, TokenLogin) else None
        self._ttl = 0  # the last grant's TTL
        self._renewable = False
        self._capped = False  # renewal no longer extends the token (its max TTL)
        self._refused = False  # Vault refused the token (revoked, expired)
        self._known = False  # Vault told us the token's lease
        self._expires = math.inf  # monotonic
        self._due = math.inf  # monotonic: the next renewal, login or check
        self._failures = 0  # consecutive failed attempts, for the backoff
        self._next_check = 0.0  # monotonic: the earliest re-login a refused request may cause
        self._reported = False  # the token's end is logged once
        # Plain counters for the metrics: (method, outcome) and outcome -> count.
        self.logins: dict[tuple[str, str], int] = {}
        self.renewals: dict[str, int] = {}

    # -- state ---------------------------------------------------------------------------------

    @property
    def valid(self) -> bool:
        """The service holds a token Vault has not refused and whose lease has not run out."""
        return bool(self.token) and not self._refused and self._clock() < self._expires

    def expires_in(self) -> float:
        """Seconds the token has left (inf: no end known; 0 or less: gone)."""
        if not self.token or self._refused:
            return 0.0
        return self._expires - self._clock()

    # -- the first token, and its upkeep -------------------------------------------------------

    async def start(self) -> None:
        """Log in (a failure raises: the service cannot start). A given token is used as it is:
        the loop's first tick learns its lease, so start-up makes no Vault call for it (Vault
        may come later, and readiness says so meanwhile)."""
        async with self._lock:
            if isinstance(self.method, TokenLogin):
                self._calls.use(self.method.token)
                self._due = self._clock()
            else:
                await self._log_in(at_start=True)

    async def run(self) -> None:
        """Keep the token alive until cancelled."""
        while True:
            self._rescheduled.clear()
            try:
                delay = await self.tick()
            except Exception:  # a bug here must not leave the service without a token for good
                log.exception("the Vault token upkeep failed")
                delay = self._relogin_interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if math.isinf(delay) else delay):
                    await self._rescheduled.wait()

    async def tick(self) -> float:
        """Do what is due (renew, log in again, look the token up); return the seconds until
        something is due again."""
        async with self._lock:
            now = self._clock()
            if now >= self._due:
                await self._upkeep(now)
            self._report_end()
            return max(self._due - self._clock(), 0.0)

    async def replace(self, refused: str | None) -> bool:
        """After Vault refused `refused` on a request: True when there is a new token to try.

        A 403 may be the policy's answer, not the token's end: log in again only when the token
        is past its lease or lookup-self refuses it too."""
        async with self._lock:  # concurrent callers wait for the one check
            if self.token != refused:
                return True  # replaced meanwhile
            if isinstance(self.method, TokenLogin):
                return False
            now = self._clock()
            if now < self._next_check:
                return False
            self._next_check = now + self._relogin_interval
            if now < self._expires and not self._refused:
                try:
                    await self._calls.lookup_self()
                    return False  # the token is good: the policy refused
                except VaultAccessDenied:
                    pass  # revoked
            self._refused = True
            log.warning(
                "the service's Vault token is gone: logging in again",
                extra={"method": self.method.name},
            )
            try:
                await self._log_in()
            except SecretsError:
                self._retry_later(now)  # by the loop, with backoff, from now on
                self._rescheduled.set()
                raise
            return True

    # -- under the lock ------------------------------------------------------------------------

    async def _upkeep(self, now: float) -> None:
        method = self.method
        try:
            if isinstance(method, TokenLogin):
                if not method.token:
                    self._due = math.inf
                elif self._known and self._renewable and not self._capped and not self._refused:
                    await self._renew()
                else:
                    await self._look_up()  # the lease is unknown, or the token was refused
            elif self._refused or not self.token:
                await self._log_in()
            elif self._renewable and not self._capped:
                try:
                    await self._renew()
                except VaultAccessDenied:
                    self._refused = True
                    await self._log_in()
            else:
                await self._log_in()  # not renewable, or at its max TTL: a fresh token
        except SecretsError:
            self._retry_later(now)

    async def _log_in(self, *, at_start: bool = False) -> None:
        method = self.method
        assert not isinstance(method, TokenLogin)
        started = self._clock()
        try:
            credentials = await method.credentials()
            assert credentials is not None
            grant = await self._calls.log_in(method.mount, credentials)
        except ConfigError as exc:
            self._count_login("error")
            if at_start:
                raise
            log.error("cannot log in to Vault", extra={"method": method.name, "error": str(exc)})
            raise VaultUnavailable("the service cannot log in to the secrets backend") from None
        except VaultAccessDenied:
            self._count_login("denied")
            raise
        except SecretsError:
            self._count_login("unavailable")
            raise
        self._count_login("ok")
        self._calls.use(grant.token)
        self._adopt(grant, started, fresh=True)
        log.info(
            "logged in to Vault",
            extra={"method": method.name, "ttl": grant.ttl, "renewable": grant.renewable},
        )

    async def _renew(self) -> None:
        started = self._clock()
        try:
            grant = await self._calls.renew_self()
        except VaultAccessDenied:
            self.renewals["denied"] = self.renewals.get("denied", 0) + 1
            self._refused = True
            log.error("Vault refused to renew the service's token", extra=self._about())
            raise
        except SecretsError:
            self.renewals["unavailable"] = self.renewals.get("unavailable", 0) + 1
            raise
        if not grant.ttl and self._ttl:
            grant = Grant(grant.token, 1, grant.renewable)  # under a second left, not forever
        capped = grant.ttl < self._ttl
        outcome = "capped" if capped else "ok"
        self.renewals[outcome] = self.renewals.get(outcome, 0) + 1
        self._capped = capped
        self._adopt(grant, started, fresh=False)
        if capped:
            if isinstance(self.method, TokenLogin):
                log.warning(
                    "the service's Vault token cannot be renewed past its max TTL: give the "
                    "service a new SECRETS_VAULT_TOKEN before it expires",
                    extra={**self._about(), "expires_in": grant.ttl},
                )
            else:
                log.info("the Vault token reached its max TTL: logging in again before it ends")

    async def _look_up(self) -> None:
        started = self._clock()
        try:
            grant = await self._calls.lookup_self()
        except VaultAccessDenied:
            self._refused = True
            log.error("Vault refuses SECRETS_VAULT_TOKEN", extra=self._about())
            raise
        self._known = True
        self._adopt(grant, started, fresh=False)
        if grant.ttl and not grant.renewable:
            log.warning(
                "SECRETS_VAULT_TOKEN is not renewable: the service loses Vault when it expires",
                extra={**self._about(), "expires_in": grant.ttl},
            )

    def _adopt(self, grant: Grant, started: float, *, fresh: bool) -> None:
        """Take `grant` as the token's lease, counted from `started` (the request's start, so
        the lease is never thought to end later than it does)."""
        self.token = grant.token or self.token
        if fresh:
            self._capped = False
            self._reported = False
        self._ttl = grant.ttl
        self._renewable = grant.renewable
        self._refused = False
        self._failures = 0
        if grant.ttl:
            self._expires = started + grant.ttl
            given = isinstance(self.method, TokenLogin)
            if not given or (grant.renewable and not self._capped):
                self._due = started + grant.ttl * RENEW_AT  # renew, or log in again
            else:
                self._due = self._expires  # nothing to do but say it has ended
        else:
            self._expires = self._due = math.inf
        self._rescheduled.set()

    def _retry_later(self, now: float) -> None:
        self._failures += 1
        backoff = min(2.0 ** (self._failures - 1), self._relogin_interval)
        left = self._expires - now
        if left > 0 and not math.isinf(left) and not self._refused:
            # Before the end, retry well within what is left; past it, at the backoff.
            backoff = min(backoff, max(left / 3, 0.5))
        self._due = now + backoff

    def _report_end(self) -> None:
        if self._reported or not self.token or self.valid:
            return
        self._reported = True
        if not self._refused:
            log.error("the service's Vault token has expired", extra=self._about())

    def _count_login(self, outcome: str) -> None:
        key = (self.method.name, outcome)
        self.logins[key] = self.logins.get(key, 0) + 1

    def _about(self) -> dict[str, str]:
        return {"method": self.method.name}

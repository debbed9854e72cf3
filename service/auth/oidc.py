"""Bearer JWT verification against one OIDC issuer: `OIDCVerifier` checks a token's header,
signature and claims, keeps its keys fresh (scheduled refetch) and caches verified tokens."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import math
import random
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import msgspec
from joserfc.errors import JoseError
from joserfc.jwa import JWS_ALGORITHMS, JWSAlgModel
from joserfc.jwk import Key

from schemas.errors import ConfigError, Unauthenticated
from service.auth.algorithms import ALGORITHMS, DEFAULT_ALGORITHMS
from service.auth.keys import (
    ISSUER_SETTING,
    FetchError,
    KeyRing,
    Trusted,
    check_transport,
    fetch_json,
    fetch_keys,
    find_key,
    printable,
)
from service.auth.principal import MAX_TOKEN_LENGTH, Principal

__all__ = ["OIDCVerifier"]

logger = logging.getLogger("secrets.auth")

# Only asymmetric algorithms may ever be configured: with a symmetric one, anyone holding the
# issuer's *public* key could mint tokens.
# Taken from joserfc's list rather than its JWSRegistry, whose get_alg() warns on EdDSA.
_ALG_MODELS: dict[str, JWSAlgModel] = {a.name: a for a in JWS_ALGORITHMS if a.name in ALGORITHMS}

_REFRESH_SETTING = "SECRETS_OIDC_JWKS_REFRESH"
# The shortest key lifetime the issuer's `Cache-Control: max-age` may set: a hostile `max-age=0`
# must not make every instance ask the issuer in a loop. The configured interval still wins.
_MAX_AGE_FLOOR = 5.0
# After a failed refetch the next try comes this soon, then twice as late each time, up to the
# configured interval; each delay is drawn in [d/2, d] so instances do not retry in step.
_RETRY_FIRST = 1.0
_MAX_HEADER_SEGMENT = 8 * 1024
_COMPACT_JWS = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)")
_NESTED_CONTENT_TYPES = frozenset({"JWT", "APPLICATION/JWT"})


class _Seen:
    """What a failure log line may name: the header's `kid` and the verified token's `iss`."""

    __slots__ = ("iss", "kid")

    def __init__(self) -> None:
        self.kid: str | None = None
        self.iss: str | None = None


class OIDCVerifier:
    """Verifies bearer JWTs signed by one OIDC issuer for one audience.

    Call `start()` once (it reads discovery and the JWKS, and starts the scheduled refetch),
    then `verify()` per request, and `aclose()` at the end.

    Keys are trusted for at most `jwks_refresh` seconds after they were fetched (less if the
    JWKS answer's `Cache-Control: max-age` says so, but never under 5 s): a background task
    refetches them on that schedule, and a verification that finds them older (the task is
    late) refetches first. A key the issuer withdrew, or replaced under the same `kid`, then
    stops vouching for the tokens it verified, cached ones included. If the issuer cannot be
    reached, the known keys stay in use and the refetch is retried with backoff.
    """

    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        roles_claim: str = "roles",
        algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
        leeway: float = 30.0,
        max_lifetime: float = 86400.0,
        refetch_interval: float = 5.0,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        cache_size: int = 10000,
        jwks_refresh: float = 300.0,
    ) -> None:
        if not issuer:
            raise ConfigError(ISSUER_SETTING, "the OIDC issuer URL is empty")
        check_transport(issuer, "the issuer URL")
        if not (math.isfinite(jwks_refresh) and jwks_refresh > 0):
            raise ConfigError(_REFRESH_SETTING, "must be a positive number of seconds")
        if not audience:
            raise ConfigError("SECRETS_OIDC_AUDIENCE", "the expected audience is empty")
        refused = sorted(set(algorithms) - ALGORITHMS)
        if refused or not algorithms:
            raise ConfigError(
                "SECRETS_OIDC_ALGORITHMS",
                f"only asymmetric signature algorithms are allowed (refused: {refused})",
            )
        self._issuer = issuer
        self._audience = audience
        self._discovery_url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        self._roles_claim = roles_claim
        self._algorithms = {name: _ALG_MODELS[name] for name in algorithms}
        self._leeway = leeway
        self._max_lifetime = max_lifetime
        self._refetch_interval = refetch_interval
        self._jwks_refresh = jwks_refresh
        self._clock = clock
        self._cache_size = cache_size
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=5.0)
        self._jwks_uri: str | None = None
        self._ring = KeyRing(())
        self._last_fetch = -math.inf
        # The keys are trusted until `_fresh_until` (on `clock`); the scheduled task refetches
        # them at `_refresh_due` (on the event loop's clock, which its sleeps follow).
        self._fresh_until = -math.inf
        self._refresh_due = -math.inf
        self._failures = 0
        self._refetch_task: asyncio.Task[None] | None = None
        self._schedule_task: asyncio.Task[None] | None = None
        # sha256(token) -> (Principal, fingerprint of the key that verified it), least recently
        # used first. Never the token itself.
        self._cache: OrderedDict[bytes, tuple[Principal, bytes]] = OrderedDict()

    async def start(self) -> None:
        """Read the issuer's discovery document and its JWKS; ConfigError if that fails."""
        try:
            discovery, _ = await fetch_json(self._http, self._discovery_url)
        except FetchError as exc:
            raise ConfigError(ISSUER_SETTING, f"cannot read OIDC discovery: {exc}") from exc
        advertised = discovery.get("issuer")
        if advertised != self._issuer:
            raise ConfigError(
                ISSUER_SETTING,
                f"discovery at {self._discovery_url} names issuer {advertised!r},"
                f" not {self._issuer!r}",
            )
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise ConfigError(ISSUER_SETTING, "OIDC discovery has no http(s) jwks_uri")
        check_transport(jwks_uri, "the discovery document's jwks_uri")
        self._last_fetch = self._clock()
        try:
            ring, max_age = await fetch_keys(self._http, jwks_uri)
        except FetchError as exc:
            raise ConfigError(ISSUER_SETTING, f"cannot read the issuer's JWKS: {exc}") from exc
        self._jwks_uri = jwks_uri
        self._install(ring)
        self._trust_for(self._key_lifetime(max_age))
        if self._schedule_task is None:
            self._schedule_task = asyncio.get_running_loop().create_task(
                self._refresh_on_schedule(), name="jwks-refresh"
            )

    async def aclose(self) -> None:
        """Stop the scheduled refetch (and one in flight); close the HTTP client if ours."""
        tasks = [t for t in (self._schedule_task, self._refetch_task) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._schedule_task = None
        if self._owns_http:
            await self._http.aclose()

    async def verify(self, token: str) -> Principal:
        """The Principal of a valid token; Unauthenticated(reason) otherwise."""
        if not token or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            raise _log_rejection(Unauthenticated("malformed"), _Seen())
        digest = hashlib.sha256(token.encode("ascii")).digest()
        if self._clock() >= self._fresh_until:
            # The scheduled refetch is late: keys older than the bound are not trusted, nor
            # are the tokens they verified, until the issuer has been asked again.
            await self._refetch_stale_keys()
        entry = self._cache.get(digest)
        if entry is not None:
            principal = entry[0]
            if self._clock() < principal.expires_at + self._leeway:
                self._cache.move_to_end(digest)
                return principal
            del self._cache[digest]
            raise _log_rejection(Unauthenticated("expired"), _Seen())

        seen = _Seen()
        try:
            principal, fingerprint = await self._verify_uncached(token, seen)
        except Unauthenticated as exc:
            _log_rejection(exc, seen)
            raise
        # Cached only under a key still in the ring, so that a later ring drops it.
        if self._cache_size > 0 and fingerprint in self._ring.fingerprints:
            self._cache[digest] = (principal, fingerprint)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return principal

    def cached(self, token: str) -> Principal | None:
        """The Principal of a token verified before and not expired yet; None otherwise.

        Synchronous, for the cached-read fast path: it never raises and logs nothing, so a
        caller that gets None calls `verify`, which decides and logs the refusal. None too while
        the keys are older than their bound: `verify` refetches them first.
        """
        if not token.isascii():
            return None
        digest = hashlib.sha256(token.encode("ascii")).digest()
        entry = self._cache.get(digest)
        if entry is None:
            return None
        now = self._clock()
        principal = entry[0]
        if now >= principal.expires_at + self._leeway or now >= self._fresh_until:
            return None
        self._cache.move_to_end(digest)
        return principal

    async def _verify_uncached(self, token: str, seen: _Seen) -> tuple[Principal, bytes]:
        match = _COMPACT_JWS.fullmatch(token)
        if match is None or len(match[1]) > _MAX_HEADER_SEGMENT:
            raise Unauthenticated("malformed")
        header = _json_object(match[1])

        # Decided from the header alone, before any key is looked up.
        alg_name = header.get("alg")
        alg = self._algorithms.get(alg_name) if isinstance(alg_name, str) else None
        if alg is None:
            raise Unauthenticated("bad_algorithm")
        if "crit" in header or header.get("b64", True) is not True:
            raise Unauthenticated("unsupported_header")
        cty = header.get("cty")
        if cty is not None and not isinstance(cty, str):
            raise Unauthenticated("malformed")
        if cty is not None and cty.upper() in _NESTED_CONTENT_TYPES:
            raise Unauthenticated("unsupported_header")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthenticated("malformed")
        seen.kid = kid
        # `jku`, `x5u`, `jwk` and `x5c` are never read: keys come from the configured issuer only.
        trusted = await self._select_key(alg, kid)

        signature = _b64decode(match[3])
        signing_input = token[: match.end(2)].encode("ascii")
        if not self._check_signature(alg, trusted.key, signing_input, signature):
            raise Unauthenticated("bad_signature")

        claims = _json_object(match[2])
        iss = claims.get("iss")
        seen.iss = iss if isinstance(iss, str) else None
        return self._principal(claims), trusted.fingerprint

    def _check_signature(
        self, alg: JWSAlgModel, key: Key, signing_input: bytes, signature: bytes
    ) -> bool:
        try:
            return alg.verify(signing_input, signature, key)
        except (JoseError, ValueError, TypeError):
            return False

    async def _select_key(self, alg: JWSAlgModel, kid: str | None) -> Trusted:
        if self._jwks_uri is None:
            raise Unauthenticated("issuer_unavailable")
        trusted = find_key(self._ring, alg, kid)
        if trusted is None:
            await self._refetch_keys()
            trusted = find_key(self._ring, alg, kid)
            if trusted is None:
                raise Unauthenticated("unknown_key")
        return trusted

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        now = self._clock()
        iss = claims.get("iss")
        if iss is None:
            raise Unauthenticated("missing_claim")
        if iss != self._issuer:
            raise Unauthenticated("wrong_issuer")
        aud = claims.get("aud")
        if aud is None:
            raise Unauthenticated("missing_claim")
        if aud != self._audience and not (isinstance(aud, list) and self._audience in aud):
            raise Unauthenticated("wrong_audience")

        exp = _numeric_claim(claims, "exp")
        if exp is None:
            raise Unauthenticated("missing_claim")
        if now >= exp + self._leeway:
            raise Unauthenticated("expired")
        nbf = _numeric_claim(claims, "nbf")
        if nbf is not None and nbf > now + self._leeway:
            raise Unauthenticated("not_yet_valid")
        iat = _numeric_claim(claims, "iat")
        if iat is not None and iat > now + self._leeway:
            raise Unauthenticated("issued_in_future")
        issued = iat if iat is not None else nbf
        if issued is None:
            # Without a start, the lifetime cannot be bounded.
            raise Unauthenticated("missing_claim")
        if exp - issued > self._max_lifetime:
            raise Unauthenticated("lifetime_too_long")

        sub = claims.get("sub")
        if sub is None:
            raise Unauthenticated("missing_claim")
        if not isinstance(sub, str) or not sub:
            raise Unauthenticated("invalid_claim")
        client_id = claims.get("azp")
        if client_id is None:
            client_id = claims.get("client_id")
        if client_id is not None and not isinstance(client_id, str):
            raise Unauthenticated("invalid_claim")
        roles = claims.get(self._roles_claim)
        # A scope claim that is present narrows: null (or any non-string) is refused rather than
        # read as "no scopes", which would switch narrowing off. Both present: both narrow.
        scopes: frozenset[str] | None = None
        for name in ("scope", "scp"):
            if name in claims:
                found = _string_set(claims[name])
                scopes = found if scopes is None else scopes & found
        return Principal(
            subject=sub,
            client_id=client_id,
            roles=frozenset() if roles is None else _string_set(roles),
            scopes=scopes,
            expires_at=exp,
        )

    async def _refetch_keys(self) -> None:
        """Refetch the JWKS (for an unknown kid) unless that was tried within `refetch_interval`.

        Concurrent callers share one in-flight fetch, so a flood of unknown kids costs the issuer
        at most one request per interval.
        """
        if self._refetch_task is None:
            now = self._clock()
            if 0 <= now - self._last_fetch < self._refetch_interval or self._jwks_uri is None:
                return
        # Shielded: one caller giving up must not cancel the fetch the others wait on.
        await asyncio.shield(self._refetch_shared())

    async def _refetch_stale_keys(self) -> None:
        """Refetch keys past their lifetime. Not rate limited: each fetch, failed or not, moves
        the lifetime on (by the retry delay at least, see `_refetch`), so it cannot loop."""
        if self._jwks_uri is not None:
            await asyncio.shield(self._refetch_shared())

    def _refetch_shared(self) -> asyncio.Task[None]:
        """The JWKS fetch in flight, started if there is none."""
        task = self._refetch_task
        if task is None:
            assert self._jwks_uri is not None
            self._last_fetch = self._clock()
            task = asyncio.get_running_loop().create_task(self._refetch(self._jwks_uri))
            self._refetch_task = task
            task.add_done_callback(self._forget_refetch)
        return task

    def _forget_refetch(self, task: asyncio.Task[None]) -> None:
        if self._refetch_task is task:
            self._refetch_task = None

    async def _refetch(self, jwks_uri: str) -> None:
        try:
            ring, max_age = await fetch_keys(self._http, jwks_uri)
            self._install(ring)
        except Exception as exc:  # whatever went wrong, the known keys stay; so does a 401
            self._failures += 1
            retry = _RETRY_FIRST * 2.0 ** min(self._failures - 1, 30)
            delay = min(self._jwks_refresh, retry) * random.uniform(0.5, 1.0)
            if self._clock() + delay > self._fresh_until:  # keys within their lifetime stay so
                self._trust_for(delay)
            logger.warning(
                "JWKS refetch failed (%d in a row), keeping %d known keys, next try in %.1f s: %s",
                self._failures,
                len(self._ring.keys),
                self._fresh_until - self._clock(),
                exc,
            )
            return
        self._failures = 0
        self._trust_for(self._key_lifetime(max_age))

    async def _refresh_on_schedule(self) -> None:
        """Refetch the JWKS whenever the keys reach the end of their lifetime."""
        loop = asyncio.get_running_loop()
        while True:
            delay = self._refresh_due - loop.time()
            if delay > 0:
                # Woken at the due time as it was then; another fetch may have moved it on.
                await asyncio.sleep(delay)
                continue
            due = self._refresh_due
            await asyncio.shield(self._refetch_shared())
            if self._refresh_due == due:  # never spin, whatever went wrong
                self._refresh_due = loop.time() + min(_RETRY_FIRST, self._jwks_refresh)

    def _key_lifetime(self, max_age: float | None) -> float:
        """How long freshly fetched keys are trusted: the setting, or a shorter max-age."""
        if max_age is None:
            return self._jwks_refresh
        return min(self._jwks_refresh, max(max_age, _MAX_AGE_FLOOR))

    def _trust_for(self, seconds: float) -> None:
        self._fresh_until = self._clock() + seconds
        self._refresh_due = asyncio.get_running_loop().time() + seconds

    def _install(self, ring: KeyRing) -> None:
        old = self._ring
        self._ring = ring
        if ring.fingerprints == old.fingerprints:
            logger.debug("JWKS unchanged: %d signing keys", len(ring.keys))
            return
        gone = old.fingerprints - ring.fingerprints
        if gone:
            # A key withdrawn, or replaced under its kid, stops vouching for the tokens it
            # verified; tokens verified by the keys that stay are kept.
            dropped = [d for d, (_, fp) in self._cache.items() if fp not in ring.fingerprints]
            for digest in dropped:
                del self._cache[digest]
            kids = sorted(str(t.key.kid) for t in old.keys if t.fingerprint in gone)
            logger.info(
                "issuer withdrew or replaced signing keys, kids %s: %d cached tokens dropped",
                kids,
                len(dropped),
            )
        logger.info("loaded %d signing keys, kids %s", len(ring.keys), sorted(ring.by_kid))
        if not ring.keys:
            logger.warning("the issuer's JWKS holds no usable signing key: every token fails")


def _log_rejection(exc: Unauthenticated, seen: _Seen) -> Unauthenticated:
    logger.info(
        "bearer token rejected: reason=%s iss=%s kid=%s",
        exc.reason,
        printable(seen.iss),
        printable(seen.kid),
    )
    return exc


def _b64decode(segment: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:
        raise Unauthenticated("malformed") from exc


def _json_object(segment: str) -> dict[str, Any]:
    # Deep nesting raises RecursionError, invalid UTF-8 in a string UnicodeDecodeError.
    try:
        value = msgspec.json.decode(_b64decode(segment))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise Unauthenticated("malformed") from exc
    if not isinstance(value, dict):
        raise Unauthenticated("malformed")
    return value


def _numeric_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    # bool is an int subclass; "1700000000" is not a NumericDate.
    if type(value) is not int and type(value) is not float:
        raise Unauthenticated("invalid_claim")
    try:
        number = float(value)
    except OverflowError as exc:
        raise Unauthenticated("invalid_claim") from exc
    if not math.isfinite(number):
        raise Unauthenticated("invalid_claim")
    return number


def _string_set(value: object) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return frozenset(value)
    raise Unauthenticated("invalid_claim")

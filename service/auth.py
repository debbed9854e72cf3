"""Bearer JWT verification against an OIDC issuer: discovery, the issuer's JWKS (refetched,
rate limited, when an unknown `kid` shows up), signature and claim checks, a verified-token cache.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import msgspec
from joserfc.errors import JoseError
from joserfc.jwa import JWS_ALGORITHMS, JWSAlgModel
from joserfc.jwk import ECKey, Key, OKPKey, RSAKey

from service.errors import ConfigError, Unauthenticated

__all__ = [
    "DEFAULT_ALGORITHMS",
    "MAX_TOKEN_LENGTH",
    "REASONS",
    "OIDCVerifier",
    "Principal",
    "bearer_token",
]

logger = logging.getLogger("secrets.auth")

#: Why a token was refused: a closed set, for logs and metrics (`Unauthenticated.reason`).
REASONS: frozenset[str] = frozenset(
    {
        "missing_token",  # no Authorization header, or not a Bearer one
        "malformed",  # not a compact JWS: shape, base64url, JSON or size
        "unsupported_header",  # `crit`, `b64: false`, or a nested JWT (`cty: JWT`)
        "bad_algorithm",  # `alg` not in the allowed list, or not usable with the kid's key
        "unknown_key",  # no key for the `kid`, even after a (rate-limited) JWKS refetch
        "bad_signature",
        "expired",
        "not_yet_valid",
        "issued_in_future",
        "wrong_issuer",
        "wrong_audience",
        "lifetime_too_long",
        "missing_claim",  # iss, aud, exp or sub absent, or both iat and nbf absent
        "invalid_claim",  # a claim of the wrong type: exp as a string, sub as a number, ...
        "issuer_unavailable",  # no keys were ever loaded: start() has not succeeded
    }
)

DEFAULT_ALGORITHMS: tuple[str, ...] = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)

#: Largest token accepted, in characters (tokens are ASCII).
MAX_TOKEN_LENGTH = 16 * 1024

# Only asymmetric algorithms may ever be configured: with a symmetric one, anyone holding the
# issuer's *public* key could mint tokens.
_ASYMMETRIC = frozenset(DEFAULT_ALGORITHMS) | {"Ed25519", "Ed448"}
# Taken from joserfc's list rather than its JWSRegistry, whose get_alg() warns on EdDSA.
_ALG_MODELS: dict[str, JWSAlgModel] = {a.name: a for a in JWS_ALGORITHMS if a.name in _ASYMMETRIC}

_ISSUER_SETTING = "SECRETS_OIDC_ISSUER"
_MAX_HEADER_SEGMENT = 8 * 1024
_MAX_DOCUMENT_BYTES = 1024 * 1024
_COMPACT_JWS = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)")
_KEY_CLASSES: dict[str, type[RSAKey] | type[ECKey] | type[OKPKey]] = {
    "RSA": RSAKey,
    "EC": ECKey,
    "OKP": OKPKey,
}
# Only public members are imported: a JWKS that leaks private parts must not put them in memory.
_PUBLIC_MEMBERS: dict[str, tuple[str, ...]] = {
    "RSA": ("n", "e"),
    "EC": ("crv", "x", "y"),
    "OKP": ("crv", "x"),
}
_KEY_METADATA = ("kty", "kid", "alg", "use", "key_ops")
_MIN_RSA_BITS = 2048
_NESTED_CONTENT_TYPES = frozenset({"JWT", "APPLICATION/JWT"})


class Principal(msgspec.Struct, frozen=True):
    """Who a verified token speaks for."""

    subject: str
    client_id: str | None
    roles: frozenset[str]
    scopes: frozenset[str] | None
    expires_at: float


def bearer_token(authorization_header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header value."""
    if not authorization_header:
        raise Unauthenticated("missing_token")
    parts = authorization_header.split(None, 1)
    if not parts or parts[0].lower() != "bearer":
        raise Unauthenticated("missing_token")
    token = parts[1].strip() if len(parts) == 2 else ""
    if not token or len(token) > MAX_TOKEN_LENGTH or len(token.split(None, 1)) != 1:
        raise Unauthenticated("malformed")
    return token


class _FetchError(Exception):
    """The issuer did not serve a usable JSON document."""


class _KeyRing:
    """The issuer's verification keys, by `kid`; replaced whole, never mutated."""

    __slots__ = ("by_kid", "keys")

    def __init__(self, keys: Sequence[Key]) -> None:
        self.keys = tuple(keys)
        by_kid: dict[str, list[Key]] = {}
        for key in self.keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, []).append(key)
        self.by_kid = {kid: tuple(found) for kid, found in by_kid.items()}


class _Seen:
    """What a failure log line may name: the header's `kid` and the verified token's `iss`."""

    __slots__ = ("iss", "kid")

    def __init__(self) -> None:
        self.kid: str | None = None
        self.iss: str | None = None


class OIDCVerifier:
    """Verifies bearer JWTs signed by one OIDC issuer for one audience.

    Call `start()` once (it reads discovery and the JWKS), then `verify()` per request.
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
    ) -> None:
        if not issuer:
            raise ConfigError(_ISSUER_SETTING, "the OIDC issuer URL is empty")
        if not audience:
            raise ConfigError("SECRETS_OIDC_AUDIENCE", "the expected audience is empty")
        refused = sorted(set(algorithms) - _ASYMMETRIC)
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
        self._clock = clock
        self._cache_size = cache_size
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=5.0)
        self._jwks_uri: str | None = None
        self._ring = _KeyRing(())
        self._last_fetch = -math.inf
        self._refetch_task: asyncio.Task[None] | None = None
        # sha256(token) -> Principal, least recently used first. Never the token itself.
        self._cache: OrderedDict[bytes, Principal] = OrderedDict()

    async def start(self) -> None:
        """Read the issuer's discovery document and its JWKS; ConfigError if that fails."""
        try:
            discovery = await self._fetch_json(self._discovery_url)
        except _FetchError as exc:
            raise ConfigError(_ISSUER_SETTING, f"cannot read OIDC discovery: {exc}") from exc
        advertised = discovery.get("issuer")
        if advertised != self._issuer:
            raise ConfigError(
                _ISSUER_SETTING,
                f"discovery at {self._discovery_url} names issuer {advertised!r},"
                f" not {self._issuer!r}",
            )
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise ConfigError(_ISSUER_SETTING, "OIDC discovery has no http(s) jwks_uri")
        self._last_fetch = self._clock()
        try:
            ring = await self._fetch_keys(jwks_uri)
        except _FetchError as exc:
            raise ConfigError(_ISSUER_SETTING, f"cannot read the issuer's JWKS: {exc}") from exc
        self._jwks_uri = jwks_uri
        self._install(ring)

    async def aclose(self) -> None:
        if self._refetch_task is not None:
            self._refetch_task.cancel()
        if self._owns_http:
            await self._http.aclose()

    async def verify(self, token: str) -> Principal:
        """The Principal of a valid token; Unauthenticated(reason) otherwise."""
        if not token or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            raise _log_rejection(Unauthenticated("malformed"), _Seen())
        digest = hashlib.sha256(token.encode("ascii")).digest()
        cached = self._cached(digest)
        if cached is not None:
            return cached
        if self._cache.pop(digest, None) is not None:
            raise _log_rejection(Unauthenticated("expired"), _Seen())

        seen = _Seen()
        try:
            principal = await self._verify_uncached(token, seen)
        except Unauthenticated as exc:
            _log_rejection(exc, seen)
            raise
        if self._cache_size > 0:
            self._cache[digest] = principal
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return principal

    def cached(self, token: str) -> Principal | None:
        """The Principal of a token verified before and not expired yet; None otherwise.

        Synchronous, for the cached-read fast path: it never raises and logs nothing, so a
        caller that gets None calls `verify`, which decides and logs the refusal.
        """
        if not token.isascii():
            return None
        return self._cached(hashlib.sha256(token.encode("ascii")).digest())

    def _cached(self, digest: bytes) -> Principal | None:
        principal = self._cache.get(digest)
        if principal is None or self._clock() >= principal.expires_at + self._leeway:
            return None
        self._cache.move_to_end(digest)
        return principal

    async def _verify_uncached(self, token: str, seen: _Seen) -> Principal:
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
        key = await self._select_key(alg, kid)

        signature = _b64decode(match[3])
        signing_input = token[: match.end(2)].encode("ascii")
        if not self._check_signature(alg, key, signing_input, signature):
            raise Unauthenticated("bad_signature")

        claims = _json_object(match[2])
        iss = claims.get("iss")
        seen.iss = iss if isinstance(iss, str) else None
        return self._principal(claims)

    def _check_signature(
        self, alg: JWSAlgModel, key: Key, signing_input: bytes, signature: bytes
    ) -> bool:
        try:
            return alg.verify(signing_input, signature, key)
        except (JoseError, ValueError, TypeError):
            return False

    async def _select_key(self, alg: JWSAlgModel, kid: str | None) -> Key:
        if self._jwks_uri is None:
            raise Unauthenticated("issuer_unavailable")
        key = _find_key(self._ring, alg, kid)
        if key is None:
            await self._refetch_keys()
            key = _find_key(self._ring, alg, kid)
            if key is None:
                raise Unauthenticated("unknown_key")
        return key

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
        scope = claims.get("scope")
        if scope is None:
            scope = claims.get("scp")
        return Principal(
            subject=sub,
            client_id=client_id,
            roles=frozenset() if roles is None else _string_set(roles),
            scopes=None if scope is None else _string_set(scope),
            expires_at=exp,
        )

    async def _refetch_keys(self) -> None:
        """Refetch the JWKS unless that was tried within `refetch_interval`.

        Concurrent callers share one in-flight fetch, so a flood of unknown kids costs the issuer
        at most one request per interval.
        """
        task = self._refetch_task
        if task is None:
            now = self._clock()
            if 0 <= now - self._last_fetch < self._refetch_interval or self._jwks_uri is None:
                return
            self._last_fetch = now
            task = asyncio.create_task(self._refetch(self._jwks_uri))
            self._refetch_task = task
            task.add_done_callback(self._forget_refetch)
        # Shielded: one caller giving up must not cancel the fetch the others wait on.
        await asyncio.shield(task)

    def _forget_refetch(self, task: asyncio.Task[None]) -> None:
        if self._refetch_task is task:
            self._refetch_task = None

    async def _refetch(self, jwks_uri: str) -> None:
        try:
            ring = await self._fetch_keys(jwks_uri)
        except Exception as exc:  # whatever went wrong, the caller's answer stays a 401
            logger.warning(
                "JWKS refetch failed, keeping %d known keys: %s", len(self._ring.keys), exc
            )
            return
        self._install(ring)

    def _install(self, ring: _KeyRing) -> None:
        # A key withdrawn by the issuer must stop vouching for tokens cached under it.
        if set(self._ring.by_kid) - set(ring.by_kid):
            self._cache.clear()
        self._ring = ring
        logger.info("loaded %d signing keys, kids %s", len(ring.keys), sorted(ring.by_kid))

    async def _fetch_keys(self, jwks_uri: str) -> _KeyRing:
        document = await self._fetch_json(jwks_uri)
        entries = document.get("keys")
        if not isinstance(entries, list):
            raise _FetchError(f"{jwks_uri}: no 'keys' list")
        keys = [key for key in map(_verification_key, entries) if key is not None]
        return _KeyRing(keys)

    async def _fetch_json(self, url: str) -> dict[str, Any]:
        try:
            response = await self._http.get(url, headers={"accept": "application/json"})
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise _FetchError(f"{url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise _FetchError(f"{url}: HTTP {response.status_code}")
        if len(response.content) > _MAX_DOCUMENT_BYTES:
            raise _FetchError(f"{url}: document larger than {_MAX_DOCUMENT_BYTES} bytes")
        try:
            document = msgspec.json.decode(response.content)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise _FetchError(f"{url}: not JSON") from exc
        if not isinstance(document, dict):
            raise _FetchError(f"{url}: not a JSON object")
        return document


def _log_rejection(exc: Unauthenticated, seen: _Seen) -> Unauthenticated:
    logger.info(
        "bearer token rejected: reason=%s iss=%s kid=%s",
        exc.reason,
        _printable(seen.iss),
        _printable(seen.kid),
    )
    return exc


def _printable(value: str | None) -> str:
    # Both come from the caller: repr() escapes control characters, the cut bounds the line.
    return "-" if value is None else repr(value[:80])


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


def _usable(key: Key, alg: JWSAlgModel) -> bool:
    """Whether `key` may verify `alg`: key type, EC curve, and the JWK's own use/alg/key_ops."""
    try:
        alg.check_key(key)
        key.check_key_op("verify")
    except JoseError:
        return False
    if alg.name == "EdDSA":
        return isinstance(key, OKPKey) and key.curve_name in ("Ed25519", "Ed448")
    return True


def _find_key(ring: _KeyRing, alg: JWSAlgModel, kid: str | None) -> Key | None:
    if kid is None:
        usable = [key for key in ring.keys if _usable(key, alg)]
        return usable[0] if len(usable) == 1 else None
    candidates = ring.by_kid.get(kid)
    if not candidates:
        return None
    for key in candidates:
        if _usable(key, alg):
            return key
    raise Unauthenticated("bad_algorithm")


def _verification_key(entry: object) -> Key | None:
    """An asymmetric signature key from one JWKS entry; None for anything else."""
    if not isinstance(entry, dict):
        return None
    kty = entry.get("kty")
    kid = entry.get("kid")
    if not isinstance(kty, str) or kty not in _KEY_CLASSES or entry.get("use", "sig") != "sig":
        return None  # symmetric (`oct`) and encryption keys never verify a token
    if kid is not None and not isinstance(kid, str):
        return None
    key_class = _KEY_CLASSES[kty]
    members = (*_KEY_METADATA, *_PUBLIC_MEMBERS[kty])
    public = {name: entry[name] for name in members if name in entry}
    # Sized before the import, which warns (SecurityWarning) on a weak key: an error under -W.
    bits = _modulus_bits(public.get("n")) if kty == "RSA" else None
    if bits is not None and bits < _MIN_RSA_BITS:
        logger.warning(
            "ignoring JWKS key kid=%s: RSA key under %d bits", _printable(kid), _MIN_RSA_BITS
        )
        return None
    try:
        key: Key = key_class.import_key(public)
    except (JoseError, ValueError, TypeError, KeyError):
        logger.warning("ignoring JWKS key kid=%s: cannot import it", _printable(kid))
        return None
    if isinstance(key, OKPKey) and key.curve_name not in ("Ed25519", "Ed448"):
        return None
    return key


def _modulus_bits(n: object) -> int | None:
    """The size of an RSA JWK's modulus `n`; None if it is not base64url (the import says so)."""
    if not isinstance(n, str):
        return None
    try:
        raw = base64.urlsafe_b64decode(n + "=" * (-len(n) % 4))
    except (binascii.Error, ValueError):
        return None
    return int.from_bytes(raw, "big").bit_length()

"""The issuer's keys: discovery and JWKS documents fetched over a transport that cannot swap
them (`check_transport`), the asymmetric verification keys they give, and the `KeyRing` of them."""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import httpx
import msgspec
from joserfc.errors import JoseError
from joserfc.jwa import JWSAlgModel
from joserfc.jwk import ECKey, Key, OKPKey, RSAKey

from schemas.errors import ConfigError, Unauthenticated

__all__ = [
    "ISSUER_SETTING",
    "FetchError",
    "KeyRing",
    "Trusted",
    "check_transport",
    "fetch_json",
    "fetch_keys",
    "find_key",
    "printable",
]

logger = logging.getLogger("secrets.auth")

ISSUER_SETTING = "SECRETS_OIDC_ISSUER"
_MAX_DOCUMENT_BYTES = 1024 * 1024
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


class FetchError(Exception):
    """The issuer did not serve a usable JSON document."""


class Trusted(NamedTuple):
    """A key of the issuer's, and its fingerprint: SHA-256 of its public JWK (material, kid, alg,
    use, key_ops), which the verified-token cache records for each token the key verified."""

    key: Key
    fingerprint: bytes


class KeyRing:
    """The issuer's verification keys, by `kid`; replaced whole, never mutated."""

    __slots__ = ("by_kid", "fingerprints", "keys")

    def __init__(self, keys: Sequence[Key]) -> None:
        self.keys = tuple(Trusted(key, _fingerprint(key)) for key in keys)
        self.fingerprints = frozenset(trusted.fingerprint for trusted in self.keys)
        by_kid: dict[str, list[Trusted]] = {}
        for trusted in self.keys:
            if trusted.key.kid is not None:
                by_kid.setdefault(trusted.key.kid, []).append(trusted)
        self.by_kid = {kid: tuple(found) for kid, found in by_kid.items()}


async def fetch_keys(http: httpx.AsyncClient, jwks_uri: str) -> tuple[KeyRing, float | None]:
    """The keys at `jwks_uri`, and the max-age its answer allows them (None: not given)."""
    document, headers = await fetch_json(http, jwks_uri)
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise FetchError(f"{jwks_uri}: no 'keys' list")
    keys = [key for key in map(_verification_key, entries) if key is not None]
    return KeyRing(keys), _max_age(headers.get_list("cache-control"))


async def fetch_json(http: httpx.AsyncClient, url: str) -> tuple[dict[str, Any], httpx.Headers]:
    """The JSON object at `url`, and its answer's headers; FetchError if there is none."""
    try:
        response = await http.get(url, headers={"accept": "application/json"})
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise FetchError(f"{url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise FetchError(f"{url}: HTTP {response.status_code}")
    if len(response.content) > _MAX_DOCUMENT_BYTES:
        raise FetchError(f"{url}: document larger than {_MAX_DOCUMENT_BYTES} bytes")
    try:
        document = msgspec.json.decode(response.content)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise FetchError(f"{url}: not JSON") from exc
    if not isinstance(document, dict):
        raise FetchError(f"{url}: not a JSON object")
    return document, response.headers


def check_transport(url: str, what: str) -> None:
    """ConfigError unless keys fetched from `url` cannot be swapped on the way: https, or plain
    http to a loopback address (127.0.0.0/8, ::1, localhost), as a dev OpenBao serves them."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:  # an unbalanced `[` in the host
        raise ConfigError(ISSUER_SETTING, f"{what} is not a URL") from None
    if parts.scheme == "https" and host:
        return
    if parts.scheme == "http" and _is_loopback(host):
        return
    # The host only: a URL's user:password@ part must not reach the error line.
    raise ConfigError(
        ISSUER_SETTING,
        f"{what} must use https (plain http only to a loopback address),"
        f" not {parts.scheme}://{host}",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":  # urlsplit lowercases the host
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _max_age(cache_control: Sequence[str]) -> float | None:
    """The shortest `max-age` of Cache-Control values, in seconds; None if there is none.

    A value that is not delta-seconds (negative, fractional, a word) is ignored; one too large
    to represent counts as 2**31 (RFC 9111, 1.2.2), and the setting caps it anyway.
    """
    found: float | None = None
    for value in cache_control:
        for directive in value.split(","):
            name, _, argument = directive.partition("=")
            if name.strip().lower() != "max-age":
                continue
            argument = argument.strip()
            if len(argument) >= 2 and argument[0] == argument[-1] == '"':
                argument = argument[1:-1]
            if not argument.isascii() or not argument.isdigit():
                continue
            seconds = float(2**31) if len(argument) > 10 else float(argument)
            found = seconds if found is None else min(found, seconds)
    return found


def _fingerprint(key: Key) -> bytes:
    return hashlib.sha256(msgspec.json.encode(key.as_dict(private=False), order="sorted")).digest()


def find_key(ring: KeyRing, alg: JWSAlgModel, kid: str | None) -> Trusted | None:
    if kid is None:
        usable = [trusted for trusted in ring.keys if _usable(trusted.key, alg)]
        return usable[0] if len(usable) == 1 else None
    candidates = ring.by_kid.get(kid)
    if not candidates:
        return None
    for trusted in candidates:
        if _usable(trusted.key, alg):
            return trusted
    raise Unauthenticated("bad_algorithm")


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
            "ignoring JWKS key kid=%s: RSA key under %d bits", printable(kid), _MIN_RSA_BITS
        )
        return None
    try:
        key: Key = key_class.import_key(public)
    except (JoseError, ValueError, TypeError, KeyError):
        logger.warning("ignoring JWKS key kid=%s: cannot import it", printable(kid))
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


def printable(value: str | None) -> str:
    # Both come from the caller: repr() escapes control characters, the cut bounds the line.
    return "-" if value is None else repr(value[:80])

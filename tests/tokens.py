"""Tokens and issuers for the auth tests: JWS signing by hand, a fake issuer behind
httpx.MockTransport (with its fixtures), and a real issuer on a loopback port.

Signing is done here rather than by a JWT library so a test can produce the headers and
algorithms a library would refuse to (`alg: HS256` under an RSA `kid`, a dropped `kid`, ...).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from joserfc.jwa import JWS_ALGORITHMS
from joserfc.jwk import ECKey, Key, RSAKey

from devstack import free_port
from schemas.errors import Unauthenticated
from service.auth.oidc import OIDCVerifier
from service.auth.principal import REASONS

__all__ = [
    "ALGS",
    "ATTACKER",
    "AUDIENCE",
    "DROP",
    "ISSUER",
    "JWKS_URI",
    "NOW",
    "Clock",
    "FakeIssuer",
    "LocalIssuer",
    "MakeVerifier",
    "b64",
    "b64json",
    "claims",
    "clock",
    "count_signature_checks",
    "hs256",
    "http",
    "k1",
    "k2",
    "make_verifier",
    "rejection",
    "sign",
    "token",
]

ISSUER = "https://bao.test:8200/v1/identity/oidc"
JWKS_URI = ISSUER + "/.well-known/keys"
AUDIENCE = "secrets-service"
NOW = 1_800_000_000.0
ATTACKER = "https://attacker.test"

ALGS = {alg.name: alg for alg in JWS_ALGORITHMS}
DROP = object()
"""A claim or header override that removes the entry instead of setting it."""


# --- signing ---------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64(json.dumps(value).encode())


def claims(**overrides: Any) -> dict[str, Any]:
    """Good claims for the fake issuer; an override of DROP removes the claim."""
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "entity-1234",
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 300,
        "roles": ["app-reader", "app-writer"],
        "scope": "secrets:read secrets:write",
        "azp": "payments",
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not DROP}


def sign(payload: dict[str, Any], key: Key, alg: str = "RS256", **header: Any) -> str:
    """A compact JWS over `payload`, with `kid` from the key unless the header overrides it."""
    protected: dict[str, Any] = {"alg": alg, "typ": "JWT", "kid": key.kid, **header}
    protected = {name: value for name, value in protected.items() if value is not DROP}
    signing_input = f"{b64json(protected)}.{b64json(payload)}"
    return f"{signing_input}.{b64(ALGS[alg].sign(signing_input.encode(), key))}"


def token(key: Key, kid: str | None = None, **overrides: Any) -> str:
    """A token signed by `key` (under `kid` if given) with good claims but for `overrides`."""
    alg = "ES256" if isinstance(key, ECKey) else "RS256"
    return sign(claims(**overrides), key, alg, kid=kid or key.kid)


def hs256(payload: dict[str, Any], secret: bytes, kid: str) -> str:
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{b64json(payload)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


# --- the fake issuer (httpx.MockTransport) and its fixtures ------------------------------------


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeIssuer:
    """Discovery and JWKS for ISSUER, an attacker's JWKS elsewhere; every request is recorded."""

    def __init__(self, keys: list[Key]) -> None:
        self.keys = keys
        self.extra_jwks: list[dict[str, Any]] = []
        self.advertised_issuer = ISSUER
        self.down = False
        self.jwks_delay = 0.0
        self.cache_control: str | None = None  # sent with the JWKS when set
        self.requests: list[httpx.URL] = []

    def jwks_fetches(self) -> int:
        return sum(1 for url in self.requests if str(url) == JWKS_URI)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url)
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        url = str(request.url)
        if url == ISSUER + "/.well-known/openid-configuration":
            return httpx.Response(
                200, json={"issuer": self.advertised_issuer, "jwks_uri": JWKS_URI}
            )
        if url == JWKS_URI:
            await asyncio.sleep(self.jwks_delay)
            published = [key.as_dict(private=False) for key in self.keys]
            headers = {} if self.cache_control is None else {"cache-control": self.cache_control}
            return httpx.Response(200, json={"keys": published + self.extra_jwks}, headers=headers)
        if url.startswith(ATTACKER):
            return httpx.Response(200, json={"keys": []})
        return httpx.Response(404)


# Shared fixtures: a module imports the ones it uses and defines its own `issuer` (a FakeIssuer).


@pytest.fixture(scope="module")
def k1() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "k1"})


@pytest.fixture(scope="module")
def k2() -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": "k2"})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def http(issuer: FakeIssuer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(issuer.handle)) as client:
        yield client


MakeVerifier = Callable[..., Awaitable[OIDCVerifier]]


@pytest.fixture
async def make_verifier(http: httpx.AsyncClient, clock: Clock) -> AsyncIterator[MakeVerifier]:
    """Started verifiers for ISSUER with the given options, each closed after the test."""
    made: list[OIDCVerifier] = []

    async def make(**options: Any) -> OIDCVerifier:
        verifier = OIDCVerifier(ISSUER, AUDIENCE, http=http, clock=clock, **options)
        made.append(verifier)
        await verifier.start()
        return verifier

    yield make
    for verifier in made:
        await verifier.aclose()


async def rejection(verifier: OIDCVerifier, token: str) -> str:
    """The reason `verify` gives for refusing `token`, after checking the 401 header."""
    with pytest.raises(Unauthenticated) as info:
        await verifier.verify(token)
    assert info.value.reason in REASONS
    assert info.value.www_authenticate.startswith("Bearer")
    return info.value.reason


def count_signature_checks(
    verifier: OIDCVerifier, monkeypatch: pytest.MonkeyPatch
) -> Callable[[], int]:
    """A counter of the signature checks `verifier` makes from now on (cache hits make none)."""
    calls = 0
    original = verifier._check_signature

    def counting(*args: Any) -> bool:
        nonlocal calls
        calls += 1
        return original(*args)

    monkeypatch.setattr(verifier, "_check_signature", counting)
    return lambda: calls


# --- a real issuer on a loopback port ----------------------------------------------------------


class LocalIssuer:
    """An OIDC issuer on a loopback port (http.server in a thread); every request is recorded."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.keys = keys
        self.requests: list[str] = []
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
                issuer.requests.append(self.path)
                if self.path == "/.well-known/openid-configuration":
                    body: Any = {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks"}
                elif self.path == "/jwks":
                    body = {"keys": issuer.keys}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: pytest would show these lines

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LocalIssuer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

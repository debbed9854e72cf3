"""Hostile bearer tokens through HTTP: each kind is a 401 with its reason, none reaches Vault.

The service runs for real (uvicorn, OpenBao, NATS) against an issuer this module controls: a
discovery document and a JWKS served on a loopback port, keys generated here. A second issuer
(its own valid key, never trusted) and an attacker's server (named by `jku`/`x5u`) run beside
it; the attacker's server must never be asked for anything.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, Key, OctKey, OKPKey, RSAKey

from service.auth.principal import MAX_TOKEN_LENGTH
from service.vault.backend import HvacBackend
from tests.fakes import SpyBackend
from tests.support import running_service, service_settings, write_policy
from tests.tokens import ALGS, LocalIssuer, b64, b64json, hs256, sign

AUDIENCE = "secrets-service"


@dataclass(frozen=True)
class Keys:
    rsa: RSAKey
    ec: ECKey
    ed: OKPKey
    weak: RSAKey  # 1024 bits: published, but too weak to be trusted
    oct: OctKey  # symmetric: published, never usable
    attacker: RSAKey  # published nowhere we trust
    other: RSAKey  # the second issuer's own key


def _weak_rsa_key() -> RSAKey:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)  # that is the point of this key
        return RSAKey.generate_key(1024, parameters={"kid": "weak-1"})


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}),
        ec=ECKey.generate_key("P-256", parameters={"kid": "ec-1"}),
        ed=OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"}),
        weak=_weak_rsa_key(),
        oct=OctKey.generate_key(256, parameters={"kid": "oct-1"}),
        attacker=RSAKey.generate_key(2048, parameters={"kid": "attacker-1"}),
        other=RSAKey.generate_key(2048, parameters={"kid": "other-1"}),
    )


class Issuers:
    def __init__(self, ours: LocalIssuer, other: LocalIssuer, attacker: LocalIssuer) -> None:
        self.ours = ours
        self.other = other
        self.attacker = attacker


@pytest.fixture(scope="module")
def issuers(keys: Keys) -> Iterator[Issuers]:
    published = [
        keys.rsa.as_dict(private=False),
        keys.ec.as_dict(private=False),
        keys.ed.as_dict(private=False),
        keys.weak.as_dict(private=False),
        keys.oct.as_dict(),  # a careless JWKS publishing a shared secret
    ]
    with (
        LocalIssuer(published) as ours,
        LocalIssuer([keys.other.as_dict(private=False)]) as other,
        LocalIssuer([keys.attacker.as_dict(private=False)]) as attacker,
    ):
        yield Issuers(ours, other, attacker)


class Target:
    def __init__(self, url: str, spy: SpyBackend) -> None:
        self.url = url
        self.spy = spy


@pytest.fixture(scope="module")
async def target(
    issuers: Issuers, openbao: Any, nats: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Target]:
    policy = write_policy(tmp_path_factory.mktemp("hostile-tokens"))
    oidc = SimpleNamespace(issuer=issuers.ours.url, audience=AUDIENCE)
    settings = service_settings(openbao, nats, oidc, policy)
    spy = SpyBackend(HvacBackend(openbao.addr, token=openbao.root_token))
    async with running_service(settings, backend=spy) as svc:
        yield Target(svc.url, spy)
    await spy.aclose()  # injected: not the app's to close


# -- the corpus ------------------------------------------------------------------------------


def _claims(iss: str, **overrides: Any) -> dict[str, Any]:
    now = time.time()
    base: dict[str, Any] = {
        "iss": iss,
        "aud": AUDIENCE,
        "sub": "hostile-test",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "roles": ["admin"],
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def _raw(header: bytes, payload: bytes, key: Key, alg: str = "RS256") -> str:
    """A token signed over segments given as raw bytes (JSON no encoder would write)."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    return f"{signing_input}.{b64(ALGS[alg].sign(signing_input.encode(), key))}"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


Headers = dict[str, str] | dict[bytes, bytes]
Corpus = dict[str, tuple[Headers, str | None]]


def corpus(keys: Keys, issuers: Issuers) -> Corpus:
    """Kind of bad token -> (request headers, the reason the 401 must give)."""
    iss = issuers.ours.url

    def good(**overrides: Any) -> dict[str, Any]:
        return _claims(iss, **overrides)

    valid = sign(good(), keys.rsa)
    header, payload, signature = valid.split(".")
    forged_claims = b64json({**good(), "roles": ["admin", "root"], "sub": "someone-else"})
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    attacker_jwks = issuers.attacker.url + "/jwks"
    kinds: dict[str, tuple[Headers, str | None]] = {
        # the Authorization header itself
        "no_authorization_header": ({}, None),
        "basic_scheme": ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
        "bearer_without_token": ({"Authorization": "Bearer"}, "malformed"),
        "not_a_jwt": (_bearer("not-a-jwt"), "malformed"),
        "two_segments": (_bearer(f"{header}.{payload}"), "malformed"),
        "token_with_inner_space": (_bearer(f"{header}.{payload} .{signature}"), "malformed"),
        "oversized": (_bearer(valid + "A" * (MAX_TOKEN_LENGTH + 1 - len(valid))), "malformed"),
        "non_ascii": ({b"Authorization": b"Bearer " + "é.é.é".encode()}, "malformed"),
        # shape of the header and payload
        "header_not_an_object": (_bearer(_raw(b"[1]", b"{}", keys.rsa)), "malformed"),
        "header_invalid_utf8": (
            _bearer(_raw(b'{"alg":"RS256","kid":"\xff\xfe"}', b"{}", keys.rsa)),
            "malformed",
        ),
        "header_nested_3000_deep": (
            _bearer(
                _raw(b'{"alg":"RS256","x":' + b"[" * 3000 + b"]" * 3000 + b"}", b"{}", keys.rsa)
            ),
            "malformed",
        ),
        "kid_not_a_string": (_bearer(sign(good(), keys.rsa, kid=["rsa-1"])), "malformed"),
        "payload_not_an_object": (
            _bearer(_raw(b'{"alg":"RS256","kid":"rsa-1"}', b'["admin"]', keys.rsa)),
            "malformed",
        ),
        "exp_beyond_float_range": (
            _bearer(
                _raw(
                    b'{"alg":"RS256","kid":"rsa-1"}',
                    json.dumps(good(exp=0)).encode().replace(b'"exp": 0', b'"exp": 1e400'),
                    keys.rsa,
                )
            ),
            "malformed",
        ),
        # algorithms and keys
        "alg_none": (_bearer(f"{b64json({'alg': 'none'})}.{b64json(good())}."), "bad_algorithm"),
        "hs256_with_the_public_key_as_secret": (
            _bearer(hs256(good(), keys.rsa.as_pem(private=False), "rsa-1")),
            "bad_algorithm",
        ),
        "hs256_with_an_oct_key_from_the_jwks": (
            _bearer(hs256(good(), keys.oct.raw_value, "oct-1")),
            "bad_algorithm",
        ),
        "alg_outside_the_list": (
            _bearer(f"{b64json({'alg': 'ES256K', 'kid': 'ec-1'})}.{b64json(good())}.c2ln"),
            "bad_algorithm",
        ),
        "rs256_naming_an_ec_key": (_bearer(sign(good(), keys.rsa, kid="ec-1")), "bad_algorithm"),
        "es384_naming_a_p256_key": (
            _bearer(sign(good(), ECKey.generate_key("P-384"), "ES384", kid="ec-1")),
            "bad_algorithm",
        ),
        "eddsa_naming_an_rsa_key": (
            _bearer(sign(good(), keys.ed, "EdDSA", kid="rsa-1")),
            "bad_algorithm",
        ),
        "weak_rsa_key_in_the_jwks": (_bearer(sign(good(), keys.weak)), "unknown_key"),
        # signatures
        "payload_changed_under_the_signature": (
            _bearer(f"{header}.{forged_claims}.{signature}"),
            "bad_signature",
        ),
        "signature_flipped": (_bearer(f"{header}.{payload}.{flipped}"), "bad_signature"),
        "signature_empty": (_bearer(f"{header}.{payload}."), "bad_signature"),
        "attacker_key_under_our_kid": (
            _bearer(sign(good(), keys.attacker, kid="rsa-1")),
            "bad_signature",
        ),
        "unknown_kid": (_bearer(sign(good(), keys.attacker)), "unknown_key"),
        "kid_path_traversal": (
            _bearer(sign(good(), keys.attacker, kid="../../../../etc/passwd")),
            "unknown_key",
        ),
        "jku_pointing_elsewhere": (
            _bearer(sign(good(), keys.attacker, jku=attacker_jwks)),
            "unknown_key",
        ),
        "x5u_pointing_elsewhere": (
            _bearer(sign(good(), keys.attacker, x5u=attacker_jwks)),
            "unknown_key",
        ),
        "embedded_jwk_of_the_attacker": (
            _bearer(sign(good(), keys.attacker, jwk=keys.attacker.as_dict(private=False))),
            "unknown_key",
        ),
        "crit_header": (_bearer(sign(good(), keys.rsa, crit=["exp"])), "unsupported_header"),
        "nested_jwt": (_bearer(sign(good(), keys.rsa, cty="JWT")), "unsupported_header"),
        "unencoded_payload_b64_false": (
            _bearer(sign(good(), keys.rsa, b64=False)),
            "unsupported_header",
        ),
        # claims
        "expired": (_bearer(sign(good(exp=time.time() - 120), keys.rsa)), "expired"),
        "not_yet_valid": (_bearer(sign(good(nbf=time.time() + 600), keys.rsa)), "not_yet_valid"),
        "issued_in_the_future": (
            _bearer(sign(good(iat=time.time() + 600, exp=time.time() + 900), keys.rsa)),
            "issued_in_future",
        ),
        "exp_as_a_string": (
            _bearer(sign(good(exp=str(int(time.time() + 300))), keys.rsa)),
            "invalid_claim",
        ),
        "exp_as_a_boolean": (_bearer(sign(good(exp=True), keys.rsa)), "invalid_claim"),
        "aud_list_without_ours": (
            _bearer(sign(good(aud=["billing", "secrets-service-x"]), keys.rsa)),
            "wrong_audience",
        ),
        "aud_of_another_service": (_bearer(sign(good(aud="billing"), keys.rsa)), "wrong_audience"),
        "no_aud": (_bearer(sign(good(aud=_DROP), keys.rsa)), "missing_claim"),
        "no_exp": (_bearer(sign(good(exp=_DROP), keys.rsa)), "missing_claim"),
        "no_sub": (_bearer(sign(good(sub=_DROP), keys.rsa)), "missing_claim"),
        "sub_not_a_string": (_bearer(sign(good(sub=42), keys.rsa)), "invalid_claim"),
        "roles_not_strings": (
            _bearer(sign(good(roles=[{"admin": True}]), keys.rsa)),
            "invalid_claim",
        ),
        "lifetime_of_a_year": (
            _bearer(sign(good(exp=time.time() + 365 * 86400), keys.rsa)),
            "lifetime_too_long",
        ),
        # other issuers
        "our_key_but_another_iss": (
            _bearer(sign(_claims(issuers.other.url), keys.rsa)),
            "wrong_issuer",
        ),
        "another_issuer_with_its_valid_signature": (
            _bearer(sign(_claims(issuers.other.url), keys.other)),
            "unknown_key",
        ),
        "another_issuers_key_claiming_our_iss": (
            _bearer(sign(good(), keys.other)),
            "unknown_key",
        ),
    }
    return kinds


KINDS = [
    "no_authorization_header", "basic_scheme", "bearer_without_token", "not_a_jwt",
    "two_segments", "token_with_inner_space", "oversized", "non_ascii", "header_not_an_object",
    "header_invalid_utf8", "header_nested_3000_deep", "kid_not_a_string", "payload_not_an_object",
    "exp_beyond_float_range", "alg_none", "hs256_with_the_public_key_as_secret",
    "hs256_with_an_oct_key_from_the_jwks", "alg_outside_the_list", "rs256_naming_an_ec_key",
    "es384_naming_a_p256_key", "eddsa_naming_an_rsa_key", "weak_rsa_key_in_the_jwks",
    "payload_changed_under_the_signature", "signature_flipped", "signature_empty",
    "attacker_key_under_our_kid", "unknown_kid", "kid_path_traversal", "jku_pointing_elsewhere",
    "x5u_pointing_elsewhere", "embedded_jwk_of_the_attacker", "crit_header", "nested_jwt",
    "unencoded_payload_b64_false", "expired", "not_yet_valid", "issued_in_the_future",
    "exp_as_a_string", "exp_as_a_boolean", "aud_list_without_ours", "aud_of_another_service",
    "no_aud", "no_exp", "no_sub", "sub_not_a_string", "roles_not_strings", "lifetime_of_a_year",
    "our_key_but_another_iss", "another_issuer_with_its_valid_signature",
    "another_issuers_key_claiming_our_iss",
]  # fmt: skip


@pytest.fixture(scope="module")
def tokens(keys: Keys, issuers: Issuers) -> Corpus:
    return corpus(keys, issuers)


def test_the_corpus_holds_at_least_25_kinds_and_the_list_names_each_once(tokens: Corpus) -> None:
    assert len(KINDS) >= 25
    assert sorted(KINDS) == sorted(tokens)


async def test_a_token_signed_by_the_local_issuer_is_accepted(
    target: Target, keys: Keys, issuers: Issuers
) -> None:
    # The control: without it, every 401 below could come from a misconfigured issuer.
    token = sign(_claims(issuers.ours.url), keys.rsa)
    async with httpx.AsyncClient(base_url=target.url) as client:
        response = await client.get("/secrets/app/hostile-control", headers=_bearer(token))
    assert response.status_code == 404
    for key in (keys.ec, keys.ed):
        alg = "ES256" if isinstance(key, ECKey) else "EdDSA"
        token = sign(_claims(issuers.ours.url), key, alg)
        async with httpx.AsyncClient(base_url=target.url) as client:
            response = await client.get("/secrets/app/hostile-control", headers=_bearer(token))
        assert response.status_code == 404, alg


@pytest.mark.parametrize("kind", KINDS)
async def test_each_kind_of_bad_token_is_401_with_its_reason_and_never_reaches_vault(
    target: Target, tokens: Corpus, kind: str
) -> None:
    headers, reason = tokens[kind]
    before = len(target.spy.paths)
    async with httpx.AsyncClient(base_url=target.url) as client:
        for request in _requests(client, headers):
            response = await request()
            assert response.status_code == 401, (kind, response.text)
            assert response.json()["error"] == "unauthenticated"
            challenge = response.headers["www-authenticate"]
            if reason is None:
                assert challenge == 'Bearer realm="secrets"'
            else:
                assert f'error_description="{reason}"' in challenge, challenge
    assert target.spy.paths[before:] == []


def _requests(client: httpx.AsyncClient, headers: Headers) -> list[Callable[[], Any]]:
    body = {"data": {"password": "Hostile-Write-8c1d"}, "version": 0}
    return [
        lambda: client.get("/secrets/app/db", headers=headers),
        lambda: client.patch("/secrets/app/hostile", json=body, headers=headers),
    ]


async def test_the_attackers_server_was_never_asked_for_anything(
    target: Target, issuers: Issuers, tokens: Corpus
) -> None:
    # The kinds that name other servers are sent here too, so this holds in any test order.
    async with httpx.AsyncClient(base_url=target.url) as client:
        for kind in (
            "jku_pointing_elsewhere",
            "x5u_pointing_elsewhere",
            "embedded_jwk_of_the_attacker",
            "another_issuer_with_its_valid_signature",
            "another_issuers_key_claiming_our_iss",
        ):
            for request in _requests(client, tokens[kind][0]):
                assert (await request()).status_code == 401, kind
    assert issuers.attacker.requests == []
    assert issuers.other.requests == []
    assert all(
        path in ("/.well-known/openid-configuration", "/jwks") for path in issuers.ours.requests
    )


async def test_after_the_corpus_the_service_is_healthy_and_still_serves(
    target: Target, keys: Keys, issuers: Issuers
) -> None:
    async with httpx.AsyncClient(base_url=target.url) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        token = sign(_claims(issuers.ours.url), keys.rsa)
        response = await client.get("/secrets/app/hostile-control", headers=_bearer(token))
        assert response.status_code == 404

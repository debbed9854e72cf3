"""service.auth.oidc: JWT verification, JWKS refetch and the verified-token cache.

The issuer is a fake served through httpx.MockTransport; tokens are signed by hand where a test
needs a header or an algorithm a real library would refuse to produce (both in tests/tokens.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from joserfc.jwk import ECKey, Key, OctKey, OKPKey, RSAKey

from schemas.errors import ConfigError, Unauthenticated
from service.auth.algorithms import DEFAULT_ALGORITHMS
from service.auth.oidc import OIDCVerifier
from service.auth.principal import MAX_TOKEN_LENGTH, Principal
from tests import tokens
from tests.tokens import (
    ALGS,
    ATTACKER,
    AUDIENCE,
    DROP,
    ISSUER,
    NOW,
    Clock,
    FakeIssuer,
    MakeVerifier,
    b64,
    b64json,
    claims,
    count_signature_checks,
    hs256,
    rejection,
    sign,
)

# Fixtures of tests/tokens.py, used as they are (`http` serves this module's `issuer`).
clock = tokens.clock
http = tokens.http
make_verifier = tokens.make_verifier

# --- keys and the fake issuer --------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})


@pytest.fixture(scope="module")
def ec_key() -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": "ec-1"})


@pytest.fixture(scope="module")
def ed_key() -> OKPKey:
    return OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"})


@pytest.fixture(scope="module")
def rotated_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "rsa-2"})


@pytest.fixture(scope="module")
def attacker_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "attacker-1"})


@pytest.fixture
def issuer(rsa_key: RSAKey, ec_key: ECKey, ed_key: OKPKey) -> FakeIssuer:
    return FakeIssuer([rsa_key, ec_key, ed_key])


@pytest.fixture
async def verifier(http: httpx.AsyncClient, clock: Clock) -> AsyncIterator[OIDCVerifier]:
    verifier = OIDCVerifier(ISSUER, AUDIENCE, http=http, clock=clock)
    await verifier.start()
    yield verifier
    await verifier.aclose()


# --- configuration and discovery ------------------------------------------------------------------


def test_default_algorithms_are_the_asymmetric_ones() -> None:
    assert DEFAULT_ALGORITHMS == (
        "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
    )  # fmt: skip


@pytest.mark.parametrize("algorithms", [("RS256", "HS256"), ("none",), ()])
def test_symmetric_none_or_empty_algorithm_lists_are_a_config_error(
    algorithms: tuple[str, ...],
) -> None:
    with pytest.raises(ConfigError) as info:
        OIDCVerifier(ISSUER, AUDIENCE, algorithms=algorithms)
    assert info.value.setting == "SECRETS_OIDC_ALGORITHMS"


def issuer_at(
    issuer: str, keys: list[Key], jwks_uri: str | None = None
) -> tuple[httpx.AsyncClient, list[str]]:
    """A client whose transport serves discovery and a JWKS for `issuer`, and the URLs asked."""
    jwks = jwks_uri or issuer + "/keys"
    asked: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        asked.append(url)
        if url == issuer + "/.well-known/openid-configuration":
            return httpx.Response(200, json={"issuer": issuer, "jwks_uri": jwks})
        if url == jwks:
            return httpx.Response(200, json={"keys": [k.as_dict(private=False) for k in keys]})
        return httpx.Response(404)

    return httpx.AsyncClient(transport=httpx.MockTransport(handle)), asked


@pytest.mark.parametrize(
    "url",
    [
        "http://bao.example:8200/v1/identity/oidc",
        "http://10.0.0.5:8200/v1/identity/oidc",
        "http://0.0.0.0:8200/v1/identity/oidc",
        "http://127.0.0.1.nip.io/v1/identity/oidc",
        "http://localhost.attacker.test/v1/identity/oidc",
        "http://[fe80::1]:8200/v1/identity/oidc",
        "ftp://bao.example/v1/identity/oidc",
    ],
)
async def test_a_plain_http_issuer_off_loopback_is_refused_at_start_before_any_request(
    rsa_key: RSAKey, url: str
) -> None:
    http, asked = issuer_at(url, [rsa_key])
    async with http:
        with pytest.raises(ConfigError) as info:
            verifier = OIDCVerifier(url, AUDIENCE, http=http)
            await verifier.start()
    assert info.value.setting == "SECRETS_OIDC_ISSUER"
    assert "https" in info.value.problem
    assert asked == []  # nothing went out in clear text


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8200/v1/identity/oidc",
        "http://127.3.2.1:8200/v1/identity/oidc",
        "http://localhost:8200/v1/identity/oidc",
        "http://[::1]:8200/v1/identity/oidc",
        "https://bao.example/v1/identity/oidc",
        "https://10.0.0.5:8200/v1/identity/oidc",
    ],
)
async def test_https_issuers_and_plain_http_on_loopback_are_accepted(
    rsa_key: RSAKey, url: str
) -> None:
    http, _ = issuer_at(url, [rsa_key])
    async with http:
        verifier = OIDCVerifier(url, AUDIENCE, http=http, clock=Clock())
        await verifier.start()
        try:
            token = sign(claims(iss=url), rsa_key)
            assert (await verifier.verify(token)).subject == "entity-1234"
        finally:
            await verifier.aclose()


async def test_a_plain_http_jwks_uri_off_loopback_is_refused_at_start(rsa_key: RSAKey) -> None:
    http, asked = issuer_at(ISSUER, [rsa_key], jwks_uri="http://keys.example/jwks")
    async with http:
        verifier = OIDCVerifier(ISSUER, AUDIENCE, http=http)
        with pytest.raises(ConfigError) as info:
            await verifier.start()
    assert info.value.setting == "SECRETS_OIDC_ISSUER"
    assert "http://keys.example/jwks" not in asked


async def test_discovery_naming_another_issuer_is_a_config_error(
    issuer: FakeIssuer, http: httpx.AsyncClient
) -> None:
    issuer.advertised_issuer = "https://evil.test"
    verifier = OIDCVerifier(ISSUER, AUDIENCE, http=http)
    with pytest.raises(ConfigError) as info:
        await verifier.start()
    assert info.value.setting == "SECRETS_OIDC_ISSUER"
    assert "evil.test" in info.value.problem


async def test_unreachable_discovery_is_a_config_error(
    issuer: FakeIssuer, http: httpx.AsyncClient
) -> None:
    issuer.down = True
    verifier = OIDCVerifier(ISSUER, AUDIENCE, http=http)
    with pytest.raises(ConfigError) as info:
        await verifier.start()
    assert info.value.setting == "SECRETS_OIDC_ISSUER"


async def test_discovery_answering_404_is_a_config_error(http: httpx.AsyncClient) -> None:
    verifier = OIDCVerifier(ISSUER + "/elsewhere", AUDIENCE, http=http)
    with pytest.raises(ConfigError, match="HTTP 404"):
        await verifier.start()


async def test_a_trailing_slash_on_the_issuer_is_stripped_for_discovery_only(
    issuer: FakeIssuer, http: httpx.AsyncClient
) -> None:
    issuer.advertised_issuer = ISSUER + "/"
    verifier = OIDCVerifier(ISSUER + "/", AUDIENCE, http=http)
    await verifier.start()
    await verifier.aclose()
    assert str(issuer.requests[0]) == ISSUER + "/.well-known/openid-configuration"


async def test_verify_before_start_is_issuer_unavailable(
    http: httpx.AsyncClient, rsa_key: RSAKey
) -> None:
    verifier = OIDCVerifier(ISSUER, AUDIENCE, http=http)
    assert await rejection(verifier, sign(claims(), rsa_key)) == "issuer_unavailable"


async def test_aclose_closes_only_a_client_the_verifier_created(http: httpx.AsyncClient) -> None:
    borrowed = OIDCVerifier(ISSUER, AUDIENCE, http=http)
    await borrowed.aclose()
    assert not http.is_closed

    owned = OIDCVerifier(ISSUER, AUDIENCE)
    own_client = owned._http
    await owned.aclose()
    assert own_client.is_closed


# --- valid tokens ---------------------------------------------------------------------------------


async def test_a_valid_rs256_token_gives_its_principal(
    verifier: OIDCVerifier, rsa_key: RSAKey
) -> None:
    principal = await verifier.verify(sign(claims(), rsa_key))
    assert principal == Principal(
        subject="entity-1234",
        client_id="payments",
        roles=frozenset({"app-reader", "app-writer"}),
        scopes=frozenset({"secrets:read", "secrets:write"}),
        expires_at=NOW + 300,
    )


async def test_a_valid_es256_token_with_space_separated_roles_and_scp_list_is_parsed(
    verifier: OIDCVerifier, ec_key: ECKey
) -> None:
    token = sign(
        claims(roles="ops admin", scope=DROP, scp=["a", "b"], azp=DROP, client_id="cli"),
        ec_key,
        "ES256",
    )
    principal = await verifier.verify(token)
    assert principal.roles == frozenset({"ops", "admin"})
    assert principal.scopes == frozenset({"a", "b"})
    assert principal.client_id == "cli"


async def test_a_valid_eddsa_token_verifies_without_a_deprecation_warning(
    verifier: OIDCVerifier, ed_key: OKPKey
) -> None:
    principal = await verifier.verify(sign(claims(), ed_key, "EdDSA"))
    assert principal.subject == "entity-1234"


async def test_null_roles_no_scope_and_no_client_give_empty_roles_and_no_scopes(
    verifier: OIDCVerifier, rsa_key: RSAKey
) -> None:
    token = sign(claims(roles=None, scope=DROP, azp=DROP), rsa_key)
    principal = await verifier.verify(token)
    assert principal.roles == frozenset()
    assert principal.scopes is None
    assert principal.client_id is None


async def test_roles_are_read_from_the_configured_claim(
    make_verifier: MakeVerifier, rsa_key: RSAKey
) -> None:
    verifier = await make_verifier(roles_claim="groups")
    principal = await verifier.verify(sign(claims(groups=["g1"]), rsa_key))
    assert principal.roles == frozenset({"g1"})


async def test_an_audience_list_containing_ours_is_accepted(
    verifier: OIDCVerifier, rsa_key: RSAKey
) -> None:
    principal = await verifier.verify(sign(claims(aud=["other", AUDIENCE]), rsa_key))
    assert principal.subject == "entity-1234"


async def test_a_token_without_kid_uses_the_only_key_usable_for_its_algorithm(
    verifier: OIDCVerifier, ec_key: ECKey
) -> None:
    principal = await verifier.verify(sign(claims(), ec_key, "ES256", kid=DROP))
    assert principal.subject == "entity-1234"


async def test_a_token_expired_within_the_leeway_is_still_accepted(
    verifier: OIDCVerifier, rsa_key: RSAKey
) -> None:
    token = sign(claims(iat=NOW - 310, nbf=DROP, exp=NOW - 10), rsa_key)
    assert (await verifier.verify(token)).expires_at == NOW - 10


async def test_nbf_bounds_the_lifetime_when_iat_is_absent(
    verifier: OIDCVerifier, rsa_key: RSAKey
) -> None:
    principal = await verifier.verify(sign(claims(iat=DROP), rsa_key))
    assert principal.subject == "entity-1234"


# --- time and claims ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"iat": NOW - 400, "exp": NOW - 31}, "expired"),
        ({"nbf": NOW + 31}, "not_yet_valid"),
        ({"iat": NOW + 31}, "issued_in_future"),
        ({"iss": "https://other-issuer.test"}, "wrong_issuer"),
        ({"iss": ISSUER + "/"}, "wrong_issuer"),
        ({"aud": "another-service"}, "wrong_audience"),
        ({"aud": ["a", "b"]}, "wrong_audience"),
        ({"aud": []}, "wrong_audience"),
        ({"exp": NOW + 86400 + 1}, "lifetime_too_long"),
        ({"exp": str(NOW + 300)}, "invalid_claim"),
        ({"exp": True}, "invalid_claim"),
        ({"iat": "now"}, "invalid_claim"),
        ({"exp": DROP}, "missing_claim"),
        ({"sub": DROP}, "missing_claim"),
        ({"iss": DROP}, "missing_claim"),
        ({"aud": DROP}, "missing_claim"),
        ({"iat": DROP, "nbf": DROP}, "missing_claim"),
        ({"sub": 42}, "invalid_claim"),
        ({"sub": ""}, "invalid_claim"),
        ({"roles": {"admin": True}}, "invalid_claim"),
        ({"roles": ["admin", 1]}, "invalid_claim"),
        ({"scope": 7}, "invalid_claim"),
        ({"scope": None}, "invalid_claim"),
        ({"scope": DROP, "scp": None}, "invalid_claim"),
        ({"scope": DROP, "scp": 5}, "invalid_claim"),
        ({"scope": "secrets:read", "scp": None}, "invalid_claim"),
        ({"scope": None, "scp": ["secrets:read"]}, "invalid_claim"),
        ({"scope": ["secrets:read", None]}, "invalid_claim"),
        ({"scope": {"secrets:read": True}}, "invalid_claim"),
        ({"azp": ["x"]}, "invalid_claim"),
    ],
)
async def test_a_correctly_signed_token_with_bad_claims_is_refused_with_the_exact_reason(
    verifier: OIDCVerifier, rsa_key: RSAKey, overrides: dict[str, Any], reason: str
) -> None:
    assert await rejection(verifier, sign(claims(**overrides), rsa_key)) == reason


async def test_the_max_lifetime_is_configurable(
    make_verifier: MakeVerifier, rsa_key: RSAKey
) -> None:
    verifier = await make_verifier(max_lifetime=60)
    assert await rejection(verifier, sign(claims(), rsa_key)) == "lifetime_too_long"


async def test_a_null_scope_is_refused_rather_than_switching_scope_narrowing_off(
    verifier: OIDCVerifier, rsa_key: RSAKey
) -> None:
    # The attack: an admin token whose issuer meant to narrow it, with `scope` rendered as null.
    for overrides in ({"scope": None}, {"scope": DROP, "scp": None}):
        token = sign(claims(roles=["admin"], **overrides), rsa_key)
        assert await rejection(verifier, token) == "invalid_claim"


async def test_a_token_carrying_both_scope_and_scp_is_narrowed_by_both(
    verifier: OIDCVerifier, rsa_key: RSAKey
) -> None:
    token = sign(claims(scope="secrets:read secrets:write", scp=["secrets:read", "x"]), rsa_key)
    assert (await verifier.verify(token)).scopes == frozenset({"secrets:read"})


async def test_an_empty_scope_narrows_to_nothing(verifier: OIDCVerifier, rsa_key: RSAKey) -> None:
    empty: list[object] = ["", []]
    for scope in empty:
        principal = await verifier.verify(sign(claims(scope=scope, sub=f"s{scope!r}"), rsa_key))
        assert principal.scopes == frozenset()


async def test_a_token_with_our_key_and_kid_but_another_issuer_is_wrong_issuer(
    verifier: OIDCVerifier, rsa_key: RSAKey
) -> None:
    token = sign(claims(iss="https://bao.test:8200/v1/identity/oidc/other"), rsa_key)
    assert await rejection(verifier, token) == "wrong_issuer"


# --- algorithms and keys --------------------------------------------------------------------------


async def test_alg_none_is_a_bad_algorithm(verifier: OIDCVerifier) -> None:
    token = f"{b64json({'alg': 'none', 'typ': 'JWT'})}.{b64json(claims())}."
    assert await rejection(verifier, token) == "bad_algorithm"


@pytest.mark.parametrize("encoding", ["pem", "der"])
async def test_hs256_signed_with_the_public_key_bytes_is_a_bad_algorithm(
    verifier: OIDCVerifier, rsa_key: RSAKey, encoding: str
) -> None:
    if encoding == "pem":
        secret = rsa_key.as_pem(private=False)
    else:
        secret = rsa_key.as_der(private=False)
    token = hs256(claims(), secret, "rsa-1")
    assert await rejection(verifier, token) == "bad_algorithm"


@pytest.mark.parametrize("alg", ["HS384", "RS1", "ES256K", "", 7, None])
async def test_any_algorithm_outside_the_list_is_a_bad_algorithm(
    verifier: OIDCVerifier, alg: Any
) -> None:
    token = f"{b64json({'alg': alg, 'kid': 'rsa-1'})}.{b64json(claims())}.c2ln"
    assert await rejection(verifier, token) == "bad_algorithm"


async def test_an_allowed_algorithm_that_is_not_configured_is_a_bad_algorithm(
    make_verifier: MakeVerifier, ec_key: ECKey
) -> None:
    verifier = await make_verifier(algorithms=["RS256"])
    assert await rejection(verifier, sign(claims(), ec_key, "ES256")) == "bad_algorithm"


async def test_rs256_naming_the_kid_of_an_ec_key_is_a_bad_algorithm(
    verifier: OIDCVerifier, rsa_key: RSAKey
) -> None:
    token = sign(claims(), rsa_key, "RS256", kid="ec-1")
    assert await rejection(verifier, token) == "bad_algorithm"


async def test_es384_naming_a_p256_key_is_a_bad_algorithm(
    verifier: OIDCVerifier, ec_key: ECKey
) -> None:
    token = sign(claims(), ECKey.generate_key("P-384"), "ES384", kid="ec-1")
    assert await rejection(verifier, token) == "bad_algorithm"


async def test_a_symmetric_key_in_the_jwks_does_not_verify_an_hs256_token(
    issuer: FakeIssuer, make_verifier: MakeVerifier
) -> None:
    secret = b"a shared secret of enough length"
    issuer.extra_jwks.append(
        OctKey.import_key(secret, {"kid": "sym"}).as_dict(private=True),
    )
    verifier = await make_verifier()
    assert await rejection(verifier, hs256(claims(), secret, "sym")) == "bad_algorithm"


async def test_a_tampered_signature_is_a_bad_signature(
    verifier: OIDCVerifier, rsa_key: RSAKey
) -> None:
    token = sign(claims(), rsa_key)
    head, _, signature = token.rpartition(".")
    middle = len(signature) // 2
    flipped = "A" if signature[middle] != "A" else "B"
    tampered = f"{head}.{signature[:middle]}{flipped}{signature[middle + 1 :]}"
    assert await rejection(verifier, tampered) == "bad_signature"


async def test_a_changed_payload_under_the_original_signature_is_a_bad_signature(
    verifier: OIDCVerifier, rsa_key: RSAKey
) -> None:
    header, _, signature = sign(claims(), rsa_key).split(".")
    forged = f"{header}.{b64json(claims(roles=['admin']))}.{signature}"
    assert await rejection(verifier, forged) == "bad_signature"


async def test_an_empty_signature_with_an_asymmetric_alg_is_a_bad_signature(
    verifier: OIDCVerifier, rsa_key: RSAKey
) -> None:
    header, payload, _ = sign(claims(), rsa_key).split(".")
    assert await rejection(verifier, f"{header}.{payload}.") == "bad_signature"


async def test_a_token_signed_by_another_key_under_our_kid_is_a_bad_signature(
    verifier: OIDCVerifier, attacker_key: RSAKey
) -> None:
    token = sign(claims(), attacker_key, kid="rsa-1")
    assert await rejection(verifier, token) == "bad_signature"


# --- headers that must be refused or ignored ------------------------------------------------------


async def test_a_crit_header_is_an_unsupported_header(
    verifier: OIDCVerifier, rsa_key: RSAKey
) -> None:
    token = sign(claims(), rsa_key, crit=["exp"], exp=NOW + 300)
    assert await rejection(verifier, token) == "unsupported_header"


async def test_an_unencoded_payload_header_is_an_unsupported_header(
    verifier: OIDCVerifier, rsa_key: RSAKey
) -> None:
    assert await rejection(verifier, sign(claims(), rsa_key, b64=False)) == "unsupported_header"


@pytest.mark.parametrize("cty", ["JWT", "jwt", "application/jwt"])
async def test_a_nested_jwt_is_an_unsupported_header(
    verifier: OIDCVerifier, rsa_key: RSAKey, cty: str
) -> None:
    assert await rejection(verifier, sign(claims(), rsa_key, cty=cty)) == "unsupported_header"


async def test_an_embedded_jwk_for_the_attackers_key_is_ignored(
    verifier: OIDCVerifier, issuer: FakeIssuer, attacker_key: RSAKey
) -> None:
    token = sign(claims(), attacker_key, jwk=attacker_key.as_dict(private=False))
    assert await rejection(verifier, token) == "unknown_key"
    token = sign(claims(), attacker_key, kid="rsa-1", jwk=attacker_key.as_dict(private=False))
    assert await rejection(verifier, token) == "bad_signature"


@pytest.mark.parametrize("header", ["jku", "x5u"])
async def test_key_urls_in_the_header_are_never_fetched(
    verifier: OIDCVerifier, issuer: FakeIssuer, clock: Clock, attacker_key: RSAKey, header: str
) -> None:
    clock.now += 60  # past the refetch interval: an unknown kid may refetch, but from the issuer
    token = sign(claims(), attacker_key, **{header: ATTACKER + "/jwks.json"})
    assert await rejection(verifier, token) == "unknown_key"
    assert issuer.jwks_fetches() == 2
    assert all(url.host == "bao.test" for url in issuer.requests)


async def test_an_x5c_chain_in_the_header_is_ignored(
    verifier: OIDCVerifier, attacker_key: RSAKey
) -> None:
    token = sign(claims(), attacker_key, x5c=[b64(attacker_key.as_der(private=False))])
    assert await rejection(verifier, token) == "unknown_key"


async def test_a_path_traversal_kid_is_an_unknown_key_and_names_no_url(
    verifier: OIDCVerifier, issuer: FakeIssuer, clock: Clock, rsa_key: RSAKey
) -> None:
    clock.now += 60
    token = sign(claims(), rsa_key, kid="../../etc/passwd")
    assert await rejection(verifier, token) == "unknown_key"
    assert all("passwd" not in str(url) for url in issuer.requests)


# --- malformed input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b",
        "a.b.c.d.e",
        "a.b.c",
        "é.é.é",
        "\ud800",
        "eyJhbGciOiJSUzI1NiJ9..c2ln",
        f"{b64(b'[1, 2]')}.{b64json({})}.c2ln",
        f"{b64(b'not json')}.{b64json({})}.c2ln",
        f"{b64(bytes(range(256)))}.{b64json({})}.c2ln",
        f"{b64(b'[' * 1000 + b']' * 1000)}.{b64json({})}.c2ln",
        b64(b'{"":' * 1200 + b"1" + b"}" * 1200) + ".e30.c2ln",
        "a" * (MAX_TOKEN_LENGTH + 1),
        "eyJ+.eyJ/.c2ln",
        "eyJhbGciOiJSUzI1NiJ9=.e30.c2ln",
    ],
)
async def test_garbage_empty_and_oversized_tokens_are_malformed(
    verifier: OIDCVerifier, token: str
) -> None:
    assert await rejection(verifier, token) == "malformed"


async def test_a_token_truncated_before_its_signature_is_malformed(
    verifier: OIDCVerifier, rsa_key: RSAKey
) -> None:
    truncated = sign(claims(), rsa_key).rpartition(".")[0]
    assert await rejection(verifier, truncated) == "malformed"


async def test_a_token_cut_mid_signature_is_refused(
    verifier: OIDCVerifier, rsa_key: RSAKey
) -> None:
    token = sign(claims(), rsa_key)
    assert await rejection(verifier, token[:-20]) == "bad_signature"
    assert await rejection(verifier, token[:-21]) == "malformed"  # 4n+1 base64url characters


@pytest.mark.parametrize("kid", [7, ["rsa-1"], {"a": 1}])
async def test_a_non_string_kid_is_malformed(
    verifier: OIDCVerifier, rsa_key: RSAKey, kid: Any
) -> None:
    assert await rejection(verifier, sign(claims(), rsa_key, kid=kid)) == "malformed"


@pytest.mark.parametrize("payload", [b'["x"]', b"not json", b"\xff\xfe", b'"a string"'])
async def test_a_signed_payload_that_is_not_a_json_object_is_malformed(
    verifier: OIDCVerifier, rsa_key: RSAKey, payload: bytes
) -> None:
    signing_input = f"{b64json({'alg': 'RS256', 'kid': 'rsa-1'})}.{b64(payload)}"
    signature = b64(ALGS["RS256"].sign(signing_input.encode(), rsa_key))
    assert await rejection(verifier, f"{signing_input}.{signature}") == "malformed"


# --- JWKS refetch ---------------------------------------------------------------------------------


async def test_unknown_kids_refetch_the_jwks_at_most_once_per_interval(
    verifier: OIDCVerifier,
    issuer: FakeIssuer,
    clock: Clock,
    rsa_key: RSAKey,
    rotated_key: RSAKey,
) -> None:
    assert issuer.jwks_fetches() == 1
    clock.now += 6
    assert await rejection(verifier, sign(claims(), rotated_key)) == "unknown_key"
    assert issuer.jwks_fetches() == 2

    clock.now += 1
    token = sign(claims(), rotated_key, kid="another-unknown")
    assert await rejection(verifier, token) == "unknown_key"
    assert issuer.jwks_fetches() == 2

    issuer.keys = [rotated_key]
    clock.now += 5
    principal = await verifier.verify(sign(claims(iat=clock.now), rotated_key))
    assert principal.subject == "entity-1234"
    assert issuer.jwks_fetches() == 3


async def test_concurrent_unknown_kids_share_one_jwks_fetch(
    verifier: OIDCVerifier, issuer: FakeIssuer, clock: Clock, attacker_key: RSAKey
) -> None:
    clock.now += 60
    issuer.jwks_delay = 0.05
    tokens = [sign(claims(), attacker_key, kid=f"flood-{n}") for n in range(20)]
    results = await asyncio.gather(
        *(verifier.verify(token) for token in tokens), return_exceptions=True
    )
    assert all(isinstance(r, Unauthenticated) and r.reason == "unknown_key" for r in results)
    assert issuer.jwks_fetches() == 2


async def test_an_unreachable_issuer_during_refetch_leaves_the_kid_unknown(
    verifier: OIDCVerifier,
    issuer: FakeIssuer,
    clock: Clock,
    rsa_key: RSAKey,
    rotated_key: RSAKey,
) -> None:
    issuer.down = True
    clock.now += 60
    assert await rejection(verifier, sign(claims(iat=clock.now), rotated_key)) == "unknown_key"
    # the keys already known keep working
    assert (await verifier.verify(sign(claims(iat=clock.now), rsa_key))).subject == "entity-1234"


async def test_a_key_withdrawn_by_the_issuer_stops_vouching_for_cached_tokens(
    verifier: OIDCVerifier,
    issuer: FakeIssuer,
    clock: Clock,
    rsa_key: RSAKey,
    rotated_key: RSAKey,
) -> None:
    token = sign(claims(exp=NOW + 3600), rsa_key)
    await verifier.verify(token)
    issuer.keys = [rotated_key]
    clock.now += 60
    await verifier.verify(sign(claims(iat=clock.now), rotated_key))
    assert await rejection(verifier, token) == "unknown_key"


# --- the verified-token cache ---------------------------------------------------------------------


async def test_a_cached_token_is_not_verified_again_until_it_expires(
    verifier: OIDCVerifier, clock: Clock, rsa_key: RSAKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks = count_signature_checks(verifier, monkeypatch)
    token = sign(claims(), rsa_key)
    first = await verifier.verify(token)
    second = await verifier.verify(token)
    assert second is first
    assert checks() == 1

    clock.now = NOW + 300 + 30
    assert await rejection(verifier, token) == "expired"
    assert checks() == 1


async def test_the_cache_keeps_only_the_most_recently_used_tokens(
    make_verifier: MakeVerifier, rsa_key: RSAKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = await make_verifier(cache_size=2)
    checks = count_signature_checks(verifier, monkeypatch)
    a, b, c = (sign(claims(sub=name), rsa_key) for name in "abc")
    for token in (a, b, a, c):  # c evicts b, the least recently used
        await verifier.verify(token)
    assert checks() == 3
    await verifier.verify(a)
    assert checks() == 3
    await verifier.verify(b)
    assert checks() == 4


async def test_the_cache_holds_digests_not_tokens(verifier: OIDCVerifier, rsa_key: RSAKey) -> None:
    token = sign(claims(), rsa_key)
    await verifier.verify(token)
    assert list(verifier._cache) == [hashlib.sha256(token.encode()).digest()]


async def test_a_zero_cache_size_verifies_every_time(
    make_verifier: MakeVerifier, rsa_key: RSAKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = await make_verifier(cache_size=0)
    checks = count_signature_checks(verifier, monkeypatch)
    token = sign(claims(), rsa_key)
    await verifier.verify(token)
    await verifier.verify(token)
    assert checks() == 2


async def test_cached_answers_only_for_a_token_verified_before_and_not_expired(
    verifier: OIDCVerifier, clock: Clock, rsa_key: RSAKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="secrets.auth")  # else INFO lines go unseen
    token = sign(claims(), rsa_key)
    assert verifier.cached(token) is None  # never verified: the caller verifies
    principal = await verifier.verify(token)
    caplog.clear()  # `verify` logs the keys it loaded; `cached` must log nothing at all
    assert verifier.cached(token) is principal
    assert verifier.cached(token + "x") is None
    assert verifier.cached("é" + token) is None  # not ASCII: never a token
    clock.now = NOW + 300 + 30
    assert verifier.cached(token) is None  # expired: `verify` says so, and logs it
    assert not caplog.records
    assert await rejection(verifier, token) == "expired"


# --- logging --------------------------------------------------------------------------------------


async def test_a_failure_logs_one_line_with_the_reason_and_never_the_token(
    verifier: OIDCVerifier, rsa_key: RSAKey, caplog: pytest.LogCaptureFixture
) -> None:
    token = sign(claims(aud="another-service", sub="very-private-subject"), rsa_key)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="secrets.auth"):
        await rejection(verifier, token)
    records = [r for r in caplog.records if r.name == "secrets.auth"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "reason=wrong_audience" in message
    assert ISSUER in message and "rsa-1" in message
    assert token not in message
    assert token.split(".")[1] not in message
    assert "very-private-subject" not in message
    assert records[0].levelno <= logging.WARNING

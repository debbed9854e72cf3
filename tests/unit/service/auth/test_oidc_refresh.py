"""service.auth.oidc: the keys are refetched on a schedule, so a key the issuer withdraws (or
replaces under the same `kid`) stops vouching for tokens, cached ones included.

The issuer is served through httpx.MockTransport with a fake clock (tests/tokens.py's
FakeIssuer). Through the running service: tests/integration/test_jwks_refresh.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import pytest
from joserfc.jwk import ECKey, RSAKey

from schemas.errors import ConfigError
from service.auth.oidc import OIDCVerifier
from tests import tokens
from tests.support import eventually
from tests.tokens import (
    AUDIENCE,
    ISSUER,
    NOW,
    Clock,
    FakeIssuer,
    MakeVerifier,
    count_signature_checks,
    rejection,
    token,
)

# Fixtures of tests/tokens.py, used as they are (`http` serves this module's `issuer`).
clock = tokens.clock
http = tokens.http
make_verifier = tokens.make_verifier
k1 = tokens.k1
k2 = tokens.k2

#: The shortest key lifetime an issuer's `Cache-Control: max-age` can impose (README).
MAX_AGE_FLOOR = 5.0


@pytest.fixture(scope="module")
def k1_replaced() -> RSAKey:
    """Other key material published under k1's `kid`."""
    return RSAKey.generate_key(2048, parameters={"kid": "k1"})


# --- the scheduled refresh ------------------------------------------------------------------------


@pytest.fixture
def issuer(k1: RSAKey, k2: ECKey) -> FakeIssuer:
    return FakeIssuer([k1, k2])


async def test_a_withdrawn_key_is_refused_after_the_refresh_interval_cached_tokens_included(
    make_verifier: MakeVerifier, issuer: FakeIssuer, k1: RSAKey, k2: ECKey
) -> None:
    verifier = await make_verifier(jwks_refresh=0.5)
    forged_admin = token(k1, roles=["admin"])  # made with a key that leaked
    principal = await verifier.verify(forged_admin)
    assert verifier.cached(forged_admin) is principal
    other = token(k2, sub="other")
    await verifier.verify(other)

    issuer.keys = [k2]  # the issuer withdraws the leaked key; nothing asks for an unknown kid
    await eventually(lambda: verifier.cached(forged_admin) is None)

    assert await rejection(verifier, forged_admin) == "unknown_key"
    assert await rejection(verifier, token(k1, sub="fresh")) == "unknown_key"
    assert verifier.cached(other) is not None
    assert (await verifier.verify(token(k2, sub="new"))).subject == "new"


async def test_a_verification_after_a_missed_refresh_refetches_before_trusting_a_key(
    make_verifier: MakeVerifier, issuer: FakeIssuer, clock: Clock, k1: RSAKey, k2: ECKey
) -> None:
    # The scheduled refresh is late (a starved loop, a suspended machine): the keys are older
    # than the bound when a request comes, and that request must not trust them.
    verifier = await make_verifier(jwks_refresh=300)
    cached = token(k1, exp=NOW + 3600)
    await verifier.verify(cached)
    issuer.keys = [k2]
    clock.now += 301

    assert verifier.cached(cached) is None  # the fast path never vouches from stale keys
    fresh = token(k1, iat=clock.now, nbf=clock.now, exp=clock.now + 300)
    assert await rejection(verifier, fresh) == "unknown_key"
    assert await rejection(verifier, cached) == "unknown_key"
    assert issuer.jwks_fetches() == 2


async def test_withdrawing_one_key_drops_only_the_tokens_that_key_verified(
    make_verifier: MakeVerifier,
    issuer: FakeIssuer,
    clock: Clock,
    k1: RSAKey,
    k2: ECKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    verifier = await make_verifier()
    by_k1, by_k2 = token(k1), token(k2)
    await verifier.verify(by_k1)
    kept = await verifier.verify(by_k2)
    checks = count_signature_checks(verifier, monkeypatch)

    issuer.keys = [k2]
    clock.now += 6
    # Any refetch will do (here: an unknown kid, past the 5 s rate limit).
    assert await rejection(verifier, token(k2, kid="unknown")) == "unknown_key"
    assert issuer.jwks_fetches() == 2

    assert verifier.cached(by_k1) is None
    assert verifier.cached(by_k2) is kept
    assert await verifier.verify(by_k2) is kept
    assert checks() == 0  # the token under the key that stayed was not verified again
    assert await rejection(verifier, by_k1) == "unknown_key"


async def test_a_key_replaced_under_the_same_kid_drops_the_tokens_cached_under_the_old_one(
    make_verifier: MakeVerifier,
    issuer: FakeIssuer,
    clock: Clock,
    k1: RSAKey,
    k1_replaced: RSAKey,
    k2: ECKey,
) -> None:
    verifier = await make_verifier()
    old, by_k2 = token(k1), token(k2)
    await verifier.verify(old)
    kept = await verifier.verify(by_k2)

    issuer.keys = [k1_replaced, k2]  # the kid stays; its material changes
    clock.now += 6
    # Any refetch will do (here: an unknown kid, past the 5 s rate limit); no kid disappears.
    assert await rejection(verifier, token(k2, kid="unknown")) == "unknown_key"
    assert issuer.jwks_fetches() == 2

    assert verifier.cached(old) is None
    assert await rejection(verifier, old) == "bad_signature"
    assert verifier.cached(by_k2) is kept
    assert (await verifier.verify(token(k1_replaced, sub="new"))).subject == "new"


@pytest.mark.parametrize(
    ("cache_control", "lifetime"),
    [
        ("max-age=60", 60),
        ("public, max-age=120, must-revalidate", 120),
        ('max-age="90"', 90),
        ("max-age=3600", 300),  # longer than the setting: capped
        ("max-age=0", MAX_AGE_FLOOR),  # a hostile (or careless) 0: floored
        ("max-age=2", MAX_AGE_FLOOR),
        ("max-age=-5", 300),  # absurd values are ignored
        ("max-age=soon", 300),
        ("max-age=1e2", 300),
        ("max-age=" + "9" * 400, 300),
        ("no-store", 300),
        (None, 300),
    ],
)
async def test_the_jwks_cache_control_max_age_shortens_the_key_lifetime_within_bounds(
    make_verifier: MakeVerifier,
    issuer: FakeIssuer,
    clock: Clock,
    k1: RSAKey,
    cache_control: str | None,
    lifetime: float,
) -> None:
    issuer.cache_control = cache_control
    verifier = await make_verifier(jwks_refresh=300)
    before = issuer.jwks_fetches()

    clock.now = NOW + lifetime - 1
    await verifier.verify(token(k1, iat=clock.now, nbf=clock.now, exp=clock.now + 60))
    assert issuer.jwks_fetches() == before

    clock.now = NOW + lifetime + 1
    await verifier.verify(token(k1, iat=clock.now, nbf=clock.now, exp=clock.now + 60))
    assert issuer.jwks_fetches() == before + 1


async def test_a_failed_scheduled_refetch_keeps_the_keys_and_is_retried_with_backoff(
    make_verifier: MakeVerifier,
    issuer: FakeIssuer,
    k1: RSAKey,
    k2: ECKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    verifier = await make_verifier(jwks_refresh=0.5)
    cached = token(k1)
    await verifier.verify(cached)
    issuer.down = True
    started, before = time.monotonic(), issuer.jwks_fetches()
    with caplog.at_level(logging.WARNING, logger="secrets.auth"):
        await eventually(lambda: issuer.jwks_fetches() >= before + 3)
    elapsed = time.monotonic() - started
    attempts = issuer.jwks_fetches() - before
    # Retried, but never in a tight loop: no retry comes sooner than half the interval.
    assert attempts <= elapsed / 0.25 + 2, (attempts, elapsed)
    assert any("JWKS refetch failed" in r.getMessage() for r in caplog.records)

    # The known keys keep working while the issuer is away.
    assert verifier.cached(cached) is not None
    assert (await verifier.verify(token(k1, sub="during-outage"))).subject == "during-outage"

    issuer.keys = [k2]
    issuer.down = False
    await eventually(lambda: verifier.cached(cached) is None)
    assert await rejection(verifier, cached) == "unknown_key"


async def test_a_stale_key_set_with_the_issuer_down_is_refetched_once_then_kept(
    make_verifier: MakeVerifier, issuer: FakeIssuer, clock: Clock, k1: RSAKey
) -> None:
    verifier = await make_verifier(jwks_refresh=300)
    issuer.down = True
    clock.now += 301
    for sub in ("a", "b", "c"):
        fresh = token(k1, sub=sub, iat=clock.now, nbf=clock.now, exp=clock.now + 60)
        assert (await verifier.verify(fresh)).subject == sub
    assert issuer.jwks_fetches() == 2  # one attempt; the next waits for the retry delay


async def test_aclose_stops_the_scheduled_refresh(
    make_verifier: MakeVerifier, issuer: FakeIssuer
) -> None:
    verifier = await make_verifier(jwks_refresh=0.2)
    await eventually(lambda: issuer.jwks_fetches() >= 2)
    await verifier.aclose()
    after = issuer.jwks_fetches()
    await asyncio.sleep(0.6)
    assert issuer.jwks_fetches() == after


@pytest.mark.parametrize("refresh", [0.0, -1.0, math.nan, math.inf])
def test_a_refresh_interval_that_is_not_a_positive_number_is_a_config_error(
    refresh: float,
) -> None:
    with pytest.raises(ConfigError) as info:
        OIDCVerifier(ISSUER, AUDIENCE, jwks_refresh=refresh)
    assert info.value.setting == "SECRETS_OIDC_JWKS_REFRESH"

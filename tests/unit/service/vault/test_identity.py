"""VaultIdentity against a fake of Vault's token endpoints on a fake clock: when a token is
renewed, when a login method logs in again (and when not), the JWT file read at each login, what
is reported and counted; and the one background loop on the real clock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from prometheus_client import generate_latest

from schemas.errors import ConfigError, VaultAccessDenied, VaultUnavailable
from service.obs.metrics import Metrics
from service.vault.identity import (
    AppRoleLogin,
    Grant,
    JwtLogin,
    TokenLogin,
    VaultIdentity,
    login_method,
)
from tests.fakes import FakeClock
from tests.support import eventually

if TYPE_CHECKING:
    from service.vault.identity import AuthCalls


@dataclass
class Lease:
    ends: float  # on the fake clock
    max_ends: float
    ttl: int
    renewable: bool


@dataclass
class FakeTokenVault:
    """Vault's token endpoints in memory, on `clock`: logins issue `ttl`-second tokens ending at
    the latest `max_ttl` after issue; renew-self extends by `ttl`, capped there. `down` makes
    every call fail as unreachable; `refuse_logins` refuses credentials."""

    clock: Callable[[], float]
    ttl: int = 30
    max_ttl: int = 300
    renewable: bool = True
    leases: dict[str, Lease] = field(default_factory=dict)
    in_use: str | None = None
    logins: list[Mapping[str, str]] = field(default_factory=list)
    renewals: int = 0
    lookups: int = 0
    down: bool = False
    refuse_logins: bool = False

    def issue(self, token: str, ttl: int | None = None, max_ttl: int | None = None) -> str:
        now = self.clock()
        ttl = self.ttl if ttl is None else ttl
        ends = now + ttl if ttl else math.inf
        max_ends = now + (self.max_ttl if max_ttl is None else max_ttl) if ttl else math.inf
        self.leases[token] = Lease(min(ends, max_ends), max_ends, ttl, self.renewable)
        return token

    def revoke_all(self) -> None:
        self.leases.clear()

    def _lease(self) -> Lease:
        if self.down:
            raise VaultUnavailable("down")
        lease = self.leases.get(self.in_use or "")
        if lease is None or self.clock() >= lease.ends:
            raise VaultAccessDenied("permission denied")
        return lease

    def _left(self, lease: Lease) -> int:
        return 0 if math.isinf(lease.ends) else math.ceil(lease.ends - self.clock())

    async def log_in(self, mount: str, credentials: Mapping[str, str]) -> Grant:
        if self.down:
            raise VaultUnavailable("down")
        self.logins.append(dict(credentials, mount=mount))
        if self.refuse_logins:
            raise VaultAccessDenied("invalid credentials")
        token = self.issue(f"token-{len(self.logins)}")
        return Grant(token, self.ttl, self.renewable)

    async def renew_self(self) -> Grant:
        self.renewals += 1
        lease = self._lease()
        if not lease.renewable:
            raise VaultUnavailable("lease is not renewable")  # Vault: 400
        lease.ends = min(self.clock() + lease.ttl, lease.max_ends)
        # As Vault: the TTL asked for, or what is left before the max TTL (whole seconds).
        left = lease.ttl if lease.ends < lease.max_ends else int(lease.ends - self.clock())
        return Grant(self.in_use or "", left, lease.renewable)

    async def lookup_self(self) -> Grant:
        self.lookups += 1
        lease = self._lease()
        return Grant("", self._left(lease), lease.renewable)

    def use(self, token: str | None) -> None:
        self.in_use = token


if TYPE_CHECKING:
    _calls: AuthCalls = FakeTokenVault(FakeClock())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def vault(clock: FakeClock) -> FakeTokenVault:
    return FakeTokenVault(clock)


def approle() -> AppRoleLogin:
    return AppRoleLogin("role-1", "secret-1")


async def run_for(identity: VaultIdentity, clock: FakeClock, seconds: float) -> None:
    """Drive `identity` as its loop would, on the fake clock, for `seconds`."""
    end = clock() + seconds
    while clock() < end:
        delay = await identity.tick()
        clock.advance(min(delay, end - clock()) if delay > 0 else 0.001)


# -- a given token ------------------------------------------------------------------------------


async def test_a_renewable_token_is_renewed_at_two_thirds_of_its_ttl_and_not_before(
    clock: FakeClock, vault: FakeTokenVault
) -> None:
    identity = VaultIdentity(TokenLogin(vault.issue("given")), vault, clock=clock)
    await identity.start()
    assert identity.valid and vault.lookups == 0  # start-up makes no call for a given token
    assert await identity.tick() == pytest.approx(20)  # looked up: renewed at 2/3 of 30 s
    assert vault.lookups == 1 and vault.renewals == 0
    clock.advance(19.9)
    await identity.tick()
    assert vault.renewals == 0
    clock.advance(0.1)
    assert await identity.tick() == pytest.approx(20)
    assert vault.renewals == 1
    await run_for(identity, clock, 200)  # well past the first TTL, before the max TTL
    assert identity.valid
    assert vault.renewals == 10  # every 20 s: at 20, 40, ..., 200


async def test_a_token_at_its_max_ttl_is_reported_once_and_stops_being_valid_at_its_end(
    clock: FakeClock, vault: FakeTokenVault, caplog: pytest.LogCaptureFixture
) -> None:
    identity = VaultIdentity(TokenLogin(vault.issue("given", max_ttl=50)), vault, clock=clock)
    await identity.start()
    with caplog.at_level(logging.WARNING, "secrets.vault"):
        await run_for(identity, clock, 49)
        assert identity.valid
        assert identity.renewals == {"ok": 1, "capped": 1}  # at 20 s: 30 more; at 40 s: 10
        assert sum("max TTL" in r.getMessage() for r in caplog.records) == 1
        await run_for(identity, clock, 100)
    assert not identity.valid
    assert identity.expires_in() <= 0
    assert vault.renewals == 2  # none once capped
    assert "given" not in caplog.text


async def test_a_token_that_is_not_renewable_is_never_renewed_and_ends_at_its_ttl(
    clock: FakeClock, vault: FakeTokenVault
) -> None:
    vault.renewable = False
    identity = VaultIdentity(TokenLogin(vault.issue("given")), vault, clock=clock)
    await identity.start()
    await run_for(identity, clock, 29)
    assert identity.valid and vault.renewals == 0
    await run_for(identity, clock, 2)
    assert not identity.valid and vault.renewals == 0


async def test_a_token_without_a_ttl_is_never_renewed_and_never_expires(
    clock: FakeClock, vault: FakeTokenVault
) -> None:
    identity = VaultIdentity(TokenLogin(vault.issue("root", ttl=0)), vault, clock=clock)
    await identity.start()
    assert await identity.tick() == math.inf
    clock.advance(10**7)
    assert identity.valid and identity.expires_in() == math.inf
    assert vault.renewals == 0 and vault.lookups == 1


async def test_a_given_token_vault_cannot_look_up_is_looked_up_again_with_backoff(
    clock: FakeClock, vault: FakeTokenVault
) -> None:
    vault.down = True
    identity = VaultIdentity(TokenLogin(vault.issue("given")), vault, clock=clock)
    await identity.start()  # no call, no raise: Vault may come later, readiness says so
    delays = []
    for _ in range(6):
        delay = await identity.tick()
        delays.append(delay)
        clock.advance(delay)
    assert delays == [1, 2, 4, 8, 10, 10]  # backoff up to relogin_interval
    vault.down = False
    vault.issue("given")  # Vault answers again
    await identity.tick()
    assert identity.valid and identity.expires_in() == pytest.approx(30)


async def test_a_given_token_is_never_replaced_after_a_refusal(
    clock: FakeClock, vault: FakeTokenVault
) -> None:
    identity = VaultIdentity(TokenLogin(vault.issue("given")), vault, clock=clock)
    await identity.start()
    vault.revoke_all()
    assert not await identity.replace("given")
    assert vault.logins == []


# -- AppRole -----------------------------------------------------------------------------------


async def test_approle_renews_its_login_token_and_logs_in_again_only_at_its_max_ttl(
    clock: FakeClock, vault: FakeTokenVault
) -> None:
    vault.max_ttl = 100
    identity = VaultIdentity(approle(), vault, clock=clock)
    await identity.start()
    assert len(vault.logins) == 1
    await run_for(identity, clock, 93)
    # Renewed at 20, 40, 60 and 80 (capped: 20 s left), logged in again at 80 + 2/3 x 20.
    assert len(vault.logins) == 1 and vault.renewals == 4
    assert identity.renewals == {"ok": 3, "capped": 1}
    await run_for(identity, clock, 1)
    assert len(vault.logins) == 2
    assert identity.token == "token-2" and vault.in_use == "token-2"
    assert identity.valid
    await run_for(identity, clock, 1000)
    assert identity.valid
    assert len(vault.logins) == 12  # one every 93.3 s (2/3 into each token's last 20 s)


async def test_approle_logs_in_again_when_its_renewal_is_refused(
    clock: FakeClock, vault: FakeTokenVault
) -> None:
    identity = VaultIdentity(approle(), vault, clock=clock)
    await identity.start()
    vault.revoke_all()
    clock.advance(20)
    await identity.tick()
    assert identity.renewals == {"denied": 1}
    assert len(vault.logins) == 2 and identity.valid


async def test_approle_with_a_token_that_is_not_renewable_logs_in_again_before_it_ends(
    clock: FakeClock, vault: FakeTokenVault
) -> None:
    vault.renewable = False
    identity = VaultIdentity(approle(), vault, clock=clock)
    await identity.start()
    await run_for(identity, clock, 61)
    assert vault.renewals == 0
    assert len(vault.logins) == 4  # at 0, 20, 40 and 60
    assert identity.valid


async def test_a_refused_request_with_a_good_token_makes_approle_log_in_no_more(
    clock: FakeClock, vault: FakeTokenVault
) -> None:
    identity = VaultIdentity(approle(), vault, clock=clock, relogin_interval=1)
    await identity.start()
    for _ in range(5):
        assert not await identity.replace("token-1")  # the policy refused, not the token
        clock.advance(1.1)
    assert len(vault.logins) == 1 and vault.lookups == 5


async def test_a_revoked_approle_token_is_replaced_at_most_once_per_relogin_interval(
    clock: FakeClock, vault: FakeTokenVault
) -> None:
    identity = VaultIdentity(approle(), vault, clock=clock, relogin_interval=10)
    await identity.start()
    vault.revoke_all()
    assert await identity.replace("token-1")
    assert identity.token == "token-2"
    assert await identity.replace("token-1")  # replaced meanwhile: try the new one
    vault.revoke_all()
    clock.advance(5)
    assert not await identity.replace("token-2")  # too soon after the last check
    clock.advance(5)
    assert await identity.replace("token-2")
    assert len(vault.logins) == 3


async def test_a_failing_relogin_is_retried_with_backoff_and_the_token_is_invalid_meanwhile(
    clock: FakeClock, vault: FakeTokenVault
) -> None:
    identity = VaultIdentity(approle(), vault, clock=clock, relogin_interval=10)
    await identity.start()
    vault.revoke_all()
    vault.refuse_logins = True
    clock.advance(20)
    await run_for(identity, clock, 60)
    assert not identity.valid
    # At 20, then 1, 2, 4, 8, 10, 10, 10 and 10 s apart.
    assert identity.logins[("approle", "denied")] == 9
    vault.refuse_logins = False
    await run_for(identity, clock, 11)
    assert identity.valid
    assert identity.logins[("approle", "ok")] == 2


async def test_an_approle_login_refused_at_start_raises(
    clock: FakeClock, vault: FakeTokenVault
) -> None:
    vault.refuse_logins = True
    with pytest.raises(VaultAccessDenied):
        await VaultIdentity(approle(), vault, clock=clock).start()


# -- JWT ---------------------------------------------------------------------------------------


async def test_jwt_reads_the_token_file_at_each_login(
    clock: FakeClock, vault: FakeTokenVault, tmp_path: Path
) -> None:
    jwt_file = tmp_path / "token"
    jwt_file.write_text("jwt-one\n")
    vault.renewable = False
    identity = VaultIdentity(JwtLogin("svc", str(jwt_file), "k8s"), vault, clock=clock)
    await identity.start()
    jwt_file.write_text("jwt-two")  # Kubernetes rotates the projected token in place
    clock.advance(20)
    await identity.tick()
    assert vault.logins == [
        {"role": "svc", "jwt": "jwt-one", "mount": "k8s"},
        {"role": "svc", "jwt": "jwt-two", "mount": "k8s"},
    ]


async def test_an_unreadable_jwt_file_stops_start_up_naming_the_setting(
    clock: FakeClock, vault: FakeTokenVault, tmp_path: Path
) -> None:
    identity = VaultIdentity(JwtLogin("svc", str(tmp_path / "absent")), vault, clock=clock)
    with pytest.raises(ConfigError) as info:
        await identity.start()
    assert info.value.setting == "SECRETS_VAULT_JWT_FILE"


async def test_a_jwt_file_gone_later_is_a_failed_login_retried_not_a_crash(
    clock: FakeClock, vault: FakeTokenVault, tmp_path: Path
) -> None:
    jwt_file = tmp_path / "token"
    jwt_file.write_text("jwt-one")
    identity = VaultIdentity(JwtLogin("svc", str(jwt_file)), vault, clock=clock)
    await identity.start()
    jwt_file.write_text("")
    vault.revoke_all()
    with pytest.raises(VaultUnavailable):
        await identity.replace("token-1")
    assert identity.logins == {("jwt", "ok"): 1, ("jwt", "error"): 1}
    assert await identity.tick() == 1  # the loop tries again in a second
    jwt_file.write_text("jwt-three")
    clock.advance(1)
    await identity.tick()
    assert identity.valid and vault.logins[-1]["jwt"] == "jwt-three"


# -- how it is built, shown and measured --------------------------------------------------------


def test_without_a_method_both_approle_ids_mean_approle_as_before_the_setting_existed() -> None:
    assert isinstance(login_method(token="t", role_id="r", secret_id="s"), AppRoleLogin)
    assert isinstance(login_method(token="t", role_id="r"), TokenLogin)
    assert login_method("jwt", role="svc", jwt_file="/f") == JwtLogin("svc", "/f", "jwt")
    assert login_method("approle", role_id="r", secret_id="s", mount="ar") == AppRoleLogin(
        "r", "s", "ar"
    )


def test_no_credential_shows_in_a_repr() -> None:
    shown = repr(
        [Grant("hvs.SECRET1", 30, True), TokenLogin("hvs.SECRET2"), AppRoleLogin("r", "SECRET3")]
    )
    assert "SECRET" not in shown


async def test_the_metrics_show_logins_renewals_and_the_time_left_never_the_token(
    clock: FakeClock, vault: FakeTokenVault
) -> None:
    identity = VaultIdentity(approle(), vault, clock=clock)
    await identity.start()
    clock.advance(20)
    await identity.tick()
    metrics = Metrics()
    metrics.bind_identity(identity)
    text = generate_latest(metrics.registry).decode()
    assert 'secrets_vault_logins_total{method="approle",outcome="ok"} 1.0' in text
    assert 'secrets_vault_token_renewals_total{outcome="ok"} 1.0' in text
    assert "secrets_vault_token_valid 1.0" in text
    assert "secrets_vault_token_expiry_seconds 30.0" in text
    assert "token-1" not in text and "secret-1" not in text


# -- the loop, on the real clock ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(identity: VaultIdentity) -> AsyncIterator[None]:
    task = asyncio.get_running_loop().create_task(identity.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_loop_keeps_a_one_second_token_alive_past_its_ttl() -> None:
    vault = FakeTokenVault(time.monotonic, ttl=1)
    identity = VaultIdentity(approle(), vault)
    await identity.start()
    async with running(identity):
        await eventually(lambda: vault.renewals >= 3, timeout=10)
        assert identity.valid
    assert len(vault.logins) == 1

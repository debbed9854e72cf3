"""The app's lifespan: it opens what the service runs on (Vault backend, OIDC verifier, event
bus, SecretsManager, audit log, rotation, the metrics port, the version watcher, the policy
reload on SIGHUP), yields it as the request state, and closes it in reverse; and `Readiness`, what
/readyz reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any

from prometheus_client import start_http_server
from starlette.applications import Starlette

from events.bus import EventBus
from schemas.errors import ConfigError, SecretsError
from schemas.secret import redact_url
from service.approvals.workflow import Approvals
from service.audit import AuditLog, LineSink
from service.auth import OIDCVerifier, Policy
from service.core import SecretsManager
from service.core.poller import ClusterPoller, poller_buckets
from service.core.watcher import cache_targets
from service.http.policy_reload import PolicyReloader, PolicySections, reload_on_sighup
from service.obs.metrics import Metrics
from service.rotation.coordinator import Coordinator
from service.rotation.schedule import Scheduler
from service.settings import Settings
from service.vault import HvacBackend, VaultBackend
from service.vault.identity import login_method
from service.watch.feed import WatchFeed

__all__ = ["Readiness", "lifespan"]

log = logging.getLogger("secrets.http")

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[dict[str, Any]]]


def lifespan(
    settings: Settings,
    metrics: Metrics,
    *,
    backend: VaultBackend | None,
    verifier: OIDCVerifier | None,
    policy: Policy | None,
    bus: EventBus | None,
) -> Lifespan:
    """The lifespan of an app: anything not injected is opened from `settings`."""

    @contextlib.asynccontextmanager
    async def run(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        try:
            async with _open(app, settings, metrics, backend, verifier, policy, bus) as state:
                yield state
        except ConfigError as exc:
            # The CLI turns this into exit code 2 with one line naming the setting.
            app.state.startup_error = exc
            raise

    return run


@contextlib.asynccontextmanager
async def _open(
    app: Starlette,
    settings: Settings,
    metrics: Metrics,
    backend: VaultBackend | None,
    verifier: OIDCVerifier | None,
    policy: Policy | None,
    bus: EventBus | None,
) -> AsyncIterator[dict[str, Any]]:
    async with contextlib.AsyncExitStack() as stack:
        pol = policy or Policy.load(settings.policy_file)
        # Every section of the policy is checked before anything is opened: a bad rule stops
        # start-up (exit 2) naming it.
        sections = PolicySections.of(pol)
        validator, rotation_rules = sections.validator, sections.rotation
        vault = backend
        if vault is None:
            hvac_backend = HvacBackend(
                settings.vault_addrs or settings.vault_addr,  # every node of an HA cluster
                token=settings.vault_token,
                auth=login_method(
                    settings.vault_auth,
                    token=settings.vault_token,
                    role_id=settings.vault_role_id,
                    secret_id=settings.vault_secret_id,
                    role=settings.vault_role,
                    jwt_file=settings.vault_jwt_file,
                    mount=settings.vault_auth_mount,
                ),
                mount=settings.vault_mount,
                timeout=settings.vault_timeout,
                concurrency=settings.vault_concurrency,
                observer=metrics.observe_vault,
            )
            stack.push_async_callback(hvac_backend.aclose)
            await hvac_backend.login()
            # Renews the token, or logs in again, before it expires; stopped before aclose.
            await _run_in_background(stack, hvac_backend.keep_token())
            metrics.bind_identity(hvac_backend.identity)
            vault = hvac_backend
        auth = verifier
        if auth is None:
            auth = OIDCVerifier(
                settings.oidc_issuer,
                settings.oidc_audience,
                roles_claim=pol.roles_claim,
                algorithms=settings.oidc_algorithms,
                leeway=settings.oidc_leeway,
                max_lifetime=settings.oidc_max_token_lifetime,
                jwks_refresh=settings.oidc_jwks_refresh,
            )
            stack.push_async_callback(auth.aclose)
            await auth.start()
        events = bus or EventBus(
            settings.nats_url,
            settings.nats_prefix,
            instance_id=settings.instance_id,
            replicas=settings.nats_replicas,
            credentials=settings.nats_creds,
            tls_ca=settings.nats_tls_ca,
            tls_cert=settings.nats_tls_cert,
            tls_key=settings.nats_tls_key,
            tls_first=settings.nats_tls_first,
            # The version poller's lease and the cluster's cache interest.
            buckets=poller_buckets(settings.vault_poll_interval)
            if settings.vault_poll_interval > 0
            else None,
        )
        manager = SecretsManager(
            vault,
            cache_ttl=settings.cache_ttl,
            cache_max_entries=settings.cache_max_entries,
            fallback_ttl=settings.cache_fallback_ttl,
            instance_id=settings.instance_id,
            events=events,
            validator=validator,
        )
        stack.push_async_callback(manager.aclose)
        stack.push_async_callback(events.aclose)
        await events.connect(manager)
        audit = AuditLog(
            line=LineSink.open(settings.audit_sink),
            publisher=events,
            fail_closed=settings.audit_fail_closed,
            instance_id=settings.instance_id,
        )
        await audit.start()
        stack.push_async_callback(audit.aclose)  # before the bus closes: it drains to NATS
        rotation = Coordinator(manager, rotation_rules, audit=audit, lease=settings.rotation_lease)
        approvals = Approvals(manager, sections.approvals, events=events, audit=audit)
        watch_feed = WatchFeed(
            events,
            coherence=manager,
            max_streams=settings.watch_max_streams,
            max_per_caller=settings.watch_max_per_caller,
            queue_size=settings.watch_queue,
        )
        await watch_feed.start()
        stack.push_async_callback(watch_feed.aclose)
        await _run_in_background(stack, watch_feed.watchdog())
        scheduler: Scheduler | None = None
        sweeping = False

        async def run_what_the_rules_need(rules: PolicySections) -> None:
            # At start-up and after each policy reload: a loop starts with the first rule that
            # needs it, then runs until the app stops (with no rule left, it finds nothing).
            nonlocal scheduler, sweeping
            if rules.rotation.rules and scheduler is None:
                # Also where no rule has a schedule: it resumes runs whose instance died.
                scheduler = Scheduler(rotation, scan_interval=settings.rotation_scan_interval)
                await _run_in_background(stack, scheduler.run())
            if rules.approvals.rules and not sweeping:
                # Every instance sweeps; each request turns expired once (a CAS write of its own).
                sweeping = True
                sweeps = approvals.run_sweeps(settings.approval_sweep_interval)
                await _run_in_background(stack, sweeps)
            metrics.bind(
                manager=manager,
                bus=events,
                audit=audit,
                rotation=rotation,
                scheduler=scheduler,
                approvals=approvals,
                watch=watch_feed,
            )

        await run_what_the_rules_need(sections)
        reloader = PolicyReloader(
            settings.policy_file,
            sections,
            manager=manager,
            rotation=rotation,
            approvals=approvals,
            metrics=metrics,
            then=run_what_the_rules_need,
        )
        stack.push_async_callback(reloader.aclose)
        stack.enter_context(reload_on_sighup(reloader))  # SIGHUP re-reads SECRETS_POLICY_FILE
        if settings.metrics_port:
            await _serve_metrics(stack, metrics, settings.host, settings.metrics_port)
        if settings.vault_poll_interval > 0:
            # One instance polls Vault for the cluster; each polls its own without NATS.
            poller = ClusterPoller(
                manager.watcher,
                lambda: cache_targets(manager.cache),
                settings.vault_poll_interval,
                bus=events,
                prefix=settings.nats_prefix,
                instance_id=settings.instance_id,
                generation=lambda: manager.cache.generation,
            )
            metrics.bind_poller(poller)
            app.state.poller = poller
            # Stopped before the bus closes: it gives up the lease and withdraws its interest.
            await _run_in_background(stack, poller.run())
        log.info(
            "service ready",
            extra={
                "instance_id": settings.instance_id,
                "vault": redact_url(settings.vault_addr),  # never a user:password@
                "event_loop": type(asyncio.get_running_loop()).__module__.partition(".")[0],
            },
        )
        # Also on app.state, for code embedding the app (and tests) to reach the manager.
        app.state.manager = manager
        app.state.bus = events
        app.state.audit = audit
        app.state.rotation = rotation
        app.state.approvals = approvals
        app.state.watch_feed = watch_feed
        app.state.policy_reloader = reloader
        yield {
            "watch_feed": watch_feed,
            "rotation": rotation,
            "approvals": approvals,
            "manager": manager,
            "verifier": auth,
            "policy": pol,
            "policy_reloader": reloader,
            "bus": events,
            "vault": vault,
            "readiness": Readiness(vault, events),
            "audit": audit,
        }


async def _run_in_background(
    stack: contextlib.AsyncExitStack, work: Coroutine[Any, Any, None]
) -> None:
    """Run `work` until the app stops: cancelled, and awaited, before what it uses closes."""
    task = asyncio.get_running_loop().create_task(work)

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(stop)


async def _serve_metrics(
    stack: contextlib.AsyncExitStack, metrics: Metrics, host: str, port: int
) -> None:
    """/metrics on its own port (SECRETS_METRICS_PORT), from prometheus-client's thread."""
    try:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise ConfigError(
            "SECRETS_METRICS_PORT", f"cannot listen on {port}: {exc.strerror}"
        ) from None

    async def stop() -> None:
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        thread.join(timeout=5)

    stack.push_async_callback(stop)


class Readiness:
    """Vault and NATS answer. Checked at most once a second, however often it is asked."""

    def __init__(self, vault: VaultBackend, bus: EventBus) -> None:
        self.vault = vault
        self.bus = bus
        self._at = 0.0
        self._checks: dict[str, bool] = {}

    async def check(self) -> dict[str, bool]:
        now = time.monotonic()
        if now - self._at >= 1.0:
            try:
                await self.vault.ping()
                vault_ok = True
            except SecretsError:
                vault_ok = False
            self._checks = {"vault": vault_ok, "nats": self.bus.connected}
            self._at = now
        return self._checks

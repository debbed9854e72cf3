"""A real /metrics scrape: `promtool check metrics` accepts it, and every series the Prometheus
rules (deploy/prometheus/) and the Grafana dashboard (deploy/grafana/) name is on it."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from devstack import NatsEndpoint, OidcIssuer, OpenBaoEndpoint
from tests.support import bearer, running_service, service_settings, write_policy
from tests.unit.test_prometheus_rules import DASHBOARD, RULE_FILES, promtool

# A series name, not a part of a recording rule's name (`instance:secrets_operations:rate5m`).
_SERIES = re.compile(r"(?<![\w:])secrets_[a-z0-9_]+(?![\w:])")


def _expressions() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every rule and dashboard target."""
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                yield f"{path.name}:{rule.get('alert') or rule.get('record')}", rule["expr"]
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            yield f"dashboard:{panel['title']}", target["expr"]


async def _scrape(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> str:
    settings = service_settings(openbao, nats, oidc, write_policy(tmp_path))
    async with running_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        token = oidc.mint("reader")
        await client.get("/secrets/app/missing", headers=bearer(token))  # a labelled operation
        response = await client.get("/metrics")
        assert response.status_code == 200
        return response.text


async def test_promtool_check_metrics_accepts_a_real_scrape(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    text = await _scrape(openbao, nats, oidc, tmp_path)
    result = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_every_series_the_rules_and_dashboard_name_is_on_a_real_scrape(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    text = await _scrape(openbao, nats, oidc, tmp_path)
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1].isalpha()}
    # A labelled family with no child yet has no sample: its TYPE line still declares it.
    for family, kind in re.findall(r"(?m)^# TYPE (\S+) (\S+)$", text):
        exposed.add(family)
        if kind == "histogram":
            exposed.update(f"{family}_{part}" for part in ("bucket", "count", "sum"))
    missing = {
        where: sorted(set(_SERIES.findall(expr)) - exposed)
        for where, expr in _expressions()
        if set(_SERIES.findall(expr)) - exposed
    }
    assert not missing, missing

"""`make stack` started programmatically (devstack/production.py): OpenBao Raft and NATS clusters
with TLS, three instances over HTTPS, Prometheus scraping them with the project's rules."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from devstack import BinaryNotFound, DevStackError
from devstack.production import INSTANCES, ProductionStack
from devstack.prometheus import RULE_FILES, find_prometheus
from tests.support import bearer, record_figures, skip_unless_required

DEADLINE = 60.0  # Prometheus scrapes every second here; a loaded machine may lag a lot


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProductionStack]:
    try:
        find_prometheus()
    except DevStackError as exc:
        skip_unless_required(str(exc))
    running = ProductionStack(tmp_path_factory.mktemp("stack"), scrape_interval=1.0)
    try:
        running.start()
    except BinaryNotFound as exc:
        skip_unless_required(f"a server binary is missing: {exc}")
    try:
        record_figures("production_stack", started_in_s=round(running.started_in, 1))
        yield running
    finally:
        running.stop()


def _poll(what: str, probe: Any) -> Any:
    deadline = time.monotonic() + DEADLINE
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen in {DEADLINE}s")
        time.sleep(0.2)


def test_every_instance_serves_https_and_is_ready(stack: ProductionStack) -> None:
    assert [svc.environ["SECRETS_INSTANCE_ID"] for svc in stack.services] == list(INSTANCES)
    for svc in stack.services:
        assert svc.url.startswith("https://")
        assert len(svc.environ["SECRETS_VAULT_ADDR"].split(",")) == 3
        assert httpx.get(f"{svc.url}/readyz", verify=stack.verify).status_code == 200


def test_a_write_through_one_instance_is_read_as_the_new_version_through_another(
    stack: ProductionStack,
) -> None:
    assert stack.oidc is not None
    headers = bearer(stack.oidc.mint("writer"))
    writer, reader = stack.services[0].url, stack.services[1].url
    with httpx.Client(verify=stack.verify, headers=headers, timeout=10) as client:
        before = client.get(f"{reader}/secrets/app/db")  # now in the reader's cache
        assert before.status_code == 200
        version = before.json()["version"]
        body = {"data": {"username": "app", "password": "stack-Test-9x!Qz"}, "version": version}
        written = client.patch(f"{writer}/secrets/app/db", json=body)
        assert written.status_code == 200, written.text
        assert written.json()["version"] == version + 1

        def new_version_read() -> bool:
            answer = client.get(f"{reader}/secrets/app/db")
            return bool(answer.json()["version"] == version + 1)

        _poll("the new version through the other instance", new_version_read)


def test_prometheus_scrapes_all_three_instances_over_https(stack: ProductionStack) -> None:
    prometheus = stack.prometheus
    assert prometheus is not None

    def all_up() -> list[dict[str, Any]] | None:
        targets: list[dict[str, Any]] = prometheus.api("targets")["activeTargets"]
        return targets if [t["health"] for t in targets] == ["up"] * 3 else None

    targets = _poll("three healthy targets", all_up)
    assert {t["scrapeUrl"] for t in targets} == {f"{svc.url}/metrics" for svc in stack.services}


def test_prometheus_loaded_and_evaluates_the_recording_and_alert_rules(
    stack: ProductionStack,
) -> None:
    prometheus = stack.prometheus
    assert prometheus is not None
    groups = prometheus.api("rules")["groups"]
    wanted = {
        group["name"]: len(group["rules"])
        for path in RULE_FILES
        for group in yaml.safe_load(Path(path).read_text())["groups"]
    }
    assert {group["name"]: len(group["rules"]) for group in groups} == wanted

    def instances_up() -> bool:
        result = prometheus.api("query?query=secrets:instances_up:sum")["result"]
        return bool(result) and result[0]["value"][1] == "3"

    _poll("secrets:instances_up:sum = 3", instances_up)

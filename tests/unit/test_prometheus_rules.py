"""deploy/: Prometheus's recording and alert rules pass `promtool check rules` and their unit tests
(`promtool test rules`), and the Grafana dashboard is well-formed over those rules. Whether each
named series exists on a real /metrics: tests/integration/test_metrics_scrape.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULE_FILES = [PROMETHEUS / "rules.yml", PROMETHEUS / "alerts.yml"]
DASHBOARD = ROOT / "deploy" / "grafana" / "secrets-service.json"
_RECORDED = re.compile(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b")


def promtool() -> str:
    """promtool from Debian's `prometheus` package; make installs it, so it is never skipped."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is not installed: apt-get install -y prometheus (`make install` does it)",
            pytrace=False,
        )
    return found


def _rules(path: Path) -> list[dict[str, Any]]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def _recorded() -> set[str]:
    return {rule["record"] for path in RULE_FILES for rule in _rules(path) if "record" in rule}


def test_promtool_accepts_the_recording_and_alert_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", *map(str, RULE_FILES)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerts_fire_as_their_promtool_unit_tests_expect() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", "alerts_test.yml"],
        cwd=PROMETHEUS, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_has_a_severity_and_a_summary() -> None:
    alerts = _rules(PROMETHEUS / "alerts.yml")
    assert len(alerts) >= 10
    for alert in alerts:
        assert alert["labels"]["severity"] in {"critical", "warning"}, alert["alert"]
        assert alert["annotations"]["summary"], alert["alert"]


def test_rules_and_alerts_use_only_recording_rules_that_are_defined() -> None:
    defined = _recorded()
    for path in RULE_FILES:
        for rule in _rules(path):
            used = set(_RECORDED.findall(rule["expr"]))
            assert used <= defined, (rule.get("alert") or rule.get("record"), used - defined)


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_the_dashboard_is_grafana_json_with_unique_panel_ids_on_a_prometheus_source() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = dashboard["templating"]["list"]
    assert {"name": "datasource", "type": "datasource", "query": "prometheus"}.items() <= (
        variables[0].items()
    )
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len(graphs) >= 15
    for panel in graphs:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]


def test_the_dashboard_uses_only_recording_rules_that_are_defined() -> None:
    defined = _recorded()
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", []):
            used = set(_RECORDED.findall(target["expr"]))
            assert used <= defined, (panel["title"], used - defined)

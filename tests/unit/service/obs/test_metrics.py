"""service/obs/metrics.py: operation metrics kept as plain numbers expose what prometheus_client's
own objects would."""

from __future__ import annotations

import pytest
from prometheus_client import Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.obs.metrics import Metrics


def test_operation_metrics_expose_what_prometheus_client_objects_would() -> None:
    metrics = Metrics()
    reference = Histogram(
        "secrets_operation_seconds",
        "Operation latency by op",
        ["op"],
        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        registry=None,
    )
    for seconds in (0.0001, 0.0005, 0.003, 0.2, 9.0):
        metrics.observe_operation("read", "ok", seconds)
        reference.labels("read").observe(seconds)
    metrics.observe_operation("nonsense", "weird", 0.001)
    text = generate_latest(metrics.registry).decode()
    ours = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("secrets_operation")
    }
    assert ours[("secrets_operations_total", (("op", "read"), ("outcome", "ok")))] == 5
    assert ours[("secrets_operations_total", (("op", "other"), ("outcome", "error")))] == 1
    for family in reference.collect():
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            assert ours[(s.name, tuple(sorted(s.labels.items())))] == pytest.approx(s.value)

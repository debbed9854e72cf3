"""Prometheus metrics. Every label value comes from a closed set: never a path or a subject."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """One set of series per app, in its own registry (tests build many apps in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.operations = Counter(
            "secrets_operations_total", "Secret operations by op and outcome", ["op", "outcome"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "secrets_operation_seconds", "Operation latency by op", ["op"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.auth_failures = Counter(
            "secrets_auth_failures_total", "Authentication failures by reason", ["reason"],
            registry=r,
        )  # fmt: skip
        self.cache_size = Gauge("secrets_cache_entries", "Entries in the cache", registry=r)

"""Observability: JSON log lines and Prometheus metrics; neither ever holds a secret value."""

from service.obs.logs import configure_logging
from service.obs.metrics import Metrics

__all__ = ["Metrics", "configure_logging"]

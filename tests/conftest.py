"""Markers by directory: everything under integration/ and reliability/ runs against real
OpenBao and NATS servers (their fixtures are in tests/servers.py, visible only there), so it
is marked `integration`; unit/ sees no server fixture at all."""

from __future__ import annotations

from pathlib import Path

import pytest

_SERVER_DIRS = ("integration", "reliability")
_ROOT = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.path.relative_to(_ROOT).parts
        if parts and parts[0] in _SERVER_DIRS:
            item.add_marker(pytest.mark.integration)

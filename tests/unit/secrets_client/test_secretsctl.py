"""secrets_client/secretsctl.py as installed: the console script. The command run against the
real stack: tests/integration/test_secretsctl.py."""

from __future__ import annotations

from importlib.metadata import entry_points


def test_secretsctl_is_an_installed_console_script() -> None:
    [script] = entry_points(group="console_scripts", name="secretsctl")
    assert script.value == "secrets_client.secretsctl:main"

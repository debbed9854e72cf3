"""The command line as a user runs it: a child process with a controlled environment.

A bad or missing setting must end `serve` with exit code 2 and one line naming the setting.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
TIMEOUT = 30
POLICY = """\
[auth]
roles_claim = "roles"

[roles.app-reader]
read = ["app/**"]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def unreachable_url() -> str:
    """An http URL on a loopback port nothing listens on (it was free a moment ago)."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def policy_file(tmp_path: Path) -> str:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return str(path)


@pytest.fixture
def settings(policy_file: str) -> dict[str, str]:
    """A complete, valid configuration whose servers cannot be reached."""
    return {
        "SECRETS_VAULT_ADDR": unreachable_url(),
        "SECRETS_VAULT_TOKEN": "hvs.cli-test-token",
        "SECRETS_OIDC_ISSUER": unreachable_url(),
        "SECRETS_OIDC_AUDIENCE": "secrets",
        "SECRETS_POLICY_FILE": policy_file,
        "SECRETS_NATS_URL": "nats://127.0.0.1:" + str(free_port()),
        "SECRETS_PORT": str(free_port()),
    }


def run(args: list[str], secrets: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **secrets}
    return subprocess.run(
        args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def serve(secrets: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "service", "serve"], secrets)


def assert_one_line_naming(result: subprocess.CompletedProcess[str], variable: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert result.stdout == ""


def test_serve_without_a_vault_address_exits_2_with_one_line_naming_it(
    settings: dict[str, str],
) -> None:
    del settings["SECRETS_VAULT_ADDR"]
    assert_one_line_naming(serve(settings), "SECRETS_VAULT_ADDR")


def test_serve_with_a_bad_port_exits_2_with_one_line_naming_it(settings: dict[str, str]) -> None:
    settings["SECRETS_PORT"] = "eighty"
    result = serve(settings)
    assert_one_line_naming(result, "SECRETS_PORT")
    assert "eighty" in result.stderr, "the line says what is wrong"


def test_serve_with_a_missing_policy_file_exits_2_with_one_line_naming_it(
    settings: dict[str, str], tmp_path: Path
) -> None:
    settings["SECRETS_POLICY_FILE"] = str(tmp_path / "absent.toml")
    assert_one_line_naming(serve(settings), "SECRETS_POLICY_FILE")


def test_the_config_error_line_for_a_bad_port_does_not_show_the_vault_token(
    settings: dict[str, str],
) -> None:
    settings["SECRETS_PORT"] = "-1"
    result = serve(settings)
    assert result.returncode == 2
    assert "hvs.cli-test-token" not in result.stderr


def test_serve_with_an_unreachable_oidc_issuer_exits_2_naming_it(
    settings: dict[str, str],
) -> None:
    # Vault with a token is not contacted at startup, so the issuer is the first thing that fails.
    result = serve(settings)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.splitlines()[-1]
    assert last.startswith("secrets-service: configuration error: SECRETS_OIDC_ISSUER")
    assert "hvs.cli-test-token" not in result.stderr


def test_the_console_script_prints_help() -> None:
    script = Path(sys.executable).parent / "secrets-service"
    if not script.exists():
        found = shutil.which("secrets-service")
        assert found is not None, "the secrets-service console script is not installed"
        script = Path(found)
    result = run([str(script), "--help"], {})
    assert result.returncode == 0, result.stderr
    assert "usage: secrets-service" in result.stdout
    assert "serve" in result.stdout
    assert "dev" in result.stdout


def test_python_dash_m_service_behaves_like_the_console_script() -> None:
    result = run([sys.executable, "-m", "service", "--help"], {})
    assert result.returncode == 0, result.stderr
    assert "usage: secrets-service" in result.stdout


def test_a_missing_command_is_a_usage_error() -> None:
    result = run([sys.executable, "-m", "service"], {})
    assert result.returncode == 2
    assert "usage: secrets-service" in result.stderr


def test_serve_with_a_wrong_validation_rule_exits_2_naming_the_policy_and_the_key(
    settings: dict[str, str], tmp_path: Path
) -> None:
    policy = tmp_path / "bad-validation.toml"
    policy.write_text(POLICY + '\n[[validation.rules]]\npaths = ["app/**"]\nmin_lenght = 3\n')
    settings["SECRETS_POLICY_FILE"] = str(policy)
    result = serve(settings)
    assert_one_line_naming(result, "SECRETS_POLICY_FILE")
    assert "validation.rules[0].min_lenght" in result.stderr


@pytest.mark.parametrize(
    ("rule", "named"),
    [
        ('paths = ["app/*"]\nevery = "2 weeks"', "rotation.rules[0].every"),
        ('paths = ["app/*"]\ngenerator = "postgres"\ngrace = "1h"', "rotation.rules[0].grace"),
        ('paths = ["app/*"]\ngenerator = "password"\nlength = 4', "rotation.rules[0].length"),
    ],
)
def test_serve_with_a_wrong_rotation_rule_exits_2_naming_the_policy_and_the_rule(
    settings: dict[str, str], tmp_path: Path, rule: str, named: str
) -> None:
    policy = tmp_path / "bad-rotation.toml"
    policy.write_text(POLICY + f"\n[[rotation.rules]]\n{rule}\n")
    settings["SECRETS_POLICY_FILE"] = str(policy)
    result = serve(settings)
    assert_one_line_naming(result, "SECRETS_POLICY_FILE")
    assert named in result.stderr


def test_serve_with_a_rotation_rule_the_validation_rules_refuse_exits_2(
    settings: dict[str, str], tmp_path: Path
) -> None:
    policy = tmp_path / "unmeetable.toml"
    policy.write_text(
        POLICY
        + '\n[[validation.rules]]\npaths = ["app/**"]\n[validation.rules.fields.password]\n'
        + "max_length = 16\n"
        + '\n[[rotation.rules]]\npaths = ["app/*"]\nlength = 32\n'
    )
    settings["SECRETS_POLICY_FILE"] = str(policy)
    result = serve(settings)
    assert_one_line_naming(result, "SECRETS_POLICY_FILE")
    assert "rotation.rules[0]" in result.stderr and "max_length" in result.stderr

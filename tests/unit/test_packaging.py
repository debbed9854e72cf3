"""The two wheels this checkout builds, and what importing the client side loads.

secrets-client (client/) holds schemas, events and secrets_client with none of the service's
server dependencies; secrets-service holds the service alone; the dev harness is in neither.
"""

from __future__ import annotations

import email
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER_DEPENDENCIES = ("starlette", "uvicorn", "hvac", "prometheus_client", "aiohttp", "authlib")
SERVER_DISTRIBUTIONS = (
    "starlette",
    "uvicorn",
    "hvac",
    "prometheus-client",
    "aiohttp",
    "authlib",
    "joserfc",
)


class Wheel:
    def __init__(self, path: Path) -> None:
        with zipfile.ZipFile(path) as archive:
            self.names = archive.namelist()
            metadata = next(n for n in self.names if n.endswith(".dist-info/METADATA"))
            self.metadata = email.message_from_bytes(archive.read(metadata))

    def packages(self) -> set[str]:
        return {name.split("/")[0] for name in self.names if "/" in name} - {
            n.split("/")[0] for n in self.names if ".dist-info/" in n
        }

    def requires(self) -> list[str]:
        return [str(r) for r in self.metadata.get_all("Requires-Dist", [])]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Wheel]]:
    out = tmp_path_factory.mktemp("wheels")
    # The venv's hatchling, no download: --no-build-isolation.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--wheel-dir", str(out), str(ROOT / "client"), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    built = {path.name.split("-")[0]: Wheel(path) for path in out.glob("*.whl")}
    assert set(built) == {"secrets_client", "secrets_service"}
    yield built


def test_the_client_wheel_holds_schemas_events_and_the_client_only(
    wheels: dict[str, Wheel],
) -> None:
    client = wheels["secrets_client"]
    assert client.packages() == {"schemas", "events", "secrets_client"}
    assert "secrets_client/secretsctl.py" in client.names
    assert not any(name.endswith((".pyc", ".so")) for name in client.names)


def test_the_client_wheel_requires_no_server_dependency(wheels: dict[str, Wheel]) -> None:
    requires = [
        r.split(">")[0].split("=")[0].split("[")[0].lower()
        for r in wheels["secrets_client"].requires()
    ]
    assert sorted(requires) == ["httpx", "msgspec", "nats-py"]
    assert not set(requires) & set(SERVER_DISTRIBUTIONS)


def test_the_service_wheel_holds_the_service_alone_without_the_dev_harness(
    wheels: dict[str, Wheel],
) -> None:
    service = wheels["secrets_service"]
    assert service.packages() == {"service"}
    assert not any(name.startswith(("devstack/", "tests/", "bench/")) for name in service.names)
    assert "service/data/common-passwords.txt" in service.names  # read at run time
    assert any(r.startswith("secrets-client") for r in service.requires())


@pytest.mark.parametrize("module", ["schemas", "events", "secrets_client"])
def test_the_client_side_imports_with_every_server_dependency_missing(module: str) -> None:
    # As in an install of secrets-client alone: importing a blocked module raises ImportError.
    # (nats-py imports aiohttp for its websocket transport when it is there, and copes when
    # not; our own code never imports a server module: the import-linter contracts say so.)
    blocked = [*SERVER_DEPENDENCIES, "joserfc", "service", "devstack"]
    code = (
        f"import sys\nsys.modules.update(dict.fromkeys({blocked!r}))\n"
        f"import {module}\nprint(sorted({module}.__all__))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith("[")


def test_secrets_service_dev_without_the_harness_exits_2_saying_where_it_runs() -> None:
    # An installed service has no devstack package: `dev` says so rather than a traceback.
    code = "import sys\nsys.modules['devstack'] = None\nfrom service.cli import main\nmain(['dev'])"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "secrets-service dev: the dev stack runs from a source checkout (make dev)"
    )

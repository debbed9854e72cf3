"""Schemathesis against the live service's /openapi.json: no 5xx, every answer as documented.

Runs the `st` CLI (a dev dependency) against the real app with an admin token, on an OpenBao of
this module's own (the generated calls create, delete and destroy whatever paths they invent).
Every check runs except `positive_data_acceptance`: JSON Schema counts `1.0` as an integer and
`{}` as valid data, where the service answers 400 (msgspec is strict about integers) and 422
(the `not_empty` validation rule). Both are documented answers, not server errors.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack import OpenBaoServer
from tests.support import (
    record_figures,
    running_service,
    service_settings,
    skip_unless_required,
    write_policy,
)

SEED = "20261128"


@pytest.fixture(scope="module")
def fuzzed_openbao() -> Iterator[OpenBaoServer]:
    with OpenBaoServer() as server:  # started here, stopped at the end
        yield server


@pytest.fixture(scope="module")
async def service_url(
    fuzzed_openbao: OpenBaoServer, nats: Any, oidc: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    policy = write_policy(tmp_path_factory.mktemp("schemathesis"))
    settings = service_settings(fuzzed_openbao, nats, oidc, policy, log_level="WARNING")
    async with running_service(settings) as svc:
        yield svc.url


def _st() -> str:
    binary = Path(sys.executable).parent / "st"
    if not binary.is_file():
        skip_unless_required(
            f"schemathesis is not installed beside {sys.executable} (pip install -e '.[dev]')"
        )
    return str(binary)


@pytest.mark.parametrize(
    "examples",
    [
        pytest.param(40, id="40-examples"),
        pytest.param(500, id="500-examples", marks=pytest.mark.slow),
    ],
)
async def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(
    service_url: str, oidc: Any, tmp_path: Path, examples: int
) -> None:
    token = oidc.mint("admin")
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        _st(),
        "run",
        f"{service_url}/openapi.json",
        "--header",
        f"Authorization: Bearer {token}",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--max-examples",
        str(examples),
        "--seed",
        SEED,
        "--request-timeout",
        "10",
        # A watch stream never ends by itself: its own tests (tests/integration/test_watch.py)
        # cover it; here it would only time out.
        "--exclude-operation-id",
        "watchSecrets",
        "--exclude-operation-id",
        "watchAllSecrets",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-6000:]
    summary = text.split("SUMMARY")[-1]
    counted = re.search(r"(\d+) generated, (\d+) passed", summary)
    assert counted is not None and "failed" not in summary, text[-3000:]
    record_figures(
        "schemathesis",
        max_examples=examples,
        generated=int(counted[1]),
        passed=int(counted[2]),
        seconds=round(time.monotonic() - started, 1),
    )

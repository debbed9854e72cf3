"""A Prometheus server process (Debian's `prometheus` package) on a free loopback port, scraping
given HTTPS targets with the rule files of deploy/prometheus/; ready when /-/ready answers."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from devstack.processes import (
    POLL_INTERVAL,
    DevStackError,
    ManagedProcess,
    ProcessLog,
    check_port_free,
    end_process,
    free_port,
    spawn,
)

__all__ = ["RULE_FILES", "PrometheusServer", "find_prometheus"]

_DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
RULE_FILES = (_DEPLOY / "rules.yml", _DEPLOY / "alerts.yml")
"""The recording and alert rules every Prometheus of this project loads (compose/ mounts them)."""

JOB = "secrets-service"


def find_prometheus() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise DevStackError(
            "prometheus is not installed: apt-get install -y prometheus (make install does it)"
        )
    return found


class PrometheusServer(ManagedProcess):
    """`prometheus` scraping `targets` (host:port) over HTTPS trusting `ca_file`, every
    `scrape_interval` seconds, with RULE_FILES; its data and config live in `workdir`."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        ca_file: Path,
        workdir: Path,
        port: int | None = None,
        scrape_interval: float = 2.0,
    ) -> None:
        self.targets = list(targets)
        self.ca_file = ca_file
        self.workdir = workdir
        self.port = free_port() if port is None else port
        self.url = f"http://127.0.0.1:{self.port}"
        self.scrape_interval = scrape_interval
        self.config_path = workdir / "prometheus.yml"
        self.process: subprocess.Popen[bytes] | None = None
        self._log = ProcessLog(workdir / "prometheus.log", "prometheus-")

    def __repr__(self) -> str:
        pid = None if self.process is None else self.process.pid
        return f"PrometheusServer(url={self.url!r}, pid={pid})"

    def config(self) -> dict[str, Any]:
        interval = f"{int(self.scrape_interval * 1000)}ms"
        return {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(path) for path in RULE_FILES],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "scheme": "https",
                    "tls_config": {"ca_file": str(self.ca_file)},
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }

    def start(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            raise DevStackError(f"prometheus at {self.url} is already running")
        binary = find_prometheus()
        check_port_free(self.port, "prometheus")
        self.workdir.mkdir(parents=True, exist_ok=True)
        # JSON is YAML: no YAML writer needed.
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        argv = [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.process = process = spawn(argv, self._log)
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            while True:
                if process.poll() is not None:
                    tail = self._log.tail()
                    self.stop()
                    raise DevStackError(
                        f"prometheus exited with code {process.returncode}; log tail:\n{tail}"
                    )
                try:
                    if client.get(f"{self.url}/-/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    tail = self._log.tail()
                    self.stop()
                    raise DevStackError(f"prometheus not ready in {timeout}s; log tail:\n{tail}")
                time.sleep(POLL_INTERVAL)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            end_process(process)
        self._log.close()

    def api(self, path: str) -> Any:
        """GET /api/v1/<path>: its `data`."""
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            answer = client.get(f"{self.url}/api/v1/{path}").json()
        if answer.get("status") != "success":
            raise DevStackError(f"prometheus /api/v1/{path}: {answer}")
        return answer["data"]

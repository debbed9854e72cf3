"""DockerEngine against stand-in `docker` and `dockerd` programs on PATH: it uses an engine that
answers, starts one (vfs, no bridge) when none does, stops only what it started, and says why
when the daemon dies. The real engine runs in `make compose-test`."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from devstack.containers import DockerEngine, main
from devstack.processes import DevStackError

# `docker info` answers once the stand-in daemon has written its marker; `docker build` and the
# rest are not reached by these tests.
FAKE_DOCKER = """#!/bin/sh
[ "$1" = info ] && [ -f "$FAKE_DIR/running" ] && exit 0
exit 1
"""
# The stand-in daemon records its arguments, "runs" until SIGTERM, and removes its marker then.
FAKE_DOCKERD = """#!/bin/sh
printf '%s\\n' "$@" > "$FAKE_DIR/argv"
[ -n "$FAKE_DOCKERD_FAILS" ] && { echo "failed to start daemon: boom"; exit 1; }
trap 'rm -f "$FAKE_DIR/running"; echo stopped > "$FAKE_DIR/stopped"; exit 0' TERM
touch "$FAKE_DIR/running"
while :; do sleep 0.05; done
"""


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("docker", FAKE_DOCKER), ("dockerd", FAKE_DOCKERD)):
        program = bin_dir / name
        program.write_text(text)
        program.chmod(program.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.delenv("FAKE_DOCKERD_FAILS", raising=False)
    return tmp_path


def test_an_engine_that_answers_is_used_and_left_running(fakes: Path) -> None:
    (fakes / "running").touch()
    with DockerEngine(fakes / "root", log_path=fakes / "dockerd.log") as engine:
        assert not engine.started_here
    assert not (fakes / "argv").exists()
    assert (fakes / "running").exists()


def test_without_an_engine_a_dockerd_is_started_on_vfs_and_stopped_after(fakes: Path) -> None:
    with DockerEngine(fakes / "root", log_path=fakes / "dockerd.log") as engine:
        assert engine.started_here
        assert (fakes / "running").exists()
    argv = (fakes / "argv").read_text().split()
    assert f"--data-root={fakes / 'root'}" in argv
    assert {"--storage-driver=vfs", "--iptables=false", "--bridge=none"} <= set(argv)
    assert not any(arg.startswith("--host=") for arg in argv)
    assert (fakes / "stopped").read_text().strip() == "stopped"
    assert not (fakes / "running").exists()


def test_a_started_dockerd_listens_where_docker_host_points(
    fakes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{fakes}/second.sock")
    with DockerEngine(fakes / "root", log_path=fakes / "dockerd.log"):
        pass
    argv = (fakes / "argv").read_text().split()
    assert f"--host=unix://{fakes}/second.sock" in argv
    assert f"--exec-root={fakes / 'root'}-exec" in argv


def test_a_dockerd_that_dies_at_start_is_reported_with_its_log(
    fakes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DOCKERD_FAILS", "1")
    engine = DockerEngine(fakes / "root", log_path=fakes / "dockerd.log")
    with pytest.raises(DevStackError, match="dockerd exited at start"):
        engine.start()
    assert not engine.started_here
    assert "boom" in (fakes / "dockerd.log").read_text()


def test_no_engine_and_no_dockerd_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # neither docker nor dockerd
    assert main(["images", "nats"]) == 1
    assert "apt-get install docker.io" in capsys.readouterr().err


def test_an_unknown_image_name_is_refused_before_anything_is_built(
    fakes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (fakes / "running").touch()
    assert main(["images", "nats", "postgres"]) == 1
    assert "unknown image 'postgres': one of openbao, nats, prometheus, service" in (
        capsys.readouterr().err
    )

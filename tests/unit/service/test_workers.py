"""The supervisor of SECRETS_WORKERS with stand-in workers: small Python processes that speak the
worker's side of the link (service.workers.WorkerLink) and write down what reaches them.

The real service under the supervisor, on the real stack: tests/integration/test_workers.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from schemas.errors import ConfigError
from service.http.serving import reuse_port_socket
from service.settings import Settings
from service.workers import MAX_START_FAILURES, WorkerLink

ROOT = Path(__file__).resolve().parents[3]
DEADLINE = 60.0

# A stand-in worker: `ready` (unless FAKE_MODE says to die first), then it waits for the
# supervisor's end of the link to close; every signal and the loss of the link go to its file.
WORKER = """
import os, signal, sys
from service.workers import WorkerLink

link = WorkerLink.from_environ(os.environ)
mode = os.environ.get("FAKE_MODE", "")
dead = [name for name in os.listdir(os.environ["FAKE_DIR"]) if name.startswith("dead-")]
out = open(os.path.join(os.environ["FAKE_DIR"], f"w{link.index}-{os.getpid()}"), "w")
env = os.environ
out.write(f"id {env['SECRETS_INSTANCE_ID']} metrics {env.get('SECRETS_METRICS_PORT')}\\n")
out.flush()

def noted(sig, frame):
    out.write(signal.Signals(sig).name + "\\n")
    out.flush()
    if sig != signal.SIGHUP:
        sys.exit(0)

for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, noted)
if mode == "config":
    sys.exit(2)
if mode == "crash" or (mode == "crash-once" and not dead):
    open(os.path.join(os.environ["FAKE_DIR"], f"dead-{os.getpid()}"), "w").close()
    sys.exit(1)
link.ready()
link.sock.setblocking(True)
while link.sock.recv(64):
    pass
out.write("supervisor gone\\n")
out.flush()
"""

# The supervisor as `serve` runs it, with stand-ins for workers and a short back-off.
SUPERVISOR = """
import os, sys
from service import workers
from service.obs.logs import configure_logging
from service.settings import Settings

workers.BACKOFF_FIRST = 0.05
configure_logging("INFO")
settings = Settings.from_environ(os.environ)
sys.exit(workers.Supervisor(settings, os.environ, argv=[sys.executable, sys.argv[1]]).run())
"""


class Supervised:
    """A supervisor process over stand-in workers, and what the workers wrote down."""

    def __init__(self, tmp_path: Path, workers: int, **env: str) -> None:
        self.dir = tmp_path / "workers"
        self.dir.mkdir()
        worker = tmp_path / "worker.py"
        worker.write_text(WORKER)
        supervisor = tmp_path / "supervisor.py"
        supervisor.write_text(SUPERVISOR)
        environ = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(ROOT),
            "FAKE_DIR": str(self.dir),
            "SECRETS_VAULT_ADDR": "http://127.0.0.1:9",
            "SECRETS_VAULT_TOKEN": "hvs.test",
            "SECRETS_OIDC_ISSUER": "http://127.0.0.1:9",
            "SECRETS_OIDC_AUDIENCE": "secrets",
            "SECRETS_POLICY_FILE": str(supervisor),  # not read by the supervisor
            "SECRETS_PORT": "18080",
            "SECRETS_WORKERS": str(workers),
            "SECRETS_INSTANCE_ID": "node",
            **env,
        }
        self.log = (tmp_path / "supervisor.log").open("w+")
        self.process = subprocess.Popen(
            [sys.executable, str(supervisor), str(worker)],
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def files(self) -> dict[str, list[str]]:
        """Lines written by each worker process, by `w<index>-<pid>`."""
        return {
            path.name: path.read_text().splitlines()
            for path in self.dir.iterdir()
            if path.name.startswith("w")
        }

    def pids(self, index: int) -> list[int]:
        return [int(name.split("-")[1]) for name in self.files() if name.startswith(f"w{index}-")]

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def wait(self, timeout: float = DEADLINE) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    started: list[Supervised] = []

    def start(workers: int = 2, **env: str) -> Supervised:
        started.append(Supervised(tmp_path, workers, **env))
        return started[-1]

    yield start
    for sup in started:
        sup.stop()
        for name in sup.files():  # no stand-in outlives its test
            pid = int(name.split("-")[1])
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent, the supervisor, may not have reaped it yet).
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def until(condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition still false"
        time.sleep(0.02)


def ready_workers(sup: Supervised) -> int:
    return sup.log_text().count('"worker ready"')


def test_each_worker_gets_its_own_instance_id_and_metrics_port(
    supervised: Callable[..., Supervised],
) -> None:
    sup = supervised(3, SECRETS_METRICS_PORT="19100")
    until(lambda: ready_workers(sup) == 3)
    firsts = sorted(lines[0] for lines in sup.files().values())
    assert firsts == [
        "id node-w0 metrics 19100",
        "id node-w1 metrics 19101",
        "id node-w2 metrics 19102",
    ]


def test_sigterm_drains_every_worker_and_the_supervisor_exits_0(
    supervised: Callable[..., Supervised],
) -> None:
    sup = supervised(2)
    until(lambda: ready_workers(sup) == 2)
    sup.process.send_signal(signal.SIGTERM)
    assert sup.wait() == 0
    for name, lines in sup.files().items():
        assert lines[-1] == "SIGTERM", name
        assert not alive(int(name.split("-")[1]))


def test_sigint_to_the_supervisor_reaches_the_workers_as_sigterm(
    supervised: Callable[..., Supervised],
) -> None:
    sup = supervised(2)
    until(lambda: ready_workers(sup) == 2)
    sup.process.send_signal(signal.SIGINT)
    assert sup.wait() == 0
    assert all(lines[-1] == "SIGTERM" for lines in sup.files().values())


def test_sighup_is_passed_on_to_every_worker_which_keeps_running(
    supervised: Callable[..., Supervised],
) -> None:
    sup = supervised(2)
    until(lambda: ready_workers(sup) == 2)
    sup.process.send_signal(signal.SIGHUP)
    until(lambda: all("SIGHUP" in lines for lines in sup.files().values()))
    assert len(sup.files()) == 2, "no worker was restarted"
    assert sup.process.poll() is None


def test_a_worker_that_dies_is_started_again_under_the_same_index(
    supervised: Callable[..., Supervised],
) -> None:
    sup = supervised(2)
    until(lambda: ready_workers(sup) == 2)
    (first,) = sup.pids(1)
    os.kill(first, signal.SIGKILL)
    until(lambda: len(sup.pids(1)) == 2 and ready_workers(sup) == 3)
    assert '"worker exited: restarting"' in sup.log_text()
    assert "SIGKILL" in sup.log_text()
    assert len(sup.pids(0)) == 1, "the other worker was left alone"


def test_a_worker_that_crashes_once_at_start_is_started_again(
    supervised: Callable[..., Supervised],
) -> None:
    sup = supervised(1, FAKE_MODE="crash-once")
    until(lambda: ready_workers(sup) == 1)
    assert len(sup.pids(0)) == 2
    assert sup.process.poll() is None


def test_a_worker_that_keeps_dying_at_start_makes_the_supervisor_give_up_non_zero(
    supervised: Callable[..., Supervised],
) -> None:
    sup = supervised(1, FAKE_MODE="crash")
    assert sup.wait() == 1
    assert "giving up" in sup.log_text()
    assert len(sup.files()) >= MAX_START_FAILURES
    assert not any(alive(int(name.split("-")[1])) for name in sup.files())


def test_a_worker_with_a_configuration_error_stops_the_supervisor_with_exit_code_2(
    supervised: Callable[..., Supervised],
) -> None:
    sup = supervised(2, FAKE_MODE="config")
    assert sup.wait() == 2
    # Each index started once at most (the other may be stopped before it wrote its file).
    assert len(sup.pids(0)) <= 1 and len(sup.pids(1)) <= 1, "a configuration error is not retried"
    assert sup.pids(0) or sup.pids(1)


def test_workers_drain_when_the_supervisor_is_killed_so_none_is_left_orphaned(
    supervised: Callable[..., Supervised],
) -> None:
    sup = supervised(2)
    until(lambda: ready_workers(sup) == 2)
    sup.process.kill()
    sup.process.wait()
    until(lambda: all(lines[-1] == "supervisor gone" for lines in sup.files().values()))
    until(lambda: not any(alive(int(name.split("-")[1])) for name in sup.files()))


def test_a_process_without_the_marker_is_no_worker() -> None:
    assert WorkerLink.from_environ({"SECRETS_WORKERS": "4"}) is None


BASE = {
    "SECRETS_VAULT_ADDR": "http://127.0.0.1:8200",
    "SECRETS_VAULT_TOKEN": "hvs.x",
    "SECRETS_OIDC_ISSUER": "http://127.0.0.1:8201",
    "SECRETS_OIDC_AUDIENCE": "secrets",
    "SECRETS_POLICY_FILE": "policy.toml",
}


def test_workers_default_to_one() -> None:
    assert Settings.from_environ(BASE).workers == 1


def test_several_workers_need_a_fixed_port() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_environ({**BASE, "SECRETS_WORKERS": "2", "SECRETS_PORT": "0"})
    assert caught.value.setting == "SECRETS_PORT"


def test_the_metrics_ports_of_the_workers_must_not_hold_the_service_port() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_environ(
            {**BASE, "SECRETS_WORKERS": "3", "SECRETS_PORT": "9002", "SECRETS_METRICS_PORT": "9000"}
        )
    assert caught.value.setting == "SECRETS_METRICS_PORT"


def test_workers_beyond_the_bound_are_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_environ({**BASE, "SECRETS_WORKERS": "0"})
    assert caught.value.setting == "SECRETS_WORKERS"


def test_workers_sockets_share_one_port_and_a_port_held_otherwise_is_a_config_error() -> None:
    first = reuse_port_socket("127.0.0.1", 0, 16)
    port = first.getsockname()[1]
    second = reuse_port_socket("127.0.0.1", port, 16)
    try:
        assert second.getsockname()[1] == port
    finally:
        first.close()
        second.close()
    with socket.socket() as holder:  # no SO_REUSEPORT: nobody may share it
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with pytest.raises(ConfigError) as caught:
            reuse_port_socket("127.0.0.1", holder.getsockname()[1], 16)
    assert caught.value.setting == "SECRETS_PORT"

"""`make compose-test`: compose/docker-compose.yml run for real and checked end to end.

An engine (started here when none answers, stopped after), the local images, certificates from
compose/make-certs.sh, `up`, then: OpenBao's OIDC tokens, a write on one instance read on another
within the freshness bound, a rotation, Prometheus scraping all three, the hardening of the
service's containers, no canary value in any log; then `down -v`, checking nothing is left.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import shutil
import ssl
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from devstack.containers import (
    NATS_IMAGE,
    OPENBAO_IMAGE,
    PROMETHEUS_IMAGE,
    SERVICE_IMAGE,
    DockerEngine,
    build_images,
    docker,
    image_sizes,
)
from devstack.oidc import OidcIssuer, configure_oidc
from devstack.processes import DevStackError, check_port_free

__all__ = ["ComposeStack", "main", "smoke_test"]

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose" / "docker-compose.yml"
PROJECT = "secrets-compose-test"
VAULT = "https://127.0.0.1:8200"
VAULT_NODES = ("https://127.0.0.1:8200", "https://127.0.0.1:8210", "https://127.0.0.1:8220")
INSTANCES = {"secrets-a": 8081, "secrets-b": 8082, "secrets-c": 8083}
PROMETHEUS = "http://127.0.0.1:9090"
# Every port docker-compose.yml listens on (host network): checked free before `up`.
PORTS: tuple[int, ...] = (8200, 8201, 8210, 8211, 8220, 8221, 4222, 4223, 4224, 6222, 6223, 6224)
PORTS += (8222, 8223, 8224, *INSTANCES.values(), 9090)
# A write through one instance is served by another within this bound (the README: milliseconds
# while NATS is up); the measured figures are printed.
FRESHNESS_BOUND = 0.5
WRITES = 20
CANARY = "compose-canary-Zq8#" + secrets.token_hex(8)


def compose_command() -> list[str]:
    """`docker compose` (v2) where the plugin exists, else `docker-compose` (v1, Debian's)."""
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if probe.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise DevStackError("neither `docker compose` nor docker-compose is installed")


class ComposeStack:
    """The compose file under project PROJECT, with local images and certificates in `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.certs = workdir / "certs"
        self.ca_file = self.certs / "ca.pem"
        self.command = [*compose_command(), "-p", PROJECT, "-f", str(COMPOSE_FILE)]
        self.env = {
            **os.environ,
            "OPENBAO_IMAGE": OPENBAO_IMAGE,
            "NATS_IMAGE": NATS_IMAGE,
            "PROMETHEUS_IMAGE": PROMETHEUS_IMAGE,
            "SECRETS_IMAGE": SERVICE_IMAGE,
            "SECRETS_COMPOSE_CERTS": str(self.certs),
            "SECRETS_OIDC_ISSUER": f"{VAULT}/v1/identity/oidc",
            "SECRETS_OIDC_AUDIENCE": "secrets-service",
            "SECRETS_OIDC_CA_FILE": "/etc/secrets/certs/ca.pem",
            "SECRETS_VAULT_SECRET_ID": secrets.token_hex(24),
            "SECRETS_NATS_SERVICE_PASSWORD": secrets.token_hex(24),
            "SECRETS_NATS_LISTENER_PASSWORD": secrets.token_hex(24),
            "SECRETS_NATS_ROUTE_PASSWORD": secrets.token_hex(24),
            "DOCKER_BUILDKIT": "0",
        }

    @property
    def verify(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.command, *args], env=self.env, capture_output=True, text=True, check=False
        )
        if check and result.returncode != 0:
            raise DevStackError(
                f"compose {' '.join(args)} failed ({result.returncode}): {result.stderr[-3000:]}"
            )
        return result

    def make_certificates(self) -> None:
        """make-certs.sh, then the owners the README asks for: the service (uid 10001) and
        OpenBao (uid 100) read their keys; the folders are open to every container's user."""
        self.workdir.chmod(0o755)
        script = ROOT / "compose" / "make-certs.sh"
        subprocess.run(["sh", str(script), str(self.certs)], check=True, capture_output=True)
        self.certs.chmod(0o755)
        for key, uid in (("service-key.pem", 10001), ("https-key.pem", 10001)):
            os.chown(self.certs / key, uid, uid)
        os.chown(self.certs / "openbao-key.pem", 100, 1000)

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-a", "-q", service).stdout.split()
        if len(ids) != 1:
            raise DevStackError(f"{service}: expected one container, found {ids}")
        return ids[0]

    def wait_exit(self, service: str, timeout: float) -> int:
        ident = self.container(service)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = json.loads(docker("inspect", "--format", "{{json .State}}", ident).stdout)
            if state["Status"] == "exited":
                return int(state["ExitCode"])
            time.sleep(0.5)
        raise DevStackError(f"{service} still runs after {timeout:.0f} s")

    def root_token(self) -> str:
        """From init.json in the exited openbao-init container's volume (docker cp: a tar)."""
        raw = docker_bytes("cp", f"{self.container('openbao-init')}:/openbao/init/init.json", "-")
        with tarfile.open(fileobj=io.BytesIO(raw)) as archive:
            member = archive.extractfile("init.json")
            assert member is not None
            return str(json.load(member)["root_token"])

    def logs(self, *services: str) -> str:
        return self.compose("logs", "--no-color", *services, check=False).stdout

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={PROJECT}"
        found = []
        for kind in ("container ls -a", "volume ls", "network ls"):
            out = docker(*kind.split(), "-q", "--filter", label).stdout.split()
            found += [f"{kind.split()[0]} {ident}" for ident in out]
        return found

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "20", check=False)


def _say(step: str) -> None:
    print(f"compose-test: {step}", file=sys.stderr, flush=True)


def docker_bytes(*args: str) -> bytes:
    result = subprocess.run(["docker", *args], capture_output=True, check=False)
    if result.returncode != 0:
        raise DevStackError(f"docker {args[0]} failed: {result.stderr.decode(errors='replace')}")
    return result.stdout


def wait_for(what: str, check: Callable[[], bool], timeout: float, every: float = 0.5) -> float:
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > timeout:
            raise DevStackError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic() - began


def _ok(call: Callable[[], httpx.Response]) -> bool:
    try:
        return call().status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def _clients(stack: ComposeStack) -> Iterator[dict[str, httpx.Client]]:
    clients = {
        name: httpx.Client(
            base_url=f"https://127.0.0.1:{port}", verify=stack.verify, timeout=10, trust_env=False
        )
        for name, port in INSTANCES.items()
    }
    try:
        yield clients
    finally:
        for client in clients.values():
            client.close()


def smoke_test(stack: ComposeStack, oidc: OidcIssuer) -> dict[str, Any]:
    """The checks of the module docstring; returns what was measured."""
    figures: dict[str, Any] = {}
    bearer = {p: {"Authorization": f"Bearer {oidc.mint(p)}"} for p in ("reader", "writer", "admin")}
    with _clients(stack) as http:
        a, b, c = http["secrets-a"], http["secrets-b"], http["secrets-c"]
        for name, client in http.items():

            def ready(client: httpx.Client = client) -> bool:
                return _ok(lambda: client.get("/readyz"))

            wait_for(f"{name} ready", ready, 120)
        path = f"/secrets/app/compose-{secrets.token_hex(4)}"
        body = {"data": {"username": "app", "password": CANARY}, "version": 0}
        created = a.patch(path, json=body, headers=bearer["writer"])
        _expect(created, 200, "create through secrets-a")
        version = created.json()["version"]
        lags = []
        for i in range(WRITES):
            _expect(b.get(path, headers=bearer["reader"]), 200, "read through secrets-b")
            body = {"data": {"username": "app", "password": f"{CANARY}-{i}"}, "version": version}
            written = a.patch(path, json=body, headers=bearer["writer"])
            _expect(written, 200, "write through secrets-a")
            acked = time.monotonic()
            version = written.json()["version"]
            while (got := b.get(path, headers=bearer["reader"]).json())["version"] != version:
                if time.monotonic() - acked > FRESHNESS_BOUND:
                    raise DevStackError(
                        f"secrets-b still served version {got['version']} of {path} "
                        f"{FRESHNESS_BOUND} s after secrets-a wrote version {version}"
                    )
            lags.append(time.monotonic() - acked)
            if got["data"]["password"] != f"{CANARY}-{i}":
                raise DevStackError("secrets-b served the new version with other data")
        figures["freshness_ms"] = _summary(lags)

        denied = c.patch(
            path, json={"data": {"x": "y"}, "version": version}, headers=bearer["reader"]
        )
        _expect(denied, 403, "a reader's write")

        key = f"/secrets/app/api/compose-{secrets.token_hex(4)}"
        old_password = CANARY + "-api"
        first = {"data": {"password": old_password, "client": "compose"}, "version": 0}
        _expect(a.patch(key, json=first, headers=bearer["writer"]), 200, "create the API key")
        rotated = c.post(f"{key}:rotate", json={"version": 1}, headers=bearer["admin"])
        _expect(rotated, 200, "rotate through secrets-c")
        new = rotated.json()["version"]

        def rotated_everywhere() -> bool:
            got = [cl.get(key, headers=bearer["reader"]).json() for cl in (a, b)]
            return all(g["version"] == new for g in got)

        wait_for("the rotated version on secrets-a and secrets-b", rotated_everywhere, 5, 0.01)
        after = b.get(key, headers=bearer["reader"]).json()["data"]
        if after["password"] == old_password or after["client"] != "compose":
            raise DevStackError("the rotation did not make a new password and keep the rest")
        state = b.get(f"{key}:rotation", headers=bearer["reader"]).json()
        if state["state"] != "idle" or state["last_rotated"] is None:
            raise DevStackError(f"rotation state after the rotation: {state}")
        figures["rotation"] = {"version": new, "previous_version": 1}

    figures["prometheus_up_after_s"] = round(
        wait_for("Prometheus scraping three instances", lambda: _targets_up() == 3, 90), 1
    )
    figures["containers"] = _hardening(stack)
    if CANARY in stack.logs():
        raise DevStackError("a secret value reached the containers' logs")
    return figures


def _targets_up() -> int:
    query = {"query": 'up{job="secrets-service"} == 1'}
    try:
        answer = httpx.get(f"{PROMETHEUS}/api/v1/query", params=query, timeout=5, trust_env=False)
        return len(answer.json()["data"]["result"])
    except (httpx.HTTPError, ValueError, KeyError):
        return 0


def _hardening(stack: ComposeStack) -> dict[str, Any]:
    """Each instance: healthy by the image's healthcheck, read-only root, not root."""
    seen = {}
    for name in INSTANCES:
        ident = stack.container(name)

        def healthy(ident: str = ident) -> bool:
            out = docker("inspect", "--format", "{{.State.Health.Status}}", ident).stdout
            return out.strip() == "healthy"

        wait_for(f"{name} healthy", healthy, 60)
        fmt = "{{.HostConfig.ReadonlyRootfs}} {{.Config.User}}"
        read_only, user = docker("inspect", "--format", fmt, ident).stdout.split()
        if read_only != "true" or user.split(":")[0] in ("", "0", "root"):
            raise DevStackError(f"{name}: read-only root {read_only}, user {user!r}")
        seen[name] = {"health": "healthy", "read_only": True, "user": user}
    return seen


def _expect(response: httpx.Response, status: int, what: str) -> None:
    if response.status_code != status:
        # The body is an error document (never a value); the status and error code suffice.
        raise DevStackError(f"{what}: {response.status_code} {response.text[:300]}")


def _summary(seconds: Sequence[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {
        "median": round(statistics.median(ms), 2),
        "max": round(ms[-1], 2),
        "samples": len(ms),
    }


def run() -> dict[str, Any]:
    figures: dict[str, Any] = {}
    engine = DockerEngine()
    began = time.monotonic()
    _say("Docker engine ...")
    engine.start()
    try:
        figures["engine_started_here"] = engine.started_here
        figures["engine_s"] = round(time.monotonic() - began, 1)
        _say("images (base when missing; OpenBao, NATS, Prometheus, the service) ...")
        figures["build_s"] = {k: round(v, 1) for k, v in build_images().items()}
        tags = (OPENBAO_IMAGE, NATS_IMAGE, PROMETHEUS_IMAGE, SERVICE_IMAGE)
        figures["image_mb"] = {t: round(s / 1e6) for t, s in image_sizes(tags).items()}
        for port in PORTS:
            check_port_free(port, "the compose stack")
        with tempfile.TemporaryDirectory(prefix="secrets-compose-") as workdir:
            stack = ComposeStack(Path(workdir))
            stack.make_certificates()
            try:
                figures.update(_up_and_check(stack))
            except BaseException:
                print(stack.logs()[-20000:].replace(CANARY, "<canary>"), file=sys.stderr)
                raise
            finally:
                down_began = time.monotonic()
                _say("down -v ...")
                stack.down()
                figures["down_s"] = round(time.monotonic() - down_began, 1)
                left = stack.leftovers()
        if left:
            raise DevStackError(f"compose down left {left}")
    finally:
        engine.stop()
    return figures


def _up_and_check(stack: ComposeStack) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    began = time.monotonic()
    _say("up: OpenBao (three nodes) and openbao-init ...")
    stack.compose("up", "-d", "--no-build", "openbao-init")
    code = stack.wait_exit("openbao-init", 300)
    if code != 0:
        raise DevStackError(f"openbao-init exited {code}:\n{stack.logs('openbao-init')[-3000:]}")
    figures["openbao_ready_s"] = round(time.monotonic() - began, 1)
    oidc = configure_oidc(VAULT, stack.root_token(), verify=stack.verify)
    if oidc.issuer != stack.env["SECRETS_OIDC_ISSUER"]:
        raise DevStackError(f"OpenBao's issuer is {oidc.issuer}, the stack was told otherwise")
    _say("up: NATS, the three instances, Prometheus ...")
    stack.compose("up", "-d", "--no-build")
    figures["all_up_s"] = round(time.monotonic() - began, 1)
    _say("smoke test ...")
    figures.update(smoke_test(stack, oidc))
    figures["total_s"] = round(time.monotonic() - began, 1)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.compose_test", description=__doc__)
    parser.add_argument("--output", type=Path, help="write the figures as JSON here too")
    args = parser.parse_args(argv)
    try:
        figures = run()
    except DevStackError as exc:
        print(f"compose-test FAILED: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(figures, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    print("compose-test passed; nothing left behind", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

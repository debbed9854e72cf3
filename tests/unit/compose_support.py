"""How the compose tests read compose/ and the Dockerfile without a Docker engine: the operator's
variables, ${VAR}, mounts, OpenBao listeners, NATS command lines and grants, Dockerfile steps."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
NATS_DIR = COMPOSE_DIR / "nats"
OPENBAO_DIR = COMPOSE_DIR / "openbao"
OPENBAO_CONFIG = "/openbao/config/"  # the image's `bao server` reads every file there
OPENBAO_NODES = ["openbao-1", "openbao-2", "openbao-3"]
NATS_NODES = ["nats-1", "nats-2", "nats-3"]
INSTANCES = ["secrets-a", "secrets-b", "secrets-c"]
# What an operator exports before `docker compose up` (the file's header says which).
OPERATOR_ENV = {
    "SECRETS_VAULT_SECRET_ID": "fedcba98" * 3,
    "SECRETS_OIDC_ISSUER": "https://issuer.example",
    "SECRETS_NATS_SERVICE_PASSWORD": "0123abcd" * 3,
    "SECRETS_NATS_LISTENER_PASSWORD": "4567ef01" * 3,
    "SECRETS_NATS_ROUTE_PASSWORD": "89abcdef" * 3,
}


def load_stack() -> dict[str, Any]:
    """compose/docker-compose.yml as written (variables unresolved)."""
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def resolved(value: object, env: Mapping[str, str] = OPERATOR_ENV) -> str:
    """${VAR}, ${VAR:?msg} and ${VAR:-default} as compose resolves them with `env` exported."""

    def sub(m: re.Match[str]) -> str:
        name, modifier, rest = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        assert modifier == ":-", f"{name} is neither exported by the operator nor defaulted"
        return rest

    return re.sub(r"\$\{(\w+)(:[?-])?([^}]*)\}", sub, str(value))


def host_port(address: str) -> tuple[str, int]:
    """("127.0.0.1", 8200) from "https://127.0.0.1:8200" or "127.0.0.1:8200"."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    assert parts.hostname is not None and parts.port is not None, address
    return parts.hostname, parts.port


def mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """target -> source of a service's volumes, as the operator's compose resolves them."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = resolved(volume).split(":")
        found[target] = source
    return found


# -- OpenBao's files ---------------------------------------------------------------------------


def openbao_config(node: Mapping[str, Any]) -> dict[str, str]:
    """The files a node's `bao server` reads (mounted in /openbao/config/): name -> text."""
    return {
        target.removeprefix(OPENBAO_CONFIG): (COMPOSE_DIR / source).read_text()
        for target, source in mounts(node).items()
        if target.startswith(OPENBAO_CONFIG)
    }


def listeners(node: Mapping[str, Any]) -> list[dict[str, str]]:
    """Every `listener "tcp"` block of a node's configuration, as its key = "value" pairs."""
    text = "\n".join(openbao_config(node).values())
    blocks = re.findall(r'^listener\s+"tcp"\s*\{(.*?)^\}', text, re.S | re.M)
    return [dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', block)) for block in blocks]


def init_sh_nodes() -> list[str]:
    """The nodes init.sh prepares when BAO_NODES is not set (openbao-init does not set it)."""
    default = re.search(r'nodes=\$\{BAO_NODES:-"([^"]+)"\}', (OPENBAO_DIR / "init.sh").read_text())
    assert default is not None, "init.sh has no default BAO_NODES"
    return default.group(1).split()


# -- NATS's command lines ----------------------------------------------------------------------


@dataclass(frozen=True)
class NatsNode:
    """What a NATS node's command line says (it overrides nats-server.conf's listen lines)."""

    args: list[str]
    host: str
    port: int
    monitor_port: int
    cluster: str
    routes: list[SplitResult]

    @classmethod
    def of(cls, service: Mapping[str, Any]) -> NatsNode:
        args = [resolved(a) for a in service["command"]]

        def flag(name: str) -> str:
            assert args.count(name) == 1, f"{name} should be given once: {args}"
            return args[args.index(name) + 1]

        return cls(
            args=args,
            host=flag("-a"),
            port=int(flag("-p")),
            monitor_port=int(flag("-m")),
            cluster=flag("--cluster"),
            routes=[urlsplit(route) for route in flag("--routes").split(",")],
        )


def nats_grants() -> dict[str, dict[str, list[str]]]:
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


# -- the Dockerfile ----------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile in order: comments dropped, lines joined."""
    steps = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue  # Docker drops comment lines inside a continuation too
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending.removesuffix("\\") + " "
            continue
        keyword, _, arguments = pending.partition(" ")
        steps.append((keyword.upper(), arguments.strip()))
        pending = ""
    return steps


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def image_env(steps: list[tuple[str, str]]) -> dict[str, str]:
    """The final stage's ENV, KEY=value pairs."""
    found: dict[str, str] = {}
    for keyword, arguments in final_stage(steps):
        if keyword == "ENV":
            found |= dict(pair.split("=", 1) for pair in shlex.split(arguments))
    return found

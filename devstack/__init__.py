"""The dev harness: real OpenBao and nats-server processes on free loopback ports, OpenBao as an
OIDC issuer, and the `make dev` stack. Never part of the production wheel or image.

Used by the tests, the benchmarks and `secrets-service dev` from a source checkout.
"""

from devstack.nats import NatsServer, start_nats_cluster
from devstack.oidc import DEV_PERSONAS, DEV_POLICY_TOML, OidcIssuer, configure_oidc
from devstack.openbao import OpenBaoServer
from devstack.postgres import PostgresServer
from devstack.processes import (
    BinaryNotFound,
    DevStackError,
    NatsEndpoint,
    OpenBaoEndpoint,
    find_binary,
    free_port,
    wait_for_kv,
)
from devstack.raft import OpenBaoCluster
from devstack.service_process import ServiceProcess

__all__ = [
    "DEV_PERSONAS",
    "DEV_POLICY_TOML",
    "BinaryNotFound",
    "DevStackError",
    "NatsEndpoint",
    "NatsServer",
    "OidcIssuer",
    "OpenBaoCluster",
    "OpenBaoEndpoint",
    "OpenBaoServer",
    "PostgresServer",
    "ServiceProcess",
    "configure_oidc",
    "find_binary",
    "free_port",
    "start_nats_cluster",
    "wait_for_kv",
]

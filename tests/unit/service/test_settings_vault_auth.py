"""Settings for the service's own Vault login: SECRETS_VAULT_AUTH (token, approle, jwt), what each
method needs, the AppRole default kept from before the setting, the auth mount; and exit code 2
naming the setting for a bad or missing one."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import Settings
from tests.unit.service import test_cli
from tests.unit.service.test_cli import assert_one_line_naming, serve
from tests.unit.service.test_settings import config_error, environ

# Fixtures of test_cli: a complete configuration whose servers cannot be reached.
policy_file = test_cli.policy_file
settings = test_cli.settings


def jwt_file(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text("eyJ.header.sig\n")
    return str(path)


def test_the_token_method_is_the_default() -> None:
    settings = Settings.from_environ(environ())
    assert settings.vault_auth == "token"
    assert settings.vault_role is settings.vault_jwt_file is settings.vault_auth_mount is None


def test_both_approle_ids_without_the_setting_still_mean_approle_even_beside_a_token() -> None:
    settings = Settings.from_environ(environ(vault_role_id="r", vault_secret_id="s"))
    assert settings.vault_auth == "approle"
    settings = Settings.from_environ(
        environ(vault_token=None, vault_role_id="r", vault_secret_id="s")
    )
    assert settings.vault_auth == "approle"


def test_the_token_method_named_with_approle_ids_given_uses_the_token() -> None:
    settings = Settings.from_environ(
        environ(vault_auth="token", vault_role_id="r", vault_secret_id="s")
    )
    assert settings.vault_auth == "token"


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"vault_auth": "token", "vault_token": None}, "SECRETS_VAULT_TOKEN"),
        ({"vault_auth": "approle", "vault_secret_id": "s"}, "SECRETS_VAULT_ROLE_ID"),
        ({"vault_auth": "approle", "vault_role_id": "r"}, "SECRETS_VAULT_SECRET_ID"),
        ({"vault_auth": "jwt", "vault_jwt_file": "FILE"}, "SECRETS_VAULT_ROLE"),
        ({"vault_auth": "jwt", "vault_role": "svc"}, "SECRETS_VAULT_JWT_FILE"),
        ({"vault_auth": "kerberos"}, "SECRETS_VAULT_AUTH"),
        ({"vault_auth": "jwt", "vault_role": "svc", "vault_jwt_file": "/nonexistent/token"},
         "SECRETS_VAULT_JWT_FILE"),
        ({"vault_auth_mount": "a//b"}, "SECRETS_VAULT_AUTH_MOUNT"),
    ],
    ids=[
        "token-without-token", "approle-without-role-id", "approle-without-secret-id",
        "jwt-without-role", "jwt-without-file", "unknown-method", "jwt-file-unreadable",
        "bad-mount",
    ],
)  # fmt: skip
def test_a_method_without_what_it_needs_is_refused_naming_the_setting(
    overrides: dict[str, str | None], setting: str, tmp_path: Path
) -> None:
    resolved = {k: jwt_file(tmp_path) if v == "FILE" else v for k, v in overrides.items()}
    error = config_error(environ(**resolved))
    assert error.setting == setting


def test_the_jwt_method_takes_a_role_a_readable_token_file_and_a_mount(tmp_path: Path) -> None:
    path = jwt_file(tmp_path)
    settings = Settings.from_environ(
        environ(
            vault_token=None,
            vault_auth="JWT",
            vault_role="secrets-service",
            vault_jwt_file=path,
            vault_auth_mount="/kubernetes-jwt/",
        )
    )
    assert settings.vault_auth == "jwt"
    assert (settings.vault_role, settings.vault_jwt_file) == ("secrets-service", path)
    assert settings.vault_auth_mount == "kubernetes-jwt"


def test_the_jwt_settings_come_from_the_toml_file_too(tmp_path: Path) -> None:
    path = jwt_file(tmp_path)
    config = tmp_path / "secrets.toml"
    config.write_text(f'vault_auth = "jwt"\nvault_role = "svc"\nvault_jwt_file = "{path}"\n')
    settings = Settings.from_environ(environ(vault_token=None, config=str(config)))
    assert (settings.vault_auth, settings.vault_role) == ("jwt", "svc")


@pytest.mark.parametrize(
    ("extra", "setting"),
    [
        ({"SECRETS_VAULT_AUTH": "ldap"}, "SECRETS_VAULT_AUTH"),
        ({"SECRETS_VAULT_AUTH": "jwt", "SECRETS_VAULT_ROLE": "svc"}, "SECRETS_VAULT_JWT_FILE"),
    ],
    ids=["unknown-method", "jwt-without-file"],
)
def test_serve_with_a_bad_vault_login_setting_exits_2_with_one_line_naming_it(
    settings: dict[str, str], extra: dict[str, str], setting: str
) -> None:
    settings.update(extra)
    assert_one_line_naming(serve(settings), setting)


def test_the_jwt_file_contents_never_show_in_the_settings_repr(tmp_path: Path) -> None:
    settings = Settings.from_environ(
        environ(vault_auth="jwt", vault_role="svc", vault_jwt_file=jwt_file(tmp_path))
    )
    assert "eyJ" not in repr(settings)

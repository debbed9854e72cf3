"""devstack/oidc.py without OpenBao: the dev policy grants exactly the roles the personas hold."""

from __future__ import annotations

import tomllib

from devstack import DEV_PERSONAS, DEV_POLICY_TOML


def test_dev_policy_grants_the_roles_the_dev_personas_hold() -> None:
    policy = tomllib.loads(DEV_POLICY_TOML)
    assert policy["auth"]["roles_claim"] == "roles"
    held = {role for roles in DEV_PERSONAS.values() for role in roles}
    assert held == set(policy["roles"])
    assert policy["roles"]["app-reader"] == {"read": ["app/**"]}

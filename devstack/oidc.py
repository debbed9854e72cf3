"""OpenBao as a real OIDC issuer: identity tokens for the dev personas (reader, writer, admin)
and the policy they are tried with."""

from __future__ import annotations

import base64
import json
import re
import shlex
import ssl
from collections.abc import Mapping, Sequence
from typing import Any, Final

import httpx

from devstack.processes import DevStackError

DEV_PERSONAS: Final[Mapping[str, Sequence[str]]] = {
    "reader": ["app-reader"],
    "writer": ["app-writer"],
    "admin": ["admin"],
}

DEV_POLICY_TOML: Final = """\
[auth]
roles_claim = "roles"

[roles.app-reader]
read = ["app/**"]

[roles.app-writer]
read = ["app/**"]
write = ["app/**"]

[roles.admin]
read = ["**"]
write = ["**"]
destroy = ["**"]
rotate = ["**"]
"""

DEV_ROTATION_TOML: Final = """
# POST /secrets/app/<...>:rotate (admin): a new 32-character `password`, other fields kept.
[[rotation.rules]]
paths = ["app/**"]
generator = "password"
"""
"""Added to the policy by `make dev` only: with a rule, each instance scans Vault in the
background (for runs to resume), which tests counting Vault calls must not see."""


class OidcIssuer:
    """OpenBao's identity tokens configured as an OIDC issuer, with one token per persona."""

    def __init__(
        self,
        *,
        addr: str,
        issuer: str,
        audience: str,
        role: str,
        persona_tokens: Mapping[str, str],
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.addr = addr
        self.verify = verify  # how to trust an OpenBao serving HTTPS (an SSLContext of its CA)
        self.issuer = issuer
        self.audience = audience
        self.role = role
        self.persona_tokens = dict(persona_tokens)

    def __repr__(self) -> str:
        return (
            f"OidcIssuer(issuer={self.issuer!r}, audience={self.audience!r}, role={self.role!r}, "
            f"personas={sorted(self.persona_tokens)!r})"
        )

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    def _token_for(self, persona: str) -> str:
        try:
            return self.persona_tokens[persona]
        except KeyError:
            known = ", ".join(sorted(self.persona_tokens))
            raise DevStackError(f"unknown persona {persona!r} (known: {known})") from None

    def mint(self, persona: str) -> str:
        """A fresh JWT for `persona`, signed by OpenBao."""
        headers = {"X-Vault-Token": self._token_for(persona)}
        with httpx.Client(
            base_url=self.addr, headers=headers, timeout=10.0, trust_env=False, verify=self.verify
        ) as c:
            body = _call(c, "GET", f"identity/oidc/token/{self.role}")
        token = body.get("data", {}).get("token")
        if not isinstance(token, str):
            raise DevStackError(f"OpenBao returned no token for persona {persona!r}: {body}")
        return token

    def mint_command(self, persona: str) -> str:
        """A shell line (curl and python3, no jq) printing a fresh JWT for `persona`."""
        header = shlex.quote(f"X-Vault-Token: {self._token_for(persona)}")
        url = shlex.quote(f"{self.addr}/v1/identity/oidc/token/{self.role}")
        parse = shlex.quote('import json,sys; print(json.load(sys.stdin)["data"]["token"])')
        return f"curl -fsS -H {header} {url} | python3 -c {parse}"


def _call(
    client: httpx.Client, method: str, path: str, body: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One OpenBao API call; any non-2xx answer raises with OpenBao's own error text."""
    try:
        resp = client.request(method, f"/v1/{path}", json=body)
    except httpx.TransportError as exc:
        raise DevStackError(f"OpenBao {method} {path} failed: {exc!r}") from exc
    if not resp.is_success:
        raise DevStackError(
            f"OpenBao {method} {path} answered {resp.status_code}: {resp.text.strip()}"
        )
    if resp.status_code == 204 or not resp.content:
        return {}
    data: dict[str, Any] = resp.json()
    return data


def _get_or_none(client: httpx.Client, path: str) -> dict[str, Any] | None:
    resp = client.get(f"/v1/{path}")
    if resp.status_code == 404:
        return None
    if not resp.is_success:
        raise DevStackError(f"OpenBao GET {path} answered {resp.status_code}: {resp.text.strip()}")
    data: dict[str, Any] = resp.json()["data"]
    return data


def _unverified_claims(token: str) -> dict[str, Any]:
    try:
        payload = token.split(".")[1]
        claims: dict[str, Any] = json.loads(
            base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        )
    except (IndexError, ValueError) as exc:
        raise DevStackError(f"OpenBao minted something that is not a JWT: {token[:40]!r}") from exc
    return claims


def _set_group_members(
    client: httpx.Client,
    personas: Mapping[str, Sequence[str]],
    entity_ids: Mapping[str, str],
    current_group_ids: set[str],
) -> None:
    """Put each persona's entity in exactly its roles' groups, leaving other members alone."""
    wanted: dict[str, set[str]] = {}
    for persona, roles in personas.items():
        for role_name in roles:
            wanted.setdefault(role_name, set()).add(entity_ids[persona])
    ours = set(entity_ids.values())
    for group_id in current_group_ids:
        group = _call(client, "GET", f"identity/group/id/{group_id}")["data"]
        if group["name"] not in wanted:
            keep = sorted(set(group.get("member_entity_ids") or []) - ours)
            _call(client, "POST", f"identity/group/id/{group_id}", {"member_entity_ids": keep})
    for name, ids in wanted.items():
        existing = _get_or_none(client, f"identity/group/name/{name}")
        others = set() if existing is None else set(existing.get("member_entity_ids") or [])
        members = sorted((others - ours) | ids)
        _call(
            client,
            "POST",
            f"identity/group/name/{name}",
            {"type": "internal", "member_entity_ids": members},
        )


# Placeholders render as JSON values, so they stay unquoted (`null` for an entity in no group).
_ROLES_TEMPLATE = '{"roles": {{identity.entity.groups.names}}}'


def configure_oidc(
    addr: str,
    root_token: str,
    *,
    audience: str = "secrets-service",
    personas: Mapping[str, Sequence[str]] = DEV_PERSONAS,
    ttl: str = "1h",
    algorithm: str = "RS256",
    verify: ssl.SSLContext | bool = True,
) -> OidcIssuer:
    """Make OpenBao an OIDC issuer whose tokens carry `aud=audience` and each persona's roles.

    Each persona is an identity entity (aliased on the token auth mount) in one identity group
    per role; the JWT template lists the entity's group names as `roles`. The key, OIDC role,
    token role and policy are named after audience and algorithm, so configuring a second
    audience leaves the first working. Personas are shared, though: a persona has the roles of
    the latest call that named it.
    """
    name = f"{re.sub(r'[^A-Za-z0-9_-]', '-', audience)}-{algorithm.lower()}"
    policy = f"{name}-mint"
    headers = {"X-Vault-Token": root_token}
    with httpx.Client(
        base_url=addr, headers=headers, timeout=10.0, trust_env=False, verify=verify
    ) as client:
        _call(client, "POST", "identity/oidc/config", {"issuer": addr})
        key = {"algorithm": algorithm, "allowed_client_ids": [audience]}
        _call(client, "POST", f"identity/oidc/key/{name}", key)
        role = {"key": name, "client_id": audience, "ttl": ttl, "template": _ROLES_TEMPLATE}
        _call(client, "POST", f"identity/oidc/role/{name}", role)
        rules = f'path "identity/oidc/token/{name}" {{ capabilities = ["read"] }}'
        _call(client, "PUT", f"sys/policies/acl/{policy}", {"policy": rules})
        token_role = {
            "allowed_policies": [policy],
            "allowed_entity_aliases": list(personas),
            "orphan": True,
        }
        _call(client, "POST", f"auth/token/roles/{name}", token_role)

        accessor = _call(client, "GET", "sys/auth")["data"]["token/"]["accessor"]
        entity_ids: dict[str, str] = {}
        group_ids: set[str] = set()
        for persona in personas:
            body = {"metadata": {"persona": persona}}
            _call(client, "POST", f"identity/entity/name/{persona}", body)
            entity = _call(client, "GET", f"identity/entity/name/{persona}")["data"]
            entity_ids[persona] = entity["id"]
            group_ids.update(entity.get("direct_group_ids") or [])
            aliases = entity.get("aliases") or []
            if not any(a["mount_accessor"] == accessor and a["name"] == persona for a in aliases):
                alias = {"name": persona, "canonical_id": entity["id"], "mount_accessor": accessor}
                _call(client, "POST", "identity/entity-alias", alias)
        _set_group_members(client, personas, entity_ids, group_ids)

        persona_tokens: dict[str, str] = {}
        for persona in personas:
            created = _call(client, "POST", f"auth/token/create/{name}", {"entity_alias": persona})
            persona_tokens[persona] = created["auth"]["client_token"]

    discovery_url = f"{addr}/v1/identity/oidc/.well-known/openid-configuration"
    discovery = httpx.get(discovery_url, timeout=10.0, trust_env=False, verify=verify)
    if not discovery.is_success:
        raise DevStackError(f"OpenBao discovery answered {discovery.status_code}: {discovery.text}")
    issuer = OidcIssuer(
        addr=addr,
        issuer=discovery.json()["issuer"],
        audience=audience,
        role=name,
        persona_tokens=persona_tokens,
        verify=verify,
    )

    for persona, roles in personas.items():
        claims = _unverified_claims(issuer.mint(persona))
        got = sorted(claims.get("roles") or [])
        if got != sorted(set(roles)) or claims.get("aud") != audience:
            raise DevStackError(
                f"persona {persona!r} got roles={got} aud={claims.get('aud')!r}; "
                f"wanted roles={sorted(set(roles))} aud={audience!r}"
            )
    return issuer

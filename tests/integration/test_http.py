"""The HTTP API end to end: real OpenBao, real NATS, real tokens from OpenBao's OIDC issuer."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

import service.http.fast_path
from devstack import NatsEndpoint, OidcIssuer, OpenBaoEndpoint
from schemas.errors import NotFound
from service.vault.backend import HvacBackend
from tests.fakes import SpyBackend
from tests.support import (
    LogCapture,
    bearer,
    raw_request,
    running_service,
    service_settings,
    write_policy,
)

CANARY = "canary-7f3c9e1d-DO-NOT-LEAK"


class Stack:
    def __init__(self, url: str, tokens: dict[str, str], spy: SpyBackend, logs: LogCapture):
        self.url = url
        self.tokens = tokens
        self.spy = spy
        self.logs = logs
        self.client = httpx.AsyncClient(base_url=url, timeout=10)

    async def get(self, path: str, who: str = "reader", **kw: Any) -> httpx.Response:
        return await self.client.get(f"/secrets/{path}", headers=bearer(self.tokens[who]), **kw)

    async def patch(self, path: str, body: Any, who: str = "writer", **kw: Any) -> httpx.Response:
        headers = dict(bearer(self.tokens[who]))
        if isinstance(body, bytes):
            return await self.client.patch(f"/secrets/{path}", content=body, headers=headers)
        return await self.client.patch(f"/secrets/{path}", json=body, headers=headers, **kw)


@pytest.fixture(scope="module")
async def stack(
    openbao: OpenBaoEndpoint,
    nats: NatsEndpoint,
    oidc: OidcIssuer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    policy = write_policy(tmp_path_factory.mktemp("http"))
    settings = service_settings(openbao, nats, oidc, policy)
    spy = SpyBackend(HvacBackend(openbao.addr, token=openbao.root_token))
    tokens = {who: oidc.mint(who) for who in ("reader", "writer", "admin")}
    with LogCapture() as logs:
        async with running_service(settings, backend=spy) as svc:
            s = Stack(svc.url, tokens, spy, logs)
            try:
                yield s
            finally:
                await s.client.aclose()
    await spy.aclose()  # injected: not the app's to close


def fresh(prefix: str = "app") -> str:
    return f"{prefix}/t-{uuid.uuid4().hex[:10]}/db"


async def create(stack: Stack, path: str, data: dict[str, Any] | None = None) -> int:
    response = await stack.patch(path, {"data": data or {"password": "s3cret-Value"}, "version": 0})
    assert response.status_code == 200, response.text
    version: int = response.json()["version"]
    return version


# -- reads and writes -----------------------------------------------------------------------


async def test_created_secret_reads_back_with_etag_and_no_store(stack: Stack) -> None:
    path = fresh()
    assert await create(stack, path, {"username": "app", "password": "pw-1"}) == 1
    response = await stack.get(path)
    assert response.status_code == 200
    body = response.json()
    assert body["path"] == path and body["version"] == 1
    assert body["data"] == {"username": "app", "password": "pw-1"}
    assert body["created_time"].startswith("20")
    assert response.headers["etag"] == '"1"'
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]


async def test_patch_with_current_version_writes_the_next_version(stack: Stack) -> None:
    path = fresh()
    await create(stack, path)
    response = await stack.patch(path, {"data": {"password": "pw-2"}, "version": 1})
    assert response.status_code == 200
    assert response.json() == {"path": path, "version": 2}
    assert response.headers["cache-control"] == "no-store"
    read = await stack.get(path)
    assert read.json()["version"] == 2 and read.json()["data"] == {"password": "pw-2"}


async def test_patch_with_stale_version_returns_409_with_current_version(stack: Stack) -> None:
    path = fresh()
    await create(stack, path)
    await stack.patch(path, {"data": {"password": "pw-2"}, "version": 1})
    response = await stack.patch(path, {"data": {"password": "pw-3"}, "version": 1})
    assert response.status_code == 409
    body = response.json()
    assert body["error"] == "version_conflict" and body["current_version"] == 2
    assert isinstance(body["detail"], str)
    # The failed write left version 2 intact.
    read = await stack.get(path)
    assert read.json()["version"] == 2 and read.json()["data"] == {"password": "pw-2"}


async def test_creating_with_version_0_twice_gives_409_the_second_time(stack: Stack) -> None:
    path = fresh()
    await create(stack, path, {"password": "first"})
    response = await stack.patch(path, {"data": {"password": "second"}, "version": 0})
    assert response.status_code == 409
    assert response.json()["current_version"] == 1
    assert (await stack.get(path)).json()["data"] == {"password": "first"}


async def test_version_query_reads_old_versions(stack: Stack) -> None:
    path = fresh()
    await create(stack, path, {"password": "v1"})
    await stack.patch(path, {"data": {"password": "v2"}, "version": 1})
    old = await stack.get(path, params={"version": "1"})
    assert old.status_code == 200
    assert old.json()["version"] == 1 and old.json()["data"] == {"password": "v1"}
    assert old.headers["etag"] == '"1"'
    assert (await stack.get(path, params={"version": "2"})).json()["data"] == {"password": "v2"}
    assert (await stack.get(path, params={"version": "9"})).status_code == 404


@pytest.mark.parametrize("bad", ["0", "-1", "abc", "1.5", "", "99999999999999999999"])
async def test_bad_version_query_is_400(stack: Stack, bad: str) -> None:
    response = await stack.get("app/anything", params={"version": bad})
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


async def test_missing_secret_is_404_to_a_reader(stack: Stack) -> None:
    response = await stack.get(fresh())
    assert response.status_code == 404
    assert response.json() == {"error": "not_found", "detail": "no secret at this path"}


# -- authorization ----------------------------------------------------------------------------


async def test_forbidden_is_identical_whether_or_not_the_path_exists(stack: Stack) -> None:
    existing = fresh("ops")
    assert (await stack.patch(existing, {"data": {"k": "v"}, "version": 0}, who="admin")).is_success
    missing = fresh("ops")
    a = await stack.get(existing)
    b = await stack.get(missing)
    assert a.status_code == b.status_code == 403
    assert a.content == b.content
    assert a.json() == {"error": "forbidden", "detail": "no grant for this path"}


async def test_reader_cannot_write(stack: Stack) -> None:
    path = fresh()
    await create(stack, path)
    response = await stack.patch(path, {"data": {"password": "x"}, "version": 1}, who="reader")
    assert response.status_code == 403
    assert (await stack.get(path)).json()["version"] == 1


async def test_admin_reads_everywhere_writer_only_under_app(stack: Stack) -> None:
    path = fresh("team")
    assert (await stack.patch(path, {"data": {"k": "v"}, "version": 0}, who="admin")).is_success
    assert (await stack.get(path, who="admin")).status_code == 200
    assert (await stack.get(path, who="writer")).status_code == 403


# -- authentication ---------------------------------------------------------------------------


def _b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, None),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"Authorization": "Bearer garbage"}, "malformed"),
        (
            {"Authorization": "Bearer " + _b64({"alg": "none"}) + "." + _b64({"sub": "x"}) + "."},
            "bad_algorithm",
        ),  # noqa: E501
    ],
)
async def test_missing_or_bad_tokens_are_401_with_www_authenticate(
    stack: Stack, headers: dict[str, str], reason: str | None
) -> None:
    response = await stack.client.get("/secrets/app/db", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthenticated"
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    if reason:
        assert f'error_description="{reason}"' in challenge


async def test_a_tampered_openbao_token_is_401(stack: Stack) -> None:
    header, payload, signature = stack.tokens["reader"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["admin"]
    forged = f"{header}.{_b64(claims)}.{signature}"
    response = await stack.client.get("/secrets/app/db", headers=bearer(forged))
    assert response.status_code == 401
    assert "bad_signature" in response.headers["www-authenticate"]


async def test_a_bad_signature_is_logged_with_its_reason_and_never_the_token(stack: Stack) -> None:
    token = stack.tokens["reader"]
    header, payload, _ = token.split(".")
    before = len(stack.logs.text)  # only this request's lines: earlier tests log too
    response = await stack.client.get("/secrets/app/db", headers=bearer(f"{header}.{payload}.AAAA"))
    assert response.status_code == 401
    logged = stack.logs.text[before:]
    # The service's own lines: the test client's DEBUG lines echo the WWW-Authenticate header.
    own = [
        line
        for line in map(json.loads, logged.splitlines())
        if line["logger"].startswith("secrets")
    ]
    assert any(line.get("reason") == "bad_signature" for line in own), own
    assert payload not in logged


# -- input checked before any backend call ----------------------------------------------------

BAD_PATHS = [
    "app/../etc/passwd",
    "app/./db",
    "app//db",
    "app/db/",
    "app/%2e%2e/db",
    "app/d%00b",
    "app/db;x",
    "app/..;/db",
    "app/dé",
    "app/\uff44b",  # fullwidth letter
    "a/" * 17 + "x",
    "a" * 513,
    "app/db:unknown:verb",
    "app/db:UPPER",
]


@pytest.mark.parametrize("raw", BAD_PATHS)
async def test_invalid_paths_are_400_and_never_reach_vault(stack: Stack, raw: str) -> None:
    before = len(stack.spy.paths)
    target = b"/secrets/" + quote(raw, safe="/%;:.").encode()
    for method, who in (("GET", "reader"), ("PATCH", "writer")):
        body = b'{"data": {"k": "v"}, "version": 0}' if method == "PATCH" else b""
        status = await raw_request(stack.url, method, target, stack.tokens[who], body)
        assert status == 400, (raw, method)
    assert stack.spy.paths[before:] == []


NEWLINE_TARGETS = [
    # Starlette's route regex ends in `$`, which also matches before a final newline: these
    # once reached the routes as the path without its `\n`.
    ("GET", "{path}%0A"),
    ("HEAD", "{path}%0A"),
    ("PATCH", "{path}%0A"),
    ("DELETE", "{path}%0A"),
    ("GET", "{path}:versions%0A"),
    ("POST", "{path}:rollback%0A"),
    ("POST", "{path}:undelete%0A"),
    ("GET", "{path}%0A:versions"),
    ("GET", "{prefix}%0A:list"),
    ("GET", "{prefix}:list%0A"),
    ("GET", "%0A:list"),
]


@pytest.mark.parametrize(("method", "template"), NEWLINE_TARGETS)
async def test_a_path_with_a_newline_before_its_end_is_400_for_every_method_and_verb(
    stack: Stack, method: str, template: str
) -> None:
    path = fresh()
    await create(stack, path)
    target = template.format(path=path, prefix=path.rpartition("/")[0])
    # httpx keeps a pre-encoded %0A as it is: the server decodes it into scope["path"].
    url = httpx.URL(f"{stack.url}/secrets/{target}")
    assert url.raw_path.endswith(b"%0A") or b"%0A:" in url.raw_path
    body: dict[str, Any] | None = None
    if method == "PATCH":
        body = {"data": {"password": "Zq8#vT2!mL9$wR4p"}, "version": 1}
    elif method == "POST":
        body = {"versions": [1]} if "undelete" in target else {"to_version": 1, "version": 1}
    before = len(stack.spy.paths)
    response = await stack.client.request(
        method, url, headers=bearer(stack.tokens["admin"]), json=body
    )
    assert response.status_code == 400, (method, target, response.text)
    if method != "HEAD":
        assert response.json()["error"] == "invalid_path"
    assert stack.spy.paths[before:] == []
    assert (await stack.get(path)).json()["version"] == 1  # nothing was written or deleted


async def test_the_top_listing_with_a_trailing_newline_is_400(stack: Stack) -> None:
    url = httpx.URL(f"{stack.url}/secrets:list%0A")
    response = await stack.client.get(url, headers=bearer(stack.tokens["admin"]))
    assert response.status_code == 400 and response.json()["error"] == "invalid_path"


async def test_a_cached_path_with_a_trailing_newline_is_400_not_a_cached_answer(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = fresh()
    await create(stack, path)
    assert (await stack.get(path)).status_code == 200  # the value and the token are cached now
    assert (await stack.get(path)).status_code == 200
    seen: list[tuple[str, bool]] = []
    original = service.http.fast_path.cached_read

    def spy(scope: Any) -> Any:
        answer = original(scope)
        seen.append((scope["path"], answer is not None))
        return answer

    monkeypatch.setattr(service.http.fast_path, "cached_read", spy)
    url = httpx.URL(f"{stack.url}/secrets/{path}%0A")
    response = await stack.client.get(url, headers=bearer(stack.tokens["reader"]))
    assert seen == [(f"/secrets/{path}\n", False)], "the service saw the newline, and declined"
    assert response.status_code == 400 and response.json()["error"] == "invalid_path"
    assert "s3cret-Value" not in response.text


async def test_malformed_json_body_is_400(stack: Stack) -> None:
    response = await stack.patch(fresh(), b'{"data": {"k": ')
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


@pytest.mark.parametrize(
    "body",
    [
        {"data": ["a"], "version": 0},
        {"data": {"k": "v"}},
        {"data": {"k": "v"}, "version": "1"},
        {"data": {"k": "v"}, "version": -1},
        {"data": {"k": "v"}, "version": 0, "extra": CANARY},
        [],
        "text",
    ],
)
async def test_body_of_the_wrong_shape_is_400(stack: Stack, body: Any) -> None:
    response = await stack.patch(fresh(), body)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert CANARY not in response.text


async def test_empty_body_is_400(stack: Stack) -> None:
    response = await stack.patch(fresh(), b"")
    assert response.status_code == 400


async def test_body_over_the_limit_is_413_and_the_stored_version_survives(stack: Stack) -> None:
    path = fresh()
    await create(stack, path, {"password": "keep-me"})
    huge = {"data": {"blob": "x" * 70_000}, "version": 1}
    response = await stack.patch(path, huge)
    assert response.status_code == 413
    assert response.json()["error"] == "too_large"
    assert (await stack.get(path)).json()["data"] == {"password": "keep-me"}


async def test_streamed_body_over_the_limit_is_413(stack: Stack) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"data": {"blob": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}, "version": 0}'

    response = await stack.client.patch(
        f"/secrets/{fresh()}", content=chunks(), headers=bearer(stack.tokens["writer"])
    )
    assert response.status_code == 413


async def test_secret_breaking_the_rules_is_422_with_violations_and_no_values(
    stack: Stack,
) -> None:
    path = fresh()
    await create(stack, path, {"password": "keep-me"})
    response = await stack.patch(path, {"data": {"password": "", "note": CANARY}, "version": 1})
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "invalid_secret"
    assert {"field": "password", "rule": "not_empty"} in body["violations"]
    assert CANARY not in response.text
    assert (await stack.get(path)).json()["data"] == {"password": "keep-me"}


# -- service endpoints --------------------------------------------------------------------------


async def test_healthz_and_readyz_answer_while_vault_and_nats_do(stack: Stack) -> None:
    assert (await stack.client.get("/healthz")).json() == {"status": "ok"}
    ready = await stack.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"vault": True, "nats": True}}


async def test_openapi_document_describes_the_api_from_the_schemas(stack: Stack) -> None:
    doc = (await stack.client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    assert {"get", "patch"} <= set(doc["paths"]["/secrets/{path}"])
    schemas = doc["components"]["schemas"]
    assert schemas["WriteRequest"]["required"] == ["data", "version"]
    assert {"SecretBody", "ConflictError", "ErrorBody", "InvalidSecretError"} <= set(schemas)


async def test_metrics_count_operations_by_outcome(stack: Stack) -> None:
    await stack.get(fresh())  # a 404
    text = (await stack.client.get("/metrics")).text
    assert 'secrets_operations_total{op="read",outcome="not_found"}' in text
    assert "secrets_auth_failures_total" in text


async def test_unknown_route_is_404_json(stack: Stack) -> None:
    response = await stack.client.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


async def test_the_request_id_header_is_always_the_services_own(stack: Stack) -> None:
    # The caller's id is recorded as client_request_id (integration/test_observability.py), never
    # given back as the id the service knows the request by.
    seen = set()
    for sent in ("abc-123", "has space", "x" * 200, "semi;colon"):
        response = await stack.client.get("/healthz", headers={"X-Request-ID": sent})
        given = response.headers["x-request-id"]
        assert given != sent and len(given) == 32 and given not in seen
        seen.add(given)


# -- the canary ----------------------------------------------------------------------------------


async def test_canary_value_appears_in_no_log_error_body_or_repr(stack: Stack) -> None:
    path = fresh()
    bodies: list[str] = []
    r = await stack.patch(path, {"data": {"password": CANARY}, "version": 0})
    bodies.append(r.text)
    bodies.append((await stack.patch(path, {"data": {"password": CANARY}, "version": 0})).text)
    bodies.append((await stack.patch(path, {"data": {"password": CANARY}, "version": 7})).text)
    bodies.append((await stack.patch(path, {"data": {"a": "", "b": CANARY}, "version": 1})).text)
    bodies.append(
        (await stack.patch(path, {"data": {"p": CANARY}, "version": 1}, who="reader")).text
    )
    bodies.append((await stack.get(path, who="writer", params={"version": "5"})).text)
    read = await stack.get(path)
    assert CANARY in read.text  # the one place it belongs
    for body in bodies:
        assert CANARY not in body
    assert CANARY not in stack.logs.text
    metrics = (await stack.client.get("/metrics")).text
    assert CANARY not in metrics
    from service.auth.oidc import OIDCVerifier  # noqa: F401 - imported to show nothing needs it

    secret = await stack.spy.inner.read(path)
    for obj in (secret, secret.data, [secret], {"s": secret}):
        assert CANARY not in repr(obj) and CANARY not in str(obj)
    assert CANARY not in f"{secret}"


async def test_not_found_from_vault_maps_to_the_service_error(stack: Stack) -> None:
    with pytest.raises(NotFound):
        await stack.spy.inner.read(fresh())

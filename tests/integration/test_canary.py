"""The canary: a secret value driven through the whole API must surface only where it is read.

Everything else the service emits is collected (every log record of the process at DEBUG,
/metrics, every response body but the reads, the audit file, every NATS message under the
prefix) and must not hold it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import httpx
import nats as nats_py
from nats.aio.msg import Msg

from devstack import DEV_POLICY_TOML, NatsEndpoint, OidcIssuer, OpenBaoEndpoint
from tests.support import (
    LogCapture,
    bearer,
    eventually,
    running_service,
    service_settings,
    write_policy,
)

CANARY = "canary-Qx7Zp2Lw9Vt4-MUST-NOT-LEAK"

POLICY = (
    DEV_POLICY_TOML
    + """
[[validation.rules]]
paths = ["app/strict/**"]
allowed = ["password"]
[validation.rules.fields.password]
max_length = 8
"""
)


def _b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


async def test_the_canary_appears_in_no_log_metric_error_body_audit_record_or_nats_payload(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path, POLICY)
    settings = service_settings(openbao, nats, oidc, policy)
    tokens = {who: oidc.mint(who) for who in ("reader", "writer", "admin")}
    payloads: list[bytes] = []

    async def collect(msg: Msg) -> None:
        payloads.append(msg.subject.encode() + b" " + msg.data)

    nc = await nats_py.connect(nats.url)
    await nc.subscribe(f"{settings.nats_prefix}.>", cb=collect)
    path = f"app/c-{uuid.uuid4().hex[:10]}/db"
    strict = f"app/strict/c-{uuid.uuid4().hex[:10]}"
    other = f"ops/c-{uuid.uuid4().hex[:10]}"
    reads: list[str] = []
    answers: list[httpx.Response] = []
    try:
        with LogCapture() as logs:
            async with running_service(settings) as svc:
                async with httpx.AsyncClient(base_url=svc.url, timeout=10) as client:

                    def as_(who: str) -> dict[str, str]:
                        return dict(bearer(tokens[who]))

                    async def call(request: Awaitable[httpx.Response]) -> httpx.Response:
                        response = await request
                        answers.append(response)
                        return response

                    def patch(p: str, data: Any, version: int, who: str = "writer") -> Any:
                        body = {"data": data, "version": version}
                        return call(client.patch(f"/secrets/{p}", json=body, headers=as_(who)))

                    def get(p: str, who: str = "reader", **params: str) -> Any:
                        return call(client.get(f"/secrets/{p}", headers=as_(who), params=params))

                    # Writes: create, update, conflicts.
                    assert (await patch(path, {"password": CANARY}, 0)).status_code == 200
                    assert (await patch(path, {"password": CANARY + "-2"}, 1)).status_code == 200
                    assert (await patch(path, {"password": CANARY}, 1)).status_code == 409
                    assert (await patch(path, {"password": CANARY}, 0)).status_code == 409
                    # Reads, the one place the canary belongs.
                    for response in (await get(path), await get(path, version="1")):
                        assert response.status_code == 200 and CANARY in response.text
                        reads.append(response.text)
                    # Refusals: 422 (default and policy rules), 403, 404, 401, 400, 413.
                    bad = {"password": CANARY, "empty": "", "bad key": CANARY}
                    assert (await patch(path, bad, 2)).status_code == 422
                    assert (await patch(strict, {"password": CANARY}, 0)).status_code == 422
                    assert (await patch(strict, {"note": CANARY}, 0)).status_code == 422
                    assert (await patch(path, {"p": CANARY}, 2, who="reader")).status_code == 403
                    assert (await patch(other, {"p": CANARY}, 0)).status_code == 403
                    assert (await get(other)).status_code == 403
                    assert (await get(path, version="99")).status_code == 404
                    forged = _b64({"alg": "RS256"}) + "." + _b64({"sub": CANARY}) + ".AAAA"
                    for token in (CANARY, forged):
                        response = await call(client.get(f"/secrets/{path}", headers=bearer(token)))
                        assert response.status_code == 401
                    extra = {"data": {"k": "v"}, "version": 2, CANARY: CANARY}
                    response = await call(
                        client.patch(f"/secrets/{path}", json=extra, headers=as_("writer"))
                    )
                    assert response.status_code == 400
                    huge = {"data": {"k": CANARY * 3000}, "version": 2}
                    response = await call(
                        client.patch(f"/secrets/{path}", json=huge, headers=as_("writer"))
                    )
                    assert response.status_code == 413
                    # Other methods on the secret, whatever they answer.
                    await call(client.get(f"/secrets/{path}:versions", headers=as_("reader")))
                    await call(client.get("/secrets/app:list", headers=as_("reader")))
                    # In-process reads print redacted.
                    secret = await svc.state.manager.get(path)
                    assert secret.data["password"] == CANARY + "-2"
                    for shown in (repr(secret), str(secret), repr(secret.data), f"{[secret]}"):
                        assert CANARY not in shown
                    metrics = (await client.get("/metrics")).text
                    assert "secrets_operations_total" in metrics
                    # Both change events have arrived (the collecting connection saw them).
                    await eventually(
                        lambda: sum(b".changed." in p for p in payloads) >= 2, timeout=5
                    )
        await asyncio.sleep(0.1)  # the last audit records reach NATS
    finally:
        await nc.close()

    audit = (tmp_path / "audit.log").read_text()
    assert len(audit.splitlines()) >= len(answers)
    # A message carries one record or several, a JSON line each.
    assert sum(p.count(b"\n") + 1 for p in payloads if b".audit." in p) >= len(answers)
    for response in answers:
        if response.text not in reads:
            assert CANARY not in response.text, response.request.url
            assert CANARY not in str(response.headers)
    assert CANARY not in logs.text
    assert logs.lines()  # the capture did see the service's lines
    assert CANARY not in metrics
    assert CANARY not in audit
    for payload in payloads:
        assert CANARY.encode() not in payload

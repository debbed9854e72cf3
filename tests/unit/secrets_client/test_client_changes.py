"""secrets_client/client.py's change-request methods and extra headers, against an
httpx.MockTransport: the request each method sends, and what is refused before any is sent.
Against the real stack: tests/integration/test_secretsctl_approvals.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from secrets_client import ClientError, SecretsClient

CHANGE_ID = "0b5e9c2f4d6a4e1f8a3b7c9d2e4f6a8b"
CANARY = "canary-5d1f0e-never-in-a-url"


class Recorder:
    """The transport's handler: keeps each request, answers `status` with `body`."""

    def __init__(self, status: int = 200, body: Any = None) -> None:
        self.status = status
        self.body = {"id": CHANGE_ID, "state": "pending"} if body is None else body
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.status, json=self.body)

    @property
    def only(self) -> httpx.Request:
        [request] = self.requests
        return request


def client_for(recorder: Recorder) -> SecretsClient:
    return SecretsClient(
        "http://secrets.test", token="t0ken", transport=httpx.MockTransport(recorder)
    )


def test_propose_posts_the_data_the_base_version_and_the_reason_to_the_paths_propose_route() -> (
    None
):
    recorder = Recorder(201)
    with client_for(recorder) as client:
        answer = client.propose("prod/db", {"password": CANARY}, version=3, reason="INC-7")
    assert answer == {"id": CHANGE_ID, "state": "pending"}
    request = recorder.only
    assert (request.method, request.url.raw_path) == ("POST", b"/secrets/prod/db:propose")
    assert json.loads(request.content) == {
        "data": {"password": CANARY},
        "version": 3,
        "reason": "INC-7",
    }
    assert request.headers["Authorization"] == "Bearer t0ken"


def test_changes_sends_only_the_filters_given() -> None:
    recorder = Recorder(body={"changes": [], "truncated": False})
    with client_for(recorder) as client:
        assert client.changes() == {"changes": [], "truncated": False}
        client.changes(state="pending")
        client.changes(state="applied", path="prod/db")
    assert [r.url.raw_path for r in recorder.requests] == [
        b"/changes",
        b"/changes?state=pending",
        b"/changes?state=applied&path=prod%2Fdb",
    ]
    assert {r.method for r in recorder.requests} == {"GET"}


def test_change_gets_one_request_by_its_id() -> None:
    recorder = Recorder()
    with client_for(recorder) as client:
        assert client.change(CHANGE_ID)["id"] == CHANGE_ID
    assert (recorder.only.method, recorder.only.url.raw_path) == (
        "GET",
        f"/changes/{CHANGE_ID}".encode(),
    )


@pytest.mark.parametrize("action", ["approve", "reject", "cancel", "apply"])
def test_each_action_posts_without_a_body_to_the_change_ids_action_route(action: str) -> None:
    recorder = Recorder(body={"id": CHANGE_ID, "state": "approved"})
    with client_for(recorder) as client:
        method: Callable[[str], dict[str, Any]] = getattr(client, action)
        assert method(CHANGE_ID)["state"] == "approved"
    request = recorder.only
    assert (request.method, request.url.raw_path) == (
        "POST",
        f"/changes/{CHANGE_ID}:{action}".encode(),
    )
    assert request.content == b""


@pytest.mark.parametrize(
    "bad_id",
    [
        "",
        CHANGE_ID[:-1],
        CHANGE_ID + "0",
        CHANGE_ID.upper(),
        CHANGE_ID + "\n",
        "0b5e9c2f-4d6a-4e1f-8a3b-7c9d2e4f6a8b",  # a uuid, but not as the service writes it
        "../secrets/prod/db:destroy",
        CHANGE_ID[:30] + "/x",
        CHANGE_ID[:31] + "?",
    ],
)
@pytest.mark.parametrize("action", ["change", "approve", "reject", "cancel", "apply"])
def test_a_change_id_other_than_32_lowercase_hex_digits_is_refused_before_any_request(
    action: str, bad_id: str
) -> None:
    recorder = Recorder()
    with client_for(recorder) as client, pytest.raises(ClientError) as raised:
        getattr(client, action)(bad_id)
    assert (raised.value.error, raised.value.status) == ("invalid_request", 0)
    assert recorder.requests == []


def test_a_refusal_raises_client_error_with_the_apis_code_and_body() -> None:
    refusal = {"error": "self_approval", "detail": "the requester cannot approve"}
    with client_for(Recorder(403, refusal)) as client, pytest.raises(ClientError) as raised:
        client.approve(CHANGE_ID)
    assert (raised.value.error, raised.value.status) == ("self_approval", 403)
    assert raised.value.body == {**refusal, "status": 403}


def test_an_apply_on_a_moved_secret_raises_version_conflict_with_the_current_version() -> None:
    stale = {"error": "version_conflict", "detail": "stale", "current_version": 5}
    with client_for(Recorder(409, stale)) as client, pytest.raises(ClientError) as raised:
        client.apply(CHANGE_ID)
    assert raised.value.error == "version_conflict"
    assert raised.value.body["current_version"] == 5


def test_request_sends_extra_headers_beside_the_clients_own() -> None:
    recorder = Recorder()
    with client_for(recorder) as client:
        client.request("DELETE", "/secrets/prod/db", headers={"X-Bypass-Reason": "INC-8: outage"})
        client.request("DELETE", "/secrets/prod/db")
    with_reason, without = recorder.requests
    assert with_reason.headers["X-Bypass-Reason"] == "INC-8: outage"
    assert with_reason.headers["Authorization"] == "Bearer t0ken"
    assert "X-Bypass-Reason" not in without.headers


@pytest.mark.parametrize("value", ["café", "INC-8\r\nX-Injected: 1", "tab\there", "\x00"])
def test_a_header_value_other_than_printable_ascii_is_refused_before_any_request(
    value: str,
) -> None:
    recorder = Recorder()
    with client_for(recorder) as client, pytest.raises(ClientError) as raised:
        client.request("DELETE", "/secrets/prod/db", headers={"X-Bypass-Reason": value})
    assert (raised.value.error, raised.value.status) == ("invalid_request", 0)
    assert value not in str(raised.value)
    assert recorder.requests == []

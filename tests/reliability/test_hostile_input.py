"""Hostile paths and bodies through HTTP: each is a 4xx before any Vault call; the process lives.

The request line is sent byte for byte (no client normalises it), so traversal, percent and
double encoding, overlong UTF-8, look-alikes, NUL and CRLF reach the server as an attacker
would send them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from service.vault.backend import HvacBackend
from tests.fakes import SpyBackend
from tests.support import bearer, raw_request, running_service, service_settings, write_policy


class Target:
    def __init__(self, url: str, spy: SpyBackend, tokens: dict[str, str]) -> None:
        self.url = url
        self.spy = spy
        self.tokens = tokens


@pytest.fixture(scope="module")
async def target(
    openbao: Any, nats: Any, oidc: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Target]:
    policy = write_policy(tmp_path_factory.mktemp("hostile-input"))
    settings = service_settings(openbao, nats, oidc, policy)
    spy = SpyBackend(HvacBackend(openbao.addr, token=openbao.root_token))
    tokens = {who: oidc.mint(who) for who in ("writer", "admin")}
    async with running_service(settings, backend=spy) as svc:
        yield Target(svc.url, spy, tokens)
    await spy.aclose()  # injected: not the app's to close


# -- paths -----------------------------------------------------------------------------------

BAD_TARGETS: dict[str, bytes] = {
    "dot_dot_at_the_top": b"/secrets/../etc/passwd",
    "dot_dot_inside": b"/secrets/app/../../etc/passwd",
    "dot_segment": b"/secrets/app/./db",
    "lone_dot_dot": b"/secrets/..",
    "trailing_dot_dot": b"/secrets/app/..",
    "percent_dot_dot": b"/secrets/app/%2e%2e/db",
    "percent_dot_dot_upper": b"/secrets/app/%2E%2E/%2E%2E/etc",
    "percent_dot": b"/secrets/%2e",
    "double_encoded_dot_dot": b"/secrets/app/%252e%252e/db",
    "double_encoded_slash": b"/secrets/app%252f..%252fdb",
    "encoded_slash_traversal": b"/secrets/app%2f..%2f..%2fetc",
    "half_encoded_traversal": b"/secrets/app/..%2fdb",
    "overlong_utf8_dots": b"/secrets/app/%c0%ae%c0%ae/db",
    "overlong_utf8_slash": b"/secrets/app%c0%afdb",
    "one_dot_leader_lookalike": b"/secrets/app/%e2%80%a4%e2%80%a4/db",
    "fullwidth_solidus": b"/secrets/app%ef%bc%8f..%ef%bc%8fdb",
    "division_slash": b"/secrets/app%e2%88%95db",
    "cyrillic_a": b"/secrets/%d0%b0pp/db",
    "fullwidth_letter_raw_utf8": b"/secrets/app/\xef\xbd\x84b",
    "percent_nul": b"/secrets/app/d%00b",
    "trailing_percent_nul": b"/secrets/app/db%00",
    "raw_nul": b"/secrets/app/d\x00b",
    "semicolon_dot_dot": b"/secrets/app/..;/db",
    "semicolon_segment": b"/secrets/app;/db",
    "path_parameter": b"/secrets/app/db;jsessionid=x",
    "backslash_traversal": b"/secrets/app\\..\\db",
    "encoded_backslash": b"/secrets/app/%5c..%5cdb",
    "double_slash_at_the_top": b"/secrets//app/db",
    "double_slash_inside": b"/secrets/app//db",
    "trailing_slash": b"/secrets/app/db/",
    "encoded_space": b"/secrets/%20app/db",
    "encoded_crlf_header_injection": b"/secrets/app/db%0d%0aX-Injected:%201",
    "encoded_tab": b"/secrets/app/db%09",
    "tilde": b"/secrets/app/~root",
    "shell_substitution": b"/secrets/app/$(id)",
    "glob_star": b"/secrets/app/db*",
    "nats_wildcard": b"/secrets/app/>",
    "two_verbs": b"/secrets/app/db:versions:list",
    "uppercase_verb": b"/secrets/app/db:VERSIONS",
    "encoded_colon_empty_verb": b"/secrets/app/db%3a",
    "seventeen_segments": b"/secrets/" + b"/".join([b"a"] * 17),
    "513_characters": b"/secrets/app/" + b"x" * 509,
    "10000_characters": b"/secrets/" + b"a" * 10_000,
    "10000_characters_of_segments": b"/secrets/" + b"a/" * 4_999 + b"aa",
}


def test_the_path_corpus_is_broad() -> None:
    assert len(BAD_TARGETS) >= 40


@pytest.mark.parametrize("name", list(BAD_TARGETS))
async def test_each_bad_path_is_400_and_never_reaches_vault(target: Target, name: str) -> None:
    raw = BAD_TARGETS[name]
    before = len(target.spy.paths)
    for method, who in (("GET", "admin"), ("PATCH", "admin"), ("DELETE", "admin")):
        body = b'{"data": {"k": "v"}, "version": 0}' if method == "PATCH" else b""
        status = await raw_request(target.url, method, raw, target.tokens[who], body)
        assert status == 400, (name, method, status)
    assert target.spy.paths[before:] == []


# -- bodies ------------------------------------------------------------------------------------


_BIG_DIGITS = b"9" * 5000

BAD_BODIES: dict[str, tuple[bytes, int]] = {
    # nesting
    "arrays_nested_30000_deep": (
        b'{"data": {"k": ' + b"[" * 30_000 + b"]" * 30_000 + b'}, "version": 0}',
        400,
    ),
    "objects_nested_6000_deep": (
        b'{"data": {"k": ' + b'{"a":' * 6_000 + b"1" + b"}" * 6_000 + b'}, "version": 0}',
        400,
    ),
    "nested_33_deep": (b'{"data": {"k": ' + b"[" * 33 + b"]" * 33 + b'}, "version": 0}', 422),
    "deep_unknown_field": (
        b'{"data": {"k": "v"}, "version": 0, "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        400,
    ),
    # numbers
    "integer_2_53_plus_1": (b'{"data": {"k": 9007199254740993}, "version": 0}', 400),
    "negative_integer_2_53_plus_1": (b'{"data": {"k": -9007199254740993}, "version": 0}', 400),
    "integer_10_30": (b'{"data": {"k": 1000000000000000000000000000000}, "version": 0}', 400),
    "nested_huge_integer": (
        b'{"data": {"k": [1, {"n": 1e30, "m": 10000000000000000000}]}, "version": 0}',
        400,
    ),
    "integer_of_5000_digits": (b'{"data": {"k": ' + _BIG_DIGITS + b'}, "version": 0}', 400),
    "float_1e400": (b'{"data": {"k": 1e400}, "version": 0}', 400),
    "float_minus_1e400": (b'{"data": {"k": -1e400}, "version": 0}', 400),
    "nan_literal": (b'{"data": {"k": NaN}, "version": 0}', 400),
    "infinity_literal": (b'{"data": {"k": Infinity}, "version": 0}', 400),
    "version_2_53_plus_1": (b'{"data": {"k": "v"}, "version": 9007199254740993}', 400),
    "version_as_float": (b'{"data": {"k": "v"}, "version": 0.0}', 400),
    "version_1e400": (b'{"data": {"k": "v"}, "version": 1e400}', 400),
    # duplicate keys: ambiguous, so refused
    "duplicate_data_key": (b'{"data": {"k": "a", "k": "b"}, "version": 0}', 400),
    "duplicate_version": (b'{"data": {"k": "v"}, "version": 7, "version": 0}', 400),
    "duplicate_data": (b'{"data": {"k": "v"}, "data": {"k": "w"}, "version": 0}', 400),
    "duplicate_nested_key": (b'{"data": {"k": {"x": 1, "x": 2}}, "version": 0}', 400),
    # wrong types and shapes
    "data_a_string": (b'{"data": "k=v", "version": 0}', 400),
    "data_an_array": (b'{"data": [["k", "v"]], "version": 0}', 400),
    "data_null": (b'{"data": null, "version": 0}', 400),
    "version_a_string": (b'{"data": {"k": "v"}, "version": "0"}', 400),
    "version_a_boolean": (b'{"data": {"k": "v"}, "version": false}', 400),
    "version_negative": (b'{"data": {"k": "v"}, "version": -1}', 400),
    "version_missing": (b'{"data": {"k": "v"}}', 400),
    "data_missing": (b'{"version": 0}', 400),
    "unknown_field": (b'{"data": {"k": "v"}, "version": 0, "admin": true}', 400),
    "body_null": (b"null", 400),
    "body_an_array": (b"[]", 400),
    "body_a_string": (b'"data"', 400),
    "body_a_number": (b"0", 400),
    "empty_body": (b"", 400),
    "whitespace_body": (b" \r\n\t ", 400),
    "trailing_garbage": (b'{"data": {"k": "v"}, "version": 0} xyz', 400),
    "two_documents": (b'{"data": {"k": "v"}, "version": 0}{"data": {}, "version": 0}', 400),
    "unterminated": (b'{"data": {"k": "v"', 400),
    "single_quotes": (b"{'data': {'k': 'v'}, 'version': 0}", 400),
    "comments": (b'{"data": {"k": "v"} /* x */, "version": 0}', 400),
    # encodings
    "invalid_utf8_in_a_string": (b'{"data": {"k": "\xff\xfe"}, "version": 0}', 400),
    "invalid_utf8_in_a_key": (b'{"data": {"\xc3\x28": "v"}, "version": 0}', 400),
    "lone_surrogate_escape": (b'{"data": {"k": "\\ud800"}, "version": 0}', 400),
    "utf8_bom": (b'\xef\xbb\xbf{"data": {"k": "v"}, "version": 0}', 400),
    "utf16_body": ('{"data": {"k": "v"}, "version": 0}'.encode("utf-16"), 400),
    # content the validator refuses
    "empty_data": (b'{"data": {}, "version": 0}', 422),
    "nul_in_a_key": (b'{"data": {"k\\u0000": "v"}, "version": 0}', 422),
    "key_of_200_characters": (b'{"data": {"' + b"k" * 200 + b'": "v"}, "version": 0}', 422),
    # size
    "65537_bytes": (b'{"data": {"k": "' + b"x" * 65_510 + b'"}, "version": 0}', 413),
}


def test_the_body_corpus_is_broad_and_within_the_limit_where_it_should_be() -> None:
    assert len(BAD_BODIES) >= 40
    for name, (body, status) in BAD_BODIES.items():
        assert (len(body) > 65_536) == (status == 413), name


@pytest.mark.parametrize("name", list(BAD_BODIES))
async def test_each_hostile_body_is_a_4xx_before_any_vault_call(target: Target, name: str) -> None:
    body, expected = BAD_BODIES[name]
    path = f"app/hostile-{uuid.uuid4().hex[:8]}/db"
    before = len(target.spy.paths)
    status = await raw_request(
        target.url, "PATCH", f"/secrets/{path}".encode(), target.tokens["writer"], body
    )
    assert status == expected, name
    assert target.spy.paths[before:] == []


@pytest.mark.parametrize(
    ("verb", "body"),
    [
        ("rollback", b'{"to_version": 1, "version": 2, "version": 1}'),
        ("rollback", b'{"to_version": 1, "version": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"),
        ("rollback", b'{"to_version": "\xff", "version": 1}'),
        ("undelete", b'{"versions": [1], "versions": [2]}'),
        ("undelete", b'{"versions": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"),
        ("destroy", b'{"versions": [9007199254740993]}'),
        ("destroy", b'{"versions": ["\xc3\x28"]}'),
    ],
)
async def test_hostile_bodies_of_custom_methods_are_400(
    target: Target, verb: str, body: bytes
) -> None:
    before = len(target.spy.paths)
    raw = f"/secrets/app/hostile-verbs:{verb}".encode()
    assert await raw_request(target.url, "POST", raw, target.tokens["admin"], body) == 400
    assert target.spy.paths[before:] == []


async def test_a_10_mb_body_is_413_whether_declared_or_streamed(target: Target) -> None:
    ten_mb = 10 * 1024 * 1024
    path = b"/secrets/app/hostile-10mb/db"
    declared = await _stream_body(target, path, ten_mb, chunked=False)
    streamed = await _stream_body(target, path, ten_mb, chunked=True)
    assert (declared, streamed) == (413, 413)


async def _stream_body(target: Target, path: bytes, size: int, *, chunked: bool) -> int:
    """Send a `size`-byte body in 64 KiB pieces until the server answers; return its status."""
    host, port = target.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
    writer.write(
        b"PATCH " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: Bearer " + target.tokens["writer"].encode() + b"\r\n"
        b"Content-Type: application/json\r\n" + framing + b"\r\n\r\n"
    )
    status_line = asyncio.get_running_loop().create_task(reader.readline())
    piece = b"x" * 65_536
    sent = 0
    try:
        while sent < size and not status_line.done():
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            try:
                await writer.drain()
            except ConnectionError:
                break  # the server answered and closed: read what it said
            sent += len(piece)
        line = await asyncio.wait_for(status_line, 10)
        return int(line.split()[1])
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_after_every_hostile_input_the_service_is_healthy_and_writes(
    target: Target,
) -> None:
    # Every path and body of the corpora is sent here too, so this holds in any test order.
    for raw in BAD_TARGETS.values():
        assert await raw_request(target.url, "GET", raw, target.tokens["admin"], b"") == 400
    for hostile, expected in BAD_BODIES.values():
        raw = f"/secrets/app/hostile-{uuid.uuid4().hex[:8]}/db".encode()
        status = await raw_request(target.url, "PATCH", raw, target.tokens["writer"], hostile)
        assert status == expected
    async with httpx.AsyncClient(base_url=target.url, timeout=10) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        path = f"app/hostile-after-{uuid.uuid4().hex[:8]}/db"
        body = {"data": {"k": "v", "n": 9007199254740991, "x": 1e308}, "version": 0}
        written = await client.patch(
            f"/secrets/{path}", json=body, headers=bearer(target.tokens["writer"])
        )
        assert written.status_code == 200, written.text
        read = await client.get(f"/secrets/{path}", headers=bearer(target.tokens["admin"]))
        assert read.json()["data"] == {"k": "v", "n": 9007199254740991, "x": 1e308}


async def test_the_largest_safe_integer_round_trips_through_vault_exactly(
    target: Target, openbao: Any
) -> None:
    # Why larger ones are refused: Vault keeps numbers as 64-bit floats.
    path = f"app/hostile-int-{uuid.uuid4().hex[:8]}"
    body = json.dumps({"data": {"max": 2**53 - 1, "min": -(2**53 - 1)}, "version": 0}).encode()
    status = await raw_request(
        target.url, "PATCH", f"/secrets/{path}".encode(), target.tokens["writer"], body
    )
    assert status == 200
    async with httpx.AsyncClient(base_url=openbao.addr) as vault:
        stored = await vault.get(
            f"/v1/secret/data/{path}", headers={"X-Vault-Token": openbao.root_token}
        )
    assert stored.json()["data"]["data"] == {"max": 2**53 - 1, "min": -(2**53 - 1)}

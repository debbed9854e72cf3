"""SCRAM-SHA-256 verifiers: PostgreSQL's stored format, keys that verify a real SCRAM exchange
(RFC 7677's), and SASLprep as RFC 4013's examples and PostgreSQL's fallback say."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest

from service.rotation.scram import SCRAM_ITERATIONS, saslprep, scram_verifier

VERIFIER = re.compile(
    r"SCRAM-SHA-256\$(?P<iterations>[0-9]+):(?P<salt>[A-Za-z0-9+/=]+)"
    r"\$(?P<stored_key>[A-Za-z0-9+/=]+):(?P<server_key>[A-Za-z0-9+/=]+)"
)

# RFC 7677, section 3: user "user", password "pencil".
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_NONCE = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_AUTH_MESSAGE = (
    "n=user,r=rOprNGfwEbeRWgbNEkqO,"
    f"r={RFC_NONCE},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
    f"c=biws,r={RFC_NONCE}"
).encode()
RFC_CLIENT_PROOF = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_SIGNATURE = base64.b64decode("6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")


def parts(verifier: str) -> dict[str, bytes | int]:
    match = VERIFIER.fullmatch(verifier)
    assert match is not None, verifier
    return {
        "iterations": int(match["iterations"]),
        "salt": base64.b64decode(match["salt"], validate=True),
        "stored_key": base64.b64decode(match["stored_key"], validate=True),
        "server_key": base64.b64decode(match["server_key"], validate=True),
    }


def test_a_verifier_has_postgresqls_format_with_4096_iterations_and_a_16_byte_salt() -> None:
    found = parts(scram_verifier("correct horse"))
    assert found["iterations"] == SCRAM_ITERATIONS == 4096
    assert isinstance(found["salt"], bytes) and len(found["salt"]) == 16
    assert isinstance(found["stored_key"], bytes) and len(found["stored_key"]) == 32
    assert isinstance(found["server_key"], bytes) and len(found["server_key"]) == 32


def test_each_verifier_of_one_password_has_its_own_salt() -> None:
    first, second = parts(scram_verifier("same")), parts(scram_verifier("same"))
    assert first["salt"] != second["salt"]
    assert first["stored_key"] != second["stored_key"]


def test_the_verifier_never_contains_the_password() -> None:
    assert "canary-7f3a" not in scram_verifier("canary-7f3a")


def test_the_verifier_accepts_the_client_proof_of_rfc_7677_and_signs_as_its_server() -> None:
    found = parts(scram_verifier("pencil", salt=RFC_SALT))
    stored_key, server_key = found["stored_key"], found["server_key"]
    assert isinstance(stored_key, bytes) and isinstance(server_key, bytes)
    # What a SCRAM server does with a stored verifier: recover ClientKey from the proof.
    client_signature = hmac.digest(stored_key, RFC_AUTH_MESSAGE, "sha256")
    client_key = bytes(a ^ b for a, b in zip(RFC_CLIENT_PROOF, client_signature, strict=True))
    assert hashlib.sha256(client_key).digest() == stored_key
    assert hmac.digest(server_key, RFC_AUTH_MESSAGE, "sha256") == RFC_SERVER_SIGNATURE


def test_a_wrong_password_gives_keys_that_refuse_rfc_7677s_proof() -> None:
    found = parts(scram_verifier("pencils", salt=RFC_SALT))
    stored_key = found["stored_key"]
    assert isinstance(stored_key, bytes)
    client_signature = hmac.digest(stored_key, RFC_AUTH_MESSAGE, "sha256")
    client_key = bytes(a ^ b for a, b in zip(RFC_CLIENT_PROOF, client_signature, strict=True))
    assert hashlib.sha256(client_key).digest() != stored_key


@pytest.mark.parametrize(
    ("given", "prepared"),
    [
        ("I\u00adX", "IX"),  # RFC 4013's examples: soft hyphen mapped to nothing
        ("user", "user"),
        ("USER", "USER"),
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),
        ("\x07", "\x07"),  # prohibited, but pure ASCII: PostgreSQL keeps ASCII as it is
        ("\u0627\u0031", "\u0627\u0031"),  # bidi rule broken: PostgreSQL keeps the original
        ("pass\u00a0word", "pass word"),  # non-ASCII space mapped to a space
        ("\u00ad", "\u00ad"),  # nothing left after mapping: the original
        ("a\x07\u00e9", "a\x07\u00e9"),  # a control character among non-ASCII: the original
    ],
)
def test_saslprep_prepares_as_rfc_4013_and_postgresql_do(given: str, prepared: str) -> None:
    assert saslprep(given) == prepared


def test_two_spellings_that_saslprep_unites_get_the_same_keys() -> None:
    assert parts(scram_verifier("\u2168", salt=RFC_SALT)) == parts(
        scram_verifier("IX", salt=RFC_SALT)
    )

"""SCRAM-SHA-256 verifiers as PostgreSQL stores them (`pg_fe_scram_build_secret`), with the
SASLprep its clients apply to a password first: the rotator sends PostgreSQL only these."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stringprep
import unicodedata

__all__ = ["SCRAM_ITERATIONS", "saslprep", "scram_verifier"]

SCRAM_ITERATIONS = 4096  # PostgreSQL's default scram_iterations
SCRAM_SALT_BYTES = 16


def saslprep(password: str) -> str:
    """`password` as SASLprep (RFC 4013) prepares it, the way PostgreSQL, libpq and asyncpg do:
    pure ASCII is kept; otherwise mapped and NFKC-normalised, unless that meets a prohibited,
    unassigned or badly mixed bidirectional character, in which case the original is kept."""
    if password.isascii():
        return password
    mapped = [
        " " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c)
    ]
    if not mapped:
        return password
    # PostgreSQL checks the mapped characters, before normalisation: so do we, to agree with it.
    if any(_prohibited(c) for c in mapped):
        return password
    if any(stringprep.in_table_d1(c) for c in mapped):
        if any(stringprep.in_table_d2(c) for c in mapped):
            return password
        if not (stringprep.in_table_d1(mapped[0]) and stringprep.in_table_d1(mapped[-1])):
            return password
    return unicodedata.normalize("NFKC", "".join(mapped))


def _prohibited(c: str) -> bool:
    return (
        stringprep.in_table_c12(c)
        or stringprep.in_table_c21_c22(c)
        or stringprep.in_table_c3(c)
        or stringprep.in_table_c4(c)
        or stringprep.in_table_c5(c)
        or stringprep.in_table_c6(c)
        or stringprep.in_table_c7(c)
        or stringprep.in_table_c8(c)
        or stringprep.in_table_c9(c)
        or stringprep.in_table_a1(c)
    )


def scram_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> str:
    """`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64) for `password`:
    what PostgreSQL stores, so that it never sees (nor logs) the password itself."""
    if salt is None:
        salt = secrets.token_bytes(SCRAM_SALT_BYTES)
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password).encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    return f"SCRAM-SHA-256${iterations}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")

"""The audit record: one per secret access or change, allowed or denied. Never a value or token.

Written as one JSON object per line to the audit sink and published on `<prefix>.audit.<op>`.
Every field added later gets a default, as for events.
"""

from __future__ import annotations

import msgspec

__all__ = ["AuditRecord", "audit_decoder", "audit_encoder"]


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True):
    time: str  # RFC 3339, UTC, when the answer was decided
    request_id: str
    op: str  # read, write, list, versions, delete, undelete, destroy, rollback; other
    method: str  # the HTTP method
    path: str | None  # None when the request named no valid path
    version: int | None  # the version read or written, when one was
    allowed: bool  # False for 401, 403 and a refusal for want of an audit sink
    outcome: str  # ok, unauthenticated, forbidden, not_found, conflict, invalid, ...
    status: int
    reason: str | None  # why it was denied: an authentication reason, no_grant, audit_unavailable
    sub: str | None  # the token's subject
    client_id: str | None  # the token's azp or client_id
    source: str | None  # the client's address
    instance_id: str


audit_encoder = msgspec.json.Encoder()
audit_decoder = msgspec.json.Decoder(AuditRecord)

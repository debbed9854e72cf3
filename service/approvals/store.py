"""Change requests in Vault: one KV v2 document per request at `.secrets-service/changes/<id>` in
the service's mount (a folder no role can be granted and no `/secrets` route reaches), written
only with CAS, so that every instance sees one history of each request and no transition is
made twice. The proposed data lives there and nowhere else.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from typing import Any

import msgspec

from schemas.approvals import ApprovalView, ChangeView
from schemas.errors import NotFound, VersionConflict
from schemas.paths import RESERVED_FOLDER
from service.vault.protocol import VaultBackend

__all__ = [
    "CHANGES_FOLDER",
    "ID_FORMAT",
    "Approval",
    "ChangeRequest",
    "ChangeStore",
    "Raced",
    "content_digest",
    "iso",
]

CHANGES_FOLDER = f"{RESERVED_FOLDER}/changes"
ID_FORMAT = re.compile(r"[0-9a-f]{32}")
"""A change id: uuid4 hex. Anything else is no id (404), and never reaches Vault."""


class Approval(msgspec.Struct, frozen=True):
    sub: str
    time: str
    digest: str  # the content it approved: an approval of other content does not count


class ChangeRequest(msgspec.Struct, kw_only=True):
    """A change request as stored. `data` is the proposal: shown to no one, logged nowhere."""

    id: str
    path: str
    base_version: int
    data: dict[str, Any]
    fields: list[str]
    reason: str
    requester: str
    required: int
    state: str = "pending"
    approvals: list[Approval] = msgspec.field(default_factory=list)
    created: float = 0.0  # epoch seconds
    expires_at: float = 0.0
    digest: str = ""
    applied_version: int | None = None
    decided_by: str | None = None

    def __repr__(self) -> str:
        return (
            f"ChangeRequest(id={self.id!r}, path={self.path!r}, state={self.state!r}, "
            f"base_version={self.base_version}, fields={self.fields!r})"
        )

    def counted(self) -> list[Approval]:
        """The approvals that count: of this content, never the requester's, one per approver."""
        seen: dict[str, Approval] = {}
        for approval in self.approvals:
            if approval.digest == self.digest and approval.sub != self.requester:
                seen.setdefault(approval.sub, approval)
        return list(seen.values())

    def view(self) -> ChangeView:
        return ChangeView(
            id=self.id,
            path=self.path,
            base_version=self.base_version,
            state=self.state,
            required=self.required,
            approvals=[ApprovalView(sub=a.sub, time=a.time) for a in self.counted()],
            requester=self.requester,
            reason=self.reason,
            fields=self.fields,
            created=iso(self.created),
            expires=iso(self.expires_at),
            applied_version=self.applied_version,
            decided_by=self.decided_by,
        )


def content_digest(path: str, base_version: int, data: dict[str, Any]) -> str:
    """What approvals bind to: the path, the base version and the data, canonically encoded."""
    canonical = msgspec.json.encode([path, base_version, data], order="sorted")
    return hashlib.sha256(canonical).hexdigest()


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


class Raced(Exception):
    """Another instance changed the request since it was read: read it again and retry."""


class ChangeStore:
    def __init__(self, backend: VaultBackend) -> None:
        self.backend = backend

    @staticmethod
    def doc_path(change_id: str) -> str:
        return f"{CHANGES_FOLDER}/{change_id}"

    async def load(self, change_id: str) -> tuple[ChangeRequest, int]:
        """The request and its document version; NotFound for an unknown or malformed id."""
        if ID_FORMAT.fullmatch(change_id) is None:
            raise NotFound("no such change request")
        doc = await self.backend.read(self.doc_path(change_id))
        try:
            return msgspec.convert(dict(doc.data), ChangeRequest), doc.version
        except msgspec.ValidationError:
            raise NotFound("no such change request") from None

    async def create(self, request: ChangeRequest) -> int:
        return await self.save(request, 0)

    async def save(self, request: ChangeRequest, cas: int) -> int:
        """Write `request` if its document is still at `cas`; Raced otherwise."""
        try:
            doc = await self.backend.write(
                self.doc_path(request.id), msgspec.to_builtins(request), cas
            )
        except VersionConflict:
            raise Raced(request.id) from None
        return doc.version

    async def ids(self) -> list[str]:
        try:
            keys = await self.backend.list_keys(CHANGES_FOLDER)
        except NotFound:
            return []
        return [key for key in keys if ID_FORMAT.fullmatch(key)]

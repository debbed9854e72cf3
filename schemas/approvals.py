"""Change requests (approvals): the answers of `/changes` and `:propose`, and the events published
on `<prefix>.approvals.<path>`. Neither ever carries the proposed data: field names only.

Every field added later gets a default, as for the change events.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

__all__ = [
    "APPROVAL_EVENT_TYPES",
    "CHANGE_STATES",
    "ApprovalEvent",
    "ApprovalView",
    "ChangeApplied",
    "ChangeApproved",
    "ChangeBypassed",
    "ChangeCancelled",
    "ChangeExpired",
    "ChangeList",
    "ChangeProposed",
    "ChangeRejected",
    "ChangeStale",
    "ChangeView",
    "ProposeRequest",
    "approval_event_decoder",
    "approval_event_encoder",
    "propose_request_decoder",
]

CHANGE_STATES = ("pending", "approved", "applied", "rejected", "cancelled", "expired", "stale")
"""`pending` (fewer approvals than required), `approved` (enough: the requester or an approver
may apply), `applied` (written with CAS on base_version), `rejected` (by an approver),
`cancelled` (by the requester), `expired` (past `expires` before it was applied), `stale` (the
secret moved past base_version: it can never be applied). The last five are final."""


class ProposeRequest(msgspec.Struct, forbid_unknown_fields=True):
    """POST /secrets/{path}:propose body: the data to write as the version after `version`."""

    data: dict[str, Any]
    version: Annotated[int, msgspec.Meta(ge=0, le=2**53)]
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]

    def __repr__(self) -> str:
        return f"ProposeRequest(version={self.version}, fields={sorted(self.data)!r})"

    def __rich_repr__(self) -> list[tuple[str, object]]:
        return [("version", self.version), ("fields", sorted(self.data))]


class ApprovalView(msgspec.Struct, frozen=True):
    """One approval that counts: who, when."""

    sub: str
    time: str


class ChangeView(msgspec.Struct, frozen=True):
    """A change request as `/changes` shows it: the changed field names, never their values."""

    id: str
    path: str
    base_version: int
    state: str
    required: int
    approvals: list[ApprovalView]
    requester: str
    reason: str
    fields: list[str]  # fields the proposal adds, changes or removes (names only)
    created: str  # RFC 3339 UTC
    expires: str
    applied_version: int | None = None
    decided_by: str | None = None  # who rejected or cancelled it


class ChangeList(msgspec.Struct, frozen=True):
    """GET /changes: the requests the caller may see (read, write or approve on the path)."""

    changes: list[ChangeView]
    truncated: bool = False


class _ApprovalEvent(msgspec.Struct, frozen=True, tag_field="type", kw_only=True):
    event_id: str
    id: str  # the change request's id (a bypass gets one of its own)
    path: str
    state: str
    actor: str
    base_version: int | None = None
    applied_version: int | None = None
    approvals: int = 0  # approvals that count so far
    required: int = 0
    instance_id: str = ""
    time: str = ""


class ChangeProposed(_ApprovalEvent, tag="change.proposed", frozen=True):
    """A request was made: approvers may now approve it."""


class ChangeApproved(_ApprovalEvent, tag="change.approved", frozen=True):
    """One approval was given; `approvals` counts those so far."""


class ChangeRejected(_ApprovalEvent, tag="change.rejected", frozen=True):
    pass


class ChangeCancelled(_ApprovalEvent, tag="change.cancelled", frozen=True):
    pass


class ChangeApplied(_ApprovalEvent, tag="change.applied", frozen=True):
    """Written as `applied_version`, with CAS on `base_version`."""


class ChangeExpired(_ApprovalEvent, tag="change.expired", frozen=True):
    pass


class ChangeStale(_ApprovalEvent, tag="change.stale", frozen=True):
    """The secret moved past `base_version`: the request can never be applied."""


class ChangeBypassed(_ApprovalEvent, tag="change.bypassed", frozen=True):
    """A holder of `secrets:bypass` changed a covered path without a request, giving a reason
    (in the audit record, not here). `op` is what was done: write, delete, rotate..."""

    op: str = "other"


ApprovalEvent = (
    ChangeProposed
    | ChangeApproved
    | ChangeRejected
    | ChangeCancelled
    | ChangeApplied
    | ChangeExpired
    | ChangeStale
    | ChangeBypassed
)
APPROVAL_EVENT_TYPES: tuple[str, ...] = (
    "change.proposed",
    "change.approved",
    "change.rejected",
    "change.cancelled",
    "change.applied",
    "change.expired",
    "change.stale",
    "change.bypassed",
)

approval_event_encoder = msgspec.json.Encoder()
approval_event_decoder = msgspec.json.Decoder(ApprovalEvent)
propose_request_decoder = msgspec.json.Decoder(ProposeRequest)

"""The service's exception tree: every failure a caller can see, with its HTTP status.

    SecretsError                      500 internal
    ├── ConfigError                   (startup only: exit code 2, never an HTTP answer)
    ├── InvalidPath                   400 invalid_path
    ├── InvalidRequest                400 invalid_request
    ├── Unauthenticated               401 unauthenticated   (.reason: closed set, for logs/metrics)
    ├── Forbidden                     403 forbidden         (SelfApproval: 403 self_approval)
    ├── NotFound                      404 not_found
    ├── VersionConflict               409 version_conflict  (.current_version)
    ├── RotationInProgress            409 rotation_in_progress
    ├── ChangeConflict                409 change_conflict   (the request's state forbids it)
    ├── TooLarge                      413 too_large
    ├── InvalidSecret                 422 invalid_secret    (.violations)
    ├── NoRotationRule                422 no_rotation_rule
    ├── NoApprovalRule                422 no_approval_rule
    ├── ApprovalRequired              428 approval_required
    ├── RotationFailed                502 rotation_failed   (.reason: a ROTATION_ERRORS code)
    └── BackendUnavailable            503 backend_unavailable
        ├── VaultUnavailable              Vault unreachable, timing out or failing
        ├── VaultAccessDenied             Vault refused the service's own token (misconfiguration)
        └── AuditUnavailable              no audit sink can record, and the op is fail-closed

Dependency errors (hvac, nats, joserfc) are translated into these once, at the module that talks
to the dependency. Messages name paths and versions, never secret values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

__all__ = [
    "ApprovalRequired",
    "AuditUnavailable",
    "BackendUnavailable",
    "ChangeConflict",
    "ConfigError",
    "Forbidden",
    "InvalidPath",
    "InvalidRequest",
    "InvalidSecret",
    "NoApprovalRule",
    "NoRotationRule",
    "NotFound",
    "RotationFailed",
    "RotationInProgress",
    "SecretsError",
    "SelfApproval",
    "TooLarge",
    "Unauthenticated",
    "VaultAccessDenied",
    "VaultUnavailable",
    "VersionConflict",
    "Violation",
]


class SecretsError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, detail: str = "internal error", *, path: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.path = path


class ConfigError(SecretsError):
    """A setting is missing or wrong; `setting` names it."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class InvalidPath(SecretsError):
    status = 400
    code = "invalid_path"


class InvalidRequest(SecretsError):
    status = 400
    code = "invalid_request"


class Unauthenticated(SecretsError):
    """`reason` is one of a closed set (service.auth.principal.REASONS), for logs and metrics."""

    status = 401
    code = "unauthenticated"

    def __init__(self, reason: str, detail: str = "a valid bearer token is required") -> None:
        super().__init__(detail)
        self.reason = reason

    @property
    def www_authenticate(self) -> str:
        if self.reason == "missing_token":
            return 'Bearer realm="secrets"'
        return f'Bearer realm="secrets", error="invalid_token", error_description="{self.reason}"'


class Forbidden(SecretsError):
    status = 403
    code = "forbidden"

    def __init__(self, detail: str = "no grant for this path", *, path: str | None = None) -> None:
        super().__init__(detail, path=path)


class SelfApproval(Forbidden):
    """The requester of a change never counts as one of its approvers, whatever roles it holds."""

    code = "self_approval"

    def __init__(
        self,
        detail: str = "the requester of a change cannot approve it",
        *,
        path: str | None = None,
    ) -> None:
        super().__init__(detail, path=path)


class NotFound(SecretsError):
    status = 404
    code = "not_found"


class VersionConflict(SecretsError):
    status = 409
    code = "version_conflict"

    def __init__(self, detail: str, *, path: str | None = None, current_version: int) -> None:
        super().__init__(detail, path=path)
        self.current_version = current_version


class TooLarge(SecretsError):
    status = 413
    code = "too_large"


class Violation:
    """One broken validation rule: the field's name and the rule, never the value."""

    __slots__ = ("field", "rule")

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule

    def __repr__(self) -> str:
        return f"Violation(field={self.field!r}, rule={self.rule!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Violation) and (self.field, self.rule) == (other.field, other.rule)

    def __hash__(self) -> int:
        return hash((self.field, self.rule))


class InvalidSecret(SecretsError):
    status = 422
    code = "invalid_secret"

    def __init__(self, violations: Sequence[Violation], *, path: str | None = None) -> None:
        super().__init__("the secret breaks the validation rules", path=path)
        self.violations = list(violations)


class RotationInProgress(SecretsError):
    status = 409
    code = "rotation_in_progress"

    def __init__(
        self, detail: str = "another rotation of this path is under way", *, path: str | None = None
    ) -> None:
        super().__init__(detail, path=path)


class NoRotationRule(SecretsError):
    status = 422
    code = "no_rotation_rule"

    def __init__(
        self,
        detail: str = "no [[rotation.rules]] entry covers this path",
        *,
        path: str | None = None,
    ) -> None:
        super().__init__(detail, path=path)


class RotationFailed(SecretsError):
    """The rotation's attempts all failed; the old credential stands. `reason` is a code."""

    status = 502
    code = "rotation_failed"

    def __init__(self, reason: str, detail: str, *, path: str | None = None) -> None:
        super().__init__(detail, path=path)
        self.reason = reason


class ChangeConflict(SecretsError):
    """The change request's state forbids the action (approving an applied one, ...)."""

    status = 409
    code = "change_conflict"


class NoApprovalRule(SecretsError):
    status = 422
    code = "no_approval_rule"

    def __init__(
        self,
        detail: str = "no [[approvals.rules]] entry covers this path: write it directly",
        *,
        path: str | None = None,
    ) -> None:
        super().__init__(detail, path=path)


class ApprovalRequired(SecretsError):
    """A change to a path under an approval rule, made neither through an approved request nor
    as a break-glass bypass (`secrets:bypass` and an `X-Bypass-Reason` header)."""

    status = 428
    code = "approval_required"

    def __init__(
        self,
        detail: str = "this path needs an approved change request (POST :propose)",
        *,
        path: str | None = None,
    ) -> None:
        super().__init__(detail, path=path)


class BackendUnavailable(SecretsError):
    status = 503
    code = "backend_unavailable"


class VaultUnavailable(BackendUnavailable):
    pass


class VaultAccessDenied(BackendUnavailable):
    pass


class AuditUnavailable(BackendUnavailable):
    """Refused rather than served unaudited (SECRETS_AUDIT_FAIL_CLOSED)."""

    def __init__(self, detail: str = "the audit log cannot record this request") -> None:
        super().__init__(detail)

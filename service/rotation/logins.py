"""`Logins`: the seam between the coordinator and an outside system that holds the credential
(PostgreSQL's `PostgresRotator`; `FakeLogins` in the tests)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

__all__ = ["Logins"]


class Logins(Protocol):
    """An outside system holding the credential (PostgreSQL): `PostgresRotator`, a fake in
    tests. Every method is idempotent: a run taken over after a crash calls it again."""

    def plan(
        self, data: Mapping[str, Any], new_password: str, *, alternating: bool
    ) -> dict[str, Any]:
        """The fields the rotation writes (the password; with alternating, the username)."""
        ...

    async def apply(
        self,
        base: Mapping[str, Any],
        pending: Mapping[str, Any],
        master: Mapping[str, Any] | None,
    ) -> None:
        """Make the pending login live, and prove it by logging in with it."""
        ...

    async def finish(
        self,
        base: Mapping[str, Any],
        pending: Mapping[str, Any],
        master: Mapping[str, Any] | None,
        grace: float,
    ) -> None:
        """After the write: retire the previous login after `grace` (alternating users)."""
        ...

    async def undo(
        self,
        latest: Mapping[str, Any] | None,
        base: Mapping[str, Any],
        pending: Mapping[str, Any],
        master: Mapping[str, Any] | None,
    ) -> None:
        """A write won: leave the role `pending` names holding what `latest` holds, or nothing."""
        ...

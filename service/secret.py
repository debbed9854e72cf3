"""The types that carry secret values: their repr and str never show the data.

`SecretData` is a read-only mapping over the decoded JSON object; the JSON bytes of the HTTP
response body are encoded once per version and kept beside it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import msgspec

__all__ = ["REDACTED", "Secret", "SecretData"]

REDACTED = "**redacted**"


class SecretData(Mapping[str, Any]):
    """A secret's key/value data. Behaves as a read-only dict; prints as '**redacted**'."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SecretData):
            return self._data == other._data
        if isinstance(other, Mapping):
            return self._data == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SecretData('{REDACTED}')"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("SecretData cannot be pickled")

    def reveal(self) -> dict[str, Any]:
        """A plain dict copy of the data: the one deliberate way out of the wrapper."""
        return dict(self._data)


class Secret(msgspec.Struct, frozen=True):
    """One version of a secret as read from the store."""

    path: str
    version: int
    data: SecretData
    created_time: str

    def __repr__(self) -> str:
        return (
            f"Secret(path={self.path!r}, version={self.version}, data='{REDACTED}', "
            f"created_time={self.created_time!r})"
        )

    __str__ = __repr__

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return [
            ("path", self.path),
            ("version", self.version),
            ("data", REDACTED),
            ("created_time", self.created_time),
        ]

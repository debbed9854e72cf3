"""service.auth.principal: `bearer_token`, the parsing of the Authorization header."""

from __future__ import annotations

import pytest

from schemas.errors import Unauthenticated
from service.auth.principal import MAX_TOKEN_LENGTH, bearer_token


@pytest.mark.parametrize(
    "header", ["Bearer abc.def.ghi", "bearer abc.def.ghi", "BEARER   abc.def.ghi  "]
)
def test_bearer_token_takes_the_token_whatever_the_scheme_case(header: str) -> None:
    assert bearer_token(header) == "abc.def.ghi"


@pytest.mark.parametrize("header", [None, "", "   ", "Basic dXNlcjpwYXNz", "Token abc"])
def test_bearer_token_without_a_bearer_credential_is_missing_token(header: str | None) -> None:
    with pytest.raises(Unauthenticated) as info:
        bearer_token(header)
    assert info.value.reason == "missing_token"
    assert info.value.www_authenticate == 'Bearer realm="secrets"'


@pytest.mark.parametrize(
    "header", ["Bearer", "Bearer    ", "Bearer a b", "Bearer " + "a" * (MAX_TOKEN_LENGTH + 1)]
)
def test_bearer_token_that_is_empty_split_or_oversized_is_malformed(header: str) -> None:
    with pytest.raises(Unauthenticated) as info:
        bearer_token(header)
    assert info.value.reason == "malformed"
    assert info.value.www_authenticate.startswith("Bearer")


def test_a_token_of_exactly_the_maximum_length_is_accepted_by_the_parser() -> None:
    token = "a" * MAX_TOKEN_LENGTH
    assert bearer_token(f"Bearer {token}") == token

"""tests/support.py itself: a missing server binary is a skip for pytest and a failure for `make
test`; the policy file the fixtures write is the dev policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import skip_unless_required, write_policy


def test_a_missing_server_is_a_skip_for_pytest_and_a_failure_for_make_test(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SECRETS_TEST_REQUIRE_SERVERS", raising=False)
    # Skipped and Failed are both BaseExceptions: catch either, then say which it was, so a
    # skip where a failure is due is a failure of this test (not a skip of it).
    with pytest.raises(BaseException) as skipped:
        skip_unless_required("nats-server is not available")
    assert skipped.type is pytest.skip.Exception
    monkeypatch.setenv("SECRETS_TEST_REQUIRE_SERVERS", "1")
    with pytest.raises(BaseException) as failed:
        skip_unless_required("nats-server is not available")
    assert failed.type is pytest.fail.Exception
    assert "make test needs it" in str(failed.value)


def test_policy_file_fixture_is_the_dev_policy(tmp_path: Path) -> None:
    assert "[roles.app-reader]" in write_policy(tmp_path).read_text()

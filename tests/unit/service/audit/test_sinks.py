"""`LineSink`: a file only its owner can read, stdout, none, and an unwritable file refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from schemas.errors import ConfigError
from service.audit import LineSink


def test_the_file_sink_appends_to_a_file_only_its_owner_can_read(tmp_path: Path) -> None:
    target = tmp_path / "audit.log"
    target.write_bytes(b"earlier\n")
    os.chmod(target, 0o600)
    sink = LineSink.open(f"file:{target}")
    assert sink is not None and sink.name == "file"
    sink.write(b"later\n")
    sink.close()
    assert target.read_bytes() == b"earlier\nlater\n"
    fresh = tmp_path / "new.log"
    new_sink = LineSink.open(f"file:{fresh}")
    assert new_sink is not None
    new_sink.close()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600


def test_stdout_and_none_sinks(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert LineSink.open("none") is None
    sink = LineSink.open("stdout")
    assert sink is not None and sink.name == "stdout"
    sink.write(b'{"a":1}\n')
    assert capsysbinary.readouterr().out == b'{"a":1}\n'


def test_an_unwritable_audit_file_is_a_config_error_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        LineSink.open(f"file:{tmp_path / 'missing-dir' / 'audit.log'}")
    assert error.value.setting == "SECRETS_AUDIT_SINK"

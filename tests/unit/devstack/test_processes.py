"""The launchers' checks before a server runs: a port already in use is refused at once, and a
missing binary names the package that provides it. Servers started for real: tests/integration."""

from __future__ import annotations

import pytest

from devstack import BinaryNotFound, DevStackError, NatsServer, OpenBaoServer, find_binary
from tests import support

# A fixture of tests/support.py, shared with tests/integration/test_devstack.py.
listening_port = support.listening_port


@pytest.mark.parametrize("server_type", [OpenBaoServer, NatsServer])
def test_starting_on_a_port_already_in_use_is_refused_at_once(
    listening_port: int, server_type: type[OpenBaoServer] | type[NatsServer]
) -> None:
    server = server_type(port=listening_port)
    with pytest.raises(DevStackError, match=f"port {listening_port} .* already in use"):
        server.start(timeout=15)
    assert server.process is None


def test_a_missing_binary_names_the_package_that_provides_it() -> None:
    with pytest.raises(BinaryNotFound, match="install no-such-package"):
        find_binary("no-such-binary-for-devstack", "no-such-package")

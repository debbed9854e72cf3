"""`python -m tests.integration.crashing_service serve`: the service, killed by SIGKILL right after
the rotation step named by CRASH_AFTER_STEP (claimed, generated, applied, written, finished), as a
crash at that point would leave it. For the crash tests only: the seam is
`Coordinator.after_step`, which does nothing in the service itself."""

from __future__ import annotations

import os
import signal

from service.cli import main
from service.rotation.coordinator import Coordinator

STEP = os.environ["CRASH_AFTER_STEP"]


def _die_after(self: Coordinator, path: str, step: str) -> None:
    if step == STEP:
        os.kill(os.getpid(), signal.SIGKILL)


Coordinator.after_step = _die_after  # type: ignore[method-assign]

if __name__ == "__main__":
    main()

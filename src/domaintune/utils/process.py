"""Process helpers shared by stages that clean up after killed runs."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True when a process with this id exists (even one we may not signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""Running alone under ``pytest -n``: a shared lock per test, taken alone when it must be.

``tests/conftest.py`` holds the lock file's shared lock (`fcntl.flock`) around every test
on every xdist worker, and the exclusive lock around a test marked ``exclusive``. A test
whose wall-clock bound matters only in part (a replay in a module fixture that also
trains) takes the lock alone for that part, with `running_alone`. Without xdist the lock
is never held, and both are no-ops.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from typing import IO

#: The running test's lock file, while the conftest holds its lock (one test at a time).
held: list[IO[str]] = []


@contextlib.contextmanager
def running_alone() -> Iterator[None]:
    """No other worker runs a test inside this block (this test's lock, made exclusive)."""
    if not held:
        yield
        return
    lock = held[-1]
    fcntl.flock(lock, fcntl.LOCK_EX)  # converts this worker's shared lock
    try:
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_SH)

"""A server program started for a test on 127.0.0.1, and stopped with the test.

`running` starts a command, waits until a probe says the server answers (or it exits, or
a deadline passes, each a clear error with what it printed), and on the way out stops it
with SIGTERM, then SIGKILL after 10 s. The Redis and NATS helpers are this plus their
command line and probe.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def running(
    command: list[str], ready: Callable[[], bool], *, what: str, startup_timeout_s: float
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` until the context exits; enter once ``ready()`` is true.

    Raises:
        RuntimeError: the program exited, or ``ready()`` stayed false for
            ``startup_timeout_s``.
    """
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not ready():
            if process.poll() is not None:
                output = process.stdout.read().decode(errors="replace") if process.stdout else ""
                raise RuntimeError(f"{what} exited with {process.returncode}: {output}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer within {startup_timeout_s}s")
            time.sleep(0.05)
        logger.info("%s pid %s: %s", what, process.pid, " ".join(command))
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()

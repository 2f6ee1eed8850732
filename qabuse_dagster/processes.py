"""Child processes that stop, with everything they fork, when the qabuse process stops.

Every server a ``qabuse`` command runs as a subprocess (``bentoml serve``, ``dagster dev``,
``mlflow ui``) starts through :class:`ChildProcesses`:

- each child leads a session, so a process group, of its own: stopping it signals that
  whole group, and a Ctrl-C at the terminal reaches qabuse alone, which then stops its
  children itself;
- while the block runs, SIGTERM, SIGINT and SIGHUP to the qabuse process are forwarded
  to every child's group; what is left after :data:`GRACE_S` seconds gets SIGKILL, the
  child's other descendants too (BentoML's workers run in sessions of their own); then
  the signal goes on to the handler that was there before (SIGINT raises
  ``KeyboardInterrupt``; SIGTERM and SIGHUP end the process as they would have). A
  signal this process was started ignoring (``nohup``, ``cmd &`` in a script) stays
  ignored;
- leaving the block, or the interpreter exiting, stops the children the same way;
- on Linux the kernel also sends each child SIGTERM when the qabuse process dies without
  a chance to clean up (SIGKILL, a crash): ``prctl(PR_SET_PDEATHSIG)``. Its own children
  are then the child's to stop.

Imports only the standard library, so every layer can use it.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import NoReturn, Self

logger = logging.getLogger(__name__)

GRACE_S = 8.0
"""Seconds the children get to exit after the forwarded signal, before SIGKILL."""

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_POLL_S = 0.1

_Handler = Callable[[int, FrameType | None], object] | int | None

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# The dispositions a child starts from; see _exec.
_RESET_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGPIPE", "SIGXFSZ")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now, for a child server to bind.

    The port is free when this returns, not reserved: another process can take it before
    the child binds.
    """
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def exit_with_parent(signum: int = signal.SIGTERM) -> None:
    """Have the kernel send this process ``signum`` when its parent dies (Linux; elsewhere a no-op).

    For a process this module does not start itself, such as a worker a server forks
    (uvicorn's with ``workers`` > 1), so that a SIGKILLed parent leaves no worker behind.
    "Parent" is the thread that forked this process: it must outlive the process.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)


def _exec(parent: int, command: Sequence[str]) -> NoReturn:
    """The launcher: runs in the child between fork and the real command, then execs it.

    A launcher rather than subprocess's preexec_fn, which is unsafe once the parent has
    threads (rich's spinner, dagster's). The signals start from their defaults: an ignored
    SIGINT survives exec, and dagster dev maps SIGTERM to its SIGINT handler, so a qabuse
    started by ``qabuse up &`` in a script would leave dagster deaf to both (SIGPIPE and
    SIGXFSZ as subprocess's restore_signals does, which this interpreter undid).
    """
    for name in _RESET_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    exit_with_parent()
    if os.getppid() != parent:  # it died before prctl took effect
        sys.exit(1)
    os.execvp(command[0], list(command))


def _launch(command: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", __name__, str(os.getpid()), *command]


@dataclass(frozen=True)
class _Process:
    """One line of the process table: enough to follow a tree and to tell a reused pid."""

    pid: int
    ppid: int
    pgid: int
    started: int  # clock ticks after boot
    zombie: bool


def _process_table() -> dict[int, _Process] | None:
    """Every process on this machine, from /proc; None where there is no /proc."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    table = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # After the command name, which is in parentheses and may hold either: state,
        # ppid, pgrp, ... with starttime the 20th field from there (proc(5)).
        fields = text[text.rindex(")") + 2 :].split()
        pid = int(entry.name)
        table[pid] = _Process(
            pid, int(fields[1]), int(fields[2]), int(fields[19]), fields[0] == "Z"
        )
    return table


def _descendants(table: Mapping[int, _Process], roots: Iterable[int]) -> set[_Process]:
    children: dict[int, list[_Process]] = {}
    for process in table.values():
        children.setdefault(process.ppid, []).append(process)
    found: set[_Process] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child.pid)
    return found


def _exited(process: subprocess.Popen[bytes]) -> bool:
    """Whether a child has exited, without reaping it.

    Never ``wait()`` here: the signal handler may run inside that child's own ``wait()``,
    whose lock it would then wait for forever.
    """
    if process.returncode is not None:
        return True
    if not hasattr(os, "waitid"):  # macOS
        return process.poll() is not None
    try:
        return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped meanwhile
        return True


class ChildProcesses:
    """Subprocesses that stop, process groups and descendants too, when this block ends.

    Use it as a context manager. The signal handlers are installed only from the main
    thread (Python allows no other); the rest works from any thread. On Linux, a child is
    sent SIGTERM when the thread that started it ends, so start them from the thread that
    outlives them.

    Example:
        >>> with ChildProcesses() as children:  # doctest: +SKIP
        ...     server = children.start(["bentoml", "serve", "svc:Svc"])
        ...     server.wait()  # SIGTERM to this process stops bentoml and its workers
    """

    def __init__(self, grace_s: float = GRACE_S) -> None:
        self.grace_s = grace_s
        self._children: dict[subprocess.Popen[bytes], str] = {}
        self._previous: dict[int, _Handler] = {}
        self._starting = False
        self._stopping = False
        self._hurry = False
        self._pending: tuple[int, FrameType | None] | None = None

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for signum in FORWARDED_SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._on_signal)
        atexit.register(self.stop)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            atexit.unregister(self.stop)
            for signum, handler in self._previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
            self._previous.clear()

    def start(
        self,
        command: Sequence[str],
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``command`` in a session of its own; output appends to ``log`` if given.

        Without ``log`` the child writes to this process's stdout and stderr.
        """
        # Popen's own error for a missing program, not a launcher that exits 1.
        if shutil.which(command[0], path=(os.environ if env is None else env).get("PATH")) is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), command[0])
        output = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            output = log.open("ab")
        # A signal that lands between fork and registration waits, so no child escapes.
        self._starting = True
        try:
            process = subprocess.Popen(
                _launch(command),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=None if output is None else subprocess.STDOUT,
                start_new_session=True,
            )
            self._children[process] = " ".join(command[:2])
        finally:
            self._starting = False
            if output is not None:
                output.close()  # the child holds its own copy
        self._deliver_pending()
        return process

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` to every child's group, wait up to ``grace_s``, then SIGKILL.

        All children share one grace period, so stopping three servers takes no longer
        than stopping the slowest.
        """
        if self._stopping or not self._children:
            return
        self._stopping = True
        try:
            # Before signalling: once a child exits, its orphans' parent is init.
            table = _process_table() or {}
            tree = {
                (p.pid, p.started) for p in _descendants(table, [c.pid for c in self._children])
            }
            for process in self._children:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signum)
            deadline = time.monotonic() + self.grace_s
            left = self._left(tree)
            while left and not self._hurry and time.monotonic() < deadline:
                time.sleep(_POLL_S)
                left = self._left(tree)
            if left:
                names = ", ".join(self._children.values())
                logger.warning(
                    "killing %d processes left after %.0f s (of %s)", len(left), self.grace_s, names
                )
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for process in self._children:
                # Anything still in the group is an orphan by now, or a straggler.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            killed = time.monotonic() + 1.0
            while not all(map(_exited, self._children)) and time.monotonic() < killed:
                time.sleep(0.01)
            for process in self._children:
                process.poll()  # reaps it unless this signal interrupted its wait()
            self._children.clear()
        finally:
            self._stopping = False
            self._hurry = False
        self._deliver_pending()

    def _left(self, tree: set[tuple[int, int]]) -> set[int]:
        """Pids still running: a child, a member of its group, or a descendant seen at stop."""
        table = _process_table()
        if table is None:  # the children are all there is to see; SIGKILL gets their groups
            return {process.pid for process in self._children if not _exited(process)}
        groups = {process.pid for process in self._children}
        return {
            pid
            for pid, process in table.items()
            if not process.zombie  # a zombie has exited; only its parent's wait is left
            and (process.pgid in groups or (pid, process.started) in tree)
        }

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._starting or self._stopping:
            # A second Ctrl-C while stopping means: do not wait for the grace period.
            self._hurry = self._stopping
            self._pending = (signum, frame)
            return
        self.stop(signum)
        self._chain(signum, frame)

    def _deliver_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._on_signal(*pending)

    def _chain(self, signum: int, frame: FrameType | None) -> None:
        """What the signal would have done without us, now that the children are gone."""
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous in (signal.SIG_DFL, None):
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


if __name__ == "__main__":
    _exec(int(sys.argv[1]), sys.argv[2:])

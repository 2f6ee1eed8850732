"""Long-running ``qabuse`` commands stop their whole process tree on SIGTERM and SIGINT.

Each test runs the real console script, waits until it serves, signals the ``qabuse``
process alone (never its group: a supervisor, systemd or ``kill PID`` does the same) and
asserts that within 10 s every process it started is gone and its port refuses
connections. Every process of a run carries a marker in its environment, so one started
after the snapshot (dagster dev forks its webserver and code server late) or one that
left the process tree counts too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qabuse_dagster import settings
from qabuse_dagster.processes import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)"),
]

STOP_WITHIN_S = 10.0
#: After every process of the tree is gone or a zombie: how long reaping the root may take.
REAP_WITHIN_S = 5.0
READY_WITHIN_S = 120.0
MARKER_ENV = "QABUSE_TEST_PROCESS_MARKER"
#: Runs the command (by exec, same pid) with SIGTERM and SIGINT at their defaults, as a
#: service manager starts it. The test runner may ignore them: a shell's background job
#: ignores SIGINT, Dagster executed in process then maps SIGTERM to SIGINT's disposition,
#: and an ignored signal stays ignored across exec, where `ChildProcesses` honours it.
_WITH_DEFAULT_SIGNALS = [
    sys.executable,
    "-c",
    "import os, signal, sys\n"
    "for s in (signal.SIGTERM, signal.SIGINT): signal.signal(s, signal.SIG_DFL)\n"
    "os.execv(sys.argv[1], sys.argv[1:])",
]


def _signals(pid: int) -> str:
    """Blocked, ignored and caught signal masks and the command of a process (diagnostics)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "gone"
    masks = [
        line.replace("\t", " ") for line in status if line[:6] in ("SigBlk", "SigIgn", "SigCgt")
    ]
    return f"{_command_line(pid)[:60]!r} {' '.join(masks)}"


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces or parentheses.
    state, ppid = text[text.rindex(")") + 2 :].split()[:2]
    return state, int(ppid)


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return (
        stat is not None and stat[0] != "Z"
    )  # a zombie has exited; only its parent's wait is left


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid in _pids():
        stat = _stat(pid)
        if stat is not None:
            children.setdefault(stat[1], []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _marked(marker: str) -> set[int]:
    """Live processes whose environment carries this run's marker."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = set()
    for pid in _pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and _alive(pid):
            found.add(pid)
    return found


def _refuses(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@dataclass
class Run:
    process: subprocess.Popen[bytes]
    marker: str
    log: Path

    def tree(self) -> set[int]:
        return {self.process.pid} | _descendants(self.process.pid) | _marked(self.marker)

    def wait_ready(self, url: str) -> None:
        ready = _wait(lambda: _answers(url) or self.process.poll() is not None, READY_WITHIN_S)
        assert ready and self.process.poll() is None, (
            f"not serving {url} (exit {self.process.poll()}):\n{self.log.read_text()[-3000:]}"
        )


@contextlib.contextmanager
def _qabuse(tmp_path: Path, *args: str) -> Iterator[Run]:
    marker = uuid.uuid4().hex
    env = dict(os.environ)
    env.update(
        {
            settings.HOME_ENV: str(tmp_path / "home"),
            "DAGSTER_HOME": str(tmp_path / "home" / "dagster"),
            "BENTOML_HOME": str(tmp_path / "home" / "bentoml"),
            "QABUSE_COLLECTOR_TOKENS": "t:secret",
            "BENTOML_DO_NOT_TRACK": "true",
            "DAGSTER_DISABLE_TELEMETRY": "true",
            MARKER_ENV: marker,
        }
    )
    env.pop(settings.MLFLOW_URI_ENV, None)
    log = tmp_path / "qabuse.log"
    qabuse = Path(sys.executable).parent / "qabuse"
    with log.open("wb") as out:
        # A session of its own only so that cleanup below can reach strays; the test
        # itself signals the qabuse process alone.
        process = subprocess.Popen(
            [*_WITH_DEFAULT_SIGNALS, str(qabuse), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    run = Run(process, marker, log)
    try:
        yield run
    finally:
        for pid in run.tree():  # whatever a failing run left behind
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        process.wait(10)


def _assert_stops(run: Run, signum: signal.Signals, ports: list[int]) -> None:
    tree = run.tree()
    started = time.monotonic()
    run.process.send_signal(signum)  # the qabuse process only, not its group
    stopped = _wait(
        lambda: (
            not any(_alive(pid) for pid in tree)
            and not _marked(run.marker)
            and all(_refuses(port) for port in ports)
        ),
        STOP_WITHIN_S,
    )
    left = {pid: _stat(pid) for pid in (tree | _marked(run.marker)) if _alive(pid)}
    assert stopped, (
        f"{signum.name}: after {time.monotonic() - started:.1f} s still alive: {left}; "
        f"ports open: {[p for p in ports if not _refuses(p)]}; "
        f"signals: { ({pid: _signals(pid) for pid in left}) }; "
        f"this process blocks {signal.pthread_sigmask(signal.SIG_BLOCK, [])}"
    )
    # A leader shows as a zombie while its other threads are still being torn down, and
    # cannot be reaped until they are: wait for the exit rather than poll once.
    try:
        run.process.wait(timeout=REAP_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{signum.name}: the qabuse process was never reaped: {_stat(run.process.pid)}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_serve_stops_its_tree(tmp_path: Path, signum: signal.Signals) -> None:
    port = free_port()
    with _qabuse(tmp_path, "serve", "--port", str(port)) as run:
        run.wait_ready(f"http://127.0.0.1:{port}/livez")
        assert _descendants(run.process.pid), "bentoml serve is not a child process"
        _assert_stops(run, signum, [port])


@pytest.mark.parametrize(
    ("workers", "signum"),
    [(1, signal.SIGTERM), (2, signal.SIGTERM), (2, signal.SIGINT)],
    ids=["1-SIGTERM", "2-SIGTERM", "2-SIGINT"],
)
def test_collector_stops_its_tree(tmp_path: Path, workers: int, signum: signal.Signals) -> None:
    port = free_port()
    with _qabuse(tmp_path, "collector", "--port", str(port), "--workers", str(workers)) as run:
        run.wait_ready(f"http://127.0.0.1:{port}/healthz")
        if workers > 1:
            assert _wait(lambda: len(_descendants(run.process.pid)) >= workers, 30.0)
        _assert_stops(run, signum, [port])


def test_up_stops_its_tree_on_sigterm(tmp_path: Path) -> None:
    ports = [free_port() for _ in range(5)]
    dagster, mlflow, serve, collector, gateway = ports
    args = ["--dagster-port", str(dagster), "--mlflow-port", str(mlflow)]
    args += ["--collector-port", str(collector), "--gateway-port", str(gateway)]
    with _qabuse(tmp_path, "up", *args, "--serve-port", str(serve)) as run:
        run.wait_ready(f"http://127.0.0.1:{serve}/livez")
        # dagster dev's own children (webserver, daemon, code server) are the ones to miss.
        dagster_children = ("dagster_webserver", "dagster._daemon")
        assert _wait(
            lambda: all(
                any(name in _command_line(pid) for pid in _descendants(run.process.pid))
                for name in dagster_children
            ),
            60.0,
        ), "dagster dev started no webserver and daemon"
        # The collector (QABUSE_COLLECTOR_TOKENS is set), the stream worker and the gateway.
        pipeline = ("qabuse collector", "qabuse -v stream", "qabuse gateway")
        assert all(
            any(name in _command_line(pid) for pid in _descendants(run.process.pid))
            for name in pipeline
        ), "up started no collector, stream worker or gateway"
        assert _wait(lambda: _answers(f"http://127.0.0.1:{collector}/healthz"), 60.0)
        assert _wait(lambda: _answers(f"http://127.0.0.1:{gateway}/healthz"), 60.0)
        _assert_stops(run, signal.SIGTERM, ports)


# The safety nets behind the commands, on a stand-in for the qabuse process.

# Ignores SIGTERM and leaves a grandchild in a session of its own, as BentoML's workers are.
_STUBBORN = """
import signal, subprocess, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen(["sleep", "60"], start_new_session=True)
time.sleep(60)
"""

_SUPERVISOR = """
import json, signal, sys
from qabuse_dagster.processes import ChildProcesses

with ChildProcesses(grace_s=1.0) as children:
    for command in json.loads(sys.argv[1]):
        children.start(command)
    print("started", flush=True)
    signal.pause()
"""


def _supervise(*commands: list[str]) -> Run:
    marker = uuid.uuid4().hex
    process = subprocess.Popen(
        [*_WITH_DEFAULT_SIGNALS, sys.executable, "-c", _SUPERVISOR, json.dumps(commands)],
        env={**os.environ, MARKER_ENV: marker},
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline() == b"started\n"
    return Run(process, marker, Path(os.devnull))


def _sleeping(run: Run) -> int:
    return sum(_command_line(pid).startswith("sleep ") for pid in run.tree())


def test_what_outlives_the_grace_period_is_killed_descendants_too() -> None:
    run = _supervise([sys.executable, "-c", _STUBBORN], ["sleep", "60"])
    try:
        assert _wait(lambda: _sleeping(run) == 2, 10.0), run.tree()
        tree = run.tree()
        run.process.send_signal(signal.SIGTERM)
        assert _wait(lambda: not any(_alive(pid) for pid in tree), 5.0), {
            pid: _signals(pid) for pid in tree if _alive(pid)
        }
        assert run.process.wait(1) == -signal.SIGTERM  # as if it had not handled it
    finally:
        for pid in run.tree():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_children_get_sigterm_when_their_parent_is_killed() -> None:
    run = _supervise(["sleep", "60"])
    try:
        assert _wait(lambda: _sleeping(run) == 1, 10.0), run.tree()  # past the launcher
        tree = run.tree()
        run.process.kill()  # no handler, no atexit: only the kernel's PR_SET_PDEATHSIG
        assert _wait(lambda: not any(_alive(pid) for pid in tree), 5.0)
    finally:
        for pid in run.tree():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

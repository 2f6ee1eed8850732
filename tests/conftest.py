"""Session-wide state for the integration tests.

Feast and MLflow state lives under one ``QABUSE_HOME`` per test session: ``feast apply``
takes seconds and Feast's repo modules are imported once per process, so the applied
repository is shared instead of re-applied in every test. Unit tests that only need a
folder use ``settings.Paths(tmp_path)`` and never touch this home.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.exclusive import held

from qabuse_dagster import settings

#: Where a whole-suite run leaves its wall time, for ``python -m benchmarks``'s goal table.
SUITE_TIMES = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "test_suite.json"

#: Fixtures whose state one xdist worker builds once: every test that uses them runs on it.
SESSION_HOME_FIXTURES = frozenset({"qabuse_home", "pipeline_run"})
#: Set by the controlling process of ``pytest -n``: where workers write each test's group.
GROUPS_ENV = "QABUSE_XDIST_GROUPS"


def test_group(item: pytest.Item) -> str:
    """Which xdist worker unit ``item`` belongs to: ``session-home`` or its module.

    The session home (a trained twin, minutes) is built by whichever worker runs the tests
    that read it, so they are one unit. Every other test goes with its module, as
    ``--dist loadscope`` would: module-scoped fixtures (a served champion, a drift
    episode) are built once too.
    """
    if SESSION_HOME_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return "session-home"
    return item.nodeid.split("::", 1)[0]


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and getattr(config.option, "numprocesses", None):
        import tempfile

        # Workers start after this and inherit the environment.
        os.environ[GROUPS_ENV] = tempfile.mkdtemp(prefix="qabuse-xdist-groups-")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A worker writes every test's group for the controller's scheduler.

    xdist's own ``--dist loadgroup`` renames node ids, which pytest 9 no longer allows, so
    the groups travel through a file instead: each worker collects the same tests.
    """
    folder = os.environ.get(GROUPS_ENV)
    if folder is None or not hasattr(config, "workerinput"):
        return
    groups = {item.nodeid: test_group(item) for item in items}
    draft = Path(folder) / f".{config.workerinput['workerid']}.json"
    draft.write_text(json.dumps(groups), encoding="utf-8")
    draft.rename(draft.with_name(draft.name[1:]))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Schedule whole groups (`test_group`) on workers, as ``--dist loadscope`` does modules."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        _groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            # Called once collection is complete, so every worker has written its file.
            if self._groups is None:
                files = sorted(Path(os.environ[GROUPS_ENV]).glob("*.json"))
                self._groups = json.loads(files[0].read_text(encoding="utf-8")) if files else {}
            return self._groups.get(nodeid) or nodeid.split("::", 1)[0]

    return GroupScheduling(config, log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Under ``pytest -n``, a test marked ``exclusive`` runs while no other worker runs one.

    Every test holds a shared lock while it runs (its fixtures' setup and teardown too);
    an exclusive one takes it alone, and a test may take it alone for a part of itself
    (`support.exclusive.running_alone`). A test that asserts a wall-clock bound under load
    (the gateway's 50 ms fail-open, a runaway throttled within 90 s of a 10x replay)
    measures this machine's cores, which the other worker's training would share.
    """
    folder = os.environ.get(GROUPS_ENV)
    if folder is None or not hasattr(item.config, "workerinput"):
        yield
        return
    mode = fcntl.LOCK_EX if item.get_closest_marker("exclusive") else fcntl.LOCK_SH
    with (Path(folder) / "exclusive.lock").open("a") as lock:
        fcntl.flock(lock, mode)
        held.append(lock)
        try:
            yield
        finally:
            held.pop()
            fcntl.flock(lock, fcntl.LOCK_UN)


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_STARTED] = time.monotonic()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Record the wall time of a whole-suite run (``make test``), one entry per worker count.

    Only the controlling process of a run of every test (no paths, ``-k`` or ``-m``)
    writes; the goal table of ``python -m benchmarks`` reads the file.
    """
    config = session.config
    if hasattr(config, "workerinput") or config.args != config.getini("testpaths"):
        return
    if config.option.keyword or config.option.markexpr:
        return
    workers = getattr(config.option, "numprocesses", None) or 0
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    outcomes = {
        outcome: len(reporter.stats.get(outcome, [])) if reporter else None
        for outcome in ("passed", "failed", "error", "skipped")
    }
    try:
        times = json.loads(SUITE_TIMES.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        times = {}
    times[f"workers_{workers}"] = {
        "wall_s": round(time.monotonic() - config.stash[_STARTED], 1),
        "workers": workers,
        "tests": session.testscollected,
        **outcomes,
        "exit_status": int(exitstatus),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    SUITE_TIMES.parent.mkdir(parents=True, exist_ok=True)
    SUITE_TIMES.write_text(json.dumps(times, indent=2) + "\n", encoding="utf-8")


_STARTED = pytest.StashKey[float]()


@dataclass(frozen=True)
class PipelineRun:
    """One simulated slice, ingested and taken through both Dagster jobs."""

    home: Path
    simulation: object
    ingest: object
    result: object


@pytest.fixture(scope="session")
def qabuse_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("qabuse-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(settings.HOME_ENV, str(home))
        patch.setenv("DAGSTER_HOME", str(home / "dagster"))
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        patch.setenv("BENTOML_HOME", str(home / "bentoml"))
        patch.setenv("FEAST_USAGE", "False")
        patch.delenv(settings.MLFLOW_URI_ENV, raising=False)
        yield home


@pytest.fixture(scope="session")
def pipeline_run(qabuse_home: Path) -> PipelineRun:
    """4 simulated days (a warm-up day, training, the incident) through the whole asset graph."""
    from qabuse_dagster.ingest.files import ingest_labels, ingest_telemetry
    from qabuse_dagster.ingest.partitions import hours_between
    from qabuse_dagster.pipeline import run_pipeline
    from qabuse_dagster.simulation import simulate
    from qabuse_dagster.telemetry.hashing import KeyedHasher

    sim = simulate(hours=96, seed=3, out=qabuse_home / "simulation", hasher=KeyedHasher.demo())
    report = ingest_telemetry([sim.telemetry_path], settings.paths())
    ingest_labels(sim.labels_path, settings.paths())
    result = run_pipeline(hours_between(sim.start, sim.end))
    assert os.environ["DAGSTER_HOME"] == str(qabuse_home / "dagster")
    return PipelineRun(home=qabuse_home, simulation=sim, ingest=report, result=result)

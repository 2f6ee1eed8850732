"""The workload twin: a seeded, simulated deployment that writes telemetry with ground truth.

:func:`simulate` draws benign tenants (research groups, variational loops, CI suites) and
the reference abuse incident (a runaway CI loop), runs them over a horizon and writes
``telemetry.jsonl`` (telemetry-record contract) and ``incidents.jsonl``
(incident-labels contract). The same seed gives byte-identical files.

With ``scenarios``, the deployment also holds the benign look-alikes (classrooms,
benchmarking campaigns) and, instead of the reference incident, the named scenarios of
the library (:data:`~qabuse_dagster.simulation.scenarios.SCENARIOS`), one after the
other in the second half of the horizon; the first half stays clean training history.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from qabuse_dagster.telemetry.hashing import KeyedHasher
    >>> out = Path(tempfile.mkdtemp())
    >>> result = simulate(hours=1, seed=7, out=out, hasher=KeyedHasher.demo())
    >>> result.n_jobs < result.n_records <= 2 * result.n_jobs
    True
    >>> sorted(set(result.api_keys.values()))
    ['ci_suite', 'research_group', 'runaway_ci', 'variational_loop']
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from qabuse_dagster.response.decisions import Decision
from qabuse_dagster.simulation.closed_loop import Controller, Plan, run_closed_loop
from qabuse_dagster.simulation.jobs import Horizon, JobBatch, epoch_ms
from qabuse_dagster.simulation.queue import Backend, schedule
from qabuse_dagster.simulation.records import write_telemetry
from qabuse_dagster.simulation.scenarios import (
    SCENARIOS,
    ScenarioContext,
    place_incidents,
    resolve_scenarios,
    runaway_ci,
)
from qabuse_dagster.simulation.shifts import SHIFTS
from qabuse_dagster.simulation.tenants import Tenant, benign_roster, lookalike_roster
from qabuse_dagster.telemetry.contract import format_rfc3339_utc
from qabuse_dagster.telemetry.hashing import KeyedHasher
from qabuse_dagster.telemetry.labels import IncidentLabel, write_labels

__all__ = [
    "DEFAULT_START",
    "INCIDENTS_FILE",
    "MANIFEST_FILE",
    "TELEMETRY_FILE",
    "SimulationResult",
    "TwinManifest",
    "build_plan",
    "progress_bar",
    "replay_at",
    "shared_queue",
    "simulate",
]

logger = logging.getLogger(__name__)

#: Fixed start (a Monday, 00:00 UTC), so a seed alone decides the output.
DEFAULT_START = datetime(2026, 11, 2, tzinfo=UTC)
TELEMETRY_FILE = "telemetry.jsonl"
INCIDENTS_FILE = "incidents.jsonl"
#: What the twin was asked for, beside its output, so it can be rerun (closed loop).
MANIFEST_FILE = "twin.json"


@dataclass(frozen=True)
class TwinManifest:
    """The arguments that, with the hash key, decide a twin's output.

    Attributes:
        seed: The simulation seed.
        start: Start of the horizon (UTC).
        end: End of the horizon (UTC).
        scenarios: Resolved scenario names, or None for the reference deployment.
        demo_key: Whether identifiers were hashed with the public demo key (the only
            key a manifest may name; any other stays in the environment).
    """

    seed: int
    start: datetime
    end: datetime
    scenarios: list[str] | None
    demo_key: bool = False

    @property
    def horizon(self) -> Horizon:
        return Horizon(start=self.start, end=self.end)

    def write(self, path: Path) -> None:
        data = {
            "seed": self.seed,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "scenarios": self.scenarios,
            "demo_key": self.demo_key,
        }
        path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> TwinManifest:
        """Read a manifest; a missing or malformed one raises ValueError naming ``path``."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            scenarios = data["scenarios"]
            manifest = cls(
                seed=int(data["seed"]),
                start=datetime.fromisoformat(data["start"]),
                end=datetime.fromisoformat(data["end"]),
                scenarios=None if scenarios is None else [str(n) for n in scenarios],
                demo_key=bool(data.get("demo_key", False)),
            )
            manifest.horizon  # noqa: B018 (validates the bounds)
        except FileNotFoundError:
            raise ValueError(
                f"{path}: no twin manifest; the closed loop reruns the twin, so it needs "
                "telemetry written by `qabuse simulate`"
            ) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a twin manifest ({exc})") from None
        if manifest.scenarios is not None:
            resolve_scenarios(manifest.scenarios)
        return manifest


@dataclass(frozen=True)
class SimulationResult:
    """What :func:`simulate` wrote, and the ground truth needed to read it.

    Attributes:
        telemetry_path: ``telemetry.jsonl``, one contract record per line, by timestamp.
        labels_path: ``incidents.jsonl``, one incident label per line.
        n_records: Lines in the telemetry file.
        n_jobs: Jobs simulated (two records each; one if the API refused it or it was
            still running at the end).
        api_keys: Hashed api_key_id to tenant kind, e.g. ``research_group``,
            ``variational_loop``, ``ci_suite``, ``runaway_ci``. A leaked key keeps the
            kind of the benign tenant it belongs to.
        incident_api_key_ids: Keys named by any incident label, in label order.
        start: Start of the horizon (UTC).
        end: End of the horizon (UTC), exclusive: every record lies before it.
        incidents: The incident labels written to ``labels_path``.
        decisions: Mitigations the controller took, in time order (closed loop only).
    """

    telemetry_path: Path
    labels_path: Path
    n_records: int
    n_jobs: int
    api_keys: dict[str, str]
    incident_api_key_ids: list[str]
    start: datetime
    end: datetime
    incidents: list[IncidentLabel] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)


@contextlib.contextmanager
def progress_bar(
    enabled: bool,
) -> Iterator[Callable[[str, int], Callable[[int], None]] | None]:
    """Yield ``new_task(description, total) -> advance`` when enabled, else None."""
    if not enabled:
        yield None
        return
    from rich.progress import Progress  # the bar is optional; skip the import without it

    with Progress() as bar:

        def new_task(description: str, total: int) -> Callable[[int], None]:
            task = bar.add_task(description, total=total)
            return lambda n: bar.advance(task, n)

        yield new_task


def simulate(
    *,
    hours: float | None = None,
    seed: int,
    out: Path,
    hasher: KeyedHasher,
    start: datetime = DEFAULT_START,
    progress: bool = False,
    scenarios: Sequence[str] | None = None,
    days: float | None = None,
    controller: Controller | None = None,
    control_from: datetime | None = None,
) -> SimulationResult:
    """Simulate a shared quantum cloud for ``hours`` and write telemetry and labels.

    Args:
        hours: Length of the horizon; give this or ``days``.
        seed: Decides everything random; the same seed gives byte-identical files.
        out: Directory for ``telemetry.jsonl`` and ``incidents.jsonl`` (created).
        hasher: Keyed hasher for every identifier the records carry.
        start: Start of the horizon; must be timezone-aware.
        progress: Show a progress bar (rich) while simulating.
        scenarios: None for the reference deployment: benign tenants and one runaway CI
            from 70% of the horizon to its end. Otherwise names from the scenario
            library (``["all"]`` for every one): the benign look-alikes join the
            roster, and each named scenario runs once, in order, in its own window of
            the horizon's second half.
        days: Length of the horizon in days; give this or ``hours``.
        controller: Closes the loop: it watches each key's telemetry and decides
            mitigations (throttle, challenge, revoke, release) while the twin runs, and
            the actors react (see `run_closed_loop`). None: nobody intervenes.
        control_from: When the controller starts watching; the start when None.

    Returns:
        Paths, counts and ground truth of what was written, and the decisions taken.

    Raises:
        ValueError: If the length is missing, doubly given or not positive, ``start`` is
            naive, or a scenario name is unknown (the message lists the known ones).
    """
    if days is not None:
        if hours is not None:
            raise ValueError("give hours or days, not both")
        hours = 24.0 * days
    elif hours is None:
        raise ValueError("give the length of the horizon: hours or days")
    if not hours > 0:
        raise ValueError(f"hours must be positive, got {hours}")
    if start.tzinfo is None:
        raise ValueError("start must be timezone-aware (UTC)")
    names = None if scenarios is None else resolve_scenarios(scenarios)
    start = start.astimezone(UTC)
    horizon = Horizon(start=start, end=start + timedelta(hours=hours))
    manifest = TwinManifest(
        seed=seed,
        start=horizon.start,
        end=horizon.end,
        scenarios=names,
        demo_key=hasher.is_demo,
    )

    out.mkdir(parents=True, exist_ok=True)
    telemetry_path = out / TELEMETRY_FILE
    labels_path = out / INCIDENTS_FILE
    with progress_bar(progress) as new_task:
        plan = build_plan(horizon, seed=seed, hasher=hasher, scenarios=names, new_task=new_task)
        jobs = shared_queue(plan.jobs)
        decisions: list[Decision] = []
        if controller is not None:
            loop = run_closed_loop(
                dataclasses.replace(plan, jobs=jobs),
                controller,
                hasher=hasher,
                start_ms=horizon.start_ms if control_from is None else epoch_ms(control_from),
                progress=new_task,
            )
            jobs, decisions = shared_queue(loop.jobs), loop.decisions
        # Every record lies in [start, end): a job still running at the end has no
        # terminal record yet.
        in_horizon = (jobs.submit_ms >= horizon.start_ms) & (jobs.submit_ms < horizon.end_ms)
        jobs = jobs.take(in_horizon)
        n_jobs = len(jobs)
        finished = ~jobs.rejected & (jobs.end_ms < horizon.end_ms)
        expected_records = n_jobs + int(finished.sum())
        on_progress = new_task("writing telemetry", expected_records) if new_task else None
        n_records = write_telemetry(
            jobs,
            telemetry_path,
            job_id_prefix=f"job-{seed}-",
            on_progress=on_progress,
            until_ms=horizon.end_ms,
        )
    labels = plan.labels
    api_keys = dict(plan.api_keys)
    api_keys.update({key: "rotated" for key in set(jobs.api_key_id.tolist()) - set(api_keys)})
    write_labels(labels, labels_path)
    manifest.write(out / MANIFEST_FILE)

    logger.info(
        "simulated %d jobs (%d records) from %d api keys over %s h, seed %d, into %s",
        n_jobs,
        n_records,
        len(api_keys),
        hours,
        seed,
        out,
    )
    incident_keys = dict.fromkeys(key for label in labels for key in label.api_key_ids or ())
    return SimulationResult(
        telemetry_path=telemetry_path,
        labels_path=labels_path,
        n_records=n_records,
        n_jobs=n_jobs,
        api_keys=api_keys,
        incident_api_key_ids=list(incident_keys),
        start=horizon.start,
        end=horizon.end,
        incidents=labels,
        decisions=decisions,
    )


def replay_at(result: SimulationResult, end: datetime, out: Path) -> SimulationResult:
    """The twin moved in time, whole minutes, so that it ends at ``end``; written to ``out``.

    The twin's tenants keep UTC working hours and weekends, so a twin simulated to end
    now would differ with the time of day and the weekday it runs at, and so would what
    the detectors make of it. Simulated at a fixed start and replayed to end now, it is
    the same twin every time, only later: every record and label moves by the same whole
    minutes, so the window rows and the detectors' verdicts are the same, and the newest
    records are minutes old.

    Args:
        result: A simulated twin (its files are read, not changed).
        end: Where the replayed twin ends; floored to the minute.
        out: Directory for the moved ``telemetry.jsonl`` and ``incidents.jsonl``.

    Returns:
        The moved twin. Its manifest is not written: a closed-loop rerun rebuilds a twin
        from its simulated start, so it reruns the original, not the replay.
    """
    end = end.astimezone(UTC).replace(second=0, microsecond=0)
    shift = end - result.end
    out.mkdir(parents=True, exist_ok=True)
    telemetry_path, labels_path = out / TELEMETRY_FILE, out / INCIDENTS_FILE
    with (
        result.telemetry_path.open(encoding="utf-8") as source,
        telemetry_path.open("w", encoding="utf-8") as moved,
    ):
        for line in source:
            record = json.loads(line)
            at = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
            record["timestamp"] = format_rfc3339_utc(at + shift)
            moved.write(json.dumps(record, separators=(",", ":")) + "\n")
    labels = [
        label.model_copy(update={"start": label.start + shift, "end": label.end + shift})
        for label in result.incidents
    ]
    write_labels(labels, labels_path)
    return dataclasses.replace(
        result,
        telemetry_path=telemetry_path,
        labels_path=labels_path,
        start=result.start + shift,
        end=end,
        incidents=labels,
    )


def build_plan(
    horizon: Horizon,
    *,
    seed: int,
    hasher: KeyedHasher,
    scenarios: Sequence[str] | None,
    new_task: Callable[[str, int], Callable[[int], None]] | None = None,
) -> Plan:
    """Draw the deployment and every actor's intended jobs over ``horizon``.

    The plan is what the actors would do if nobody intervened: jobs with the tenant
    model's own queue times (see `shared_queue`), who submits each, and the labels.

    Args:
        horizon: The simulated period.
        seed: Decides everything random.
        hasher: Keyed hasher for every identifier.
        scenarios: Resolved scenario names, or None for the reference deployment.
        new_task: Progress callback factory (``new_task(description, total)``).
    """
    # The roster does not depend on the horizon, so longer runs of one seed extend the
    # same deployment; each tenant then draws from its own independent stream.
    rng = np.random.default_rng(seed)
    tenants: list[Tenant] = benign_roster(hasher, rng, seed=seed)
    if scenarios is None:
        incident = runaway_ci(hasher, rng, horizon, seed=seed)
        tenants.append(incident)
    else:
        # Its own stream, so the benign roster above is the reference deployment's.
        tenants.extend(lookalike_roster(hasher, np.random.default_rng([seed, 1]), seed=seed))
    tenant_rngs = rng.spawn(len(tenants))
    api_keys = {t.identity.api_key_id: t.kind for t in tenants}
    n_actors = len(tenants) + sum(name not in SHIFTS for name in scenarios or ())
    advance = new_task("simulating tenants", n_actors) if new_task else None
    batches: list[JobBatch] = []
    actor_kinds: list[str] = []
    shifts = [SHIFTS[name]() for name in scenarios or () if name in SHIFTS]
    for index, (tenant, tenant_rng) in enumerate(zip(tenants, tenant_rngs, strict=True)):
        jobs = tenant.generate(horizon, tenant_rng)
        for shift in shifts:  # benign tenants and look-alikes; abusers come after
            # Its own stream per (shift, tenant): the roster's draws stay as they were.
            shift_rng = np.random.default_rng([seed, zlib.crc32(shift.kind.encode()), index])
            jobs = shift.apply(jobs, horizon, hasher, shift_rng)
        batches.append(jobs)
        actor_kinds.append(tenant.kind)
        if advance:
            advance(1)
    if scenarios is None:
        labels = [incident.label(horizon)]
    else:
        context = ScenarioContext(hasher=hasher, seed=seed, horizon=horizon, tenants=tuple(tenants))
        abuse = [name for name in scenarios if name not in SHIFTS]
        scenario_batches, labels, kinds = _run_scenarios(abuse, context, api_keys, advance)
        batches.extend(scenario_batches)
        actor_kinds.extend(kinds)
    actor = np.repeat(np.arange(len(batches)), [len(b) for b in batches])
    return Plan(
        jobs=_with_qpu_overhead(JobBatch.concat(batches)),
        actor=actor,
        actor_kinds=tuple(actor_kinds),
        api_keys=api_keys,
        labels=labels,
        seed=seed,
    )


#: Cloud simulators run many jobs at once; a QPU runs one job at a time.
# aer_simulator: the pool a cap reroutes oversized jobs to (the ladder's default target).
SIMULATOR_SLOTS: dict[str, int] = {"sv1": 16, "aer_simulator": 16}
#: Seconds a QPU spends on every job besides its shots: loading the circuits, checking
#: the calibration, reading out. It is what makes a flood of tiny jobs hurt a QPU.
QPU_JOB_OVERHEAD_S = 1.0


def shared_queue(jobs: JobBatch) -> JobBatch:
    """Queue times from the load: every backend's jobs share its slots, fair-share.

    A job's service time is its run time; its wait is what the other tenants' jobs on
    the same backend leave it, so a flood on one backend shows as longer queues for
    everyone on it. A QPU has one slot, a cloud simulator `SIMULATOR_SLOTS`. Refused
    jobs never reach a queue.

    Args:
        jobs: Jobs with their run times as served (see `_with_qpu_overhead`).

    Returns:
        The jobs with ``queue_ms`` from the schedule.
    """
    queued = ~jobs.rejected
    names, backend_idx = np.unique(jobs.backend[queued], return_inverse=True)
    _, tenant_idx = np.unique(jobs.api_key_id[queued], return_inverse=True)
    backends = [Backend(str(name), SIMULATOR_SLOTS.get(str(name), 1), 1.0) for name in names]
    result = schedule(
        (jobs.submit_ms[queued] + jobs.submit_latency_ms[queued]) / 1000.0,
        jobs.runtime_ms[queued] / 1000.0,
        backend_idx,
        tenant_idx,
        backends,
        policy="fair_share",
    )
    queue_ms = np.zeros(len(jobs), dtype=np.int64)
    queue_ms[queued] = np.round(result.queue_s * 1000.0).astype(np.int64)
    return dataclasses.replace(jobs, queue_ms=queue_ms)


def _with_qpu_overhead(jobs: JobBatch) -> JobBatch:
    """Add `QPU_JOB_OVERHEAD_S` to the run time of every job that runs on a QPU."""
    on_qpu = ~jobs.rejected & ~np.isin(jobs.backend, list(SIMULATOR_SLOTS))
    overhead_ms = round(1000 * QPU_JOB_OVERHEAD_S)
    return dataclasses.replace(jobs, runtime_ms=jobs.runtime_ms + overhead_ms * on_qpu)


def _run_scenarios(
    names: Sequence[str],
    context: ScenarioContext,
    api_keys: dict[str, str],
    advance: Callable[[int], None] | None,
) -> tuple[list[JobBatch], list[IncidentLabel], list[str]]:
    """Place, generate and label each named scenario; add its new keys to ``api_keys``.

    Returns:
        Each scenario's jobs, all their labels, and each scenario's kind.
    """
    scenarios = [SCENARIOS[name]() for name in names]
    windows = place_incidents(
        names, [scenario.length(context.horizon) for scenario in scenarios], context.horizon
    )
    batches: list[JobBatch] = []
    labels: list[IncidentLabel] = []
    for scenario, window in zip(scenarios, windows, strict=True):
        # Seeded by the seed and the incident's name, so adding, removing or reordering
        # other scenarios leaves this one's draws alone.
        rng = np.random.default_rng([context.seed, zlib.crc32(window.incident_id.encode())])
        generated = scenario.generate(window, context, rng)
        batches.append(generated.jobs)
        labels.extend(scenario.label(window, generated))
        for key, kind in generated.new_api_keys.items():
            api_keys.setdefault(key, kind)
        if advance:
            advance(1)
    return batches, labels, [scenario.kind for scenario in scenarios]

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
    >>> result.n_records == 2 * result.n_jobs
    True
    >>> sorted(set(result.api_keys.values()))
    ['ci_suite', 'research_group', 'runaway_ci', 'variational_loop']
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from qabuse_dagster.evaluation.labels import IncidentLabel, write_labels
from qabuse_dagster.simulation.jobs import Horizon, JobBatch
from qabuse_dagster.simulation.queue import Backend, schedule
from qabuse_dagster.simulation.records import write_telemetry
from qabuse_dagster.simulation.scenarios import (
    SCENARIOS,
    ScenarioContext,
    place_incidents,
    resolve_scenarios,
    runaway_ci,
)
from qabuse_dagster.simulation.tenants import Tenant, benign_roster, lookalike_roster
from qabuse_dagster.telemetry.hashing import KeyedHasher

__all__ = ["DEFAULT_START", "INCIDENTS_FILE", "TELEMETRY_FILE", "SimulationResult", "simulate"]

logger = logging.getLogger(__name__)

#: Fixed start (a Monday, 00:00 UTC), so a seed alone decides the output.
DEFAULT_START = datetime(2026, 11, 2, tzinfo=UTC)
TELEMETRY_FILE = "telemetry.jsonl"
INCIDENTS_FILE = "incidents.jsonl"


@dataclass(frozen=True)
class SimulationResult:
    """What :func:`simulate` wrote, and the ground truth needed to read it.

    Attributes:
        telemetry_path: ``telemetry.jsonl``, one contract record per line, by timestamp.
        labels_path: ``incidents.jsonl``, one incident label per line.
        n_records: Lines in the telemetry file.
        n_jobs: Jobs simulated (two records each, one if the API rejected it).
        api_keys: Hashed api_key_id to tenant kind, e.g. ``research_group``,
            ``variational_loop``, ``ci_suite``, ``runaway_ci``. A leaked key keeps the
            kind of the benign tenant it belongs to.
        incident_api_key_ids: Keys named by any incident label, in label order.
        start: Start of the horizon (UTC).
        end: End of the horizon (UTC), exclusive: every record lies before it.
        incidents: The incident labels written to ``labels_path``.
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


@contextlib.contextmanager
def _progress_bar(
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

    Returns:
        Paths, counts and ground truth of what was written.

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

    # The roster does not depend on the horizon, so longer runs of one seed extend the
    # same deployment; each tenant then draws from its own independent stream.
    rng = np.random.default_rng(seed)
    tenants: list[Tenant] = benign_roster(hasher, rng, seed=seed)
    if names is None:
        incident = runaway_ci(hasher, rng, horizon, seed=seed)
        tenants.append(incident)
    else:
        # Its own stream, so the benign roster above is the reference deployment's.
        tenants.extend(lookalike_roster(hasher, np.random.default_rng([seed, 1]), seed=seed))
    tenant_rngs = rng.spawn(len(tenants))

    out.mkdir(parents=True, exist_ok=True)
    telemetry_path = out / TELEMETRY_FILE
    labels_path = out / INCIDENTS_FILE
    api_keys = {t.identity.api_key_id: t.kind for t in tenants}
    with _progress_bar(progress) as new_task:
        n_actors = len(tenants) + (0 if names is None else len(names))
        advance = new_task("simulating tenants", n_actors) if new_task else None
        batches: list[JobBatch] = []
        for tenant, tenant_rng in zip(tenants, tenant_rngs, strict=True):
            batches.append(tenant.generate(horizon, tenant_rng))
            if advance:
                advance(1)
        if names is None:
            labels = [incident.label(horizon)]
        else:
            context = ScenarioContext(
                hasher=hasher, seed=seed, horizon=horizon, tenants=tuple(tenants)
            )
            scenario_batches, labels = _run_scenarios(names, context, api_keys, advance)
            batches.extend(scenario_batches)
        jobs = _shared_queue(JobBatch.concat(batches))
        # Every record, terminal ones included, must lie in [start, end).
        jobs = jobs.take((jobs.submit_ms >= horizon.start_ms) & (jobs.end_ms < horizon.end_ms))
        n_jobs = len(jobs)
        expected_records = 2 * n_jobs - int(jobs.rejected.sum())
        on_progress = new_task("writing telemetry", expected_records) if new_task else None
        n_records = write_telemetry(
            jobs, telemetry_path, job_id_prefix=f"job-{seed}-", on_progress=on_progress
        )
    write_labels(labels, labels_path)

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
    )


#: Parallel job slots per backend: cloud simulators run many jobs at once, QPUs few.
BACKEND_SLOTS: dict[str, int] = {"sv1": 16, "ibm_kingston": 3, "ibm_fez": 3}
DEFAULT_BACKEND_SLOTS = 2


def _shared_queue(jobs: JobBatch) -> JobBatch:
    """Queue times from the load: every backend's jobs share its slots, fair-share.

    A job's run time is the tenant model's (its service time); its wait is what the
    other tenants' jobs on the same backend leave it, so a flood on one backend shows
    as longer queues for everyone on it. Refused jobs never reach a queue.
    """
    queued = ~jobs.rejected
    names, backend_idx = np.unique(jobs.backend[queued], return_inverse=True)
    _, tenant_idx = np.unique(jobs.api_key_id[queued], return_inverse=True)
    backends = [
        Backend(str(name), BACKEND_SLOTS.get(str(name), DEFAULT_BACKEND_SLOTS), 1.0)
        for name in names
    ]
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


def _run_scenarios(
    names: Sequence[str],
    context: ScenarioContext,
    api_keys: dict[str, str],
    advance: Callable[[int], None] | None,
) -> tuple[list[JobBatch], list[IncidentLabel]]:
    """Place, generate and label each named scenario; add its new keys to ``api_keys``."""
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
    return batches, labels

"""The workload twin: a seeded, simulated deployment that writes telemetry with ground truth.

:func:`simulate` draws benign tenants (research groups, variational loops, CI suites) and
the reference abuse incident (a runaway CI loop), runs them over a horizon and writes
``telemetry.jsonl`` (telemetry-record contract) and ``incidents.jsonl``
(incident-labels contract). The same seed gives byte-identical files.

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
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from qabuse_dagster.evaluation.labels import write_labels
from qabuse_dagster.simulation.jobs import Horizon, JobBatch
from qabuse_dagster.simulation.records import write_telemetry
from qabuse_dagster.simulation.scenarios import runaway_ci
from qabuse_dagster.simulation.tenants import Tenant, benign_roster
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
        n_jobs: Jobs simulated (two records each).
        api_keys: Hashed api_key_id to tenant kind, e.g. ``research_group``,
            ``variational_loop``, ``ci_suite``, ``runaway_ci``.
        incident_api_key_ids: Keys named by an incident label.
        start: Start of the horizon (UTC).
        end: End of the horizon (UTC), exclusive: every record lies before it.
    """

    telemetry_path: Path
    labels_path: Path
    n_records: int
    n_jobs: int
    api_keys: dict[str, str]
    incident_api_key_ids: list[str]
    start: datetime
    end: datetime


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
    hours: float,
    seed: int,
    out: Path,
    hasher: KeyedHasher,
    start: datetime = DEFAULT_START,
    progress: bool = False,
) -> SimulationResult:
    """Simulate a shared quantum cloud for ``hours`` and write telemetry and labels.

    Args:
        hours: Length of the horizon; the runaway CI starts at 70% of it.
        seed: Decides everything random; the same seed gives byte-identical files.
        out: Directory for ``telemetry.jsonl`` and ``incidents.jsonl`` (created).
        hasher: Keyed hasher for every identifier the records carry.
        start: Start of the horizon; must be timezone-aware.
        progress: Show a progress bar (rich) while simulating.

    Returns:
        Paths, counts and ground truth of what was written.

    Raises:
        ValueError: If ``hours`` is not positive or ``start`` is naive.
    """
    if not hours > 0:
        raise ValueError(f"hours must be positive, got {hours}")
    if start.tzinfo is None:
        raise ValueError("start must be timezone-aware (UTC)")
    start = start.astimezone(UTC)
    horizon = Horizon(start=start, end=start + timedelta(hours=hours))

    # The roster does not depend on the horizon, so longer runs of one seed extend the
    # same deployment; each tenant then draws from its own independent stream.
    rng = np.random.default_rng(seed)
    tenants: list[Tenant] = benign_roster(hasher, rng, seed=seed)
    incident = runaway_ci(hasher, rng, horizon, seed=seed)
    tenants.append(incident)
    tenant_rngs = rng.spawn(len(tenants))

    out.mkdir(parents=True, exist_ok=True)
    telemetry_path = out / TELEMETRY_FILE
    labels_path = out / INCIDENTS_FILE
    with _progress_bar(progress) as new_task:
        advance = new_task("simulating tenants", len(tenants)) if new_task else None
        batches: list[JobBatch] = []
        for tenant, tenant_rng in zip(tenants, tenant_rngs, strict=True):
            batches.append(tenant.generate(horizon, tenant_rng))
            if advance:
                advance(1)
        jobs = JobBatch.concat(batches)
        # Every record, terminal ones included, must lie in [start, end).
        jobs = jobs.take((jobs.submit_ms >= horizon.start_ms) & (jobs.end_ms < horizon.end_ms))
        n_jobs = len(jobs)
        on_progress = new_task("writing telemetry", 2 * n_jobs) if new_task else None
        n_records = write_telemetry(
            jobs, telemetry_path, job_id_prefix=f"job-{seed}-", on_progress=on_progress
        )
    write_labels([incident.label(horizon)], labels_path)

    logger.info(
        "simulated %d jobs (%d records) from %d api keys over %s h, seed %d, into %s",
        n_jobs,
        n_records,
        len(tenants),
        hours,
        seed,
        out,
    )
    return SimulationResult(
        telemetry_path=telemetry_path,
        labels_path=labels_path,
        n_records=n_records,
        n_jobs=n_jobs,
        api_keys={t.identity.api_key_id: t.kind for t in tenants},
        incident_api_key_ids=[incident.identity.api_key_id],
        start=horizon.start,
        end=horizon.end,
    )

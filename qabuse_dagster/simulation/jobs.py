"""Simulated jobs as columns: the minute grid they fall on, who submits them, what they carry.

Tenants decide *when* they submit (a count per minute of the :class:`Horizon`) and *what*
(circuit, shots, script); :func:`sample_jobs` fills in the rest the same way for every
tenant (which member and backend, timing, failures) and returns a :class:`JobBatch` of
numpy columns, so tens of thousands of jobs cost a few array operations, not a loop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta

import numpy as np

from qabuse_dagster.simulation.circuits import circuit_catalogue

__all__ = [
    "INSTRUMENTOR_VERSION",
    "MINUTE_MS",
    "Horizon",
    "JobBatch",
    "TenantIdentity",
    "constant_column",
    "epoch_ms",
    "pick_column",
    "reject",
    "sample_jobs",
    "submit_times",
]

#: Version the simulated instrumentors report in ``client_agent``.
INSTRUMENTOR_VERSION = "0.1.0"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
MINUTE_MS = 60_000


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the Unix epoch, exactly (no float rounding)."""
    if moment.tzinfo is None:
        raise ValueError("timestamp must be timezone-aware")
    return (moment - _EPOCH) // _MS


@dataclass(frozen=True)
class Horizon:
    """The simulated period, cut into whole UTC minutes from ``start``.

    The last minute may run past ``end``; jobs that would end after ``end`` are dropped
    by the twin, so every record lies in ``[start, end)``.
    """

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("horizon bounds must be timezone-aware")
        if self.end <= self.start:
            raise ValueError(f"horizon end {self.end} is not after start {self.start}")

    @property
    def start_ms(self) -> int:
        return epoch_ms(self.start)

    @property
    def end_ms(self) -> int:
        return epoch_ms(self.end)

    @property
    def n_minutes(self) -> int:
        return math.ceil((self.end_ms - self.start_ms) / MINUTE_MS)

    def minute_ms(self) -> np.ndarray:
        """Epoch milliseconds at the start of each minute (``int64``)."""
        return self.start_ms + MINUTE_MS * np.arange(self.n_minutes, dtype=np.int64)

    def hour_of_day(self) -> np.ndarray:
        """UTC hour of each minute as a float in [0, 24)."""
        minute_of_day = (self.minute_ms() // MINUTE_MS) % 1440
        return minute_of_day / 60.0

    def is_weekend(self) -> np.ndarray:
        """Whether each minute falls on a Saturday or Sunday (UTC)."""
        # 1970-01-01 was a Thursday: weekday 3 with Monday as 0.
        weekday = (self.minute_ms() // (MINUTE_MS * 1440) + 3) % 7
        return weekday >= 5

    def minute_at(self, moment: datetime) -> int:
        """Index of the minute that contains ``moment``."""
        return (epoch_ms(moment) - self.start_ms) // MINUTE_MS


@dataclass(frozen=True)
class TenantIdentity:
    """Everything that names a tenant in telemetry, already hashed.

    Attributes:
        api_key_id: Hash of the tenant's API key id.
        users: Hashes of the users who submit with the key.
        provider: Provider the key belongs to.
        region: Provider region.
        backends: Backends the tenant submits to.
        sdk: ``qiskit``, ``cirq`` or ``pennylane``.
        sdk_version: Version of that SDK.
        client_agent: Instrumentor and SDK, e.g. ``qabuse-qiskit/0.1.0 qiskit/2.6.2``.
        code_hashes: Hashes of the tenant's scripts.
        source_ip_hashes: Hashes of the networks the tenant submits from.
        country: ISO 3166 alpha-2 code.
    """

    api_key_id: str
    users: tuple[str, ...]
    provider: str
    region: str
    backends: tuple[str, ...]
    sdk: str
    sdk_version: str
    client_agent: str
    code_hashes: tuple[str, ...]
    source_ip_hashes: tuple[str, ...]
    country: str


@dataclass(frozen=True)
class JobBatch:
    """Simulated jobs, one array element per job, all arrays the same length.

    String columns are ``object`` arrays; times are ``int64`` milliseconds. A job with
    ``rejected`` set was refused by the API: it is one ``rejected`` record at its
    submission instant (with its ``error_code``), and never ran. ``retry_count`` says
    how many refused attempts of the same job came before this one.
    """

    submit_ms: np.ndarray
    api_key_id: np.ndarray
    user: np.ndarray
    provider: np.ndarray
    region: np.ndarray
    backend: np.ndarray
    sdk: np.ndarray
    sdk_version: np.ndarray
    client_agent: np.ndarray
    code_hash: np.ndarray
    source_ip_hash: np.ndarray
    country: np.ndarray
    circuit: np.ndarray
    num_circuits: np.ndarray
    shots: np.ndarray
    error_code: np.ndarray
    submit_latency_ms: np.ndarray
    queue_ms: np.ndarray
    runtime_ms: np.ndarray
    rejected: np.ndarray
    retry_count: np.ndarray

    def __len__(self) -> int:
        return int(self.submit_ms.shape[0])

    @property
    def end_ms(self) -> np.ndarray:
        """When each job's terminal record is emitted."""
        return self.submit_ms + self.queue_ms + self.runtime_ms

    def take(self, index: np.ndarray) -> JobBatch:
        """The jobs at ``index`` (integer positions or a boolean mask), in that order."""
        return JobBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def concat(cls, batches: Sequence[JobBatch]) -> JobBatch:
        """All jobs of ``batches``, in order."""
        if not batches:
            raise ValueError("nothing to concatenate")
        return cls(
            **{f.name: np.concatenate([getattr(b, f.name) for b in batches]) for f in fields(cls)}
        )


def reject(jobs: JobBatch, mask: np.ndarray, error_code: str) -> JobBatch:
    """Turn the jobs at ``mask`` into API refusals: one ``rejected`` record, no run.

    Args:
        jobs: Jobs as drawn by :func:`sample_jobs`.
        mask: Boolean mask of the jobs the API refuses.
        error_code: Why, e.g. ``auth_failed``.

    Returns:
        The same jobs; refused ones carry ``error_code`` and no queue or run time.
    """
    error = jobs.error_code.copy()
    error[mask] = error_code
    return dataclasses.replace(
        jobs,
        error_code=error,
        queue_ms=np.where(mask, 0, jobs.queue_ms),
        runtime_ms=np.where(mask, 0, jobs.runtime_ms),
        rejected=jobs.rejected | mask,
    )


def constant_column(value: object, n: int) -> np.ndarray:
    """An ``object`` column holding ``value`` ``n`` times."""
    column = np.empty(n, dtype=object)
    column[:] = [value] * n
    return column


def pick_column(values: Sequence[str], index: np.ndarray) -> np.ndarray:
    """An ``object`` column of ``values[index[i]]``."""
    table = np.empty(len(values), dtype=object)
    table[:] = list(values)
    return table[index]


def submit_times(counts: np.ndarray, horizon: Horizon, rng: np.random.Generator) -> np.ndarray:
    """Spread per-minute job counts uniformly inside their minutes.

    Args:
        counts: Jobs to submit in each minute of ``horizon``.
        horizon: The minute grid.
        rng: Source of randomness.

    Returns:
        Epoch milliseconds of each submission, minute by minute (``int64``).
    """
    minute = np.repeat(np.arange(counts.shape[0], dtype=np.int64), counts)
    offset = rng.integers(0, MINUTE_MS, size=len(minute), dtype=np.int64)
    return horizon.start_ms + minute * MINUTE_MS + offset


def sample_jobs(
    identity: TenantIdentity,
    rng: np.random.Generator,
    *,
    submit_ms: np.ndarray,
    circuit: np.ndarray,
    shots: np.ndarray,
    num_circuits: np.ndarray,
    code_index: np.ndarray,
    failure_rate: float,
    error_codes: Sequence[str] = ("timeout", "invalid_circuit"),
) -> JobBatch:
    """Complete a tenant's jobs with member, backend, network, timing and outcome.

    Args:
        identity: The submitting tenant.
        rng: Source of randomness.
        submit_ms: Submission instants.
        circuit: Index into :func:`~qabuse_dagster.simulation.circuits.circuit_catalogue`.
        shots: Shots per circuit.
        num_circuits: Circuits in each job (copies of ``circuit``).
        code_index: Index into ``identity.code_hashes``.
        failure_rate: Chance that a job fails.
        error_codes: Codes a failure draws from, uniformly.

    Returns:
        The jobs as a :class:`JobBatch`.
    """
    n = int(submit_ms.shape[0])
    catalogue = circuit_catalogue()
    depth = np.asarray([c.depth for c in catalogue], dtype=np.float64)[circuit]

    failed = rng.random(n) < failure_rate
    error_index = rng.integers(0, len(error_codes), size=n)
    error_code = pick_column(error_codes, error_index)
    error_code[~failed] = None

    # Timing model: seconds, like a busy cloud simulator or a lightly loaded QPU queue.
    # Execution grows with shots x circuits x depth; a timeout adds its wait, an invalid
    # circuit is refused before it runs.
    submit_latency_s = rng.lognormal(math.log(0.15), 0.5, size=n)
    queue_s = rng.gamma(2.0, 0.8, size=n)
    runtime_s = (0.2 + 2e-5 * shots * num_circuits * (1.0 + depth / 50.0)) * rng.lognormal(
        0.0, 0.2, size=n
    )
    is_timeout = failed & (error_code == "timeout")
    is_invalid = failed & (error_code == "invalid_circuit")
    runtime_s = np.where(is_timeout, runtime_s + rng.uniform(5.0, 10.0, size=n), runtime_s)
    runtime_s = np.where(is_invalid, 0.0, runtime_s)
    queue_s = np.where(is_invalid, queue_s * 0.05, queue_s)

    return JobBatch(
        submit_ms=submit_ms.astype(np.int64),
        api_key_id=constant_column(identity.api_key_id, n),
        user=pick_column(identity.users, rng.integers(0, len(identity.users), size=n)),
        provider=constant_column(identity.provider, n),
        region=constant_column(identity.region, n),
        backend=pick_column(identity.backends, rng.integers(0, len(identity.backends), size=n)),
        sdk=constant_column(identity.sdk, n),
        sdk_version=constant_column(identity.sdk_version, n),
        client_agent=constant_column(identity.client_agent, n),
        code_hash=pick_column(identity.code_hashes, code_index),
        source_ip_hash=pick_column(
            identity.source_ip_hashes,
            rng.integers(0, len(identity.source_ip_hashes), size=n),
        ),
        country=constant_column(identity.country, n),
        circuit=circuit.astype(np.int64),
        num_circuits=num_circuits.astype(np.int64),
        shots=shots.astype(np.int64),
        error_code=error_code,
        submit_latency_ms=np.round(submit_latency_s * 1000).astype(np.int64),
        queue_ms=np.round(queue_s * 1000).astype(np.int64),
        runtime_ms=np.round(runtime_s * 1000).astype(np.int64),
        rejected=np.zeros(n, dtype=bool),
        retry_count=np.zeros(n, dtype=np.int64),
    )

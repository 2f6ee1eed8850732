"""Shared backends: job service times from their size, and when each job starts on a busy backend.

Every backend has a fixed number of parallel job slots. :func:`schedule` replays the jobs
submitted to each backend in time order and gives each its start and end, so queue time
comes from the load: a tenant flooding a backend delays everyone behind it. Two policies:

* ``"fifo"``: jobs start in submit order as slots free.
* ``"fair_share"``: when a slot frees, the waiting job whose tenant has attained the least
  service on that backend so far starts next (ties: earliest submit, then input order).
  A tenant is charged a job's full service time when the job starts (jobs are not
  preempted), so a flooder's own backlog sinks behind every lighter tenant.

Backends are independent; each is an event loop over heaps, O(n log n) in its job count.

Example:
    >>> import numpy as np
    >>> qpu = Backend("qpu_a", capacity=1, seconds_per_unit=1.0)
    >>> result = schedule(
    ...     submit_s=np.array([0.0, 0.0, 1.0]),
    ...     service_s=np.array([2.0, 2.0, 2.0]),
    ...     backend_idx=np.array([0, 0, 0]),
    ...     tenant_idx=np.array([0, 0, 1]),
    ...     backends=[qpu],
    ... )
    >>> result.start_s.tolist()
    [0.0, 4.0, 2.0]
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "MIN_SERVICE_S",
    "UNIT_SIZE",
    "Backend",
    "QueuePolicy",
    "ScheduleResult",
    "schedule",
    "service_seconds",
]

#: Shortest service time of any job: dispatch, compilation and readout overhead.
MIN_SERVICE_S = 0.05

#: Shot-circuit-layers in one work unit of :attr:`Backend.seconds_per_unit`.
UNIT_SIZE = 1e6

QueuePolicy = Literal["fifo", "fair_share"]


@dataclass(frozen=True)
class Backend:
    """A QPU or simulator that runs ``capacity`` jobs at a time.

    Attributes:
        name: Backend name as it appears in telemetry.
        capacity: Parallel job slots (at least 1).
        seconds_per_unit: Seconds to run one million shot-circuit-layers, i.e. one
            million ``shots * num_circuits * depth``; see :func:`service_seconds`.
    """

    name: str
    capacity: int
    seconds_per_unit: float

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"backend {self.name!r}: capacity must be >= 1, got {self.capacity}")
        if not self.seconds_per_unit > 0:
            raise ValueError(
                f"backend {self.name!r}: seconds_per_unit must be > 0, got {self.seconds_per_unit}"
            )


@dataclass(frozen=True)
class ScheduleResult:
    """When each job ran, in seconds from the origin of ``submit_s``, in input order.

    Attributes:
        start_s: When the job took a slot.
        end_s: When it finished (``start_s + service_s``).
        queue_s: Time it waited for a slot (``start_s - submit_s``).
    """

    start_s: np.ndarray
    end_s: np.ndarray
    queue_s: np.ndarray


def service_seconds(
    backends: Sequence[Backend],
    backend_idx: np.ndarray,
    shots: np.ndarray,
    num_circuits: np.ndarray,
    depth: np.ndarray,
) -> np.ndarray:
    """Service time of each job on its backend.

    ``seconds_per_unit * shots * num_circuits * max(depth, 1) / 1e6``, at least
    :data:`MIN_SERVICE_S`.

    Args:
        backends: The backends ``backend_idx`` points into.
        backend_idx: Each job's backend, an index into ``backends``.
        shots: Shots per circuit.
        num_circuits: Circuits in the job.
        depth: Circuit depth (0 is treated as 1: a job still costs its readout).

    Returns:
        Seconds, float64, one per job.
    """
    rate = np.array([b.seconds_per_unit for b in backends], dtype=np.float64)
    work = (
        np.asarray(shots, dtype=np.float64)
        * np.asarray(num_circuits, dtype=np.float64)
        * np.maximum(np.asarray(depth, dtype=np.float64), 1.0)
    )
    return np.maximum(rate[np.asarray(backend_idx)] * work / UNIT_SIZE, MIN_SERVICE_S)


def schedule(
    submit_s: np.ndarray,
    service_s: np.ndarray,
    backend_idx: np.ndarray,
    tenant_idx: np.ndarray,
    backends: Sequence[Backend],
    *,
    policy: QueuePolicy = "fair_share",
) -> ScheduleResult:
    """Run every job on its backend's slots and report when each started and ended.

    Args:
        submit_s: Submit time of each job, seconds from any origin.
        service_s: Service time of each job (see :func:`service_seconds`), >= 0.
        backend_idx: Each job's backend, an index into ``backends``.
        tenant_idx: Each job's tenant, any integer id; fair share balances tenants.
        backends: The backends.
        policy: ``"fifo"`` or ``"fair_share"`` (see the module docstring).

    Returns:
        Start, end and queue times in the order of the inputs. Deterministic.

    Raises:
        ValueError: On mismatched lengths, an unknown policy or backend, or bad times.
    """
    submit = np.asarray(submit_s, dtype=np.float64)
    service = np.asarray(service_s, dtype=np.float64)
    backend = np.asarray(backend_idx, dtype=np.int64)
    tenant = np.asarray(tenant_idx, dtype=np.int64)
    n = submit.shape[0]
    if not (service.shape == backend.shape == tenant.shape == submit.shape == (n,)):
        raise ValueError("submit_s, service_s, backend_idx and tenant_idx must be 1-d, same length")
    if policy not in ("fifo", "fair_share"):
        raise ValueError(f"unknown queue policy {policy!r}; expected 'fifo' or 'fair_share'")
    if n and (backend.min() < 0 or backend.max() >= len(backends)):
        raise ValueError(f"backend_idx must lie in [0, {len(backends)})")
    if not (np.isfinite(submit).all() and np.isfinite(service).all() and (service >= 0).all()):
        raise ValueError("submit_s must be finite and service_s finite and >= 0")

    start = np.empty(n, dtype=np.float64)
    # Stable sort: simultaneous submits keep input order, which makes ties deterministic.
    order = np.lexsort((submit, backend))
    bounds = np.searchsorted(backend[order], np.arange(len(backends) + 1))
    for b, spec in enumerate(backends):
        jobs = order[bounds[b] : bounds[b + 1]]
        if jobs.size == 0:
            continue
        if policy == "fifo":
            start[jobs] = _fifo_starts(submit[jobs].tolist(), service[jobs].tolist(), spec.capacity)
        else:
            start[jobs] = _fair_share_starts(
                submit[jobs].tolist(),
                service[jobs].tolist(),
                tenant[jobs].tolist(),
                spec.capacity,
            )
    return ScheduleResult(start_s=start, end_s=start + service, queue_s=start - submit)


def _fifo_starts(submit: list[float], service: list[float], capacity: int) -> list[float]:
    """Starts of jobs in submit order, each on the slot that frees first."""
    free_at = [-math.inf] * capacity  # a heap of slot release times
    starts = []
    for t, s in zip(submit, service, strict=True):
        begin = max(t, free_at[0])
        heapq.heapreplace(free_at, begin + s)
        starts.append(begin)
    return starts


def _fair_share_starts(
    submit: list[float], service: list[float], tenant: list[int], capacity: int
) -> list[float]:
    """Starts of jobs in submit order under least-attained-service-per-tenant."""
    n = len(submit)
    starts = [0.0] * n
    attained: dict[int, float] = {}
    waiting: dict[int, deque[int]] = {}  # per tenant, its waiting jobs in submit order
    # Tenants with waiting jobs, keyed by (attained service, head's submit, head's position).
    # A key only changes when its tenant is popped, so entries never go stale.
    ready: list[tuple[float, float, int, int]] = []
    running: list[float] = []  # heap of end times of running jobs
    nxt = 0
    now = submit[0]
    while True:
        while nxt < n and submit[nxt] <= now:
            who = tenant[nxt]
            queue = waiting.get(who)
            if queue is None:
                queue = waiting[who] = deque()
            if not queue:
                heapq.heappush(ready, (attained.get(who, 0.0), submit[nxt], nxt, who))
            queue.append(nxt)
            nxt += 1
        while running and running[0] <= now:
            heapq.heappop(running)
        while ready and len(running) < capacity:
            used, _, job, who = heapq.heappop(ready)
            queue = waiting[who]
            queue.popleft()
            starts[job] = now
            heapq.heappush(running, now + service[job])
            used += service[job]
            attained[who] = used
            if queue:
                head = queue[0]
                heapq.heappush(ready, (used, submit[head], head, who))
        # Next event: an arrival, or (only useful while jobs wait) a slot freeing.
        if ready:
            now = running[0] if nxt >= n else min(submit[nxt], running[0])
        elif nxt < n:
            now = submit[nxt]
        else:
            return starts

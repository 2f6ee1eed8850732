"""Population shifts: benign tenants change how they use the backends, and nobody abuses.

A drift scenario is the other half of the scenario library. An abuse scenario adds an
actor and the incident label it earns; a population shift changes the benign deployment
itself from some instant on, and earns no label. What the detectors learnt as normal
stops being normal: the rows they score move away from the rows they were trained on,
which is what drift monitoring (``feature_drift``) must see and retraining must absorb.

``sdk_release`` is the reference shift: a new major release of every SDK lands mid
horizon, and most tenants upgrade within a few hours. Its primitives batch several
circuits into one job and default to more shots, and the tenants' scripts are rewritten
for the new API (new code hashes, a new client agent). Per adopting tenant, from its
upgrade on: a third of the jobs, each with three times the circuits and four times the
shots, so roughly as much work in fewer, larger jobs.

A shift plugs in with :func:`register_shift`; ``simulate(scenarios=[...])`` takes its
name beside the abuse scenarios' (``all`` still means every abuse scenario: a shift
changes the benign deployment, so it joins only by name).

Example:
    >>> shift = SHIFTS["sdk_release"](onset=0.4, adoption=0.8)
    >>> shift.kind
    'sdk_release'
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import ClassVar

import numpy as np

from qabuse_dagster.simulation.circuits import circuit_catalogue
from qabuse_dagster.simulation.jobs import Horizon, JobBatch, epoch_ms
from qabuse_dagster.telemetry.hashing import KeyedHasher

__all__ = [
    "SHIFTS",
    "PopulationShift",
    "SdkRelease",
    "ShiftFactory",
    "register_shift",
]


@dataclass(frozen=True, kw_only=True)
class PopulationShift(ABC):
    """A change in benign use: who adopts it, from when, and what it does to their jobs.

    Attributes:
        onset: Where in the horizon the change lands, as a fraction in [0, 1).
        adoption: Share of the benign tenants that take it up, in (0, 1].
        ramp: Tenants take it up one by one, uniformly over this span after the onset.
    """

    kind: ClassVar[str]
    notes: ClassVar[str]
    onset: float = 0.5
    adoption: float = 0.7
    ramp: timedelta = timedelta(hours=3)

    def __post_init__(self) -> None:
        if not 0.0 <= self.onset < 1.0:
            raise ValueError(f"onset must lie in [0, 1), got {self.onset}")
        if not 0.0 < self.adoption <= 1.0:
            raise ValueError(f"adoption must lie in (0, 1], got {self.adoption}")
        if self.ramp < timedelta(0):
            raise ValueError(f"ramp must not be negative, got {self.ramp}")

    def onset_at(self, horizon: Horizon) -> datetime:
        """The whole minute at which the change lands."""
        minutes = int(self.onset * horizon.n_minutes)
        return horizon.start + timedelta(minutes=minutes)

    def apply(
        self, jobs: JobBatch, horizon: Horizon, hasher: KeyedHasher, rng: np.random.Generator
    ) -> JobBatch:
        """One tenant's jobs, changed from its adoption instant on when it adopts.

        Args:
            jobs: Every job of one benign tenant (one api key), in any order.
            horizon: The simulated period.
            hasher: Keyed hasher, for identifiers the change rewrites.
            rng: This tenant's draws for the shift (adoption, instant, the change).

        Returns:
            The jobs, unchanged when the tenant does not adopt.
        """
        adopts = rng.random() < self.adoption
        ramp_ms = int(self.ramp / timedelta(milliseconds=1))
        since_ms = epoch_ms(self.onset_at(horizon)) + int(rng.integers(0, ramp_ms + 1))
        if not adopts or len(jobs) == 0:
            return jobs
        after = jobs.submit_ms >= since_ms
        if not after.any():
            return jobs
        order = np.argsort(jobs.submit_ms, kind="stable")
        before = jobs.take(order[~after[order]])
        changed = self.change(jobs.take(order[after[order]]), hasher, rng)
        return JobBatch.concat([before, changed])

    @abstractmethod
    def change(self, jobs: JobBatch, hasher: KeyedHasher, rng: np.random.Generator) -> JobBatch:
        """What the shift does to one adopting tenant's jobs after it adopted (in time order)."""


#: The next major release of each SDK, which the tenants upgrade to.
NEXT_RELEASE: dict[str, str] = {"qiskit": "3.0.0", "cirq": "2.0.0", "pennylane": "0.50.0"}


@dataclass(frozen=True, kw_only=True)
class SdkRelease(PopulationShift):
    """A new major SDK release: fewer, larger jobs, more shots, rewritten scripts.

    Attributes:
        batching: Consecutive jobs the new primitives merge into one.
        shots_factor: The new default precision's shots against the old.
    """

    kind: ClassVar[str] = "sdk_release"
    notes: ClassVar[str] = (
        "A major release of every SDK lands mid horizon and most tenants upgrade within "
        "hours: batched jobs with more circuits and shots, new scripts, new client agents."
    )
    batching: int = 3
    shots_factor: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batching < 1:
            raise ValueError(f"batching must be at least 1, got {self.batching}")
        if not self.shots_factor > 0:
            raise ValueError(f"shots_factor must be positive, got {self.shots_factor}")

    def change(self, jobs: JobBatch, hasher: KeyedHasher, rng: np.random.Generator) -> JobBatch:
        kept = jobs.take(np.arange(0, len(jobs), self.batching))
        n = len(kept)
        num_circuits = kept.num_circuits * self.batching
        shots = np.maximum(1, np.round(kept.shots * self.shots_factor)).astype(np.int64)
        # The run time model of `sample_jobs`: a fixed part plus shots x circuits x depth.
        depth = np.asarray([c.depth for c in circuit_catalogue()], dtype=np.float64)[kept.circuit]

        def work(shots: np.ndarray, circuits: np.ndarray) -> np.ndarray:
            return 0.2 + 2e-5 * shots * circuits * (1.0 + depth / 50.0)

        scale = work(shots, num_circuits) / work(kept.shots, kept.num_circuits)
        ran = kept.runtime_ms > 0  # an invalid circuit is refused before it runs
        runtime_ms = np.where(ran, np.round(kept.runtime_ms * scale), 0).astype(np.int64)
        sdk = str(kept.sdk[0]) if n else ""
        release = NEXT_RELEASE.get(sdk, "next")
        agent = np.asarray(
            [f"{str(a).rsplit(' ', 1)[0]} {sdk}/{release}" for a in kept.client_agent],
            dtype=object,
        )
        code = np.asarray(
            [hasher.hash(f"{c}/{self.kind}/{release}", domain="code") for c in kept.code_hash],
            dtype=object,
        )
        return dataclasses.replace(
            kept,
            num_circuits=num_circuits.astype(np.int64),
            shots=shots,
            runtime_ms=runtime_ms,
            sdk_version=np.full(n, release, dtype=object),
            client_agent=agent,
            code_hash=code,
        )


#: A factory builds a shift from keyword knobs (``onset``, ``adoption``, ``ramp``, ...).
ShiftFactory = Callable[..., PopulationShift]

#: Registered population shifts by name.
SHIFTS: dict[str, ShiftFactory] = {SdkRelease.kind: SdkRelease}


def register_shift(name: str, factory: ShiftFactory) -> ShiftFactory:
    """Add a population shift under ``name``; it must not clash with an abuse scenario.

    Raises:
        ValueError: If ``name`` is taken (by a shift or an abuse scenario) or reserved.
    """
    from qabuse_dagster.simulation.scenarios import SCENARIOS

    if name in ("all", "reference") or name in SHIFTS or name in SCENARIOS:
        raise ValueError(f"scenario name {name!r} is already taken")
    SHIFTS[name] = factory
    return factory

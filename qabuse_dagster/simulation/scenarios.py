"""Abuse scenarios: an abusive tenant's behaviour and the incident label it earns.

``runaway_ci`` is the reference incident: a CI pipeline stuck in a retry loop that
hammers the API with thousands of tiny jobs from one script, one agent and one network
until someone notices (here: until the end of the horizon).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import ClassVar

import numpy as np

from qabuse_dagster.evaluation.labels import IncidentLabel
from qabuse_dagster.simulation.circuits import select_circuits
from qabuse_dagster.simulation.jobs import (
    Horizon,
    JobBatch,
    TenantIdentity,
    sample_jobs,
    submit_times,
)
from qabuse_dagster.simulation.tenants import make_identity
from qabuse_dagster.telemetry.hashing import KeyedHasher

__all__ = ["RUNAWAY_CI_ONSET_FRACTION", "RunawayCi", "runaway_ci"]

#: Where in the horizon the runaway CI starts.
RUNAWAY_CI_ONSET_FRACTION = 0.7


@dataclass(frozen=True)
class RunawayCi:
    """A CI job in a submit loop: 30-90 tiny-shot jobs a minute from one script.

    Attributes:
        identity: Its dedicated key and user, one agent, one script, one network.
        onset: First minute of the loop.
        incident_id: Name of its label.
        min_rate: Fewest jobs per minute (expected).
        max_rate: Most jobs per minute (expected).
    """

    kind: ClassVar[str] = "runaway_ci"
    identity: TenantIdentity
    onset: datetime
    incident_id: str = "runaway-ci-1"
    min_rate: float = 30.0
    max_rate: float = 90.0

    def generate(self, horizon: Horizon, rng: np.random.Generator) -> JobBatch:
        onset_minute = horizon.minute_at(self.onset)
        active = np.arange(horizon.n_minutes) >= onset_minute
        rate = np.where(active, rng.uniform(self.min_rate, self.max_rate, horizon.n_minutes), 0.0)
        submit_ms = submit_times(rng.poisson(rate), horizon, rng)
        n = len(submit_ms)
        smallest_ghz = select_circuits(["ghz"], max_qubits=3)[0]
        return sample_jobs(
            self.identity,
            rng,
            submit_ms=submit_ms,
            circuit=np.full(n, smallest_ghz, dtype=np.int64),
            shots=rng.integers(1, 17, size=n),
            num_circuits=np.ones(n, dtype=np.int64),
            code_index=np.zeros(n, dtype=np.int64),
            failure_rate=0.10,
        )

    def label(self, horizon: Horizon) -> IncidentLabel:
        """The incident covering this tenant's key from onset to the end of ``horizon``."""
        return IncidentLabel(
            incident_id=self.incident_id,
            kind=self.kind,
            start=self.onset,
            end=horizon.end,
            api_key_ids=(self.identity.api_key_id,),
            notes=(
                "CI pipeline in a submit loop: tiny-shot jobs at 30-90 per minute from one "
                "script, one client agent and one network until the end of the telemetry."
            ),
        )


def runaway_ci(
    hasher: KeyedHasher, rng: np.random.Generator, horizon: Horizon, *, seed: int
) -> RunawayCi:
    """Draw the runaway CI tenant, starting at 70% of ``horizon`` (whole minute).

    Args:
        hasher: Keyed hasher for every identifier.
        rng: Source of randomness.
        horizon: The simulated period.
        seed: The simulation seed; part of the synthetic raw ids.

    Returns:
        The scenario's tenant.
    """
    onset_minute = round(
        RUNAWAY_CI_ONSET_FRACTION * (horizon.end - horizon.start) / timedelta(minutes=1)
    )
    onset_minute = min(onset_minute, horizon.n_minutes - 1)
    identity = make_identity(
        hasher,
        rng,
        raw_api_key=f"key-{seed}-ci-runaway",
        raw_users=[f"ci-runner@build{seed}.example.com"],
        n_scripts=1,
        n_networks=1,
        sdk="qiskit",
        n_backends=1,
    )
    return RunawayCi(identity=identity, onset=horizon.start + timedelta(minutes=onset_minute))

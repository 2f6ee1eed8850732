"""Benign tenants of a shared quantum cloud: what normal use looks like.

Three kinds, each one API key:

- ``research_group``: a few people sharing a key, working-hours rhythm (UTC), quieter
  at weekends, several scripts, any circuit family, 100-8000 shots.
- ``variational_loop``: an optimiser driving a parameterised ansatz: bursts of many
  small jobs from one script for tens of minutes, then silence.
- ``ci_suite``: a test suite run every hour: a short burst of small circuits.

Two more kinds look like abuse at first sight and are drawn only on request
(:func:`lookalike_roster`), so the default deployment stays as it was:

- ``classroom``: dozens of new student keys running one notebook (one ``code_hash``
  across many keys) from a campus network, in lessons of an hour or two.
- ``benchmarking``: a few keys running campaigns of deep circuits at large shot counts.

Every benign key stays within :data:`MAX_BENIGN_JOBS_PER_MINUTE`; that ceiling is what
the abuse scenarios are measured against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Protocol

import numpy as np

from qabuse_dagster.simulation.circuits import select_circuits
from qabuse_dagster.simulation.jobs import (
    INSTRUMENTOR_VERSION,
    Horizon,
    JobBatch,
    TenantIdentity,
    sample_jobs,
    submit_times,
)
from qabuse_dagster.telemetry.hashing import KeyedHasher

__all__ = [
    "BENCHMARK_SHOTS",
    "MAX_BENIGN_JOBS_PER_MINUTE",
    "SDK_VERSIONS",
    "Benchmarking",
    "CiSuite",
    "ClassroomStudent",
    "ResearchGroup",
    "Tenant",
    "VariationalLoop",
    "benign_roster",
    "lookalike_roster",
    "make_identity",
    "working_hours_activity",
]

#: Most jobs a benign key submits in one minute.
MAX_BENIGN_JOBS_PER_MINUTE = 6

# Where each SDK submits: (provider, region, backends), and the SDK versions in use.
SDK_VERSIONS: dict[str, tuple[str, ...]] = {
    "qiskit": ("2.6.2", "2.5.1", "1.4.3"),
    "cirq": ("1.5.0", "1.4.1"),
    "pennylane": ("0.42.1", "0.41.1"),
}
_SDK_ENDPOINTS: dict[str, tuple[tuple[str, str, tuple[str, ...]], ...]] = {
    "qiskit": (
        ("ibm_quantum", "us-east", ("ibm_torino", "ibm_fez", "ibm_kingston", "ibm_brisbane")),
    ),
    "cirq": (("google_quantum_ai", "us-central1", ("willow_pink", "rainbow", "weber")),),
    "pennylane": (
        ("aws_braket", "us-east-1", ("sv1", "ionq_forte", "rigetti_ankaa_3")),
        ("ibm_quantum", "us-east", ("ibm_torino", "ibm_fez")),
    ),
}
_SDKS = ("qiskit", "cirq", "pennylane")
_SDK_WEIGHTS = np.array([0.6, 0.15, 0.25])
_COUNTRIES = ("US", "DE", "GB", "JP", "CA", "FR", "NL", "CH", "AU", "IN", "KR", "ES")
_RESEARCH_SHOTS = np.array([100, 256, 500, 1000, 1024, 2000, 4000, 4096, 8000])
_RESEARCH_SHOT_WEIGHTS = np.array([4, 3, 6, 12, 10, 6, 5, 3, 3], dtype=np.float64)
#: Shot counts of benchmarking campaigns, the largest any benign key uses.
BENCHMARK_SHOTS = np.array([10_000, 20_000, 50_000, 100_000])


class Tenant(Protocol):
    """One API key's behaviour over a horizon."""

    kind: ClassVar[str]

    @property
    def identity(self) -> TenantIdentity:
        """Who the tenant is in telemetry."""
        ...

    def generate(self, horizon: Horizon, rng: np.random.Generator) -> JobBatch:
        """The tenant's jobs in ``horizon``."""
        ...


def working_hours_activity(hour: np.ndarray, centre: float, width: float = 3.0) -> np.ndarray:
    """Relative activity over the UTC day: 1 at ``centre``, a floor of 0.05 at night.

    Args:
        hour: UTC hour of day, in [0, 24).
        centre: Hour of peak activity.
        width: Standard deviation of the daytime bump, in hours.

    Returns:
        Activity in [0.05, 1], same shape as ``hour``.
    """
    distance = np.abs(hour - centre)
    distance = np.minimum(distance, 24.0 - distance)
    return 0.05 + 0.95 * np.exp(-0.5 * (distance / width) ** 2)


def _synthetic_ip(rng: np.random.Generator, *, ipv6: bool) -> str:
    if ipv6:
        # 2001:db8::/32 is the documentation prefix; its /48s are distinct networks.
        site, subnet, host = (int(x) for x in rng.integers(1, 0xFFFF, size=3))
        return f"2001:db8:{site:x}:{subnet:x}::{host:x}"
    octets = [int(x) for x in rng.integers(1, 255, size=4)]
    octets[0] = int(rng.integers(11, 224))
    if octets[0] == 127:
        octets[0] = 128
    return ".".join(str(o) for o in octets)


def make_identity(
    hasher: KeyedHasher,
    rng: np.random.Generator,
    *,
    raw_api_key: str,
    raw_users: Sequence[str],
    n_scripts: int,
    n_networks: int = 1,
    sdk: str | None = None,
    ipv6: bool = False,
    n_backends: int | None = None,
) -> TenantIdentity:
    """Draw a tenant's SDK, provider, backends, scripts and networks, and hash its ids.

    Args:
        hasher: Keyed hasher for every identifier.
        rng: Source of randomness.
        raw_api_key: The synthetic API key id (hashed, never written).
        raw_users: Synthetic user ids (hashed, never written).
        n_scripts: How many distinct scripts the tenant runs.
        n_networks: How many networks it submits from.
        sdk: Force an SDK; drawn when None.
        ipv6: Whether its networks are IPv6.
        n_backends: How many backends it uses; 1-2 drawn when None.

    Returns:
        The hashed identity.
    """
    if sdk is None:
        sdk = _SDKS[int(rng.choice(len(_SDKS), p=_SDK_WEIGHTS))]
    versions = SDK_VERSIONS[sdk]
    version = versions[int(rng.integers(0, len(versions)))]
    endpoints = _SDK_ENDPOINTS[sdk]
    provider, region, all_backends = endpoints[int(rng.integers(0, len(endpoints)))]
    if n_backends is None:
        n_backends = int(rng.integers(1, 3))
    chosen = np.sort(rng.choice(len(all_backends), size=n_backends, replace=False))
    ips = [_synthetic_ip(rng, ipv6=ipv6) for _ in range(n_networks)]
    return TenantIdentity(
        api_key_id=hasher.hash(raw_api_key, domain="api_key"),
        users=tuple(hasher.hash(u, domain="user") for u in raw_users),
        provider=provider,
        region=region,
        backends=tuple(all_backends[int(i)] for i in chosen),
        sdk=sdk,
        sdk_version=version,
        client_agent=f"qabuse-{sdk}/{INSTRUMENTOR_VERSION} {sdk}/{version}",
        code_hashes=tuple(
            hasher.hash(f"{raw_api_key}/scripts/job_{i:02d}.py", domain="code")
            for i in range(n_scripts)
        ),
        source_ip_hashes=tuple(hasher.hash_network(ip) for ip in ips),
        country=_COUNTRIES[int(rng.integers(0, len(_COUNTRIES)))],
    )


def _poisson_per_minute(rate: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.minimum(rng.poisson(rate), MAX_BENIGN_JOBS_PER_MINUTE)


def _weekend_factor(horizon: Horizon, weekend: float) -> np.ndarray:
    return np.where(horizon.is_weekend(), weekend, 1.0)


@dataclass(frozen=True)
class ResearchGroup:
    """People sharing a key in working hours: varied scripts, circuits and shot counts.

    Attributes:
        identity: The group's key, members and environment.
        peak_rate: Jobs per minute at the daily peak.
        peak_hour: UTC hour of the peak.
        max_qubits: Widest circuit the group runs.
    """

    kind: ClassVar[str] = "research_group"
    identity: TenantIdentity
    peak_rate: float
    peak_hour: float
    max_qubits: int

    def generate(self, horizon: Horizon, rng: np.random.Generator) -> JobBatch:
        rate = (
            self.peak_rate
            * working_hours_activity(horizon.hour_of_day(), self.peak_hour)
            * _weekend_factor(horizon, 0.25)
        )
        submit_ms = submit_times(_poisson_per_minute(rate, rng), horizon, rng)
        n = len(submit_ms)
        circuits = select_circuits(max_qubits=self.max_qubits)
        # A few favourite scripts carry most of the work (Zipf-like).
        n_scripts = len(self.identity.code_hashes)
        script_weights = 1.0 / np.arange(1, n_scripts + 1)
        return sample_jobs(
            self.identity,
            rng,
            submit_ms=submit_ms,
            circuit=rng.choice(circuits, size=n),
            shots=rng.choice(
                _RESEARCH_SHOTS, size=n, p=_RESEARCH_SHOT_WEIGHTS / _RESEARCH_SHOT_WEIGHTS.sum()
            ),
            num_circuits=np.minimum(rng.geometric(0.35, size=n), 20),
            code_index=rng.choice(n_scripts, size=n, p=script_weights / script_weights.sum()),
            failure_rate=0.03,
        )


@dataclass(frozen=True)
class VariationalLoop:
    """An optimiser loop: sessions of steady small jobs from one script and one ansatz.

    Attributes:
        identity: The key, its one user and environment.
        session_starts_per_hour: Sessions begun per hour at the daily peak.
        peak_hour: UTC hour of the peak.
    """

    kind: ClassVar[str] = "variational_loop"
    identity: TenantIdentity
    session_starts_per_hour: float
    peak_hour: float

    def generate(self, horizon: Horizon, rng: np.random.Generator) -> JobBatch:
        n_minutes = horizon.n_minutes
        activity = working_hours_activity(horizon.hour_of_day(), self.peak_hour) * _weekend_factor(
            horizon, 0.5
        )
        starts = np.flatnonzero(
            rng.random(n_minutes) < activity * self.session_starts_per_hour / 60
        )
        n_sessions = len(starts)
        lengths = rng.integers(10, 46, size=n_sessions)
        ansatze = select_circuits(["hea", "qaoa_ring"], max_qubits=12)
        session_circuit = rng.choice(ansatze, size=n_sessions)
        session_rate = rng.uniform(2.0, 4.5, size=n_sessions)
        session_shots = rng.choice(np.array([1000, 2000, 4000]), size=n_sessions)
        # Parameter-shift gradients send 2 circuits per parameter batch; plain SPSA sends 1-2.
        session_circuits = rng.choice(np.array([1, 2, 4]), size=n_sessions)
        session_script = rng.integers(0, len(self.identity.code_hashes), size=n_sessions)

        # A later session takes over the minutes it overlaps: one optimiser at a time.
        session_of_minute = np.full(n_minutes, -1, dtype=np.int64)
        for s, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
            session_of_minute[start : start + length] = s
        in_session = session_of_minute >= 0
        background_rate = 0.02 * activity
        # Index -1 (no session) lands on an appended placeholder, masked out by np.where.
        rate = np.where(
            in_session, np.append(session_rate, 0.0)[session_of_minute], background_rate
        )

        counts = _poisson_per_minute(rate, rng)
        submit_ms = submit_times(counts, horizon, rng)
        n = len(submit_ms)
        job_minute = np.repeat(np.arange(n_minutes), counts)
        job_session = session_of_minute[job_minute]
        sessioned = job_session >= 0

        def per_job(session_value: np.ndarray, background: np.ndarray) -> np.ndarray:
            padded = np.append(session_value, session_value.dtype.type(0))
            return np.where(sessioned, padded[job_session], background)

        return sample_jobs(
            self.identity,
            rng,
            submit_ms=submit_ms,
            circuit=per_job(session_circuit, rng.choice(ansatze, size=n)),
            shots=per_job(session_shots, rng.choice(np.array([500, 1000, 2000]), size=n)),
            num_circuits=per_job(session_circuits, np.ones(n, dtype=np.int64)),
            code_index=per_job(
                session_script, rng.integers(0, len(self.identity.code_hashes), size=n)
            ),
            failure_rate=0.02,
        )


@dataclass(frozen=True)
class CiSuite:
    """A scheduled test suite: every hour, a short burst of small circuits.

    Attributes:
        identity: The key, its service account and environment.
        minute_of_hour: When in each hour the suite starts.
        burst_minutes: How long a run lasts.
        burst_rate: Jobs per minute during a run.
    """

    kind: ClassVar[str] = "ci_suite"
    identity: TenantIdentity
    minute_of_hour: int
    burst_minutes: int
    burst_rate: float

    def generate(self, horizon: Horizon, rng: np.random.Generator) -> JobBatch:
        minute_of_hour = (horizon.minute_ms() // 60_000) % 60
        in_burst = (minute_of_hour - self.minute_of_hour) % 60 < self.burst_minutes
        rate = np.where(in_burst, self.burst_rate, 0.0)
        submit_ms = submit_times(_poisson_per_minute(rate, rng), horizon, rng)
        n = len(submit_ms)
        return sample_jobs(
            self.identity,
            rng,
            submit_ms=submit_ms,
            circuit=rng.choice(select_circuits(["ghz", "qft", "random"], max_qubits=5), size=n),
            shots=rng.choice(np.array([100, 256, 512, 1024]), size=n),
            num_circuits=rng.choice(np.array([1, 2, 4]), size=n),
            code_index=rng.integers(0, len(self.identity.code_hashes), size=n),
            failure_rate=0.03,
        )


def benign_roster(hasher: KeyedHasher, rng: np.random.Generator, *, seed: int) -> list[Tenant]:
    """Draw the benign tenants of one simulated deployment: 8-14 API keys.

    Args:
        hasher: Keyed hasher for every identifier.
        rng: Source of randomness (the roster depends only on it).
        seed: The simulation seed; part of the synthetic raw ids.

    Returns:
        Research groups, then variational loops, then CI suites.
    """
    roster: list[Tenant] = []
    for g in range(int(rng.integers(4, 8))):
        n_members = int(rng.integers(1, 5))
        roster.append(
            ResearchGroup(
                identity=make_identity(
                    hasher,
                    rng,
                    raw_api_key=f"key-{seed}-research-{g:02d}",
                    raw_users=[
                        f"member{m}@group{g:02d}.uni{seed}.example.edu" for m in range(n_members)
                    ],
                    n_scripts=int(rng.integers(3, 9)),
                    n_networks=int(rng.integers(1, 3)),
                ),
                peak_rate=float(rng.uniform(1.0, 3.0)),
                peak_hour=float(rng.uniform(12.0, 14.5)),
                max_qubits=int(rng.choice(np.array([12, 16, 20]))),
            )
        )
    for v in range(int(rng.integers(2, 5))):
        roster.append(
            VariationalLoop(
                identity=make_identity(
                    hasher,
                    rng,
                    raw_api_key=f"key-{seed}-vqe-{v:02d}",
                    raw_users=[f"optimiser{v}@lab{seed}.example.org"],
                    n_scripts=int(rng.integers(1, 3)),
                    ipv6=bool(rng.random() < 0.5),
                ),
                session_starts_per_hour=float(rng.uniform(0.6, 1.5)),
                peak_hour=float(rng.uniform(11.0, 15.0)),
            )
        )
    for c in range(int(rng.integers(2, 4))):
        roster.append(
            CiSuite(
                identity=make_identity(
                    hasher,
                    rng,
                    raw_api_key=f"key-{seed}-ci-{c:02d}",
                    raw_users=[f"ci-bot-{c}@build{seed}.example.com"],
                    n_scripts=int(rng.integers(3, 7)),
                    n_backends=1,
                ),
                minute_of_hour=int(rng.integers(0, 60)),
                burst_minutes=int(rng.integers(2, 5)),
                burst_rate=float(rng.uniform(3.0, 5.0)),
            )
        )
    return roster


@dataclass(frozen=True)
class ClassroomStudent:
    """One student of a class: the shared notebook, run cell by cell during lessons.

    Attributes:
        identity: The student's own new key; the notebook's script and the campus network
            are the class's, shared by every student.
        weekdays: Days the class meets (Monday is 0).
        lesson_start_minute: Minute of the UTC day the lesson starts.
        lesson_minutes: Length of a lesson.
        join_delay_minutes: How late this student starts running cells.
        rate: Jobs per minute while working through the notebook.
    """

    kind: ClassVar[str] = "classroom"
    identity: TenantIdentity
    weekdays: tuple[int, ...]
    lesson_start_minute: int
    lesson_minutes: int
    join_delay_minutes: int
    rate: float

    def generate(self, horizon: Horizon, rng: np.random.Generator) -> JobBatch:
        minute = horizon.minute_ms() // 60_000
        # 1970-01-01 was a Thursday: weekday 3 with Monday as 0.
        weekday = (minute // 1440 + 3) % 7
        into_lesson = minute % 1440 - self.lesson_start_minute
        in_lesson = (
            np.isin(weekday, self.weekdays)
            & (into_lesson >= self.join_delay_minutes)
            & (into_lesson < self.lesson_minutes)
        )
        rate = np.where(in_lesson, self.rate, 0.0)
        submit_ms = submit_times(_poisson_per_minute(rate, rng), horizon, rng)
        n = len(submit_ms)
        return sample_jobs(
            self.identity,
            rng,
            submit_ms=submit_ms,
            circuit=rng.choice(select_circuits(["ghz", "qft", "hea"], max_qubits=5), size=n),
            shots=np.full(n, 1024, dtype=np.int64),
            num_circuits=np.ones(n, dtype=np.int64),
            code_index=np.zeros(n, dtype=np.int64),
            # Students make mistakes.
            failure_rate=0.08,
        )


@dataclass(frozen=True)
class Benchmarking:
    """A benchmarking campaign key: hours of deep, wide circuits at large shot counts.

    Attributes:
        identity: The key, its team and environment.
        campaigns_per_day: Campaigns started per day, at any hour.
        campaign_hours: Length of a campaign.
        rate: Jobs per minute during a campaign.
    """

    kind: ClassVar[str] = "benchmarking"
    identity: TenantIdentity
    campaigns_per_day: float
    campaign_hours: float
    rate: float

    def generate(self, horizon: Horizon, rng: np.random.Generator) -> JobBatch:
        n_minutes = horizon.n_minutes
        starts = np.flatnonzero(rng.random(n_minutes) < self.campaigns_per_day / 1440)
        active = np.zeros(n_minutes, dtype=bool)
        length = round(self.campaign_hours * 60)
        for start in starts.tolist():
            active[start : start + length] = True
        rate = np.where(active, self.rate, 0.0)
        submit_ms = submit_times(_poisson_per_minute(rate, rng), horizon, rng)
        n = len(submit_ms)
        return sample_jobs(
            self.identity,
            rng,
            submit_ms=submit_ms,
            circuit=rng.choice(select_circuits(min_qubits=12), size=n),
            shots=rng.choice(BENCHMARK_SHOTS, size=n),
            num_circuits=rng.integers(1, 11, size=n),
            code_index=rng.integers(0, len(self.identity.code_hashes), size=n),
            failure_rate=0.02,
        )


def lookalike_roster(hasher: KeyedHasher, rng: np.random.Generator, *, seed: int) -> list[Tenant]:
    """Draw the benign look-alikes: two classes of 20-45 students and 2-3 benchmark keys.

    The first class meets every weekday, the second on two weekdays; lessons last one
    to two hours in the (European) working day.

    Args:
        hasher: Keyed hasher for every identifier.
        rng: Source of randomness (the roster depends only on it).
        seed: The simulation seed; part of the synthetic raw ids.

    Returns:
        Classroom students, then benchmarking keys.
    """
    roster: list[Tenant] = []
    for c in range(2):
        weekdays = (
            (0, 1, 2, 3, 4)
            if c == 0
            else tuple(sorted(int(d) for d in rng.choice(5, size=2, replace=False)))
        )
        notebook = hasher.hash(f"course{c}.uni{seed}.example.edu/lesson.ipynb", domain="code")
        campus = make_identity(
            hasher,
            rng,
            raw_api_key=f"key-{seed}-course{c}-teacher",
            raw_users=[f"teacher@course{c}.uni{seed}.example.edu"],
            n_scripts=1,
            n_networks=1,
            sdk="qiskit",
            n_backends=1,
        )
        lesson_start_minute = int(rng.integers(8 * 60, 15 * 60))
        lesson_minutes = int(rng.integers(60, 121))
        for s in range(int(rng.integers(20, 46))):
            raw_key = f"key-{seed}-course{c}-student{s:02d}"
            student = replace(
                campus,
                api_key_id=hasher.hash(raw_key, domain="api_key"),
                users=(
                    hasher.hash(f"student{s:02d}@course{c}.uni{seed}.example.edu", domain="user"),
                ),
                code_hashes=(notebook,),
            )
            roster.append(
                ClassroomStudent(
                    identity=student,
                    weekdays=weekdays,
                    lesson_start_minute=lesson_start_minute,
                    lesson_minutes=lesson_minutes,
                    join_delay_minutes=int(rng.integers(0, 11)),
                    rate=float(rng.uniform(0.3, 1.2)),
                )
            )
    for b in range(int(rng.integers(2, 4))):
        roster.append(
            Benchmarking(
                identity=make_identity(
                    hasher,
                    rng,
                    raw_api_key=f"key-{seed}-bench-{b:02d}",
                    raw_users=[f"bench{b}@hpc{seed}.example.org"],
                    n_scripts=int(rng.integers(1, 4)),
                ),
                campaigns_per_day=float(rng.uniform(1.0, 3.0)),
                campaign_hours=float(rng.uniform(1.0, 4.0)),
                rate=float(rng.uniform(0.5, 2.0)),
            )
        )
    return roster

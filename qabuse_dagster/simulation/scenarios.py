"""Abuse scenarios: an abusive actor's behaviour and the incident labels it earns.

``runaway_ci`` is the reference incident: a CI pipeline stuck in a retry loop that
hammers the API with thousands of tiny jobs from one script, one agent and one network
until someone notices (by default: until the end of the horizon).

The library (:data:`SCENARIOS`, name to factory) holds one :class:`AbuseScenario` per
kind of abuse: ``runaway_ci``, ``credential_stuffing``, ``key_leak``, ``credit_drain``,
``coordinated_botnet``, ``quota_farming`` and ``low_and_slow``. A new scenario plugs in
with :func:`register_scenario`, without touching the others.

Example:
    >>> scenario = SCENARIOS["credit_drain"](intensity=2.0, stealth=0.5)
    >>> scenario.kind
    'credit_drain'
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import ClassVar

import numpy as np

from qabuse_dagster.simulation.circuits import select_circuits
from qabuse_dagster.simulation.jobs import (
    MINUTE_MS,
    Horizon,
    JobBatch,
    TenantIdentity,
    epoch_ms,
    pick_column,
    reject,
    sample_jobs,
    submit_times,
)
from qabuse_dagster.simulation.shifts import SHIFTS
from qabuse_dagster.simulation.tenants import SDK_VERSIONS, Tenant, make_identity
from qabuse_dagster.telemetry.hashing import KeyedHasher
from qabuse_dagster.telemetry.labels import IncidentLabel

__all__ = [
    "CLEAN_HISTORY_FRACTION",
    "QUOTA_JOBS_PER_KEY_PER_DAY",
    "RUNAWAY_CI_ONSET_FRACTION",
    "SCENARIOS",
    "AbuseScenario",
    "CoordinatedBotnet",
    "CredentialStuffing",
    "CreditDrain",
    "IncidentWindow",
    "KeyLeak",
    "LowAndSlow",
    "QuotaFarming",
    "RunawayCi",
    "RunawayCiScenario",
    "ScenarioContext",
    "ScenarioFactory",
    "ScenarioJobs",
    "place_incidents",
    "register_scenario",
    "resolve_scenarios",
    "runaway_ci",
]

#: Where in the horizon the runaway CI starts.
RUNAWAY_CI_ONSET_FRACTION = 0.7


@dataclass(frozen=True)
class RunawayCi:
    """A CI job in a submit loop: 30-90 tiny-shot jobs a minute from one script.

    Attributes:
        identity: Its dedicated key and user, one agent, one script, one network.
        onset: First minute of the loop.
        end: When someone stops it; the end of the horizon when None.
        incident_id: Name of its label.
        min_rate: Fewest jobs per minute (expected).
        max_rate: Most jobs per minute (expected).
    """

    kind: ClassVar[str] = "runaway_ci"
    identity: TenantIdentity
    onset: datetime
    end: datetime | None = None
    incident_id: str = "runaway-ci-1"
    min_rate: float = 30.0
    max_rate: float = 90.0

    def generate(self, horizon: Horizon, rng: np.random.Generator) -> JobBatch:
        onset_minute = horizon.minute_at(self.onset)
        minutes = np.arange(horizon.n_minutes)
        active = minutes >= onset_minute
        if self.end is not None:
            active &= minutes < horizon.minute_at(self.end)
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
        """The incident covering this tenant's key from onset to its end (or ``horizon``'s)."""
        return IncidentLabel(
            incident_id=self.incident_id,
            kind=self.kind,
            start=self.onset,
            end=horizon.end if self.end is None else self.end,
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


# --- The scenario library ------------------------------------------------------------
#
# Every scenario below is a frozen dataclass with three knobs: ``intensity`` scales its
# volume (jobs, keys, networks), ``duration`` is its length (a fraction of the horizon
# or a timedelta) and ``stealth`` in [0, 1] moves it towards benign use (slower, smaller,
# noisier). The twin places each one in a window of the horizon, calls ``generate`` for
# its jobs and ``label`` for its ground truth.

#: Most jobs a quota-farming account may submit per day; farms stay just under it.
QUOTA_JOBS_PER_KEY_PER_DAY = 200
#: Fraction of the horizon kept free of scripted incidents: the clean training history.
CLEAN_HISTORY_FRACTION = 0.5


@dataclass(frozen=True)
class IncidentWindow:
    """Where the twin placed one incident: ``[start, end)`` in whole minutes.

    Attributes:
        incident_id: Name of the incident's label.
        start: Onset.
        end: When it stops.
    """

    incident_id: str
    start: datetime
    end: datetime


@dataclass(frozen=True)
class ScenarioContext:
    """What a scenario may draw on besides its own randomness.

    Attributes:
        hasher: Keyed hasher for every identifier.
        seed: The simulation seed; part of the synthetic raw ids.
        horizon: The simulated period.
        tenants: The benign deployment (a leak takes over one of its keys).
    """

    hasher: KeyedHasher
    seed: int
    horizon: Horizon
    tenants: tuple[Tenant, ...]


@dataclass(frozen=True)
class ScenarioJobs:
    """The jobs of one incident and the actors who submitted them.

    Attributes:
        jobs: The incident's jobs (submissions inside its window).
        new_api_keys: Keys the incident brought into the deployment, to tenant kind.
        api_key_ids: Keys its label names.
        users: Users its label names, when the incident is about accounts.
    """

    jobs: JobBatch
    new_api_keys: dict[str, str]
    api_key_ids: tuple[str, ...]
    users: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class AbuseScenario(ABC):
    """An abuse scenario: its knobs, its jobs inside a window and its incident labels.

    Attributes:
        intensity: Volume multiplier (jobs, keys, networks); 1 is the reference.
        duration: Length: a fraction of the horizon in (0, 1], or a timedelta.
        stealth: 0 is blatant; 1 is as close to benign use as the scenario can get.
    """

    kind: ClassVar[str]
    notes: ClassVar[str]
    intensity: float = 1.0
    duration: float | timedelta = timedelta(hours=2)
    stealth: float = 0.0

    def __post_init__(self) -> None:
        if not self.intensity > 0:
            raise ValueError(f"intensity must be positive, got {self.intensity}")
        if not 0.0 <= self.stealth <= 1.0:
            raise ValueError(f"stealth must lie in [0, 1], got {self.stealth}")
        if isinstance(self.duration, timedelta):
            if self.duration <= timedelta(0):
                raise ValueError(f"duration must be positive, got {self.duration}")
        elif not 0.0 < self.duration <= 1.0:
            raise ValueError(f"a duration fraction must lie in (0, 1], got {self.duration}")

    def length(self, horizon: Horizon) -> timedelta:
        """The requested length of the incident within ``horizon``."""
        if isinstance(self.duration, timedelta):
            return self.duration
        return self.duration * (horizon.end - horizon.start)

    @abstractmethod
    def generate(
        self, window: IncidentWindow, context: ScenarioContext, rng: np.random.Generator
    ) -> ScenarioJobs:
        """The incident's jobs, submitted inside ``window``."""

    def label(self, window: IncidentWindow, generated: ScenarioJobs) -> list[IncidentLabel]:
        """Ground truth: the incident's keys (and users) over ``window``."""
        return [
            IncidentLabel(
                incident_id=window.incident_id,
                kind=self.kind,
                start=window.start,
                end=window.end,
                api_key_ids=generated.api_key_ids or None,
                users=generated.users or None,
                notes=self.notes,
            )
        ]

    def _scaled(self, base: float, *, stealthy: float) -> float:
        """``base`` x intensity, moved linearly towards ``base * stealthy`` by stealth."""
        return base * self.intensity * (1.0 + (stealthy - 1.0) * self.stealth)


#: A factory builds a scenario from its knobs (``intensity``, ``duration``, ``stealth``).
ScenarioFactory = Callable[..., AbuseScenario]

#: Registered scenarios by name, in registration order (the order of ``["all"]``).
SCENARIOS: dict[str, ScenarioFactory] = {}


def register_scenario(name: str, factory: ScenarioFactory) -> ScenarioFactory:
    """Add a scenario to the library under ``name``; other scenarios are untouched.

    Args:
        name: What ``simulate(scenarios=[...])`` calls it; not ``all``.
        factory: Builds the scenario from keyword knobs; a scenario class will do.

    Returns:
        ``factory``, so this can decorate a class.

    Raises:
        ValueError: If ``name`` is taken or reserved.
    """
    if name in ("all", "reference") or name in SCENARIOS or name in SHIFTS:
        raise ValueError(f"scenario name {name!r} is already taken")
    SCENARIOS[name] = factory
    return factory


def resolve_scenarios(names: Sequence[str]) -> list[str]:
    """Expand ``all`` and check every name against the registry.

    Args:
        names: Scenario names, or ``["all"]`` for every registered abuse scenario. The
            names of population shifts (`qabuse_dagster.simulation.shifts.SHIFTS`) are
            accepted too; ``all`` leaves them out, as they change the benign deployment.

    Returns:
        The names to run, in order.

    Raises:
        ValueError: A name is not registered; the message lists the known ones.
    """
    if isinstance(names, str):
        raise TypeError("scenarios must be a sequence of names, not one string")
    resolved: list[str] = []
    for name in names:
        if name == "all":
            resolved.extend(SCENARIOS)
        elif name in SCENARIOS or name in SHIFTS:
            resolved.append(name)
        else:
            known = ", ".join(["all", *SCENARIOS, *SHIFTS])
            raise ValueError(f"unknown scenario {name!r}; known: {known}")
    return resolved


def place_incidents(
    names: Sequence[str], lengths: Sequence[timedelta], horizon: Horizon
) -> list[IncidentWindow]:
    """Lay incidents end to end, apart, after the clean first half of ``horizon``.

    Requested lengths are shrunk in proportion when together they would fill more than
    90% of the second half; the rest is spread as equal gaps before each incident.

    Args:
        names: Scenario name of each incident (for its ``incident_id``).
        lengths: Requested length of each incident.
        horizon: The simulated period.

    Returns:
        One window per incident, in order, in whole minutes, not overlapping.

    Raises:
        ValueError: If the second half has fewer minutes than there are incidents.
    """
    n = len(names)
    if n == 0:
        return []
    first = math.ceil(CLEAN_HISTORY_FRACTION * horizon.n_minutes)
    available = (horizon.end_ms - horizon.start_ms) // MINUTE_MS - first
    if available < 2 * n:
        raise ValueError(
            f"the horizon's second half ({available} min) is too short for {n} incidents"
        )
    wanted = [max(1.0, length / timedelta(minutes=1)) for length in lengths]
    scale = min(1.0, 0.9 * available / sum(wanted))
    minutes = [max(1, math.floor(w * scale)) for w in wanted]
    gap = (available - sum(minutes)) // n
    windows: list[IncidentWindow] = []
    seen: dict[str, int] = {}
    cursor = first
    for name, length in zip(names, minutes, strict=True):
        seen[name] = seen.get(name, 0) + 1
        cursor += gap
        windows.append(
            IncidentWindow(
                incident_id=f"{name.replace('_', '-')}-{seen[name]}",
                start=horizon.start + timedelta(minutes=cursor),
                end=horizon.start + timedelta(minutes=cursor + length),
            )
        )
        cursor += length
    return windows


def _window_counts(
    window: IncidentWindow, horizon: Horizon, rate: np.ndarray | float, rng: np.random.Generator
) -> np.ndarray:
    """Poisson job counts per horizon minute, ``rate`` inside ``window`` and 0 outside."""
    minutes = np.arange(horizon.n_minutes)
    inside = (minutes >= horizon.minute_at(window.start)) & (
        minutes < horizon.minute_at(window.end)
    )
    return rng.poisson(np.where(inside, rate, 0.0))


def _window_ms(window: IncidentWindow) -> tuple[int, int]:
    return epoch_ms(window.start), epoch_ms(window.end)


def _with_columns(jobs: JobBatch, **columns: np.ndarray) -> JobBatch:
    return dataclasses.replace(jobs, **columns)


def _attacker(
    context: ScenarioContext,
    rng: np.random.Generator,
    window: IncidentWindow,
    *,
    tag: str,
    n_networks: int = 1,
    n_scripts: int = 1,
) -> TenantIdentity:
    return make_identity(
        context.hasher,
        rng,
        raw_api_key=f"key-{context.seed}-{window.incident_id}-{tag}",
        raw_users=[f"{tag}@{window.incident_id}.seed{context.seed}.example.net"],
        n_scripts=n_scripts,
        n_networks=n_networks,
    )


@dataclass(frozen=True, kw_only=True)
class RunawayCiScenario(AbuseScenario):
    """:class:`RunawayCi` in a window: 30-90 tiny jobs a minute, 9-27 at full stealth."""

    kind: ClassVar[str] = "runaway_ci"
    notes: ClassVar[str] = (
        "CI pipeline in a submit loop: tiny-shot jobs many times a minute from one "
        "script, one client agent and one network."
    )
    duration: float | timedelta = timedelta(hours=4)

    def generate(
        self, window: IncidentWindow, context: ScenarioContext, rng: np.random.Generator
    ) -> ScenarioJobs:
        identity = make_identity(
            context.hasher,
            rng,
            raw_api_key=f"key-{context.seed}-{window.incident_id}",
            raw_users=[f"ci-runner@{window.incident_id}.build{context.seed}.example.com"],
            n_scripts=1,
            n_networks=1,
            sdk="qiskit",
            n_backends=1,
        )
        loop = RunawayCi(
            identity=identity,
            onset=window.start,
            end=window.end,
            incident_id=window.incident_id,
            min_rate=self._scaled(30.0, stealthy=0.3),
            max_rate=self._scaled(90.0, stealthy=0.3),
        )
        key = identity.api_key_id
        return ScenarioJobs(
            jobs=loop.generate(context.horizon, rng),
            new_api_keys={key: self.kind},
            api_key_ids=(key,),
        )


@dataclass(frozen=True, kw_only=True)
class CredentialStuffing(AbuseScenario):
    """Bursts of logins with stolen keys: mostly ``rejected``/``auth_failed``, few networks.

    Every few minutes a burst of attempts cycles through a list of a few hundred keys from
    one to three networks; about 3% of the keys are still valid and their jobs run.
    """

    kind: ClassVar[str] = "credential_stuffing"
    notes: ClassVar[str] = (
        "Credential stuffing: bursts of submissions with stolen API keys from at most three "
        "networks; nearly all rejected with auth_failed, a few keys still valid."
    )
    duration: float | timedelta = timedelta(hours=2)

    def generate(
        self, window: IncidentWindow, context: ScenarioContext, rng: np.random.Generator
    ) -> ScenarioJobs:
        horizon = context.horizon
        n_keys = max(20, round(300 * self.intensity))
        attacker = _attacker(
            context, rng, window, tag="stuffer", n_networks=1 + round(2 * self.stealth)
        )
        # Bursts of 2 minutes every 10 (blatant) to 30 (stealthy) minutes.
        period = round(10 + 20 * self.stealth)
        minute_of_window = np.arange(horizon.n_minutes) - horizon.minute_at(window.start)
        in_burst = minute_of_window % period < 2
        rate = np.where(in_burst, self._scaled(150.0, stealthy=0.2), 0.0)
        submit_ms = submit_times(_window_counts(window, horizon, rate, rng), horizon, rng)
        n = len(submit_ms)
        jobs = sample_jobs(
            attacker,
            rng,
            submit_ms=submit_ms,
            circuit=rng.choice(select_circuits(["ghz", "random"], max_qubits=5), size=n),
            shots=rng.choice(np.array([100, 1000, 4000]), size=n),
            num_circuits=np.ones(n, dtype=np.int64),
            code_index=np.zeros(n, dtype=np.int64),
            failure_rate=0.0,
        )
        raw = [f"stolen-{context.seed}-{window.incident_id}-{k:04d}" for k in range(n_keys)]
        keys = [context.hasher.hash(r, domain="api_key") for r in raw]
        users = [context.hasher.hash(f"{r}@victims.example.com", domain="user") for r in raw]
        valid = rng.random(n_keys) < 0.03
        tried = rng.integers(0, n_keys, size=n)
        jobs = _with_columns(
            jobs, api_key_id=pick_column(keys, tried), user=pick_column(users, tried)
        )
        jobs = reject(jobs, ~valid[tried], "auth_failed")
        used = sorted(set(jobs.api_key_id.tolist()))
        return ScenarioJobs(
            jobs=jobs, new_api_keys=dict.fromkeys(used, self.kind), api_key_ids=tuple(used)
        )


@dataclass(frozen=True, kw_only=True)
class KeyLeak(AbuseScenario):
    """A research group's key leaks: strangers use it from many networks and agents.

    The group keeps working as before; on top, 12-40 networks and several client agents
    (other instrumentor and SDK versions) submit with its key from the onset.
    """

    kind: ClassVar[str] = "key_leak"
    notes: ClassVar[str] = (
        "Leaked API key: from the onset an existing key is also used from many networks "
        "and client agents that never used it before."
    )
    duration: float | timedelta = timedelta(hours=8)

    def generate(
        self, window: IncidentWindow, context: ScenarioContext, rng: np.random.Generator
    ) -> ScenarioJobs:
        victims = [t for t in context.tenants if t.kind == "research_group"] or list(
            context.tenants
        )
        if not victims:
            raise ValueError("a key leak needs a benign tenant whose key can leak")
        victim = victims[int(rng.integers(0, len(victims)))].identity
        n_networks = max(12, round(self._scaled(40.0, stealthy=0.3)))
        strangers = make_identity(
            context.hasher,
            rng,
            raw_api_key=f"key-{context.seed}-{window.incident_id}-strangers",
            raw_users=[f"strangers@{window.incident_id}.seed{context.seed}.example.net"],
            n_scripts=8,
            n_networks=n_networks,
            sdk=victim.sdk,
        )
        leaked = dataclasses.replace(
            victim,
            code_hashes=strangers.code_hashes,
            source_ip_hashes=strangers.source_ip_hashes,
        )
        horizon = context.horizon
        counts = _window_counts(window, horizon, self._scaled(3.0, stealthy=0.3), rng)
        submit_ms = submit_times(counts, horizon, rng)
        n = len(submit_ms)
        jobs = sample_jobs(
            leaked,
            rng,
            submit_ms=submit_ms,
            circuit=rng.choice(select_circuits(max_qubits=20), size=n),
            shots=rng.choice(np.array([1000, 4000, 8000]), size=n),
            num_circuits=rng.integers(1, 6, size=n),
            code_index=rng.integers(0, len(leaked.code_hashes), size=n),
            failure_rate=0.05,
        )
        versions = ("0.0.8", "0.0.9", "0.1.0")
        sdk_versions = SDK_VERSIONS[victim.sdk]
        agents = [(v, s) for v in versions for s in sdk_versions]
        agent = rng.integers(0, len(agents), size=n)
        jobs = _with_columns(
            jobs,
            client_agent=pick_column(
                [f"qabuse-{victim.sdk}/{v} {victim.sdk}/{s}" for v, s in agents], agent
            ),
            sdk_version=pick_column([s for _, s in agents], agent),
        )
        return ScenarioJobs(jobs=jobs, new_api_keys={}, api_key_ids=(victim.api_key_id,))


@dataclass(frozen=True, kw_only=True)
class CreditDrain(AbuseScenario):
    """One key burns credits: millions of shots of the deepest circuits, many per job."""

    kind: ClassVar[str] = "credit_drain"
    notes: ClassVar[str] = (
        "Credit drain: one key submits the deepest circuits at millions of shots per circuit."
    )
    duration: float | timedelta = timedelta(hours=3)

    def generate(
        self, window: IncidentWindow, context: ScenarioContext, rng: np.random.Generator
    ) -> ScenarioJobs:
        identity = _attacker(context, rng, window, tag="drainer")
        horizon = context.horizon
        counts = _window_counts(window, horizon, self._scaled(0.5, stealthy=0.4), rng)
        submit_ms = submit_times(counts, horizon, rng)
        n = len(submit_ms)
        low = round(1_000_000 * (1.0 - 0.8 * self.stealth))
        deepest = select_circuits(["qft", "qaoa_ring"], min_qubits=16)
        jobs = sample_jobs(
            identity,
            rng,
            submit_ms=submit_ms,
            circuit=rng.choice(deepest, size=n),
            shots=rng.integers(low, 5 * low + 1, size=n),
            num_circuits=rng.integers(1, 6, size=n),
            code_index=np.zeros(n, dtype=np.int64),
            failure_rate=0.02,
        )
        key = identity.api_key_id
        return ScenarioJobs(jobs=jobs, new_api_keys={key: self.kind}, api_key_ids=(key,))


@dataclass(frozen=True, kw_only=True)
class CoordinatedBotnet(AbuseScenario):
    """Dozens of fresh accounts run one script in lockstep, each from its own network.

    Every few minutes all bots submit within seconds of each other (jitter up to 2 s,
    30 s at full stealth), each with its own new key and user.
    """

    kind: ClassVar[str] = "coordinated_botnet"
    notes: ClassVar[str] = (
        "Coordinated botnet: many new accounts and keys running one script (one code_hash) "
        "in synchronised waves from many networks."
    )
    duration: float | timedelta = timedelta(hours=3)

    def generate(
        self, window: IncidentWindow, context: ScenarioContext, rng: np.random.Generator
    ) -> ScenarioJobs:
        n_bots = max(10, round(30 * self.intensity))
        template = _attacker(context, rng, window, tag="bot", n_networks=n_bots)
        raw = [f"bot{b:03d}-{window.incident_id}-{context.seed}" for b in range(n_bots)]
        keys = [context.hasher.hash(r, domain="api_key") for r in raw]
        users = [context.hasher.hash(f"{r}@mail.example.net", domain="user") for r in raw]
        start_ms, end_ms = _window_ms(window)
        period_ms = round((5 + 10 * self.stealth) * MINUTE_MS)
        waves = np.arange(start_ms, end_ms, period_ms, dtype=np.int64)
        joins = rng.random((len(waves), n_bots)) < 1.0 - 0.3 * self.stealth
        wave, bot = np.nonzero(joins)
        jitter_ms = round(2_000 + 28_000 * self.stealth)
        submit_ms = waves[wave] + rng.integers(0, jitter_ms, size=len(wave))
        keep = submit_ms < end_ms
        submit_ms, bot = submit_ms[keep], bot[keep]
        n = len(submit_ms)
        script = select_circuits(["random"], min_qubits=8, max_qubits=8)[0]
        jobs = sample_jobs(
            template,
            rng,
            submit_ms=submit_ms,
            circuit=np.full(n, script, dtype=np.int64),
            shots=np.full(n, 4000, dtype=np.int64),
            num_circuits=np.full(n, 2, dtype=np.int64),
            code_index=np.zeros(n, dtype=np.int64),
            failure_rate=0.02,
        )
        jobs = _with_columns(
            jobs,
            api_key_id=pick_column(keys, bot),
            user=pick_column(users, bot),
            source_ip_hash=pick_column(template.source_ip_hashes, bot),
        )
        used = sorted(set(jobs.api_key_id.tolist()))
        used_users = sorted(set(jobs.user.tolist()))
        return ScenarioJobs(
            jobs=jobs,
            new_api_keys=dict.fromkeys(used, self.kind),
            api_key_ids=tuple(used),
            users=tuple(used_users),
        )


@dataclass(frozen=True, kw_only=True)
class QuotaFarming(AbuseScenario):
    """Many accounts each submit just under the daily per-key quota.

    Each account submits 95-99.5% of :data:`QUOTA_JOBS_PER_KEY_PER_DAY` per day of the
    window (80-90% at full stealth), spread over the day, from its own network.
    """

    kind: ClassVar[str] = "quota_farming"
    notes: ClassVar[str] = (
        "Quota farming: many accounts, each submitting just under the per-key daily quota."
    )
    duration: float | timedelta = timedelta(hours=24)

    def generate(
        self, window: IncidentWindow, context: ScenarioContext, rng: np.random.Generator
    ) -> ScenarioJobs:
        n_accounts = max(5, round(15 * self.intensity))
        start_ms, end_ms = _window_ms(window)
        day_ms = 1440 * MINUTE_MS
        low, high = 0.95 - 0.15 * self.stealth, 0.995 - 0.095 * self.stealth
        batches: list[JobBatch] = []
        keys: list[str] = []
        for a in range(n_accounts):
            identity = _attacker(context, rng, window, tag=f"farm{a:03d}", n_scripts=2)
            keys.append(identity.api_key_id)
            times: list[np.ndarray] = []
            for day_start in range(start_ms, end_ms, day_ms):
                day_end = min(day_start + day_ms, end_ms)
                share = (day_end - day_start) / day_ms
                count = math.floor(QUOTA_JOBS_PER_KEY_PER_DAY * share * rng.uniform(low, high))
                times.append(np.sort(rng.integers(day_start, day_end, size=count)))
            submit_ms = np.concatenate(times).astype(np.int64)
            n = len(submit_ms)
            batches.append(
                sample_jobs(
                    identity,
                    rng,
                    submit_ms=submit_ms,
                    circuit=rng.choice(select_circuits(["hea", "qaoa_ring"]), size=n),
                    shots=rng.choice(np.array([4000, 8000]), size=n),
                    num_circuits=rng.integers(1, 4, size=n),
                    code_index=rng.integers(0, 2, size=n),
                    failure_rate=0.02,
                )
            )
        return ScenarioJobs(
            jobs=JobBatch.concat(batches),
            new_api_keys=dict.fromkeys(keys, self.kind),
            api_key_ids=tuple(keys),
        )


@dataclass(frozen=True, kw_only=True)
class LowAndSlow(AbuseScenario):
    """One key polls around the clock at a low, steady rate: every 4 minutes (8 stealthy)."""

    kind: ClassVar[str] = "low_and_slow"
    notes: ClassVar[str] = (
        "Low-and-slow polling: one key submitting tiny jobs at a steady low rate, day and "
        "night, never sleeping."
    )
    duration: float | timedelta = timedelta(hours=24)

    def generate(
        self, window: IncidentWindow, context: ScenarioContext, rng: np.random.Generator
    ) -> ScenarioJobs:
        identity = _attacker(context, rng, window, tag="poller")
        start_ms, end_ms = _window_ms(window)
        interval_ms = round(4 * MINUTE_MS * (1.0 + self.stealth) / self.intensity)
        ticks = np.arange(start_ms, end_ms, interval_ms, dtype=np.int64)
        # Jitter of up to a fifth of the interval (half at full stealth), never past the end.
        jitter = round(interval_ms * (0.2 + 0.3 * self.stealth))
        submit_ms = np.minimum(ticks + rng.integers(0, jitter + 1, size=len(ticks)), end_ms - 1)
        n = len(submit_ms)
        smallest_ghz = select_circuits(["ghz"], max_qubits=3)[0]
        jobs = sample_jobs(
            identity,
            rng,
            submit_ms=submit_ms,
            circuit=np.full(n, smallest_ghz, dtype=np.int64),
            shots=np.full(n, 100, dtype=np.int64),
            num_circuits=np.ones(n, dtype=np.int64),
            code_index=np.zeros(n, dtype=np.int64),
            failure_rate=0.01,
        )
        key = identity.api_key_id
        return ScenarioJobs(jobs=jobs, new_api_keys={key: self.kind}, api_key_ids=(key,))


for _scenario in (
    RunawayCiScenario,
    CredentialStuffing,
    KeyLeak,
    CreditDrain,
    CoordinatedBotnet,
    QuotaFarming,
    LowAndSlow,
):
    register_scenario(_scenario.kind, _scenario)

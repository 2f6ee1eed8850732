"""Closed-loop backtest: the twin rerun with qabuse mitigating, against the same twin without.

`closed_loop_backtest` rebuilds the twin a manifest describes, fits every detector
family and the ensemble champion on its history through the production functions
(`qabuse_dagster.evaluation.families`), then runs the evaluation part twice: once as
planned (nobody intervenes) and once with `DetectorController` (the champion's alerts
through a `MitigationPolicy`) deciding throttles, challenges and revocations while the
twin runs. A key is rescored on its own mitigated jobs by the families that read one
key (rows, sequences); the families that read other entities (user rows, the campaign
graph) keep their scores of the unmitigated twin. It reports what operators care about:

* legitimate users' queue wait (mean, p50, p95, p99) with and without qabuse, overall
  and during each incident;
* per incident: how long after onset the abusers' jobs kept running on the backends,
  and the backend time they consumed, with and without;
* the cost to legitimate users: their refused submissions, jobs that never ran, and
  keys that were mitigated.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa

from models.base import score_floor
from models.registry import get_family
from qabuse_dagster.evaluation.backtest import time_cutoff
from qabuse_dagster.evaluation.families import (
    ENSEMBLE,
    KEY_COLUMNS,
    TrainedDetectors,
    TrainingParams,
    detector_inputs,
    resolve_names,
    score_families,
    train_then_score,
)
from qabuse_dagster.response.decisions import Action, Decision
from qabuse_dagster.response.policy import JobUsage, MitigationPolicy
from qabuse_dagster.simulation.closed_loop import Plan, run_closed_loop
from qabuse_dagster.simulation.jobs import Horizon, JobBatch, epoch_ms
from qabuse_dagster.simulation.scenarios import SCENARIOS
from qabuse_dagster.simulation.twin import TwinManifest, build_plan, progress_bar, shared_queue
from qabuse_dagster.telemetry.hashing import KeyedHasher

__all__ = [
    "CLOSED_LOOP_COLUMNS",
    "ClosedLoopReport",
    "DetectorController",
    "IncidentImpact",
    "WaitStats",
    "closed_loop_backtest",
    "closed_loop_metrics",
    "closed_loop_rows",
    "closed_loop_summary",
    "feature_input",
]

logger = logging.getLogger(__name__)

_TS = pa.timestamp("us", tz="UTC")


def feature_input(jobs: JobBatch, until_ms: int | None = None) -> pa.Table:
    """The records of ``jobs`` that `window_features` reads, as the twin would write them.

    A submission record (``submitted``, or ``rejected`` for a refused job) at submit
    time, and for a job that ran a terminal one (``completed`` or ``failed``) at its end,
    unless that lies at or after ``until_ms`` (the job is still in flight).
    """
    ran = ~jobs.rejected
    if until_ms is not None:
        ran &= jobs.end_ms < until_ms
    status = np.where(jobs.rejected, "rejected", "submitted").astype(object)
    terminal = np.where(pd.isna(jobs.error_code[ran]), "completed", "failed").astype(object)
    # A job's identity within the batch: its submit instant, key and position.
    job_id = np.char.add(np.arange(len(jobs)).astype(str), "-")
    job_id = np.char.add(job_id, jobs.submit_ms.astype(str)).astype(object)

    def both(column: np.ndarray) -> pa.Array:
        return pa.array(np.concatenate([column, column[ran]]))

    error = jobs.error_code.astype(object).copy()
    error[~jobs.rejected] = None  # a submission record carries the refusal's code only
    return pa.table(
        {
            "job_id": both(job_id),
            "api_key_id": both(jobs.api_key_id),
            "user": both(jobs.user),
            "timestamp": pa.array(
                np.concatenate([jobs.submit_ms, jobs.end_ms[ran]]) * 1000, type=pa.int64()
            ).cast(_TS),
            "status": pa.array(np.concatenate([status, terminal])),
            "shots": both(jobs.shots),
            "num_circuits": both(jobs.num_circuits),
            "code_hash": both(jobs.code_hash),
            "backend": both(jobs.backend),
            "client_agent": both(jobs.client_agent),
            "source_ip_hash": both(jobs.source_ip_hash),
            "error_code": pa.array(np.concatenate([error, jobs.error_code[ran]]), pa.string()),
        }
    )


class DetectorController:
    """Scores a key's jobs with the trained champion; a policy turns alerts into decisions.

    Args:
        trained: The families and ensemble, fitted on history, with their scores of the
            unmitigated twin (the cross-entity families' scores are kept from these).
        policy: The mitigation ladder.
        active_from: First instant whose feature rows it scores.
        initial_alerts: Alert instants per key of the unmitigated jobs, if already
            scored (saves scoring every key again before its first decision).
        until_ms: End of the telemetry: later terminal records do not exist yet.
        people_delay_s: How long the people the engine asks (an approver, a reviewer)
            take to answer; in the twin they always agree.
    """

    def __init__(
        self,
        trained: TrainedDetectors,
        policy: MitigationPolicy,
        *,
        active_from: datetime,
        initial_alerts: dict[str, list[int]] | None = None,
        until_ms: int | None = None,
        people_delay_s: float = 900.0,
    ) -> None:
        self.trained = trained
        self.per_key = [
            name
            for name in trained.detectors
            if get_family(name).input_kind != "graph" and get_family(name).entity == "api_key"
        ]
        self.cross = [name for name in trained.detectors if name not in self.per_key]
        self.until_ms = until_ms
        self.policy = policy
        self.active_from = active_from
        self.initial_alerts = initial_alerts
        self.people_delay_s = people_delay_s
        self.rescored_keys = 0

    def next_decision(
        self, api_key_id: str, jobs: JobBatch, decisions: Sequence[Decision], after_ms: int
    ) -> Decision | None:
        if not decisions and self.initial_alerts is not None:
            alerts = self.initial_alerts.get(api_key_id, [])
        else:
            alerts = self.alerts(jobs)
            self.rescored_keys += 1
        refused = jobs.error_code == "challenge_required"
        ran = ~jobs.rejected
        order = np.argsort(jobs.submit_ms[ran], kind="stable")
        usage = JobUsage(
            jobs.submit_ms[ran][order], jobs.shots[ran][order], jobs.num_circuits[ran][order]
        )
        decision = self.policy.next_decision(
            api_key_id,
            alerts_ms=alerts,
            refusals_ms=np.sort(jobs.submit_ms[refused]).tolist(),
            decisions=decisions,
            after_ms=after_ms,
            usage=usage,
        )
        return None if decision is None else self.people_answer(decision)

    def people_answer(self, decision: Decision) -> Decision:
        """The twin's stand-in for the people the engine asks: they agree, after a delay.

        A proposed revocation takes effect when an approver confirms it, and so does the
        one a review held back. Live, both wait in the review queue.
        """
        delay_ms = round(self.people_delay_s * 1000)
        if decision.action in ("revoke", "rotate"):
            return dataclasses.replace(
                decision,
                at_ms=decision.at_ms + delay_ms,
                reason=f"{decision.reason}, approved after {self.people_delay_s:.0f} s",
            )
        if decision.action == "review":
            held = cast(Action, decision.params.get("instead_of", "revoke"))
            return self.policy.decide(
                decision.api_key_id,
                held,
                decision.at_ms + delay_ms,
                f"{decision.reason}; {held} approved after {self.people_delay_s:.0f} s of review",
            )
        return decision

    def alerts(self, jobs: JobBatch) -> list[int]:
        """Sorted instants (epoch ms) of the rows of ``jobs`` that alert."""
        if len(jobs) == 0:
            return []
        end_ms = int(jobs.end_ms.max()) + 6 * 60_000
        end = pd.Timestamp(end_ms, unit="ms", tz="UTC").to_pydatetime()
        if end <= self.active_from:
            return []
        inputs = detector_inputs(
            feature_input(jobs, self.until_ms), self.per_key, self.active_from, end
        )
        rows = inputs.key_rows
        if rows.empty:
            return []
        own = {name: self.trained.detectors[name] for name in self.per_key}
        scores = score_families(own, inputs, rows)
        if self.cross:
            kept = self.trained.scored[[*KEY_COLUMNS, *self.cross]]
            scores = scores.merge(kept, on=KEY_COLUMNS, how="left")
            for name in self.cross:
                floor = score_floor(self.trained.detectors[name])
                scores[name] = scores[name].fillna(floor)
        names = list(self.trained.detectors)
        ensemble = self.trained.ensemble
        assert ensemble is not None
        combined = ensemble.decision_function(scores[names].to_numpy(dtype=np.float64))
        instants = _epoch_ms(scores["event_timestamp"]).to_numpy()
        return np.sort(instants[combined > ensemble.threshold_]).tolist()


@dataclass(frozen=True)
class WaitStats:
    """Queue wait of a set of jobs, in seconds."""

    jobs: int
    mean_s: float | None
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None

    @classmethod
    def of(cls, waits_ms: np.ndarray) -> WaitStats:
        if len(waits_ms) == 0:
            return cls(0, None, None, None, None)
        seconds = np.asarray(waits_ms, dtype=np.float64) / 1000.0
        p50, p95, p99 = np.quantile(seconds, [0.5, 0.95, 0.99]).tolist()
        return cls(len(seconds), float(seconds.mean()), p50, p95, p99)


@dataclass(frozen=True)
class IncidentImpact:
    """What one incident did to the backends, with and without qabuse."""

    incident_id: str
    kind: str
    mitigated_after_s: float | None
    harm_until_s_without: float | None
    harm_until_s_with: float | None
    abuse_backend_s_without: float
    abuse_backend_s_with: float
    legit_wait_without: WaitStats
    legit_wait_with: WaitStats


@dataclass(frozen=True)
class ClosedLoopReport:
    """The twin's evaluation part with and without qabuse in the loop."""

    train_until: datetime
    eval_end: datetime
    threshold: float
    legit_wait_without: WaitStats
    legit_wait_with: WaitStats
    incidents: list[IncidentImpact]
    legit_refused: int
    legit_planned_jobs: int
    legit_jobs_never_ran: int
    legit_keys_mitigated: int
    legit_keys: int
    decisions: dict[str, int]
    timeline: list[Decision] = field(repr=False, compare=False, default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["train_until"] = self.train_until.isoformat()
        out["eval_end"] = self.eval_end.isoformat()
        out["timeline"] = [
            {
                "at": pd.Timestamp(d.at_ms, unit="ms", tz="UTC").isoformat(),
                "api_key_id": d.api_key_id,
                "action": d.action,
                "reason": d.reason,
                "params": dict(d.params),
                "expires": None
                if d.expires_at_ms is None
                else pd.Timestamp(d.expires_at_ms, unit="ms", tz="UTC").isoformat(),
            }
            for d in self.timeline
        ]
        return out


def closed_loop_backtest(
    manifest: TwinManifest,
    hasher: KeyedHasher,
    *,
    train_until: datetime | None = None,
    params: TrainingParams | None = None,
    policy: MitigationPolicy | None = None,
    expected_keys: set[str] | None = None,
    progress: bool = False,
) -> ClosedLoopReport:
    """Rerun the twin of ``manifest`` with and without qabuse mitigating; compare.

    Args:
        manifest: The twin to rerun (written by `simulate` beside its telemetry).
        hasher: The hash key the twin was written with (else its keys differ).
        train_until: End of the training part; default the middle of the horizon.
        params: The families' training knobs.
        policy: The mitigation ladder.
        expected_keys: The api keys of the telemetry the twin wrote; when given, a
            rebuilt twin that lacks any of them (another hash key) is an error.
        progress: Show progress bars (rich).

    Returns:
        Queue waits, incident impact and legitimate cost over ``[train_until, end)``.

    Raises:
        ValueError: The rebuilt twin does not reproduce ``expected_keys``, or
            ``train_until`` lies outside its horizon.
    """
    horizon = manifest.horizon
    with progress_bar(progress) as new_task:
        plan = build_plan(
            horizon,
            seed=manifest.seed,
            hasher=hasher,
            scenarios=manifest.scenarios,
            new_task=new_task,
        )
        if expected_keys is not None:
            missing = expected_keys - set(plan.api_keys) - set(plan.jobs.api_key_id.tolist())
            if missing:
                raise ValueError(
                    f"the twin rebuilt from its manifest lacks {len(missing)} of the telemetry's "
                    "api keys: was it hashed with another key? Set QABUSE_HASH_KEY to the one "
                    "it was written with, or pass --demo-key"
                )
        return _run_both(plan, horizon, train_until, params, policy, hasher, new_task)


def _run_both(
    plan: Plan,
    horizon: Horizon,
    train_until: datetime | None,
    params: TrainingParams | None,
    policy: MitigationPolicy | None,
    hasher: KeyedHasher,
    new_task: Callable[[str, int], Callable[[int], None]] | None,
) -> ClosedLoopReport:
    planned = shared_queue(plan.jobs)
    records = feature_input(planned, until_ms=horizon.end_ms)
    last = horizon.end + timedelta(minutes=6)
    cutoff = time_cutoff(pd.Series([horizon.start, horizon.end]), 0.5)
    if train_until is not None:
        cutoff = train_until
    if not horizon.start < cutoff < horizon.end:
        raise ValueError(f"train_until {cutoff} lies outside the twin's horizon")
    inputs = detector_inputs(records, resolve_names("all"), horizon.start, last)
    trained = train_then_score(inputs, cutoff, params)
    alerting = trained.scored[trained.scored[f"{ENSEMBLE}_alert"]]
    initial: dict[str, list[int]] = {
        str(key): sorted(_epoch_ms(group["event_timestamp"]).tolist())
        for key, group in alerting.groupby("api_key_id")
    }
    controller = DetectorController(
        trained,
        policy or MitigationPolicy(),
        active_from=cutoff,
        initial_alerts=initial,
        until_ms=horizon.end_ms,
    )
    loop = run_closed_loop(
        dataclasses.replace(plan, jobs=planned),
        controller,
        hasher=hasher,
        start_ms=epoch_ms(cutoff),
        progress=new_task,
    )
    mitigated = shared_queue(loop.jobs)
    logger.info(
        "closed loop: %d decisions, %d keys rescored", len(loop.decisions), controller.rescored_keys
    )
    return _compare(
        plan,
        planned,
        mitigated,
        loop.actor,
        loop.decisions,
        cutoff,
        horizon.end,
        threshold=float(trained.thresholds()[ENSEMBLE]),
    )


def _compare(
    plan: Plan,
    planned: JobBatch,
    mitigated: JobBatch,
    mitigated_actor: np.ndarray,
    decisions: list[Decision],
    cutoff: datetime,
    end: datetime,
    *,
    threshold: float,
) -> ClosedLoopReport:
    abusive_kinds = set(SCENARIOS) | {label.kind for label in plan.labels}
    abusive_actor = np.array([kind in abusive_kinds for kind in plan.actor_kinds], dtype=bool)
    start_ms, end_ms = epoch_ms(cutoff), epoch_ms(end)

    def legit_waits(jobs: JobBatch, actor: np.ndarray, lo: int, hi: int) -> WaitStats:
        ran = ~jobs.rejected & ~abusive_actor[actor]
        ran &= (jobs.submit_ms >= lo) & (jobs.submit_ms < hi)
        return WaitStats.of(jobs.queue_ms[ran])

    impacts = []
    for label in plan.labels:
        lo, hi = epoch_ms(label.start), epoch_ms(label.end)
        if hi <= start_ms:
            continue
        kind_actors = [i for i, k in enumerate(plan.actor_kinds) if k == label.kind]
        keys = set(label.api_key_ids or ())
        first = [d.at_ms for d in decisions if d.api_key_id in keys and d.at_ms >= lo]
        impacts.append(
            IncidentImpact(
                incident_id=label.incident_id,
                kind=label.kind,
                mitigated_after_s=(min(first) - lo) / 1000.0 if first else None,
                harm_until_s_without=_harm_until(planned, plan.actor, kind_actors, lo),
                harm_until_s_with=_harm_until(mitigated, mitigated_actor, kind_actors, lo),
                abuse_backend_s_without=_backend_s(planned, plan.actor, kind_actors, lo),
                abuse_backend_s_with=_backend_s(mitigated, mitigated_actor, kind_actors, lo),
                legit_wait_without=legit_waits(planned, plan.actor, lo, hi),
                legit_wait_with=legit_waits(mitigated, mitigated_actor, lo, hi),
            )
        )
    legit_planned = ~abusive_actor[plan.actor] & (planned.submit_ms >= start_ms)
    legit_planned &= planned.submit_ms < end_ms
    legit_now = ~abusive_actor[mitigated_actor] & (mitigated.submit_ms >= start_ms)
    refusal_codes = ("rate_limited", "quota_exceeded", "challenge_required", "key_revoked")
    refused = legit_now & np.isin(mitigated.error_code, refusal_codes)
    ran_before = int((legit_planned & ~planned.rejected).sum())
    ran_after = int((legit_now & ~mitigated.rejected & (mitigated.submit_ms < end_ms)).sum())
    legit_keys = {str(k) for k, kind in plan.api_keys.items() if kind not in abusive_kinds}
    counts: dict[str, int] = {}
    for decision in decisions:
        counts[decision.action] = counts.get(decision.action, 0) + 1
    return ClosedLoopReport(
        train_until=cutoff,
        eval_end=end,
        threshold=threshold,
        legit_wait_without=legit_waits(planned, plan.actor, start_ms, end_ms),
        legit_wait_with=legit_waits(mitigated, mitigated_actor, start_ms, end_ms),
        incidents=impacts,
        legit_refused=int(refused.sum()),
        legit_planned_jobs=int(legit_planned.sum()),
        legit_jobs_never_ran=max(ran_before - ran_after, 0),
        legit_keys_mitigated=len({d.api_key_id for d in decisions} & legit_keys),
        legit_keys=len(legit_keys),
        decisions=counts,
        timeline=decisions,
    )


def _epoch_ms(instants: pd.Series) -> pd.Series:
    return (instants - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)


def _harm_until(
    jobs: JobBatch, actor: np.ndarray, actors: list[int], onset_ms: int
) -> float | None:
    """Seconds from onset to the end of the incident actors' last job that ran."""
    ran = np.isin(actor, actors) & ~jobs.rejected & (jobs.submit_ms >= onset_ms)
    if not ran.any():
        return None
    return float((jobs.end_ms[ran].max() - onset_ms) / 1000.0)


def _backend_s(jobs: JobBatch, actor: np.ndarray, actors: list[int], onset_ms: int) -> float:
    """Backend seconds the incident actors' jobs used from onset on."""
    ran = np.isin(actor, actors) & ~jobs.rejected & (jobs.submit_ms >= onset_ms)
    return float(jobs.runtime_ms[ran].sum() / 1000.0)


#: Columns of the closed-loop table (the CLI prints the same rows).
CLOSED_LOOP_COLUMNS = [
    "scope",
    "mitigated after (s)",
    "abuse on backends until (s)",
    "abuse backend time (s)",
    "legit wait mean (s)",
    "legit wait p95 (s)",
    "legit wait p99 (s)",
]


def closed_loop_rows(report: ClosedLoopReport) -> list[list[str]]:
    """Rows of the closed-loop table: all legitimate jobs, then each incident.

    Each cell after the first reads ``without -> with`` qabuse in the loop.
    """

    def pair(without: float | None, with_: float | None) -> str:
        return f"{_fmt(without)} -> {_fmt(with_)}"

    def waits(a: WaitStats, b: WaitStats) -> list[str]:
        return [pair(a.mean_s, b.mean_s), pair(a.p95_s, b.p95_s), pair(a.p99_s, b.p99_s)]

    overall = waits(report.legit_wait_without, report.legit_wait_with)
    rows = [["all legitimate jobs", "-", "-", "-", *overall]]
    for i in report.incidents:
        rows.append(
            [
                f"{i.incident_id} ({i.kind})",
                _fmt(i.mitigated_after_s, missing="never"),
                pair(i.harm_until_s_without, i.harm_until_s_with),
                pair(i.abuse_backend_s_without, i.abuse_backend_s_with),
                *waits(i.legit_wait_without, i.legit_wait_with),
            ]
        )
    return rows


def closed_loop_summary(report: ClosedLoopReport) -> str:
    """One line on the cost to legitimate users and the decisions taken."""
    actions = ", ".join(f"{n} {action}" for action, n in sorted(report.decisions.items()))
    return (
        f"legitimate cost: {report.legit_keys_mitigated} of {report.legit_keys} legitimate keys "
        f"mitigated, {report.legit_refused} submissions refused, "
        f"{report.legit_jobs_never_ran} of {report.legit_planned_jobs} jobs never ran; "
        f"decisions: {actions or 'none'}"
    )


def closed_loop_metrics(report: ClosedLoopReport) -> dict[str, float]:
    """Numeric figures for MLflow, prefixed ``closed_loop.``."""
    metrics: dict[str, float] = {
        "closed_loop.legit_keys_mitigated": float(report.legit_keys_mitigated),
        "closed_loop.legit_refused": float(report.legit_refused),
        "closed_loop.legit_jobs_never_ran": float(report.legit_jobs_never_ran),
    }
    for label, stats in (("without", report.legit_wait_without), ("with", report.legit_wait_with)):
        for name in ("mean_s", "p95_s", "p99_s"):
            value = getattr(stats, name)
            if value is not None:
                metrics[f"closed_loop.legit_wait_{name}_{label}"] = float(value)
    for i in report.incidents:
        metrics[f"closed_loop.{i.kind}.abuse_backend_s_without"] = i.abuse_backend_s_without
        metrics[f"closed_loop.{i.kind}.abuse_backend_s_with"] = i.abuse_backend_s_with
    return metrics


def _fmt(value: float | None, missing: str = "-") -> str:
    return missing if value is None else f"{value:.1f}"

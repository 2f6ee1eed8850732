"""Backtest report: replay telemetry through a detector and judge it on labelled incidents.

`run_backtest` splits contract telemetry by time (the first half trains by default),
fits a detector on the history and scores the rest, then judges the alerts per api key
against incident labels:

* ``qabuse``: `window_features` over the whole span, `fit_detector` on the rows before
  the cutoff and `score_rows` on the rows after it, the functions production uses;
* ``baseline``: `TutorialBaselineDetector`, the reference tutorial's pipeline, which
  scores users; a user's score is given to each api key the user submitted with, so
  both detectors are judged per key.

Metrics, per abuse kind and overall, over the evaluation window:

* recall: share of incidents with an alert on one of their keys after their start;
* precision@k: share of incident keys among the k keys with the highest score, k the
  number of incident keys (keys of other kinds' incidents are left out of a kind's row);
* PR-AUC: average precision of the keys ranked by their highest score;
* benign alert rate: share of benign key-days (a key in no incident, a UTC day with a
  scored row of it) with at least one alert. With a ``key_kinds`` mapping, benign keys
  are also reported per tenant kind, so legitimate look-alikes (variational loops, CI
  suites, classrooms) show on their own rows.

`qabuse_dagster.evaluation.html_report.write_html` renders reports as a page.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
from sklearn.metrics import average_precision_score

from models import TutorialBaselineDetector
from qabuse_dagster.evaluation.backtest import time_cutoff
from qabuse_dagster.evaluation.detection import (
    WINDOW_TAIL,
    IncidentOutcome,
    evaluate_detections,
    label_keys,
)
from qabuse_dagster.evaluation.families import (
    ENSEMBLE,
    TrainingParams,
    detector_inputs,
    resolve_names,
    train_then_score,
)
from qabuse_dagster.ingest.files import parse_line as parse_telemetry_line
from qabuse_dagster.ingest.partitions import records_to_table
from qabuse_dagster.telemetry.contract import ContractViolation
from qabuse_dagster.telemetry.labels import (
    BENIGN_LABEL_KINDS,
    FileLineError,
    IncidentLabel,
    is_analyst_label,
)

if TYPE_CHECKING:  # the closed loop imports the twin; only its report type is named here
    from qabuse_dagster.evaluation.closed_loop import ClosedLoopReport

__all__ = [
    "BACKTEST_EXPERIMENT",
    "BacktestError",
    "BacktestReport",
    "KindMetrics",
    "LookalikeMetrics",
    "TelemetryFileError",
    "judge",
    "log_to_mlflow",
    "read_telemetry_jsonl",
    "run_backtest",
    "run_backtests",
    "users_keys",
]

logger = logging.getLogger(__name__)

#: The tutorial pipeline every report is compared with.
BASELINE = "baseline"
#: MLflow experiment that holds one run per backtest.
BACKTEST_EXPERIMENT = "qabuse-backtests"
_SCORED_COLUMNS = ["api_key_id", "event_timestamp", "score", "alert"]


def users_keys(records: pd.DataFrame) -> dict[str, list[str]]:
    """Each user's api keys in ``records`` (``user`` and ``api_key_id`` columns): what a
    label that names users covers (`detection.label_keys`)."""
    pairs = records[["user", "api_key_id"]].drop_duplicates()
    return pairs.groupby("user")["api_key_id"].agg(list).to_dict()


class BacktestError(ValueError):
    """Telemetry and labels that cannot be backtested (the message says why)."""


class TelemetryFileError(FileLineError):
    """A telemetry file that cannot be read, naming the file and 1-based line."""


def read_telemetry_jsonl(path: Path) -> pa.Table:
    """Read a telemetry JSONL file whole, validating each line as ``qabuse ingest`` does.

    Unlike ingest, which quarantines bad lines, a backtest stops at the first one: a
    replay on silently partial data would report figures for data it never saw.

    Raises:
        TelemetryFileError: a line violates the contract (the message names the line and
            why), or the file holds no record.
    """
    path = Path(path)
    records = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                records.append(parse_telemetry_line(raw))
            except ContractViolation as exc:
                raise TelemetryFileError(path, number, str(exc)) from None
    if not records:
        raise TelemetryFileError(path, None, "no telemetry records (the file is empty)")
    return records_to_table(records)


@dataclass(frozen=True)
class KindMetrics:
    """Detection figures of one abuse kind, or of all incidents (``overall``)."""

    incidents: int
    detected: int
    recall: float | None
    precision_at_k: float | None
    k: int
    pr_auc: float | None
    median_time_to_detect_s: float | None
    #: Median of the detected incidents' `IncidentOutcome.delay_after_first_row_s`: the
    #: detector's own delay, without the wait for the abuse's first submission.
    median_delay_after_first_row_s: float | None
    benign_key_day_alert_rate: float
    benign_row_alert_rate: float
    benign_key_days: int
    benign_key_days_alerted: int


@dataclass(frozen=True)
class LookalikeMetrics:
    """Alerts on the benign keys of one tenant kind (a legitimate look-alike)."""

    keys: int
    key_days: int
    key_days_alerted: int
    benign_key_day_alert_rate: float


@dataclass(frozen=True)
class AnalystFeedback:
    """How a detector does on the alerts people labelled (triage verdicts, upheld appeals).

    ``precision`` is the share of the labelled windows it alerts on that people confirmed
    as abuse; None when it alerts on none of them.
    """

    confirmed: int
    false_positives: int
    alerted_confirmed: int
    alerted_false_positives: int
    precision: float | None


@dataclass(frozen=True)
class BacktestReport:
    """What one detector did on the evaluation part of a telemetry set.

    ``scored`` holds every evaluated row (``api_key_id``, ``event_timestamp``, ``score``,
    ``alert``) for plots; it is not part of the JSON.
    """

    detector: str
    train_until: datetime
    eval_start: datetime
    eval_end: datetime
    threshold: float
    train_rows: int
    eval_rows: int
    incidents: list[IncidentOutcome]
    overall: KindMetrics
    per_kind: dict[str, KindMetrics]
    lookalikes: dict[str, LookalikeMetrics]
    incident_keys: dict[str, list[str]]
    incident_windows: dict[str, tuple[datetime, datetime]]
    scored: pd.DataFrame = field(repr=False, compare=False)
    #: The labels people gave on alerts, when there are any.
    analyst: AnalystFeedback | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (ISO 8601 instants, ``None`` for undefined)."""
        return {
            "detector": self.detector,
            "train_until": self.train_until.isoformat(),
            "eval_start": self.eval_start.isoformat(),
            "eval_end": self.eval_end.isoformat(),
            "threshold": self.threshold,
            "train_rows": self.train_rows,
            "eval_rows": self.eval_rows,
            "incidents": [
                {
                    "incident_id": o.incident_id,
                    "kind": o.kind,
                    "detected": o.detected,
                    "time_to_detect_s": o.time_to_detect_s,
                    "first_alert": o.first_alert.isoformat() if o.first_alert else None,
                    "first_row": o.first_row.isoformat() if o.first_row else None,
                    "delay_after_first_row_s": o.delay_after_first_row_s,
                    "api_key_ids": self.incident_keys[o.incident_id],
                }
                for o in self.incidents
            ],
            "overall": asdict(self.overall),
            "per_kind": {kind: asdict(m) for kind, m in self.per_kind.items()},
            "lookalikes": {kind: asdict(m) for kind, m in self.lookalikes.items()},
            "analyst_feedback": asdict(self.analyst) if self.analyst is not None else None,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def run_backtests(
    telemetry: pa.Table,
    labels: Sequence[IncidentLabel],
    *,
    detectors: Sequence[str] = (ENSEMBLE, BASELINE),
    train_until: datetime | None = None,
    key_kinds: Mapping[str, str] | None = None,
    params: TrainingParams | None = None,
) -> list[BacktestReport]:
    """Fit each of ``detectors`` on telemetry before ``train_until``, score the rest, judge.

    Args:
        telemetry: contract records (``TELEMETRY_SCHEMA`` columns; at least ``user``,
            ``api_key_id``, ``timestamp``, ``status``).
        labels: incidents; those naming ``users`` cover every key those users used.
        detectors: detector family names (`models.registry`), ``ensemble`` (the champion,
            over every registered family) and ``baseline`` (`TutorialBaselineDetector`),
            in the order of the returned reports.
        train_until: end of the training part (tz-aware); default: the middle of the
            telemetry's span.
        key_kinds: optional api key to tenant kind, e.g. from the simulator; benign keys
            are then also reported per kind.
        params: the families' training knobs (default `TrainingParams()`).

    Returns:
        One report per detector over the evaluation window ``[train_until, end]``.

    Raises:
        BacktestError: no telemetry, a cutoff outside the span, an unknown detector, or
            a label naming keys or users absent from the telemetry.
    """
    if telemetry.num_rows == 0:
        raise BacktestError("no telemetry records to backtest")
    columns = ["user", "api_key_id", "timestamp", "status"]
    columns += ["job_id"] if "job_id" in telemetry.column_names else []
    frame = telemetry.select(columns).to_pandas()
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
    first, last = frame["timestamp"].min(), frame["timestamp"].max()
    if train_until is not None and train_until.tzinfo is None:
        raise BacktestError("train_until must be timezone-aware")
    cutoff = (
        time_cutoff(frame["timestamp"], 0.5)
        if train_until is None
        else pd.Timestamp(train_until).tz_convert("UTC").to_pydatetime()
    )
    if not first < cutoff <= last:
        raise BacktestError(
            f"train_until {cutoff.isoformat()} leaves no training or no evaluation data: "
            f"the telemetry spans {first.isoformat()} .. {last.isoformat()}"
        )
    pairs = frame[["user", "api_key_id"]].drop_duplicates()
    user_keys = users_keys(pairs)
    _check_labels(labels, set(pairs["api_key_id"]), set(user_keys))
    try:
        wanted = list(detectors)
        family_names = (
            resolve_names("all")
            if ENSEMBLE in wanted
            else resolve_names([d for d in wanted if d != BASELINE])
        )
    except KeyError as exc:
        raise BacktestError(f"unknown detector: {exc.args[0]}") from None
    scored: dict[str, tuple[pd.DataFrame, float, int]] = {}
    if family_names:
        inputs = detector_inputs(telemetry, family_names)
        trained = train_then_score(inputs, cutoff, params, ensemble=ENSEMBLE in wanted)
        for name, threshold in trained.thresholds().items():
            scored[name] = (trained.scored_for(name), threshold, trained.train_rows)
    if BASELINE in wanted:
        scored[BASELINE] = _score_baseline(frame, pairs, cutoff)
    return [
        _judge(name, *scored[name], labels, cutoff, last, user_keys, key_kinds) for name in wanted
    ]


def run_backtest(
    telemetry: pa.Table,
    labels: Sequence[IncidentLabel],
    *,
    detector: str = ENSEMBLE,
    train_until: datetime | None = None,
    key_kinds: Mapping[str, str] | None = None,
    params: TrainingParams | None = None,
) -> BacktestReport:
    """`run_backtests` of one detector."""
    return run_backtests(
        telemetry,
        labels,
        detectors=[detector],
        train_until=train_until,
        key_kinds=key_kinds,
        params=params,
    )[0]


def judge(
    name: str,
    scored: pd.DataFrame,
    threshold: float,
    telemetry: pa.Table,
    labels: Sequence[IncidentLabel],
    cutoff: datetime,
    *,
    train_rows: int = 0,
    key_kinds: Mapping[str, str] | None = None,
) -> BacktestReport:
    """The report of rows another caller scored (``api_key_id, event_timestamp, score, alert``).

    The Dagster evaluation assets judge registered versions with it, `run_backtests`
    judges freshly fitted ones: the figures are computed by the same code.
    """
    frame = telemetry.select(["user", "api_key_id", "timestamp"]).to_pandas()
    user_keys = users_keys(frame)
    last = pd.to_datetime(frame["timestamp"], utc=True).max()
    return _judge(name, scored, threshold, train_rows, labels, cutoff, last, user_keys, key_kinds)


def _judge(
    name: str,
    scored: pd.DataFrame,
    threshold: float,
    train_rows: int,
    labels: Sequence[IncidentLabel],
    cutoff: datetime,
    last: pd.Timestamp,
    user_keys: Mapping[str, Sequence[str]],
    key_kinds: Mapping[str, str] | None,
) -> BacktestReport:
    analyst = analyst_feedback(scored, labels, user_keys)
    # An upheld appeal's or an analyst's false-positive label says the window was
    # legitimate use: it is no incident, and its key is judged benign like any key that
    # no incident names.
    labels = [label for label in labels if label.kind not in BENIGN_LABEL_KINDS]
    scored = scored[_SCORED_COLUMNS].reset_index(drop=True)
    eval_end = (
        scored["event_timestamp"].max().to_pydatetime() + timedelta(seconds=1)
        if not scored.empty
        else last.to_pydatetime()
    )
    overall_report = evaluate_detections(
        scored, labels, start=cutoff, end=eval_end, user_keys=user_keys
    )
    keys_of = {label.incident_id: sorted(label_keys(label, user_keys)) for label in labels}
    all_incident_keys = {key for keys in keys_of.values() for key in keys}
    benign = _key_days(scored[~scored["api_key_id"].isin(all_incident_keys)])
    benign_rows = scored.loc[~scored["api_key_id"].isin(all_incident_keys), "alert"]
    row_rate = float(benign_rows.mean()) if len(benign_rows) else 0.0
    active = {o.incident_id for o in overall_report.incidents}
    active_labels = [label for label in labels if label.incident_id in active]
    kinds = sorted({label.kind for label in active_labels})

    def metrics(group: Sequence[IncidentLabel]) -> KindMetrics:
        return _kind_metrics(
            scored, group, labels, keys_of, user_keys, benign, row_rate, cutoff, eval_end
        )

    return BacktestReport(
        detector=name,
        train_until=cutoff,
        eval_start=cutoff,
        eval_end=eval_end,
        threshold=float(threshold),
        train_rows=train_rows,
        eval_rows=len(scored),
        incidents=overall_report.incidents,
        overall=metrics(active_labels),
        per_kind={
            kind: metrics([label for label in active_labels if label.kind == kind])
            for kind in kinds
        },
        lookalikes=_lookalikes(scored, all_incident_keys, key_kinds) if key_kinds else {},
        incident_keys={o.incident_id: keys_of[o.incident_id] for o in overall_report.incidents},
        incident_windows={label.incident_id: (label.start, label.end) for label in active_labels},
        scored=scored,
        analyst=analyst,
    )


def analyst_feedback(
    scored: pd.DataFrame,
    labels: Sequence[IncidentLabel],
    user_keys: Mapping[str, Sequence[str]] | None = None,
) -> AnalystFeedback | None:
    """Whether ``scored`` alerts inside the windows people labelled; None without such labels.

    A window counts as alerted when one of its keys has an alerting row after its start
    and up to a window length after its end (the rows its records still fill).
    """
    given = [label for label in labels if is_analyst_label(label)]
    if not given:
        return None
    alerts = scored[scored["alert"]]
    hits = {True: 0, False: 0}
    totals = {True: 0, False: 0}
    for label in given:
        confirmed = label.kind not in BENIGN_LABEL_KINDS
        keys = label_keys(label, {u: list(k) for u, k in (user_keys or {}).items()})
        inside = alerts[
            alerts["api_key_id"].isin(keys)
            & (alerts["event_timestamp"] > label.start)
            & (alerts["event_timestamp"] <= label.end + WINDOW_TAIL)
        ]
        totals[confirmed] += 1
        hits[confirmed] += int(not inside.empty)
    alerted = hits[True] + hits[False]
    return AnalystFeedback(
        confirmed=totals[True],
        false_positives=totals[False],
        alerted_confirmed=hits[True],
        alerted_false_positives=hits[False],
        precision=hits[True] / alerted if alerted else None,
    )


def _check_labels(labels: Sequence[IncidentLabel], keys: set[str], users: set[str]) -> None:
    for label in labels:
        missing_keys = sorted(set(label.api_key_ids or ()) - keys)
        missing_users = sorted(set(label.users or ()) - users)
        problems = []
        if missing_keys:
            problems.append(f"api_key_ids {', '.join(missing_keys)}")
        if missing_users:
            problems.append(f"users {', '.join(missing_users)}")
        if problems:
            raise BacktestError(
                f"incident {label.incident_id!r} names {' and '.join(problems)} absent from "
                "the telemetry: are these labels for another telemetry set (or hash key)?"
            )


def _score_baseline(
    frame: pd.DataFrame, pairs: pd.DataFrame, cutoff: datetime
) -> tuple[pd.DataFrame, float, int]:
    history = frame[frame["timestamp"] < cutoff]
    fitted = TutorialBaselineDetector().fit_frame(history)
    # Score the whole span so the 5-minute rolling mean at the cutoff sees the minutes
    # before it, as a live deployment would; only rows after the cutoff are judged.
    per_user = fitted.score_frame(frame)
    per_user = per_user[per_user["event_timestamp"] >= cutoff]
    train_rows = int((fitted.score_frame(history)["event_timestamp"] < cutoff).sum())
    scored = per_user.merge(pairs, on="user", how="inner")
    scored = scored.sort_values(["event_timestamp", "api_key_id"], kind="stable")
    return scored[_SCORED_COLUMNS].reset_index(drop=True), fitted.threshold_, train_rows


@dataclass(frozen=True)
class _KeyDays:
    key_days: int
    alerted: int

    @property
    def rate(self) -> float:
        return self.alerted / self.key_days if self.key_days else 0.0


def _key_days(rows: pd.DataFrame) -> _KeyDays:
    if rows.empty:
        return _KeyDays(0, 0)
    days = pd.DataFrame(
        {
            "key": rows["api_key_id"].to_numpy(),
            "day": rows["event_timestamp"].dt.floor("D").to_numpy(),
            "alert": rows["alert"].to_numpy(dtype=bool),
        }
    )
    per_day = days.groupby(["key", "day"])["alert"].any()
    return _KeyDays(len(per_day), int(per_day.sum()))


def _kind_metrics(
    scored: pd.DataFrame,
    group: Sequence[IncidentLabel],
    labels: Sequence[IncidentLabel],
    keys_of: Mapping[str, Sequence[str]],
    user_keys: Mapping[str, Sequence[str]],
    benign: _KeyDays,
    benign_row_rate: float,
    start: datetime,
    end: datetime,
) -> KindMetrics:
    group_ids = {label.incident_id for label in group}
    group_keys = {key for i in group_ids for key in keys_of[i]}
    # Another kind's incident keys are neither positives nor benign for this kind.
    others = {
        key
        for label in labels
        if label.incident_id not in group_ids
        for key in keys_of[label.incident_id]
    } - group_keys
    rows = scored[~scored["api_key_id"].isin(others)]
    outcome = evaluate_detections(rows, group, start=start, end=end, user_keys=user_keys)
    by_key = rows.groupby("api_key_id")["score"].max()
    positive = by_key.index.isin(list(group_keys))
    pr_auc = (
        float(average_precision_score(positive, by_key.to_numpy()))
        if positive.any() and not positive.all()
        else None
    )
    ttd = [o.time_to_detect_s for o in outcome.incidents if o.time_to_detect_s is not None]
    delays = [
        o.delay_after_first_row_s
        for o in outcome.incidents
        if o.delay_after_first_row_s is not None
    ]
    return KindMetrics(
        incidents=len(outcome.incidents),
        detected=sum(o.detected for o in outcome.incidents),
        recall=outcome.recall,
        precision_at_k=outcome.precision_at_k,
        k=outcome.k if group_keys else 0,
        pr_auc=pr_auc,
        median_time_to_detect_s=float(pd.Series(ttd).median()) if ttd else None,
        median_delay_after_first_row_s=float(pd.Series(delays).median()) if delays else None,
        benign_key_day_alert_rate=benign.rate,
        benign_row_alert_rate=benign_row_rate,
        benign_key_days=benign.key_days,
        benign_key_days_alerted=benign.alerted,
    )


def _lookalikes(
    scored: pd.DataFrame, incident_keys: set[str], key_kinds: Mapping[str, str]
) -> dict[str, LookalikeMetrics]:
    benign = scored[~scored["api_key_id"].isin(incident_keys)]
    kinds = benign["api_key_id"].map(key_kinds).fillna("unknown")
    out = {}
    for kind, rows in benign.groupby(kinds):
        days = _key_days(rows)
        out[str(kind)] = LookalikeMetrics(
            keys=int(rows["api_key_id"].nunique()),
            key_days=days.key_days,
            key_days_alerted=days.alerted,
            benign_key_day_alert_rate=days.rate,
        )
    return dict(sorted(out.items()))


def log_to_mlflow(
    reports: Sequence[BacktestReport],
    tracking_uri: str,
    closed_loop: ClosedLoopReport | None = None,
) -> list[str]:
    """Log each report's overall and per-kind metrics as a run in `BACKTEST_EXPERIMENT`.

    With ``closed_loop``, the ensemble run also gets its figures (``closed_loop.*``) and
    its JSON as an artifact.

    Returns:
        The run ids, one per report.
    """
    import mlflow

    from qabuse_dagster import model_registry

    client = model_registry.configure(tracking_uri)
    experiment_id = model_registry.ensure_experiment(client, BACKTEST_EXPERIMENT)
    run_ids = []
    for report in reports:
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=f"backtest-{report.detector}"
        ) as run:
            mlflow.log_params(
                {
                    "detector": report.detector,
                    "train_until": report.train_until.isoformat(),
                    "eval_end": report.eval_end.isoformat(),
                }
            )
            metrics = _numeric(asdict(report.overall))
            for kind, kind_metrics in report.per_kind.items():
                metrics.update(
                    {f"{kind}.{k}": v for k, v in _numeric(asdict(kind_metrics)).items()}
                )
            if closed_loop is not None and report.detector == ENSEMBLE:
                from qabuse_dagster.evaluation.closed_loop import closed_loop_metrics

                metrics.update(closed_loop_metrics(closed_loop))
                mlflow.log_dict(closed_loop.to_dict(), "closed_loop.json")
            mlflow.log_metrics(metrics)
            run_ids.append(run.info.run_id)
    return run_ids


def _numeric(values: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float)}


#: Columns of the per-kind comparison (the CLI prints the same rows).
KIND_TABLE_COLUMNS = [
    "kind",
    "detector",
    "incidents",
    "recall",
    "median TTD (s)",
    "median delay after first row (s)",
    "precision@k",
    "PR-AUC",
    "benign alert rate (key-days)",
]


def kind_table_rows(reports: Sequence[BacktestReport]) -> list[list[str]]:
    """Rows of the per-kind table: each kind, then overall, then look-alikes, per detector."""
    rows: list[list[str]] = []
    kinds = sorted({kind for r in reports for kind in r.per_kind})
    for kind, pick in [(k, k) for k in kinds] + [("overall", None)]:
        for r in reports:
            m = r.overall if pick is None else r.per_kind.get(pick)
            if m is None:
                continue
            rows.append(
                [
                    kind,
                    r.detector,
                    str(m.incidents),
                    format_metric(m.recall),
                    format_metric(m.median_time_to_detect_s, digits=0),
                    format_metric(m.median_delay_after_first_row_s, digits=0),
                    format_metric(m.precision_at_k),
                    format_metric(m.pr_auc),
                    f"{m.benign_key_day_alert_rate:.3f} "
                    f"({m.benign_key_days_alerted}/{m.benign_key_days})",
                ]
            )
    lookalike_kinds = sorted({kind for r in reports for kind in r.lookalikes})
    for kind in lookalike_kinds:
        for r in reports:
            lm = r.lookalikes.get(kind)
            if lm is not None:
                rate = f"{lm.benign_key_day_alert_rate:.3f} ({lm.key_days_alerted}/{lm.key_days})"
                rows.append([f"benign: {kind}", r.detector, "-", "-", "-", "-", "-", "-", rate])
    return rows


def format_metric(value: float | None, missing: str = "-", digits: int = 3) -> str:
    return missing if value is None else f"{value:.{digits}f}"

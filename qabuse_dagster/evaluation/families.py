"""Train on history, score the rest: written once, for every detector family and the ensemble.

`detector_inputs` turns contract telemetry into what the families read: the api key's
window rows (every row family's features), the user rows, the key-to-user pairs, and
on demand the per-minute sequences and the campaign rows. `fit_families` fits each
family on the rows before a cutoff, `score_families` scores any rows, one column per
family aligned on the api key rows, and `fit_ensemble` combines them. `train_then_score`
chains them; the CLI's ``qabuse evaluate``, the Dagster model assets and the closed loop
all call these functions.

Scores of other entities and input kinds are brought onto the api key rows:

* user rows: each key row gets the highest score of its users' rows at the same instant;
* campaign rows (computed every few minutes): each key row gets its key's latest
  campaign row at or before it, up to the campaign window old (none: a zero row).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from models import BaseDetector, EnsembleDetector, KeyDayBudget, key_day_groups
from models.base import score_floor
from models.registry import DetectorFamily, families, get_family
from qabuse_dagster.features.definitions import (
    ACTIVITY_LOOKBACK_MINUTES,
    DEMAND_FEATURES,
    has_demand,
)
from qabuse_dagster.features.windows import minute_sequences, window_features
from qabuse_dagster.settings import DEFAULT_ALERT_BUDGET

if TYPE_CHECKING:
    from qabuse_dagster.model_registry import LoadedChampion

__all__ = [
    "ENSEMBLE",
    "DetectorInputs",
    "TrainedDetectors",
    "calibration_rows",
    "calibration_start",
    "detector_inputs",
    "drift_reference_rows",
    "ensemble_scored",
    "fit_ensemble",
    "fit_families",
    "resolve_names",
    "score_families",
    "train_then_score",
]

logger = logging.getLogger(__name__)

#: The name of the ensemble champion's scores and report rows.
ENSEMBLE = "ensemble"
#: Rows this long after the telemetry's first record have their day-long features whole.
WARM_UP = timedelta(minutes=ACTIVITY_LOOKBACK_MINUTES)
NO_WARM_UP = timedelta(0)
#: History before the cutoff below which the ensemble is calibrated in sample: split
#: out of less, the families and the slice would each see under a daily cycle.
MIN_SPLIT_HISTORY = timedelta(days=3)
#: How often campaign rows are computed over the trailing window.
CAMPAIGN_EVERY = timedelta(minutes=5)
KEY_COLUMNS = ["api_key_id", "event_timestamp"]


@dataclass(frozen=True)
class TrainingParams:
    """Knobs shared by every family's training.

    Attributes:
        alert_budget: share of training key-days allowed an alert, per family and for
            the ensemble (the threshold strategy is a `KeyDayBudget` of it).
        random_state: seed of every family (and of their subsamples).
        calibration_fraction: the last share of the (warmed-up) history the families do
            not train on; the ensemble is standardised and calibrated on their scores of
            it, out of sample, as they will score new rows (see `calibration_start`).
        warm_up: rows this soon after the telemetry's first record are left out of
            training (see `warmed_up`); none by default, `WARM_UP` (a day) for a
            deployment whose history starts with the day-long features still filling.
        overrides: per family, constructor arguments replacing its registered params.
    """

    alert_budget: float = DEFAULT_ALERT_BUDGET
    random_state: int = 0
    calibration_fraction: float = 1 / 3
    warm_up: timedelta = NO_WARM_UP
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.alert_budget < 1.0:
            raise ValueError(f"alert_budget must lie in (0, 1), got {self.alert_budget}")
        if not 0.0 <= self.calibration_fraction < 1.0:
            raise ValueError(
                f"calibration_fraction must lie in [0, 1), got {self.calibration_fraction}"
            )


def resolve_names(spec: str | Iterable[str]) -> list[str]:
    """Family names from ``all``, a comma-separated list or names; unknown ones raise KeyError.

    >>> resolve_names("isolation_forest,lof")
    ['isolation_forest', 'lof']
    """
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
    if names == ["all"]:
        return list(families())
    for name in names:
        get_family(name)
    if len(set(names)) != len(names):
        raise ValueError(f"a detector family is named twice in {names}")
    return names


@dataclass
class DetectorInputs:
    """What the families read, computed once from telemetry over ``[start, end)``."""

    telemetry: pa.Table
    start: datetime
    end: datetime
    family_names: tuple[str, ...]

    @cached_property
    def history_start(self) -> pd.Timestamp:
        """The telemetry's first record."""
        first = pa.compute.min(self.telemetry["timestamp"]).as_py()
        return pd.Timestamp(first).tz_convert("UTC")

    @cached_property
    def key_rows(self) -> pd.DataFrame:
        """The api key rows: identity columns and every api-key row family's features."""
        return self._rows("api_key_id", "api_key")

    @cached_property
    def user_rows(self) -> pd.DataFrame:
        return self._rows("user", "user")

    @cached_property
    def key_users(self) -> pd.DataFrame:
        """Distinct (api_key_id, user) pairs of the telemetry."""
        pairs = self.telemetry.select(["api_key_id", "user"]).group_by(["api_key_id", "user"])
        return pairs.aggregate([]).to_pandas()

    @cached_property
    def campaign_rows(self) -> pd.DataFrame:
        from models.campaign import campaign_features

        records = self.telemetry.to_pandas()
        records["timestamp"] = pd.to_datetime(records["timestamp"], utc=True)
        return campaign_features(records, self.start, self.end, every=CAMPAIGN_EVERY)

    def _rows(self, column: str, entity: str) -> pd.DataFrame:
        """The entity's rows with demand in their last hour (`has_demand`).

        Rows that only report the outcomes of older jobs are dropped: every family learns
        from and scores the same rows the scorer would flag.
        """
        names = {
            name
            for family in (get_family(n) for n in self.family_names)
            if family.input_kind == "rows" and family.entity == entity
            for name in family.feature_names
        }
        if column != "api_key_id" and not names:
            return pd.DataFrame(columns=[column, "event_timestamp"])
        # The api key rows exist for every family; the demand features decide which.
        rows = window_features(
            self.telemetry,
            self.start,
            self.end,
            entity_column=column,
            features=sorted(names | set(DEMAND_FEATURES)),
        ).to_pandas()
        rows = rows[has_demand(rows)].reset_index(drop=True)
        rows["event_timestamp"] = pd.to_datetime(rows["event_timestamp"], utc=True)
        return rows

    def family_matrix(
        self, family: DetectorFamily, rows: pd.DataFrame
    ) -> tuple[np.ndarray, pd.DataFrame]:
        """The family's inputs for ``rows`` of its own entity (or the campaign rows)."""
        if family.input_kind == "sequences":
            return (
                minute_sequences(
                    self.telemetry,
                    rows["api_key_id"].to_numpy(),
                    rows["event_timestamp"].to_numpy(),
                ).astype(np.float64),
                rows,
            )
        return rows[list(family.feature_names)].to_numpy(dtype=np.float64), rows

    def own_rows(self, family: DetectorFamily) -> pd.DataFrame:
        """The rows a family is fitted on and scores natively."""
        if family.input_kind == "graph":
            return self.campaign_rows
        if family.entity == "user":
            return self.user_rows
        return self.key_rows


def detector_inputs(
    telemetry: pa.Table,
    names: Sequence[str],
    start: datetime | None = None,
    end: datetime | None = None,
) -> DetectorInputs:
    """Inputs over the telemetry's span (rows up to 5 minutes after its last record)."""
    stamps = telemetry["timestamp"]
    first = pd.Timestamp(pa.compute.min(stamps).as_py()).tz_convert("UTC")
    last = pd.Timestamp(pa.compute.max(stamps).as_py()).tz_convert("UTC")
    return DetectorInputs(
        telemetry=telemetry,
        start=start or first.floor("min").to_pydatetime(),
        end=end or (last.floor("min") + pd.Timedelta(minutes=6)).to_pydatetime(),
        family_names=tuple(names),
    )


def _groups(rows: pd.DataFrame, entity_column: str) -> np.ndarray:
    return key_day_groups(rows[entity_column].to_numpy(), rows["event_timestamp"].to_numpy())


def _entity_column(family: DetectorFamily) -> str:
    return "user" if family.entity == "user" and family.input_kind != "graph" else "api_key_id"


def warmed_up(
    inputs: DetectorInputs, rows: pd.DataFrame, params: TrainingParams | None = None
) -> pd.DataFrame:
    """``rows`` at least ``params.warm_up`` after the telemetry's first record.

    A row's 24-hour features (activity around the clock, change against the day) read
    the day before it, so in the telemetry's first day every entity looks as if it had
    just started. The row families do not read the entity's age, so those rows only
    widen what training calls normal (measured on the twin: leaving the first day out
    cost a third of a week's training and raised benign alerts), and by default they
    are kept. The rows before the warm-up are used as a last resort when nothing after
    it precedes the cutoff.
    """
    warm_up = (params or TrainingParams()).warm_up
    later = rows[rows["event_timestamp"] >= inputs.history_start + warm_up]
    if later.empty and not rows.empty:
        logger.warning(
            "no training rows after the telemetry's first %s: training on rows whose "
            "day-long features are still warming up (simulate or ingest more history)",
            warm_up,
        )
        return rows
    return later


def calibration_start(
    inputs: DetectorInputs, cutoff: datetime, params: TrainingParams | None = None
) -> datetime:
    """Where the families' training ends and the ensemble's calibration slice begins.

    In-sample scores are lower than the scores of rows a model never saw (each family
    has fitted its own training rows), so an ensemble calibrated on them alerts more
    than its budget on new data. The families train before this instant and the
    ensemble is calibrated on their scores of ``[calibration_start, cutoff)``. The
    families need whole days to learn a daily cycle, and so does the slice: with under
    `MIN_SPLIT_HISTORY` of (warmed-up) history there is none to spare, and the ensemble
    is calibrated in sample (the cutoff itself), its key-day budget's tail
    extrapolation making up for part of the difference.
    """
    params = params or TrainingParams()
    warm = (inputs.history_start + params.warm_up).to_pydatetime()
    if params.calibration_fraction == 0.0 or cutoff - warm < MIN_SPLIT_HISTORY:
        return cutoff
    return cutoff - (cutoff - warm) * params.calibration_fraction


def calibration_rows(
    inputs: DetectorInputs, cutoff: datetime, params: TrainingParams | None = None
) -> pd.DataFrame:
    """The api key rows the ensemble is calibrated on: ``[calibration_start, cutoff)``,
    warmed up (all warmed-up rows before ``cutoff`` when there is no slice to spare)."""
    rows = inputs.key_rows
    history = warmed_up(inputs, rows[rows["event_timestamp"] < cutoff], params)
    start = calibration_start(inputs, cutoff, params)
    return history[history["event_timestamp"] >= start] if start < cutoff else history


#: The span of rows a version's drift reference describes: one whole daily cycle.
REFERENCE_SPAN = timedelta(days=1)


def drift_reference_rows(inputs: DetectorInputs, cutoff: datetime) -> pd.DataFrame:
    """The api key rows a version's drift reference describes (`evaluation.drift`).

    The last `REFERENCE_SPAN` before the cutoff, of rows whose day-long features are
    whole (a day after the telemetry's first record): later windows are a day of whole
    rows too, so a reference of the first, cold-start hours would read as drift. With
    less history, every row before the cutoff.
    """
    rows = inputs.key_rows
    before = rows[rows["event_timestamp"] < cutoff]
    whole = warmed_up(inputs, before, TrainingParams(warm_up=WARM_UP))
    recent = whole[whole["event_timestamp"] >= cutoff - REFERENCE_SPAN]
    return recent if not recent.empty else before


def fit_family(
    family: DetectorFamily,
    inputs: DetectorInputs,
    cutoff: datetime,
    params: TrainingParams | None = None,
) -> BaseDetector:
    """Fit ``family`` on its warmed-up rows before ``cutoff`` with a key-day budget."""
    params = params or TrainingParams()
    rows = inputs.own_rows(family)
    history = warmed_up(inputs, rows[rows["event_timestamp"] < cutoff], params)
    if history.empty:
        raise ValueError(
            f"{family.name}: no training rows before {cutoff.isoformat()}: simulate or "
            "ingest more history"
        )
    if family.train_row_limit is not None and len(history) > family.train_row_limit:
        history = history.sample(family.train_row_limit, random_state=params.random_state)
        history = history.sort_values("event_timestamp", kind="stable")
    X, history = inputs.family_matrix(family, history)
    overrides = dict(params.overrides.get(family.name, {}))
    if "random_state" in family.detector._get_param_names():
        overrides.setdefault("random_state", params.random_state)
    detector = family.build(KeyDayBudget(params.alert_budget), **overrides)
    detector.fit(X, groups=_groups(history, _entity_column(family)))
    return detector


def fit_families(
    inputs: DetectorInputs, cutoff: datetime, params: TrainingParams | None = None
) -> dict[str, BaseDetector]:
    """Every family of ``inputs`` fitted on the rows before ``cutoff``."""
    fitted = {}
    for name in inputs.family_names:
        logger.info("fitting %s", name)
        fitted[name] = fit_family(get_family(name), inputs, cutoff, params)
    return fitted


def family_scores(
    family: DetectorFamily, detector: BaseDetector, inputs: DetectorInputs, rows: pd.DataFrame
) -> np.ndarray:
    """``family``'s score of each api key row of ``rows`` (brought onto the key rows)."""
    if family.input_kind == "graph":
        native = inputs.campaign_rows
        scored = native[KEY_COLUMNS].copy()
        scored["score"] = _decision(family, detector, inputs, native)
        return _as_of(rows, scored, score_floor(detector))
    if family.entity == "user":
        users = inputs.user_rows
        scored = users[["user", "event_timestamp"]].copy()
        scored["score"] = _decision(family, detector, inputs, users)
        keyed = scored.merge(inputs.key_users, on="user").groupby(KEY_COLUMNS)["score"].max()
        joined = rows[KEY_COLUMNS].merge(keyed.reset_index(), on=KEY_COLUMNS, how="left")
        floor = score_floor(detector)
        return joined["score"].fillna(floor).to_numpy(dtype=np.float64)
    return _decision(family, detector, inputs, rows)


def ensemble_scored(
    champion: LoadedChampion, inputs: DetectorInputs, rows: pd.DataFrame
) -> pd.DataFrame:
    """``rows`` (api key rows of ``inputs``) scored by an ensemble version and the member
    versions it pins: ``api_key_id, event_timestamp, score, alert``."""
    scores = rows[KEY_COLUMNS].copy()
    for name, member in champion.members.items():
        scores[name] = family_scores(get_family(name), member.detector, inputs, rows)
    matrix = scores[list(champion.members)].to_numpy(dtype=np.float64)
    scored = rows[KEY_COLUMNS].copy()
    scored["score"] = champion.ensemble.decision_function(matrix) if len(matrix) else []
    scored["alert"] = scored["score"] > champion.ensemble.threshold_
    return scored


def _decision(
    family: DetectorFamily, detector: BaseDetector, inputs: DetectorInputs, rows: pd.DataFrame
) -> np.ndarray:
    if rows.empty:
        return np.empty(0, dtype=np.float64)
    X, _ = inputs.family_matrix(family, rows)
    return detector.decision_function(X)


def _as_of(rows: pd.DataFrame, scored: pd.DataFrame, floor: float) -> np.ndarray:
    left = rows[KEY_COLUMNS].reset_index().sort_values("event_timestamp", kind="stable")
    right = scored.sort_values("event_timestamp", kind="stable")
    unit = "datetime64[ns, UTC]"
    left["event_timestamp"] = left["event_timestamp"].astype(unit)
    right = right.assign(event_timestamp=right["event_timestamp"].astype(unit))
    joined = pd.merge_asof(
        left,
        right,
        on="event_timestamp",
        by="api_key_id",
        direction="backward",
        tolerance=pd.Timedelta(hours=1),
    ).set_index("index")
    return joined["score"].reindex(rows.index).fillna(floor).to_numpy(dtype=np.float64)


def score_families(
    detectors: Mapping[str, BaseDetector], inputs: DetectorInputs, rows: pd.DataFrame
) -> pd.DataFrame:
    """One score column per family for the api key ``rows`` (their index kept)."""
    out = rows[KEY_COLUMNS].copy()
    for name, detector in detectors.items():
        out[name] = family_scores(get_family(name), detector, inputs, rows)
    return out


def fit_ensemble(
    train_scores: pd.DataFrame, members: Sequence[str], params: TrainingParams | None = None
) -> EnsembleDetector:
    """The ensemble over ``members``' scores of the training key rows."""
    params = params or TrainingParams()
    ensemble = EnsembleDetector(
        members=tuple(members),
        reference_budget=params.alert_budget,
        threshold_strategy=KeyDayBudget(params.alert_budget),
    )
    ensemble.fit(
        train_scores[list(members)].to_numpy(dtype=np.float64),
        groups=_groups(train_scores, "api_key_id"),
    )
    return ensemble


@dataclass
class TrainedDetectors:
    """Families and ensemble fitted before ``cutoff``, and the scores of the rows after it.

    ``scored`` holds the api key rows at or after the cutoff with one score column per
    family, ``ensemble``, and one boolean ``<name>_alert`` column per detector.
    """

    cutoff: datetime
    detectors: dict[str, BaseDetector]
    ensemble: EnsembleDetector | None
    train_rows: int
    train_scores: pd.DataFrame
    scored: pd.DataFrame

    def thresholds(self) -> dict[str, float]:
        out = {name: d.threshold_ for name, d in self.detectors.items()}
        if self.ensemble is not None:
            out[ENSEMBLE] = self.ensemble.threshold_
        return out

    def scored_for(self, name: str) -> pd.DataFrame:
        """``api_key_id, event_timestamp, score, alert`` of one detector (or the ensemble)."""
        frame = self.scored[KEY_COLUMNS].copy()
        frame["score"] = self.scored[name].to_numpy()
        frame["alert"] = self.scored[f"{name}_alert"].to_numpy()
        return frame.reset_index(drop=True)


def train_then_score(
    inputs: DetectorInputs,
    cutoff: datetime,
    params: TrainingParams | None = None,
    *,
    ensemble: bool = True,
) -> TrainedDetectors:
    """Fit every family (and the ensemble) before ``cutoff``; score the rest.

    The families train on the warmed-up rows before `calibration_start`, the ensemble
    on their scores of the rows from there to ``cutoff``.
    """
    detectors = fit_families(inputs, calibration_start(inputs, cutoff, params), params)
    rows = inputs.key_rows
    history = calibration_rows(inputs, cutoff, params)
    future = rows[rows["event_timestamp"] >= cutoff]
    train_scores = score_families(detectors, inputs, history)
    scored = score_families(detectors, inputs, future)
    combined = None
    if ensemble and detectors:
        combined = fit_ensemble(train_scores, list(detectors), params)
        members = scored[list(detectors)].to_numpy(dtype=np.float64)
        scored[ENSEMBLE] = combined.decision_function(members) if len(scored) else []
    for name, detector in detectors.items():
        scored[f"{name}_alert"] = scored[name] > detector.threshold_
    if combined is not None:
        scored[f"{ENSEMBLE}_alert"] = scored[ENSEMBLE] > combined.threshold_
    return TrainedDetectors(
        cutoff=cutoff,
        detectors=detectors,
        ensemble=combined,
        train_rows=len(history),
        train_scores=train_scores,
        scored=scored.reset_index(drop=True),
    )

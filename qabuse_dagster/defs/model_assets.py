"""The detectors: one model -> evaluation -> alias chain per family, and the ensemble champion.

`family_assets` is the factory: for each family of `models.registry` it makes
``<family>_model`` (fitted before the cutoff, registered in MLflow as a new version of
``qabuse-<family>`` with @challenger), ``<family>_evaluation`` (the challenger replayed
after the cutoff and judged on the incident labels, with a blocking check) and
``<family>_alias`` (@champion, only when the check passed). The ensemble's chain
(``ensemble_model``, ``ensemble_evaluation``, ``champion_model``) combines the
families' challengers; ``champion_model`` moves @champion of the model ``/score`` serves.
The bodies call `qabuse_dagster.evaluation`: no model logic lives here.
"""

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetsDefinition,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    Output,
    asset,
)

from models.registry import families, get_family
from qabuse_dagster import model_registry
from qabuse_dagster.defs.resources import MlflowResource, QabuseStorage
from qabuse_dagster.evaluation.backtest import time_cutoff
from qabuse_dagster.evaluation.drift import model_reference
from qabuse_dagster.evaluation.families import (
    ENSEMBLE,
    DetectorInputs,
    TrainingParams,
    calibration_rows,
    calibration_start,
    detector_inputs,
    drift_reference_rows,
    ensemble_scored,
    family_scores,
    fit_ensemble,
    fit_family,
)
from qabuse_dagster.evaluation.gate import GateTolerance, champion_gate
from qabuse_dagster.evaluation.plots import png_markdown, score_timeline_png
from qabuse_dagster.evaluation.report import BacktestReport, judge
from qabuse_dagster.ingest.partitions import read_raw
from qabuse_dagster.settings import CHALLENGER_ALIAS, CHAMPION_ALIAS, DEFAULT_ALERT_BUDGET


@dataclass(frozen=True)
class TrainedDetector:
    """What a model asset hands to its evaluation and alias assets."""

    ref: model_registry.ModelVersionRef
    experiment_id: str
    cutoff: datetime
    run_url: str


class HistoryConfig(Config):
    """Which part of the stored telemetry trains (the rest evaluates).

    By default the first half trains. ``eval_hours`` instead evaluates on the last that
    many hours and trains on everything before: a drift retraining (``drift_sensor``)
    evaluates on the window whose drift started it, and learns the new population from
    the hours of it that came before.
    """

    train_fraction: float = 0.5
    eval_hours: float | None = None
    alert_budget: float = DEFAULT_ALERT_BUDGET
    random_state: int = 0


@dataclass(frozen=True)
class History:
    """The stored telemetry, the training cutoff and the training knobs."""

    inputs: DetectorInputs
    cutoff: datetime
    params: TrainingParams


@asset(
    deps=["raw_telemetry"],
    group_name="models",
    kinds={"pandas"},
    description="All raw telemetry, split at a time cutoff: the families train before it "
    "and are evaluated after it.",
)
def detector_history(config: HistoryConfig, storage: QabuseStorage) -> Output[History]:
    telemetry = read_raw(storage.paths().raw_telemetry)
    if telemetry.num_rows == 0:
        raise ValueError("no raw telemetry: materialise raw_telemetry first")
    stamps = pd.to_datetime(telemetry["timestamp"].to_pandas(), utc=True)
    if config.eval_hours is None:
        cutoff = time_cutoff(stamps, config.train_fraction)
    else:
        cutoff = _cutoff_before_last(stamps, config.eval_hours)
    inputs = detector_inputs(telemetry, list(families()))
    params = TrainingParams(alert_budget=config.alert_budget, random_state=config.random_state)
    return Output(
        History(inputs=inputs, cutoff=cutoff, params=params),
        metadata={
            "records": MetadataValue.int(telemetry.num_rows),
            "cutoff": MetadataValue.text(cutoff.isoformat()),
            "families": MetadataValue.json(list(families())),
        },
    )


def _cutoff_before_last(stamps: pd.Series, eval_hours: float) -> datetime:
    """The instant ``eval_hours`` before the newest record, which must leave history before."""
    if not eval_hours > 0:
        raise Failure(f"eval_hours must be positive, got {eval_hours}")
    cutoff = (stamps.max() - pd.Timedelta(hours=eval_hours)).to_pydatetime()
    if cutoff <= stamps.min().to_pydatetime():
        raise Failure(
            f"eval_hours {eval_hours} leaves no history to train on: the telemetry spans "
            f"{stamps.min().isoformat()} to {stamps.max().isoformat()}"
        )
    return cutoff


class EvaluationFloors(Config):
    """What a challenger must reach on labelled incidents to become @champion.

    Promotion is gated on the benign key-day alert rate, the unit the threshold is
    calibrated on; a single family need not see every kind (``min_recall`` 0), the
    ensemble champion must.
    """

    min_recall: float = 0.0
    min_precision_at_k: float = 0.5
    max_benign_key_day_alert_rate: float = 0.05


def _judge(
    name: str,
    scored: pd.DataFrame,
    threshold: float,
    cutoff: datetime,
    history: History,
    storage: QabuseStorage,
) -> BacktestReport:
    """The report of ``scored`` rows against every stored label (the twin's, analysts')."""
    return judge(name, scored, threshold, history.inputs.telemetry, storage.labels(), cutoff)


def _evaluate(
    context: AssetExecutionContext,
    name: str,
    report: BacktestReport,
    trained: TrainedDetector,
    storage: QabuseStorage,
    mlflow_store: MlflowResource,
    floors: EvaluationFloors,
    *,
    extra_metrics: dict[str, float] | None = None,
    extra_metadata: dict[str, Any] | None = None,
):
    """Log a report's figures to the version's run, yield the output and the floors check."""
    import mlflow

    png = score_timeline_png(
        report.scored,
        trained.ref.threshold,
        set().union(*map(set, report.incident_keys.values())),
        storage.paths().reports / f"scores-{name}-v{trained.ref.version}.png",
    )
    overall = report.overall
    metrics = {
        "benign_key_day_alert_rate": overall.benign_key_day_alert_rate,
        "benign_row_alert_rate": overall.benign_row_alert_rate,
        "eval_rows": float(report.eval_rows),
    }
    for key in ("recall", "precision_at_k", "median_time_to_detect_s", "pr_auc"):
        value = getattr(overall, key)
        if value is not None:
            metrics[key] = float(value)
    if report.analyst is not None and report.analyst.precision is not None:
        # Beside the twin's figures: how the version does on what analysts labelled.
        metrics["analyst_label_precision"] = report.analyst.precision
    metrics.update(extra_metrics or {})
    model_registry.configure(mlflow_store.tracking_uri)
    with mlflow.start_run(run_id=trained.ref.run_id):
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(png), artifact_path="evaluation")
        mlflow.log_dict(report.to_dict(), "evaluation/backtest_report.json")
    incidents = pd.DataFrame(
        [
            {
                "incident": o.incident_id,
                "kind": o.kind,
                "detected": o.detected,
                "time to detect (s)": o.time_to_detect_s,
            }
            for o in report.incidents
        ]
    )
    yield Output(
        report,
        metadata={
            "model": MetadataValue.text(f"{trained.ref.name} v{trained.ref.version}"),
            "mlflow_run": MetadataValue.url(trained.run_url),
            **{key: MetadataValue.float(float(value)) for key, value in metrics.items()},
            "incidents": MetadataValue.md(
                incidents.to_markdown(index=False) if not incidents.empty else "(no labels)"
            ),
            "scores": MetadataValue.md(png_markdown(png, "scores over time")),
            **(extra_metadata or {}),
        },
    )
    if not report.incidents:
        yield AssetCheckResult(
            check_name="meets_floors",
            passed=False,
            severity=AssetCheckSeverity.WARN,
            metadata={"reason": "no labelled incident in the evaluation window"},
        )
        return
    passed = (
        (overall.recall or 0.0) >= floors.min_recall
        and (overall.precision_at_k or 0.0) >= floors.min_precision_at_k
        and overall.benign_key_day_alert_rate <= floors.max_benign_key_day_alert_rate
    )
    context.log.info("%s: %s", name, "passes its floors" if passed else "misses its floors")
    yield AssetCheckResult(
        check_name="meets_floors",
        passed=passed,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "recall": overall.recall,
            "precision_at_k": overall.precision_at_k,
            "benign_key_day_alert_rate": overall.benign_key_day_alert_rate,
            "floors": json.dumps(floors.model_dump()),
        },
    )


def _trained(
    context: AssetExecutionContext,
    ref: model_registry.ModelVersionRef,
    experiment_id: str,
    cutoff: datetime,
    mlflow_store: MlflowResource,
) -> Output[TrainedDetector]:
    model_registry.set_alias(ref, CHALLENGER_ALIAS, mlflow_store.tracking_uri)
    url = model_registry.run_url(ref.run_id, experiment_id, mlflow_store.ui_url)
    return Output(
        TrainedDetector(ref=ref, experiment_id=experiment_id, cutoff=cutoff, run_url=url),
        metadata={
            "model": MetadataValue.text(f"{ref.name} v{ref.version} (@{CHALLENGER_ALIAS})"),
            "mlflow_run": MetadataValue.url(url),
            "cutoff": MetadataValue.text(cutoff.isoformat()),
            "threshold": MetadataValue.float(ref.threshold),
        },
    )


def _promote(trained: TrainedDetector, mlflow_store: MlflowResource) -> MaterializeResult:
    ref = trained.ref
    if ref.family == model_registry.ENSEMBLE_FAMILY:
        previous, _ = model_registry.promote(ref.version, ref.name, mlflow_store.tracking_uri)
    else:
        previous = None
        model_registry.set_alias(ref, CHAMPION_ALIAS, mlflow_store.tracking_uri)
    return MaterializeResult(
        metadata={
            "model": MetadataValue.text(f"{ref.name} v{ref.version} (@{CHAMPION_ALIAS})"),
            "replaced": MetadataValue.text(
                f"v{previous.version}" if previous is not None else "none"
            ),
            "mlflow_run": MetadataValue.url(trained.run_url),
            "threshold": MetadataValue.float(ref.threshold),
        }
    )


def family_assets(name: str) -> list[AssetsDefinition]:
    """The model, evaluation and alias assets of one registered family."""
    family = get_family(name)

    @asset(
        name=f"{name}_model",
        group_name="models",
        kinds={"mlflow"},
        description=f"{family.description} Fitted before the cutoff with a key-day alert "
        f"budget, registered as a new version of {model_registry.family_model_name(name)} "
        f"(@{CHALLENGER_ALIAS}).",
    )
    def _model(
        context: AssetExecutionContext, detector_history: History, mlflow_store: MlflowResource
    ) -> Output[TrainedDetector]:
        history = detector_history
        until = calibration_start(history.inputs, history.cutoff, history.params)
        detector = fit_family(family, history.inputs, until, history.params)
        ref, experiment_id = model_registry.log_detector(
            detector,
            family=name,
            params={
                **{k: v for k, v in family.params.items()},
                "alert_budget": history.params.alert_budget,
                "cutoff": history.cutoff.isoformat(),
                "input_kind": family.input_kind,
                "entity": family.entity,
            },
            metrics={"threshold": detector.threshold_},
            run_name=f"{name}-{context.run.run_id[:8]}",
            tracking_uri=mlflow_store.tracking_uri,
            dagster_run_id=context.run.run_id,
        )
        return _trained(context, ref, experiment_id, history.cutoff, mlflow_store)

    @asset(
        name=f"{name}_evaluation",
        group_name="models",
        kinds={"mlflow"},
        ins={"trained": AssetIn(f"{name}_model")},
        check_specs=[
            AssetCheckSpec(
                "meets_floors",
                asset=f"{name}_evaluation",
                blocking=True,
                description="The challenger's benign key-day alert rate and precision@k "
                "meet the floors; a failure blocks its @champion alias.",
            )
        ],
        description=f"The {name} challenger replayed after the cutoff and judged on the "
        "incident labels.",
    )
    def _evaluation(
        context: AssetExecutionContext,
        config: EvaluationFloors,
        trained: TrainedDetector,
        detector_history: History,
        storage: QabuseStorage,
        mlflow_store: MlflowResource,
    ):
        loaded = model_registry.load_detector(
            CHALLENGER_ALIAS, trained.ref.name, mlflow_store.tracking_uri
        )
        _check_version(loaded.ref, trained.ref)
        rows = detector_history.inputs.key_rows
        future = rows[rows["event_timestamp"] >= trained.cutoff]
        scored = future[["api_key_id", "event_timestamp"]].copy()
        scored["score"] = family_scores(family, loaded.detector, detector_history.inputs, future)
        scored["alert"] = scored["score"] > loaded.ref.threshold
        report = _judge(
            name, scored, loaded.ref.threshold, trained.cutoff, detector_history, storage
        )
        yield from _evaluate(context, name, report, trained, storage, mlflow_store, config)

    @asset(
        name=f"{name}_alias",
        deps=[f"{name}_evaluation"],
        group_name="models",
        kinds={"mlflow"},
        ins={"trained": AssetIn(f"{name}_model")},
        description=f"The evaluated {name} challenger as @{CHAMPION_ALIAS} of its model; "
        "runs only when its evaluation's blocking check passed.",
    )
    def _alias(trained: TrainedDetector, mlflow_store: MlflowResource) -> MaterializeResult:
        return _promote(trained, mlflow_store)

    return [_model, _evaluation, _alias]


def _check_version(
    loaded: model_registry.ModelVersionRef, trained: model_registry.ModelVersionRef
) -> None:
    if loaded.version != trained.version:
        raise RuntimeError(
            f"@{CHALLENGER_ALIAS} of {trained.name} moved to v{loaded.version} while "
            f"evaluating v{trained.version}; rerun the models group"
        )


FAMILY_ASSETS = [a for name in families() for a in family_assets(name)]


@asset(
    group_name="models",
    kinds={"mlflow"},
    deps=[f"{name}_model" for name in families()],
    description="The ensemble champion: every family's challenger, scores standardised "
    "at each family's own alert level and combined by their maximum, with its own key-day "
    "budget; registered as a new version of the served model (@challenger), pinning the "
    "family versions it combines.",
)
def ensemble_model(
    context: AssetExecutionContext,
    detector_history: History,
    mlflow_store: MlflowResource,
) -> Output[TrainedDetector]:
    history = detector_history
    # Calibrated out of sample: on the slice the families did not train on.
    train = calibration_rows(history.inputs, history.cutoff, history.params)
    scores = train[["api_key_id", "event_timestamp"]].copy()
    refs = {}
    loaded_detectors = {}
    for name in families():
        loaded = model_registry.load_detector(
            CHALLENGER_ALIAS, model_registry.family_model_name(name), mlflow_store.tracking_uri
        )
        refs[name] = loaded.ref
        loaded_detectors[name] = loaded.detector
        scores[name] = family_scores(get_family(name), loaded.detector, history.inputs, train)
    ensemble = fit_ensemble(scores, list(refs), history.params)
    # What the version saw: the drift of later rows is measured against it.
    seen = drift_reference_rows(history.inputs, history.cutoff)
    seen_scores = np.column_stack(
        [
            family_scores(get_family(name), loaded_detectors[name], history.inputs, seen)
            for name in refs
        ]
    )
    reference = model_reference(
        seen,
        sorted({n for name in families() for n in get_family(name).feature_names}),
        ensemble.decision_function(seen_scores),
    )
    ref, experiment_id = model_registry.log_detector(
        ensemble,
        family=model_registry.ENSEMBLE_FAMILY,
        params={
            "members": ",".join(refs),
            "alert_budget": history.params.alert_budget,
            "cutoff": history.cutoff.isoformat(),
            "combination": "max of scores standardised at each family's alert level",
        },
        metrics={"threshold": ensemble.threshold_},
        run_name=f"ensemble-{context.run.run_id[:8]}",
        model_name=mlflow_store.model_name,
        members=refs,
        tracking_uri=mlflow_store.tracking_uri,
        dagster_run_id=context.run.run_id,
        drift_reference=reference,
    )
    return _trained(context, ref, experiment_id, history.cutoff, mlflow_store)


class ChampionFloors(EvaluationFloors):
    """The ensemble champion must detect every labelled incident, and a challenger must
    not be worse than the current champion on the same window (`evaluation.gate`)."""

    min_recall: float = 1.0
    gate_recall_tolerance: float = GateTolerance.recall
    gate_precision_at_k_tolerance: float = GateTolerance.precision_at_k
    gate_benign_key_day_alert_rate_tolerance: float = GateTolerance.benign_key_day_alert_rate

    def tolerance(self) -> GateTolerance:
        return GateTolerance(
            recall=self.gate_recall_tolerance,
            precision_at_k=self.gate_precision_at_k_tolerance,
            benign_key_day_alert_rate=self.gate_benign_key_day_alert_rate_tolerance,
        )


GATE_CHECK = "not_worse_than_champion"


def _current_champion(
    trained: TrainedDetector, mlflow_store: MlflowResource
) -> model_registry.LoadedChampion | None:
    """The @champion the challenger must not be worse than; None for the first version."""
    try:
        current = model_registry.load_champion(
            CHAMPION_ALIAS, trained.ref.name, mlflow_store.tracking_uri
        )
    except model_registry.ModelNotFoundError:
        return None
    return None if current.ref.version == trained.ref.version else current


@asset(
    group_name="models",
    kinds={"mlflow"},
    ins={"trained": AssetIn("ensemble_model")},
    check_specs=[
        AssetCheckSpec(
            "meets_floors",
            asset="ensemble_evaluation",
            blocking=True,
            description="The ensemble detects every labelled incident within the benign "
            "key-day alert budget; a failure blocks its promotion to @champion.",
        ),
        AssetCheckSpec(
            GATE_CHECK,
            asset="ensemble_evaluation",
            blocking=True,
            description="The challenger is not worse than the current @champion on the same "
            "window and labels (recall, precision@k, benign key-day alert rate, each within "
            "its tolerance); a failure keeps it @challenger.",
        ),
    ],
    description="The ensemble challenger replayed after the cutoff and judged on the "
    "incident labels (detection, time to detect, precision@k, benign alert rates), beside "
    "the current @champion replayed on the same rows.",
)
def ensemble_evaluation(
    context: AssetExecutionContext,
    config: ChampionFloors,
    trained: TrainedDetector,
    detector_history: History,
    storage: QabuseStorage,
    mlflow_store: MlflowResource,
):
    challenger = model_registry.load_champion(
        CHALLENGER_ALIAS, trained.ref.name, mlflow_store.tracking_uri
    )
    _check_version(challenger.ref, trained.ref)
    inputs = detector_history.inputs
    rows = inputs.key_rows
    future = rows[rows["event_timestamp"] >= trained.cutoff]
    report = _judge(
        ENSEMBLE,
        ensemble_scored(challenger, inputs, future),
        trained.ref.threshold,
        trained.cutoff,
        detector_history,
        storage,
    )
    current = _current_champion(trained, mlflow_store)
    champion_figures = None
    if current is not None:
        champion_report = _judge(
            f"{ENSEMBLE} v{current.ref.version}",
            ensemble_scored(current, inputs, future),
            current.ref.threshold,
            trained.cutoff,
            detector_history,
            storage,
        )
        champion_figures = asdict(champion_report.overall)
    verdict = champion_gate(asdict(report.overall), champion_figures, config.tolerance())
    against = "none" if current is None else f"{current.ref.name} v{current.ref.version}"
    context.log.info(
        "v%s against the champion (%s): %s",
        trained.ref.version,
        against,
        "not worse" if verdict.passed else f"worse on {', '.join(verdict.worse)}",
    )
    champion_metrics = {
        f"champion_{name}": float(value)
        for name, value in (champion_figures or {}).items()
        if name in verdict.table.index and value is not None
    }
    yield from _evaluate(
        context,
        ENSEMBLE,
        report,
        trained,
        storage,
        mlflow_store,
        config,
        extra_metrics=champion_metrics,
        extra_metadata={
            "champion": MetadataValue.text(against),
            "versus_champion": MetadataValue.md(verdict.markdown()),
        },
    )
    yield AssetCheckResult(
        check_name=GATE_CHECK,
        passed=verdict.passed,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "champion": against,
            "worse_on": ", ".join(verdict.worse) or "none",
            "versus_champion": MetadataValue.md(verdict.markdown()),
        },
    )


@asset(
    deps=["ensemble_evaluation"],
    group_name="models",
    kinds={"mlflow"},
    ins={"trained": AssetIn("ensemble_model")},
    description="The evaluated ensemble promoted to alias @champion, which the scoring "
    "endpoint serves. Runs only when ensemble_evaluation's blocking check passed.",
)
def champion_model(trained: TrainedDetector, mlflow_store: MlflowResource) -> MaterializeResult:
    return _promote(trained, mlflow_store)


__all__ = [
    "FAMILY_ASSETS",
    "BacktestReport",
    "champion_model",
    "detector_history",
    "ensemble_evaluation",
    "ensemble_model",
    "family_assets",
]

"""The detector: trained, registered in MLflow, evaluated, and promoted to @champion."""

import json
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    Output,
    asset,
)

from qabuse_dagster import model_registry
from qabuse_dagster.defs.resources import MlflowResource, QabuseStorage
from qabuse_dagster.evaluation.backtest import DetectorParams, fit_detector, score_rows, time_cutoff
from qabuse_dagster.evaluation.detection import evaluate_detections
from qabuse_dagster.evaluation.labels import read_labels
from qabuse_dagster.evaluation.plots import png_markdown, score_timeline_png
from qabuse_dagster.features.definitions import DETECTOR_FEATURES
from qabuse_dagster.features.store import FEATURE_SERVICE
from qabuse_dagster.settings import CHALLENGER_ALIAS, CHAMPION_ALIAS


@dataclass(frozen=True)
class TrainedDetector:
    """What the training asset hands to evaluation and promotion."""

    ref: model_registry.ModelVersionRef
    experiment_id: str
    cutoff: datetime
    run_url: str


class DetectorConfig(Config):
    """Training knobs, editable in the launchpad."""

    train_fraction: float = 0.6
    n_estimators: int = 200
    contamination: float = 0.01
    random_state: int = 0
    alert_budget: float = 0.02


@asset(
    group_name="models",
    kinds={"scikitlearn", "mlflow"},
    description="Isolation Forest fitted on the training rows before the time cutoff, "
    "logged to MLflow (skops) and registered as a new version with alias @challenger.",
)
def detector_model(
    context: AssetExecutionContext,
    config: DetectorConfig,
    training_set: pd.DataFrame,
    mlflow_store: MlflowResource,
) -> Output[TrainedDetector]:
    cutoff = time_cutoff(training_set["event_timestamp"], config.train_fraction)
    history = training_set[training_set["event_timestamp"] < cutoff]
    params = DetectorParams(
        config.n_estimators, config.contamination, config.random_state, config.alert_budget
    )
    detector = fit_detector(history, DETECTOR_FEATURES, params)
    ref, experiment_id = model_registry.log_detector(
        detector,
        feature_names=DETECTOR_FEATURES,
        feature_service=FEATURE_SERVICE,
        input_example=history.head(5),
        params={
            **params.__dict__,
            "train_fraction": config.train_fraction,
            "train_rows": len(history),
            "cutoff": cutoff.isoformat(),
        },
        metrics={"threshold": detector.threshold_},
        run_name=f"isolation-forest-{context.run.run_id[:8]}",
        model_name=mlflow_store.model_name,
        tracking_uri=mlflow_store.tracking_uri,
    )
    model_registry.set_alias(ref, CHALLENGER_ALIAS, mlflow_store.tracking_uri)
    url = model_registry.run_url(ref.run_id, experiment_id, mlflow_store.ui_url)
    return Output(
        TrainedDetector(ref=ref, experiment_id=experiment_id, cutoff=cutoff, run_url=url),
        metadata={
            "model": MetadataValue.text(f"{ref.name} v{ref.version} (@{CHALLENGER_ALIAS})"),
            "mlflow_run": MetadataValue.url(url),
            "train_rows": MetadataValue.int(len(history)),
            "cutoff": MetadataValue.text(cutoff.isoformat()),
            "threshold": MetadataValue.float(detector.threshold_),
        },
    )


class EvaluationFloors(Config):
    """What a challenger must reach on labelled incidents to become @champion."""

    min_recall: float = 1.0
    min_precision_at_k: float = 0.5
    max_benign_alert_rate: float = 0.05


@asset(
    group_name="models",
    kinds={"mlflow"},
    check_specs=[
        AssetCheckSpec(
            "meets_floors",
            asset="detector_evaluation",
            blocking=True,
            description="The challenger detects the labelled incidents with few benign "
            "alerts; a failure blocks its promotion to @champion.",
        )
    ],
    description="The challenger replayed on rows after the cutoff and scored against the "
    "incident labels: detection, time to detect, precision@k, benign alert rate.",
)
def detector_evaluation(
    config: EvaluationFloors,
    training_set: pd.DataFrame,
    detector_model: TrainedDetector,
    storage: QabuseStorage,
    mlflow_store: MlflowResource,
):
    import mlflow

    loaded = model_registry.load_detector(
        CHALLENGER_ALIAS, mlflow_store.model_name, mlflow_store.tracking_uri
    )
    if loaded.ref.version != detector_model.ref.version:
        raise RuntimeError(
            f"@{CHALLENGER_ALIAS} moved to v{loaded.ref.version} while evaluating "
            f"v{detector_model.ref.version}; rerun the models group"
        )
    scored = score_rows(loaded.detector, training_set, DETECTOR_FEATURES)
    end = training_set["event_timestamp"].max() + pd.Timedelta(seconds=1)
    labels_path = storage.paths().labels
    labels = read_labels(labels_path) if labels_path.exists() else []
    report = evaluate_detections(scored, labels, start=detector_model.cutoff, end=end)
    incident_keys = {k for label in labels for k in (label.api_key_ids or [])}
    evaluated = scored[scored["event_timestamp"] >= detector_model.cutoff]
    reports_dir = storage.paths().reports
    png = score_timeline_png(
        evaluated,
        loaded.ref.threshold,
        incident_keys,
        reports_dir / f"scores-v{loaded.ref.version}.png",
    )
    metrics = {
        "benign_alert_rate": report.benign_alert_rate,
        "eval_rows": float(report.rows),
        "eval_alerts": float(report.alerts),
    }
    if report.recall is not None:
        metrics["recall"] = report.recall
    if report.precision_at_k is not None:
        metrics["precision_at_k"] = report.precision_at_k
    detected = [o.time_to_detect_s for o in report.incidents if o.time_to_detect_s is not None]
    if detected:
        metrics["median_time_to_detect_s"] = float(pd.Series(detected).median())
    model_registry.configure(mlflow_store.tracking_uri)
    with mlflow.start_run(run_id=loaded.ref.run_id):
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(png), artifact_path="evaluation")
        with tempfile.TemporaryDirectory() as tmp:
            report_json = Path(tmp) / "detection_report.json"
            report_json.write_text(json.dumps(report.to_dict(), indent=2))
            mlflow.log_artifact(str(report_json), artifact_path="evaluation")
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
    ranked = pd.DataFrame(report.ranked_keys, columns=["api key", "max score", "incident key"])
    yield Output(
        report,
        metadata={
            "model": MetadataValue.text(f"{loaded.ref.name} v{loaded.ref.version}"),
            "mlflow_run": MetadataValue.url(detector_model.run_url),
            **{name: MetadataValue.float(float(value)) for name, value in metrics.items()},
            "labelled_incidents": MetadataValue.int(len(report.incidents)),
            "incidents": MetadataValue.md(
                incidents.to_markdown(index=False) if not incidents.empty else "(no labels)"
            ),
            "top_keys": MetadataValue.md(ranked.to_markdown(index=False, floatfmt=".4f")),
            "scores": MetadataValue.md(png_markdown(png, "scores over time")),
            "scores_png": MetadataValue.path(str(png)),
        },
    )
    if not report.incidents:
        yield AssetCheckResult(
            check_name="meets_floors",
            passed=False,
            severity=AssetCheckSeverity.WARN,
            metadata={
                "reason": "no labelled incident in the evaluation window; promotion "
                "is not gated by quality"
            },
        )
        return
    passed = (
        (report.recall or 0.0) >= config.min_recall
        and (report.precision_at_k or 0.0) >= config.min_precision_at_k
        and report.benign_alert_rate <= config.max_benign_alert_rate
    )
    yield AssetCheckResult(
        check_name="meets_floors",
        passed=passed,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "recall": report.recall,
            "precision_at_k": report.precision_at_k,
            "benign_alert_rate": report.benign_alert_rate,
            "floors": json.dumps(config.model_dump()),
        },
    )


@asset(
    deps=["detector_evaluation"],
    group_name="models",
    kinds={"mlflow"},
    description="The evaluated challenger promoted to alias @champion, which the scoring "
    "endpoint serves. Runs only when detector_evaluation's blocking check passed.",
)
def champion_model(
    detector_model: TrainedDetector, mlflow_store: MlflowResource
) -> MaterializeResult:
    ref = detector_model.ref
    model_registry.set_alias(ref, CHAMPION_ALIAS, mlflow_store.tracking_uri)
    return MaterializeResult(
        metadata={
            "model": MetadataValue.text(f"{ref.name} v{ref.version} (@{CHAMPION_ALIAS})"),
            "mlflow_run": MetadataValue.url(detector_model.run_url),
            "threshold": MetadataValue.float(ref.threshold),
        }
    )

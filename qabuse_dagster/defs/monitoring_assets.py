"""Monitoring: the drift of the champion's inputs since it was trained.

``feature_drift`` compares the last day of api-key window rows (the rows the detectors
score: those with demand) with the bins of the rows the ``@champion`` version was
trained on, logged with that version (`qabuse_dagster.evaluation.drift`), and the
champion's scores of that day with its scores of its training rows. Its checks warn at
PSI 0.1 and fail at 0.25 on any input or the score, both configurable; the drift
sensor counts the inputs at the error level.
"""

# No `from __future__ import annotations`: Dagster reads the config class off the
# signature at definition time.
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    Output,
    asset,
)

from qabuse_dagster import model_registry, settings
from qabuse_dagster.defs.resources import MlflowResource, QabuseStorage
from qabuse_dagster.evaluation.continuous import window_figures
from qabuse_dagster.evaluation.drift import (
    PSI_ERROR,
    PSI_WARN,
    SCORE_FEATURE,
    entity_weights,
    feature_drift,
    newest_row_time,
    recent_rows,
)
from qabuse_dagster.evaluation.families import WARM_UP, detector_inputs, ensemble_scored
from qabuse_dagster.evaluation.plots import drift_png, png_markdown, series_png
from qabuse_dagster.evaluation.report import users_keys
from qabuse_dagster.features.definitions import has_demand
from qabuse_dagster.ingest.partitions import read_raw

__all__ = [
    "DriftConfig",
    "EvaluationWindowConfig",
    "continuous_evaluation_asset",
    "feature_drift_asset",
]

WARN_CHECK = "psi_below_warn"
ERROR_CHECK = "psi_below_error"


class DriftConfig(Config):
    """How much recent data to compare, the PSI levels of the two checks, and the fewest
    active api keys whose drift is judged.

    Every key weighs the same (`entity_weights`), so the keys are the sample: the decile
    shares of a handful of keys are noise, and a deployment of ten keys reads as drifting
    whenever one of them changes its week. Under ``min_keys`` the figures are shown and
    the checks pass, saying why.
    """

    window_hours: float = 24.0
    psi_warn: float = PSI_WARN
    psi_error: float = PSI_ERROR
    min_keys: int = 30


@asset(
    name="feature_drift",
    group_name="monitoring",
    kinds={"mlflow", "pandas"},
    description="PSI and Jensen-Shannon distance of every champion input, and of the "
    "champion's own score: the last day of api-key window rows against the bins of the "
    "rows the @champion was trained on.",
    check_specs=[
        AssetCheckSpec(
            WARN_CHECK,
            asset="feature_drift",
            description="Every input's PSI is under the warn level (0.1 by default).",
        ),
        AssetCheckSpec(
            ERROR_CHECK,
            asset="feature_drift",
            description="Every input's PSI is under the error level (0.25 by default): above "
            "it, the champion scores a population it was not trained on.",
        ),
    ],
)
def feature_drift_asset(
    context: AssetExecutionContext,
    config: DriftConfig,
    storage: QabuseStorage,
    mlflow_store: MlflowResource,
):
    if not config.psi_warn <= config.psi_error:
        raise Failure(f"psi_warn {config.psi_warn} must not exceed psi_error {config.psi_error}")
    champion = model_registry.resolve_alias(
        settings.CHAMPION_ALIAS, mlflow_store.model_name, mlflow_store.tracking_uri
    )
    reference = model_registry.load_drift_reference(champion, mlflow_store.tracking_uri)
    if reference is None:
        raise Failure(
            f"{champion.name} v{champion.version} (@champion) has no drift reference: it was "
            "trained before drift monitoring; run training_job to register one that has"
        )
    paths = storage.paths()
    span = timedelta(hours=config.window_hours)
    rows = recent_rows(paths.api_key_windows, span)
    rows = rows[has_demand(rows)] if not rows.empty else rows
    if rows.empty:
        raise Failure(f"no api-key window rows in {paths.api_key_windows} to compare")
    inputs = {name: bins for name, bins in reference.items() if name in rows.columns}
    # Every key weighs the same, as in the reference: a key's attack is not the
    # population's drift (`entity_weights`).
    drift = feature_drift(
        inputs, rows, config.psi_warn, config.psi_error, weights=entity_weights(rows)
    )
    drift = drift.sort_values("psi", ascending=False)
    failed = drift.index[drift["level"] == "error"].tolist()
    if SCORE_FEATURE in reference:
        newest = pd.to_datetime(rows["event_timestamp"], utc=True).max().to_pydatetime()
        scored = _champion_scored(paths, _load_champion(mlflow_store), newest, span)
        score = feature_drift(
            {SCORE_FEATURE: reference[SCORE_FEATURE]},
            scored.rows.rename(columns={"score": SCORE_FEATURE}),
            config.psi_warn,
            config.psi_error,
            weights=entity_weights(scored.rows),
        )
        drift = pd.concat([score, drift])
    # The checks read the score with the inputs; the sensor counts inputs alone.
    warned = drift.index[drift["level"] != "ok"].tolist()
    errors = drift.index[drift["level"] == "error"].tolist()
    keys = int(rows["api_key_id"].nunique())
    judged = keys >= config.min_keys
    verdict: dict[str, Any] = {"keys": keys, "judged": judged}
    if not judged:
        verdict["why"] = (
            f"{keys} active api keys, under the {config.min_keys} whose drift is judged: "
            "the shares of so few keys are noise"
        )
        context.log.info("drift not judged: %s", verdict["why"])
    plot = drift_png(drift, Path(paths.reports) / f"drift-{context.run.run_id[:8]}.png")
    table = drift[["psi", "js_distance", "level", "rows"]].round(4)
    metadata: dict[str, Any] = {
        "champion": f"{champion.name} v{champion.version}",
        "rows_compared": len(rows),
        "window_hours": config.window_hours,
        "features": len(inputs),
        "features_warn_or_worse": len([name for name in warned if name != SCORE_FEATURE]),
        "features_error": len(failed),
        "max_psi": float(drift.loc[list(inputs), "psi"].max()) if inputs else 0.0,
        "drift": MetadataValue.md(table.to_markdown()),
        "plot": MetadataValue.md(png_markdown(plot, "reference against current bins")),
        "not_compared": ", ".join(sorted(set(reference) - set(inputs) - {SCORE_FEATURE})) or "none",
        **verdict,
    }
    if SCORE_FEATURE in drift.index:
        metadata["score_psi"] = float(drift.loc[SCORE_FEATURE, "psi"])
        metadata["score_js_distance"] = float(drift.loc[SCORE_FEATURE, "js_distance"])
        metadata["score_level"] = str(drift.loc[SCORE_FEATURE, "level"])
    yield Output(drift.drop(columns=["reference_shares", "current_shares"]), metadata=metadata)
    yield AssetCheckResult(
        check_name=WARN_CHECK,
        passed=not (judged and warned),
        severity=AssetCheckSeverity.WARN,
        metadata={
            "features": ", ".join(warned) or "none",
            "psi_warn": config.psi_warn,
            **verdict,
        },
    )
    yield AssetCheckResult(
        check_name=ERROR_CHECK,
        passed=not (judged and errors),
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "features": ", ".join(errors) or "none",
            "psi_error": config.psi_error,
            **verdict,
        },
    )


@dataclass(frozen=True)
class _Scored:
    """The champion's verdicts on a recent window, and the telemetry they came from."""

    rows: pd.DataFrame  # api_key_id, event_timestamp, score, alert
    telemetry: pa.Table
    start: datetime
    end: datetime


def _champion_scored(
    paths: settings.Paths,
    champion: model_registry.LoadedChampion,
    newest: datetime,
    span: timedelta,
) -> _Scored:
    """The @champion's scores of the api-key rows with demand in ``(newest - span, newest]``.

    The rows are recomputed from raw telemetry with a day of history before the window,
    so that day-long features are whole, as the families saw them in training, and every
    family gets the inputs it reads (sequences, campaign views), not only window rows.
    """
    start = newest - span
    telemetry = read_raw(paths.raw_telemetry, start - WARM_UP, newest + timedelta(minutes=1))
    inputs = detector_inputs(telemetry, list(champion.members))
    recomputed = inputs.key_rows
    at = pd.to_datetime(recomputed["event_timestamp"], utc=True)
    inside = (at > pd.Timestamp(start)) & (at <= pd.Timestamp(newest))
    wanted = recomputed[inside & has_demand(recomputed)]
    return _Scored(
        rows=ensemble_scored(champion, inputs, wanted),
        telemetry=telemetry,
        start=start,
        end=newest + timedelta(seconds=1),
    )


def _load_champion(mlflow_store: MlflowResource) -> model_registry.LoadedChampion:
    return model_registry.load_champion(
        settings.CHAMPION_ALIAS, mlflow_store.model_name, mlflow_store.tracking_uri
    )


class EvaluationWindowConfig(Config):
    """How much recent data the hourly evaluation judges."""

    window_hours: float = 1.0


@asset(
    name="continuous_evaluation",
    group_name="monitoring",
    kinds={"mlflow", "pandas"},
    description="The @champion's alerts of the last hour against the labels active in it "
    "(the twin's and analysts'): key-level precision, benign alert rate and recall, one "
    "point per run in the version's MLflow time series.",
)
def continuous_evaluation_asset(
    context: AssetExecutionContext,
    config: EvaluationWindowConfig,
    storage: QabuseStorage,
    mlflow_store: MlflowResource,
) -> MaterializeResult:
    if not config.window_hours > 0:
        raise Failure(f"window_hours must be positive, got {config.window_hours}")
    paths = storage.paths()
    newest = newest_row_time(paths.api_key_windows)
    if newest is None:
        raise Failure(f"no api-key window rows in {paths.api_key_windows} to evaluate")
    champion = _load_champion(mlflow_store)
    scored = _champion_scored(paths, champion, newest, timedelta(hours=config.window_hours))
    user_keys = users_keys(scored.telemetry.select(["user", "api_key_id"]).to_pandas())
    figures = window_figures(scored.rows, storage.labels(), scored.start, scored.end, user_keys)
    at_ms = int(scored.end.timestamp() * 1000)
    # The hourly series keeps the plain names; a longer window (a label-driven run) has
    # its own series, so that one point never mixes an hour with a week.
    suffix = "" if config.window_hours == 1.0 else f"_{config.window_hours:g}h"
    run_id, experiment_id, series = model_registry.log_window_metrics(
        champion.ref,
        {f"{name}{suffix}": value for name, value in figures.metrics().items()},
        at_ms,
        mlflow_store.tracking_uri,
    )
    shown = {
        name: series[f"{name}{suffix}"] for name in SERIES_SHOWN if f"{name}{suffix}" in series
    }
    plot = series_png(
        shown,
        Path(paths.reports) / f"continuous-{context.run.run_id[:8]}.png",
        title=f"{champion.ref.name} v{champion.ref.version}: hourly evaluation",
    )
    table = (
        pd.DataFrame({name: dict(points) for name, points in shown.items()})
        .sort_index()
        .tail(SERIES_ROWS)
    )
    table.index = pd.to_datetime(table.index, unit="ms", utc=True).strftime("%Y-%m-%d %H:%M")
    context.log.info(
        "%s v%s over %s: %d of %d active keys alerted",
        champion.ref.name,
        champion.ref.version,
        f"{scored.start:%Y-%m-%d %H:%M}..{scored.end:%H:%M}",
        figures.alerted_keys,
        figures.active_keys,
    )
    metadata: dict[str, Any] = {
        "champion": f"{champion.ref.name} v{champion.ref.version}",
        "window": f"{scored.start.isoformat()} .. {scored.end.isoformat()}",
        **{name: MetadataValue.float(value) for name, value in figures.metrics().items()},
        "labelled_incident_in_window": figures.incident_keys > 0,
        "series": MetadataValue.md(table.round(4).to_markdown()),
        "plot": MetadataValue.md(png_markdown(plot, "hourly precision and benign alert rate")),
        "mlflow_run": MetadataValue.url(
            model_registry.run_url(run_id, experiment_id, mlflow_store.ui_url)
        ),
    }
    return MaterializeResult(metadata=metadata)


#: The figures the metadata's table and plot show, and how many hours of them.
SERIES_SHOWN = ("precision", "benign_alert_rate", "recall")
SERIES_ROWS = 24

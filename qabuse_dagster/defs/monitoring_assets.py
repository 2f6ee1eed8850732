"""Monitoring: the drift of the champion's inputs since it was trained.

``feature_drift`` compares the last day of api-key window rows (the rows the detectors
score: those with demand) with the bins of the rows the ``@champion`` version was
trained on, logged with that version (`qabuse_dagster.evaluation.drift`). Its checks
warn at PSI 0.1 and fail at 0.25 on any feature, both configurable.
"""

# No `from __future__ import annotations`: Dagster reads the config class off the
# signature at definition time.
from datetime import timedelta
from pathlib import Path
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    Failure,
    MetadataValue,
    Output,
    asset,
)

from qabuse_dagster import model_registry, settings
from qabuse_dagster.defs.resources import MlflowResource, QabuseStorage
from qabuse_dagster.evaluation.drift import (
    PSI_ERROR,
    PSI_WARN,
    SCORE_FEATURE,
    feature_drift,
    recent_rows,
)
from qabuse_dagster.evaluation.plots import drift_png, png_markdown
from qabuse_dagster.features.definitions import has_demand

__all__ = ["DriftConfig", "feature_drift_asset"]

WARN_CHECK = "psi_below_warn"
ERROR_CHECK = "psi_below_error"


class DriftConfig(Config):
    """How much recent data to compare, and the PSI levels of the two checks."""

    window_hours: float = 24.0
    psi_warn: float = PSI_WARN
    psi_error: float = PSI_ERROR


@asset(
    name="feature_drift",
    group_name="monitoring",
    kinds={"mlflow", "pandas"},
    description="PSI and Jensen-Shannon distance of every champion input: the last day of "
    "api-key window rows against the bins of the rows the @champion was trained on.",
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
    rows = recent_rows(paths.api_key_windows, timedelta(hours=config.window_hours))
    rows = rows[has_demand(rows)] if not rows.empty else rows
    if rows.empty:
        raise Failure(f"no api-key window rows in {paths.api_key_windows} to compare")
    inputs = {name: bins for name, bins in reference.items() if name in rows.columns}
    drift = feature_drift(inputs, rows, config.psi_warn, config.psi_error)
    drift = drift.sort_values("psi", ascending=False)
    warned = drift.index[drift["level"] != "ok"].tolist()
    failed = drift.index[drift["level"] == "error"].tolist()
    plot = drift_png(drift, Path(paths.reports) / f"drift-{context.run.run_id[:8]}.png")
    table = drift[["psi", "js_distance", "level", "rows"]].round(4)
    metadata: dict[str, Any] = {
        "champion": f"{champion.name} v{champion.version}",
        "rows_compared": len(rows),
        "window_hours": config.window_hours,
        "features": len(drift),
        "features_warn_or_worse": len(warned),
        "features_error": len(failed),
        "max_psi": float(drift["psi"].max()) if len(drift) else 0.0,
        "drift": MetadataValue.md(table.to_markdown()),
        "plot": MetadataValue.md(png_markdown(plot, "reference against current bins")),
        "not_compared": ", ".join(sorted(set(reference) - set(inputs) - {SCORE_FEATURE})) or "none",
    }
    yield Output(drift.drop(columns=["reference_shares", "current_shares"]), metadata=metadata)
    yield AssetCheckResult(
        check_name=WARN_CHECK,
        passed=not warned,
        severity=AssetCheckSeverity.WARN,
        metadata={"features": ", ".join(warned) or "none", "psi_warn": config.psi_warn},
    )
    yield AssetCheckResult(
        check_name=ERROR_CHECK,
        passed=not failed,
        severity=AssetCheckSeverity.ERROR,
        metadata={"features": ", ".join(failed) or "none", "psi_error": config.psi_error},
    )

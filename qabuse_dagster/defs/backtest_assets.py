"""The backtest of qabuse and the tutorial baseline on the stored telemetry and labels."""

import json

import pandas as pd
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from qabuse_dagster.defs.resources import MlflowResource, QabuseStorage
from qabuse_dagster.evaluation.families import ENSEMBLE, resolve_names
from qabuse_dagster.evaluation.html_report import write_html
from qabuse_dagster.evaluation.report import (
    BASELINE,
    KIND_TABLE_COLUMNS,
    kind_table_rows,
    log_to_mlflow,
    run_backtests,
)
from qabuse_dagster.ingest.partitions import read_raw
from qabuse_dagster.telemetry.labels import read_labels


@asset(
    deps=["raw_telemetry"],
    group_name="evaluation",
    kinds={"scikitlearn", "mlflow"},
    description="The ensemble champion, every detector family and the reference tutorial's "
    "baseline replayed on all raw telemetry (first half trains) and judged on the stored "
    "incident labels, per abuse kind: the same function as `qabuse evaluate --detector all`. "
    "JSON and HTML under $QABUSE_HOME/reports, metrics in MLflow.",
)
def backtest_report(
    context: AssetExecutionContext, storage: QabuseStorage, mlflow_store: MlflowResource
) -> MaterializeResult:
    paths = storage.paths()
    if not paths.labels.exists():
        raise ValueError(f"no incident labels at {paths.labels}: `qabuse ingest --labels` first")
    labels = read_labels(paths.labels)
    telemetry = read_raw(paths.raw_telemetry)
    if telemetry.num_rows == 0:
        raise ValueError("no raw telemetry: materialise raw_telemetry first")
    names = [ENSEMBLE, *resolve_names("all"), BASELINE]
    reports = run_backtests(telemetry, labels, detectors=names)
    paths.reports.mkdir(parents=True, exist_ok=True)
    json_path = paths.reports / "backtest.json"
    by_name = {report.detector: report.to_dict() for report in reports}
    json_path.write_text(
        json.dumps(
            {**by_name[ENSEMBLE], "detectors": by_name, "baseline": by_name[BASELINE]}, indent=2
        )
    )
    html_path = write_html(reports, paths.reports / "backtest.html")
    run_ids = log_to_mlflow(reports, mlflow_store.tracking_uri)
    context.log.info("backtest runs in MLflow: %s", run_ids)
    table = pd.DataFrame(kind_table_rows(reports), columns=list(KIND_TABLE_COLUMNS))
    qabuse, baseline = reports[0], reports[-1]
    return MaterializeResult(
        metadata={
            "per_kind": MetadataValue.md(table.to_markdown(index=False)),
            "recall": MetadataValue.float(float(qabuse.overall.recall or 0.0)),
            "baseline_recall": MetadataValue.float(float(baseline.overall.recall or 0.0)),
            "benign_key_day_alert_rate": MetadataValue.float(
                qabuse.overall.benign_key_day_alert_rate
            ),
            "html_report": MetadataValue.path(str(html_path)),
            "json_report": MetadataValue.path(str(json_path)),
            "mlflow_runs": MetadataValue.json(run_ids),
        }
    )

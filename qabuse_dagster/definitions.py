"""The one Dagster ``Definitions`` of qabuse, loaded by ``workspace.yaml``."""

from pathlib import Path

from dagster import Definitions, FilesystemIOManager, load_assets_from_modules

from qabuse_dagster import settings
from qabuse_dagster.defs import (
    backtest_assets,
    feature_assets,
    model_assets,
    monitoring_assets,
    telemetry_assets,
)
from qabuse_dagster.defs.jobs import (
    backtest_job,
    evaluation_job,
    hourly_monitoring_schedule,
    monitoring_job,
    telemetry_job,
    training_job,
    weekly_training_schedule,
)
from qabuse_dagster.defs.resources import FeastResource, MlflowResource, QabuseStorage
from qabuse_dagster.defs.sensors import drift_sensor, label_sensor, landed_telemetry_sensor


def build_definitions(home: Path | None = None) -> Definitions:
    """Definitions bound to one ``QABUSE_HOME`` (the environment's unless given)."""
    home = settings.export_home(home)
    paths = settings.Paths(home)
    return Definitions(
        assets=load_assets_from_modules(
            [telemetry_assets, feature_assets, model_assets, backtest_assets, monitoring_assets]
        ),
        jobs=[telemetry_job, training_job, backtest_job, monitoring_job, evaluation_job],
        schedules=[weekly_training_schedule, hourly_monitoring_schedule],
        sensors=[landed_telemetry_sensor, drift_sensor, label_sensor],
        resources={
            "storage": QabuseStorage(home=str(home)),
            "feast": FeastResource(repo_path=str(settings.feature_repo_dir()), home=str(home)),
            "mlflow_store": MlflowResource(
                tracking_uri=settings.mlflow_tracking_uri(), model_name=settings.model_name()
            ),
            # Explicit, so in-process runs persist asset values too and the UI can rerun
            # any single asset later.
            "io_manager": FilesystemIOManager(base_dir=str(paths.dagster_home / "storage")),
        },
    )


defs = build_definitions()

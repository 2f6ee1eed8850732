"""The one Dagster ``Definitions`` of qabuse, loaded by ``workspace.yaml``.

Its executor is cross-cutting policy, so it is chosen here, from the environment
(``QABUSE_DAGSTER_EXECUTOR``): by default Dagster's multiprocess executor, each step of a
launched run in a process of its own (so the two entities' window features of an hour
compute side by side), ``max_concurrent`` at a time (run config
``execution: {config: {max_concurrent: N}}``, default one per CPU). A cluster swaps it by
configuration alone: ``dagster_k8s:k8s_job_executor`` (a pod per step) or
``dagster_celery:celery_executor``, with the matching ``run_launcher`` in ``dagster.yaml``.
In-process runs (``qabuse demo``, ``qabuse materialize``) run their steps in process
whatever it is.
"""

import importlib
from pathlib import Path

from dagster import (
    Definitions,
    ExecutorDefinition,
    FilesystemIOManager,
    load_assets_from_modules,
)

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


def launched_run_executor(spec: str | None = None) -> ExecutorDefinition:
    """The executor named ``module:attribute`` (default ``QABUSE_DAGSTER_EXECUTOR``'s).

    Raises:
        ValueError: ``spec`` is not ``module:attribute``, or names no executor.
    """
    spec = spec or settings.dagster_executor()
    module, _, attribute = spec.partition(":")
    problem = f"{settings.DAGSTER_EXECUTOR_ENV}={spec!r}"
    if not module or not attribute:
        raise ValueError(
            f"{problem}: expected module:attribute, e.g. dagster:multiprocess_executor"
        )
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{problem}: {exc}") from None
    if not isinstance(found, ExecutorDefinition):
        raise ValueError(f"{problem} is a {type(found).__name__}, not a Dagster executor")
    return found


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
        executor=launched_run_executor(),
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

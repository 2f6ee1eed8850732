"""Jobs: the hourly telemetry slice, the train-evaluate-promote chain, monitoring (drift
and continuous evaluation); and their schedules."""

from dagster import AssetSelection, DefaultScheduleStatus, ScheduleDefinition, define_asset_job

from qabuse_dagster.defs.partitions import HOURLY_PARTITIONS

telemetry_job = define_asset_job(
    "telemetry_job",
    selection=AssetSelection.groups("telemetry", "features")
    - AssetSelection.assets("feast_online_store", "training_set"),
    partitions_def=HOURLY_PARTITIONS,
    description="Compact landed telemetry into raw partitions and compute window features.",
)

training_job = define_asset_job(
    "training_job",
    selection=AssetSelection.assets("feast_online_store", "training_set")
    | AssetSelection.groups("models"),
    description="Apply and materialise Feast, build the training set, train, register, "
    "evaluate and promote the detector.",
)

backtest_job = define_asset_job(
    "backtest_job",
    selection=AssetSelection.groups("evaluation"),
    description="Backtest qabuse against the tutorial baseline on all stored telemetry.",
)

monitoring_job = define_asset_job(
    "monitoring_job",
    selection=AssetSelection.groups("monitoring"),
    description="Measure the drift of the champion's inputs and score over the last day of "
    "window rows, and judge its alerts of the last hour against the labels.",
)

evaluation_job = define_asset_job(
    "evaluation_job",
    selection=AssetSelection.assets("continuous_evaluation"),
    description="Judge the champion's alerts of a recent window against the labels (what "
    "label_sensor starts when analysts have labelled enough new alerts).",
)

#: Retraining on a calendar, whatever the drift: Mondays 03:00 UTC. Stopped until turned
#: on (in the UI, or ``dagster schedule start``), so that a fresh home does not train twice.
weekly_training_schedule = ScheduleDefinition(
    name="weekly_training_schedule",
    job=training_job,
    cron_schedule="0 3 * * 1",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.STOPPED,
    description="Retrain every family and the ensemble weekly (Monday 03:00 UTC).",
)

hourly_monitoring_schedule = ScheduleDefinition(
    name="hourly_monitoring_schedule",
    job=monitoring_job,
    cron_schedule="15 * * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.STOPPED,
    description="Measure drift and evaluate the champion's last hour every hour, a quarter "
    "past (after the hour's windows).",
)

"""Jobs: the hourly telemetry slice, and the train-evaluate-promote chain."""

from dagster import AssetSelection, define_asset_job

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

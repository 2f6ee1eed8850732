"""The sensor daemon's handling of a tick's run requests, for in-process runs in tests.

Dagster's daemon evaluates a sensor, then for each `RunRequest` looks for a run that
carries the same run key from the same sensor (`dagster._daemon.sensor.fetch_existing_runs`)
and skips the request when there is one; otherwise it starts the job with the request's
run config and tags, plus its own run-key and sensor-name tags. `launch` restates that
rule, with the job run in process instead of by a run launcher, so a test can take a
sensor's ticks through to runs without a daemon and see the de-duplication work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dagster import DagsterInstance, Definitions, RunRequest, RunsFilter
from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG


@dataclass(frozen=True)
class Launched:
    """What the daemon would have done with one request."""

    run_key: str | None
    result: Any  # the in-process run's result; None when the key already ran


def runs_of(instance: DagsterInstance, sensor_name: str) -> list[Any]:
    """Every run the sensor started (by its sensor-name tag)."""
    return list(instance.get_runs(filters=RunsFilter(tags={SENSOR_NAME_TAG: sensor_name})))


def launch(
    instance: DagsterInstance,
    definitions: Definitions,
    sensor_name: str,
    job_name: str,
    requests: Sequence[RunRequest],
    base_run_config: dict[str, Any] | None = None,
) -> list[Launched]:
    """Start each request's run unless a run of this sensor already carries its key."""
    job = definitions.resolve_job_def(job_name)
    launched = []
    for request in requests:
        key = request.run_key
        if key is not None:
            existing = instance.get_runs(filters=RunsFilter(tags={RUN_KEY_TAG: key}))
            if any(run.tags.get(SENSOR_NAME_TAG) == sensor_name for run in existing):
                launched.append(Launched(key, None))
                continue
        tags = {**request.tags, SENSOR_NAME_TAG: sensor_name}
        if key is not None:
            tags[RUN_KEY_TAG] = key
        run_config = {**(base_run_config or {}), **(request.run_config or {})}
        result = job.execute_in_process(
            instance=instance, run_config=run_config, tags=tags, raise_on_error=False
        )
        launched.append(Launched(key, result))
    return launched

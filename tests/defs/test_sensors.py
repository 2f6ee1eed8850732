"""The landed-telemetry sensor: one run per complete hour and landed state, never twice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from dagster import SkipReason, build_sensor_context
from support.records import record

from qabuse_dagster import settings
from qabuse_dagster.defs.sensors import GRACE, landed_run_requests, landed_telemetry_sensor
from qabuse_dagster.ingest.partitions import compact_hour, records_to_table, stage_landing

HOUR_A = datetime(2026, 11, 2, 10, tzinfo=UTC)
HOUR_B = datetime(2026, 11, 2, 11, tzinfo=UTC)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> settings.Paths:
    monkeypatch.setenv(settings.HOME_ENV, str(tmp_path))
    return settings.paths()


def _land(paths: settings.Paths, hour: datetime, job: str) -> None:
    stage_landing(
        records_to_table([record(job, hour + timedelta(minutes=5))]), paths.landing, tenant="t"
    )


def test_a_run_per_complete_hour_keyed_by_its_landed_state(home: settings.Paths) -> None:
    _land(home, HOUR_A, "a1")
    _land(home, HOUR_B, "b1")
    now = HOUR_B + timedelta(hours=1) + GRACE / 2  # hour B is not complete yet

    first = landed_run_requests(now).requests
    again = landed_run_requests(now).requests
    _land(home, HOUR_A, "a2")  # a late record for hour A
    later = landed_run_requests(now).requests

    assert [r.partition_key for r in first] == ["2026-11-02-10:00"]
    assert [r.run_key for r in again] == [r.run_key for r in first]  # Dagster skips a repeat
    assert [r.partition_key for r in later] == ["2026-11-02-10:00"]
    assert later[0].run_key != first[0].run_key


def test_compacted_hours_request_nothing_and_the_sensor_says_why(home: settings.Paths) -> None:
    _land(home, HOUR_A, "a1")
    compact_hour(HOUR_A, home.landing, home.raw_telemetry)

    result = landed_telemetry_sensor(build_sensor_context())

    assert landed_run_requests(HOUR_A + timedelta(days=1)).requests == []
    assert isinstance(result, SkipReason)


def test_the_sensor_targets_the_hourly_slice(home: settings.Paths) -> None:
    _land(home, HOUR_A, "a1")

    result = landed_telemetry_sensor(build_sensor_context())

    assert [r.partition_key for r in result.run_requests] == ["2026-11-02-10:00"]
    assert landed_telemetry_sensor.job_name == "telemetry_job"


@pytest.mark.parametrize(
    "far",
    [
        datetime(2025, 6, 1, tzinfo=UTC),  # before the first partition
        datetime(2099, 1, 1, tzinfo=UTC),  # after the open hour
        datetime(1, 1, 1, tzinfo=UTC),  # a key the partition format cannot even spell
        datetime(9999, 12, 31, 23, tzinfo=UTC),  # an hour with no next hour
    ],
)
def test_a_landed_hour_outside_the_partitions_is_skipped_and_reported_not_fatal(
    home: settings.Paths, far: datetime, capfd: pytest.CaptureFixture[str]
) -> None:
    # Landing written before the doors checked the range (or with another start).
    _land(home, far.replace(minute=0), "far")
    _land(home, HOUR_A, "a1")

    result = landed_telemetry_sensor(build_sensor_context())

    assert [r.partition_key for r in result.run_requests] == ["2026-11-02-10:00"]
    assert landed_run_requests(datetime.now(UTC)).outside == [far.replace(minute=0)]
    assert "outside the hourly partitions, skipped" in capfd.readouterr().err  # Dagster's log


def test_a_landing_folder_that_names_no_hour_is_passed_over(home: settings.Paths) -> None:
    _land(home, HOUR_A, "a1")
    stray = home.landing / "date=2026-13-45" / "hour=99"
    stray.mkdir(parents=True)
    (stray / "batch-0-x.parquet").write_bytes(b"not parquet")

    result = landed_telemetry_sensor(build_sensor_context())

    assert [r.partition_key for r in result.run_requests] == ["2026-11-02-10:00"]

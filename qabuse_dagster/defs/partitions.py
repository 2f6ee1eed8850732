"""Partitions shared by assets, jobs, schedules and backfills."""

from dagster import HourlyPartitionsDefinition

#: Raw telemetry and window features are cut by UTC hour. The start is early enough for
#: the simulator's default week (2026-11-02) and any replay of this year's telemetry.
HOURLY_PARTITIONS = HourlyPartitionsDefinition(
    start_date="2026-01-01-00:00", timezone="UTC", end_offset=1
)

"""Partitions shared by assets, jobs, schedules and backfills."""

from collections.abc import Iterable
from datetime import UTC, datetime

from dagster import HourlyPartitionsDefinition

from qabuse_dagster import settings
from qabuse_dagster.ingest.partitions import hour_of

#: The first hour: ``QABUSE_TELEMETRY_START`` (default 2026-01-01, early enough for the
#: simulator's default week and any replay of this year's telemetry). The doors quarantine
#: older records (`qabuse_dagster.ingest.time_range`), so every landed hour has a partition
#: once its hour has begun.
PARTITIONS_START = settings.telemetry_start()

#: Raw telemetry and window features are cut by UTC hour; the hour now open is the last.
HOURLY_PARTITIONS = HourlyPartitionsDefinition(
    start_date=PARTITIONS_START.strftime("%Y-%m-%d-%H:%M"), timezone="UTC", end_offset=1
)


def partition_key(hour: datetime) -> str:
    """The key of the hourly partition that holds ``hour``."""
    return hour_of(hour).strftime("%Y-%m-%d-%H:00")


def split_by_partitions(
    hours: Iterable[datetime], now: datetime | None = None
) -> tuple[list[datetime], list[datetime]]:
    """``hours`` that have a partition as of ``now``, and those that have none.

    An hour before the first partition never will (it landed before the doors checked the
    range, or the start was moved); an hour after the open one will once it opens.
    """
    now = datetime.now(UTC) if now is None else now
    last = hour_of(now)
    inside: list[datetime] = []
    outside: list[datetime] = []
    for hour in sorted(hours):
        (inside if PARTITIONS_START <= hour <= last else outside).append(hour)
    return inside, outside

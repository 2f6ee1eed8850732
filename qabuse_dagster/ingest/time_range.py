"""The time range qabuse accepts telemetry in: what the hourly partitions can hold.

The contract admits any instant from year 1 to 9999, but the raw partitions begin at
``QABUSE_TELEMETRY_START`` (default 2026-01-01) and end at the hour now open. A record
outside that span could never be compacted: before this check, one such record made
``qabuse materialize`` plan thousands of empty hours and the landed-telemetry sensor fail
every tick. So every door (``qabuse ingest``, the collector) quarantines it with a reason
instead, counted as rejected and kept, line for line, in the quarantine.

The span is ``[start, now + max_skew)``: ``max_skew`` (``QABUSE_MAX_CLOCK_SKEW_S``,
default an hour) forgives a client whose clock runs ahead; such a record waits in the
landing area until its hour opens. Records from further ahead are a broken clock or a
forgery, and would sit in every "latest activity" feature until then.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from qabuse_dagster import settings
from qabuse_dagster.telemetry.contract import format_rfc3339_utc


@dataclass(frozen=True)
class AcceptedRange:
    """Timestamps from ``start`` (inclusive) to the receiver's clock plus ``max_skew``."""

    start: datetime
    max_skew: timedelta

    @classmethod
    def from_settings(cls) -> AcceptedRange:
        """The range configured by ``QABUSE_TELEMETRY_START`` and ``QABUSE_MAX_CLOCK_SKEW_S``."""
        return cls(settings.telemetry_start(), timedelta(seconds=settings.max_clock_skew_seconds()))

    def at(self, now: datetime | None = None) -> Bounds:
        """The bounds as of ``now`` (default the wall clock), for a batch of records."""
        now = datetime.now(UTC) if now is None else now.astimezone(UTC)
        end = max(self.start, now + self.max_skew)
        return Bounds(format_rfc3339_utc(self.start), format_rfc3339_utc(end))


@dataclass(frozen=True)
class Bounds:
    """One batch's range as canonical timestamp texts (``YYYY-MM-DDTHH:MM:SS.ffffffZ``).

    Canonical texts are fixed-width with a four-digit year, so string order is time order
    and checking a record costs two string comparisons.
    """

    first: str
    end: str

    def reason(self, timestamp: str) -> str | None:
        """Why a record with the canonical ``timestamp`` is refused, or ``None`` if in range."""
        if timestamp < self.first:
            return (
                f"{timestamp} is before {self.first}, the first hour of the raw partitions "
                f"(set {settings.TELEMETRY_START_ENV} to accept older telemetry)"
            )
        if timestamp >= self.end:
            return (
                f"{timestamp} is ahead of the receiver's clock by more than "
                f"{settings.MAX_CLOCK_SKEW_ENV} allows (accepted until {self.end})"
            )
        return None

"""Per-api-key sliding-window features over raw telemetry, computed in DuckDB.

A feature row describes one api key at one instant ``event_timestamp`` (always a
minute boundary) from the records strictly before it: the 1-minute window is
``[t - 1 min, t)``, the 5-minute window ``[t - 5 min, t)``. A key gets a row at every
minute boundary whose 5-minute window holds at least one of its records, so the
latest row of a key is also its current state once the key falls silent.

Counting conventions (the same in every window):

* a *submission* is a ``submitted`` or ``rejected`` record (a rejected request
  is a submission the API refused, so no ``submitted`` record exists for it);
* an *outcome* is a ``completed``, ``failed``, ``cancelled`` or ``rejected`` record,
  and a *failure* a ``failed`` or ``rejected`` one;
* ratios over an empty denominator are 0, so the models never see NaN.

Every window is a frame over per-minute aggregates (``RANGE`` windows in DuckDB), so
the cost grows linearly with the records, not with the square of a key's records as a
time-range join would; distinct code hashes join on exact (key, minute) pairs.

The z-score compares the last minute's submissions with the key's own previous
59 minutes, zero minutes included; the standard deviation is floored at
``ZSCORE_STD_FLOOR`` submissions per minute so a key with a flat history does not
produce infinite scores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import duckdb
import pyarrow as pa

logger = logging.getLogger(__name__)

ENTITY_COLUMN = "api_key_id"
TIMESTAMP_COLUMN = "event_timestamp"
ZSCORE_STD_FLOOR = 1.0
#: History a row needs beyond its own instant: the z-score's hour.
LOOKBACK = timedelta(minutes=60)


@dataclass(frozen=True)
class FeatureSpec:
    """One feature column: its name, unit and meaning (shown in Feast and the UI)."""

    name: str
    unit: str
    description: str


FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec(
        "submissions_1m", "jobs", "Submissions (submitted or rejected) in the last minute."
    ),
    FeatureSpec("mean_shots_1m", "shots", "Mean shots per submission in the last minute."),
    FeatureSpec(
        "fail_rate_1m", "ratio", "Failed or rejected outcomes over all outcomes, last minute."
    ),
    FeatureSpec("distinct_code_hashes_1m", "count", "Distinct code hashes submitted, last minute."),
    FeatureSpec(
        "submissions_per_min_5m", "jobs/min", "Mean submissions per minute over 5 minutes."
    ),
    FeatureSpec("mean_shots_5m", "shots", "Mean shots per submission over 5 minutes."),
    FeatureSpec(
        "fail_rate_5m", "ratio", "Failed or rejected outcomes over all outcomes, 5 minutes."
    ),
    FeatureSpec("distinct_code_hashes_5m", "count", "Distinct code hashes submitted, 5 minutes."),
    FeatureSpec(
        "submissions_1m_zscore",
        "std devs",
        "Last minute's submissions against the key's previous 59 minutes (std floored at 1).",
    ),
)
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
FEATURES_1M: tuple[str, ...] = tuple(n for n in FEATURE_NAMES if n.endswith("_1m"))
FEATURES_5M: tuple[str, ...] = tuple(n for n in FEATURE_NAMES if not n.endswith("_1m"))

_SQL = """
WITH events AS (
    SELECT api_key_id, "timestamp"::TIMESTAMP AS ts, shots, code_hash,
           date_trunc('minute', "timestamp"::TIMESTAMP) AS minute,
           status IN ('submitted', 'rejected') AS is_submission,
           status IN ('completed', 'failed', 'cancelled', 'rejected') AS is_outcome,
           status IN ('failed', 'rejected') AS is_failure
    FROM telemetry
    WHERE "timestamp"::TIMESTAMP >= $lookback_start AND "timestamp"::TIMESTAMP < $end
),
per_minute AS (
    SELECT api_key_id, minute,
           count(*) FILTER (WHERE is_submission) AS submissions,
           sum(shots) FILTER (WHERE is_submission) AS shots_sum,
           count(shots) FILTER (WHERE is_submission) AS shots_n,
           count(*) FILTER (WHERE is_outcome) AS outcomes,
           count(*) FILTER (WHERE is_failure) AS failures
    FROM events GROUP BY ALL
),
grid AS (
    SELECT DISTINCT api_key_id, minute + to_minutes(k + 1) AS event_timestamp
    FROM per_minute, range(0, 5) AS r(k)
),
-- Every minute a row or a window needs; silent minutes become zeros below.
dense AS (
    SELECT api_key_id, event_timestamp - INTERVAL 1 MINUTE AS minute FROM grid
    UNION SELECT api_key_id, minute FROM per_minute
),
rolled AS (
    SELECT d.api_key_id, d.minute + INTERVAL 1 MINUTE AS event_timestamp,
           coalesce(p.submissions, 0) AS submissions_1m,
           p.shots_sum AS shots_1m, p.shots_n AS shots_n_1m,
           coalesce(p.outcomes, 0) AS outcomes_1m,
           coalesce(p.failures, 0) AS failures_1m,
           sum(coalesce(p.submissions, 0)) OVER w5 AS submissions_5m,
           sum(p.shots_sum) OVER w5 AS shots_5m,
           sum(p.shots_n) OVER w5 AS shots_n_5m,
           sum(coalesce(p.outcomes, 0)) OVER w5 AS outcomes_5m,
           sum(coalesce(p.failures, 0)) OVER w5 AS failures_5m,
           sum(coalesce(p.submissions, 0)) OVER h AS hist_sum,
           sum(coalesce(p.submissions, 0) * coalesce(p.submissions, 0)) OVER h AS hist_sumsq
    FROM dense d LEFT JOIN per_minute p USING (api_key_id, minute)
    WINDOW w5 AS (PARTITION BY d.api_key_id ORDER BY d.minute
                  RANGE BETWEEN INTERVAL 4 MINUTE PRECEDING AND CURRENT ROW),
           h AS (PARTITION BY d.api_key_id ORDER BY d.minute
                 RANGE BETWEEN INTERVAL 59 MINUTE PRECEDING AND INTERVAL 1 MINUTE PRECEDING)
),
grid_minutes AS (
    SELECT api_key_id, event_timestamp, event_timestamp - to_minutes(k) AS minute, k
    FROM grid, range(1, 6) AS r(k)
    WHERE event_timestamp >= $start AND event_timestamp < $end
),
distinct_hashes AS (
    SELECT gm.api_key_id, gm.event_timestamp,
           count(DISTINCT e.code_hash) FILTER (WHERE gm.k = 1) AS distinct_code_hashes_1m,
           count(DISTINCT e.code_hash) AS distinct_code_hashes_5m
    FROM grid_minutes gm
    JOIN events e ON e.api_key_id = gm.api_key_id AND e.minute = gm.minute
    WHERE e.is_submission
    GROUP BY ALL
)
SELECT r.api_key_id,
       timezone('UTC', r.event_timestamp) AS event_timestamp,
       r.submissions_1m::BIGINT AS submissions_1m,
       coalesce(r.shots_1m / nullif(r.shots_n_1m, 0), 0.0)::DOUBLE AS mean_shots_1m,
       coalesce(r.failures_1m / nullif(r.outcomes_1m, 0), 0.0)::DOUBLE AS fail_rate_1m,
       coalesce(d.distinct_code_hashes_1m, 0)::BIGINT AS distinct_code_hashes_1m,
       (r.submissions_5m / 5.0)::DOUBLE AS submissions_per_min_5m,
       coalesce(r.shots_5m / nullif(r.shots_n_5m, 0), 0.0)::DOUBLE AS mean_shots_5m,
       coalesce(r.failures_5m / nullif(r.outcomes_5m, 0), 0.0)::DOUBLE AS fail_rate_5m,
       coalesce(d.distinct_code_hashes_5m, 0)::BIGINT AS distinct_code_hashes_5m,
       ((r.submissions_1m - r.hist_mean)
         / greatest(sqrt(greatest(r.hist_meansq - r.hist_mean ** 2, 0.0)), $std_floor))::DOUBLE
           AS submissions_1m_zscore
FROM (SELECT *, coalesce(hist_sum, 0) / 59.0 AS hist_mean,
                coalesce(hist_sumsq, 0) / 59.0 AS hist_meansq
      FROM rolled) r
SEMI JOIN grid g USING (api_key_id, event_timestamp)
LEFT JOIN distinct_hashes d USING (api_key_id, event_timestamp)
WHERE r.event_timestamp >= $start AND r.event_timestamp < $end
ORDER BY event_timestamp, api_key_id
"""


def window_features(telemetry: pa.Table, start: datetime, end: datetime) -> pa.Table:
    """Compute feature rows with ``start <= event_timestamp < end``.

    Args:
        telemetry: contract records (at least ``api_key_id``, ``timestamp``, ``status``,
            ``shots``, ``code_hash``) covering ``[start - LOOKBACK, end)``; records
            outside that span are ignored.
        start: first instant (inclusive, tz-aware) whose row is wanted.
        end: last instant (exclusive, tz-aware).

    Returns:
        One row per (api key, minute boundary) with ``api_key_id``, ``event_timestamp``
        (UTC) and every column of ``FEATURE_NAMES``, ordered by time then key.

    Example:
        >>> import pyarrow as pa
        >>> from datetime import UTC, datetime
        >>> t0 = datetime(2026, 1, 1, tzinfo=UTC)
        >>> records = pa.table({"api_key_id": ["k"], "timestamp": [t0], "status": ["submitted"],
        ...                     "shots": [100], "code_hash": ["c"]})
        >>> rows = window_features(records, t0, t0.replace(hour=1))
        >>> rows.num_rows, rows["submissions_1m"][0].as_py()
        (5, 1)
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("window_features needs tz-aware start and end instants")
    params = {
        "lookback_start": _naive_utc(start - LOOKBACK),
        "start": _naive_utc(start),
        "end": _naive_utc(end),
        "std_floor": ZSCORE_STD_FLOOR,
    }
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        con.register("telemetry", telemetry)
        result = con.sql(_SQL, params=params).to_arrow_table()
    logger.debug("window_features: %d rows for [%s, %s)", result.num_rows, start, end)
    return result


def _naive_utc(instant: datetime) -> datetime:
    return instant.astimezone(UTC).replace(tzinfo=None)

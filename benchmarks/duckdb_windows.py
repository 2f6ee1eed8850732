"""The DuckDB SQL engine of `window_features`, kept as a contender and an oracle.

qabuse computed its window features with this query (``RANGE`` window frames over
per-minute aggregates) until a numpy engine measured several times faster on the same
data (`benchmarks.feature_windows`, side ``duckdb``). It stays here, outside the
package, so the benchmark keeps measuring the choice and the tests keep checking that
both engines give the same rows (counts exactly, ratios to the last bits of a double).
"""

from __future__ import annotations

from datetime import UTC, datetime

import duckdb
import pyarrow as pa

from qabuse_dagster.features.windows import LOOKBACK, ZSCORE_STD_FLOOR

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


def duckdb_window_features(telemetry: pa.Table, start: datetime, end: datetime) -> pa.Table:
    """`qabuse_dagster.features.windows.window_features`, computed by DuckDB."""
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
        return con.sql(_SQL, params=params).to_arrow_table()


def _naive_utc(instant: datetime) -> datetime:
    return instant.astimezone(UTC).replace(tzinfo=None)

"""Per-api-key sliding-window features over raw telemetry, computed with numpy.

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

Records are summed per (key, minute) cell once; every window is then a difference of
two prefix sums over a key's sorted cells, found by binary search, so the cost is
O(n log n) in the records and independent of window length. Distinct code hashes use
disjoint per-hash covers and a running sum. The engine was chosen by measurement: the
DuckDB ``RANGE``-window SQL it replaced (kept as ``benchmarks/duckdb_windows.py``, and
checked to give the same rows, ratios to the last bits of a double) is several times
slower (``python -m benchmarks``).

The z-score compares the last minute's submissions with the key's own previous
59 minutes, zero minutes included; the standard deviation is floored at
``ZSCORE_STD_FLOOR`` submissions per minute so a key with a flat history does not
produce infinite scores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
_COUNT_FEATURES = {"submissions_1m", "distinct_code_hashes_1m", "distinct_code_hashes_5m"}
#: Columns and types of `window_features` rows (the Feast offline source's).
FEATURE_SCHEMA = pa.schema(
    [
        (ENTITY_COLUMN, pa.string()),
        (TIMESTAMP_COLUMN, pa.timestamp("us", tz="UTC")),
        *((n, pa.int64() if n in _COUNT_FEATURES else pa.float64()) for n in FEATURE_NAMES),
    ]
)
FEATURES_1M: tuple[str, ...] = tuple(n for n in FEATURE_NAMES if n.endswith("_1m"))
FEATURES_5M: tuple[str, ...] = tuple(n for n in FEATURE_NAMES if not n.endswith("_1m"))

_MINUTE_US = 60_000_000
_SUBMISSION = pa.array(["submitted", "rejected"])
_OUTCOME = pa.array(["completed", "failed", "cancelled", "rejected"])
_FAILURE = pa.array(["failed", "rejected"])


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
    start_us, end_us = _us(start), _us(end)
    events = _Events.read(telemetry, start_us - _us_span(LOOKBACK), end_us)
    grid = _MinuteGrid(events)
    rows = grid.rows(start_us, end_us)

    sub_1m = grid.window_sum(grid.submissions, rows, 1, 1)
    sub_5m = grid.window_sum(grid.submissions, rows, 5, 1)
    columns: dict[str, object] = {
        "submissions_1m": sub_1m,
        "mean_shots_1m": _ratio(
            grid.window_sum(grid.shots_sum, rows, 1, 1), grid.window_sum(grid.shots_n, rows, 1, 1)
        ),
        "fail_rate_1m": _ratio(
            grid.window_sum(grid.failures, rows, 1, 1), grid.window_sum(grid.outcomes, rows, 1, 1)
        ),
        "distinct_code_hashes_1m": grid.distinct_code_hashes(rows, minutes=1),
        "submissions_per_min_5m": sub_5m / 5.0,
        "mean_shots_5m": _ratio(
            grid.window_sum(grid.shots_sum, rows, 5, 1), grid.window_sum(grid.shots_n, rows, 5, 1)
        ),
        "fail_rate_5m": _ratio(
            grid.window_sum(grid.failures, rows, 5, 1), grid.window_sum(grid.outcomes, rows, 5, 1)
        ),
        "distinct_code_hashes_5m": grid.distinct_code_hashes(rows, minutes=5),
    }
    # The previous 59 minutes (zeros included): minutes t-60 .. t-2 of the row at t.
    hist_mean = grid.window_sum(grid.submissions, rows, 60, 2) / 59.0
    hist_meansq = grid.window_sum(grid.submissions_sq, rows, 60, 2) / 59.0
    std = np.maximum(np.sqrt(np.maximum(hist_meansq - hist_mean**2, 0.0)), ZSCORE_STD_FLOOR)
    columns["submissions_1m_zscore"] = (sub_1m - hist_mean) / std

    row_key, row_minute = rows // grid.n_minutes, rows % grid.n_minutes + grid.first_minute
    order = np.lexsort((row_key, row_minute))  # by time, then key name (keys rank by name)
    result = pa.table(
        {
            ENTITY_COLUMN: events.key_names.take(pa.array(row_key[order])),
            TIMESTAMP_COLUMN: pa.array(row_minute[order] * _MINUTE_US, type=_TIMESTAMP),
            **{
                name: pa.array(np.asarray(values)[order].astype(_DTYPES[name]))
                for name, values in columns.items()
            },
        }
    )
    logger.debug("window_features: %d rows for [%s, %s)", result.num_rows, start, end)
    return result


_TIMESTAMP = pa.timestamp("us", tz="UTC")
_DTYPES = {
    name: np.int64 if pa.types.is_integer(FEATURE_SCHEMA.field(name).type) else np.float64
    for name in FEATURE_NAMES
}


@dataclass(frozen=True)
class _Events:
    """The records in a time span as numpy columns; keys numbered in name order."""

    key: np.ndarray
    key_names: pa.Array
    minute: np.ndarray
    is_submission: np.ndarray
    is_outcome: np.ndarray
    is_failure: np.ndarray
    shots: np.ndarray
    has_shots: np.ndarray
    code: np.ndarray
    has_code: np.ndarray

    @classmethod
    def read(cls, telemetry: pa.Table, from_us: int, to_us: int) -> _Events:
        ts = pc.cast(pc.cast(telemetry["timestamp"], _TIMESTAMP), pa.int64())
        keep = pc.and_(pc.greater_equal(ts, from_us), pc.less(ts, to_us))
        table = telemetry.select(["api_key_id", "status", "shots", "code_hash"]).filter(keep)
        keys = pc.dictionary_encode(table["api_key_id"].combine_chunks())
        # Number the keys in name order, so ordering by number orders by name.
        by_name = pc.sort_indices(keys.dictionary).to_numpy()
        rank = np.empty(len(by_name), dtype=np.int64)
        rank[by_name] = np.arange(len(by_name))
        status = table["status"]
        shots = table["shots"].combine_chunks()
        codes = pc.dictionary_encode(table["code_hash"].combine_chunks())
        return cls(
            key=rank[_numpy(keys.indices)],
            key_names=keys.dictionary.take(pa.array(by_name)),
            minute=_numpy(ts.filter(keep)) // _MINUTE_US,
            is_submission=_numpy(pc.is_in(status, _SUBMISSION)),
            is_outcome=_numpy(pc.is_in(status, _OUTCOME)),
            is_failure=_numpy(pc.is_in(status, _FAILURE)),
            shots=_numpy(pc.fill_null(shots, 0)).astype(np.int64),
            has_shots=_numpy(pc.is_valid(shots)),
            code=_numpy(pc.fill_null(codes.indices, 0)).astype(np.int64),
            has_code=_numpy(pc.is_valid(codes)),
        )


class _MinuteGrid:
    """Per (key, minute) sums over the active minutes, as prefix sums in cell order.

    A cell is ``key * n_minutes + minute offset``: sorting cells sorts by key, then
    time, so the cells of one key's window are one contiguous run, found by binary search,
    and a window sum is a difference of two prefix sums.
    """

    def __init__(self, events: _Events) -> None:
        self.events = events
        self.first_minute = int(events.minute.min()) if len(events.minute) else 0
        last = int(events.minute.max()) if len(events.minute) else 0
        # Room for the rows and windows past the last minute, so cells never wrap.
        self.n_minutes = last - self.first_minute + 70
        cell = events.key * self.n_minutes + (events.minute - self.first_minute)
        self.cells, inverse = _unique_inverse(cell)

        def per_cell(values: np.ndarray) -> np.ndarray:
            sums = np.bincount(inverse, weights=values, minlength=len(self.cells))
            return np.concatenate([[0], np.cumsum(sums.astype(np.int64))])

        counted_shots = events.is_submission & events.has_shots
        self.submissions = per_cell(events.is_submission)
        per_minute = np.diff(self.submissions)
        self.submissions_sq = np.concatenate([[0], np.cumsum(per_minute * per_minute)])
        self.shots_sum = per_cell(np.where(counted_shots, events.shots, 0))
        self.shots_n = per_cell(counted_shots)
        self.outcomes = per_cell(events.is_outcome)
        self.failures = per_cell(events.is_failure)
        self._bounds: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def rows(self, start_us: int, end_us: int) -> np.ndarray:
        """Cells of the rows: the 5 minute boundaries after each active minute, in span."""
        rows = _unique_sorted((self.cells[:, None] + np.arange(1, 6)).ravel())
        instant = (rows % self.n_minutes + self.first_minute) * _MINUTE_US
        return rows[(instant >= start_us) & (instant < end_us)]

    def window_sum(self, prefix: np.ndarray, rows: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Per row at minute t, the sum over its key's minutes ``t - lo .. t - hi``."""
        if (lo, hi) not in self._bounds:
            self._bounds[lo, hi] = (
                np.searchsorted(self.cells, rows - lo, side="left"),
                np.searchsorted(self.cells, rows - hi, side="right"),
            )
        first, last = self._bounds[lo, hi]
        return prefix[last] - prefix[first]

    def distinct_code_hashes(self, rows: np.ndarray, *, minutes: int) -> np.ndarray:
        """Per row, the distinct code hashes submitted in its last ``minutes`` minutes.

        Each (key, hash, minute) occurrence covers the rows ``minute + 1 .. minute +
        minutes``; an occurrence's cover starts after the previous occurrence's of the
        same (key, hash) ends, so the covers are disjoint and the count at a row is the
        running sum of +1 at each cover's start and -1 past its end.
        """
        e = self.events
        mask = e.is_submission & e.has_code
        n_codes = int(e.code.max()) + 1 if mask.any() else 1
        offset = e.minute[mask] - self.first_minute
        triples = _unique_sorted((e.key[mask] * n_codes + e.code[mask]) * self.n_minutes + offset)
        pair, minute = triples // self.n_minutes, triples % self.n_minutes
        base = (pair // n_codes) * self.n_minutes
        same_pair = np.concatenate([[False], pair[1:] == pair[:-1]])
        previous = np.concatenate([[0], minute[:-1]])
        cover_from = np.where(same_pair, np.maximum(minute + 1, previous + minutes + 1), minute + 1)
        edges = np.concatenate([base + cover_from, base + minute + minutes + 1])
        steps = np.concatenate([np.ones(len(minute), np.int64), -np.ones(len(minute), np.int64)])
        if len(edges) == 0:  # no submission carries a code hash
            return np.zeros(len(rows), dtype=np.int64)
        by_edge = np.argsort(edges, kind="stable")
        edges, running = edges[by_edge], np.cumsum(steps[by_edge])
        at = np.searchsorted(edges, rows, side="right") - 1
        return np.where(at >= 0, running[np.maximum(at, 0)], 0)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator`` as float64, 0 where the denominator is 0."""
    out = np.zeros(len(numerator), dtype=np.float64)
    nonzero = denominator != 0
    out[nonzero] = numerator[nonzero].astype(np.float64) / denominator[nonzero]
    return out


def _numpy(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(array.to_numpy(zero_copy_only=False))


def _us_span(span: timedelta) -> int:
    return span // timedelta(microseconds=1)


def _us(instant: datetime) -> int:
    return (instant - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _unique_sorted(values: np.ndarray) -> np.ndarray:
    """``np.unique`` by sorting (numpy 2's hash-based unique is slower on int64 here)."""
    ordered = np.sort(values)
    keep = np.empty(len(ordered), dtype=bool)
    keep[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def _unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)``, by sorting."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    new = np.empty(len(ordered), dtype=bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    group = np.cumsum(new) - 1
    inverse = np.empty(len(values), dtype=np.int64)
    inverse[order] = group
    return ordered[new], inverse

"""Per-api-key window features computed incrementally, record by record.

`StreamingWindows` keeps, per api key, one bucket per minute that holds records and
emits the rows `window_features` computes over the same records: the same
``(api_key_id, event_timestamp)`` pairs, the same values, the same column types. The
counting conventions and window bounds are those documented in
`qabuse_dagster.features.windows`; the tests replay simulator output through both.

Event time and lateness: the *watermark* is the latest record timestamp seen minus
``allowed_lateness`` (or ``now - allowed_lateness`` from `StreamingWindows.advance`,
whichever is later). The row at instant ``T`` reads records strictly before ``T``, so it
is final once the watermark reaches ``T``, and `advance` emits it then. A record older
than the watermark could change a row that is already final: it is not applied, it is
counted in `StreamingWindows.late_records` and handed to ``on_late`` (or logged), so an
emitted row never changes and a late record is never lost without a trace. Records
within the lateness bound may arrive in any order.

State per key (amortised constant work per record and per emitted row):

* ``buckets``: minute -> ``[submissions, shots_sum, shots_n, outcomes, failures,
  code hashes]``; a record touches exactly one bucket;
* a 5-minute sliding window of buckets with running sums and a count per code hash
  (how many of its minutes saw it), so distinct hashes over 5 minutes is a ``len``;
* a 60-minute sliding history of per-minute submissions with a running sum and sum of
  squares for the z-score. Buckets leave the history, and memory, 60 minutes after
  their minute; keys silent for an hour are dropped.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from qabuse_dagster.features.windows import (
    ENTITY_COLUMN,
    FEATURE_SCHEMA,
    TIMESTAMP_COLUMN,
    ZSCORE_STD_FLOOR,
)

logger = logging.getLogger(__name__)

# Status -> bit set; the conventions of `windows`: a rejected record is a submission,
# an outcome and a failure at once. Other statuses only make the minute active.
_SUBMISSION, _OUTCOME, _FAILURE = 1, 2, 4
_STATUS_BITS = {
    "submitted": _SUBMISSION,
    "rejected": _SUBMISSION | _OUTCOME | _FAILURE,
    "completed": _OUTCOME,
    "cancelled": _OUTCOME,
    "failed": _OUTCOME | _FAILURE,
}
# Bucket slots (a list, not an object: attribute access costs on the per-record path).
_SUBS, _SHOTS, _SHOTS_N, _OUTCOMES, _FAILURES, _HASHES = range(6)
_HISTORY_MINUTES = 59
_WINDOW_MINUTES = 5
_MINUTE_US = 60_000_000
_MICROSECOND = timedelta(microseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NEVER = -(2**62)  # the watermark before any record: nothing is late


class StreamRecord(NamedTuple):
    """The fields of a telemetry record the window features read.

    ``timestamp`` must be timezone-aware. A plain tuple in this order, or a mapping with
    these keys (a decoded contract record), is accepted as well.
    """

    api_key_id: str
    timestamp: datetime
    status: str
    shots: int | None
    code_hash: str | None


class _KeyState:
    """Everything one api key needs to produce its next rows."""

    __slots__ = (
        "buckets",
        "hash_counts",
        "hist",
        "hist_sum",
        "hist_sumsq",
        "last_minute",
        "next_row",
        "pending",
        "sums5",
        "window",
    )

    def __init__(self) -> None:
        self.buckets: dict[int, list[Any]] = {}
        # Minutes with a bucket that no row has read yet (arrive out of order).
        self.pending: list[int] = []
        self.window: deque[tuple[int, list[Any]]] = deque()
        self.sums5 = [0, 0, 0, 0, 0]
        self.hash_counts: dict[str, int] = {}
        self.hist: deque[tuple[int, int]] = deque()
        self.hist_sum = 0
        self.hist_sumsq = 0
        self.next_row = 0
        self.last_minute = 0


class StreamingWindows:
    """Incremental `window_features`: feed records with `update`, collect rows from `advance`.

    Args:
        allowed_lateness: How far behind the latest record another record may arrive and
            still count. Rows wait this long (in event time) before they are emitted.
        on_late: Called with each record that arrived too late to count; without it,
            late records are logged. Either way `late_records` counts them.

    One consumer feeds an instance (it is not thread-safe); shard by api key to scale.

    Example:
        >>> from datetime import UTC, datetime, timedelta
        >>> t0 = datetime(2026, 1, 1, tzinfo=UTC)
        >>> stream = StreamingWindows(allowed_lateness=timedelta(seconds=30))
        >>> stream.update(StreamRecord("k", t0, "submitted", 100, "c"))
        True
        >>> rows = stream.flush()
        >>> rows.num_rows, rows["submissions_1m"][0].as_py()
        (5, 1)
    """

    def __init__(
        self,
        allowed_lateness: timedelta = timedelta(seconds=30),
        on_late: Callable[[Any], None] | None = None,
    ) -> None:
        if allowed_lateness < timedelta(0):
            raise ValueError("allowed_lateness must not be negative")
        self.allowed_lateness = allowed_lateness
        self.on_late = on_late
        self.late_records = 0
        # Event time in integer microseconds: float seconds would round a watermark
        # across a record a microsecond away from it.
        self._lateness_us = allowed_lateness // _MICROSECOND
        self._max_us = _NEVER
        self._watermark = _NEVER
        self._emitted_until: int | None = None  # minute index of the last final instant
        self._keys: dict[str, _KeyState] = {}
        self._active: set[str] = set()  # keys with rows still to emit
        self._idle: list[tuple[int, str]] = []  # (minute its history expires, key)
        self._late_reported = 0

    @property
    def watermark(self) -> datetime | None:
        """Rows at instants up to here are final; records before it count as late."""
        if self._watermark == _NEVER:
            return None
        return _EPOCH + self._watermark * _MICROSECOND

    @property
    def keys(self) -> int:
        """Api keys with state held (active within the last hour)."""
        return len(self._keys)

    def update(self, record: StreamRecord | tuple[Any, ...] | Mapping[str, Any]) -> bool:
        """Add one record; return False (and report it) when it is too late to count."""
        if isinstance(record, tuple):
            key, ts, status, shots, code_hash = record
        else:
            key = record["api_key_id"]
            ts = record["timestamp"]
            status = record["status"]
            shots = record.get("shots")
            code_hash = record.get("code_hash")
        if ts.tzinfo is None:
            raise ValueError(f"record timestamp {ts!r} is not timezone-aware")
        # Exact: timestamp() is within half a float step (< 1 µs) of the true instant.
        t = round(ts.timestamp() * 1e6)
        if t < self._watermark:
            self._late(record)
            return False
        if t > self._max_us:
            self._max_us = t
            self._watermark = t - self._lateness_us
        minute = t // _MINUTE_US
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState()
        bucket = state.buckets.get(minute)
        if bucket is None:
            bucket = state.buckets[minute] = [0, 0, 0, 0, 0, set()]
            heapq.heappush(state.pending, minute)
            if minute > state.last_minute:
                state.last_minute = minute
            self._active.add(key)
        bits = _STATUS_BITS.get(status, 0)
        if bits:
            if bits & _SUBMISSION:
                bucket[_SUBS] += 1
                if shots is not None:
                    bucket[_SHOTS] += shots
                    bucket[_SHOTS_N] += 1
                if code_hash is not None:
                    bucket[_HASHES].add(code_hash)
            if bits & _OUTCOME:
                bucket[_OUTCOMES] += 1
                if bits & _FAILURE:
                    bucket[_FAILURES] += 1
        return True

    def advance(self, now: datetime | None = None) -> pa.Table:
        """Emit every row the watermark has made final since the last call.

        Args:
            now: The current time, when the stream may have fallen silent: the
                watermark moves to at least ``now - allowed_lateness``.

        Returns:
            Rows with `FEATURE_SCHEMA` (the columns of `window_features`), ordered by time
            then key.
        """
        if now is not None:
            if now.tzinfo is None:
                raise ValueError("advance needs a timezone-aware instant")
            now_us = (now - _EPOCH) // _MICROSECOND
            self._watermark = max(self._watermark, now_us - self._lateness_us)
        if self._watermark == _NEVER:
            return FEATURE_SCHEMA.empty_table()
        return self._emit(self._watermark // _MINUTE_US)

    def flush(self) -> pa.Table:
        """End of stream: emit every remaining row; later records before them are late."""
        if not self._active:
            return FEATURE_SCHEMA.empty_table()
        until = max(self._keys[k].last_minute for k in self._active) + _WINDOW_MINUTES
        self._watermark = max(self._watermark, until * _MINUTE_US)
        return self._emit(until)

    def _late(self, record: Any) -> None:
        self.late_records += 1
        if self.on_late is not None:
            self.on_late(record)
        elif self.late_records - self._late_reported == 1:
            logger.warning(
                "late record (more than %s behind the latest) not counted: %r; "
                "the total is reported at the next advance",
                self.allowed_lateness,
                record,
            )

    def _emit(self, until: int) -> pa.Table:
        """Rows of every active key at instants up to minute ``until``, then cleanup."""
        if self._emitted_until is not None and until <= self._emitted_until:
            return FEATURE_SCHEMA.empty_table()
        self._emitted_until = until
        rows: list[tuple[Any, ...]] = []
        for key in list(self._active):
            state = self._keys[key]
            _emit_key(key, state, until, rows)
            if not state.window and not state.pending:
                self._active.discard(key)
                heapq.heappush(self._idle, (state.last_minute + _HISTORY_MINUTES + 2, key))
        while self._idle and self._idle[0][0] <= until:
            _, key = heapq.heappop(self._idle)
            idle = self._keys.get(key)
            # The key may have come back since it went idle; it may have gone idle again.
            if (
                key not in self._active
                and idle is not None
                and idle.last_minute + _HISTORY_MINUTES + 2 <= until
            ):
                del self._keys[key]
        if self.late_records > self._late_reported:
            logger.warning(
                "%d late records not counted since the last advance (%d in all)",
                self.late_records - self._late_reported,
                self.late_records,
            )
            self._late_reported = self.late_records
        return _to_table(rows)


def _emit_key(key: str, state: _KeyState, until: int, rows: list[tuple[Any, ...]]) -> None:
    """Append the rows of one key at instants ``state.next_row ..= until``."""
    window, hist, sums5, counts = state.window, state.hist, state.sums5, state.hash_counts
    pending, buckets = state.pending, state.buckets
    t = state.next_row
    while True:
        if not window:
            # No activity in the last 5 minutes: the next row follows the next active minute.
            if not pending:
                break
            t = pending[0] + 1
        if t > until:
            break
        minute = t - 1
        b1: list[Any] | None = None
        if pending and pending[0] == minute:
            heapq.heappop(pending)
            b1 = buckets[minute]
            window.append((minute, b1))
            sums5[0] += b1[_SUBS]
            sums5[1] += b1[_SHOTS]
            sums5[2] += b1[_SHOTS_N]
            sums5[3] += b1[_OUTCOMES]
            sums5[4] += b1[_FAILURES]
            for h in b1[_HASHES]:
                counts[h] = counts.get(h, 0) + 1
            subs = b1[_SUBS]
            hist.append((minute, subs))
            state.hist_sum += subs
            state.hist_sumsq += subs * subs
        while window and window[0][0] < t - _WINDOW_MINUTES:
            _, old = window.popleft()
            sums5[0] -= old[_SUBS]
            sums5[1] -= old[_SHOTS]
            sums5[2] -= old[_SHOTS_N]
            sums5[3] -= old[_OUTCOMES]
            sums5[4] -= old[_FAILURES]
            for h in old[_HASHES]:
                left = counts[h] - 1
                if left:
                    counts[h] = left
                else:
                    del counts[h]
        while hist and hist[0][0] < t - 1 - _HISTORY_MINUTES:
            old_minute, subs = hist.popleft()
            state.hist_sum -= subs
            state.hist_sumsq -= subs * subs
            del buckets[old_minute]
        if window:
            rows.append(_row(key, t, b1, sums5, len(counts), state.hist_sum, state.hist_sumsq))
        t += 1
    state.next_row = t


def _row(
    key: str,
    t: int,
    b1: list[Any] | None,
    sums5: list[int],
    distinct_5m: int,
    hist_sum: int,
    hist_sumsq: int,
) -> tuple[Any, ...]:
    """One feature row; arithmetic in the order `window_features`' SQL does it."""
    if b1 is None:
        subs_1m, mean_shots_1m, fail_rate_1m, distinct_1m = 0, 0.0, 0.0, 0
    else:
        subs_1m = b1[_SUBS]
        mean_shots_1m = b1[_SHOTS] / b1[_SHOTS_N] if b1[_SHOTS_N] else 0.0
        fail_rate_1m = b1[_FAILURES] / b1[_OUTCOMES] if b1[_OUTCOMES] else 0.0
        distinct_1m = len(b1[_HASHES])
    subs_5m, shots_5m, shots_n_5m, outcomes_5m, failures_5m = sums5
    # History: the previous 59 minutes, i.e. the 60-minute deque without minute t - 1.
    hist_mean = (hist_sum - subs_1m) / 59.0
    hist_meansq = (hist_sumsq - subs_1m * subs_1m) / 59.0
    std = max(math.sqrt(max(hist_meansq - hist_mean**2, 0.0)), ZSCORE_STD_FLOOR)
    return (
        key,
        t,
        subs_1m,
        mean_shots_1m,
        fail_rate_1m,
        distinct_1m,
        subs_5m / 5.0,
        shots_5m / shots_n_5m if shots_n_5m else 0.0,
        failures_5m / outcomes_5m if outcomes_5m else 0.0,
        distinct_5m,
        (subs_1m - hist_mean) / std,
    )


def _to_table(rows: list[tuple[Any, ...]]) -> pa.Table:
    """Rows (minute index in place of the instant) as a table ordered by time, then key."""
    if not rows:
        return FEATURE_SCHEMA.empty_table()
    columns = list(zip(*rows, strict=True))
    minutes = pa.array(columns[1], pa.int64())
    arrays = [
        pa.array(columns[0], pa.string()),
        pc.multiply(minutes, _MINUTE_US).cast(FEATURE_SCHEMA.field(TIMESTAMP_COLUMN).type),
        *(
            pa.array(col, field.type)
            for col, field in zip(columns[2:], list(FEATURE_SCHEMA)[2:], strict=True)
        ),
    ]
    table = pa.Table.from_arrays(arrays, schema=FEATURE_SCHEMA)
    return table.sort_by([(TIMESTAMP_COLUMN, "ascending"), (ENTITY_COLUMN, "ascending")])

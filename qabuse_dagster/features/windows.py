"""Window features of one entity kind over a whole telemetry table, computed with numpy.

The features, their windows and counting conventions are defined in
`qabuse_dagster.features.definitions`; this module computes the definition's aggregates
for every row at once, and `definitions.derive` turns them into features (the streaming
engine, `qabuse_dagster.features.streaming`, feeds the same `derive`).

How: records are summed per (entity, minute) *cell* once. Cells sorted by entity, then
minute, put the cells of one entity's window in one contiguous run. The rows, sorted the
same way, go through in chunks; each window slides forward over the cells as the rows
advance (compiled loops, `qabuse_dagster.features.window_kernels`), so

* sums are differences of two prefix sums (integers, exact), every summed quantity of a
  window read at once;
* maxima come from a monotonic queue of the window's cells;
* the estimated cost is a whole number of hundredths, so its float prefix sums are exact
  below 2**53 (beyond, cells are summed in time order, at most 60 per window);
* distinct counts keep a count per value in the window;
* medians are k-th-smallest searches in a Fenwick tree of the window's runtime ranks, per
  entity; the rate percentile is a range k-th-smallest query on a wavelet matrix.

Each row's values go straight to its place in the output (by time, then entity), in
columns allocated once. The cost is O(n log n) in the records, independent of window
length. The engine was chosen by measurement: the DuckDB ``RANGE``-window SQL it replaced
(kept as ``benchmarks/duckdb_windows.py``, checked to give the same rows for the features
it has) and a pandas resample/rolling pipeline are both slower (``python -m benchmarks``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from types import ModuleType
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qabuse_dagster.features.definitions import (
    ACTIVITY_LOOKBACK_MINUTES,
    AGGREGATES,
    DAY_MINUTES,
    DETECTOR_FEATURES,
    ENTITY_COLUMNS,
    FEATURE_NAMES,
    FEATURES,
    FEATURES_BY_WINDOW,
    JOB_MEMORY_MINUTES,
    RATE_PERCENTILE_RANK,
    SEQUENCE_CHANNELS,
    SEQUENCE_MINUTES,
    SHARING_MINUTES,
    SUBMISSION_PRECEDENCE,
    TIMESTAMP_COLUMN,
    WINDOWS,
    ZSCORE_STD_FLOOR,
    FeatureSpec,
    aggregates_for,
    backend_cost_weight,
    derive,
    feature_schema,
    sequence_schema,
)

__all__ = [
    "DETECTOR_FEATURES",
    "ENTITY_COLUMN",
    "FEATURES",
    "FEATURES_BY_WINDOW",
    "FEATURE_NAMES",
    "FEATURE_SCHEMA",
    "INPUT_TYPES",
    "LOOKBACK",
    "TIMESTAMP_COLUMN",
    "ZSCORE_STD_FLOOR",
    "FeatureSpec",
    "feature_schema",
    "minute_sequences",
    "sequence_table",
    "window_features",
]

logger = logging.getLogger(__name__)

ENTITY_COLUMN = ENTITY_COLUMNS["api_key"]
#: History a row needs beyond its own instant: the day of the entity-age, gap and day-long
#: features, and before it the job memory that decides which record is a job's submission.
LOOKBACK = timedelta(minutes=ACTIVITY_LOOKBACK_MINUTES + JOB_MEMORY_MINUTES)
_ROW_HISTORY_US = max(ACTIVITY_LOOKBACK_MINUTES, DAY_MINUTES) * 60_000_000
_JOB_MEMORY_US = JOB_MEMORY_MINUTES * 60_000_000
#: Columns and types of the api-key feature rows (the Feast offline source's).
FEATURE_SCHEMA = feature_schema(ENTITY_COLUMN)

_MINUTE_US = 60_000_000
#: Rows whose aggregates are computed together (about 30 MB of aggregates: a chunk's
#: temporaries stay in the processor's caches).
_CHUNK_ROWS = 1 << 16
_DTYPES = {f.name: np.int64 if f.integer else np.float64 for f in FEATURES}
#: Quantities summed per cell (window sums are prefix-sum differences).
_SUMMED = ("subs", "shots_sum", "shots_n", "outcomes", "failures", "rejected", "auth", "load")
#: Quantities summed over the hour before the last minute, for the z-scores.
_HISTORY = ("subs", "subs_sq", "failures", "failures_sq")
# Cells get this many spare minutes on each side, so a window never reaches the cells
# of the previous entity.
_PAD = ACTIVITY_LOOKBACK_MINUTES + 10
_TIMESTAMP = pa.timestamp("us", tz="UTC")
#: Records without a job id are submissions when of these statuses.
_SUBMISSION = ("submitted", "rejected")
_OUTCOME = ("completed", "failed", "cancelled", "rejected")
_FAILURE = ("failed", "rejected")
#: Columns read when present; a table without one reads as all null.
_OPTIONAL = {
    "job_id": pa.string(),
    "shots": pa.int64(),
    "code_hash": pa.string(),
    "num_circuits": pa.int64(),
    "depth": pa.int64(),
    "backend": pa.string(),
    "runtime_s": pa.float64(),
    "error_code": pa.string(),
    "source_ip_hash": pa.string(),
    "client_agent": pa.string(),
}
#: Every column the features read, with its type: the entities, ``timestamp``, ``status``
#: and the optional ones.
INPUT_TYPES: dict[str, pa.DataType] = {
    **dict.fromkeys(ENTITY_COLUMNS.values(), pa.string()),
    "timestamp": _TIMESTAMP,
    "status": pa.string(),
    **_OPTIONAL,
}


def window_features(
    telemetry: pa.Table,
    start: datetime,
    end: datetime,
    entity_column: str = ENTITY_COLUMN,
    features: Sequence[str] | None = None,
) -> pa.Table:
    """Compute the feature rows of one entity kind with ``start <= event_timestamp < end``.

    Args:
        telemetry: contract records covering ``[start - LOOKBACK, end)`` (records outside
            it are ignored). ``timestamp``, ``status`` and the entity column are required;
            the other columns the features read are optional and read as null when absent.
        start: first instant (inclusive, tz-aware) whose row is wanted.
        end: last instant (exclusive, tz-aware).
        entity_column: ``api_key_id`` or ``user`` (`ENTITY_COLUMNS`).
        features: The features wanted (default all, `FEATURE_NAMES`); only the aggregates
            they read are computed, so the detector's 9 cost a fraction of the 55.

    Returns:
        One row per (entity, minute boundary) with columns
        `feature_schema(entity_column, features)`, ordered by time then entity.

    Example:
        >>> import pyarrow as pa
        >>> from datetime import UTC, datetime
        >>> t0 = datetime(2026, 1, 1, tzinfo=UTC)
        >>> records = pa.table({"api_key_id": ["k"], "timestamp": [t0], "status": ["submitted"],
        ...                     "shots": [100], "code_hash": ["c"]})
        >>> rows = window_features(records, t0, t0.replace(hour=1))
        >>> rows.num_rows, rows["submissions_1m"][0].as_py(), rows["max_shots_1h"][0].as_py()
        (5, 1, 100)
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("window_features needs tz-aware start and end instants")
    if entity_column not in ENTITY_COLUMNS.values():
        raise ValueError(
            f"entity_column {entity_column!r}: expected one of {sorted(ENTITY_COLUMNS.values())}"
        )
    missing = {entity_column, "timestamp", "status"} - set(telemetry.column_names)
    if missing:
        raise ValueError(f"telemetry lacks the column(s) {sorted(missing)}")
    names = tuple(FEATURE_NAMES if features is None else features)
    unknown = [name for name in names if name not in _DTYPES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(
            f"features {unknown or names}: expected distinct names from FEATURE_NAMES "
            "(`qabuse features` lists them)"
        )
    start_us, end_us = _us(start), _us(end)
    events = _Events.read(telemetry, entity_column, start_us - _ROW_HISTORY_US, end_us)
    grid = _Grid(events)
    rows = grid.rows(start_us, end_us)
    needed = aggregates_for(names)
    # The grid builds what the aggregates read on first use: build it, then drop the
    # per-record arrays, before the output takes memory.
    grid.aggregates(rows[:1], needed)
    grid.release_records()
    entity_names = events.entity_names
    del events
    # Rows are computed in cell order (entity, then time: the window searches walk forward
    # through the cells); the output is by time, then entity (entities rank by name), so
    # each chunk's values go straight to their output positions.
    position = _kernels().time_major_positions(rows, grid.n_minutes)
    row_entity = np.empty(len(rows), dtype=np.int64)
    row_entity[position] = rows // grid.n_minutes
    row_us = _arrow_backed(len(rows), np.int64)
    row_us[position] = (rows % grid.n_minutes + grid.minute0) * _MINUTE_US
    values = {name: _arrow_backed(len(rows), _DTYPES[name]) for name in names}
    # Rows in chunks, so the aggregates of only one chunk are held at a time.
    for at in range(0, len(rows), _CHUNK_ROWS):
        chunk = slice(at, at + _CHUNK_ROWS)
        for name, derived in derive(grid.aggregates(rows[chunk], needed), names).items():
            values[name][position[chunk]] = derived
    del position
    columns = [
        entity_names.take(_arrow(row_entity)),
        _arrow(row_us).view(_TIMESTAMP),
        *(_arrow(values.pop(name)) for name in names),
    ]
    result = pa.Table.from_arrays(columns, schema=feature_schema(entity_column, names))
    logger.debug("window_features(%s): %d rows for [%s, %s)", entity_column, len(rows), start, end)
    return result


#: Query rows of `minute_sequences` per chunk (60 x channels int64 each: ~160 MB).
_SEQUENCE_CHUNK = 1 << 16


def minute_sequences(
    telemetry: pa.Table,
    entity_ids: Sequence[str] | pa.Array | pa.ChunkedArray,
    instants: Sequence[datetime] | pa.Array | pa.ChunkedArray | np.ndarray,
    entity_column: str = ENTITY_COLUMN,
) -> np.ndarray:
    """Per (entity, instant) pair, its last `SEQUENCE_MINUTES` minutes of `SEQUENCE_CHANNELS`.

    Args:
        telemetry: contract records covering ``[min(instants) - LOOKBACK, max(instants))``
            (only the hour before each instant is summed; the earlier day decides which
            records are submissions).
        entity_ids: The entities, one per pair (unknown ones get zeros).
        instants: The rows' instants (tz-aware datetimes, a timestamp array, or numpy
            ``datetime64``), minute boundaries like ``event_timestamp``; another instant
            reads the whole minutes before its own.
        entity_column: ``api_key_id`` or ``user``.

    Returns:
        int64 array of shape ``(n, SEQUENCE_MINUTES, len(SEQUENCE_CHANNELS))``: per pair,
        minutes ``t - 60 .. t - 1`` oldest first, zeros where the entity was silent. Rows
        go through in chunks, so the temporaries stay small whatever ``n``; the result
        itself is ``n x 60 x 5 x 8`` bytes (2.4 GB per million pairs).

    Example:
        >>> import pyarrow as pa
        >>> from datetime import UTC, datetime
        >>> t0 = datetime(2026, 1, 1, tzinfo=UTC)
        >>> records = pa.table({"api_key_id": ["k"], "timestamp": [t0], "status": ["submitted"],
        ...                     "shots": [100], "code_hash": ["c"]})
        >>> seq = minute_sequences(records, ["k"], [t0.replace(minute=2)])
        >>> seq.shape, seq[0, -2].tolist(), seq[0, -1].tolist()
        ((1, 60, 5), [1, 0, 0, 100, 1], [0, 0, 0, 0, 0])
    """
    if entity_column not in ENTITY_COLUMNS.values():
        raise ValueError(
            f"entity_column {entity_column!r}: expected one of {sorted(ENTITY_COLUMNS.values())}"
        )
    keys = (
        pa.array(entity_ids, pa.string())
        if not isinstance(entity_ids, pa.Array | pa.ChunkedArray)
        else entity_ids
    )
    at_us = _instants_us(instants)
    if len(keys) != len(at_us):
        raise ValueError(f"{len(keys)} entity ids but {len(at_us)} instants")
    out = np.zeros((len(at_us), SEQUENCE_MINUTES, len(SEQUENCE_CHANNELS)), dtype=np.int64)
    if len(at_us) == 0:
        return out
    minute = at_us // _MINUTE_US
    events = _Events.read(
        telemetry,
        entity_column,
        (int(minute.min()) - SEQUENCE_MINUTES) * _MINUTE_US,
        int(minute.max()) * _MINUTE_US,
    )
    if len(events.minute) == 0:
        return out
    grid = _Grid(events)
    channels = grid.sequence_channels()
    entity = _numpy(pc.fill_null(pc.index_in(keys, value_set=events.entity_names), -1))
    # Out-of-grid instants clip into the entity's padding, where no cell lies.
    offset = np.clip(minute - grid.minute0, 0, grid.n_minutes)
    queries = np.where(entity >= 0, entity * grid.n_minutes + offset, -1)
    flat = out.reshape(-1, len(SEQUENCE_CHANNELS))  # a view: row-minutes by channel
    for at in range(0, len(queries), _SEQUENCE_CHUNK):
        q = queries[at : at + _SEQUENCE_CHUNK]
        known = np.flatnonzero(q >= 0)
        q = q[known]
        first = np.searchsorted(grid.cells, q - SEQUENCE_MINUTES, side="left")
        n = np.searchsorted(grid.cells, q, side="left") - first  # at most 60 cells
        # Every (row, cell) pair at once: the cells of row i are first[i] .. first[i] + n[i].
        row = np.repeat(np.arange(len(q)), n)
        cell = first[row] + (np.arange(len(row)) - np.repeat(np.cumsum(n) - n, n))
        minute_at = grid.cells[cell] - (q[row] - SEQUENCE_MINUTES)
        flat[(at + known[row]) * SEQUENCE_MINUTES + minute_at] = channels[cell]
    return out


def sequence_table(
    telemetry: pa.Table, rows: pa.Table, entity_column: str = ENTITY_COLUMN
) -> pa.Table:
    """The sequence rows (`definitions.sequence_schema`) of each (entity, event_timestamp)
    of ``rows`` (feature rows, or any table with those two columns), in its order."""
    sequences = minute_sequences(
        telemetry, rows[entity_column], rows[TIMESTAMP_COLUMN], entity_column
    )
    return _sequence_arrays(rows[entity_column], rows[TIMESTAMP_COLUMN], sequences, entity_column)


def _sequence_arrays(
    entities: pa.Array | pa.ChunkedArray,
    instants: pa.Array | pa.ChunkedArray,
    sequences: np.ndarray,
    entity_column: str,
) -> pa.Table:
    n = len(sequences)
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * SEQUENCE_MINUTES)
    columns = [
        pa.ListArray.from_arrays(
            offsets, pa.array(np.ascontiguousarray(sequences[:, :, c]).ravel())
        )
        for c in range(len(SEQUENCE_CHANNELS))
    ]
    schema = sequence_schema(entity_column)
    return pa.Table.from_arrays(
        [
            pa.chunked_array(entities).cast(pa.string()),
            pa.chunked_array(instants).cast(_TIMESTAMP),
            *columns,
        ],
        schema=schema,
    )


def _instants_us(
    instants: Sequence[datetime] | pa.Array | pa.ChunkedArray | np.ndarray,
) -> np.ndarray:
    if isinstance(instants, np.ndarray) and np.issubdtype(instants.dtype, np.datetime64):
        return instants.astype("datetime64[us]").astype(np.int64)
    array = instants if isinstance(instants, pa.Array | pa.ChunkedArray) else pa.array(instants)
    if not pa.types.is_timestamp(array.type) or array.type.tz is None:
        raise ValueError("minute_sequences needs tz-aware instants")
    return _numpy(pc.cast(pc.cast(array, _TIMESTAMP), pa.int64())).astype(np.int64)


@dataclass(frozen=True)
class _Events:
    """The records in a time span as numpy columns; entities numbered in name order."""

    entity: np.ndarray
    entity_names: pa.Array
    minute: np.ndarray
    ms: np.ndarray  # the instant, floored to the millisecond
    is_submission: np.ndarray
    is_outcome: np.ndarray
    is_failure: np.ndarray
    is_rejected: np.ndarray
    is_auth_failure: np.ndarray
    shots: np.ndarray
    has_shots: np.ndarray
    cost: np.ndarray
    runtime: np.ndarray  # NaN unless a completed record with a runtime
    backend: np.ndarray  # dictionary codes, -1 when null
    codes: np.ndarray
    networks: np.ndarray
    agents: np.ndarray

    @classmethod
    def read(cls, telemetry: pa.Table, entity_column: str, from_us: int, to_us: int) -> _Events:
        """The records in ``[from_us, to_us)``; those up to `JOB_MEMORY_MINUTES` before it
        are read too, to tell which records are their job's submission."""
        ts = pc.cast(pc.cast(telemetry["timestamp"], _TIMESTAMP), pa.int64())
        keep = pc.and_(pc.greater_equal(ts, from_us - _JOB_MEMORY_US), pc.less(ts, to_us))
        # Only the columns read, and filtered only when records fall outside: a filter
        # copies every column it keeps.
        table = telemetry.select([name for name in telemetry.column_names if name in INPUT_TYPES])
        if keep.null_count or pc.all(keep).as_py() is not True:  # a null instant is dropped
            table, ts = table.filter(keep), ts.filter(keep)
        n = table.num_rows

        def column(name: str) -> pa.ChunkedArray:
            if name in table.column_names:
                return table[name]
            return pa.chunked_array([pa.nulls(n, _OPTIONAL[name])])

        def numbers(name: str, null: float) -> np.ndarray:
            return _numpy(pc.fill_null(column(name), null))

        entity_codes, entity_names = _encode(table[entity_column])
        # Number the entities in name order, so ordering by number orders by name.
        by_name = pc.sort_indices(entity_names).to_numpy()
        rank = np.empty(len(by_name), dtype=np.int64)
        rank[by_name] = np.arange(len(by_name))
        entity = rank[entity_codes]
        us = _numpy(ts)
        status_codes, statuses = _encode(table["status"])
        status_names = statuses.to_pylist()

        def status_in(names: Sequence[str]) -> np.ndarray:
            # -1 (a null status) reads the trailing False.
            return np.array([name in names for name in status_names] + [False])[status_codes]

        precedence = np.array(
            [
                SUBMISSION_PRECEDENCE.get(name or "", len(SUBMISSION_PRECEDENCE))
                for name in status_names
            ]
            + [len(SUBMISSION_PRECEDENCE)],
            dtype=np.int64,
        )[status_codes]
        is_submission = _first_of_job(
            entity, _encode(column("job_id"))[0], us, precedence, status_in(_SUBMISSION)
        )
        is_rejected = status_in(("rejected",))
        shots = column("shots")
        shots_np = numbers("shots", 0).astype(np.int64)
        has_shots = _numpy(pc.is_valid(shots))
        backend_code, backends = _encode(column("backend"))
        weights = np.array(
            [backend_cost_weight(b) for b in backends.to_pylist()] + [backend_cost_weight(None)],
            dtype=np.float64,
        )
        cost = (
            np.where(has_shots, shots_np, 1).astype(np.float64)
            * numbers("num_circuits", 1).astype(np.float64)
            * np.maximum(numbers("depth", 1).astype(np.float64), 1.0)
            * weights[backend_code]  # -1 (no backend) reads the trailing weight
        )
        runtime = _numpy(pc.fill_null(pc.cast(column("runtime_s"), pa.float64()), np.nan))
        completed = status_in(("completed",))
        # The job memory's records only decided the submissions: drop them.
        span = us >= from_us
        return cls(
            entity=entity[span],
            entity_names=entity_names.take(pa.array(by_name)),
            minute=us[span] // _MINUTE_US,
            ms=us[span] // 1000,
            is_submission=is_submission[span],
            is_outcome=status_in(_OUTCOME)[span],
            is_failure=status_in(_FAILURE)[span],
            is_rejected=is_rejected[span],
            is_auth_failure=_numpy(pc.equal(column("error_code"), "auth_failed").fill_null(False))[
                span
            ],
            shots=shots_np[span],
            has_shots=has_shots[span],
            cost=np.where(is_submission & ~is_rejected, cost, 0.0)[span],
            runtime=np.where(completed, runtime, np.nan)[span],
            backend=backend_code[span],
            codes=_encode(column("code_hash"))[0][span],
            networks=_encode(column("source_ip_hash"))[0][span],
            agents=_encode(column("client_agent"))[0][span],
        )


def _first_of_job(
    entity: np.ndarray,
    job: np.ndarray,
    us: np.ndarray,
    precedence: np.ndarray,
    without_job: np.ndarray,
) -> np.ndarray:
    """Per record, whether it is its job's submission (`definitions` conventions).

    Records of one (entity, job) sorted by instant, then `SUBMISSION_PRECEDENCE` (each
    record's rank in ``precedence``): a record is the submission when the one before it
    lies more than `JOB_MEMORY_MINUTES` earlier, or there is none. Without a job id
    (``job`` -1), the records ``without_job`` marks are.
    """
    with_job = np.flatnonzero(job >= 0)
    if len(with_job) == 0:
        return without_job
    e, j, t = entity[with_job], job[with_job], us[with_job]
    order = np.lexsort((precedence[with_job], t, j, e))
    e, j, t = e[order], j[order], t[order]
    earliest = np.ones(len(order), dtype=bool)
    earliest[1:] = (e[1:] != e[:-1]) | (j[1:] != j[:-1]) | (t[1:] - t[:-1] > _JOB_MEMORY_US)
    first = without_job.copy()
    first[with_job[order]] = earliest
    return first


@dataclass(frozen=True)
class _Runtimes:
    """The runtimes of the grid's records, in cell order."""

    cells: np.ndarray
    #: Each runtime's rank among its entity's (ties in cell order), and where its entity's
    #: runtimes start and how many there are.
    rank: np.ndarray
    group_start: np.ndarray
    group_size: np.ndarray
    #: Per entity, from its start, its runtimes ascending.
    by_rank: np.ndarray
    #: Fenwick trees of the entities' sliding windows (all zeros between uses).
    tree: np.ndarray


class _Grid:
    """Per (entity, minute) cells of the records, and every window aggregate over them.

    A cell is ``entity * n_minutes + minute offset``: sorting cells sorts by entity, then
    time, so the cells of one entity's window are one contiguous run.
    """

    def __init__(self, events: _Events) -> None:
        self.events = e = events
        self.minute0 = (int(e.minute.min()) if len(e.minute) else 0) - _PAD
        last = int(e.minute.max()) if len(e.minute) else 0
        self.n_minutes = last - self.minute0 + _PAD
        self.offset = e.minute - self.minute0
        self.event_cell = e.entity * self.n_minutes + self.offset
        #: The records in cell order.
        self.by_cell = np.argsort(self.event_cell, kind="stable")
        self.cells, self.inverse = _unique_inverse(self.event_cell, self.by_cell)
        self.n_cells = len(self.cells)
        self.subs = self._per_cell(e.is_submission)
        # Built on first use, so a subset of the features builds only what it reads.
        self._prefixes: dict[tuple[str, ...], np.ndarray] = {}
        self._cell_maxima: dict[str, np.ndarray] = {}
        self._occurrences: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
        self._bounds: dict[tuple[int, str], np.ndarray] = {}

    def _cell_sums(self, name: str) -> np.ndarray:
        """Per cell, the sum of one `_SUMMED` quantity."""
        e = self.events
        counted_shots = e.is_submission & e.has_shots
        if name == "subs":
            return self.subs
        if name == "subs_sq":
            return self.subs * self.subs
        if name == "failures_sq":
            return self._cell_sums("failures") ** 2
        if name == "load":
            return self._per_cell(np.where(e.is_submission, self._backend_load(), 0))
        values = {
            "shots_sum": lambda: np.where(counted_shots, e.shots, 0),
            "shots_n": lambda: counted_shots,
            "outcomes": lambda: e.is_outcome,
            "failures": lambda: e.is_failure,
            "rejected": lambda: e.is_rejected,
            "auth": lambda: e.is_auth_failure,
        }[name]()
        return self._per_cell(values)

    def release_records(self) -> None:
        """Drops the per-record arrays: `aggregates` reads only what it built from them
        (on its first call) from then on."""
        del self.events, self.event_cell, self.offset, self.by_cell, self.inverse

    def window_max(self, name: str, rows: np.ndarray, window: int) -> np.ndarray:
        """Per row, the largest per-cell ``name`` of its last ``window`` minutes (0: none)."""
        if name not in self._cell_maxima:
            e = self.events
            self._cell_maxima[name] = {
                "shots_max": lambda: self._cell_max(e.is_submission & e.has_shots, e.shots),
                "peak_subs": lambda: self.subs,
                "share_max": self._code_sharing,
                "net_auth": self._network_auth_failures,
            }[name]()
        return _kernels().window_max(self.cells, self._cell_maxima[name], rows, window)

    def distinct(self, name: str, rows: np.ndarray, window: int) -> np.ndarray:
        """Per row, the distinct values of ``name`` its submissions of the last ``window``
        minutes carry."""
        if name not in self._occurrences:
            e = self.events
            codes = {
                "codes": e.codes,
                "networks": e.networks,
                "agents": e.agents,
                "hours": e.minute // 60 % 24,  # the hour of the day
            }[name]
            at = self.by_cell[(e.is_submission & (codes >= 0))[self.by_cell]]
            n_values = int(codes[at].max()) + 1 if len(at) else 1
            self._occurrences[name] = (self.event_cell[at], codes[at], n_values)
        cells, values, n_values = self._occurrences[name]
        return _kernels().window_distinct(cells, values, n_values, rows, window)

    @cached_property
    def cost(self) -> np.ndarray:
        return np.bincount(self.inverse, weights=self.events.cost, minlength=self.n_cells)

    @cached_property
    def cost_prefix(self) -> np.ndarray | None:
        # Costs are whole numbers: below 2**53 every float partial sum is exact.
        exact = float(self.cost.sum()) < 2.0**53
        return _prefix(self.cost) if exact else None

    @cached_property
    def runtimes(self) -> _Runtimes:
        e = self.events
        at = self.by_cell[~np.isnan(e.runtime[self.by_cell])]
        cells, values = self.event_cell[at], e.runtime[at]
        entity = cells // self.n_minutes
        new = np.ones(len(cells), dtype=bool)
        np.not_equal(entity[1:], entity[:-1], out=new[1:])
        starts = np.flatnonzero(new)
        group = np.cumsum(new) - 1
        sizes = np.diff(np.append(starts, len(cells)))
        by_value = np.lexsort((values, entity))  # entities stay in place
        position = np.empty(len(cells), dtype=np.int64)
        position[by_value] = np.arange(len(cells))
        return _Runtimes(
            cells=cells,
            rank=position - starts[group],
            group_start=starts[group],
            group_size=sizes[group],
            by_rank=values[by_value],
            tree=np.zeros(len(cells), dtype=np.int64),
        )

    @cached_property
    def subs_wavelet(self) -> _Wavelet:
        return _Wavelet(self.subs)

    def _per_cell(self, values: np.ndarray) -> np.ndarray:
        return np.bincount(self.inverse, weights=values, minlength=self.n_cells).astype(np.int64)

    def _cell_max(self, mask: np.ndarray, values: np.ndarray) -> np.ndarray:
        out = np.zeros(self.n_cells, dtype=np.int64)
        np.maximum.at(out, self.inverse[mask], values[mask])
        return out

    def _backend_load(self) -> np.ndarray:
        """Per record, the submissions (every entity) to its backend in its minute."""
        e = self.events
        pair = (e.backend + 1) * self.n_minutes + self.offset
        pair = np.where(e.is_submission, pair, -1)
        _, inverse = _unique_inverse(pair)
        counts = np.bincount(inverse, weights=e.is_submission).astype(np.int64)
        return counts[inverse]

    def _code_sharing(self) -> np.ndarray:
        """Per cell, the largest number of other entities sharing one of its code hashes.

        For a submission of hash ``h`` in minute ``m``: the distinct entities that
        submitted ``h`` in minutes ``m - 59 .. m``, itself excluded.
        """
        e = self.events
        mask = e.is_submission & (e.codes >= 0)
        out = np.zeros(self.n_cells, dtype=np.int64)
        if not mask.any():
            return out
        code, entity, offset = e.codes[mask], e.entity[mask], self.offset[mask]
        sharing = self._distinct_in_hour(code, entity, offset, code, offset)
        np.maximum.at(out, self.inverse[mask], sharing - 1)
        return out

    def _distinct_in_hour(
        self,
        group: np.ndarray,
        value: np.ndarray,
        offset: np.ndarray,
        query_group: np.ndarray,
        query_offset: np.ndarray,
    ) -> np.ndarray:
        """Per query, the distinct values of its group in minutes ``m - 59 .. m`` (its own
        minute ``m`` included), `SHARING_MINUTES` long."""
        if len(value) == 0:
            return np.zeros(len(query_group), dtype=np.int64)
        keys = group * self.n_minutes + offset
        by_key = np.argsort(keys)  # any order within a key: the counts are the same
        # The row after m reads m - 59 .. m.
        queries = query_group * self.n_minutes + query_offset + 1
        same = query_group is group and query_offset is offset
        by_query = by_key if same else np.argsort(queries)
        counted = _kernels().window_distinct(
            keys[by_key], value[by_key], int(value.max()) + 1, queries[by_query], SHARING_MINUTES
        )
        out = np.empty(len(queries), dtype=np.int64)
        out[by_query] = counted
        return out

    def sequence_channels(self) -> np.ndarray:
        """Per cell, the `SEQUENCE_CHANNELS` values: an (n_cells, channels) int64 array."""
        e = self.events
        coded = e.is_submission & (e.codes >= 0)
        n_codes = int(e.codes.max()) + 1 if coded.any() else 1
        pairs = _unique_sorted(self.inverse[coded] * n_codes + e.codes[coded])
        values = {
            "submissions": self.subs,
            "failures": self._cell_sums("failures"),
            "auth_failures": self._cell_sums("auth"),
            "shots_sum": self._cell_sums("shots_sum"),
            "distinct_code_hashes": np.bincount(pairs // n_codes, minlength=self.n_cells),
        }
        return np.stack([values[c].astype(np.int64) for c in SEQUENCE_CHANNELS], axis=1)

    def _network_auth_failures(self) -> np.ndarray:
        """Per cell, the largest network auth failures of one of its records.

        For a record from network ``n`` in minute ``m``: the distinct entities with an
        auth failure from ``n`` in minutes ``m - 59 .. m``, itself excluded.
        """
        e = self.events
        out = np.zeros(self.n_cells, dtype=np.int64)
        failed = e.is_auth_failure & (e.networks >= 0)
        if not failed.any():
            return out
        n_entities = int(e.entity.max()) + 1
        network, entity, offset = e.networks[failed], e.entity[failed], self.offset[failed]
        sent = e.networks >= 0
        sent_network, sent_entity, sent_offset = e.networks[sent], e.entity[sent], self.offset[sent]
        entities = self._distinct_in_hour(network, entity, offset, sent_network, sent_offset)
        itself = self._distinct_in_hour(
            network * n_entities + entity,
            np.zeros(len(entity), dtype=np.int64),
            offset,
            sent_network * n_entities + sent_entity,
            sent_offset,
        )
        np.maximum.at(out, self.inverse[sent], entities - itself)
        return out

    @cached_property
    def submission_times(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Submissions by cell then instant: their cells, instants (ms) and gap prefixes.

        A submission's gap is the time since its entity's previous submission, counted
        when it is at most `SHARING_MINUTES` (longer ones are breaks between sessions, and
        no hour holds them). ``prefixes["squares"][i]`` sums the squared counted gaps of
        the submissions before ``i``; ``"gaps"`` their lengths; ``"counted"`` their number.
        """
        e = self.events
        at = np.flatnonzero(e.is_submission)
        order = np.lexsort((e.ms[at], self.event_cell[at]))
        cells, ms = self.event_cell[at][order], e.ms[at][order]
        gaps = np.zeros(len(ms), dtype=np.int64)
        gaps[1:] = ms[1:] - ms[:-1]
        counted = np.zeros(len(ms), dtype=bool)
        counted[1:] = cells[1:] // self.n_minutes == cells[:-1] // self.n_minutes
        counted &= gaps <= SHARING_MINUTES * 60_000
        gaps = np.where(counted, gaps, 0)
        prefixes = {
            "squares": _prefix(gaps * gaps),
            "gaps": _prefix(gaps),
            "counted": _prefix(counted.astype(np.int64)),
        }
        return cells, ms, prefixes

    def _interarrival(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row, the span (ms) of its last hour's submissions and their squared gaps."""
        cells, ms, prefixes = self.submission_times
        search = _kernels().sorted_search
        first, last = search(cells, rows, 60, False), search(cells, rows, 1, True)
        some = last - first >= 2
        span = np.zeros(len(rows), dtype=np.int64)
        sq = np.zeros(len(rows), dtype=np.int64)
        f, lst = first[some], last[some]
        span[some] = ms[lst - 1] - ms[f]
        # The gaps of submissions first + 1 .. last - 1 to their predecessors.
        sq[some] = prefixes["squares"][lst] - prefixes["squares"][f + 1]
        return span, sq

    def _day_interarrival(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Per row, the number, sum and squared sum of the counted gaps of its last day.

        The gaps of the day's submissions to their predecessors, the first one's (which
        reaches back before the day) left out.
        """
        cells, _, prefixes = self.submission_times
        search = _kernels().sorted_search
        first, last = search(cells, rows, DAY_MINUTES, False), search(cells, rows, 1, True)
        start = np.minimum(first + 1, last)
        return {
            name: prefixes[key][last] - prefixes[key][start]
            for name, key in (
                ("iat_day_gaps", "counted"),
                ("iat_day_sum_ms", "gaps"),
                ("iat_day_sq_ms", "squares"),
            )
        }

    def rows(self, start_us: int, end_us: int) -> np.ndarray:
        """Cells of the rows: the 5 minute boundaries after each active minute, in span."""
        rows = _unique_sorted((self.cells[:, None] + np.arange(1, 6)).ravel())
        instant = (rows % self.n_minutes + self.minute0) * _MINUTE_US
        return rows[(instant >= start_us) & (instant < end_us)]

    def bounds(self, rows: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Per row at minute t, the cell index range of its minutes ``t - lo .. t - hi``."""
        return self._edge(rows, lo, "left"), self._edge(rows, hi, "right")

    def _edge(self, rows: np.ndarray, back: int, side: Literal["left", "right"]) -> np.ndarray:
        # Windows share edges (every window ends at t - 1): search each edge once.
        if (back, side) not in self._bounds:
            self._bounds[back, side] = _kernels().sorted_search(
                self.cells, rows, back, side == "right"
            )
        return self._bounds[back, side]

    def _window_sums(
        self, rows: np.ndarray, sums: list[tuple[str, str, int, int]]
    ) -> dict[str, np.ndarray]:
        """Per ``(aggregate, quantity, lo, hi)``, the quantity's sum over each row's minutes
        ``t - lo .. t - hi``: differences of prefix sums, every quantity of one window
        at once (a row's prefixes lie side by side)."""
        summed = tuple(sorted({quantity for _, quantity, _, _ in sums}))
        if summed not in self._prefixes:
            self._prefixes.clear()  # one set of features per grid: never more than one
            prefix = np.zeros((self.n_cells + 1, len(summed)), dtype=np.int64)
            for column, quantity in enumerate(summed):
                prefix[1:, column] = self._cell_sums(quantity)
            np.cumsum(prefix[1:], axis=0, out=prefix[1:])
            self._prefixes[summed] = prefix
        prefix = self._prefixes[summed]
        agg: dict[str, np.ndarray] = {}
        for lo, hi in dict.fromkeys((lo, hi) for _, _, lo, hi in sums):
            window = _kernels().window_sums(prefix, *self.bounds(rows, lo, hi))
            agg |= {
                name: window[summed.index(quantity)]
                for name, quantity, at_lo, at_hi in sums
                if (at_lo, at_hi) == (lo, hi)
            }
        return agg

    def aggregates(
        self, rows: np.ndarray, needed: frozenset[str] = frozenset(AGGREGATES)
    ) -> dict[str, np.ndarray]:
        """The aggregates of `definitions.AGGREGATES` in ``needed``, one value per row."""
        self._bounds = {}  # per set of rows
        # Sums as (aggregate, summed quantity, minutes back: first, last).
        sums = [
            (f"{prefix}{name}_{w}", name, lo, hi)
            for w in WINDOWS.values()
            for prefix, lo, hi in (("", w, 1), ("prev_", 2 * w, w + 1))
            for name in _SUMMED
        ]
        sums += [(f"hist_{name}", name, 60, 2) for name in _HISTORY]  # the previous 59 minutes
        sums.append(("subs_day", "subs", DAY_MINUTES, 1))
        agg = self._window_sums(rows, [s for s in sums if s[0] in needed])
        medians = self._median_runtimes(
            rows, [w for w in WINDOWS.values() if f"median_runtime_{w}" in needed]
        )
        for w in WINDOWS.values():
            first, last = self.bounds(rows, w, 1)
            for name in ("shots_max", "peak_subs", "share_max"):
                if f"{name}_{w}" in needed:
                    agg[f"{name}_{w}"] = self.window_max(name, rows, w)
            for name in ("codes", "networks", "agents"):
                if f"{name}_{w}" in needed:
                    agg[f"{name}_{w}"] = self.distinct(name, rows, w)
            if f"cost_{w}" in needed:
                agg[f"cost_{w}"] = self._cost_sum(first, last)
            if w in medians:
                agg[f"median_runtime_{w}"] = medians[w]
        if "p95_subs" in needed:
            agg["p95_subs"] = self._rate_percentile(rows)
        if "iat_span_ms" in needed or "iat_sq_ms" in needed:
            span, sq = self._interarrival(rows)
            for name, values in (("iat_span_ms", span), ("iat_sq_ms", sq)):
                if name in needed:
                    agg[name] = values
        if needed & {"iat_day_gaps", "iat_day_sum_ms", "iat_day_sq_ms"}:
            for name, values in self._day_interarrival(rows).items():
                if name in needed:
                    agg[name] = values
        if "net_auth_max" in needed:
            agg["net_auth_max"] = self.window_max("net_auth", rows, 60)
        if "cost_day" in needed:
            agg["cost_day"] = self._cost_sum(*self.bounds(rows, DAY_MINUTES, 1))
        if "active_hours_day" in needed:
            agg["active_hours_day"] = self.distinct("hours", rows, DAY_MINUTES)
        first, last = self.bounds(rows, ACTIVITY_LOOKBACK_MINUTES, 1)
        if "first_seen_min" in needed:
            agg["first_seen_min"] = rows - self.cells[first]
        if "gap_min" in needed:
            latest, previous = last - 1, last - 2
            agg["gap_min"] = np.where(
                previous >= first,
                self.cells[latest] - self.cells[np.maximum(previous, 0)],
                ACTIVITY_LOOKBACK_MINUTES,
            )
        assert set(agg) == needed, set(agg) ^ needed
        return agg

    def _median_runtimes(self, rows: np.ndarray, windows: list[int]) -> dict[int, np.ndarray]:
        """Per window length, the median runtime of each row's window (0 when empty).

        The windows slide over each entity's runtimes, counted by rank
        (`window_kernels.window_medians`).
        """
        out: dict[int, np.ndarray] = {}
        r = self.runtimes
        for w in windows:
            out[w] = _kernels().window_medians(
                r.cells, r.rank, r.group_start, r.group_size, r.by_rank, rows, w, r.tree
            )
        return out

    def _cost_sum(self, first: np.ndarray, last: np.ndarray) -> np.ndarray:
        """Per row, the cost of cells ``first .. last - 1``, exactly as summed one by one.

        Exact from the prefix sums while the grand total stays below 2**53; past that
        (hostile shot counts), the cells are summed in time order (up to a day of cells).
        """
        if self.cost_prefix is not None:
            return self.cost_prefix[last] - self.cost_prefix[first]
        return _ordered_sum(self.cost, first, last)

    def _rate_percentile(self, rows: np.ndarray) -> np.ndarray:
        """Nearest-rank percentile of per-minute submissions over ``t - 60 .. t - 1``."""
        first, last = self.bounds(rows, 60, 1)
        idle = 60 - (last - first)  # minutes without a record count as zero submissions
        rank = RATE_PERCENTILE_RANK - idle
        out = np.zeros(len(rows), dtype=np.int64)
        busy = rank >= 0
        if busy.any():
            out[busy] = self.subs_wavelet.kth(first[busy], last[busy], rank[busy])
        return out


def _ordered_sum(values: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Per row, ``sum(values[first:last])`` added left to right from 0.0 (Python's order)."""
    out = np.zeros(len(first), dtype=np.float64)
    if len(values) == 0:
        return out
    length = last - first
    for step in range(int(length.max()) if len(length) else 0):
        at = np.minimum(first + step, len(values) - 1)
        out += np.where(step < length, values[at], 0.0)
    return out


class _Wavelet:
    """A wavelet matrix over non-negative integers: range k-th smallest, all queries at once.

    Built once, O(n x bits); `kth` descends one bit level at a time for every query
    together, O(queries x bits).
    """

    def __init__(self, values: np.ndarray) -> None:
        current = values.astype(np.int64)
        index = np.int32 if len(current) < 2**31 - 1 else np.int64
        n_bits = int(current.max()).bit_length() if len(current) else 0
        #: Per level, from the highest bit down: its bit, and the values with a 0 there
        #: before each position.
        self.bits = np.arange(n_bits - 1, -1, -1, dtype=np.int64)
        self.zeros = np.zeros((n_bits, len(current) + 1), dtype=index)
        for at, level in enumerate(self.bits):
            one = ((current >> level) & 1).astype(bool)
            np.cumsum(~one, out=self.zeros[at, 1:])
            current = np.concatenate([current[~one], current[one]])

    def kth(self, first: np.ndarray, last: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Per query, the ``k``-th smallest (0-based) of the slice ``first:last``.

        Needs ``0 <= k < last - first``.
        """
        return _kernels().wavelet_kth(
            self.zeros,
            self.bits,
            first.astype(np.int64),
            last.astype(np.int64),
            k.astype(np.int64),
        )


def _range_kth(
    values: np.ndarray, first: np.ndarray, last: np.ndarray, k: np.ndarray
) -> np.ndarray:
    """Per query, the ``k``-th smallest (0-based) of ``values[first:last]``."""
    return _Wavelet(values).kth(first, last, k)


def _prefix(per_cell: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(per_cell)])


def _codes(encoded: pa.DictionaryArray) -> np.ndarray:
    """Dictionary codes as int64, -1 where null."""
    return _numpy(pc.fill_null(encoded.indices, -1)).astype(np.int64)


def _encode(values: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Dictionary codes of a column (int64, -1 where null) and its dictionary.

    The chunks are encoded as they are (one dictionary for all), not combined first: a
    combined string column would be a copy.
    """
    encoded = pc.dictionary_encode(values)
    if encoded.num_chunks == 0:
        return np.zeros(0, dtype=np.int64), pa.array([], values.type)
    dictionary = encoded.chunk(encoded.num_chunks - 1).dictionary
    if any(len(chunk.dictionary) != len(dictionary) for chunk in encoded.chunks):
        # Chunks encoded with dictionaries of their own: encode them as one.
        encoded = pa.chunked_array([pc.dictionary_encode(values.combine_chunks())])
        dictionary = encoded.chunk(0).dictionary
    return np.concatenate([_codes(chunk) for chunk in encoded.chunks]), dictionary


def _arrow_backed(n: int, dtype: type[np.generic]) -> np.ndarray:
    """An uninitialised numpy array of ``n`` int64 or float64 in Arrow's memory pool.

    The output columns are allocated there: the pool keeps pages it has touched, so the
    next call's columns reuse them instead of faulting fresh ones (numpy's large arrays
    ask the kernel for huge pages, slow to fault on a busy machine).
    """
    return np.frombuffer(pa.allocate_buffer(max(n, 1) * 8), dtype=dtype)[:n]


def _arrow(values: np.ndarray) -> pa.Array:
    """A numpy int64 or float64 array as an Arrow array sharing its memory (no copy)."""
    kind = pa.int64() if values.dtype == np.int64 else pa.float64()
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(values)])


def _kernels() -> ModuleType:
    """The compiled kernels (`window_kernels`), imported on first use: numba takes a while."""
    from qabuse_dagster.features import window_kernels

    return window_kernels


def _numpy(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(array.to_numpy(zero_copy_only=False))


def _us(instant: datetime) -> int:
    return (instant - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _unique_sorted(values: np.ndarray) -> np.ndarray:
    """``np.unique`` by sorting (numpy 2's hash-based unique is slower on int64 here)."""
    ordered = np.sort(values)
    keep = np.empty(len(ordered), dtype=bool)
    keep[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def _unique_inverse(
    values: np.ndarray, order: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)``, by sorting (or by ``order``, its argsort)."""
    if order is None:
        order = np.argsort(values, kind="stable")
    ordered = values[order]
    new = np.empty(len(ordered), dtype=bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    group = np.cumsum(new) - 1
    inverse = np.empty(len(values), dtype=np.int64)
    inverse[order] = group
    return ordered[new], inverse

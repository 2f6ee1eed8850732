"""Window features of one entity kind over a whole telemetry table, computed with numpy.

The features, their windows and counting conventions are defined in
`qabuse_dagster.features.definitions`; this module computes the definition's aggregates
for every row at once, and `definitions.derive` turns them into features (the streaming
engine, `qabuse_dagster.features.streaming`, feeds the same `derive`).

How: records are summed per (entity, minute) *cell* once. Cells sorted by entity, then
minute, put the cells of one entity's window in one contiguous run, found by binary
search, so

* sums are differences of two prefix sums (integers, exact);
* maxima are sparse-table range-maximum queries (a window holds at most 60 cells);
* the estimated cost is a whole number of hundredths, so its float prefix sums are exact
  below 2**53 (beyond, cells are summed in time order, at most 60 per window);
* distinct counts use disjoint per-value covers and a running sum;
* medians and percentiles are range k-th-smallest queries on a wavelet matrix, all rows
  descending one bit level at a time.

The cost is O(n log n) in the records, independent of window length. The engine was
chosen by measurement: the DuckDB ``RANGE``-window SQL it replaced (kept as
``benchmarks/duckdb_windows.py``, checked to give the same rows for the features it has)
and a pandas resample/rolling pipeline are both slower (``python -m benchmarks``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
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
#: Rows whose aggregates are computed together (about 0.5 GB of aggregates).
_CHUNK_ROWS = 1 << 20
_DTYPES = {f.name: np.int64 if f.integer else np.float64 for f in FEATURES}
#: Quantities summed per cell (window sums are prefix-sum differences).
_SUMMED = ("subs", "shots_sum", "shots_n", "outcomes", "failures", "rejected", "auth", "load")
# Cells get this many spare minutes on each side, so a window never reaches the cells
# of the previous entity.
_PAD = ACTIVITY_LOOKBACK_MINUTES + 10
_TIMESTAMP = pa.timestamp("us", tz="UTC")
#: Records without a job id are submissions when of these statuses.
_SUBMISSION = pa.array(["submitted", "rejected"])
_OUTCOME = pa.array(["completed", "failed", "cancelled", "rejected"])
_FAILURE = pa.array(["failed", "rejected"])
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
    # Rows in chunks, so the aggregates of only one chunk are held at a time.
    needed = aggregates_for(names)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for at in range(0, len(rows), _CHUNK_ROWS):
        chunk = grid.aggregates(rows[at : at + _CHUNK_ROWS], needed)
        for name, values in derive(chunk, names).items():
            parts[name].append(values)

    row_entity, row_minute = rows // grid.n_minutes, rows % grid.n_minutes + grid.minute0
    # Rows were computed in cell order (entity, then time: binary searches run fastest
    # on sorted queries); the output is by time, then entity (entities rank by name).
    order = np.lexsort((row_entity, row_minute))
    columns = [
        events.entity_names.take(pa.array(row_entity[order])),
        pa.array(row_minute[order] * _MINUTE_US, type=_TIMESTAMP),
    ]
    for name in names:  # a column at a time: its chunks go as the column comes
        chunks = parts.pop(name)
        values = np.concatenate(chunks) if chunks else np.zeros(0, _DTYPES[name])
        columns.append(pa.array(values[order]))
        del chunks, values
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
        table = telemetry.filter(keep)
        n = table.num_rows

        def column(name: str) -> pa.Array:
            if name in table.column_names:
                return table[name].combine_chunks()
            return pa.nulls(n, _OPTIONAL[name])

        entities = pc.dictionary_encode(table[entity_column].combine_chunks())
        # Number the entities in name order, so ordering by number orders by name.
        by_name = pc.sort_indices(entities.dictionary).to_numpy()
        rank = np.empty(len(by_name), dtype=np.int64)
        rank[by_name] = np.arange(len(by_name))
        entity = rank[_numpy(entities.indices)]
        us = _numpy(ts.filter(keep))
        status = table["status"]
        is_submission = _first_of_job(
            entity, _codes(pc.dictionary_encode(column("job_id"))), us, status
        )
        is_rejected = _numpy(pc.equal(status, "rejected").fill_null(False))
        shots = column("shots")
        shots_np = _numpy(pc.fill_null(shots, 0)).astype(np.int64)
        has_shots = _numpy(pc.is_valid(shots))
        backend = pc.dictionary_encode(column("backend"))
        weights = np.array(
            [backend_cost_weight(b) for b in backend.dictionary.to_pylist()]
            + [backend_cost_weight(None)],
            dtype=np.float64,
        )
        backend_code = _codes(backend)
        circuits = _numpy(pc.fill_null(column("num_circuits"), 1)).astype(np.float64)
        depth = _numpy(pc.fill_null(column("depth"), 1)).astype(np.float64)
        cost = (
            np.where(has_shots, shots_np, 1).astype(np.float64)
            * circuits
            * np.maximum(depth, 1.0)
            * weights[backend_code]  # -1 (no backend) reads the trailing weight
        )
        runtime = _numpy(pc.fill_null(pc.cast(column("runtime_s"), pa.float64()), np.nan))
        completed = _numpy(pc.equal(status, "completed").fill_null(False))
        # The job memory's records only decided the submissions: drop them.
        span = us >= from_us
        return cls(
            entity=entity[span],
            entity_names=entities.dictionary.take(pa.array(by_name)),
            minute=us[span] // _MINUTE_US,
            ms=us[span] // 1000,
            is_submission=is_submission[span],
            is_outcome=_numpy(pc.is_in(status, _OUTCOME))[span],
            is_failure=_numpy(pc.is_in(status, _FAILURE))[span],
            is_rejected=is_rejected[span],
            is_auth_failure=_numpy(pc.equal(column("error_code"), "auth_failed").fill_null(False))[
                span
            ],
            shots=shots_np[span],
            has_shots=has_shots[span],
            cost=np.where(is_submission & ~is_rejected, cost, 0.0)[span],
            runtime=np.where(completed, runtime, np.nan)[span],
            backend=backend_code[span],
            codes=_codes(pc.dictionary_encode(column("code_hash")))[span],
            networks=_codes(pc.dictionary_encode(column("source_ip_hash")))[span],
            agents=_codes(pc.dictionary_encode(column("client_agent")))[span],
        )


def _first_of_job(
    entity: np.ndarray, job: np.ndarray, us: np.ndarray, status: pa.ChunkedArray
) -> np.ndarray:
    """Per record, whether it is its job's submission (`definitions` conventions).

    Records of one (entity, job) sorted by instant, then `SUBMISSION_PRECEDENCE`: a record
    is the submission when the one before it lies more than `JOB_MEMORY_MINUTES` earlier,
    or there is none. Without a job id, ``submitted`` and ``rejected`` records are.
    """
    encoded = pc.dictionary_encode(status.combine_chunks())
    precedence = np.array(
        [
            SUBMISSION_PRECEDENCE.get(name, len(SUBMISSION_PRECEDENCE))
            for name in encoded.dictionary.to_pylist()
        ]
        + [len(SUBMISSION_PRECEDENCE)],
        dtype=np.int64,
    )
    order = np.lexsort((precedence[_codes(encoded)], us, job, entity))
    e, j, t = entity[order], job[order], us[order]
    earliest = np.ones(len(order), dtype=bool)
    earliest[1:] = (e[1:] != e[:-1]) | (j[1:] != j[:-1]) | (t[1:] - t[:-1] > _JOB_MEMORY_US)
    first = np.empty(len(order), dtype=bool)
    first[order] = earliest
    without_job = _numpy(pc.is_in(status, _SUBMISSION))
    return np.where(job >= 0, first, without_job)


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
        self.cells, self.inverse = _unique_inverse(self.event_cell)
        self.n_cells = len(self.cells)
        self.subs = self._per_cell(e.is_submission)
        # Built on first use, so a subset of the features builds only what it reads.
        self._prefixes: dict[str, np.ndarray] = {}
        self._max_tables: dict[str, _SparseMax] = {}
        self._distinct: dict[tuple[str, int], _DistinctCounter] = {}
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

    def prefix(self, name: str) -> np.ndarray:
        if name not in self._prefixes:
            self._prefixes[name] = _prefix(self._cell_sums(name))
        return self._prefixes[name]

    def max_table(self, name: str) -> _SparseMax:
        if name not in self._max_tables:
            e = self.events
            values = {
                "shots_max": lambda: self._cell_max(e.is_submission & e.has_shots, e.shots),
                "peak_subs": lambda: self.subs,
                "share_max": self._code_sharing,
                "net_auth": self._network_auth_failures,
            }[name]()
            self._max_tables[name] = _SparseMax(values)
        return self._max_tables[name]

    def distinct(self, name: str, window: int) -> _DistinctCounter:
        if (name, window) not in self._distinct:
            e = self.events
            codes = {
                "codes": e.codes,
                "networks": e.networks,
                "agents": e.agents,
                "hours": e.minute // 60 % 24,  # the hour of the day
            }[name]
            mask = e.is_submission & (codes >= 0)
            self._distinct[name, window] = _DistinctCounter(
                group=e.entity[mask],
                value=codes[mask],
                offset=self.offset[mask],
                window=window,
                n_minutes=self.n_minutes,
            )
        return self._distinct[name, window]

    @cached_property
    def cost(self) -> np.ndarray:
        return np.bincount(self.inverse, weights=self.events.cost, minlength=self.n_cells)

    @cached_property
    def cost_prefix(self) -> np.ndarray | None:
        # Costs are whole numbers: below 2**53 every float partial sum is exact.
        exact = float(self.cost.sum()) < 2.0**53
        return _prefix(self.cost) if exact else None

    @cached_property
    def runtimes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, _Wavelet]:
        """Runtimes sorted by cell then value: cells, values, values by rank, wavelet."""
        e = self.events
        has_runtime = ~np.isnan(e.runtime)
        cells, values = self.event_cell[has_runtime], e.runtime[has_runtime]
        order = np.lexsort((values, cells))
        cells, values = cells[order], values[order]
        rank = np.empty(len(values), dtype=np.int64)
        rank[np.argsort(values, kind="stable")] = np.arange(len(values))
        return cells, values, np.sort(values), _Wavelet(rank)

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
        sharing = _DistinctCounter(
            group=code,
            value=entity,
            offset=offset,
            window=SHARING_MINUTES,
            n_minutes=self.n_minutes,
        ).at(code * self.n_minutes + offset + 1)  # the row after m reads m - 59 .. m
        np.maximum.at(out, self.inverse[mask], sharing - 1)
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
        window = {"window": SHARING_MINUTES, "n_minutes": self.n_minutes}
        entities = _DistinctCounter(
            group=e.networks[failed], value=e.entity[failed], offset=self.offset[failed], **window
        )
        itself = _DistinctCounter(
            group=e.networks[failed] * n_entities + e.entity[failed],
            value=np.zeros(int(failed.sum()), dtype=np.int64),
            offset=self.offset[failed],
            **window,
        )
        sent = e.networks >= 0
        network, entity, at = e.networks[sent], e.entity[sent], self.offset[sent] + 1
        others = entities.at(network * self.n_minutes + at) - itself.at(
            (network * n_entities + entity) * self.n_minutes + at
        )
        np.maximum.at(out, self.inverse[sent], others)
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
        first = np.searchsorted(cells, rows - 60, side="left")
        last = np.searchsorted(cells, rows - 1, side="right")
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
        first = np.searchsorted(cells, rows - DAY_MINUTES, side="left")
        last = np.searchsorted(cells, rows - 1, side="right")
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
            self._bounds[back, side] = np.searchsorted(self.cells, rows - back, side=side)
        return self._bounds[back, side]

    def window_sum(self, name: str, rows: np.ndarray, lo: int, hi: int) -> np.ndarray:
        first, last = self.bounds(rows, lo, hi)
        prefix = self.prefix(name)
        return prefix[last] - prefix[first]

    def aggregates(
        self, rows: np.ndarray, needed: frozenset[str] = frozenset(AGGREGATES)
    ) -> dict[str, np.ndarray]:
        """The aggregates of `definitions.AGGREGATES` in ``needed``, one value per row."""
        self._bounds = {}  # per set of rows
        agg: dict[str, np.ndarray] = {}
        medians = self._median_runtimes(
            rows, [w for w in WINDOWS.values() if f"median_runtime_{w}" in needed]
        )
        for w in WINDOWS.values():
            first, last = self.bounds(rows, w, 1)
            for name in _SUMMED:
                if f"{name}_{w}" in needed:
                    agg[f"{name}_{w}"] = self.window_sum(name, rows, w, 1)
                if f"prev_{name}_{w}" in needed:
                    agg[f"prev_{name}_{w}"] = self.window_sum(name, rows, 2 * w, w + 1)
            for name in ("shots_max", "peak_subs", "share_max"):
                if f"{name}_{w}" in needed:
                    agg[f"{name}_{w}"] = self.max_table(name).query(first, last)
            for name in ("codes", "networks", "agents"):
                if f"{name}_{w}" in needed:
                    agg[f"{name}_{w}"] = self.distinct(name, w).at(rows)
            if f"cost_{w}" in needed:
                agg[f"cost_{w}"] = self._cost_sum(first, last)
            if w in medians:
                agg[f"median_runtime_{w}"] = medians[w]
        for name, summed in (
            ("hist_subs", "subs"),
            ("hist_subs_sq", "subs_sq"),
            ("hist_failures", "failures"),
            ("hist_failures_sq", "failures_sq"),
        ):
            if name in needed:  # the previous 59 minutes
                agg[name] = self.window_sum(summed, rows, 60, 2)
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
            agg["net_auth_max"] = self.max_table("net_auth").query(*self.bounds(rows, 60, 1))
        if "subs_day" in needed:
            agg["subs_day"] = self.window_sum("subs", rows, DAY_MINUTES, 1)
        if "cost_day" in needed:
            agg["cost_day"] = self._cost_sum(*self.bounds(rows, DAY_MINUTES, 1))
        if "active_hours_day" in needed:
            agg["active_hours_day"] = self.distinct("hours", DAY_MINUTES).at(rows)
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

        Runtimes are sorted by cell, then value: a 1-minute window is one cell, so its
        middle values are read directly; longer windows span cells and go through the
        wavelet matrix together.
        """
        out: dict[int, np.ndarray] = {}
        if not windows:
            return out
        cells, values, by_rank, wavelet = self.runtimes
        queries: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        last = np.searchsorted(cells, rows - 1, side="right")
        for w in windows:
            first = np.searchsorted(cells, rows - w, side="left")
            n = last - first
            out[w] = np.zeros(len(rows), dtype=np.float64)
            some = np.flatnonzero(n)
            f, m = first[some], n[some]
            if w == 1:
                out[w][some] = (values[f + (m - 1) // 2] + values[f + m // 2]) / 2
            else:
                queries.append((w, some, f, m))
        if queries and len(values):
            f = np.concatenate([q[2] for q in queries])
            m = np.concatenate([q[3] for q in queries])
            # Consecutive rows of an entity mostly see the same runtimes: ask once per range.
            ranges, inverse = _unique_inverse(f * (len(values) + 1) + m)
            f, m = ranges // (len(values) + 1), ranges % (len(values) + 1)
            lower, upper = wavelet.kth(
                np.tile(f, 2), np.tile(f + m, 2), np.concatenate([(m - 1) // 2, m // 2])
            ).reshape(2, -1)
            medians = ((by_rank[lower] + by_rank[upper]) / 2)[inverse]
            at = 0
            for w, some, _, _ in queries:
                out[w][some] = medians[at : at + len(some)]
                at += len(some)
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


class _SparseMax:
    """Range maxima over at most 64 consecutive values, by a sparse table (0 when empty)."""

    LEVELS = 7  # spans 1 .. 64

    def __init__(self, values: np.ndarray) -> None:
        self.levels = [values]
        for level in range(1, self.LEVELS):
            prev, half = self.levels[-1], 1 << (level - 1)
            shifted = np.zeros_like(prev)
            shifted[: max(len(prev) - half, 0)] = prev[half:]
            self.levels.append(np.maximum(prev, shifted))

    def query(self, first: np.ndarray, last: np.ndarray) -> np.ndarray:
        length = last - first
        out = np.zeros(len(first), dtype=self.levels[0].dtype)
        level = np.frexp(np.maximum(length, 1))[1] - 1  # floor(log2(length))
        for k in np.unique(level[length > 0]):
            at = (level == k) & (length > 0)
            table = self.levels[int(k)]
            out[at] = np.maximum(table[first[at]], table[last[at] - (1 << int(k))])
        return out


class _DistinctCounter:
    """Distinct values per group over a sliding window of minutes, at any instant.

    Each (group, value, minute) occurrence covers the instants ``minute + 1 .. minute +
    window``; an occurrence's cover starts after the previous occurrence's of the same
    (group, value) ends, so the covers are disjoint and the count at an instant is the
    running sum of +1 at each cover's start and -1 past its end.
    """

    def __init__(
        self,
        *,
        group: np.ndarray,
        value: np.ndarray,
        offset: np.ndarray,
        window: int,
        n_minutes: int,
    ) -> None:
        if len(value) == 0:
            self.edges, self.running = np.zeros(0, np.int64), np.zeros(0, np.int64)
            return
        n_values = int(value.max()) + 1
        triples = _unique_sorted((group * n_values + value) * n_minutes + offset)
        pair, minute = triples // n_minutes, triples % n_minutes
        base = (pair // n_values) * n_minutes
        same_pair = np.concatenate([[False], pair[1:] == pair[:-1]])
        previous = np.concatenate([[0], minute[:-1]])
        cover_from = np.where(same_pair, np.maximum(minute + 1, previous + window + 1), minute + 1)
        edges = np.concatenate([base + cover_from, base + minute + window + 1])
        steps = np.concatenate([np.ones(len(minute), np.int64), -np.ones(len(minute), np.int64)])
        by_edge = np.argsort(edges, kind="stable")
        self.edges, self.running = edges[by_edge], np.cumsum(steps[by_edge])

    def at(self, queries: np.ndarray) -> np.ndarray:
        """Per query ``g * n_minutes + t``: distinct values of ``g`` in ``t - window .. t - 1``."""
        if len(self.edges) == 0:
            return np.zeros(len(queries), dtype=np.int64)
        at = np.searchsorted(self.edges, queries, side="right") - 1
        return np.where(at >= 0, self.running[np.maximum(at, 0)], 0)


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
        self.levels: list[tuple[int, np.ndarray]] = []
        for level in reversed(range(int(current.max()).bit_length() if len(current) else 0)):
            one = ((current >> level) & 1).astype(bool)
            zeros = np.zeros(len(current) + 1, dtype=index)
            np.cumsum(~one, out=zeros[1:])
            self.levels.append((level, zeros))
            current = np.concatenate([current[~one], current[one]])

    def kth(self, first: np.ndarray, last: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Per query, the ``k``-th smallest (0-based) of the slice ``first:last``.

        Needs ``0 <= k < last - first``.
        """
        a, b, k = first.astype(np.int64), last.astype(np.int64), k.astype(np.int64)
        result = np.zeros(len(a), dtype=np.int64)
        for level, zeros in self.levels:
            n_zeros = int(zeros[-1])
            za, zb = zeros[a], zeros[b]
            in_zeros = zb - za
            go_one = k >= in_zeros
            k = np.where(go_one, k - in_zeros, k)
            result |= go_one.astype(np.int64) << level
            a = np.where(go_one, n_zeros + a - za, za)
            b = np.where(go_one, n_zeros + b - zb, zb)
        return result


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

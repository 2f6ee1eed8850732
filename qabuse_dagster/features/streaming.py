"""Window features of one entity kind computed incrementally, record by record.

`StreamingWindows` keeps, per entity (api key or user), one bucket per minute that holds
records and emits the rows `window_features` computes over the same records: the same
``(entity, event_timestamp)`` pairs, the same values, the same column types. Both engines
compute the aggregates of `qabuse_dagster.features.definitions` under its conventions and
turn them into features with the same `definitions.derive`; the tests replay simulator
output through both.

Event time and lateness: the *watermark* is the latest record timestamp seen minus
``allowed_lateness`` (or ``now - allowed_lateness`` from `StreamingWindows.advance`,
whichever is later). The row at instant ``T`` reads records strictly before ``T``, so it
is final once the watermark reaches ``T``, and `advance` emits it then. A record older
than the watermark could change a row that is already final: it is not applied, it is
counted in `StreamingWindows.late_records` and handed to ``on_late`` (or logged), so an
emitted row never changes and a late record is never lost without a trace. Records
within the lateness bound may arrive in any order.

Cost: a record touches one bucket (constant work). When the watermark closes a minute,
its buckets get the cross-entity aggregates (backend load, code-hash sharing) from two
global indexes, in constant work per record. Each emitted row moves the window edges by
one minute: running sums (per entity, exact Python ints, the cost too: a window's
sums are the difference with those before its first bucket), per-value counts and
monotonic deques for the maxima are updated per bucket entering or leaving (amortised
constant per record), and runtimes go through a sorted list (logarithmic). Buckets leave
memory two hours after their minute; an entity's state is dropped after a day of silence.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sortedcontainers import SortedList

from qabuse_dagster.features.definitions import (
    ACTIVITY_LOOKBACK_MINUTES,
    AGGREGATES,
    DAY_MINUTES,
    ENTITY_COLUMNS,
    FEATURE_NAMES,
    JOB_MEMORY_MINUTES,
    RATE_PERCENTILE_RANK,
    ROW_FLOAT_AGGREGATES,
    ROW_INT_AGGREGATES,
    SEQUENCE_CHANNELS,
    SEQUENCE_MINUTES,
    SHARING_MINUTES,
    SUBMISSION_PRECEDENCE,
    TIMESTAMP_COLUMN,
    WINDOW_FLOAT_AGGREGATES,
    WINDOW_INT_AGGREGATES,
    WINDOWS,
    backend_cost_weight,
    derive,
    feature_schema,
    sequence_schema,
)

logger = logging.getLogger(__name__)

# Status -> bit set; the conventions of `definitions`: a rejected record is an outcome and
# a failure at once. Which record is a submission is decided when its minute closes.
_OUTCOME, _FAILURE, _REJECTED, _COMPLETED = 2, 4, 8, 32
_STATUS_BITS = {
    "rejected": _OUTCOME | _FAILURE | _REJECTED,
    "completed": _OUTCOME | _COMPLETED,
    "cancelled": _OUTCOME,
    "failed": _OUTCOME | _FAILURE,
}
# Statuses that make a record without a job id a submission.
_SUBMISSION_STATUSES = frozenset({"submitted", "rejected"})
_LAST_PRECEDENCE = len(SUBMISSION_PRECEDENCE)
# Bucket slots (a list, not an object: attribute access costs on the per-record path).
# Slots 0 .. _N_SUMS - 1 are integers summed over windows (the cost too: a whole number
# of hundredths, exact as a Python int); _LOAD, the squares and _SHARE are filled in when
# the minute closes.
_SUBS, _SHOTS, _SHOTS_N, _OUTCOMES, _FAILURES, _REJ, _AUTH, _LOAD, _SUBS_SQ, _FAIL_SQ, _COST = (
    range(11)
)
_N_SUMS = 11
_SHOTS_MAX, _SHARE, _CODES, _NETWORKS, _AGENTS, _RUNTIMES, _BACKENDS = range(11, 18)
# Candidate submissions (decided when the minute closes), networks of every record and of
# the auth failures, the network auth failures, and the submissions' instants (ms) as
# (first, last, sum of squared gaps) or None.
_CANDIDATES, _ALL_NETS, _AUTH_NETS, _NET_AUTH, _IAT = range(18, 23)
_MAXED = (_SHOTS_MAX, _SUBS, _SHARE, _NET_AUTH)  # slots whose window maximum is a feature
_DISTINCT = (_CODES, _NETWORKS, _AGENTS)
_FULL = tuple(WINDOWS.values())  # windows with every aggregate: 1, 5, 60 minutes
_PREVIOUS = tuple(2 * w for w in _FULL)  # windows whose sums give the previous window's
_HOUR = 60
_MINUTE_US = 60_000_000
_MICROSECOND = timedelta(microseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NEVER = -(2**62)  # the watermark before any record: nothing is late
_JOB_MEMORY_US = JOB_MEMORY_MINUTES * _MINUTE_US
_SESSION_GAP_MS = SHARING_MINUTES * 60_000  # longer gaps between submissions are breaks
_COST_WEIGHTS: dict[str | None, int] = {}  # backend -> `backend_cost_weight`, cached
_EXTRA_FIELDS = (
    "num_circuits",
    "depth",
    "backend",
    "runtime_s",
    "error_code",
    "source_ip_hash",
    "client_agent",
    "job_id",
)


class StreamRecord(NamedTuple):
    """The fields of a telemetry record the window features read.

    ``timestamp`` must be timezone-aware. A mapping with these keys (a decoded contract
    record) is accepted as well; absent optional fields read as None.
    """

    api_key_id: str
    timestamp: datetime
    status: str
    shots: int | None = None
    code_hash: str | None = None
    user: str | None = None
    num_circuits: int | None = None
    depth: int | None = None
    backend: str | None = None
    runtime_s: float | None = None
    error_code: str | None = None
    source_ip_hash: str | None = None
    client_agent: str | None = None
    job_id: str | None = None


def _new_bucket() -> list[Any]:
    return [0] * _N_SUMS + [0, 0, set(), set(), set(), [], {}, [], set(), set(), 0, None]


_RowValues = tuple[list[int], list[int], list[int], tuple[int, ...], tuple[float, float]]


class _Window:
    """The buckets of one entity's last ``length`` minutes, with running aggregates."""

    __slots__ = (
        "buckets",
        "counts",
        "full",
        "iat",
        "iat_sq",
        "length",
        "maxima",
        "median",
        "percentile",
        "row_values",
        "runtimes",
    )

    def __init__(self, length: int, full: bool) -> None:
        self.length = length
        self.full = full
        # (minute, bucket, the entity's running sums before it): the window's sums are the
        # entity's running sums less those before its first bucket (`_EntityState.totals`).
        self.buckets: deque[tuple[int, list[Any], list[int]]] = deque()
        self.counts: tuple[dict[Any, int], ...] = ({}, {}, {}) if full else ()
        self.runtimes: SortedList | None = SortedList() if full else None
        # Per maxed slot, (minute, value) with values decreasing: the front is the maximum.
        self.maxima: tuple[deque[tuple[int, int]], ...] = (
            tuple(deque() for _ in _MAXED) if full else ()
        )
        # The hour's submission instants, per bucket with any: (first, last, squared gaps)
        # in ms; ``iat_sq`` sums the squared gaps between consecutive submissions.
        self.iat: deque[tuple[int, int, int]] | None = deque() if length == _HOUR else None
        self.iat_sq = 0
        # `median_runtime` and `rate_percentile` until a bucket changes them; rows outnumber
        # the buckets that enter or leave.
        self.median: float | None = None
        self.percentile: int | None = None
        # (entity's running sums, window's base, double window's base, `_WINDOW_VALUES`,
        # (cost, median runtime)) of the last row: the same three lists (by identity) mean
        # the same buckets, so the same values.
        self.row_values: _RowValues | None = None

    def add(self, minute: int, bucket: list[Any], before: list[int]) -> None:
        self.buckets.append((minute, bucket, before))
        self.percentile = None
        iat = bucket[_IAT]
        if self.iat is not None and iat is not None:
            if self.iat:
                gap = iat[0] - self.iat[-1][1]
                self.iat_sq += gap * gap
            self.iat_sq += iat[2]
            self.iat.append(iat)
        if self.full:
            for counts, slot in zip(self.counts, _DISTINCT, strict=True):
                for value in bucket[slot]:
                    counts[value] = counts.get(value, 0) + 1
            if bucket[_RUNTIMES]:
                self.runtimes.update(bucket[_RUNTIMES])  # type: ignore[union-attr]
                self.median = None
            for maxima, slot in zip(self.maxima, _MAXED, strict=True):
                value = bucket[slot]
                while maxima and maxima[-1][1] <= value:
                    maxima.pop()
                maxima.append((minute, value))

    def expire(self, t: int) -> None:
        """Drop the buckets before minute ``t - length``."""
        buckets = self.buckets
        oldest = t - self.length
        while buckets and buckets[0][0] < oldest:
            _, old, _ = buckets.popleft()
            self.percentile = None
            if self.iat is not None and old[_IAT] is not None:
                _, last, squares = self.iat.popleft()
                self.iat_sq -= squares
                if self.iat:
                    gap = self.iat[0][0] - last
                    self.iat_sq -= gap * gap
            if self.full:
                for maxima in self.maxima:
                    if maxima and maxima[0][0] < oldest:
                        maxima.popleft()
                for counts, slot in zip(self.counts, _DISTINCT, strict=True):
                    for value in old[slot]:
                        left = counts[value] - 1
                        if left:
                            counts[value] = left
                        else:
                            del counts[value]
                if old[_RUNTIMES]:
                    for runtime in old[_RUNTIMES]:
                        self.runtimes.remove(runtime)  # type: ignore[union-attr]
                    self.median = None

    def median_runtime(self) -> float:
        if self.median is None:
            runtimes = self.runtimes
            n = len(runtimes)  # type: ignore[arg-type]
            self.median = (
                (runtimes[(n - 1) // 2] + runtimes[n // 2]) / 2  # type: ignore[index]
                if n
                else 0.0
            )
        return self.median

    def rate_percentile(self) -> int:
        """The hour's `RATE_PERCENTILE_RANK`-th smallest per-minute submission count."""
        if self.percentile is None:
            # Idle minutes are zeros below every busy minute: the percentile is a busy
            # minute's count only when its rank reaches past the idle ones, and then it is
            # the (busy - rank)-th largest.
            busy = len(self.buckets)
            top = busy - (RATE_PERCENTILE_RANK - (_HOUR - busy))
            self.percentile = (
                sorted([bucket[_SUBS] for _, bucket, _ in self.buckets])[busy - top]
                if top <= busy
                else 0
            )
        return self.percentile


class _DayWindow:
    """Submissions, cost, active hours and gaps of one entity's last 1440 minutes."""

    __slots__ = ("active_hours", "cost", "entries", "gaps", "hours", "subs")

    def __init__(self) -> None:
        # (minute, subs, cost, first instant, last instant, squared gaps between them) of
        # each minute with submissions, instants in ms.
        self.entries: deque[tuple[int, int, int, int, int, int]] = deque()
        self.subs = 0
        self.cost = 0
        self.hours = [0] * 24  # per hour of the day, minutes with submissions
        self.active_hours = 0
        # Counted gaps (at most SHARING_MINUTES) between consecutive submissions, the
        # first submission's own left out: their number, sum and squared sum in ms.
        self.gaps = [0, 0, 0]

    def add(self, minute: int, bucket: list[Any]) -> None:
        subs = bucket[_SUBS]
        if not subs:
            return
        cost = bucket[_COST]
        first, last, squares = bucket[_IAT]
        if self.entries:
            self._count(first - self.entries[-1][4], 1)
        self.gaps[0] += subs - 1  # the minute's own gaps, all under a minute
        self.gaps[1] += last - first
        self.gaps[2] += squares
        self.entries.append((minute, subs, cost, first, last, squares))
        self.subs += subs
        self.cost += cost
        hour = minute // 60 % 24
        self.hours[hour] += 1
        if self.hours[hour] == 1:
            self.active_hours += 1

    def _count(self, gap: int, sign: int) -> None:
        if gap <= _SESSION_GAP_MS:
            self.gaps[0] += sign
            self.gaps[1] += sign * gap
            self.gaps[2] += sign * gap * gap

    def expire(self, t: int) -> None:
        """Drop the minutes before ``t - DAY_MINUTES``."""
        entries, oldest = self.entries, t - DAY_MINUTES
        while entries and entries[0][0] < oldest:
            minute, subs, cost, first, last, squares = entries.popleft()
            self.subs -= subs
            self.cost -= cost
            self.gaps[0] -= subs - 1
            self.gaps[1] -= last - first
            self.gaps[2] -= squares
            if entries:
                self._count(entries[0][3] - last, -1)
            hour = minute // 60 % 24
            self.hours[hour] -= 1
            if not self.hours[hour]:
                self.active_hours -= 1


class _EntityState:
    """Everything one entity needs to produce its next rows."""

    __slots__ = (
        "activity",
        "buckets",
        "day",
        "job_log",
        "jobs",
        "last_minute",
        "next_row",
        "pending",
        "totals",
        "windows",
    )

    def __init__(self) -> None:
        # Buckets no row has read yet (they may arrive out of order), by minute; the
        # windows hold the ones read.
        self.buckets: dict[int, list[Any]] = {}
        self.pending: list[int] = []
        self.windows = {w: _Window(w, full=w in _FULL) for w in sorted({*_FULL, *_PREVIOUS})}
        # Sums of the first _N_SUMS slots of every bucket read so far, exact ints: one
        # running sum per bucket instead of one per window it enters and leaves.
        self.totals = [0] * _N_SUMS
        self.activity: deque[int] = deque()  # active minutes of the last day, read so far
        self.day = _DayWindow()
        self.next_row = 0
        self.last_minute = 0
        # Job id -> instant (us) of its latest record in closed minutes, within the job
        # memory; the log, in instant order, expires them.
        self.jobs: dict[str, int] = {}
        self.job_log: deque[tuple[int, str]] = deque()

    def resolve_submissions(self, minute: int, bucket: list[Any]) -> None:
        """Decide which of a closing minute's records are their job's submission, and add
        those to the bucket; minutes close in order, so every earlier record is known."""
        candidates = bucket[_CANDIDATES]
        jobs, log = self.jobs, self.job_log
        horizon = minute * _MINUTE_US - _JOB_MEMORY_US
        while log and log[0][0] < horizon:
            at, job = log.popleft()
            if jobs.get(job) == at:
                del jobs[job]
        if not candidates:
            return
        candidates.sort(key=_instant_then_precedence)
        instants: list[int] = []
        for (
            t,
            _,
            job,
            status,
            shots,
            code_hash,
            network,
            agent,
            backend,
            circuits,
            depth,
        ) in candidates:
            if job is not None:
                last = jobs.get(job)
                jobs[job] = t
                log.append((t, job))
                if last is not None and last >= t - _JOB_MEMORY_US:
                    continue
            bucket[_SUBS] += 1
            instants.append(t // 1000)
            if shots is not None:
                bucket[_SHOTS] += shots
                bucket[_SHOTS_N] += 1
                if shots > bucket[_SHOTS_MAX]:
                    bucket[_SHOTS_MAX] = shots
            if code_hash is not None:
                bucket[_CODES].add(code_hash)
            if network is not None:
                bucket[_NETWORKS].add(network)
            if agent is not None:
                bucket[_AGENTS].add(agent)
            backends = bucket[_BACKENDS]
            backends[backend] = backends.get(backend, 0) + 1
            if status != "rejected":
                weight = _COST_WEIGHTS.get(backend)
                if weight is None:
                    weight = _COST_WEIGHTS[backend] = backend_cost_weight(backend)
                bucket[_COST] += (
                    (shots if shots is not None else 1)
                    * (circuits if circuits is not None else 1)
                    * max(depth if depth is not None else 1, 1)
                    * weight
                )
        bucket[_CANDIDATES] = None
        if instants:
            squares = sum((b - a) * (b - a) for a, b in itertools.pairwise(instants))
            bucket[_IAT] = (instants[0], instants[-1], squares)


def _instant_then_precedence(candidate: tuple[Any, ...]) -> tuple[int, int]:
    return candidate[0], candidate[1]


class _SharingIndex:
    """Per value (a code hash, a network), the entities that recorded it in the last hour.

    Buckets register the values of slot ``register``; each bucket's ``out`` slot gets the
    largest number of *other* entities that registered one of its ``query`` values in the
    hour ending with its minute (closed minutes).
    """

    def __init__(self, register: int, query: int, out: int) -> None:
        self.register, self.query, self.out = register, query, out
        self.last_seen: dict[str, dict[str, int]] = {}  # hash -> entity -> latest minute
        self.log: dict[str, deque[tuple[int, str]]] = {}  # hash -> (minute, entity) in order
        self.touched: deque[tuple[int, str]] = deque()  # (minute, hash), to forget old hashes

    def close_minute(self, minute: int, buckets: list[tuple[str, list[Any]]]) -> None:
        """Record the minute's values, then set each bucket's ``out`` slot."""
        register, query, out = self.register, self.query, self.out
        for entity, bucket in buckets:
            for code in bucket[register]:
                seen = self.last_seen.get(code)
                if seen is None:
                    seen = self.last_seen[code] = {}
                    self.log[code] = deque()
                if seen.get(entity) != minute:
                    seen[entity] = minute
                    self.log[code].append((minute, entity))
                    self.touched.append((minute, code))
        horizon = minute - SHARING_MINUTES + 1  # the hour ending with this minute
        for entity, bucket in buckets:
            share = 0
            for code in bucket[query]:
                if code in self.last_seen:
                    others = self._entities(code, horizon) - (entity in self.last_seen[code])
                    share = max(share, others)
            bucket[out] = share
        while self.touched and self.touched[0][0] < horizon:
            _, code = self.touched.popleft()
            if code in self.last_seen and not self._entities(code, horizon):
                del self.last_seen[code], self.log[code]

    def _entities(self, code: str, horizon: int) -> int:
        seen, log = self.last_seen[code], self.log[code]
        while log and log[0][0] < horizon:
            old_minute, entity = log.popleft()
            if seen.get(entity) == old_minute:
                del seen[entity]
        return len(seen)


class StreamingWindows:
    """Incremental `window_features`: feed records with `update`, collect rows from `advance`.

    Args:
        allowed_lateness: How far behind the latest record another record may arrive and
            still count. Rows wait this long (in event time) before they are emitted.
        on_late: Called with each record that arrived too late to count; without it,
            late records are logged. Either way `late_records` counts them.
        entity_column: ``api_key_id`` or ``user``: whose rows to compute.
        sequences: Also give each row its per-minute sequences: the rows then carry the
            `definitions.SEQUENCE_COLUMNS` (lists of 60 ints) after the features, as
            `windows.minute_sequences` computes them for the same instants.

    One consumer feeds an instance (it is not thread-safe). To shard by entity, each shard's
    instance gets its own entities' records through `update` and every other record through
    `update_cross_entity`, so that the cross-entity aggregates (backend load, code-hash and
    network sharing) count every entity (`qabuse_dagster.ingest.bus`).

    Example:
        >>> from datetime import UTC, datetime, timedelta
        >>> t0 = datetime(2026, 1, 1, tzinfo=UTC)
        >>> stream = StreamingWindows(allowed_lateness=timedelta(seconds=30))
        >>> stream.update(StreamRecord("k", t0, "submitted", 100, "c"))
        True
        >>> rows = stream.flush()
        >>> rows.num_rows, rows["submissions_1m"][0].as_py(), rows["max_shots_1h"][0].as_py()
        (5, 1, 100)
    """

    def __init__(
        self,
        allowed_lateness: timedelta = timedelta(seconds=30),
        on_late: Callable[[Any], None] | None = None,
        entity_column: str = ENTITY_COLUMNS["api_key"],
        sequences: bool = False,
    ) -> None:
        if allowed_lateness < timedelta(0):
            raise ValueError("allowed_lateness must not be negative")
        if entity_column not in ENTITY_COLUMNS.values():
            raise ValueError(
                f"entity_column {entity_column!r}: expected one of "
                f"{sorted(ENTITY_COLUMNS.values())}"
            )
        self.allowed_lateness = allowed_lateness
        self.on_late = on_late
        self.entity_column = entity_column
        self.sequences = sequences
        self.schema = feature_schema(entity_column)
        if sequences:
            extra = list(sequence_schema(entity_column))[2:]
            self.schema = pa.schema([*self.schema, *extra])
        self.late_records = 0
        # Event time in integer microseconds: float seconds would round a watermark
        # across a record a microsecond away from it.
        self._lateness_us = allowed_lateness // _MICROSECOND
        self._max_us = _NEVER
        self._watermark = _NEVER
        self._emitted_until: int | None = None  # minute index of the last final instant
        self._entities: dict[str, _EntityState] = {}
        self._active: set[str] = set()  # entities with rows still to emit
        self._idle: list[tuple[int, str]] = []  # (minute its state expires, entity)
        self._open: dict[int, list[tuple[str, list[Any]]]] = {}  # minute -> its buckets
        self._open_minutes: list[int] = []  # heap of the keys of _open
        self._sharing = _SharingIndex(_CODES, _CODES, _SHARE)
        self._network_auth = _SharingIndex(_AUTH_NETS, _ALL_NETS, _NET_AUTH)
        self._late_reported = 0
        # Entities fed through `update_cross_entity`: another instance emits their rows.
        self._cross_only: set[str] = set()

    @property
    def watermark(self) -> datetime | None:
        """Rows at instants up to here are final; records before it count as late."""
        if self._watermark == _NEVER:
            return None
        return _EPOCH + self._watermark * _MICROSECOND

    @property
    def keys(self) -> int:
        """Entities with state held (active within the last day)."""
        return len(self._entities)

    def update(self, record: StreamRecord | Mapping[str, Any]) -> bool:
        """Add one record; return False (and report it) when it is too late to count."""
        if isinstance(record, tuple):
            if not isinstance(record, StreamRecord):
                record = StreamRecord(*record)
            entity = getattr(record, self.entity_column)
            ts, status, shots, code_hash = (
                record.timestamp,
                record.status,
                record.shots,
                record.code_hash,
            )
            extra: tuple[Any, ...] = record[6:]
        else:
            entity = record.get(self.entity_column)
            ts = record["timestamp"]
            status = record["status"]
            shots = record.get("shots")
            code_hash = record.get("code_hash")
            extra = tuple(record.get(name) for name in _EXTRA_FIELDS)
        if entity is None:
            raise ValueError(f"record has no {self.entity_column}: {record!r}")
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
        state = self._entities.get(entity)
        if state is None:
            state = self._entities[entity] = _EntityState()
        bucket = state.buckets.get(minute)
        if bucket is None:
            bucket = state.buckets[minute] = _new_bucket()
            heapq.heappush(state.pending, minute)
            if minute > state.last_minute:
                state.last_minute = minute
            self._active.add(entity)
            at_minute = self._open.get(minute)
            if at_minute is None:
                at_minute = self._open[minute] = []
                heapq.heappush(self._open_minutes, minute)
            at_minute.append((entity, bucket))
        circuits, depth, backend, runtime, error_code, network, agent, job = extra
        if network is not None:
            bucket[_ALL_NETS].add(network)
        if error_code == "auth_failed":
            bucket[_AUTH] += 1
            if network is not None:
                bucket[_AUTH_NETS].add(network)
        if job is not None or status in _SUBMISSION_STATUSES:
            # Whether it is its job's submission is known once its minute closes.
            bucket[_CANDIDATES].append(
                (
                    t,
                    SUBMISSION_PRECEDENCE.get(status, _LAST_PRECEDENCE),
                    job,
                    status,
                    shots,
                    code_hash,
                    network,
                    agent,
                    backend,
                    circuits,
                    depth,
                )
            )
        bits = _STATUS_BITS.get(status, 0)
        if bits & _OUTCOME:
            bucket[_OUTCOMES] += 1
            if bits & _FAILURE:
                bucket[_FAILURES] += 1
                if bits & _REJECTED:
                    bucket[_REJ] += 1
            elif bits & _COMPLETED and runtime is not None:
                bucket[_RUNTIMES].append(float(runtime))
        return True

    def update_cross_entity(self, record: StreamRecord | Mapping[str, Any]) -> bool:
        """Add a record of an entity whose rows another instance computes (another shard).

        It counts where entities meet when its minute closes (backend load, code-hash and
        network sharing) and moves the watermark, as `update` does; its entity gets no rows
        here. An entity is fed through one of the two methods only, always the same.
        """
        entity = (
            getattr(record, self.entity_column)
            if isinstance(record, tuple)
            else record.get(self.entity_column)
        )
        if entity is not None:
            self._cross_only.add(entity)
        return self.update(record)

    def advance(self, now: datetime | None = None) -> pa.Table:
        """Emit every row the watermark has made final since the last call.

        Args:
            now: The current time, when the stream may have fallen silent: the
                watermark moves to at least ``now - allowed_lateness``.

        Returns:
            Rows with `feature_schema` (the columns of `window_features`), ordered by
            time then entity.
        """
        if now is not None:
            if now.tzinfo is None:
                raise ValueError("advance needs a timezone-aware instant")
            now_us = (now - _EPOCH) // _MICROSECOND
            self._watermark = max(self._watermark, now_us - self._lateness_us)
        if self._watermark == _NEVER:
            return self.schema.empty_table()
        return self._emit(self._watermark // _MINUTE_US)

    def flush(self) -> pa.Table:
        """End of stream: emit every remaining row; later records before them are late."""
        if not self._active:
            return self.schema.empty_table()
        until = max(self._entities[k].last_minute for k in self._active) + WINDOWS["5m"]
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

    def _close_minutes(self, until: int) -> None:
        """Give the buckets of every minute before ``until`` their cross-entity aggregates."""
        while self._open_minutes and self._open_minutes[0] < until:
            minute = heapq.heappop(self._open_minutes)
            buckets = self._open.pop(minute)
            for entity, bucket in buckets:
                self._entities[entity].resolve_submissions(minute, bucket)
            load: dict[str | None, int] = {}
            for _, bucket in buckets:
                for backend, n in bucket[_BACKENDS].items():
                    load[backend] = load.get(backend, 0) + n
            for _, bucket in buckets:
                bucket[_LOAD] = sum(n * load[b] for b, n in bucket[_BACKENDS].items())
                bucket[_SUBS_SQ] = bucket[_SUBS] * bucket[_SUBS]
                bucket[_FAIL_SQ] = bucket[_FAILURES] * bucket[_FAILURES]
            self._sharing.close_minute(minute, buckets)
            self._network_auth.close_minute(minute, buckets)

    def _emit(self, until: int) -> pa.Table:
        """Rows of every active entity at instants up to minute ``until``, then cleanup."""
        if self._emitted_until is not None and until <= self._emitted_until:
            return self.schema.empty_table()
        self._emitted_until = until
        self._close_minutes(until)
        rows: list[tuple[Any, ...]] = []
        for entity in list(self._active):
            state = self._entities[entity]
            if entity in self._cross_only:
                # Its closed minutes have counted for the others: drop them.
                while state.pending and state.pending[0] < until:
                    del state.buckets[heapq.heappop(state.pending)]
            else:
                _emit_entity(entity, state, until, rows, self.sequences)
            if not state.windows[5].buckets and not state.pending:
                self._active.discard(entity)
                expiry = state.last_minute + ACTIVITY_LOOKBACK_MINUTES + 2
                heapq.heappush(self._idle, (expiry, entity))
        while self._idle and self._idle[0][0] <= until:
            _, entity = heapq.heappop(self._idle)
            idle = self._entities.get(entity)
            # The entity may have come back since it went idle; it may have gone idle again.
            if (
                entity not in self._active
                and idle is not None
                and idle.last_minute + ACTIVITY_LOOKBACK_MINUTES + 2 <= until
            ):
                del self._entities[entity]
                self._cross_only.discard(entity)
        if self.late_records > self._late_reported:
            logger.warning(
                "%d late records not counted since the last advance (%d in all)",
                self.late_records - self._late_reported,
                self.late_records,
            )
            self._late_reported = self.late_records
        return self._to_table(rows)

    def _to_table(self, rows: list[tuple[Any, ...]]) -> pa.Table:
        """Rows of (entity, minute, *AGGREGATES) as feature rows, by time then entity."""
        if not rows:
            return self.schema.empty_table()
        sequence_columns: list[pa.Array] = []
        if self.sequences:
            per_row = [row[4] for row in rows]
            for c in range(len(SEQUENCE_CHANNELS)):
                flat = np.fromiter(
                    (v for row in per_row for v in row[c]),
                    dtype=np.int64,
                    count=len(per_row) * SEQUENCE_MINUTES,
                )
                offsets = np.arange(len(per_row) + 1, dtype=np.int32) * SEQUENCE_MINUTES
                sequence_columns.append(pa.ListArray.from_arrays(offsets, flat))
        aggregates = {
            **_columns(_INT_AGGREGATES, [row[2] for row in rows], np.int64),
            **_columns(_FLOAT_AGGREGATES, [row[3] for row in rows], np.float64),
        }
        features = derive(aggregates)
        minutes = pa.array([row[1] for row in rows], pa.int64())
        table = pa.Table.from_arrays(
            [
                pa.array([row[0] for row in rows], pa.string()),
                pc.multiply(minutes, _MINUTE_US).cast(self.schema.field(TIMESTAMP_COLUMN).type),
                *(pa.array(features[name]) for name in FEATURE_NAMES),
                *sequence_columns,
            ],
            schema=self.schema,
        )
        return table.sort_by([(TIMESTAMP_COLUMN, "ascending"), (self.entity_column, "ascending")])


def _columns(
    names: tuple[str, ...], rows: list[list[Any]], dtype: type[np.generic]
) -> dict[str, np.ndarray]:
    """Columns ``names`` of ``rows``, as `np.asarray` would make each column on its own."""
    matrix = np.array(rows)
    if matrix.dtype != dtype:
        # A value of another type (a float shot count, an int past int64): numpy picks
        # each column's type from its own values, as for a single column.
        return {
            name: np.asarray(column)
            for name, column in zip(names, zip(*rows, strict=True), strict=True)
        }
    return dict(zip(names, matrix.T, strict=True))


# The per-window integer aggregates in the order `_row` produces them.
_WINDOW_VALUES = (
    "subs",
    "shots_sum",
    "shots_n",
    "outcomes",
    "failures",
    "rejected",
    "auth",
    "load",
    "prev_subs",
    "prev_outcomes",
    "prev_failures",
    "shots_max",
    "peak_subs",
    "share_max",
    "codes",
    "networks",
    "agents",
)
assert _WINDOW_VALUES == WINDOW_INT_AGGREGATES, "keep _row in AGGREGATES order"
# `_row` gives the integer and the float aggregates apart, each in `AGGREGATES` order, so
# that each becomes one 2-d array at once.
_INT_AGGREGATES = (
    *(f"{name}_{w}" for w in _FULL for name in WINDOW_INT_AGGREGATES),
    *ROW_INT_AGGREGATES,
)
_FLOAT_AGGREGATES = (
    *(f"{name}_{w}" for w in _FULL for name in WINDOW_FLOAT_AGGREGATES),
    *ROW_FLOAT_AGGREGATES,
)
assert sorted((*_INT_AGGREGATES, *_FLOAT_AGGREGATES)) == sorted(AGGREGATES)


def _emit_entity(
    entity: str,
    state: _EntityState,
    until: int,
    rows: list[tuple[Any, ...]],
    sequences: bool = False,
) -> None:
    """Append the rows of one entity at instants ``state.next_row ..= until``."""
    windows, day = state.windows, state.day
    full = tuple(windows[w] for w in _FULL)
    # The double windows only give the previous windows' sums, from their first bucket's
    # running sums: a queue of buckets is all they need.
    doubles = tuple((windows[w].buckets, w) for w in _PREVIOUS)
    five = windows[5]
    pending, buckets, activity = state.pending, state.buckets, state.activity
    t = state.next_row
    while True:
        if not five.buckets:
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
            b1 = buckets.pop(minute)  # later records of its minute are late: forget it
            before = state.totals
            # zip stops at the shorter: the first _N_SUMS slots.
            state.totals = [a + b for a, b in zip(before, b1, strict=False)]
            for window in full:
                window.add(minute, b1, before)
            for queue, _ in doubles:
                queue.append((minute, b1, before))
            day.add(minute, b1)
            activity.append(minute)
        for window in full:
            if window.buckets and window.buckets[0][0] < t - window.length:
                window.expire(t)
        for queue, length in doubles:
            while queue and queue[0][0] < t - length:
                queue.popleft()
        if day.entries and day.entries[0][0] < t - DAY_MINUTES:
            day.expire(t)
        while activity and activity[0] < t - ACTIVITY_LOOKBACK_MINUTES:
            activity.popleft()
        if five.buckets:
            row = _row(entity, t, b1, windows, state.totals, activity, day)
            rows.append((*row, _sequence(t, windows[_HOUR])) if sequences else row)
        t += 1
    state.next_row = t


def _row(
    entity: str,
    t: int,
    b1: list[Any] | None,
    windows: dict[int, _Window],
    totals: list[int],
    activity: deque[int],
    day: _DayWindow,
) -> tuple[Any, ...]:
    """(entity, minute, `_INT_AGGREGATES` values, `_FLOAT_AGGREGATES` values) at minute ``t``."""
    ints: list[int] = []
    floats: list[float] = []
    for w in _FULL:
        window, double = windows[w], windows[2 * w]
        # Running sums before the window's first bucket, and before the double window's.
        b = window.buckets[0][2] if window.buckets else totals
        p = double.buckets[0][2] if double.buckets else totals
        cached = window.row_values
        if cached is not None and cached[0] is totals and cached[1] is b and cached[2] is p:
            values, window_floats = cached[3], cached[4]
        else:
            counts, maxima = window.counts, window.maxima
            values = (  # `_WINDOW_VALUES`
                totals[_SUBS] - b[_SUBS],
                totals[_SHOTS] - b[_SHOTS],
                totals[_SHOTS_N] - b[_SHOTS_N],
                totals[_OUTCOMES] - b[_OUTCOMES],
                totals[_FAILURES] - b[_FAILURES],
                totals[_REJ] - b[_REJ],
                totals[_AUTH] - b[_AUTH],
                totals[_LOAD] - b[_LOAD],
                b[_SUBS] - p[_SUBS],  # the previous window: the double one without this one
                b[_OUTCOMES] - p[_OUTCOMES],
                b[_FAILURES] - p[_FAILURES],
                maxima[0][0][1] if maxima[0] else 0,
                maxima[1][0][1] if maxima[1] else 0,
                maxima[2][0][1] if maxima[2] else 0,
                len(counts[0]),
                len(counts[1]),
                len(counts[2]),
            )
            # The cost: an exact int, rounded once.
            window_floats = (float(totals[_COST] - b[_COST]), window.median_runtime())
            window.row_values = (totals, b, p, values, window_floats)
        ints += values
        floats += window_floats
    hour = windows[_HOUR]
    last_subs = b1[_SUBS] if b1 is not None else 0
    last_failures = b1[_FAILURES] if b1 is not None else 0
    h = hour.buckets[0][2] if hour.buckets else totals
    iat = hour.iat
    ints += (
        # The previous 59 minutes: the hour without t - 1.
        totals[_SUBS] - h[_SUBS] - last_subs,
        totals[_SUBS_SQ] - h[_SUBS_SQ] - last_subs * last_subs,
        totals[_FAILURES] - h[_FAILURES] - last_failures,
        totals[_FAIL_SQ] - h[_FAIL_SQ] - last_failures * last_failures,
        hour.rate_percentile(),
        t - activity[0],
        activity[-1] - activity[-2] if len(activity) > 1 else ACTIVITY_LOOKBACK_MINUTES,
        iat[-1][1] - iat[0][0] if iat else 0,  # the span (ms) of the hour's submissions
        hour.iat_sq if iat else 0,
        day.subs,
        day.active_hours,
        hour.maxima[3][0][1] if hour.maxima[3] else 0,  # network auth failures
        *day.gaps,
    )
    floats.append(float(day.cost))  # exact int, rounded once
    return entity, t, ints, floats


# Bucket slot of each `SEQUENCE_CHANNELS` channel (distinct code hashes: the set's size).
_SEQUENCE_SLOTS = {
    "submissions": _SUBS,
    "failures": _FAILURES,
    "auth_failures": _AUTH,
    "shots_sum": _SHOTS,
    "distinct_code_hashes": _CODES,
}


def _sequence(t: int, hour: _Window) -> tuple[list[int], ...]:
    """Per `SEQUENCE_CHANNELS` channel, the values of minutes ``t - 60 .. t - 1``."""
    out = tuple([0] * SEQUENCE_MINUTES for _ in SEQUENCE_CHANNELS)
    start = t - SEQUENCE_MINUTES
    for minute, bucket, _ in hour.buckets:
        at = minute - start
        for values, channel in zip(out, SEQUENCE_CHANNELS, strict=True):
            value = bucket[_SEQUENCE_SLOTS[channel]]
            values[at] = len(value) if isinstance(value, set) else value
    return out

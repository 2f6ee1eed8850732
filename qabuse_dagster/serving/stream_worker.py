"""The stream worker: telemetry from the collector's spool to online features and decisions.

``qabuse stream`` runs one `StreamWorker` beside the collector. Every `StreamOptions.poll_s`
it reads the batches committed to the spool after its cursor (`read_batches`), and for each
batch, in commit order:

1. parses the records as compaction does (`batch_table`); a record that does not parse
   is logged with its batch's ``seq`` and skipped;
2. feeds them to two `StreamingWindows`, one per api key (with the per-minute sequences
   the sequence family reads) and one per user;
3. advances both: with the wall clock when the records are live, by event time alone
   when they are a replay (records far behind their acceptance), so that a replay gives
   the rows a batch run would;
4. pushes every emitted row to the Feast online store (`push_online`, users first);
5. scores each api key that got a row with the ``@champion``, exactly as ``POST /score``
   does (`score_key`), and asks the policy engine (`MitigationPolicy.next_decision`)
   for the key's next decision; each new decision is appended to the decision ledger,
   with the score, the model version and the features, in ``shadow`` or ``enforce``
   mode as ``QABUSE_ENFORCE`` sets for its rung;
6. commits the cursor (`commit_consumer`).

Delivery is at least once: the cursor moves only after the batch's rows are pushed and
its decisions written, and a decision already in the ledger, the same (key, action,
instant), is never appended twice. The windows live in memory: at start they are rebuilt
from the last day of raw and landing telemetry and the spool's processed batches, so the
first rows after a restart read the same history as the batch features. Keys under a
mitigation are re-examined every `StreamOptions.tick_s`, so that time-based decisions
(release when quiet, expiry) are taken without new records.

On the ingest bus (`StreamOptions.bus_url`, ``qabuse stream --bus --shard i/n``) the worker
reads the messages of its durable consumer instead of the spool, and acknowledges them
where it would commit its cursor (`qabuse_dagster.ingest.bus`): the rows, scores and
decisions of the api keys (and users) of its shard are its own, while the records of the
other shards count only in the cross-entity aggregates of its windows
(`StreamingWindows.update_cross_entity`). The windows are then rebuilt at start from the
bus's messages up to the consumer's acknowledgement floor. On either source a record whose
(api_key_id, job_id, status) was counted already (a batch published twice, the same record
accepted by two collectors) is dropped and counted in ``duplicate_records``.

Latency: rows are per minute, and the row at minute ``T`` reads the records before
``T``; it is final, and pushed, once the watermark passes ``T``: with live records,
``allowed_lateness`` after ``T`` on the wall clock. So that a decision need not wait for
that, every `StreamOptions.provisional_s` the keys with live records still waiting are
scored on a *provisional* row: the row a batch run would give at ``T`` if no more
records came, computed on a copy of the windows and never pushed. An alert there is an
alert now; the final row is scored again when the minute closes. The worker measures
the latency from the batch's commit in the spool to its key's decision
(`LatencyHistogram`), writes it to ``$QABUSE_HOME/run/stream-stats.json`` every
`StreamOptions.stats_every_s` and logs it once a minute.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, cast

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qabuse_dagster import settings
from qabuse_dagster.features.definitions import ENTITY_COLUMNS, TIMESTAMP_COLUMN
from qabuse_dagster.features.push import PUSH_SOURCES, latest_per_key, push_online
from qabuse_dagster.features.streaming import StreamingWindows, StreamRecord
from qabuse_dagster.features.windows import LOOKBACK
from qabuse_dagster.ingest.bus import (
    IDENTITY_MEMORY,
    BusBatch,
    BusConsumer,
    RecordIdentities,
    WorkerShard,
)
from qabuse_dagster.ingest.partitions import (
    hours_between,
    landing_hours,
    partition_dir,
    read_raw,
)
from qabuse_dagster.ingest.spool import (
    SpoolBatch,
    batch_table,
    commit_consumer,
    connect,
    read_batches,
    register_consumer,
    spool_path,
)
from qabuse_dagster.response.alert_store import AlertStore, alerts_path
from qabuse_dagster.response.decisions import HIGH_IMPACT_ACTIONS, Action, Decision
from qabuse_dagster.response.ladder import Ladder
from qabuse_dagster.response.ledger import Ledger, open_ledger
from qabuse_dagster.response.policy import FeatureUsage, MitigationPolicy
from qabuse_dagster.response.records import LedgerEntry, LedgerRecord, Mode
from qabuse_dagster.serving.alerting import AlertSnapshot, AlertWriter, KeyActivity
from qabuse_dagster.serving.schemas import ScoreResponse
from qabuse_dagster.serving.scoring import Champion, ChampionUnavailable, KeyNotOnline, score_key

__all__ = [
    "CONSUMER",
    "LatencyHistogram",
    "StreamOptions",
    "StreamWorker",
    "run_stream",
    "stats_path",
]

logger = logging.getLogger(__name__)

#: The spool consumer the worker registers as (compaction waits for it).
CONSUMER = "stream-worker"
#: Records whose submission a challenge refused: the engine's refusals.
CHALLENGE_REQUIRED = "challenge_required"
#: Rungs the engine's own alerts put a key on: their instants are alert instants.
_ALERT_RUNGS = frozenset({"throttle", "cap", "challenge"})
#: Decisions an alert is written for: every restriction, proposal and review.
_ALERTED_ACTIONS = frozenset({"throttle", "cap", "challenge", "rotate", "revoke", "review"})
#: Workflow steps that, for the engine, lift what is on the key.
_LIFTING_EVENTS = frozenset({"uphold_appeal", "challenge_solved"})
_API_KEY = ENTITY_COLUMNS["api_key"]
_USER = ENTITY_COLUMNS["user"]
_FIELDS = list(StreamRecord._fields)
_MINUTE_MS = 60_000
_DAY_MS = 24 * 3_600_000
# Decisions one key may take in one examination: a replay can owe a key a few (a throttle
# and its release); more means a bug, not a busy key.
_MAX_DECISIONS_PER_LOOK = 32
#: Seconds between asks for a model while there is none.
_CHAMPION_RETRY_S = 30.0


def stats_path(paths: settings.Paths | None = None) -> Path:
    """Where the worker writes its figures: ``$QABUSE_HOME/run/stream-stats.json``."""
    return (paths or settings.paths()).run / "stream-stats.json"


class LatencyHistogram:
    """Latencies in buckets 2 % wide on a log scale from 1 ms up (HdrHistogram's idea).

    Percentiles are read as the upper edge of their bucket (at most 2 % high, never above
    the largest value seen). Memory is one counter per bucket in use.

    Example:
        >>> h = LatencyHistogram()
        >>> for ms in (10.0, 20.0, 30.0, 40.0):
        ...     h.add(ms)
        >>> h.count, round(h.percentile(50)), h.max_ms
        (4, 20, 40.0)
    """

    _GROWTH = 1.02

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total_ms = 0.0
        self.max_ms = 0.0

    def add(self, ms: float, n: int = 1) -> None:
        """Count ``n`` latencies of ``ms`` milliseconds (below 1 ms counts as 1 ms)."""
        ms = max(ms, 1.0)
        bucket = math.ceil(math.log(ms, self._GROWTH) - 1e-9)
        self.counts[bucket] = self.counts.get(bucket, 0) + n
        self.count += n
        self.total_ms += ms * n
        self.max_ms = max(self.max_ms, ms)

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile (nearest rank) in ms; None when empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return min(self._GROWTH**bucket, self.max_ms)
        return self.max_ms

    def summary(self) -> dict[str, float | int | None]:
        """Count, mean, p50, p95, p99 and max, in ms."""
        return {
            "count": self.count,
            "mean_ms": self.total_ms / self.count if self.count else None,
            "p50_ms": self.percentile(50),
            "p95_ms": self.percentile(95),
            "p99_ms": self.percentile(99),
            "max_ms": self.max_ms if self.count else None,
        }


@dataclass(frozen=True)
class StreamOptions:
    """How the worker polls, waits for late records and reports."""

    #: How far behind the latest record another may arrive and still count; rows wait
    #: this long after their minute before they are final.
    allowed_lateness: timedelta = timedelta(seconds=5)
    #: Seconds between polls of the spool when it has nothing new.
    poll_s: float = 0.15
    #: Batches read per poll.
    batches_per_poll: int = 64
    #: Records at most this far behind their acceptance are live (the wall clock moves the
    #: watermark); further behind, a replay (event time alone does).
    live_lag: timedelta = timedelta(minutes=5)
    #: Seconds between examinations of the keys under a mitigation.
    tick_s: float = 1.0
    #: Seconds between writes of `stats_path`.
    stats_every_s: float = 5.0
    #: Seconds between log lines of figures.
    log_every_s: float = 60.0
    #: The spool consumer's name; on the bus, the prefix of the durable consumer's.
    consumer: str = CONSUMER
    #: Rebuild the windows from the last day of stored telemetry at start.
    warm_up: bool = True
    #: With live records, seconds between provisional scores of the keys whose records
    #: wait in the still-open minute; 0 waits for the minute's final row.
    provisional_s: float = 0.5
    #: Read the ingest bus at this NATS URL instead of the spool (`settings.bus_url`).
    bus_url: str | None = None
    #: On the bus, which of the workers this one is: the entities whose rows it computes.
    shard: WorkerShard = field(default_factory=WorkerShard)
    #: The bus's shard count (`settings.bus_shards`): entities map to shards by it.
    bus_shards: int = 1

    def __post_init__(self) -> None:
        if self.allowed_lateness < timedelta(0):
            raise ValueError("allowed_lateness must not be negative")
        if self.poll_s <= 0 or self.tick_s <= 0 or self.batches_per_poll < 1:
            raise ValueError("poll_s and tick_s must be positive, batches_per_poll at least 1")
        if self.bus_shards < 1 or (self.shard.count > 1 and not self.bus_url):
            raise ValueError("a sharded worker reads the bus (bus_url), of one shard or more")


@dataclass
class _KeyState:
    """What the engine knows of one api key, and what the worker waits to decide for it."""

    alerts_ms: list[int] = field(default_factory=list)
    #: Of those, the alerts whose score was only just over the threshold.
    weak_alerts_ms: set[int] = field(default_factory=set)
    refusals_ms: list[int] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    #: The key's last score, its features the usage the engine reads.
    last: ScoreResponse | None = None
    user: str | None = None
    last_seen_ms: int = 0
    #: (row instant that first reads them, batch commit time) -> records waiting for a
    #: decision, both in epoch ms.
    waiting: dict[tuple[int, int], int] = field(default_factory=dict)

    @property
    def under_mitigation(self) -> bool:
        return bool(self.decisions) and self.decisions[-1].action not in (
            "release",
            "revoke",
            "rotate",
        )


@dataclass
class _Counters:
    batches: int = 0
    records: int = 0
    malformed_records: int = 0
    #: Records dropped as copies of records counted before (see the module docstring).
    duplicate_records: int = 0
    rows_pushed: dict[str, int] = field(default_factory=lambda: {_API_KEY: 0, _USER: 0})
    keys_scored: int = 0
    #: Scores of a provisional row, the open minute's as if it closed now.
    keys_scored_provisionally: int = 0
    keys_not_scored: int = 0
    decisions: dict[str, int] = field(default_factory=dict)
    #: Records whose key got its row while no champion could score it.
    undecided_records: int = 0


class StreamWorker:
    """Tails the spool into the online store and the decision ledger (module docstring).

    Args:
        paths: The home whose spool and telemetry it reads; default ``QABUSE_HOME``'s.
        options: Polling, lateness and reporting.
        ladder: The mitigation ladder; default `Ladder()`.
        ledger: The decision ledger; default `open_ledger()` (closed by `close`).
        store: An applied Feast store; default `open_store()` (applied if it is not yet).
        champion: The model loader; default one on ``store`` that follows ``@champion``
            every ``QABUSE_MODEL_REFRESH_S``.
        clock: The wall clock, in epoch seconds.
        alerts: Where each decision's alert goes; default the home's `AlertStore`, whose
            outbox a `Deliverer` on this worker ships to the configured sinks.
    """

    def __init__(
        self,
        paths: settings.Paths | None = None,
        *,
        options: StreamOptions | None = None,
        ladder: Ladder | None = None,
        ledger: Ledger | None = None,
        store: Any = None,
        champion: Champion | None = None,
        clock: Callable[[], float] = time.time,
        alerts: AlertStore | None = None,
    ) -> None:
        from qabuse_dagster.features.store import apply_repo, open_store
        from qabuse_dagster.response.alert_sinks import Deliverer, sinks_from_settings

        self.paths = paths or settings.paths()
        self.options = options or StreamOptions()
        self.policy = MitigationPolicy(ladder or Ladder())
        self.modes = settings.enforce_modes()
        self.max_age = timedelta(seconds=settings.online_max_age_seconds())
        self.stop = threading.Event()
        self._clock = clock
        self._lateness_ms = self.options.allowed_lateness // timedelta(milliseconds=1)
        self.source: _SpoolSource | _BusSource = (
            _BusSource(
                self.options.bus_url, self.options.shard.consumer_name(self.options.consumer)
            )
            if self.options.bus_url
            else _SpoolSource(self.paths, self.options.consumer)
        )
        self.cursor = self.source.position
        #: The records counted, to drop a second copy (at-least-once delivery).
        self.identities = RecordIdentities(self.options.allowed_lateness + IDENTITY_MEMORY)
        self.store = store if store is not None else open_store()
        if not {PUSH_SOURCES[_API_KEY], PUSH_SOURCES[_USER]} <= {
            source.name for source in self.store.list_data_sources()
        }:
            # A fresh home: nothing could be pushed, and the cursor (so compaction, so
            # the batch pipeline that would apply the repository) would wait forever.
            logger.warning("the Feast repository is not applied yet: applying it")
            apply_repo(self.store)
        self.champion = champion or Champion(settings.model_refresh_seconds(), store=self.store)
        self._owns_ledger = ledger is None
        self.ledger = ledger if ledger is not None else open_ledger()
        lateness = self.options.allowed_lateness
        self.key_windows = StreamingWindows(lateness, sequences=True)
        self.user_windows = StreamingWindows(lateness, entity_column=_USER)
        self.keys: dict[str, _KeyState] = {}
        #: Each key's last jobs and hour, and who ran which code: its alerts' context.
        self.activity = KeyActivity()
        sinks = sinks_from_settings(self.paths)
        self._sinks = sinks
        self._owns_alerts = alerts is None
        self.alerts = alerts if alerts is not None else AlertStore(alerts_path(self.paths))
        self.alert_writer = AlertWriter(
            self.alerts,
            list(sinks),
            self.champion.get,
            self.paths.api_key_windows,
        )
        self.deliverer = Deliverer(self.alerts, sinks)
        self.deliverer.start()
        self.counters = _Counters()
        self.latency = LatencyHistogram()
        self._minute_latency = LatencyHistogram()
        #: Rows emitted and not yet published (a failed push or append is retried).
        self._outbox: list[tuple[pa.Table, pa.Table]] = []
        #: The last batch applied to the windows whose seq is not committed yet.
        self._applied: int | None = None
        #: (key, action, at_ms) of every ledger entry seen: a decision is recorded once.
        self._recorded: set[tuple[str, str, int]] = set()
        #: Ledger seq -> (key, decision) of the proposals a ``deny`` can cancel.
        self._proposals: dict[int, tuple[str, Decision]] = {}
        self._ledger_seq = 0
        self._next_prune_ms = 0
        self._live: bool | None = None
        self._champion_retry_at = 0.0
        now = self._clock()
        self._next_tick = now
        self._next_provisional = now
        self._next_stats = now
        self._next_log = now + self.options.log_every_s
        self.started_at = now
        self._follow_ledger()
        if self.options.warm_up:
            self._warm_up()
        self._loaded_champion()  # loaded before the first batch, or the reason logged
        logger.info(
            "stream worker: consumer %s at seq %d; %d keys under a mitigation in the ledger",
            self.options.consumer,
            self.cursor,
            sum(state.under_mitigation for state in self.keys.values()),
        )

    # The loop.

    def run(self) -> None:
        """Poll until `stop` is set; a batch in progress is finished and committed first."""
        backoff = 0.0
        while not self.stop.is_set():
            try:
                read = self.step()
            except Exception:  # a failed push or append: the cursor has not moved; retry
                backoff = min(max(1.0, 2 * backoff), 30.0)
                logger.exception("stream worker: step failed; retrying in %.0f s", backoff)
                self.stop.wait(backoff)
                continue
            backoff = 0.0
            if read < self.options.batches_per_poll:
                self.stop.wait(self.options.poll_s)
        self.write_stats()
        logger.info("stream worker stopped at seq %d", self.cursor)

    def step(self) -> int:
        """One poll: publish what is pending, then apply and publish the new batches.

        Returns:
            How many batches were read.
        """
        if self._outbox or self._applied is not None:
            self._publish_and_commit()
        batches = self.source.read(self.options.batches_per_poll)
        for batch in batches:
            if self.stop.is_set():
                break
            self._apply(batch)
            self._publish_and_commit()
        now = self._clock()
        if not batches and self._live:
            # Silence: the wall clock still closes minutes.
            self._outbox.append(self._advance(live=True))
            self._publish_and_commit()
        if self._live and self.options.provisional_s > 0 and now >= self._next_provisional:
            self._next_provisional = now + self.options.provisional_s
            self._provisional()
        if now >= self._next_tick:
            self._next_tick = now + self.options.tick_s
            self._tick()
        if now >= self._next_stats:
            self._next_stats = now + self.options.stats_every_s
            self.write_stats()
            self.source.heartbeat()
        if now >= self._next_log:
            self._next_log = now + self.options.log_every_s
            self._log_minute()
        return len(batches)

    def close(self) -> None:
        """Write the alerts in hand, stop delivering, close the spool (and the ledger and
        alert store, when the worker opened them)."""
        self.alert_writer.close()
        self.deliverer.stop()
        for sink in self._sinks.values():
            closing = getattr(sink, "close", None)
            if closing is not None:
                closing()
        self.source.close()
        if self._owns_ledger:
            self.ledger.close()
        if self._owns_alerts:
            self.alerts.close()

    # Batches.

    def _apply(self, batch: SpoolBatch | BusBatch) -> None:
        """Feed one batch's records to the windows and queue the rows they make final."""
        table, bad = batch_table(batch.records)
        for index, reason in bad:
            logger.error("spool batch %d: record %d skipped: %s", batch.seq, index, reason)
        self.counters.malformed_records += len(bad)
        now_ms = self._now_ms()
        accepted_ms = batch.accepted_at_ms if batch.accepted_at_ms is not None else now_ms
        newest_ms: int | None = None
        for record in table.select(_FIELDS).to_pylist():
            try:
                counted = self._feed(record)
            except ValueError as exc:  # validated on the way in: should never happen
                logger.error("spool batch %d: record skipped: %s", batch.seq, exc)
                self.counters.malformed_records += 1
                continue
            at_ms = _ms(record["timestamp"])
            # Every record, so that the workers of all shards agree on live or replay.
            newest_ms = at_ms if newest_ms is None else max(newest_ms, at_ms)
            if counted is None:  # a copy of a record counted before, or another shard's
                continue
            self.activity.note(record, at_ms)
            state = self._state(record[_API_KEY])
            state.user = record[_USER]
            state.last_seen_ms = max(state.last_seen_ms, at_ms)
            if counted:
                first_row = (at_ms // _MINUTE_MS + 1) * _MINUTE_MS
                waiting = (first_row, accepted_ms)
                state.waiting[waiting] = state.waiting.get(waiting, 0) + 1
            if record["error_code"] == CHALLENGE_REQUIRED:
                bisect.insort(state.refusals_ms, at_ms)
        self.counters.batches += 1
        self.counters.records += table.num_rows
        watermark = self.key_windows.watermark
        if watermark is not None:
            self.identities.forget(_ms(watermark))
        if newest_ms is not None:
            lag = timedelta(milliseconds=accepted_ms - newest_ms)
            live = lag <= self.options.live_lag
            if live != self._live:
                logger.info(
                    "stream worker: %s (batch %d is %.0f s behind its acceptance)",
                    "live records" if live else "a replay",
                    batch.seq,
                    lag.total_seconds(),
                )
            self._live = live
        self._outbox.append(self._advance(live=bool(self._live)))
        self._applied = batch.seq

    def _feed(self, record: dict[str, Any]) -> bool | None:
        """Feed one record to the windows: whether it counted in its key's windows (False:
        too late), or None when it is a copy of a counted record or another shard's key's.

        Records of another shard's key (or user) count in the cross-entity aggregates only.
        """
        key, job = record[_API_KEY], record["job_id"]
        if job is not None and not self.identities.first(
            (key, job, record["status"]), _ms(record["timestamp"])
        ):
            self.counters.duplicate_records += 1
            return None
        shard, shards = self.options.shard, self.options.bus_shards
        user = record[_USER]
        if user is None or shard.owns_entity(user, shards):
            self.user_windows.update(record)
        else:
            self.user_windows.update_cross_entity(record)
        if not shard.owns_entity(key, shards):
            self.key_windows.update_cross_entity(record)
            return None
        return self.key_windows.update(record)

    def _advance(self, *, live: bool) -> tuple[pa.Table, pa.Table]:
        now = datetime.fromtimestamp(self._clock(), UTC) if live else None
        return self.key_windows.advance(now), self.user_windows.advance(now)

    def _publish_and_commit(self) -> None:
        while self._outbox:
            keys, users = self._outbox[0]
            self._publish(keys, users)
            self._outbox.pop(0)
        if self._applied is not None:
            self.source.commit(self._applied)
            self.cursor, self._applied = self._applied, None

    def _publish(self, keys: pa.Table, users: pa.Table) -> None:
        """Push the rows (users first: a key's score reads its user's), then score and decide."""
        if users.num_rows:
            self.counters.rows_pushed[_USER] += push_online(self.store, users, _USER)
        if not keys.num_rows:
            return
        self.counters.rows_pushed[_API_KEY] += push_online(self.store, keys, _API_KEY)
        latest = latest_per_key(keys, _API_KEY)
        instants = [_ms(instant) for instant in latest[TIMESTAMP_COLUMN].to_pylist()]
        self._note_minutes(latest, instants)
        champion = self._loaded_champion()
        clock_ms = self._decision_clock_ms()
        for key, row_ms in zip(latest[_API_KEY].to_pylist(), instants, strict=True):
            state = self._state(key)
            response = None if champion is None else self._score(champion, key, state)
            if response is not None:
                state.last = response
                if response.anomalous and row_ms not in state.alerts_ms:
                    self._alert(state, row_ms, response)
                if clock_ms is not None:
                    self._decide(key, state, clock_ms)
            self._settle_latency(state, row_ms, decided=response is not None)

    def _note_minutes(self, latest: pa.Table, instants: list[int]) -> None:
        """Keep each key's last hour per minute, from its newest row's sequences."""
        columns = ("submissions_last_60_min", "failures_last_60_min")
        if not set(columns) <= set(latest.column_names):
            return
        subs, fails = (latest[c].to_pylist() for c in columns)
        for key, row_ms, s, f in zip(
            latest[_API_KEY].to_pylist(), instants, subs, fails, strict=True
        ):
            self.activity.note_row(
                key, {"submissions_last_60_min": s, "failures_last_60_min": f}, row_ms
            )

    def _provisional(self) -> None:
        """Score the keys whose records wait in the open minute as if it closed now.

        A copy of the windows is advanced past the open minute's end: its rows are those
        a batch run would give at that instant if no more records came. They are scored
        over the key's online values (never written to the online store, which holds
        final rows only), and an alert among them is an alert now: the engine may act
        within a second of the record instead of after the minute closes. The final row
        is scored again when the minute closes.
        """
        waiting = [key for key, state in self.keys.items() if state.waiting]
        champion = self._loaded_champion() if waiting else None
        if champion is None:
            return
        now_ms = self._now_ms()
        row_ms = (now_ms // _MINUTE_MS + 1) * _MINUTE_MS
        past = datetime.fromtimestamp(row_ms / 1000, UTC) + self.options.allowed_lateness
        keys = latest_per_key(copy.deepcopy(self.key_windows).advance(past), _API_KEY)
        users = latest_per_key(copy.deepcopy(self.user_windows).advance(past), _USER)
        user_rows = {row[_USER]: row for row in users.to_pylist()}
        wanted = set(waiting)
        for row in keys.to_pylist():
            key = row[_API_KEY]
            if key not in wanted or _ms(row[TIMESTAMP_COLUMN]) != row_ms:
                continue
            state = self.keys[key]
            self.activity.note_row(key, row, row_ms)
            loaded, store, inputs = champion
            overlay = (row, user_rows.get(state.user) if state.user is not None else None)
            response = score_key(
                loaded, store, inputs, key, state.user, max_age=self.max_age, overlay=overlay
            )
            self.counters.keys_scored_provisionally += 1
            state.last = response
            if response.anomalous and now_ms not in state.alerts_ms:
                self._alert(state, now_ms, response)
            self._decide(key, state, now_ms)
            self._settle_latency(state, row_ms, decided=True)

    def _alert(self, state: _KeyState, at_ms: int, response: Any) -> None:
        """Note an alert, and whether it was weak: only just over the threshold."""
        bisect.insort(state.alerts_ms, at_ms)
        margin = self.policy.ladder.review.low_confidence_margin * abs(response.threshold)
        if response.score - response.threshold <= margin:
            state.weak_alerts_ms.add(at_ms)

    def _loaded_champion(self) -> tuple[Any, Any, Any] | None:
        """The champion, store and inputs; None while there is no model (asked again later)."""
        now = self._clock()
        if now < self._champion_retry_at:
            return None
        try:
            return self.champion.get()
        except ChampionUnavailable as exc:
            # Asking the registry at every batch would cost more than the batch.
            self._champion_retry_at = now + _CHAMPION_RETRY_S
            logger.warning("stream worker: features pushed, nothing scored: %s", exc)
            return None

    def _score(self, champion: tuple[Any, Any, Any], key: str, state: _KeyState) -> Any:
        loaded, store, inputs = champion
        try:
            response = score_key(loaded, store, inputs, key, state.user, max_age=self.max_age)
        except KeyNotOnline as exc:  # just pushed: the store lost it?
            logger.warning("stream worker: %s", exc)
            self.counters.keys_not_scored += 1
            return None
        self.counters.keys_scored += 1
        return response

    def _settle_latency(self, state: _KeyState, row_ms: int, *, decided: bool) -> None:
        """The records this row reads are decided now: count their latency from acceptance."""
        now_ms = self._now_ms()
        for waiting in [w for w in state.waiting if w[0] <= row_ms]:
            n = state.waiting.pop(waiting)
            if decided:
                self.latency.add(now_ms - waiting[1], n)
                self._minute_latency.add(now_ms - waiting[1], n)
            else:
                self.counters.undecided_records += n

    # Decisions.

    def _decide(self, key: str, state: _KeyState, clock_ms: int) -> None:
        """Take every decision the engine owes ``key`` up to ``clock_ms``, in order."""
        usage = FeatureUsage(state.last.features if state.last is not None else {})
        for _ in range(_MAX_DECISIONS_PER_LOOK):
            after_ms = state.decisions[-1].at_ms if state.decisions else -1
            decision = self.policy.next_decision(
                key,
                alerts_ms=state.alerts_ms,
                weak_alerts_ms=state.weak_alerts_ms,
                refusals_ms=state.refusals_ms,
                decisions=state.decisions,
                after_ms=after_ms,
                usage=usage,
            )
            if decision is None or decision.at_ms > clock_ms:
                break
            self._record(key, state, decision)
        else:
            logger.error(
                "stream worker: %s owes more than %d decisions", key, _MAX_DECISIONS_PER_LOOK
            )
        # What the engine reads from here on starts at the last decision.
        if state.decisions:
            since = state.decisions[-1].at_ms
            del state.alerts_ms[: bisect.bisect_left(state.alerts_ms, since)]
            state.weak_alerts_ms = {t for t in state.weak_alerts_ms if t >= since}
            del state.refusals_ms[: bisect.bisect_left(state.refusals_ms, since)]

    def _record(self, key: str, state: _KeyState, decision: Decision) -> None:
        """Append ``decision`` to the ledger unless it is there already (a restart's replay)."""
        identity = (key, decision.action, decision.at_ms)
        self._follow_ledger()
        if identity in self._recorded:  # recorded before; `_follow_ledger` put it in state
            return
        last = state.last
        reason = decision.reason
        if last is not None:
            reason = f"{reason} (score {last.score:.3f}, threshold {last.threshold:.3f})"
        mode = cast(Mode, self.modes.get(decision.action, "enforce"))
        record = self.ledger.append(
            LedgerEntry(
                at_ms=decision.at_ms,
                api_key_id=key,
                action=decision.action,
                actor="system",
                reason=reason,
                params=dict(decision.params),
                mode=mode,
                expires_at_ms=decision.expires_at_ms,
                score=None if last is None else last.score,
                model_name=None if last is None else last.model_name,
                model_version=None if last is None else last.model_version,
                feature_service=None if last is None else last.feature_service,
                features={} if last is None else dict(last.features),
            )
        )
        self._recorded.add(identity)
        _insert(state.decisions, decision)
        if last is not None and decision.action in _ALERTED_ACTIONS:
            self.alert_writer.submit(
                AlertSnapshot(
                    api_key_id=key,
                    user=state.user,
                    action=decision.action,
                    mode=mode,
                    reason=reason,
                    decided_at_ms=decision.at_ms,
                    requires_approval=bool(decision.params.get("requires_approval")),
                    response=last,
                    minutes=self.activity.last_hour(key),
                    recent_jobs=self.activity.recent_jobs(key),
                    cluster=self.activity.cluster(key, decision.at_ms),
                    ledger_seqs=[record.seq],
                )
            )
        self.counters.decisions[decision.action] = (
            self.counters.decisions.get(decision.action, 0) + 1
        )
        logger.info(
            "%s %s %s at %d (%s)", mode, decision.action, key, decision.at_ms, decision.reason
        )

    def _follow_ledger(self) -> None:
        """Take in the ledger's records since the last look: ours, a person's, a restart's."""
        for record in self.ledger.records(self._ledger_seq):
            self._ledger_seq = record.seq
            self._take_in(record)

    def _take_in(self, record: LedgerRecord) -> None:
        entry = record.entry
        identity = (entry.api_key_id, entry.action, entry.at_ms)
        if identity in self._recorded:
            return
        self._recorded.add(identity)
        state = self._state(entry.api_key_id)
        if entry.action == "deny" and entry.refers_to in self._proposals:
            # A refused proposal never took effect: the key is back where it was.
            key, proposal = self._proposals.pop(entry.refers_to)
            with contextlib.suppress(ValueError):
                self.keys[key].decisions.remove(proposal)
            return
        action = "release" if entry.action in _LIFTING_EVENTS else entry.action
        if action not in ("throttle", "cap", "challenge", "rotate", "revoke", "review", "release"):
            return
        decision = Decision(
            entry.at_ms,
            entry.api_key_id,
            cast(Action, action),
            entry.reason,
            entry.params,
            entry.expires_at_ms,
        )
        _insert(state.decisions, decision)
        if action in HIGH_IMPACT_ACTIONS or action == "review":
            self._proposals[record.seq] = (entry.api_key_id, decision)
        if (
            entry.actor == "system"
            and action in _ALERT_RUNGS
            and entry.at_ms not in state.alerts_ms
        ):
            bisect.insort(state.alerts_ms, entry.at_ms)

    def _tick(self) -> None:
        """Examine the keys under a mitigation: a release or an expiry needs no new record."""
        self._follow_ledger()
        clock_ms = self._decision_clock_ms()
        if clock_ms is None:
            return
        for key, state in list(self.keys.items()):
            if state.under_mitigation:
                self._decide(key, state, clock_ms)
            elif (
                not state.waiting
                and state.last_seen_ms < clock_ms - _DAY_MS
                and (not state.decisions or state.decisions[-1].action == "release")
            ):
                del self.keys[key]  # silent for a day, nothing on it: forget it
                self.activity.forget(key)
        if clock_ms >= self._next_prune_ms:
            self._next_prune_ms = clock_ms + _MINUTE_MS
            self.activity.prune(clock_ms)

    def _decision_clock_ms(self) -> int | None:
        """The instant up to which decisions are due: the api-key watermark (event time).

        Before any record: the wall clock less the lateness, unless the stream is a replay.
        """
        watermark = self.key_windows.watermark
        if watermark is not None:
            return _ms(watermark)
        if self._live is False:
            return None
        return self._now_ms() - self._lateness_ms

    # Start.

    def _warm_up(self) -> None:
        """Rebuild the windows from the telemetry they saw before.

        From the spool: the last day of raw and landing partitions and the processed
        batches still in the spool. Compaction stages only batches every consumer
        processed, so these hold exactly the records fed before the cursor; the rows they
        make final were published then. From the bus: its messages of the last day up to
        the consumer's acknowledgement floor (the stream keeps them longer than that).
        """
        started = time.perf_counter()
        now = datetime.fromtimestamp(self._clock(), UTC)
        start = now - LOOKBACK - timedelta(minutes=1)
        end = now + timedelta(seconds=settings.max_clock_skew_seconds())
        parts: list[pa.Table] = []
        if isinstance(self.source, _SpoolSource):  # the bus holds the lookback itself
            parts.append(read_raw(self.paths.raw_telemetry, start, end).select(_FIELDS))
            hours = set(hours_between(start, end))
            for hour in landing_hours(self.paths.landing):
                if hour in hours:
                    folder = partition_dir(self.paths.landing, hour)
                    for path in sorted(folder.glob("batch-*.parquet")):
                        parts.append(pq.read_table(path, columns=_FIELDS))
        parts += [batch_table(b.records)[0].select(_FIELDS) for b in self.source.history(start)]
        if not parts:
            return
        table = pa.concat_tables([p.cast(parts[0].schema) for p in parts])
        inside = pc.and_(
            pc.greater_equal(table["timestamp"], pa.scalar(start, table["timestamp"].type)),
            pc.less(table["timestamp"], pa.scalar(end, table["timestamp"].type)),
        )
        table = table.filter(inside).sort_by("timestamp")
        for i, record in enumerate(table.to_pylist()):
            if i % 1024 == 0 and self.key_windows.watermark is not None:
                self.identities.forget(_ms(self.key_windows.watermark))
            if self._feed(record) is None:
                continue
            self._state(record[_API_KEY]).user = record[_USER]
            self.activity.note(record, _ms(record["timestamp"]))
        watermark = self.key_windows.watermark
        if watermark is not None:
            self.identities.forget(_ms(watermark))
        self.key_windows.advance()
        self.user_windows.advance()
        if table.num_rows:
            newest = table["timestamp"][-1].as_py()
            self._live = now - newest <= self.options.live_lag
            logger.info(
                "stream worker: windows rebuilt from %d stored records in %.1f s",
                table.num_rows,
                time.perf_counter() - started,
            )

    # Figures.

    def stats(self) -> dict[str, Any]:
        """What the worker did since it started, and its latency from acceptance to decision."""
        watermark = self.key_windows.watermark
        counters = self.counters
        return {
            "updated_at": datetime.fromtimestamp(self._clock(), UTC).isoformat(),
            "started_at": datetime.fromtimestamp(self.started_at, UTC).isoformat(),
            "consumer": self.options.consumer,
            "source": self.source.where,
            "cursor": self.cursor,
            "records_are": {True: "live", False: "replay", None: "unknown"}[self._live],
            "watermark": None if watermark is None else watermark.isoformat(),
            "allowed_lateness_s": self.options.allowed_lateness.total_seconds(),
            "batches": counters.batches,
            "records": counters.records,
            "malformed_records": counters.malformed_records,
            "duplicate_records": counters.duplicate_records,
            "late_records": self.key_windows.late_records,
            "rows_pushed": dict(counters.rows_pushed),
            "keys_scored": counters.keys_scored,
            "keys_scored_provisionally": counters.keys_scored_provisionally,
            "keys_not_scored": counters.keys_not_scored,
            "undecided_records": counters.undecided_records,
            "decisions": dict(counters.decisions),
            "keys_under_mitigation": sum(s.under_mitigation for s in self.keys.values()),
            # From a batch's commit in the spool to its key's decision (scored and put to
            # the engine). Rows are per minute: a record waits for its minute to close,
            # plus the lateness, so live latencies lie between the lateness and a minute
            # more than it, plus the worker's own time.
            "acceptance_to_decision": self.latency.summary(),
        }

    def write_stats(self) -> Path:
        """Write `stats` to `stats_path` (atomically) and return the path."""
        path = stats_path(self.paths)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.stats(), indent=1) + "\n", encoding="utf-8")
        os.replace(partial, path)
        return path

    def _log_minute(self) -> None:
        last = self._minute_latency.summary()
        self._minute_latency = LatencyHistogram()
        logger.info(
            "stream worker: seq %d, %d records, %d late, %d keys scored, decisions %s; "
            "acceptance to decision over the last minute: %s records, p50 %s, p95 %s, p99 %s",
            self.cursor,
            self.counters.records,
            self.key_windows.late_records,
            self.counters.keys_scored,
            self.counters.decisions or "none",
            last["count"],
            *(_seconds(last[f"p{q}_ms"]) for q in (50, 95, 99)),
        )

    # Helpers.

    def _state(self, key: str) -> _KeyState:
        state = self.keys.get(key)
        if state is None:
            state = self.keys[key] = _KeyState()
        return state

    def _now_ms(self) -> int:
        return round(self._clock() * 1000)


class _SpoolSource:
    """The collector's spool, tailed after the consumer's cursor (the default source)."""

    def __init__(self, paths: settings.Paths, consumer: str) -> None:
        self.consumer = consumer
        self.where = str(spool_path(paths))
        self._conn = connect(spool_path(paths))
        self.position = register_consumer(self._conn, consumer)

    def read(self, limit: int) -> list[SpoolBatch]:
        return read_batches(self._conn, self.position, limit)

    def commit(self, seq: int) -> None:
        commit_consumer(self._conn, self.consumer, seq)
        self.position = seq

    def heartbeat(self) -> None:
        """Commit even with nothing new: compaction takes a consumer that stays silent for
        spool.CONSUMER_TIMEOUT for gone, and stops waiting for it."""
        commit_consumer(self._conn, self.consumer, self.position)

    def history(self, since: datetime) -> Iterator[SpoolBatch]:
        """The processed batches still in the spool (those before are in the partitions)."""
        after = 0
        while after < self.position:
            batches = [b for b in read_batches(self._conn, after, 256) if b.seq <= self.position]
            if not batches:
                return
            yield from batches
            after = batches[-1].seq

    def close(self) -> None:
        self._conn.close()


class _BusSource:
    """The worker's consumer on the ingest bus; the acknowledgement floor is its cursor."""

    #: Seconds a read waits for the first message (the worker's poll waits too).
    WAIT_S = 0.05

    def __init__(self, url: str, name: str) -> None:
        self.where = f"{url} as {name}"
        self._consumer = BusConsumer(url, name)
        self.position = self._consumer.position

    def read(self, limit: int) -> list[BusBatch]:
        return self._consumer.fetch(limit, self.WAIT_S)

    def commit(self, seq: int) -> None:
        self._consumer.commit(seq)
        self.position = seq

    def heartbeat(self) -> None:
        """Nothing to do: a durable consumer waits for its worker however long."""

    def history(self, since: datetime) -> Iterator[BusBatch]:
        return self._consumer.history(since)

    def close(self) -> None:
        self._consumer.close()


def _insert(decisions: list[Decision], decision: Decision) -> None:
    """Insert ``decision`` in time order (after any of the same instant)."""
    at = bisect.bisect_right([d.at_ms for d in decisions], decision.at_ms)
    decisions.insert(at, decision)


def _ms(instant: datetime) -> int:
    return (instant - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def _seconds(ms: float | int | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.1f} s"


def run_stream(
    options: StreamOptions | None = None,
    ladder: Ladder | None = None,
    say: Callable[[str], None] | None = None,
) -> int:
    """``qabuse stream``: run a `StreamWorker` until SIGTERM or SIGINT; 0 when it stopped so.

    The signal lets the batch in progress finish and its cursor be committed; the figures
    are written a last time. During the start, it ends the process at once (exit 0).

    Args:
        options: The worker's options.
        ladder: The mitigation ladder; default `Ladder()`.
        say: Where to tell what it does (the CLI passes ``click.echo``); default the log.
    """
    stop = threading.Event()
    running = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if not running:
            # Still starting (Feast, MLflow, the model, the warm-up): no batch is in hand,
            # so stop at once rather than after a start that can take many seconds.
            raise SystemExit(0)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    # Feast logs each registry refresh at INFO: the worker's own lines would drown in them.
    logging.getLogger("feast").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        worker = StreamWorker(options=options, ladder=ladder)
        try:
            worker.stop = stop
            (say or logger.info)(
                f"stream worker on {worker.source.where} from seq {worker.cursor}; "
                f"figures in {stats_path(worker.paths)}"
            )
            running = True
            worker.run()
        finally:
            worker.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0

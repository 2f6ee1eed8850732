"""The real-time path: from a record's acceptance in the spool to its key's decision.

Ours is `StreamWorker` in-process, on a real spool, the Feast online store and the
``@champion`` of a ``QABUSE_HOME`` (`Settings.home`, or one built as the scoring
benchmark builds it), with a scratch decision ledger. Two runs:

* **live**: a writer thread commits batches of records stamped with the wall clock (as
  a collector would, a batch every `Settings.live_batch_s`) until the next minute
  boundary; the worker polls as ``qabuse stream`` does. Its histogram gives the latency
  from each batch's commit to its key's decision: the first score of a row that reads
  the record, a provisional one while its minute is open, put to the policy engine.
  Waiting for the minute's final row instead (``allowed_lateness`` after the minute)
  would be bounded below by ``ceil_minute(t) + lateness - t``: that floor is computed
  for the same records and reported beside it. ``--quick`` skips this run (it waits for
  a minute boundary), and the latency figures then come from the replay.
* **replay** (catch-up): `Settings.records` records spread over `Settings.minutes`
  ending an hour ago, all committed before the worker starts; the rate is records over
  the worker's wall time to drain them, end to end (parse, windows, push, score, decide,
  cursor). The throughput baseline is the spool-read floor: `read_batches` and
  `batch_table` alone over the same spool.

The latency baseline is the hourly batch path: a record is decided once the hourly
partition that holds it is compacted, its features computed and materialised and its key
scored, so at the next hour boundary after its acceptance (a wait uniform over the hour
for records that arrive all through it) plus that computation, timed here on the
replay's records (`window_features` for keys and users, the online write of each
entity's latest row, one score per key). At best: the schedule, compaction and
materialisation of the real pipeline come on top. The cross-check: after the replay, the
online row of a few keys equals `window_features` at its instant.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
from rich.console import Console

from benchmarks import scoring
from benchmarks.report import (
    BenchmarkResult,
    busy_machine_note,
    comparison,
    load_average,
    percentile,
    progress_display,
)

NAME = "stream_latency"
BASELINE = (
    "hourly batch path at best (the wait for the hour's end, uniform over the hour, + the "
    "measured window_features, online write and scoring of the same records); throughput: "
    "the spool-read floor (read_batches + batch_table)"
)
TOLERANCE = 1e-9
PERCENTILES = (50, 95, 99)
_LEDGER_KEY = b"stream-latency-bench-ledger-key!"
_HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Settings:
    """Sizes of one stream-latency run."""

    #: Replay: records, the minutes of event time they span, and records per batch.
    records: int = 30_000
    minutes: int = 60
    batch: int = 500
    api_keys: int = 40
    #: Live: records per second written, a batch every so often, until the next minute
    #: boundary at least `live_min_s` away; 0 skips the live run.
    live_rate: float = 200.0
    live_batch_s: float = 0.1
    live_min_s: float = 10.0
    live: bool = True
    allowed_lateness_s: float = 5.0
    seed: int = 7
    #: An existing QABUSE_HOME with a @champion and an applied store; None builds one.
    home: Path | None = None


class _Records:
    """Contract records of a few keys and users, as spool rows (the collector's fast path)."""

    def __init__(self, api_keys: int, seed: int) -> None:
        import hashlib

        self.rng = random.Random(seed)

        def hexed(kind: str, i: int) -> str:
            return hashlib.sha256(f"stream-bench-{seed}-{kind}-{i}".encode()).hexdigest()

        self.keys = [hexed("key", i) for i in range(api_keys)]
        self.users = [hexed("user", i % max(1, api_keys * 2 // 3)) for i in range(api_keys)]
        self.codes = [hexed("code", i) for i in range(api_keys * 2)]
        self.networks = [hexed("net", i) for i in range(api_keys)]
        self.jobs = 0

    def rows(self, instants: list[datetime]) -> list[Any]:
        from qabuse_dagster.ingest.wire import to_spool_row
        from qabuse_dagster.telemetry.contract import format_rfc3339_utc

        rows = []
        for at in instants:
            k = min(int(self.rng.paretovariate(1.2)) - 1, len(self.keys) - 1)
            status = self.rng.choices(("submitted", "completed", "failed"), (6, 3, 1))[0]
            self.jobs += 1
            record = {
                "schema_version": 1,
                "job_id": f"bench-{self.jobs}",
                "timestamp": format_rfc3339_utc(at),
                "user": self.users[k],
                "api_key_id": self.keys[k],
                "provider": "ibm_quantum",
                "backend": self.rng.choice(("ibm_torino", "ibm_fez", "aer_simulator")),
                "sdk": "qiskit",
                "num_circuits": self.rng.randint(1, 8),
                "shots": self.rng.choice((100, 1024, 4000)),
                "depth": self.rng.randint(5, 80),
                "runtime_s": 2.5 if status == "completed" else None,
                "status": status,
                "error_code": "backend_error" if status == "failed" else None,
                "client_agent": "qabuse-qiskit/0.1 qiskit/2.6.1",
                "code_hash": self.codes[(2 * k + self.rng.randint(0, 1)) % len(self.codes)],
                "source_ip_hash": self.networks[k],
            }
            row = to_spool_row(json.dumps(record).encode())
            if row is None:
                raise AssertionError(f"not a plain valid record: {record}")
            rows.append(row)
        return rows


def _summary(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    return {f"p{q}_ms": percentile(ordered, q) for q in PERCENTILES} | {
        "mean_ms": sum(ordered) / len(ordered),
        "max_ms": ordered[-1],
    }


def _worker(scratch: Path, settings: Settings, champion: Any, ledger: Any) -> Any:
    from qabuse_dagster import settings as qabuse_settings
    from qabuse_dagster.serving.stream_worker import StreamOptions, StreamWorker

    options = StreamOptions(allowed_lateness=timedelta(seconds=settings.allowed_lateness_s))
    return StreamWorker(
        qabuse_settings.Paths(scratch),
        options=options,
        ledger=ledger,
        store=champion.store,
        champion=champion,
    )


def measure_replay(settings: Settings, scratch: Path, champion: Any) -> dict[str, Any]:
    """Commit the replay's batches, time the spool-read floor, then the worker's catch-up."""
    from qabuse_dagster.ingest.spool import Spool, batch_table, connect, read_batches, spool_path
    from qabuse_dagster.response.ledger import open_ledger
    from qabuse_dagster.settings import Paths

    source = _Records(settings.api_keys, settings.seed)
    end = (datetime.now(UTC) - timedelta(hours=1)).replace(second=0, microsecond=0)
    span_us = settings.minutes * 60_000_000
    offsets = sorted(source.rng.randrange(span_us) for _ in range(settings.records))
    start = end - timedelta(minutes=settings.minutes)
    instants = [start + timedelta(microseconds=o) for o in offsets]
    rows = source.rows(instants)
    spool = Spool(spool_path(Paths(scratch)))
    for first in range(0, len(rows), settings.batch):
        spool.add(rows[first : first + settings.batch], "bench")
    spool.close()

    conn = connect(spool_path(Paths(scratch)))
    started = time.perf_counter()
    after, read = 0, 0
    while batches := read_batches(conn, after, 64):
        for batch in batches:
            read += batch_table(batch.records)[0].num_rows
        after = batches[-1].seq
    floor_s = time.perf_counter() - started
    conn.close()

    with open_ledger(f"sqlite:///{scratch / 'ledger.db'}", key=_LEDGER_KEY) as ledger:
        worker = _worker(scratch, settings, champion, ledger)
        try:
            started = time.perf_counter()
            while worker.step():
                pass
            ours_s = time.perf_counter() - started
            stats = worker.stats()
        finally:
            worker.close()
    table, _ = batch_table([row.text for row in rows])
    return {
        "records": len(rows),
        "read": read,
        "floor_s": floor_s,
        "ours_s": ours_s,
        "stats": stats,
        "table": table,
        "end": end,
        # Checked now: the batch path's timing below writes these keys' rows again.
        "problems": cross_check(table, champion.store, source.keys[:5]),
    }


def measure_batch_compute(table: pa.Table, champion: Any, end: datetime) -> dict[str, Any]:
    """The hourly batch path's computation on the same records, timed."""
    from qabuse_dagster.features.definitions import ENTITY_COLUMNS
    from qabuse_dagster.features.push import push_online
    from qabuse_dagster.features.windows import window_features
    from qabuse_dagster.serving.scoring import score_key

    loaded, store, inputs = champion.get()
    started = time.perf_counter()
    first = end - timedelta(hours=1)
    rows = {}
    for column in ENTITY_COLUMNS.values():
        rows[column] = window_features(table, first, end + timedelta(minutes=1), column)
    compute_s = time.perf_counter() - started
    for column, entity_rows in rows.items():
        push_online(store, entity_rows, column)
    keys = sorted(set(rows[ENTITY_COLUMNS["api_key"]]["api_key_id"].to_pylist()))
    for key in keys:
        score_key(loaded, store, inputs, key, None, max_age=timedelta(days=1))
    total_s = time.perf_counter() - started
    return {"window_features_s": compute_s, "total_s": total_s, "keys": len(keys)}


def measure_live(settings: Settings, scratch: Path, champion: Any) -> dict[str, Any]:
    """Write live batches until a minute boundary; the worker decides them as they close."""
    from qabuse_dagster.ingest.spool import Spool, spool_path
    from qabuse_dagster.response.ledger import open_ledger
    from qabuse_dagster.settings import Paths

    source = _Records(settings.api_keys, settings.seed + 1)
    now = time.time()
    boundary = (math.floor(now / 60) + 1) * 60
    if boundary - now < settings.live_min_s:
        boundary += 60
    per_batch = max(1, round(settings.live_rate * settings.live_batch_s))
    written: list[tuple[float, float]] = []  # (event instant, commit) in epoch seconds
    spool = Spool(spool_path(Paths(scratch)))

    def write() -> None:
        while time.time() < boundary:
            at = datetime.now(UTC)
            spool.add(source.rows([at] * per_batch), "bench")
            committed = time.time()
            written.extend((at.timestamp(), committed) for _ in range(per_batch))
            time.sleep(settings.live_batch_s)

    with open_ledger(f"sqlite:///{scratch / 'ledger.db'}", key=_LEDGER_KEY) as ledger:
        worker = _worker(scratch, settings, champion, ledger)
        try:
            writer = threading.Thread(target=write, name="bench-collector")
            writer.start()
            deadline = boundary + settings.allowed_lateness_s + 30
            while writer.is_alive() or (
                worker.latency.count + worker.counters.undecided_records < len(written)
            ):
                if time.time() > deadline:
                    break
                if not worker.step():
                    time.sleep(worker.options.poll_s)
            writer.join()
            stats = worker.stats()
        finally:
            worker.close()
    spool.close()
    lateness = settings.allowed_lateness_s
    # The design floor: a record is read by the row at the next minute boundary, final
    # `lateness` later on the wall clock.
    floor_ms = [
        ((math.floor(t / 60) + 1) * 60 + lateness - committed) * 1000 for t, committed in written
    ]
    return {
        "records": len(written),
        "stats": stats,
        "floor": _summary(floor_ms),
        "seconds": time.time() - now,
    }


def cross_check(table: pa.Table, store: Any, keys: list[str]) -> list[str]:
    """Keys whose online row differs from `window_features` at its instant."""
    from qabuse_dagster.features.definitions import DETECTOR_FEATURES
    from qabuse_dagster.features.store import FEATURE_SERVICE, online_vectors
    from qabuse_dagster.features.windows import window_features

    problems = []
    for vector in online_vectors(store, keys, FEATURE_SERVICE, max_age=timedelta(days=1)):
        at = vector.event_timestamp
        if at is None:
            problems.append(f"{vector.key[:12]}: no online row")
            continue
        rows = window_features(table, at, at + timedelta(minutes=1)).to_pylist()
        (row,) = [r for r in rows if r["api_key_id"] == vector.key] or [None]
        if row is None:
            problems.append(f"{vector.key[:12]}: batch has no row at {at}")
            continue
        for name in DETECTOR_FEATURES:
            if not abs(float(vector.values[name]) - float(row[name])) <= TOLERANCE:
                problems.append(f"{vector.key[:12]} {name}: {vector.values[name]} != {row[name]}")
    return problems


def run(settings: Settings, console: Console) -> BenchmarkResult:
    """Replay, then live; the batch computation; the comparisons."""
    from qabuse_dagster.serving.scoring import Champion

    result = BenchmarkResult(
        name=NAME, title="Stream worker: acceptance to decision, and catch-up", baseline=BASELINE
    )
    load_averages = [load_average()]
    for name in ("feast", "dagster", "mlflow", "qabuse_dagster"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with contextlib.ExitStack() as stack:
        _, built_s = stack.enter_context(scoring.trained_home(settings.home, scoring.Settings()))
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qabuse-stream-")))
        progress = stack.enter_context(progress_display(console, bar=False))
        task = progress.add_task("loading @champion", total=1)
        from qabuse_dagster.features.store import open_store

        champion = Champion(refresh_s=3600, store=open_store())
        champion.get()
        progress.update(task, completed=1)
        task = progress.add_task(f"replay: {settings.records:,} records", total=1)
        replay = measure_replay(settings, scratch / "replay", champion)
        progress.update(task, completed=1)
        task = progress.add_task("hourly batch path: the same records", total=1)
        batch = measure_batch_compute(replay["table"], champion, replay["end"])
        progress.update(task, completed=1)
        live = None
        if settings.live:
            task = progress.add_task("live: until the next minute boundary closes", total=1)
            live = measure_live(settings, scratch / "live", champion)
            progress.update(task, completed=1)
    load_averages.append(load_average())

    replay_stats = replay["stats"]
    ours_rate = replay["records"] / replay["ours_s"]
    floor_rate = replay["read"] / replay["floor_s"]
    headline = live["stats"] if live is not None else replay_stats
    latency = headline["acceptance_to_decision"]
    # Records arrive all through the hour: the wait for the hour's end is uniform over it.
    hourly = [(i + 0.5) / 3600 * _HOUR_MS + batch["total_s"] * 1000 for i in range(3600)]
    hourly_summary = _summary(hourly)
    result.comparisons = [
        comparison(
            f"acceptance to decision p{q}",
            "ms",
            float(latency[f"p{q}_ms"] or math.nan),
            hourly_summary[f"p{q}_ms"],
            higher_is_better=False,
        )
        for q in (50, 99)
    ]
    result.comparisons.append(
        comparison("catch-up rate", "records/s", ours_rate, floor_rate, higher_is_better=True)
    )
    result.facts = {
        "latency_from": "live" if live is not None else "replay (records queued before start)",
        "acceptance_to_decision_ms": latency,
        "live_records": None if live is None else live["records"],
        "live_floor_ms": None if live is None else live["floor"],
        "live_seconds": None if live is None else live["seconds"],
        "live_stats": None if live is None else live["stats"],
        "replay_records": replay["records"],
        "replay_minutes": settings.minutes,
        "replay_batch": settings.batch,
        "replay_s": replay["ours_s"],
        "replay_records_per_s": ours_rate,
        "spool_read_records_per_s": floor_rate,
        "replay_stats": replay_stats,
        "batch_compute_s": batch["total_s"],
        "batch_window_features_s": batch["window_features_s"],
        "hourly_batch_ms": hourly_summary,
        "api_keys": settings.api_keys,
        "allowed_lateness_s": settings.allowed_lateness_s,
        "home_built": built_s is not None,
        "home_build_s": built_s,
        "cross_check_keys": 5,
    }
    result.shown_facts = (
        "latency_from",
        "live_records",
        "replay_records",
        "replay_records_per_s",
        "allowed_lateness_s",
        "batch_compute_s",
    )
    if live is not None:
        from qabuse_dagster.serving.stream_worker import StreamOptions

        floor = live["floor"]
        # Beside it, what waiting for each minute's final row would cost the same records.
        result.facts["final_row_floor_ms"] = floor
        result.notes.append(
            "decisions come from provisional rows, scored every "
            f"{StreamOptions().provisional_s:g} s while a minute is open; waiting for each "
            f"minute's final row would cost these records at least p50 "
            f"{floor['p50_ms'] / 1000:.1f} s, p99 {floor['p99_ms'] / 1000:.1f} s"
        )
    else:
        result.notes.append(
            "quick run: no live run (it waits for a minute boundary); the latency is the "
            "replay's, from records queued in the spool before the worker started"
        )
    busy = busy_machine_note(load_averages)
    if busy:
        result.notes.append(busy)
    if replay_stats["late_records"]:
        result.problems.append(f"{replay_stats['late_records']} replay records were late")
    result.problems += replay["problems"]
    return result

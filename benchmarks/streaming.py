"""Streaming window features: per-record update cost, and push-to-online freshness.

Update cost: `StreamingWindows.update` is timed record by record over the synthetic
telemetry of `benchmarks.feature_windows` (``generate_telemetry``, in time order),
with `StreamingWindows.advance` called after every chunk of records, as a consumer
would. The baseline is the batch path over the same records, `window_features` in
bulk, its wall time divided by the number of records: what a record costs when the
features are recomputed in bulk rather than kept up to date. The cross-check: the rows
the stream emitted equal the batch rows (same keys and instants, features within 1e-9).

Freshness: in a scratch ``QABUSE_HOME`` with the Feast repo applied, each round feeds a
minute of records for a few dozen keys, then the record that moves the watermark past
the minute; the clock runs from that record's `update` through `advance`, `push_online`
and a `get_online_features` that returns the new row. ``allowed_lateness`` is 0 here:
a deployment adds its lateness bound (event time) on top of these figures.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console

from benchmarks.feature_windows import DATA_START, generate_telemetry
from benchmarks.report import (
    BenchmarkResult,
    busy_machine_note,
    comparison,
    load_average,
    progress_display,
)

NAME = "streaming"
BASELINE = "window_features (batch, numpy) over the same records, wall time per record"
TOLERANCE = 1e-9


@dataclass(frozen=True)
class Settings:
    """Sizes of one streaming benchmark run."""

    records: int = 1_000_000
    api_keys: int = 500
    days: float = 7.0
    seed: int = 7
    #: Records between two `advance` calls.
    chunk: int = 10_000
    pushes: int = 40
    push_keys: int = 50


def measure_updates(table: pa.Table, chunk: int) -> dict[str, Any]:
    """Feed ``table`` record by record; time each update and each advance."""
    from qabuse_dagster.features.streaming import StreamingWindows, StreamRecord

    stream = StreamingWindows(allowed_lateness=timedelta(seconds=30))
    # The fields the table has (the synthetic telemetry has no job ids; absent ones default).
    fields = [f for f in StreamRecord._fields if f in table.column_names]
    update_ns: list[int] = []
    advance_ns = 0
    parts = []
    clock = time.perf_counter_ns
    started = time.perf_counter()
    for offset in range(0, table.num_rows, chunk):
        piece = table.slice(offset, chunk)
        records = [
            StreamRecord(**dict(zip(fields, values, strict=True)))
            for values in zip(*(piece[f].to_pylist() for f in fields), strict=True)
        ]
        for record in records:
            t0 = clock()
            stream.update(record)
            update_ns.append(clock() - t0)
        t0 = clock()
        parts.append(stream.advance())
        advance_ns += clock() - t0
    t0 = clock()
    parts.append(stream.flush())
    advance_ns += clock() - t0
    wall_s = time.perf_counter() - started
    # What the two clock reads cost on their own, so the reader can subtract it.
    overhead = []
    for _ in range(10_000):
        t0 = clock()
        overhead.append(clock() - t0)
    samples = np.asarray(update_ns, dtype=np.float64) / 1e3
    rows = pa.concat_tables(parts)
    return {
        "rows": rows,
        "median_us": float(np.median(samples)),
        "p99_us": float(np.percentile(samples, 99)),
        "mean_us": float(samples.mean()),
        "max_us": float(samples.max()),
        "advance_s": advance_ns / 1e9,
        "advance_us_per_row": advance_ns / 1e3 / max(rows.num_rows, 1),
        "wall_s": wall_s,
        "timer_overhead_us": float(np.median(overhead)) / 1e3,
        "late_records": stream.late_records,
    }


def cross_check(ours: pa.Table, batch: pa.Table) -> dict[str, Any]:
    """Whether the streamed rows are the batch rows; the largest difference per feature."""
    from qabuse_dagster.features.windows import ENTITY_COLUMN, FEATURE_NAMES, TIMESTAMP_COLUMN

    same_rows = ours.num_rows == batch.num_rows and all(
        ours[c].equals(batch[c]) for c in (ENTITY_COLUMN, TIMESTAMP_COLUMN)
    )
    diffs: dict[str, float] = {}
    if same_rows:
        for name in FEATURE_NAMES:
            delta = pc.abs(pc.subtract(ours[name].cast(pa.float64()), batch[name]))
            diffs[name] = float(pc.max(delta).as_py() or 0.0)
    return {
        "rows_ours": ours.num_rows,
        "rows_batch": batch.num_rows,
        "same_rows": same_rows,
        "max_abs_diff": diffs,
    }


def measure_freshness(pushes: int, keys: int) -> dict[str, Any]:
    """Milliseconds from the record that closes a minute to its row read back online."""
    from qabuse_dagster import settings
    from qabuse_dagster.features import store as feast_ops
    from qabuse_dagster.features.push import push_online
    from qabuse_dagster.features.streaming import StreamingWindows, StreamRecord

    saved = {name: os.environ.get(name) for name in (settings.HOME_ENV, "FEAST_USAGE")}
    with tempfile.TemporaryDirectory(prefix="qabuse-bench-home-") as home:
        os.environ[settings.HOME_ENV] = home
        os.environ["FEAST_USAGE"] = "False"
        try:
            store = feast_ops.open_store()
            started = time.perf_counter()
            feast_ops.apply_repo(store)
            apply_s = time.perf_counter() - started
            service = feast_ops.feature_service(store)
            stream = StreamingWindows(allowed_lateness=timedelta(0))
            names = [f"bench-key-{i:03d}" for i in range(keys)]
            probe = names[0]
            latencies_ms, rows_pushed = [], 0
            stages_ms: dict[str, list[float]] = {"advance": [], "push": [], "read": []}
            for round_ in range(pushes + 1):
                minute = DATA_START + timedelta(minutes=round_)
                # A different count every minute, so the probe's new row is recognisable.
                for i in range(1 + round_ % 7):
                    for name in names:
                        at = minute + timedelta(seconds=1 + i)
                        stream.update(StreamRecord(name, at, "submitted", 100, "c1"))
                closing = StreamRecord(probe, minute + timedelta(minutes=1), "queued", None, None)
                t0 = time.perf_counter()
                stream.update(closing)
                rows = stream.advance()
                t1 = time.perf_counter()
                rows_pushed += push_online(store, rows)
                t2 = time.perf_counter()
                (vector,) = feast_ops.online_features(store, [probe], service)
                t3 = time.perf_counter()
                elapsed_ms = (t3 - t0) * 1e3
                if vector["submissions_1m"] != 1 + round_ % 7:
                    raise AssertionError(f"round {round_}: online row is not the pushed one")
                if round_:  # the first round opens the online store's connection
                    latencies_ms.append(elapsed_ms)
                    for stage, ms in zip(stages_ms, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                        stages_ms[stage].append(ms * 1e3)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return {
        "freshness_ms_median": statistics.median(latencies_ms),
        "freshness_ms_p95": float(np.percentile(latencies_ms, 95)),
        "freshness_ms_max": max(latencies_ms),
        "freshness_stage_ms_median": {k: statistics.median(v) for k, v in stages_ms.items()},
        "pushes": len(latencies_ms),
        "rows_pushed": rows_pushed,
        "push_keys": keys,
        "feast_apply_s": apply_s,
    }


def run(settings: Settings, console: Console) -> BenchmarkResult:
    """Generate records, time the stream and the batch over them, check, then freshness."""
    from qabuse_dagster.features.windows import window_features

    result = BenchmarkResult(name=NAME, title="Streaming window features", baseline=BASELINE)
    load_averages = [load_average()]
    # Feast's repo parser and the online store log at INFO; keep the table readable.
    logging.getLogger("feast").setLevel(logging.WARNING)
    with progress_display(console, bar=False) as progress:
        step = progress.add_task(f"generating {settings.records:,} records", total=1)
        table = generate_telemetry(
            settings.records, settings.api_keys, settings.days, settings.seed
        )
        progress.update(step, completed=1)
        step = progress.add_task("ours: StreamingWindows.update, record by record", total=1)
        ours = measure_updates(table, settings.chunk)
        progress.update(step, completed=1)
        step = progress.add_task("baseline: window_features over the same records", total=1)
        started = time.perf_counter()
        batch = window_features(
            table, DATA_START - timedelta(minutes=1), DATA_START + timedelta(days=settings.days + 1)
        )
        batch_s = time.perf_counter() - started
        progress.update(step, completed=1)
        step = progress.add_task(f"freshness: {settings.pushes} pushes", total=1)
        fresh = measure_freshness(settings.pushes, settings.push_keys)
        progress.update(step, completed=1)
    load_averages.append(load_average())

    n = table.num_rows
    batch_us = batch_s / n * 1e6
    batch_us_per_row = batch_s / max(batch.num_rows, 1) * 1e6
    check = cross_check(ours.pop("rows"), batch)
    result.comparisons = [
        comparison(
            "update cost (median)", "µs/record", ours["median_us"], batch_us, higher_is_better=False
        ),
        comparison(
            "update cost (p99)", "µs/record", ours["p99_us"], batch_us, higher_is_better=False
        ),
        # Emitting: `advance` (rows made final, as a table) per row, against what a batch
        # run spends per row it writes.
        comparison(
            "emit cost (advance)",
            "µs/row",
            ours["advance_us_per_row"],
            batch_us_per_row,
            higher_is_better=False,
        ),
    ]
    result.facts = {
        "records": n,
        "api_keys": settings.api_keys,
        "days": settings.days,
        "seed": settings.seed,
        "update_us": {k: ours[k] for k in ("median_us", "p99_us", "mean_us", "max_us")},
        "update_median_us": ours["median_us"],
        "update_p99_us": ours["p99_us"],
        "timer_overhead_us": ours["timer_overhead_us"],
        "advance_us_per_row": ours["advance_us_per_row"],
        "stream_wall_s": ours["wall_s"],
        "batch_wall_s": batch_s,
        "batch_us_per_record": batch_us,
        "batch_us_per_row": batch_us_per_row,
        **fresh,
        **check,
        "tolerance": TOLERANCE,
    }
    result.shown_facts = (
        "records",
        "update_median_us",
        "update_p99_us",
        "advance_us_per_row",
        "freshness_ms_median",
        "freshness_ms_p95",
        "pushes",
    )
    busy = busy_machine_note(load_averages)
    if busy:
        result.notes.append(busy)
    result.notes.append(
        "baseline is bulk recomputation, not a per-record update: the ratio says how "
        "a record's incremental cost compares with its share of a full batch run"
    )
    if ours["late_records"]:
        result.problems.append(f"{ours['late_records']} records were late in a sorted replay")
    if not check["same_rows"]:
        result.problems.append(
            f"streamed rows ({check['rows_ours']}) are not the batch rows ({check['rows_batch']})"
        )
    for name, diff in check["max_abs_diff"].items():
        if not diff <= TOLERANCE:
            result.problems.append(f"{name}: max abs difference {diff:.3g} > {TOLERANCE}")
    return result

"""Batch window features: `window_features` (numpy) against a pandas tutorial pipeline.

A third side, ``duckdb``, runs the DuckDB SQL engine that `window_features` replaced
(`benchmarks.duckdb_windows`), so the engine choice stays measured.

The baseline is what the reference tutorial does: per api key, ``resample("1min")`` the
submissions, then ``rolling(5)`` sums for the 5-minute features and a per-key z-score
``(x - rolling(60).mean()) / rolling(60).std()``. Both sides read the same Parquet file in
their own process, so each one's peak memory is its own; the parent then joins the two
outputs and checks that the features both compute agree.

Row alignment: the baseline's resample bucket labelled ``m`` covers ``[m, m + 1 min)``,
which is our row at ``event_timestamp = m + 1 min`` (our windows end just before the
row's instant). The baseline's z-score is the tutorial's (current minute included, sample
standard deviation, no floor, only minutes since the key's first record) and ours is not,
so the z-score is computed but not compared.

Run one side alone (what the harness does in a subprocess)::

    python -m benchmarks.feature_windows --side ours --data t.parquet --out o.parquet \\
        --result r.json --start 2026-11-02T00:00:00+00:00 --end 2026-11-09T00:05:00+00:00
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from benchmarks.report import (
    BenchmarkResult,
    busy_machine_note,
    comparison,
    load_average,
    peak_rss_bytes,
)

NAME = "feature_windows"
BASELINE = "pandas groupby + resample('1min') + rolling (tutorial)"

#: Features both sides compute with the same definition, checked row by row.
COMPARED_FEATURES = (
    "submissions_1m",
    "mean_shots_1m",
    "fail_rate_1m",
    "submissions_per_min_5m",
    "mean_shots_5m",
    "fail_rate_5m",
)
#: Both sides count the same records and divide the same sums; only rounding may differ.
TOLERANCE = 1e-9

DATA_START = datetime(2026, 11, 2, tzinfo=UTC)
STATUSES = ("submitted", "completed", "failed", "rejected")
STATUS_PROBABILITIES = (0.48, 0.40, 0.07, 0.05)
SHOTS = np.array([100, 256, 1000, 1024, 2048, 4000, 4096, 8192], dtype=np.int64)
_REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Settings:
    """Sizes and repeats of one feature-window benchmark run."""

    records: int = 1_000_000
    api_keys: int = 500
    days: float = 7.0
    seed: int = 7
    repeats_ours: int = 3
    repeats_baseline: int = 3
    #: A side starts no further repeat once its runs so far plus one more would pass this
    #: many seconds, so a side that takes minutes runs once and a full run stays short.
    repeat_budget_s: float = 60.0
    #: Records of the scale run, ours alone (0 skips it): does it fit, how does it scale.
    scale_records: int = 10_000_000


def generate_telemetry(records: int, api_keys: int, days: float, seed: int) -> pa.Table:
    """Synthetic raw telemetry, built columnar with numpy.

    Each key is a Poisson process over ``days`` with a log-normally spread rate (a few
    keys are much busier than most); statuses are drawn independently with
    ``STATUS_PROBABILITIES``; each key submits one to four distinct circuits.

    Args:
        records: Total number of records.
        api_keys: Number of distinct api keys.
        days: Length of the span, starting at ``DATA_START``.
        seed: Seed for every random draw.

    Returns:
        A table with ``api_key_id``, ``timestamp`` (``timestamp[us, tz=UTC]``), ``status``,
        ``shots`` and ``code_hash``, sorted by time.
    """
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(mean=0.0, sigma=1.0, size=api_keys)
    per_key = rng.multinomial(records, weights / weights.sum())
    key_index = np.repeat(np.arange(api_keys), per_key)
    # Given its count, a Poisson process's arrival times are uniform over the span.
    span_us = int(days * 86_400 * 1_000_000)
    start_us = int(DATA_START.timestamp() * 1_000_000)
    offsets_us = rng.integers(0, span_us, size=records, dtype=np.int64)
    order = np.argsort(offsets_us, kind="stable")
    key_index, offsets_us = key_index[order], offsets_us[order]

    key_names = pa.array([f"{i:016x}" for i in rng.integers(0, 2**63, size=api_keys)])
    hashes_per_key = rng.integers(1, 5, size=api_keys)
    first_hash = np.concatenate([[0], np.cumsum(hashes_per_key)[:-1]])
    hash_names = pa.array([f"{i:016x}" for i in rng.integers(0, 2**63, size=hashes_per_key.sum())])
    hash_index = first_hash[key_index] + rng.integers(0, hashes_per_key[key_index])
    status_index = rng.choice(len(STATUSES), size=records, p=STATUS_PROBABILITIES)

    return pa.table(
        {
            "api_key_id": key_names.take(pa.array(key_index)),
            "timestamp": pa.array(start_us + offsets_us, type=pa.timestamp("us", tz="UTC")),
            "status": pa.array(STATUSES).take(pa.array(status_index)),
            "shots": pa.array(rng.choice(SHOTS, size=records)),
            "code_hash": hash_names.take(pa.array(hash_index)),
        }
    )


def baseline_window_features(frame: Any) -> Any:
    """The tutorial's pandas pipeline: resample each key to minutes, then roll.

    Counting conventions match `qabuse_dagster.features.windows` (a submission is a
    ``submitted`` or ``rejected`` record, an outcome a ``completed``, ``failed``,
    ``cancelled`` or ``rejected`` one, a failure ``failed`` or ``rejected``; empty
    ratios are 0), so the features both define are comparable.

    Args:
        frame: Raw telemetry as ``pd.read_parquet`` returns it.

    Returns:
        One row per key and minute bucket between the key's first and last record,
        indexed by ``(api_key_id, timestamp)`` where ``timestamp`` is the bucket start.
    """
    frame = frame.assign(
        is_submission=frame["status"].isin(["submitted", "rejected"]),
        is_outcome=frame["status"].isin(["completed", "failed", "cancelled", "rejected"]),
        is_failure=frame["status"].isin(["failed", "rejected"]),
    )
    frame["submission_shots"] = frame["shots"].where(frame["is_submission"])
    columns = ["is_submission", "submission_shots", "is_outcome", "is_failure"]
    per_minute = (
        frame.set_index("timestamp")
        .groupby("api_key_id")[columns]
        .resample("1min")
        .agg(
            records=("is_submission", "size"),
            submissions_1m=("is_submission", "sum"),
            shots_sum=("submission_shots", "sum"),
            mean_shots_1m=("submission_shots", "mean"),
            outcomes=("is_outcome", "sum"),
            failures=("is_failure", "sum"),
        )
    )
    per_minute["mean_shots_1m"] = per_minute["mean_shots_1m"].fillna(0.0)
    per_minute["fail_rate_1m"] = (per_minute["failures"] / per_minute["outcomes"]).fillna(0.0)

    sums = ["records", "submissions_1m", "shots_sum", "outcomes", "failures"]
    rolled = (
        per_minute.groupby(level="api_key_id")[sums].rolling(5, min_periods=1).sum().droplevel(0)
    )
    per_minute["records_5m"] = rolled["records"]
    per_minute["submissions_per_min_5m"] = rolled["submissions_1m"] / 5
    per_minute["mean_shots_5m"] = (rolled["shots_sum"] / rolled["submissions_1m"]).fillna(0.0)
    per_minute["fail_rate_5m"] = (rolled["failures"] / rolled["outcomes"]).fillna(0.0)

    history = per_minute.groupby(level="api_key_id")["submissions_1m"].rolling(60)
    mean_60 = history.mean().droplevel(0)
    std_60 = history.std().droplevel(0)
    per_minute["submissions_1m_zscore"] = (per_minute["submissions_1m"] - mean_60) / std_60
    return per_minute.drop(columns=["shots_sum", "outcomes", "failures"])


def _run_side(
    side: str, data: Path, out: Path, repeats: int, budget_s: float, start: datetime, end: datetime
) -> dict:
    """Load ``data``, compute up to ``repeats`` times, write the output; return measurements."""
    load_average_start = load_average()
    # Each side imports only what it needs, before the clock starts. Both read Parquet
    # through pyarrow.dataset, whose first import takes about half a second.
    import pyarrow.dataset  # noqa: F401

    if side == "ours":
        from qabuse_dagster.features.windows import window_features
    elif side == "duckdb":
        from benchmarks.duckdb_windows import duckdb_window_features as window_features
    else:
        import pandas as pd
    load_started = time.perf_counter()
    if side in ("ours", "duckdb"):
        table = pq.read_table(data)
    else:
        frame = pd.read_parquet(data)
    load_s = time.perf_counter() - load_started
    rss_after_load = peak_rss_bytes()

    times: list[float] = []
    result: Any = None
    for _ in range(repeats):
        result = None  # so one repeat's output is freed before the next is built
        started = time.perf_counter()
        if side in ("ours", "duckdb"):
            result = window_features(table, start, end)
        else:
            result = baseline_window_features(frame)
        times.append(time.perf_counter() - started)
        if sum(times) + times[-1] > budget_s:
            break
    peak = peak_rss_bytes()

    if side in ("ours", "duckdb"):
        rows = result.num_rows
        pq.write_table(result, out)
    else:
        rows = len(result)
        result.reset_index().to_parquet(out, index=False)
    return {
        "side": side,
        "load_s": load_s,
        "times_s": times,
        "best_s": min(times),
        "rows": rows,
        "peak_rss_after_load_bytes": rss_after_load,
        "peak_rss_bytes": peak,
        "load_average_1m": [load_average_start, load_average()],
    }


def _measure(
    side: str,
    data: Path,
    workdir: Path,
    repeats: int,
    budget_s: float,
    span: tuple[datetime, datetime],
) -> dict:
    """Run one side in a fresh interpreter, so its peak memory is its own."""
    out, result = workdir / f"{side}.parquet", workdir / f"{side}.json"
    options = {
        "--side": side,
        "--data": data,
        "--out": out,
        "--result": result,
        "--repeats": repeats,
        "--repeat-budget": budget_s,
        "--start": span[0].isoformat(),
        "--end": span[1].isoformat(),
    }
    command = [sys.executable, "-m", "benchmarks.feature_windows"]
    command += [str(part) for option in options.items() for part in option]
    # ``-m`` puts the working directory on sys.path, so the worker imports this package.
    done = subprocess.run(command, cwd=_REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{side} worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    measured = json.loads(result.read_text(encoding="utf-8"))
    measured["output"] = str(out)
    return measured


def cross_check(ours: Path, baseline: Path) -> dict[str, Any]:
    """Join both outputs on (key, row instant) and compare the shared features.

    Returns:
        ``overlap_rows``; per feature the max absolute difference and the count of rows
        differing by more than `TOLERANCE` (NaN or null counts as differing); rows the
        baseline has with records in their 5-minute window that ours lacks; rows ours has
        inside a key's baseline span that the baseline lacks; one differing row per
        feature, when any.
    """
    import duckdb

    diffs = ",\n".join(
        f"max(abs(o.{f} - b.{f})) AS max_diff_{f}, "
        f"count(*) FILTER (WHERE NOT coalesce(abs(o.{f} - b.{f}) <= {TOLERANCE!r}, false)) "
        f"AS mismatches_{f}"
        for f in COMPARED_FEATURES
    )
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"CREATE VIEW o AS SELECT * FROM read_parquet('{ours}')")
        con.execute(
            'CREATE VIEW b AS SELECT *, "timestamp" + INTERVAL 1 MINUTE AS event_timestamp '
            f"FROM read_parquet('{baseline}')"
        )
        summary = _one_row(
            con,
            f"SELECT count(*) AS overlap_rows, {diffs} "
            "FROM o JOIN b USING (api_key_id, event_timestamp)",
        )
        summary |= _one_row(
            con,
            "SELECT count(*) AS baseline_rows_with_activity_missing_from_ours "
            "FROM b ANTI JOIN o USING (api_key_id, event_timestamp) WHERE b.records_5m > 0",
        )
        summary |= _one_row(
            con,
            "WITH span AS (SELECT api_key_id, min(event_timestamp) AS lo, "
            "max(event_timestamp) AS hi FROM b GROUP BY ALL) "
            "SELECT count(*) AS ours_rows_inside_baseline_span_missing_from_baseline "
            "FROM o JOIN span USING (api_key_id) "
            "ANTI JOIN b USING (api_key_id, event_timestamp) "
            "WHERE o.event_timestamp BETWEEN span.lo AND span.hi",
        )
        summary["examples"] = {
            f: _one_row(
                con,
                f"SELECT o.api_key_id, o.event_timestamp::VARCHAR AS event_timestamp, "
                f"o.{f} AS ours, b.{f} AS baseline "
                "FROM o JOIN b USING (api_key_id, event_timestamp) "
                f"WHERE NOT coalesce(abs(o.{f} - b.{f}) <= {TOLERANCE!r}, false) "
                "ORDER BY o.event_timestamp, o.api_key_id LIMIT 1",
            )
            for f in COMPARED_FEATURES
            if summary[f"mismatches_{f}"]
        }
    return summary


def _one_row(con: Any, sql: str) -> dict[str, Any]:
    cursor = con.execute(sql)
    names = [d[0] for d in cursor.description]
    return dict(zip(names, cursor.fetchone() or (), strict=True))


def run(settings: Settings, console: Console) -> BenchmarkResult:
    """Generate data, measure both sides in their own processes, cross-check, report."""
    result = BenchmarkResult(name=NAME, title="Batch window features", baseline=BASELINE)
    span_start = DATA_START
    # Rows continue 5 minutes past the last record, while its 5-minute window holds it.
    span_end = DATA_START + timedelta(days=settings.days, minutes=5)
    with (
        tempfile.TemporaryDirectory(prefix="qabuse-bench-") as tmp,
        Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress,
    ):
        workdir = Path(tmp)
        data = workdir / "telemetry.parquet"
        step = progress.add_task(f"generating {settings.records:,} records", total=1)
        table = generate_telemetry(
            settings.records, settings.api_keys, settings.days, settings.seed
        )
        pq.write_table(table, data)
        parquet_bytes = data.stat().st_size
        del table
        progress.update(step, completed=1)

        sides = {}
        for side, repeats in (
            ("ours", settings.repeats_ours),
            ("duckdb", settings.repeats_ours),
            ("baseline", settings.repeats_baseline),
        ):
            step = progress.add_task(
                f"{side}: load + up to {repeats} run(s) in a fresh process", total=1
            )
            sides[side] = _measure(
                side, data, workdir, repeats, settings.repeat_budget_s, (span_start, span_end)
            )
            progress.update(step, completed=1)

        step = progress.add_task("cross-checking the shared features", total=1)
        check = cross_check(Path(sides["ours"]["output"]), Path(sides["baseline"]["output"]))
        progress.update(step, completed=1)

        scale = None
        if settings.scale_records:
            step = progress.add_task(
                f"scale: {settings.scale_records:,} records, ours alone, one run", total=1
            )
            big = generate_telemetry(
                settings.scale_records, settings.api_keys, settings.days, settings.seed
            )
            pq.write_table(big, data)
            del big
            scale = _measure("ours", data, workdir, 1, 0.0, (span_start, span_end))
            progress.update(step, completed=1)

    ours, base, sql = sides["ours"], sides["baseline"], sides["duckdb"]
    mib = 1024 * 1024
    result.comparisons = [
        comparison(
            "compute time (best)", "s", ours["best_s"], base["best_s"], higher_is_better=False
        ),
        comparison(
            "load + compute time",
            "s",
            ours["load_s"] + ours["best_s"],
            base["load_s"] + base["best_s"],
            higher_is_better=False,
        ),
        comparison(
            "peak RSS",
            "MiB",
            ours["peak_rss_bytes"] / mib,
            base["peak_rss_bytes"] / mib,
            higher_is_better=False,
        ),
        comparison(
            "peak RSS above loaded data",
            "MiB",
            (ours["peak_rss_bytes"] - ours["peak_rss_after_load_bytes"]) / mib,
            (base["peak_rss_bytes"] - base["peak_rss_after_load_bytes"]) / mib,
            higher_is_better=False,
        ),
        # The engine choice: against the DuckDB SQL it replaced, same data, same rows.
        comparison(
            "compute time vs DuckDB SQL engine (baseline column = DuckDB)",
            "s",
            ours["best_s"],
            sql["best_s"],
            higher_is_better=False,
        ),
        comparison(
            "peak RSS vs DuckDB SQL engine (baseline column = DuckDB)",
            "MiB",
            ours["peak_rss_bytes"] / mib,
            sql["peak_rss_bytes"] / mib,
            higher_is_better=False,
        ),
    ]
    if scale is not None:
        # Per-record cost at scale against the 1M run's: below 1 means superlinear.
        result.comparisons.append(
            comparison(
                f"µs per record at {settings.scale_records:,} records "
                f"(baseline column = ours at {settings.records:,})",
                "µs",
                scale["best_s"] / settings.scale_records * 1e6,
                ours["best_s"] / settings.records * 1e6,
                higher_is_better=False,
            )
        )
    max_abs_diff = {f: check[f"max_diff_{f}"] for f in COMPARED_FEATURES}
    result.facts = {
        "records": settings.records,
        "api_keys": settings.api_keys,
        "days": settings.days,
        "seed": settings.seed,
        "parquet_bytes": parquet_bytes,
        "rows_ours": ours["rows"],
        "rows_baseline": base["rows"],
        "overlap_rows": check["overlap_rows"],
        "max_abs_diff_overall": _max_or_nan(max_abs_diff.values()),
        "speedup": result.comparisons[0].ratio,
        "peak_rss_ratio_baseline_over_ours": result.comparisons[2].ratio,
        "max_abs_diff": max_abs_diff,
        "tolerance": TOLERANCE,
        "compared_features": list(COMPARED_FEATURES),
        "not_compared": {
            "submissions_1m_zscore": "tutorial z-score includes the current minute, uses the "
            "sample std without a floor and only minutes since the key's first record",
            "distinct_code_hashes_1m/5m": "not computed by the tutorial pipeline",
        },
        "cross_check": {k: v for k, v in check.items() if not k.startswith("max_diff_")},
        "ours": {k: v for k, v in ours.items() if k != "output"},
        "baseline_run": {k: v for k, v in base.items() if k != "output"},
        "duckdb_run": {k: v for k, v in sql.items() if k != "output"},
        "scale_run": None
        if scale is None
        else {"records": settings.scale_records}
        | {k: v for k, v in scale.items() if k != "output"},
        "speedup_over_duckdb_sql": result.comparisons[4].ratio,
        "repeats": {
            "ours": len(ours["times_s"]),
            "baseline": len(base["times_s"]),
            "asked": {"ours": settings.repeats_ours, "baseline": settings.repeats_baseline},
            "budget_s": settings.repeat_budget_s,
        },
    }
    result.shown_facts = (
        "records",
        "api_keys",
        "days",
        "rows_ours",
        "rows_baseline",
        "overlap_rows",
        "max_abs_diff_overall",
    )
    if scale is not None:
        result.notes.append(
            f"scale run, ours alone: {settings.scale_records:,} records -> {scale['rows']:,} rows "
            f"in {scale['best_s']:.1f} s, peak RSS {scale['peak_rss_bytes'] / mib:,.0f} MiB"
        )
    result.notes.append(
        f"timed runs (best reported): ours {len(ours['times_s'])}, baseline {len(base['times_s'])}"
    )
    busy = busy_machine_note(ours["load_average_1m"] + base["load_average_1m"])
    if busy:
        result.notes.append(busy)
    result.problems = _problems(check)
    return result


def _max_or_nan(values: Any) -> float:
    values = [v for v in values if v is not None]
    return max(values) if values and not any(math.isnan(v) for v in values) else float("nan")


def _problems(check: dict[str, Any]) -> list[str]:
    problems = []
    if not check["overlap_rows"]:
        problems.append("no overlapping rows between ours and the baseline")
    for f in COMPARED_FEATURES:
        if check[f"mismatches_{f}"]:
            problems.append(
                f"{f}: {check[f'mismatches_{f}']:,} rows differ by more than {TOLERANCE} "
                f"(max {check[f'max_diff_{f}']}); first: {check['examples'][f]}"
            )
    if check["baseline_rows_with_activity_missing_from_ours"]:
        problems.append(
            f"{check['baseline_rows_with_activity_missing_from_ours']:,} baseline rows with "
            "records in their 5-minute window have no row in ours"
        )
    if check["ours_rows_inside_baseline_span_missing_from_baseline"]:
        problems.append(
            f"{check['ours_rows_inside_baseline_span_missing_from_baseline']:,} rows of ours "
            "fall inside a key's baseline span but have no baseline row"
        )
    return problems


def main(argv: list[str] | None = None) -> None:
    """Worker entry point: measure one side and write its measurements as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=("ours", "duckdb", "baseline"), required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--repeat-budget", type=float, default=float("inf"))
    parser.add_argument("--start", type=datetime.fromisoformat, required=True)
    parser.add_argument("--end", type=datetime.fromisoformat, required=True)
    args = parser.parse_args(argv)
    measured = _run_side(
        args.side, args.data, args.out, args.repeats, args.repeat_budget, args.start, args.end
    )
    args.result.write_text(json.dumps(measured), encoding="utf-8")


if __name__ == "__main__":
    main()

"""Batch window features: `window_features` (numpy) against a pandas tutorial pipeline.

Both sides compute api-key rows from the same synthetic week (`generate_telemetry`: every
column the features read, nulls included) through the 1-minute, 5-minute and hour
windows. Ours computes all the features of `qabuse_dagster.features.definitions`; the
baseline (`baseline_window_features`) is what the reference tutorial does, per api key
``resample("1min")`` then ``rolling(5)`` / ``rolling(60)``, with ``groupby(...).apply``
for distinct counts and medians, and computes the `BASELINE_FEATURES` (all but the
cross-entity and 24-hour-history ones, `NOT_IN_BASELINE`). The ratio therefore favours
the baseline: ours does more. Ours also runs for the ``user`` entity, in its own process,
reported as a note (the baseline has no user side).

A third side, ``duckdb``, runs the DuckDB SQL engine that `window_features` replaced
(`benchmarks.duckdb_windows`); it computes only the first feature set's 9 features.

Each side reads the same Parquet file in its own process, so its peak memory is its
own; the parent then joins ours and the baseline on (api key, row instant) and checks
every shared feature row by row (`TOLERANCE`). The baseline labels its resample bucket
``[m, m + 1 min)`` with ``m + 1 min``, which is our row at that ``event_timestamp`` (our
windows end just before the row's instant); it has a row for every minute between a
key's first and last record, ours for every minute whose 5-minute window holds a record,
so only the rows both have are compared, and the check fails if either lacks a row it
should have.

Run one side alone (what the harness does in a subprocess)::

    python -m benchmarks.feature_windows --side ours --entity user --data t.parquet \
        --out o.parquet --result r.json \
        --start 2026-11-02T00:00:00+00:00 --end 2026-11-09T00:05:00+00:00
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

from benchmarks.report import (
    BenchmarkResult,
    busy_machine_note,
    comparison,
    load_average,
    peak_rss_bytes,
    progress_display,
)
from qabuse_dagster.features.definitions import (
    COST_SCALE,
    FEATURE_NAMES,
    WINDOWS,
    ZSCORE_STD_FLOOR,
    backend_cost_weight,
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
STATUSES = ("submitted", "completed", "failed", "cancelled", "rejected")
STATUS_PROBABILITIES = (0.46, 0.40, 0.06, 0.02, 0.06)
SHOTS = np.array([100, 256, 1000, 1024, 2048, 4000, 4096, 8192], dtype=np.int64)
#: Hardware and simulators (a simulator's shot weighs 1/100 of hardware's in the estimated
#: cost, `backend_cost_weight`).
BACKENDS = (
    "ibm_torino",
    "ibm_fez",
    "ibm_kingston",
    "ibm_brisbane",
    "willow_pink",
    "rainbow",
    "ionq_forte",
    "rigetti_ankaa_3",
    "sv1",
    "aer_simulator",
    "default.qubit",
)
CLIENT_AGENTS = tuple(
    f"qabuse-{sdk}/0.1.0 {sdk}/{version}"
    for sdk, versions in (
        ("qiskit", ("2.5.0", "2.6.1", "2.6.2")),
        ("cirq", ("1.5.0", "1.6.1")),
        ("pennylane", ("0.41.1", "0.42.0")),
    )
    for version in versions
)
FAILURE_CODES = ("timeout", "invalid_circuit", "backend_error")
REJECTION_CODES = ("rate_limited", "auth_failed", "quota_exceeded")
REJECTION_CODE_PROBABILITIES = (0.5, 0.4, 0.1)
#: Shares of null values: analytic (statevector) jobs have no shots; some records lack a
#: transpiled depth, a source network, or (completed) a runtime.
NULL_SHARE = {"shots": 0.04, "depth": 0.05, "source_ip_hash": 0.03, "runtime_s": 0.01}
#: Circuits many keys submit (tutorial and benchmark circuits), and the share of
#: records that submit one of them rather than one of the key's own scripts.
SHARED_CODE_HASHES = 20
SHARED_CODE_SHARE = 0.05
_REPO_ROOT = Path(__file__).resolve().parents[1]

#: Statuses that count, as in `qabuse_dagster.features.definitions`.
SUBMISSION_STATUSES = ("submitted", "rejected")
OUTCOME_STATUSES = ("completed", "failed", "cancelled", "rejected")
FAILURE_STATUSES = ("failed", "rejected")
#: Distinct-count features: the submissions' column -> the feature's stem.
DISTINCT_COLUMNS = {
    "code_hash": "distinct_code_hashes",
    "source_ip_hash": "distinct_networks",
    "client_agent": "distinct_client_agents",
}
#: Features the pandas pipeline leaves out, and why: both need every entity's records at
#: once (not one key's resampled minutes), or a history the tutorial does not keep.
NOT_IN_BASELINE = {
    "backend_load_at_submit": "needs every key's submissions per backend and minute",
    "code_hash_sharing": "needs every key's code hashes over the hour",
    "submissions_per_min_p95_1h": "a percentile of idle-included minutes before a key's first "
    "record, which the per-key resample does not hold",
    "hours_since_first_seen_24h": "a 24-hour activity history, not a window aggregate",
    "gap_before_latest_activity_min": "a 24-hour activity history, not a window aggregate",
    "interarrival_cv_1h": "needs each submission's instant, not per-minute counts",
    "interarrival_regularity_1h": "needs each submission's instant, not per-minute counts",
    "interarrival_regularity_24h": "each submission's instant over 24 hours",
    "active_hours_24h": "a 24-hour history, not a window aggregate",
    "submissions_24h": "a 24-hour history, not a window aggregate",
    "estimated_cost_24h": "a 24-hour history, not a window aggregate",
    "submissions_1h_vs_24h": "a 24-hour history, not a window aggregate",
    "cost_1h_vs_24h": "a 24-hour history, not a window aggregate",
    "network_auth_failure_entities_1h": "needs every key's auth failures per network",
}
#: The features the pandas pipeline computes (all others of `FEATURE_NAMES`), compared
#: row by row with ours.
BASELINE_FEATURES = tuple(
    name for name in FEATURE_NAMES if not any(name.startswith(s) for s in NOT_IN_BASELINE)
)
#: Both sides count the same records and divide the same integer sums (runtimes are
#: picked, not summed), so only rounding may differ: a value agrees when
#: ``|ours - baseline| <= TOLERANCE * max(1, |baseline|)`` (absolute below 1, relative
#: above, for the large estimated costs).
TOLERANCE = 1e-9


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
    """Synthetic raw telemetry with every column the window features read, built with numpy.

    Each key is a Poisson process over ``days`` with a log-normally spread rate (a few
    keys are much busier than most). A key belongs to one to three users (drawn from a
    pool of ``0.6 x api_keys``, so some users hold several keys) and has its own one or
    two backends (hardware or simulators), one or two client agents, one to three source
    networks and one to eight scripts (code hashes); ``SHARED_CODE_SHARE`` of the records
    submit one of ``SHARED_CODE_HASHES`` circuits many keys share. Statuses are drawn
    independently with ``STATUS_PROBABILITIES``; ``runtime_s`` is set on completed
    records, ``error_code`` on failed (``FAILURE_CODES``) and rejected ones
    (``REJECTION_CODES``, ``auth_failed`` among them); ``NULL_SHARE`` of the shots,
    depths, networks and runtimes are null.

    Args:
        records: Total number of records.
        api_keys: Number of distinct api keys.
        days: Length of the span, starting at ``DATA_START``.
        seed: Seed for every random draw.

    Returns:
        A table sorted by time with ``api_key_id``, ``user``, ``timestamp``
        (``timestamp[us, tz=UTC]``), ``status``, ``backend``, ``num_circuits``, ``shots``,
        ``depth``, ``runtime_s``, ``error_code``, ``client_agent``, ``code_hash`` and
        ``source_ip_hash``, typed as in the telemetry contract.
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

    def hex_names(n: int) -> pa.Array:
        return pa.array([f"{i:016x}" for i in rng.integers(0, 2**63, size=n)])

    def per_key_pick(low: int, high: int, pool: int | None = None) -> np.ndarray:
        """Each key owns ``low..high`` items (new ones, or drawn from ``pool`` items);
        each record picks one of its key's, uniformly. Returns item numbers."""
        owned = rng.integers(low, high + 1, size=api_keys)
        first = np.concatenate([[0], np.cumsum(owned)[:-1]])
        items = np.arange(owned.sum()) if pool is None else rng.integers(0, pool, size=owned.sum())
        return items[first[key_index] + (rng.random(records) * owned[key_index]).astype(np.int64)]

    def nulls(column: str) -> np.ndarray:
        return rng.random(records) < NULL_SHARE[column]

    status_index = rng.choice(len(STATUSES), size=records, p=STATUS_PROBABILITIES)
    status = np.asarray(STATUSES)[status_index]
    key_names = hex_names(api_keys)
    n_users = max(1, api_keys * 3 // 5)
    user = per_key_pick(1, 3, pool=n_users)
    backend = per_key_pick(1, 2, pool=len(BACKENDS))
    agent = per_key_pick(1, 2, pool=len(CLIENT_AGENTS))
    network = per_key_pick(1, 3)
    script = per_key_pick(1, 8)
    shared = rng.random(records) < SHARED_CODE_SHARE
    code = np.where(shared, rng.integers(0, SHARED_CODE_HASHES, size=records), script + 20)
    n_scripts = int(script.max()) + 1 if records else 0
    code_names = hex_names(SHARED_CODE_HASHES + n_scripts)
    network_names = hex_names(int(network.max()) + 1 if records else 0)

    num_circuits = np.where(rng.random(records) < 0.7, 1, rng.integers(2, 11, size=records))
    depth = np.rint(np.exp(rng.uniform(np.log(5), np.log(300), size=records))).astype(np.int64)
    runtime = np.round(rng.lognormal(mean=np.log(4.0), sigma=1.0, size=records), 3)
    failure_code = rng.integers(0, len(FAILURE_CODES), size=records)
    rejection_code = rng.choice(len(REJECTION_CODES), size=records, p=REJECTION_CODE_PROBABILITIES)
    error_code = np.where(
        status == "failed",
        np.asarray(FAILURE_CODES, dtype=object)[failure_code],
        np.where(
            status == "rejected", np.asarray(REJECTION_CODES, dtype=object)[rejection_code], None
        ),
    )

    return pa.table(
        {
            "api_key_id": key_names.take(pa.array(key_index)),
            "user": hex_names(n_users).take(pa.array(user)),
            "timestamp": pa.array(start_us + offsets_us, type=pa.timestamp("us", tz="UTC")),
            "status": pa.array(STATUSES).take(pa.array(status_index)),
            "backend": pa.array(BACKENDS).take(pa.array(backend)),
            "num_circuits": pa.array(num_circuits, type=pa.int64()),
            "shots": pa.array(rng.choice(SHOTS, size=records), mask=nulls("shots")),
            "depth": pa.array(depth, mask=nulls("depth")),
            "runtime_s": pa.array(
                runtime, mask=(status != "completed") | nulls("runtime_s"), type=pa.float64()
            ),
            "error_code": pa.array(error_code, type=pa.string()),
            "client_agent": pa.array(CLIENT_AGENTS).take(pa.array(agent)),
            "code_hash": code_names.take(pa.array(code)),
            "source_ip_hash": network_names.take(pa.array(network, mask=nulls("source_ip_hash"))),
        }
    )


def baseline_window_features(frame: Any) -> Any:
    """The tutorial's pandas pipeline: resample each key to minutes, then roll.

    Per api key, ``resample("1min")`` the records into per-minute sums, counts and maxima
    (bucket ``[m, m + 1 min)`` labelled ``m + 1 min``, the row instant whose 1-minute
    window it is), then ``rolling(5)`` and ``rolling(60)`` over those minutes for the 5-
    minute and hour windows, and ``shift(W)`` for the window before. What does not add
    up minute by minute is done per key with ``groupby(...).apply``: distinct code
    hashes, networks and client agents by a one-hot table of the key's minutes and values
    (``groupby([minute, value]).size().unstack()``) rolled with ``max``; median runtimes
    by a time-based
    ``rolling("Wmin", closed="left").median()`` over the key's completed records with
    one empty probe row per minute boundary.

    Counting conventions are those of `qabuse_dagster.features.definitions` (what a
    submission, outcome, failure, auth failure, runtime and estimated cost are; empty
    ratios are 0), so every feature both define is comparable. The z-scores follow the
    definition too (the previous 59 minutes, idle ones as zeros, population standard
    deviation floored at 1) rather than a tutorial's ``rolling(60).std()``.

    Args:
        frame: Raw telemetry as ``pd.read_parquet`` returns it.

    Returns:
        One row per key and minute boundary between the key's first and last record,
        indexed by ``(api_key_id, event_timestamp)``, with ``records_5m`` (every record in
        the 5-minute window) and the `BASELINE_FEATURES`.
    """
    import pandas as pd

    status = frame["status"]
    submission = status.isin(SUBMISSION_STATUSES)
    minute = frame["timestamp"].dt.floor("1min")
    # In the definition's units (`backend_cost_weight` gives 1/COST_SCALE of a QPU
    # shot-layer, an integer), divided by COST_SCALE once summed, as `derive` does: sums
    # of integers stay exact through rolling's add-and-subtract.
    cost = (
        frame["shots"].fillna(1)  # analytic jobs count one shot
        * frame["num_circuits"].fillna(1)
        * frame["depth"].fillna(1)  # unknown depth counts 1
        * frame["backend"].map(backend_cost_weight)
    )
    frame = frame.assign(
        minute=minute,
        row=minute + pd.Timedelta(minutes=1),
        submissions=submission.astype("int64"),
        submission_shots=frame["shots"].where(submission),
        outcomes=status.isin(OUTCOME_STATUSES).astype("int64"),
        failures=status.isin(FAILURE_STATUSES).astype("int64"),
        rejected=status.eq("rejected").astype("int64"),
        auth_failures=frame["error_code"].eq("auth_failed").astype("int64"),
        cost=cost.where(status.eq("submitted"), 0.0),
    )
    inputs = ("submissions", "submission_shots", "outcomes", "failures", "rejected")
    inputs += ("auth_failures", "cost")
    sums = ["submissions", "shots_sum", "shots_n", "outcomes", "failures", "rejected"]
    sums += ["auth_failures", "cost", "records"]
    per_minute = (
        frame.set_index("timestamp")
        .groupby("api_key_id")[[*inputs]]
        .resample("1min", label="right")
        .agg(
            submissions=("submissions", "sum"),
            shots_sum=("submission_shots", "sum"),
            shots_n=("submission_shots", "count"),
            outcomes=("outcomes", "sum"),
            failures=("failures", "sum"),
            rejected=("rejected", "sum"),
            auth_failures=("auth_failures", "sum"),
            cost=("cost", "sum"),
            records=("submissions", "size"),
            shots_max=("submission_shots", "max"),
        )
    )
    per_minute.index = per_minute.index.set_names(["api_key_id", "event_timestamp"])
    rows = per_minute.index
    by_key = per_minute.groupby(level="api_key_id")

    def on_rows(rolled: Any) -> Any:
        """A per-key rolling result (keyed twice) on ``rows``, the very index object, so
        the arithmetic below never realigns 5 million rows."""
        rolled = rolled.droplevel(0)
        if not rolled.index.equals(rows):
            raise AssertionError("rolling changed the rows")
        return rolled.set_axis(rows)

    # Columns go in as arrays: every series below is positionally on ``rows``.
    out = pd.DataFrame(index=rows)

    def put(name: str, values: Any) -> None:
        out[name] = values.to_numpy()

    window_submissions = {}
    for suffix, w in WINDOWS.items():
        if w == 1:
            window = per_minute.assign(peak_submissions=per_minute["submissions"])
        else:
            window = on_rows(by_key[sums].rolling(w, min_periods=1).sum())
            maxima = on_rows(by_key[["shots_max", "submissions"]].rolling(w, min_periods=1).max())
            window["shots_max"] = maxima["shots_max"]
            window["peak_submissions"] = maxima["submissions"]
        previous = window.groupby(level="api_key_id")[["submissions", "outcomes", "failures"]]
        previous = previous.shift(w, fill_value=0)
        subs = window["submissions"]
        window_submissions[suffix] = subs.copy()  # not the whole window frame
        if w == 1:
            put("submissions_1m", subs)
        else:
            put(f"submissions_per_min_{suffix}", subs / w)
            if suffix == "5m":
                put("records_5m", window["records"])
        put(f"submission_rate_change_{suffix}", (subs - previous["submissions"]) / w)
        put(f"mean_shots_{suffix}", (window["shots_sum"] / window["shots_n"]).fillna(0.0))
        put(f"max_shots_{suffix}", window["shots_max"].fillna(0))
        fail_rate = (window["failures"] / window["outcomes"]).fillna(0.0)
        put(f"fail_rate_{suffix}", fail_rate)
        previous_rate = (previous["failures"] / previous["outcomes"]).fillna(0.0)
        put(f"fail_rate_change_{suffix}", fail_rate - previous_rate)
        put(f"rejected_{suffix}", window["rejected"])
        put(f"auth_failures_{suffix}", window["auth_failures"])
        put(f"estimated_cost_{suffix}", window["cost"] / COST_SCALE)
        if w > 1:
            put(f"burstiness_{suffix}", (window["peak_submissions"] * w / subs).fillna(0.0))
    del window, previous

    # Distinct values and medians do not add up minute by minute: per key, apply.
    grids = {key: key_rows.index.droplevel(0) for key, key_rows in by_key}

    def distinct_counts(group: pd.DataFrame) -> pd.DataFrame:
        grid = grids[group.name]
        counts = {}
        for column, stem in DISTINCT_COLUMNS.items():
            # One-hot: minutes x the key's values, 1 where the value was submitted.
            seen = group.groupby(["row", column]).size().unstack(fill_value=0)
            present = seen.reindex(grid, fill_value=0).gt(0).astype("float64")
            for suffix, w in WINDOWS.items():
                counts[f"{stem}_{suffix}"] = present.rolling(w, min_periods=1).max().sum(axis=1)
        return pd.DataFrame(counts, index=grid)

    def median_runtimes(group: pd.DataFrame) -> pd.DataFrame:
        grid = grids[group.name]
        records = pd.DataFrame(
            {"runtime_s": group["runtime_s"].to_numpy(), "probe": False}, index=group["minute"]
        )
        # An empty probe at each row instant t: the window [t - W, t) of its records.
        probes = pd.DataFrame({"runtime_s": np.nan, "probe": True}, index=grid)
        series = pd.concat([records, probes]).sort_index(kind="stable")
        at_probe = series["probe"].to_numpy()
        medians = {
            f"median_runtime_s_{suffix}": series["runtime_s"]
            .rolling(f"{w}min", closed="left")
            .median()
            .to_numpy()[at_probe]
            for suffix, w in WINDOWS.items()
        }
        return pd.DataFrame(medians, index=grid)

    submissions = frame.loc[submission, ["api_key_id", "row", *DISTINCT_COLUMNS]]
    distinct = submissions.groupby("api_key_id").apply(distinct_counts, include_groups=False)
    completed = frame.loc[
        status.eq("completed") & frame["runtime_s"].notna(), ["api_key_id", "minute", "runtime_s"]
    ]
    medians = completed.groupby("api_key_id").apply(median_runtimes, include_groups=False)
    for extra in (distinct, medians):
        extra = extra.reindex(rows).fillna(0.0).set_axis(rows)
        for column in extra.columns:
            put(column, extra[column])
    for suffix, subs in window_submissions.items():
        reused = (subs - out[f"distinct_code_hashes_{suffix}"]).clip(lower=0)
        put(f"circuit_reuse_fraction_{suffix}", (reused / subs).fillna(0.0))

    # The z-scores: the last minute against the previous 59 (minutes t-60 .. t-2).
    for feature, column in (
        ("submissions_1m_zscore", "submissions"),
        ("failures_1m_zscore", "failures"),
    ):
        history = by_key[column].shift(1, fill_value=0)
        by_history = history.groupby(level="api_key_id")
        mean = on_rows(by_history.rolling(59, min_periods=1).sum()) / 59.0
        squares = (history**2).groupby(level="api_key_id")
        meansq = on_rows(squares.rolling(59, min_periods=1).sum()) / 59.0
        std = np.sqrt((meansq - mean**2).clip(lower=0.0)).clip(lower=ZSCORE_STD_FLOOR)
        put(feature, (per_minute[column] - mean) / std)
    return out


def _run_side(
    side: str,
    data: Path,
    out: Path | None,
    repeats: int,
    budget_s: float,
    span: tuple[datetime, datetime],
    entity: str = "api_key_id",
) -> dict:
    """Load ``data``, compute up to ``repeats`` times, write the output; return measurements.

    ``entity`` is the entity column ours computes its rows for; the baseline and DuckDB
    sides compute api-key rows only.
    """
    load_average_start = load_average()
    # Each side imports only what it needs, before the clock starts. Both read Parquet
    # through pyarrow.dataset, whose first import takes about half a second.
    import pyarrow.dataset  # noqa: F401

    if side == "ours":
        from qabuse_dagster.features.windows import window_features

        def compute(table: pa.Table) -> pa.Table:
            return window_features(table, span[0], span[1], entity_column=entity)
    elif side == "duckdb":
        from benchmarks.duckdb_windows import duckdb_window_features

        def compute(table: pa.Table) -> pa.Table:
            return duckdb_window_features(table, span[0], span[1])
    else:
        import pandas as pd

        compute = baseline_window_features
    load_started = time.perf_counter()
    loaded = pd.read_parquet(data) if side == "baseline" else pq.read_table(data)
    load_s = time.perf_counter() - load_started
    rss_after_load = peak_rss_bytes()

    times: list[float] = []
    result: Any = None
    for _ in range(repeats):
        result = None  # so one repeat's output is freed before the next is built
        started = time.perf_counter()
        result = compute(loaded)
        times.append(time.perf_counter() - started)
        if sum(times) + times[-1] > budget_s:
            break
    peak = peak_rss_bytes()

    if side == "baseline":
        rows, columns = len(result), list(result.columns)
        if out is not None:
            result.reset_index().to_parquet(out, index=False)
    else:
        rows, columns = result.num_rows, result.column_names
        if out is not None:
            pq.write_table(result, out)
    return {
        "side": side,
        "entity": entity if side == "ours" else "api_key_id",
        "load_s": load_s,
        "times_s": times,
        "best_s": min(times),
        "rows": rows,
        "columns": len(columns),
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
    entity: str = "api_key_id",
    write_output: bool = True,
) -> dict:
    """Run one side in a fresh interpreter, so its peak memory is its own."""
    label = side if entity == "api_key_id" else f"{side}-{entity}"
    out, result = workdir / f"{label}.parquet", workdir / f"{label}.json"
    options = {
        "--side": side,
        "--entity": entity,
        "--data": data,
        "--result": result,
        "--repeats": repeats,
        "--repeat-budget": budget_s,
        "--start": span[0].isoformat(),
        "--end": span[1].isoformat(),
    }
    if write_output:
        options["--out"] = out
    command = [sys.executable, "-m", "benchmarks.feature_windows"]
    command += [str(part) for option in options.items() for part in option]
    # ``-m`` puts the working directory on sys.path, so the worker imports this package.
    done = subprocess.run(command, cwd=_REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"{label} worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
        )
    measured = json.loads(result.read_text(encoding="utf-8"))
    measured["output"] = str(out) if write_output else None
    return measured


def _agrees(feature: str, ours: str = "o", baseline: str = "b") -> str:
    """SQL: ours and the baseline agree on ``feature`` within `TOLERANCE` (NULL: no)."""
    o, b = f"{ours}.{feature}", f"{baseline}.{feature}"
    return f"coalesce(abs({o} - {b}) <= {TOLERANCE!r} * greatest(1.0, abs({b})), false)"


def cross_check(ours: Path, baseline: Path) -> dict[str, Any]:
    """Join both outputs on (key, row instant) and compare every `BASELINE_FEATURES` column.

    Returns:
        ``overlap_rows``; ``compared_features`` (those ours has) and
        ``missing_from_ours``; per feature the max absolute and relative difference and the
        count of rows that do not agree within `TOLERANCE` (NaN or null counts as
        differing); rows the baseline has with records in their 5-minute window that ours
        lacks; rows ours has inside a key's baseline span that the baseline lacks; one
        differing row per feature, when any.
    """
    import duckdb

    ours_columns = set(pq.read_schema(ours).names)
    compared = [f for f in BASELINE_FEATURES if f in ours_columns]
    missing = [f for f in BASELINE_FEATURES if f not in ours_columns]
    diffs = ",\n".join(
        f"max(abs(o.{f} - b.{f})) AS max_diff_{f}, "
        f"max(abs(o.{f} - b.{f}) / greatest(1.0, abs(b.{f}))) AS max_rel_diff_{f}, "
        f"count(*) FILTER (WHERE NOT {_agrees(f)}) AS mismatches_{f}"
        for f in compared
    )
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"CREATE VIEW o AS SELECT * FROM read_parquet('{ours}')")
        con.execute(f"CREATE VIEW b AS SELECT * FROM read_parquet('{baseline}')")
        summary: dict[str, Any] = {"compared_features": compared, "missing_from_ours": missing}
        summary |= _one_row(
            con,
            f"SELECT count(*) AS overlap_rows{', ' + diffs if diffs else ''} "
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
                f"WHERE NOT {_agrees(f)} "
                "ORDER BY o.event_timestamp, o.api_key_id LIMIT 1",
            )
            for f in compared
            if summary[f"mismatches_{f}"]
        }
    return summary


def _one_row(con: Any, sql: str) -> dict[str, Any]:
    cursor = con.execute(sql)
    names = [d[0] for d in cursor.description]
    return dict(zip(names, cursor.fetchone() or (), strict=True))


def run(settings: Settings, console: Console) -> BenchmarkResult:
    """Generate data, measure each side in its own process, cross-check, report."""
    result = BenchmarkResult(name=NAME, title="Batch window features", baseline=BASELINE)
    # Rows continue 5 minutes past the last record, while its 5-minute window holds it.
    span = (DATA_START, DATA_START + timedelta(days=settings.days, minutes=5))
    with (
        tempfile.TemporaryDirectory(prefix="qabuse-bench-") as tmp,
        progress_display(console, bar=False) as progress,
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
        for label, side, entity, repeats in (
            ("ours", "ours", "api_key_id", settings.repeats_ours),
            ("ours_user", "ours", "user", settings.repeats_ours),
            ("duckdb", "duckdb", "api_key_id", settings.repeats_ours),
            ("baseline", "baseline", "api_key_id", settings.repeats_baseline),
        ):
            step = progress.add_task(
                f"{side} ({entity}): load + up to {repeats} run(s) in a fresh process", total=1
            )
            sides[label] = _measure(
                side,
                data,
                workdir,
                repeats,
                settings.repeat_budget_s,
                span,
                entity=entity,
                write_output=label in ("ours", "baseline"),
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
            scale = _measure("ours", data, workdir, 1, 0.0, span, write_output=False)
            progress.update(step, completed=1)

    ours, base, sql, user = sides["ours"], sides["baseline"], sides["duckdb"], sides["ours_user"]
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
        # The engine choice: against the DuckDB SQL it replaced, same data, api-key rows.
        # That SQL computes only the 9 features of the first feature set, ours all of them.
        comparison(
            "compute time vs DuckDB SQL engine, 9 features (baseline column = DuckDB)",
            "s",
            ours["best_s"],
            sql["best_s"],
            higher_is_better=False,
        ),
        comparison(
            "peak RSS vs DuckDB SQL engine, 9 features (baseline column = DuckDB)",
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
    compared = check["compared_features"]
    max_abs_diff = {f: check[f"max_diff_{f}"] for f in compared}
    max_rel_diff = {f: check[f"max_rel_diff_{f}"] for f in compared}
    result.facts = {
        "records": settings.records,
        "api_keys": settings.api_keys,
        "days": settings.days,
        "seed": settings.seed,
        "parquet_bytes": parquet_bytes,
        "entity": "api_key_id (both sides); ours for user reported apart",
        "features_ours": ours["columns"] - 2,
        "features_baseline": len(BASELINE_FEATURES),
        "rows_ours": ours["rows"],
        "rows_baseline": base["rows"],
        "overlap_rows": check["overlap_rows"],
        "max_abs_diff_overall": _max_or_nan(max_abs_diff.values()),
        "max_rel_diff_overall": _max_or_nan(max_rel_diff.values()),
        "speedup": result.comparisons[0].ratio,
        "peak_rss_ratio_baseline_over_ours": result.comparisons[2].ratio,
        "max_abs_diff": max_abs_diff,
        "max_rel_diff": max_rel_diff,
        "tolerance": TOLERANCE,
        "tolerance_meaning": "|ours - baseline| <= tolerance * max(1, |baseline|)",
        "compared_features": compared,
        "not_compared": dict(NOT_IN_BASELINE)
        | {f: "missing from ours" for f in check["missing_from_ours"]},
        "cross_check": {
            k: v for k, v in check.items() if not k.startswith(("max_diff_", "max_rel_diff_"))
        },
        "ours": {k: v for k, v in ours.items() if k != "output"},
        "ours_user": {k: v for k, v in user.items() if k != "output"},
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
        "features_ours",
        "features_baseline",
        "rows_ours",
        "rows_baseline",
        "overlap_rows",
        "max_rel_diff_overall",
    )
    result.notes.append(
        f"ours for the user entity ({settings.records:,} records, same data): "
        f"{user['rows']:,} rows in {user['best_s']:.2f} s, "
        f"peak RSS {user['peak_rss_bytes'] / mib:,.0f} MiB (the api-key run above: "
        f"{ours['best_s']:.2f} s, {ours['peak_rss_bytes'] / mib:,.0f} MiB)"
    )
    result.notes.append(
        f"compared {len(compared)} features row by row; the baseline leaves out "
        f"{', '.join(NOT_IN_BASELINE)}; the DuckDB SQL side computes only the first 9 "
        "features (api-key rows)"
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
    if check["missing_from_ours"]:
        problems.append(f"ours lacks baseline features: {', '.join(check['missing_from_ours'])}")
    for f in check["compared_features"]:
        if check[f"mismatches_{f}"]:
            problems.append(
                f"{f}: {check[f'mismatches_{f}']:,} rows differ by more than {TOLERANCE} "
                f"x max(1, |baseline|) (max abs {check[f'max_diff_{f}']}); "
                f"first: {check['examples'][f]}"
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
    parser.add_argument("--entity", choices=("api_key_id", "user"), default="api_key_id")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="where to write the rows (default: nowhere)")
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--repeat-budget", type=float, default=float("inf"))
    parser.add_argument("--start", type=datetime.fromisoformat, required=True)
    parser.add_argument("--end", type=datetime.fromisoformat, required=True)
    args = parser.parse_args(argv)
    measured = _run_side(
        args.side,
        args.data,
        args.out,
        args.repeats,
        args.repeat_budget,
        (args.start, args.end),
        entity=args.entity,
    )
    args.result.write_text(json.dumps(measured), encoding="utf-8")


if __name__ == "__main__":
    main()

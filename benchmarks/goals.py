"""The speed goals of the scale issue, each as ours beside its baseline, met or not.

`goal_rows` reads the results of the benchmarks this run measured, and the test suite's
wall time from the last whole-suite run (``tests/conftest.py`` writes
``results/test_suite.json``: `make test` times itself). A goal whose benchmark did not run
this time (``--only``, a failed start) reads "not run", never an old figure. Every row says
what ours measured, what its baseline measured in the same run, the goal, and either
"met" or the remaining gap in the goal's own unit.

The goals are the issue's, on this 2-core machine:

| what | goal |
|---|---|
| batch window features, 1M records, against the pandas tutorial pipeline | ≥ 20x faster |
| batch window features, 10M records | ≤ 25 s, peak RSS ≤ 5 GB |
| streaming emit | ≤ 10 µs per row |
| collector, accepted records/s | ≥ 50,000 |
| instrumentation, added per submission (median) | ≤ 50 µs for each SDK |
| ``/score``, 8 keep-alive clients | ≥ 2,000 answers/s with p99 ≤ 4 ms |
| ``make test`` wall time | ≤ 15 min |
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.table import Table

from benchmarks.report import BenchmarkResult

GiB = 1024**3

BATCH_SPEEDUP_GOAL = 20.0
SCALE_SECONDS_GOAL = 25.0
SCALE_RSS_GOAL_BYTES = 5 * GiB
EMIT_US_GOAL = 10.0
COLLECTOR_GOAL = 50_000.0
INSTRUMENTATION_US_GOAL = 50.0
SCORE_ANSWERS_GOAL = 2_000.0
SCORE_P99_GOAL_MS = 4.0
SUITE_SECONDS_GOAL = 15 * 60.0


@dataclass(frozen=True)
class GoalRow:
    """One goal: what ours and its baseline measured, the goal, and the verdict."""

    what: str
    ours: str
    baseline: str
    goal: str
    #: None: not measured by this run.
    met: bool | None
    #: What is still missing, in the goal's unit; empty when met.
    gap: str = ""

    @property
    def verdict(self) -> str:
        """``met``, ``not run``, or the gap."""
        if self.met is None:
            return "not run"
        return "met" if self.met else f"gap: {self.gap}"


def _not_run(what: str, goal: str, why: str = "not run") -> GoalRow:
    return GoalRow(what, why, "", goal, None)


def batch_features(result: BenchmarkResult | None) -> list[GoalRow]:
    """Ours against the pandas pipeline at 1M records, and ours alone at 10M."""
    speed_goal = f"≥ {BATCH_SPEEDUP_GOAL:g}x the pandas pipeline"
    scale_goal = f"≤ {SCALE_SECONDS_GOAL:g} s, ≤ {SCALE_RSS_GOAL_BYTES / GiB:g} GiB"
    if result is None:
        return [
            _not_run("batch window features, 1M records", speed_goal),
            _not_run("batch window features, 10M records", scale_goal),
        ]
    facts = result.facts
    ours, base = facts["ours"], facts["baseline_run"]
    speedup = base["best_s"] / ours["best_s"]
    records = facts["records"]
    rows = [
        GoalRow(
            f"batch window features, {records:,} records",
            f"{ours['best_s']:.2f} s ({facts['features_ours']} features)",
            f"pandas {base['best_s']:.1f} s ({facts['features_baseline']} features)",
            speed_goal,
            speedup >= BATCH_SPEEDUP_GOAL,
            f"{speedup:.1f}x, {BATCH_SPEEDUP_GOAL / speedup:.1f}x short",
        )
    ]
    scale = facts.get("scale_run")
    if not scale:
        rows.append(_not_run("batch window features, 10M records", scale_goal))
        return rows
    seconds, rss = scale["best_s"], scale["peak_rss_bytes"]
    linear = ours["best_s"] / records * scale["records"]
    gaps = []
    if seconds > SCALE_SECONDS_GOAL:
        gaps.append(f"{seconds - SCALE_SECONDS_GOAL:.1f} s over")
    if rss > SCALE_RSS_GOAL_BYTES:
        gaps.append(f"{(rss - SCALE_RSS_GOAL_BYTES) / GiB:.1f} GiB over")
    rows.append(
        GoalRow(
            f"batch window features, {scale['records']:,} records",
            f"{seconds:.1f} s, peak RSS {rss / GiB:.1f} GiB",
            f"ours at {records:,}, scaled linearly: {linear:.1f} s",
            scale_goal,
            not gaps,
            ", ".join(gaps),
        )
    )
    return rows


def streaming_emit(result: BenchmarkResult | None) -> list[GoalRow]:
    """`StreamingWindows.advance` per emitted row, against a batch run per row."""
    what, goal = "streaming emit, per row", f"≤ {EMIT_US_GOAL:g} µs"
    if result is None:
        return [_not_run(what, goal)]
    facts = result.facts
    emit = facts["advance_us_per_row"]
    return [
        GoalRow(
            what,
            f"{emit:.1f} µs",
            f"batch run: {facts['batch_us_per_row']:.1f} µs per row",
            goal,
            emit <= EMIT_US_GOAL,
            f"{emit - EMIT_US_GOAL:.1f} µs over ({emit / EMIT_US_GOAL:.1f}x the goal)",
        )
    ]


def collector_rate(result: BenchmarkResult | None) -> list[GoalRow]:
    """Accepted records per second over HTTP, against ``qabuse ingest`` of a JSONL file."""
    what, goal = "collector, accepted records/s", f"≥ {COLLECTOR_GOAL:,.0f}"
    if result is None:
        return [_not_run(what, goal)]
    facts = result.facts
    rate = facts["http_records_per_s"]
    return [
        GoalRow(
            what,
            f"{rate:,.0f} ({facts['workers']} worker(s), median of rounds)",
            f"qabuse ingest of JSONL: {facts['ingest_records_per_s']:,.0f}",
            goal,
            rate >= COLLECTOR_GOAL,
            f"{COLLECTOR_GOAL - rate:,.0f}/s short",
        )
    ]


def instrumentation_added(result: BenchmarkResult | None) -> list[GoalRow]:
    """Median added time per submission, each SDK against its bare submission."""
    goal = f"≤ {INSTRUMENTATION_US_GOAL:g} µs each"
    if result is None:
        return [_not_run("instrumentation, added per submission", goal)]
    facts = result.facts
    added: Mapping[str, float] = facts["added_us_median"]
    bare = {c.metric.split(" ", 1)[0]: c.baseline for c in result.comparisons}
    over = {sdk: us for sdk, us in added.items() if us > INSTRUMENTATION_US_GOAL}
    return [
        GoalRow(
            "instrumentation, added per submission (median)",
            ", ".join(f"{sdk} {us:.0f} µs" for sdk, us in added.items()),
            "bare: " + ", ".join(f"{sdk} {us:.0f} µs" for sdk, us in bare.items()),
            goal,
            not over,
            ", ".join(
                f"{sdk} {us - INSTRUMENTATION_US_GOAL:.0f} µs over" for sdk, us in over.items()
            ),
        )
    ]


def score_throughput(result: BenchmarkResult | None) -> list[GoalRow]:
    """``/score`` under wrk's keep-alive clients, against the BentoML echo in the same run."""
    goal = f"≥ {SCORE_ANSWERS_GOAL:,.0f} answers/s, p99 ≤ {SCORE_P99_GOAL_MS:g} ms"
    what = "/score, 8 keep-alive clients (wrk)"
    if result is None or "wrk" not in result.facts:
        return [_not_run(what, goal)]
    load = result.facts["wrk"]
    what = f"/score, {load['connections']} keep-alive clients (wrk)"
    rows = []
    for side, label in (("scorer", "/score"), ("batch", "/score/batch")):
        if side not in load:
            continue
        ours, echo = load[side], load["echo"]
        gaps = []
        if ours["answers_per_s"] < SCORE_ANSWERS_GOAL:
            gaps.append(f"{SCORE_ANSWERS_GOAL - ours['answers_per_s']:,.0f} answers/s short")
        if ours["p99_ms"] > SCORE_P99_GOAL_MS:
            gaps.append(f"p99 {ours['p99_ms'] - SCORE_P99_GOAL_MS:.1f} ms over")
        rows.append(
            GoalRow(
                what if side == "scorer" else f"{label}, same clients",
                f"{ours['answers_per_s']:,.0f} answers/s, p99 {ours['p99_ms']:.1f} ms",
                f"BentoML echo: {echo['answers_per_s']:,.0f}/s, p99 {echo['p99_ms']:.1f} ms",
                goal,
                not gaps,
                ", ".join(gaps),
            )
        )
    return rows


def suite_time(path: Path) -> list[GoalRow]:
    """The last whole-suite run on every core beside the last serial one, if recorded."""
    what, goal = "make test wall time", f"≤ {SUITE_SECONDS_GOAL / 60:g} min"
    try:
        runs: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [_not_run(what, goal, f"no whole-suite run recorded in {path.name}")]
    parallel = [run for run in runs.values() if run.get("workers")]
    serial = runs.get("workers_0")
    latest = max(parallel or [serial], key=lambda run: run["finished_at"])
    seconds = latest["wall_s"]
    ours = (
        f"{seconds / 60:.1f} min, {latest['workers'] or 'no'} xdist workers, "
        f"{latest['passed']} passed, {latest['failed']} failed ({latest['finished_at']})"
    )
    baseline = (
        "serial: not recorded"
        if serial is None or serial is latest
        else f"serial: {serial['wall_s'] / 60:.1f} min ({serial['finished_at']})"
    )
    return [
        GoalRow(
            what,
            ours,
            baseline,
            goal,
            seconds <= SUITE_SECONDS_GOAL and not latest["failed"],
            f"{(seconds - SUITE_SECONDS_GOAL) / 60:.1f} min over"
            if seconds > SUITE_SECONDS_GOAL
            else "tests failed",
        )
    ]


#: Benchmark name -> the goal rows it answers, in the issue's order.
GOALS: tuple[tuple[str, Callable[[BenchmarkResult | None], list[GoalRow]]], ...] = (
    ("feature_windows", batch_features),
    ("streaming", streaming_emit),
    ("collector", collector_rate),
    ("instrumentation", instrumentation_added),
    ("scoring", score_throughput),
)


def goal_rows(results: list[BenchmarkResult], suite_times: Path) -> list[GoalRow]:
    """Every goal row, from this run's results and the recorded suite time."""
    by_name = {result.name: result for result in results}
    rows = []
    for name, rows_of in GOALS:
        result = by_name.get(name)
        if result is not None and not result.ok:
            # A speed of a wrong answer is no speed: the goal reads as missed.
            rows += [
                replace(row, ours="its correctness cross-check failed", met=False, gap="fix it")
                for row in rows_of(None)
            ]
            continue
        rows += rows_of(result)
    return rows + suite_time(suite_times)


def goal_table(rows: list[GoalRow]) -> Table:
    """The goals as a rich table: ours, the baseline, the goal, met or the gap."""
    table = Table(title="Goals (ours beside its baseline, this run)", title_justify="left")
    for column in ("what", "ours", "baseline", "goal", "verdict"):
        table.add_column(column)
    colour = {True: "green", False: "red", None: "dim"}
    for row in rows:
        table.add_row(
            row.what,
            row.ours,
            row.baseline,
            row.goal,
            f"[{colour[row.met]}]{row.verdict}[/{colour[row.met]}]",
        )
    return table

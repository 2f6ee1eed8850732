"""The goal table: each goal is read from its benchmark's result, met or with its gap."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.goals import GiB, goal_rows
from benchmarks.report import BenchmarkResult, comparison


def _feature_windows(ours_s: float, pandas_s: float, scale_s: float, rss: float):
    result = BenchmarkResult("feature_windows", "", "")
    result.facts = {
        "records": 1_000_000,
        "features_ours": 55,
        "features_baseline": 46,
        "ours": {"best_s": ours_s},
        "baseline_run": {"best_s": pandas_s},
        "scale_run": {"records": 10_000_000, "best_s": scale_s, "peak_rss_bytes": rss},
    }
    return result


def _rows(results: list[BenchmarkResult], tmp_path: Path) -> dict[str, str]:
    return {row.what: row.verdict for row in goal_rows(results, tmp_path / "none.json")}


def test_a_goal_met_and_a_goal_missed_read_met_and_the_gap(tmp_path: Path) -> None:
    fast = _feature_windows(ours_s=2.0, pandas_s=50.0, scale_s=30.0, rss=4 * GiB)
    rows = _rows([fast], tmp_path)
    assert rows["batch window features, 1,000,000 records"] == "met"
    assert rows["batch window features, 10,000,000 records"] == "gap: 5.0 s over"

    slow = _feature_windows(ours_s=5.0, pandas_s=50.0, scale_s=20.0, rss=6 * GiB)
    rows = _rows([slow], tmp_path)
    assert rows["batch window features, 1,000,000 records"] == "gap: 10.0x, 2.0x short"
    assert rows["batch window features, 10,000,000 records"] == "gap: 1.0 GiB over"


def test_instrumentation_names_each_sdk_over_the_goal(tmp_path: Path) -> None:
    result = BenchmarkResult("instrumentation", "", "")
    result.facts = {"added_us_median": {"qiskit": 60.0, "cirq": 20.0, "pennylane": 75.0}}
    result.comparisons = [
        comparison(f"{sdk} submission (median)", "µs", 200.0, 150.0, higher_is_better=False)
        for sdk in ("qiskit", "cirq", "pennylane")
    ]
    verdict = _rows([result], tmp_path)["instrumentation, added per submission (median)"]
    assert verdict == "gap: qiskit 10 µs over, pennylane 25 µs over"


def test_a_goal_whose_benchmark_did_not_run_says_so(tmp_path: Path) -> None:
    rows = goal_rows([], tmp_path / "none.json")
    assert [row.met for row in rows] == [None] * len(rows)
    assert {row.verdict for row in rows} == {"not run"}


def test_the_suite_row_reads_the_latest_parallel_run_beside_the_serial_one(tmp_path: Path) -> None:
    times = tmp_path / "test_suite.json"
    run = {"passed": 10, "failed": 0, "tests": 10}
    times.write_text(
        json.dumps(
            {
                "workers_0": {**run, "workers": 0, "wall_s": 960.0, "finished_at": "2026-01-01"},
                "workers_2": {**run, "workers": 2, "wall_s": 600.0, "finished_at": "2026-01-02"},
            }
        ),
        encoding="utf-8",
    )
    (row,) = [r for r in goal_rows([], times) if r.what == "make test wall time"]
    assert row.met is True
    assert row.ours.startswith("10.0 min, 2 xdist workers")
    assert row.baseline.startswith("serial: 16.0 min")


def test_a_result_whose_cross_check_failed_misses_its_goals(tmp_path: Path) -> None:
    wrong = _feature_windows(ours_s=1.0, pandas_s=50.0, scale_s=10.0, rss=1 * GiB)
    wrong.problems.append("mean_shots_1m: 3 rows differ")
    rows = [row for row in goal_rows([wrong], tmp_path / "none.json") if "batch" in row.what]
    assert len(rows) == 2
    assert all(row.met is False and "cross-check failed" in row.ours for row in rows)

"""The performance harness runs end to end and its correctness cross-checks pass.

The quick run takes seconds but starts several interpreters, so it is marked slow. Only
shape is asserted (the keys of the JSON results, positive ratios), never a time.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_run(
    tmp_path_factory: pytest.TempPathFactory, pipeline_run
) -> tuple[subprocess.CompletedProcess, Path]:
    results = tmp_path_factory.mktemp("bench-results")
    # The scoring benchmark serves the session's trained home instead of training its own.
    home = ["--scoring-home", str(pipeline_run.home)]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--results-dir", str(results), *home],
        cwd=_REPO,
        capture_output=True,
        text=True,
        timeout=300,
        # Wide enough that rich wraps no cell of the goal table.
        env={**os.environ, "COLUMNS": "400"},
    )
    return done, results


def _result(results: Path, name: str) -> dict:
    path = results / f"{name}.json"
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text(encoding="utf-8"))


def _assert_ratios(result: dict) -> None:
    assert result["ok"] is True and result["problems"] == []
    assert result["comparisons"], "no comparison reported"
    for metric, c in result["comparisons"].items():
        assert {"unit", "ours", "baseline", "ratio", "ratio_meaning"} <= c.keys(), metric
        for key in ("ours", "baseline", "ratio"):
            assert math.isfinite(c[key]) and c[key] > 0, (metric, key, c[key])


@pytest.mark.slow
def test_quick_run_exits_zero(quick_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    done, _ = quick_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "summary" in done.stdout.lower()


@pytest.mark.slow
def test_the_goal_table_has_a_verdict_for_every_goal_the_run_measured(
    quick_run: tuple[subprocess.CompletedProcess, Path],
) -> None:
    done, _ = quick_run
    table = done.stdout[done.stdout.index("Goals (ours beside its baseline") :]
    rows = [line for line in table.splitlines() if line.startswith("│")]
    verdicts = [row.rstrip("│ ").rsplit("│", 1)[-1].strip() for row in rows]
    # Eight goal rows: 1M and 10M batch, emit, collector, instrumentation, /score and
    # /score/batch, the suite; the quick run has no 10M run and no suite time recorded.
    assert len(verdicts) == 8, table
    assert verdicts.count("not run") == 2, table
    assert all(v in ("met", "not run") or v.startswith("gap: ") for v in verdicts), verdicts


@pytest.mark.slow
def test_feature_windows_result(quick_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, results = quick_run
    result = _result(results, "feature_windows")
    _assert_ratios(result)
    assert {"compute time (best)", "peak RSS"} <= result["comparisons"].keys()
    assert result["speedup"] > 0 and result["peak_rss_ratio_baseline_over_ours"] > 0
    assert result["rows_ours"] > 0 and result["rows_baseline"] > 0
    assert result["overlap_rows"] > 0
    assert set(result["max_abs_diff"]) == set(result["compared_features"])
    assert set(result["max_rel_diff"]) == set(result["compared_features"])
    # Every feature the pandas pipeline computes is compared, and agrees with ours.
    assert len(result["compared_features"]) == result["features_baseline"] >= 40
    assert result["max_rel_diff_overall"] <= result["tolerance"]
    assert result["ours_user"]["rows"] > 0


@pytest.mark.slow
def test_contract_validation_result(quick_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, results = quick_run
    result = _result(results, "contract_validation")
    _assert_ratios(result)
    assert result["throughput_ratio"] > 0
    assert result["verdict_disagreements"] == 0
    assert result["valid_ours"] == result["valid_baseline"] == result["records"]


def test_failed_cross_check_exits_nonzero(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A disagreement between ours and the baseline fails the run, whatever the speed."""
    monkeypatch.syspath_prepend(str(_REPO))
    from benchmarks import __main__ as harness
    from benchmarks import feature_windows
    from benchmarks.report import BenchmarkResult, comparison

    def disagreeing_run(settings: object, console: object) -> BenchmarkResult:
        result = BenchmarkResult(name=feature_windows.NAME, title="t", baseline="b")
        result.comparisons = [comparison("compute", "s", 1.0, 2.0, higher_is_better=False)]
        result.problems.append("mean_shots_1m: 3 rows differ")
        return result

    monkeypatch.setattr(feature_windows, "run", disagreeing_run)
    status = harness.main(["--only", feature_windows.NAME, "--results-dir", str(tmp_path)])
    assert status == 1
    written = json.loads((tmp_path / "feature_windows.json").read_text(encoding="utf-8"))
    assert written["ok"] is False and written["problems"]


@pytest.mark.slow
def test_online_lookup_result(quick_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    import os
    import shutil

    _, results = quick_run
    result = _result(results, "online_lookup")
    if shutil.which("redis-server") is None and not os.environ.get("CI"):
        assert result["ok"] is True and result["notes"], "a missing redis-server is noted"
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    _assert_ratios(result)
    assert {"p50 latency", "p99 latency"} <= result["comparisons"].keys()
    assert result["vector_disagreements"] == 0
    for store in ("redis", "sqlite"):
        latency = result["latency_ms"][store]
        assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"], store


@pytest.mark.slow
def test_instrumentation_result(quick_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, results = quick_run
    result = _result(results, "instrumentation")
    _assert_ratios(result)
    assert set(result["added_us_median"]) == {"qiskit", "cirq", "pennylane"}


@pytest.mark.slow
def test_collector_result(quick_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, results = quick_run
    result = _result(results, "collector")
    _assert_ratios(result)
    assert result["accepted"] == result["records"] == result["compacted"]


@pytest.mark.slow
@pytest.mark.integration
def test_scoring_result(quick_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, results = quick_run
    result = _result(results, "scoring")
    # ok: every /score answer was a 200 with every family's score and top features.
    _assert_ratios(result)
    assert {"p50 latency", "p99 latency"} <= result["comparisons"].keys()
    assert result["bad_answers"] == 0 and result["home_built"] is False
    assert result["api_keys"] >= 2 and result["incident_keys"] >= 1
    assert len(result["families"]) >= 2
    for side in ("scorer", "echo"):
        latency = result["latency_ms"][side]
        assert 0 < latency["p50_ms"] <= latency["p90_ms"] <= latency["p99_ms"], side
        assert latency["p99_ms"] <= latency["max_ms"], side
    # The absolute bound is recorded, never asserted: a test machine's times are not the spec.
    assert result["p99_bound_ms"] > 0 and isinstance(result["p99_within_bound"], bool)
    assert result["ratio_ours_over_echo"]["p99"] > 0
    # Under wrk: /score, the echo and /score/batch, each with its gap to the goal.
    assert {"scorer", "echo", "batch"} <= result["wrk"].keys()
    for side in ("scorer", "batch"):
        assert isinstance(result["goal_under_load"][side]["met"], bool), side
    assert result["wrk"]["scorer"]["non_2xx"] == 0 and result["wrk"]["batch"]["non_2xx"] == 0


def test_stream_latency_result(quick_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, results = quick_run
    result = _result(results, "stream_latency")
    # ok: the streamed online rows of the cross-checked keys equal window_features.
    _assert_ratios(result)
    assert result["cross_check_keys"] >= 1
    assert result["replay_records_per_s"] > 0 and result["spool_read_records_per_s"] > 0


def test_authorize_result(quick_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, results = quick_run
    result = _result(results, "authorize")
    # ok: every gateway answer agreed with the decision table, wrk saw only 2xx.
    _assert_ratios(result)
    assert {"p50 latency", "p99 latency", "answers per second (wrk)"} <= result[
        "comparisons"
    ].keys()
    assert result["wrong_answers"] == 0
    assert 0 < result["server_p50_ms"] <= result["server_p99_ms"]
    # The goals are recorded, never asserted: a test machine's times are not the spec.
    assert result["server_p99_goal_ms"] > 0 and result["throughput_goal_per_s"] > 0

"""``python -m benchmarks``: run the benchmarks, print ratio tables, write JSON results.

Exits 1 when a correctness cross-check fails (ours and the baseline disagree), so a
benchmark run can never report a speed-up for a wrong answer.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks import (
    authorize,
    collector,
    contract_validation,
    feature_windows,
    instrumentation,
    online_lookup,
    scoring,
    stream_latency,
    streaming,
)
from benchmarks.goals import goal_rows, goal_table
from benchmarks.report import RESULTS_DIR, BenchmarkResult, comparison_table, write_json

#: Where ``make test`` records its wall time (tests/conftest.py), under the results folder.
SUITE_TIMES = "test_suite.json"

BENCHMARKS = (
    feature_windows.NAME,
    contract_validation.NAME,
    streaming.NAME,
    online_lookup.NAME,
    instrumentation.NAME,
    collector.NAME,
    scoring.NAME,
    stream_latency.NAME,
    authorize.NAME,
)

#: ``--quick``: sizes for the smoke test, seconds rather than minutes.
QUICK_FEATURE_WINDOWS = feature_windows.Settings(
    records=20_000, api_keys=20, days=1.0, repeats_ours=1, repeats_baseline=1, scale_records=0
)
QUICK_CONTRACT_VALIDATION = contract_validation.Settings(records=2_000, repeats=1)
QUICK_STREAMING = streaming.Settings(records=20_000, api_keys=20, days=1.0, pushes=10)
QUICK_ONLINE_LOOKUP = online_lookup.Settings(api_keys=50, lookups=200, warmup=20)
QUICK_INSTRUMENTATION = instrumentation.Settings(calls=20, blocks=2)
QUICK_COLLECTOR = collector.Settings(records=3_000, batch=500, rounds=1)
#: Without ``--scoring-home`` a quick run still builds (and trains) a home: a minute or two.
QUICK_SCORING = scoring.Settings(calls=100, warmup=20, seconds=1.0, rounds=1)
#: The live run waits for a minute boundary: the quick run replays only.
QUICK_AUTHORIZE = authorize.Settings(calls=200, warmup=20, api_keys=500, seconds=1.0)
QUICK_STREAM_LATENCY = stream_latency.Settings(
    records=3_000, minutes=10, batch=300, api_keys=10, live=False
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure qabuse against its baselines; print ratios, write JSON.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument(
        "--records", type=int, help="telemetry records for feature_windows (default 1,000,000)"
    )
    parser.add_argument("--api-keys", type=int, help="api keys for feature_windows (default 500)")
    parser.add_argument(
        "--validation-records",
        type=int,
        help="records for contract_validation (default 20,000)",
    )
    parser.add_argument(
        "--stream-records", type=int, help="records for streaming (default 1,000,000)"
    )
    parser.add_argument("--repeats", type=int, help="timed repeats of ours (best is reported)")
    parser.add_argument(
        "--baseline-repeats", type=int, help="timed repeats of the baseline (best is reported)"
    )
    parser.add_argument(
        "--repeat-budget",
        type=float,
        help="feature_windows: seconds per side after which no further repeat starts "
        "(default 60; a side that takes minutes runs once)",
    )
    parser.add_argument(
        "--scoring-home",
        type=Path,
        help="scoring, stream_latency: an existing QABUSE_HOME with a @champion and online "
        "features (default: build one in a temporary folder, a minute or two)",
    )
    parser.add_argument("--only", choices=BENCHMARKS, help="run one benchmark")
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS_DIR, help=f"default {RESULTS_DIR}"
    )
    args = parser.parse_args(argv)
    for name in (
        "records",
        "api_keys",
        "validation_records",
        "stream_records",
        "repeats",
        "baseline_repeats",
        "repeat_budget",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.scoring_home is not None and not args.scoring_home.is_dir():
        parser.error(f"--scoring-home {args.scoring_home} is not a folder")
    return args


def feature_windows_settings(args: argparse.Namespace) -> feature_windows.Settings:
    """The feature-window sizes: quick or default, then any explicit option."""
    settings = QUICK_FEATURE_WINDOWS if args.quick else feature_windows.Settings()
    overrides = {
        "records": args.records,
        "api_keys": args.api_keys,
        "repeats_ours": args.repeats,
        "repeats_baseline": args.baseline_repeats,
        "repeat_budget_s": args.repeat_budget,
    }
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def contract_validation_settings(args: argparse.Namespace) -> contract_validation.Settings:
    """The contract-validation sizes: quick or default, then any explicit option."""
    settings = QUICK_CONTRACT_VALIDATION if args.quick else contract_validation.Settings()
    overrides = {"records": args.validation_records, "repeats": args.repeats}
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def streaming_settings(args: argparse.Namespace) -> streaming.Settings:
    """The streaming sizes: quick or default, then any explicit option."""
    settings = QUICK_STREAMING if args.quick else streaming.Settings()
    return (
        settings if args.stream_records is None else replace(settings, records=args.stream_records)
    )


def scoring_settings(args: argparse.Namespace) -> scoring.Settings:
    """The scoring sizes: quick or default, on the home given, if any."""
    settings = QUICK_SCORING if args.quick else scoring.Settings()
    return settings if args.scoring_home is None else replace(settings, home=args.scoring_home)


def stream_latency_settings(args: argparse.Namespace) -> stream_latency.Settings:
    """The stream-latency sizes: quick or default, on the home given, if any."""
    settings = QUICK_STREAM_LATENCY if args.quick else stream_latency.Settings()
    return settings if args.scoring_home is None else replace(settings, home=args.scoring_home)


def summary_table(results: list[BenchmarkResult]) -> Table:
    """Every ratio of every benchmark, and whether its correctness cross-check passed."""
    table = Table(title="Summary (ratio > 1 favours ours)", title_justify="left")
    table.add_column("benchmark")
    table.add_column("metric")
    table.add_column("ratio", justify="right")
    table.add_column("cross-check")
    for result in results:
        verdict = "[green]pass[/green]" if result.ok else "[red]FAIL[/red]"
        for i, c in enumerate(result.comparisons):
            table.add_row(
                result.name if i == 0 else "",
                c.metric,
                f"[bold]{c.ratio:.2f}x[/bold]",
                verdict if i == 0 else "",
            )
    return table


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks; return the process exit status."""
    args = parse_args(argv)
    console = Console()
    runs = {
        feature_windows.NAME: lambda: feature_windows.run(feature_windows_settings(args), console),
        contract_validation.NAME: lambda: contract_validation.run(
            contract_validation_settings(args), console
        ),
        streaming.NAME: lambda: streaming.run(streaming_settings(args), console),
        online_lookup.NAME: lambda: online_lookup.run(
            QUICK_ONLINE_LOOKUP if args.quick else online_lookup.Settings(), console
        ),
        instrumentation.NAME: lambda: instrumentation.run(
            QUICK_INSTRUMENTATION if args.quick else instrumentation.Settings(), console
        ),
        collector.NAME: lambda: collector.run(
            QUICK_COLLECTOR if args.quick else collector.Settings(), console
        ),
        scoring.NAME: lambda: scoring.run(scoring_settings(args), console),
        stream_latency.NAME: lambda: stream_latency.run(stream_latency_settings(args), console),
        authorize.NAME: lambda: authorize.run(
            QUICK_AUTHORIZE if args.quick else authorize.Settings(), console
        ),
    }
    results = []
    for name in BENCHMARKS:
        if args.only and name != args.only:
            continue
        console.rule(name)
        result = runs[name]()
        results.append(result)
        console.print(comparison_table(result))
        for note in result.notes:
            console.print(f"note: {note}")
        for problem in result.problems:
            console.print(f"[red]cross-check failed:[/red] {problem}")
        path = write_json(result, args.results_dir)
        console.print(f"wrote {path}")
    console.rule("summary")
    console.print(summary_table(results))
    console.print(goal_table(goal_rows(results, args.results_dir / SUITE_TIMES)))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

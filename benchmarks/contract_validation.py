"""Contract validation throughput: `validate_record` against ``jsonschema``'s validator.

Both sides see the same decoded JSON records from the workload twin and must reach the
same verdict on each. Ours does more per record than ``jsonschema``: it also builds the
`TelemetryRecord` (timestamp parsed and normalised to UTC, integral floats made ints),
while ``iter_errors`` only reports problems.
"""

from __future__ import annotations

import itertools
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from benchmarks.report import (
    BenchmarkResult,
    busy_machine_note,
    comparison,
    load_average,
    progress_display,
)

NAME = "contract_validation"
BASELINE = "jsonschema Draft202012Validator.iter_errors (format asserted)"
SCHEMA_RESOURCE = ("qabuse_dagster.telemetry", "schemas/telemetry-record.v1.schema.json")


@dataclass(frozen=True)
class Settings:
    """Sizes and repeats of one contract-validation benchmark run."""

    records: int = 20_000
    hours: float = 6.0
    seed: int = 1
    repeats: int = 3


def simulated_records(target: int, hours: float, seed: int) -> tuple[list[dict[str, Any]], float]:
    """Decoded telemetry records from the workload twin, the first ``target`` of them.

    The twin's output size follows from its horizon, not a record count, so the horizon
    doubles from ``hours`` until it yields ``target`` records.

    Returns:
        The records and the horizon (hours) that produced them.
    """
    from qabuse_dagster.simulation import simulate
    from qabuse_dagster.telemetry.hashing import KeyedHasher

    # The demo key's warning is for people hashing real identifiers; these are synthetic.
    logging.getLogger("qabuse_dagster.telemetry.hashing").setLevel(logging.ERROR)
    hasher = KeyedHasher.demo()
    while True:
        with tempfile.TemporaryDirectory(prefix="qabuse-bench-") as tmp:
            sim = simulate(hours=hours, seed=seed, out=Path(tmp), hasher=hasher)
            if sim.n_records >= target:
                with sim.telemetry_path.open(encoding="utf-8") as lines:
                    records = [json.loads(line) for line in itertools.islice(lines, target)]
                return records, hours
        hours *= 2


def _time_best(
    check: Callable[[dict[str, Any]], bool],
    records: list[dict[str, Any]],
    repeats: int,
    progress: Progress,
    label: str,
) -> tuple[float, list[bool]]:
    """Best wall time of ``repeats`` passes over ``records``, and the last pass's verdicts."""
    task = progress.add_task(label, total=repeats)
    best, verdicts = float("inf"), []
    for _ in range(repeats):
        started = time.perf_counter()
        verdicts = [check(record) for record in records]
        best = min(best, time.perf_counter() - started)
        progress.advance(task)
    return best, verdicts


def run(settings: Settings, console: Console) -> BenchmarkResult:
    """Simulate records, time both validators over them, check that their verdicts agree."""
    from jsonschema import Draft202012Validator

    from qabuse_dagster.telemetry.contract import ContractViolation, validate_record

    result = BenchmarkResult(name=NAME, title="Telemetry contract validation", baseline=BASELINE)
    package, resource = SCHEMA_RESOURCE
    schema = json.loads((files(package) / resource).read_text(encoding="utf-8"))
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)

    def ours_accepts(record: dict[str, Any]) -> bool:
        try:
            validate_record(record)
        except ContractViolation:
            return False
        return True

    def baseline_accepts(record: dict[str, Any]) -> bool:
        # Exhaust the iterator: collecting every reason is what the collector needs.
        return not list(validator.iter_errors(record))

    load_averages = [load_average()]
    with progress_display(console) as progress:
        task = progress.add_task(f"simulating {settings.records:,} records", total=None)
        records, hours = simulated_records(settings.records, settings.hours, settings.seed)
        progress.update(task, total=1, completed=1)
        ours_s, ours_verdicts = _time_best(
            ours_accepts, records, settings.repeats, progress, "ours: validate_record"
        )
        base_s, base_verdicts = _time_best(
            baseline_accepts, records, settings.repeats, progress, "baseline: iter_errors"
        )

    load_averages.append(load_average())
    n = len(records)
    result.comparisons = [
        comparison("throughput", "records/s", n / ours_s, n / base_s, higher_is_better=True)
    ]
    disagreements = [
        i for i, (a, b) in enumerate(zip(ours_verdicts, base_verdicts, strict=True)) if a != b
    ]
    result.facts = {
        "records": n,
        "simulated_hours": hours,
        "seed": settings.seed,
        "repeats": settings.repeats,
        "valid_ours": sum(ours_verdicts),
        "valid_baseline": sum(base_verdicts),
        "verdict_disagreements": len(disagreements),
        "throughput_ratio": result.comparisons[0].ratio,
        "best_s": {"ours": ours_s, "baseline": base_s},
        "us_per_record": {"ours": ours_s / n * 1e6, "baseline": base_s / n * 1e6},
    }
    result.shown_facts = ("records", "simulated_hours", "valid_ours", "valid_baseline")
    busy = busy_machine_note(load_averages)
    if busy:
        result.notes.append(busy)
    if disagreements:
        first = records[disagreements[0]]
        result.problems.append(
            f"{len(disagreements)} records get different verdicts; first (index "
            f"{disagreements[0]}, job_id {first.get('job_id')!r}): ours accepts="
            f"{ours_verdicts[disagreements[0]]}, jsonschema accepts="
            f"{base_verdicts[disagreements[0]]}"
        )
    return result

"""What a benchmark measured, as a rich table and as JSON, and the helpers every run shares:
peak memory, percentiles, the progress display and temporary environment variables."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Comparison:
    """One measured quantity for ours and the baseline.

    ``ratio`` is oriented so that a value above 1 always favours ours: baseline time over
    our time, baseline memory over our memory, our throughput over the baseline's.
    """

    metric: str
    unit: str
    ours: float
    baseline: float
    ratio: float
    ratio_meaning: str


@dataclass
class BenchmarkResult:
    """Everything one benchmark reports: comparisons, facts about the run, problems."""

    name: str
    title: str
    baseline: str
    comparisons: list[Comparison] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    #: Keys of ``facts`` worth a line under the table; all of them go to the JSON.
    shown_facts: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every correctness cross-check passed."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """The JSON document written to ``results/<name>.json``."""
        return {
            "name": self.name,
            "title": self.title,
            "baseline": self.baseline,
            "ok": self.ok,
            "problems": self.problems,
            "notes": self.notes,
            "comparisons": {
                c.metric: {
                    "unit": c.unit,
                    "ours": c.ours,
                    "baseline": c.baseline,
                    "ratio": c.ratio,
                    "ratio_meaning": c.ratio_meaning,
                }
                for c in self.comparisons
            },
            **self.facts,
            "environment": environment(),
        }


def comparison(
    metric: str, unit: str, ours: float, baseline: float, *, higher_is_better: bool
) -> Comparison:
    """Build a `Comparison`, orienting the ratio so that above 1 favours ours.

    A zero denominator gives a NaN ratio rather than an exception: the run still reports.
    """
    if higher_is_better:
        top, bottom, meaning = ours, baseline, "ours / baseline (higher favours ours)"
    else:
        top, bottom, meaning = baseline, ours, "baseline / ours (higher favours ours)"
    ratio = top / bottom if bottom else float("nan")
    return Comparison(metric, unit, ours, baseline, ratio, meaning)


def write_json(result: BenchmarkResult, results_dir: Path) -> Path:
    """Write ``result`` to ``results_dir/<name>.json`` and return the path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{result.name}.json"
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    return path


def comparison_table(result: BenchmarkResult) -> Table:
    """One rich table: a row per comparison, then the baseline and chosen facts below."""
    table = Table(title=result.title, title_justify="left")
    table.add_column("metric")
    table.add_column("ours", justify="right")
    table.add_column("baseline", justify="right")
    table.add_column("ratio", justify="right")
    for c in result.comparisons:
        table.add_row(
            f"{c.metric} [{c.unit}]",
            format_value(c.ours),
            format_value(c.baseline),
            f"[bold]{c.ratio:.2f}x[/bold]",
        )
    facts = "  ".join(f"{key}={format_value(result.facts[key])}" for key in result.shown_facts)
    table.caption = f"baseline: {result.baseline}; ratio > 1 favours ours.\n{facts}"
    table.caption_justify = "left"
    return table


def format_value(value: object) -> str:
    """Numbers to a short human form: 3 significant digits, thousands separators."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.3g}"


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Reads ``VmHWM`` from ``/proc/self/status``. ``getrusage(...).ru_maxrss`` is not used:
    Linux carries the parent's high-water mark across fork and exec into the child's
    ``ru_maxrss``, so a worker started by a parent holding the data would report the
    parent's peak. Falls back to ``ru_maxrss`` where there is no ``/proc``.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def environment() -> dict[str, Any]:
    """Where the numbers came from."""
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_1m": load_average(),
    }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
    2.0
    """
    rank = max(1, round(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def progress_display(console: Console, *, bar: bool = True) -> Progress:
    """The progress display of a run: spinner, step, bar (for counted steps), elapsed time."""
    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    columns += [BarColumn()] if bar else []
    return Progress(*columns, TimeElapsedColumn(), console=console)


@contextlib.contextmanager
def environment_variables(**values: str) -> Iterator[None]:
    """Set environment variables for the run; put back what was there before."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_machine_note(load_averages: list[float | None]) -> str | None:
    """A warning when other work shared the CPUs while we measured, else None.

    Both sides run in the same invocation, so a ratio survives a steady load better than
    an absolute time does; a load that changes between the sides skews the ratio too.
    """
    cpus = os.cpu_count() or 1
    seen = [a for a in load_averages if a is not None]
    # The measured process alone may keep every CPU busy (DuckDB runs a thread per core).
    if seen and max(seen) > cpus + 0.5:
        return (
            f"load average reached {max(seen):.1f} on {cpus} CPUs while measuring: other "
            "work shared the machine, so times are noisy (ratios less so)"
        )
    return None

"""``qabuse demo``: the whole spine, end to end, on embedded defaults."""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from rich.console import Console
from rich.table import Table

from qabuse_dagster import settings

if TYPE_CHECKING:
    from qabuse_dagster.pipeline import Instigator, MonitoringResult

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _step(console: Console, title: str, action: Callable[[], T]) -> T:
    started = time.perf_counter()
    with console.status(f"[bold]{title}[/bold] …"):
        value = action()
    console.print(f"[green]✓[/green] {title} [dim]({time.perf_counter() - started:.1f} s)[/dim]")
    return value


def _age(age_s: float | None, stale: bool) -> str:
    """How old the scored features were: ``"stale 3.2d"``, ``"fresh 12s"``."""
    if age_s is None:
        return "missing"
    state = "stale" if stale else "fresh"
    for unit, seconds in (("d", 86_400.0), ("h", 3_600.0), ("m", 60.0)):
        if age_s >= seconds:
            return f"{state} {age_s / seconds:.1f}{unit}"
    return f"{state} {age_s:.0f}s"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def run_demo(*, hours: float = 96.0, seed: int = 7, calls: int = 200) -> int:
    """Simulate → ingest → materialise via Dagster → serve → score → report. Returns exit code."""
    from qabuse_dagster.ingest.files import ingest_labels, ingest_telemetry
    from qabuse_dagster.ingest.partitions import hours_between
    from qabuse_dagster.pipeline import instigators, run_monitoring, run_pipeline
    from qabuse_dagster.serving.server import scoring_server
    from qabuse_dagster.simulation import simulate
    from qabuse_dagster.simulation.twin import replay_at
    from qabuse_dagster.telemetry.hashing import KeyedHasher

    console = Console()
    paths = settings.paths()
    console.print(
        f"[bold]qabuse demo[/bold]: state in {paths.home} "
        "(identifiers hashed with the public demo key)"
    )
    # The same twin every run (a fixed start: its tenants keep UTC working hours and
    # weekends), replayed to end at the present minute, so that the online vectors are
    # as fresh as the pipeline is quick, as for a provider whose telemetry arrives live.
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    folder = paths.home / "simulation" / f"seed-{seed}"
    sim = _step(
        console,
        f"simulate {hours:g} h of a shared backend (seed {seed}), replayed to end at "
        f"{end:%Y-%m-%d %H:%M} UTC",
        lambda: replay_at(
            simulate(hours=hours, seed=seed, out=folder / "simulated", hasher=KeyedHasher.demo()),
            end,
            folder,
        ),
    )
    report = _step(
        console,
        f"ingest {sim.n_records:,} telemetry records",
        lambda: ingest_telemetry([sim.telemetry_path], paths),
    )
    _step(console, "store incident labels", lambda: ingest_labels(sim.labels_path, paths))
    result = _step(
        console,
        "materialise the asset graph through Dagster (raw → features → Feast"
        " → training set → model → evaluation → @champion)",
        lambda: run_pipeline(hours_between(sim.start, sim.end)),
    )

    monitoring = _step(
        console,
        "measure drift and judge the champion's last hour (monitoring_job)",
        run_monitoring,
    )
    evaluation, trained = result.evaluation, result.trained
    incident_keys = list(sim.incident_api_key_ids)
    benign_keys = [k for k, kind in sim.api_keys.items() if k not in incident_keys]
    targets = incident_keys + benign_keys
    with contextlib.ExitStack() as running:
        client = _step(
            console,
            "start the scoring endpoint (bentoml serve on 127.0.0.1)",
            lambda: running.enter_context(scoring_server()),
        )
        scored = {key: client.score(key) for key in targets}
        latencies = []
        for i in range(calls):
            t0 = time.perf_counter()
            client.score(targets[i % len(targets)])
            latencies.append((time.perf_counter() - t0) * 1000)
    console.print("[green]✓[/green] scored every key over HTTP, endpoint stopped")

    _print_report(
        console, sim, report, evaluation, trained, result, scored, incident_keys, latencies
    )
    _print_monitoring(console, monitoring, instigators())
    incident_top = min(scored[k].score for k in incident_keys) > max(
        scored[k].score for k in benign_keys
    )
    detected = evaluation is not None and evaluation.overall.recall == 1.0
    console.print(
        f"\n[bold]{'Incident detected' if detected else 'Incident NOT detected'}[/bold]; "
        "/score ranks the incident key "
        f"{'above' if incident_top else 'NOT above'} every benign key."
    )
    console.print(
        f"Next: [bold]make up[/bold] opens the Dagster UI (runs {result.training_run_id[:8]}…),"
        " the MLflow UI and the endpoint on this state."
    )
    return 0


def _print_report(
    console,
    sim,
    report,
    evaluation,
    trained,
    result,
    scored,
    incident_keys,  # type: ignore[no-untyped-def]
    latencies,
) -> None:
    console.print()
    summary = Table(title="qabuse demo report", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row(
        "telemetry",
        f"{sim.n_records:,} records, {len(sim.api_keys)} api keys, "
        f"{report.accepted:,} accepted, {report.rejected} rejected",
    )
    summary.add_row("partitions", f"{result.partitions[0]} .. {result.partitions[1]} (hourly)")
    if trained is not None:
        summary.add_row(
            "model",
            f"{trained.ref.name} v{trained.ref.version} "
            f"({'@champion' if result.champion_promoted else 'not promoted'}); "
            f"trained on rows before {trained.cutoff:%Y-%m-%d %H:%M} UTC",
        )
    if result.held_families:
        held = result.held_families
        summary.add_row(
            "families held",
            f"{', '.join(held)}: "
            + (
                "missed its floors on this twin, so its @champion alias did not move "
                "(the ensemble still combines its challenger)"
                if len(held) == 1
                else "missed their floors on this twin, so their @champion aliases did not "
                "move (the ensemble still combines their challengers)"
            ),
        )
    if evaluation is not None:
        for outcome in evaluation.incidents:
            ttd = (
                f"{outcome.time_to_detect_s:.0f} s after onset"
                if outcome.time_to_detect_s is not None
                else "-"
            )
            summary.add_row(
                f"incident {outcome.incident_id}",
                f"{outcome.kind}: {'DETECTED' if outcome.detected else 'missed'}, "
                f"time to detect {ttd}",
            )
        overall = evaluation.overall
        if overall.precision_at_k is not None:
            summary.add_row(
                f"precision@{overall.k}",
                f"{overall.precision_at_k:.2f} (keys ranked by their highest score)",
            )
        summary.add_row(
            "benign alert rate",
            f"{overall.benign_key_day_alert_rate:.2%} of benign key-days "
            f"({overall.benign_key_days_alerted}/{overall.benign_key_days}), "
            f"{overall.benign_row_alert_rate:.2%} of benign key-minutes",
        )
    summary.add_row(
        "/score latency",
        f"p50 {statistics.median(latencies):.1f} ms, "
        f"p99 {_percentile(latencies, 99):.1f} ms over {len(latencies)} calls",
    )
    console.print(summary)

    keys = Table(title="POST /score, now", title_justify="left")
    for column in ("api key", "tenant", "score", "anomalous", "model", "submissions/min (5m)"):
        keys.add_column(column)
    keys.add_column("age", no_wrap=True)
    ranked = sorted(scored.items(), key=lambda item: item[1].score, reverse=True)
    for key, response in ranked[:8]:
        keys.add_row(
            key[:16] + "…",
            sim.api_keys.get(key, "?"),
            f"{response.score:.3f}",
            "yes" if response.anomalous else "no",
            f"v{response.model_version}",
            f"{response.features.get('submissions_per_min_5m', 0.0):.1f}",
            _age(response.feature_age_s, response.stale),
        )
    console.print(keys)
    fresh = sum(not response.stale for response in scored.values())
    console.print(
        f"{fresh} of {len(scored)} keys have online features younger than "
        f"QABUSE_ONLINE_MAX_AGE_S ({settings.online_max_age_seconds():.0f} s): those active "
        "in the last minutes. A quieter key's latest row is older; /score still scores it "
        "(fail open) and flags it stale."
    )


def _print_monitoring(
    console: Console, monitoring: MonitoringResult, states: list[Instigator]
) -> None:
    drift, evaluation = monitoring.drift, monitoring.evaluation
    table = Table(title="monitoring (monitoring_job)", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    if drift:
        table.add_row(
            "input drift",
            f"{drift['features_error']} of {drift['features']} inputs at PSI ≥ 0.25, "
            f"{drift['features_warn_or_worse']} at ≥ 0.1 (max PSI {drift['max_psi']:.3f}); "
            f"last {drift['window_hours']:g} h, {drift['rows_compared']:,} rows, against "
            f"{drift['champion']}'s training rows",
        )
        if drift.get("judged") is False:
            table.add_row("", f"not judged: {drift['why']}")
        if "score_psi" in drift:
            table.add_row("score drift", f"PSI {drift['score_psi']:.3f} ({drift['score_level']})")
    else:
        table.add_row("input drift", "not measured: see the monitoring_job run in the UI")
    for name, passed in sorted(monitoring.checks.items()):
        table.add_row(f"check {name}", "passed" if passed else "FAILED")
    if evaluation:
        figures = ", ".join(
            f"{name.replace('_', ' ')} {evaluation[name]:.2f}"
            for name in ("precision", "benign_alert_rate", "recall")
            if name in evaluation
        )
        table.add_row(
            "last hour",
            f"{evaluation['alerted_keys']:.0f} of {evaluation['active_keys']:.0f} active keys "
            f"alerted; {figures}",
        )
    console.print(table)
    runners = Table(title="schedules and sensors (run under `make up`)", title_justify="left")
    for column in ("kind", "name", "starts", "cadence", "status"):
        runners.add_column(column)
    for state in states:
        runners.add_row(state.kind, state.name, state.job, state.cadence, state.status)
    console.print(runners)

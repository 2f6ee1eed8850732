"""The ``qabuse`` command line."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from qabuse_dagster import settings

if TYPE_CHECKING:  # heavy imports stay out of `qabuse --help`
    import pyarrow as pa

    from qabuse_dagster.evaluation.closed_loop import ClosedLoopReport


def _quiet_libraries() -> None:
    # Beta/deprecation notices of the stack are for us, not for a user's terminal.
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _hasher(demo_key: bool):  # type: ignore[no-untyped-def]
    from qabuse_dagster.telemetry.hashing import KeyedHasher, MissingHashKeyError

    if demo_key:
        return KeyedHasher.demo()
    try:
        return KeyedHasher.from_env()
    except (MissingHashKeyError, ValueError) as exc:
        raise click.UsageError(f"{exc}\n(or pass --demo-key for synthetic data)") from None


@click.group()
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar=settings.HOME_ENV,
    help="State directory (default ./.qabuse; env QABUSE_HOME).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def main(home: Path | None, verbose: bool) -> None:
    """qabuse: predictive abuse detection for quantum cloud APIs."""
    _quiet_libraries()
    if verbose:
        logging.getLogger().setLevel(logging.INFO)
    settings.export_home(home)


@main.command()
@click.option(
    "--hours",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Simulated horizon in hours (default 48 unless --days is given).",
)
@click.option(
    "--days",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Simulated horizon in days (instead of --hours).",
)
@click.option(
    "--scenarios",
    default="all",
    show_default=True,
    metavar="NAMES",
    help="Comma-separated abuse scenarios, or 'all', placed in the second half of the "
    "horizon with the legitimate look-alikes (classrooms, benchmarking); or 'reference' "
    "for the reference deployment: benign tenants and one runaway CI from 70% of the "
    "horizon (what `qabuse demo` runs). A population shift (sdk_release) joins by name, "
    "e.g. 'all,sdk_release': benign tenants change their use mid horizon, without abuse.",
)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for telemetry.jsonl and incidents.jsonl.",
)
@click.option(
    "--start",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d"]),
    default=None,
    help="First instant (UTC if no offset); default 2026-11-02.",
)
@click.option(
    "--demo-key",
    is_flag=True,
    help="Hash identifiers with the public demo key instead of QABUSE_HASH_KEY.",
)
def simulate(
    hours: float | None,
    days: float | None,
    scenarios: str,
    seed: int,
    out: Path,
    start: datetime | None,
    demo_key: bool,
) -> None:
    """Write contract telemetry and incident labels of a simulated shared backend."""
    from qabuse_dagster.simulation import SCENARIOS
    from qabuse_dagster.simulation import simulate as run_simulation
    from qabuse_dagster.simulation.shifts import SHIFTS
    from qabuse_dagster.simulation.twin import DEFAULT_START

    if hours is not None and days is not None:
        raise click.UsageError("give --hours or --days, not both")
    if hours is None and days is None:
        hours = 48.0
    names = None
    if scenarios.strip() != "reference":
        names = [n.strip() for n in scenarios.split(",") if n.strip()]
        unknown = sorted(set(names) - set(SCENARIOS) - set(SHIFTS) - {"all"})
        if unknown or not names:
            raise click.BadParameter(
                f"unknown scenario(s) {unknown}; known: all, reference, "
                f"{', '.join(sorted(SCENARIOS))}; population shifts: {', '.join(sorted(SHIFTS))}",
                param_hint="--scenarios",
            )
    begin = (
        DEFAULT_START if start is None else (start if start.tzinfo else start.replace(tzinfo=UTC))
    )
    result = run_simulation(
        hours=hours,
        days=days,
        scenarios=names,
        seed=seed,
        out=out,
        hasher=_hasher(demo_key),
        start=begin,
        progress=sys.stderr.isatty(),
    )
    click.echo(
        f"{result.n_records} records ({result.n_jobs} jobs, {len(result.api_keys)} api keys)"
        f" -> {result.telemetry_path}"
    )
    # The twin's ground truth of who each key is, for `qabuse evaluate --key-kinds`.
    key_kinds = out / "key_kinds.json"
    key_kinds.write_text(json.dumps(result.api_keys, indent=1, sort_keys=True))
    click.echo(f"tenant kind of each key -> {key_kinds}")
    kinds = sorted({label.kind for label in result.incidents})
    click.echo(
        f"{len(result.incidents)} incident(s) ({', '.join(kinds)}) on "
        f"{len(result.incident_api_key_ids)} key(s) -> {result.labels_path}"
    )


@main.command()
@click.argument(
    "paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Incident labels (JSONL) to keep beside the telemetry.",
)
@click.option(
    "--tenant",
    default="local",
    show_default=True,
    help="Who the records are stored as sent by; duplicates are judged per tenant.",
)
def ingest(paths: tuple[Path, ...], labels: Path | None, tenant: str) -> None:
    """Validate telemetry files (JSONL or Parquet) and stage them for the raw partitions.

    Records outside the accepted time range (QABUSE_TELEMETRY_START to an hour past the
    clock, QABUSE_MAX_CLOCK_SKEW_S) are rejected too. Exits 1 when any record was
    rejected (they are kept in the quarantine).
    """
    from qabuse_dagster.ingest.files import ingest_labels, ingest_telemetry
    from qabuse_dagster.telemetry.labels import LabelsError

    if not tenant.strip():
        raise click.BadParameter("must not be empty", param_hint="--tenant")
    try:
        report = ingest_telemetry(paths, settings.paths(), tenant=tenant.strip())
    except ValueError as exc:  # a setting such as QABUSE_TELEMETRY_START is malformed
        raise click.UsageError(str(exc)) from None
    out_of_range = f" ({report.out_of_range} outside the time range)" if report.out_of_range else ""
    click.echo(
        f"{report.lines} lines: {report.accepted} accepted, {report.duplicates} duplicates,"
        f" {report.rejected} rejected{out_of_range}"
    )
    for rejection in report.rejections[:10]:
        click.echo(f"  {rejection.source}:{rejection.line}: {rejection.reason}", err=True)
    if report.quarantine_file:
        click.echo(f"rejected lines kept in {report.quarantine_file}", err=True)
    if labels is not None:
        try:
            stored = ingest_labels(labels, settings.paths())
        except LabelsError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"{len(stored)} incident label(s) stored in {settings.paths().labels}")
    if report.rejected:
        sys.exit(1)


@main.command()
@click.option("--no-train", is_flag=True, help="Only compact telemetry and compute features.")
def materialize(no_train: bool) -> None:
    """Materialise the asset graph over every hour waiting in the landing area."""
    from qabuse_dagster.ingest.partitions import landing_hours
    from qabuse_dagster.pipeline import NothingToMaterialise, run_pipeline

    hours = landing_hours(settings.paths().landing)
    if not hours:
        raise click.ClickException("nothing to materialise: run `qabuse ingest` first")
    try:
        result = run_pipeline(hours, train=not no_train)
    except NothingToMaterialise as exc:
        raise click.ClickException(str(exc)) from None
    for hour in result.skipped_hours:
        click.echo(
            f"skipped landed hour {hour.isoformat()}: no hourly partition holds it (files "
            f"left in {settings.paths().landing})",
            err=True,
        )
    click.echo(
        f"partitions {result.partitions[0]} .. {result.partitions[1]} materialised "
        f"({len(result.telemetry_run_ids)} run(s) of consecutive hours)"
    )
    if result.trained is not None:
        held = [name.partition(":")[2] for name in result.failed_checks if "ensemble" in name]
        click.echo(
            f"model {result.trained.ref.name} v{result.trained.ref.version}; "
            + (
                "@champion promoted"
                if result.champion_promoted
                else f"kept as @challenger ({', '.join(held) or 'see the Dagster UI'} failed)"
            )
        )
    if result.held_families:
        click.echo(
            f"families that missed their floors (their @champion did not move): "
            f"{', '.join(result.held_families)}"
        )


@main.command()
@click.option("--window", type=click.Choice(["1m", "5m", "1h"]), help="Only this window's view.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def features(window: str | None, as_json: bool) -> None:
    """List every window feature: name, Feast view window, unit, bounds and meaning."""
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from qabuse_dagster.features.definitions import DETECTOR_FEATURES, FEATURES

    chosen = [f for f in FEATURES if window is None or f.window == window]
    if as_json:
        click.echo(json.dumps([asdict(f) for f in chosen], indent=2))
        return
    table = Table(title=f"{len(chosen)} features per entity (api key, user)")
    for column in ("feature", "window", "unit", "range", "meaning"):
        table.add_column(column, overflow="fold")

    def bound(value: float | None, unbounded: str) -> str:
        return unbounded if value is None else f"{value:g}"

    for f in chosen:
        name = f"{f.name} *" if f.name in DETECTOR_FEATURES else f.name
        span = f"[{bound(f.low, '-inf')}, {bound(f.high, 'inf')}]"
        table.add_row(name, f.window, f.unit, span, f.description)
    table.caption = "* an input of the api-key detector (feature service api_key_detector_v1)"
    Console(width=max(120, Console().width)).print(table)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=3001, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes on the port [default: QABUSE_SCORER_WORKERS, else one per core, "
    "at most 4].",
)
def serve(host: str, port: int, workers: int | None) -> None:
    """Serve POST /score and POST /score/batch with BentoML (foreground)."""
    from qabuse_dagster.serving.server import serve_forever

    sys.exit(serve_forever(host, port, workers))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8787, show_default=True)
@click.option(
    "--max-body-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=8.0,
    show_default=True,
    help="Larger request bodies are answered 413.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=50.0,
    show_default=True,
    help="Requests per second per token, on average (more are answered 429).",
)
@click.option(
    "--burst", type=click.IntRange(min=1), default=100, show_default=True, help="Bucket size."
)
@click.option(
    "--compact-every",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds between moves of accepted records into the landing area.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Server processes; they share the spool, the rate limits and the compaction.",
)
@click.option(
    "--max-records",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Bodies with more records are answered 413, before any is validated.",
)
@click.option(
    "--quarantine-mb-per-hour",
    type=click.FloatRange(min=0),
    default=64.0,
    show_default=True,
    help="Quarantine each token may fill per hour; later rejections are only counted.",
)
@click.option(
    "--rejections-per-minute",
    type=click.IntRange(min=1),
    default=50_000,
    show_default=True,
    help="Rejected records a tenant may send per minute; past it, 429 until the minute ends.",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds a client has for its request line and headers, in all (then 408).",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds a client has for its body once the headers are in (then 408).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=None,
    help="Open connections per process [default and ceiling: the open-files limit less "
    "128 kept for the collector's files]. Over it, the oldest waiting for headers is shed.",
)
@click.option(
    "--trusted-tenant",
    "trusted_tenants",
    multiple=True,
    metavar="TENANT",
    help="A tenant trusted with every API key (a provider's own gateway): it claims none and "
    "is refused none. Other tenants may report the keys they reported first. Repeatable.",
)
@click.option(
    "--bus",
    "bus_url",
    metavar="NATS_URL",
    default=None,
    help="Publish accepted batches to the ingest bus (NATS JetStream) at this URL, in "
    "QABUSE_BUS_SHARDS shards [default: QABUSE_BUS_URL; unset, no bus: the spool alone].",
)
def collector(
    host: str,
    port: int,
    max_body_mb: float,
    rate: float,
    burst: int,
    compact_every: float,
    workers: int,
    max_records: int,
    quarantine_mb_per_hour: float,
    rejections_per_minute: int,
    header_timeout: float,
    body_timeout: float,
    max_connections: int | None,
    trusted_tenants: tuple[str, ...],
    bus_url: str | None,
) -> None:
    """Serve POST /v1/telemetry for HttpSink clients (foreground).

    Tokens come from QABUSE_COLLECTOR_TOKENS: comma-separated tenant:token pairs (a tenant
    may hold several tokens). Each tenant's records are deduplicated among its own.
    """
    import os

    from qabuse_dagster.ingest.collector import TOKENS_ENV, parse_tokens, serve

    try:
        tokens = parse_tokens(os.environ.get(TOKENS_ENV, ""))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if not tokens:
        raise click.UsageError(
            f"no client tokens: set {TOKENS_ENV} to comma-separated tenant:token pairs, "
            f"e.g. {TOKENS_ENV}=ci:$(openssl rand -hex 24)"
        )
    unknown = sorted(set(trusted_tenants) - set(tokens.values()))
    if unknown:
        raise click.BadParameter(
            f"{', '.join(unknown)} hold(s) no token in {TOKENS_ENV}", param_hint="--trusted-tenant"
        )
    click.echo(
        f"collector on http://{host}:{port}/v1/telemetry for {len(tokens)} client(s); "
        f"spool under {settings.paths().home / 'collector'}",
        err=True,
    )
    bus_url = bus_url or settings.bus_url()
    if bus_url:
        click.echo(f"publishing to the ingest bus at {bus_url}", err=True)
    serve(
        host,
        port,
        paths=settings.paths(),
        tokens=tokens,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        rate_per_s=rate,
        burst=burst,
        compact_every_s=compact_every,
        workers=workers,
        max_records=max_records,
        quarantine_bytes_per_hour=int(quarantine_mb_per_hour * 1024 * 1024),
        rejections_per_minute=rejections_per_minute,
        header_timeout_s=header_timeout,
        body_timeout_s=body_timeout,
        max_connections=max_connections,
        trusted_tenants=trusted_tenants,
        bus_url=bus_url,
        bus_shards=settings.bus_shards() if bus_url else 1,
    )


@main.command()
@click.option(
    "--lateness",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds a record may arrive behind the latest and still count; each minute's rows "
    "wait this long after the minute before they are scored.",
)
@click.option(
    "--poll",
    type=click.FloatRange(min=0.01),
    default=0.15,
    show_default=True,
    help="Seconds between polls of the collector's spool when it has nothing new.",
)
@click.option(
    "--ladder",
    "ladder_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The mitigation ladder's settings (JSON or YAML); default the built-in ladder.",
)
@click.option(
    "--bus",
    "bus_url",
    metavar="NATS_URL",
    default=None,
    help="Read the ingest bus (NATS JetStream) at this URL instead of the spool "
    "[default: QABUSE_BUS_URL; unset, the collector's spool].",
)
@click.option(
    "--shard",
    default="0/1",
    show_default=True,
    metavar="I/N",
    help="On the bus: run as worker I of N (0-based); it computes the keys and users of its "
    "shards, and reads the others' records for backend load and code-hash sharing only.",
)
def stream(
    lateness: float, poll: float, ladder_file: Path | None, bus_url: str | None, shard: str
) -> None:
    """Tail the collector's spool: push features online, score, decide (foreground).

    Each closed minute's rows go to the Feast online store; each key that got one is
    scored with @champion, and the mitigation engine's decisions are appended to the
    decision ledger (in shadow mode as QABUSE_ENFORCE says). Stops on SIGTERM or Ctrl-C
    after the batch in progress; figures in $QABUSE_HOME/run/stream-stats.json.

    With the ingest bus (--bus or QABUSE_BUS_URL) it reads the collectors' NATS JetStream
    stream instead, as worker I of N (--shard): the keys and users of its shards are its own.
    """
    from datetime import timedelta

    import yaml
    from pydantic import ValidationError

    from qabuse_dagster.ingest.bus import WorkerShard
    from qabuse_dagster.response.ladder import Ladder
    from qabuse_dagster.serving.stream_worker import StreamOptions, run_stream

    ladder = None
    if ladder_file is not None:
        try:
            ladder = Ladder.model_validate(yaml.safe_load(ladder_file.read_text()) or {})
        except (yaml.YAMLError, ValidationError) as exc:
            raise click.BadParameter(str(exc), param_hint="--ladder") from None
    try:
        worker_shard = WorkerShard.parse(shard)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--shard") from None
    bus_url = bus_url or settings.bus_url()
    if worker_shard.count > 1 and not bus_url:
        raise click.UsageError(f"--shard {shard} needs the bus: --bus or {settings.BUS_URL_ENV}")
    if bus_url and worker_shard.count > settings.bus_shards():
        raise click.BadParameter(
            f"{worker_shard.count} workers but {settings.bus_shards()} bus shards "
            f"({settings.BUS_SHARDS_ENV}): some workers would own none",
            param_hint="--shard",
        )
    options = StreamOptions(
        allowed_lateness=timedelta(seconds=lateness),
        poll_s=poll,
        bus_url=bus_url,
        shard=worker_shard,
        bus_shards=settings.bus_shards() if bus_url else 1,
    )
    sys.exit(run_stream(options, ladder, say=lambda line: click.echo(line, err=True)))


@main.command()
@click.option(
    "--hours",
    type=click.FloatRange(min=72),
    default=96.0,
    show_default=True,
    help="Simulated horizon: a day whose day-long features warm up, then at least a day "
    "of training with its daily cycle, then the incidents.",
)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option(
    "--calls",
    type=click.IntRange(min=10),
    default=200,
    show_default=True,
    help="/score calls timed for the latency figures.",
)
def demo(hours: float, seed: int, calls: int) -> None:
    """Simulate, ingest, materialise through Dagster, serve, score and report."""
    from qabuse_dagster.demo import run_demo

    sys.exit(run_demo(hours=hours, seed=seed, calls=calls))


@main.command()
@click.option("--dagster-port", type=int, default=3000, show_default=True)
@click.option("--mlflow-port", type=int, default=5000, show_default=True)
@click.option("--serve-port", type=int, default=3001, show_default=True)
@click.option("--collector-port", type=int, default=8787, show_default=True)
@click.option("--gateway-port", type=int, default=8181, show_default=True)
@click.option(
    "--profile",
    type=click.Choice(settings.PROFILES),
    envvar=settings.PROFILE_ENV,
    default=settings.PROFILES[0],
    show_default=True,
    help="embedded: every store under QABUSE_HOME. production: PostgreSQL, Redis (and "
    "NATS) servers given by URL (QABUSE_DAGSTER_PG_URL, QABUSE_MLFLOW_TRACKING_URI, "
    "QABUSE_LEDGER_URL, QABUSE_REDIS, QABUSE_BUS_URL); env QABUSE_PROFILE.",
)
@click.option(
    "--only",
    metavar="NAMES",
    default=None,
    help="Start only these, comma-separated: dagster, mlflow, bentoml, collector, stream, "
    "gateway (e.g. the UIs on one machine, collectors and stream workers on others).",
)
def up(
    dagster_port: int,
    mlflow_port: int,
    serve_port: int,
    collector_port: int,
    gateway_port: int,
    profile: str,
    only: str | None,
) -> None:
    """Start every server until Ctrl-C: the UIs, /score, the collector, stream and gateway."""
    import os

    from qabuse_dagster.profile import ProfileError
    from qabuse_dagster.stack import STACK_SERVERS, run_stack

    names = None if only is None else [name.strip() for name in only.split(",") if name.strip()]
    if names is not None and (not names or set(names) - set(STACK_SERVERS)):
        unknown = sorted(set(names) - set(STACK_SERVERS))
        raise click.BadParameter(
            f"{'unknown ' + ', '.join(unknown) if unknown else 'no name'}: expected some of "
            f"{', '.join(STACK_SERVERS)}",
            param_hint="--only",
        )
    os.environ[settings.PROFILE_ENV] = profile  # the servers started inherit it
    try:
        code = run_stack(
            dagster_port,
            mlflow_port,
            serve_port,
            click.echo,
            collector_port=collector_port,
            gateway_port=gateway_port,
            only=names,
        )
    except ProfileError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


@main.command()
@click.option(
    "--telemetry",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Contract telemetry (JSONL).",
)
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Incident labels (JSONL).",
)
@click.option(
    "--train-until",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"]),
    default=None,
    help="End of the training part (UTC if no offset); default the middle of the span.",
)
@click.option(
    "--detector",
    default="all",
    show_default=True,
    help="Detectors to backtest: all (every registered family, the ensemble champion and "
    "the tutorial baseline) or a comma-separated list of family names, ensemble, baseline.",
)
@click.option(
    "--key-kinds",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="JSON object api_key_id -> tenant kind, to report benign look-alikes per kind.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Report JSON: the first detector's report (the ensemble's with all) at the top, "
    "every detector's under 'detectors'.",
)
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option(
    "--analyst-labels",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Labels analysts gave on the triage page (false positives, confirmed abuse), "
    "counted beside --labels; default $QABUSE_HOME/labels/analyst.jsonl when it exists.",
)
@click.option(
    "--alert-budget",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    default=settings.DEFAULT_ALERT_BUDGET,
    show_default=True,
    help="Share of training key-days each family's (and the ensemble's) threshold lets alert.",
)
@click.option(
    "--closed-loop/--no-closed-loop",
    default=None,
    help="Rerun the twin with qabuse mitigating and compare legitimate users' queue wait "
    "(needs the twin.json that `qabuse simulate` writes beside the telemetry, and the "
    "hash key it used). Default: on when that file is there.",
)
def evaluate(
    telemetry: Path,
    labels: Path,
    train_until: datetime | None,
    detector: str,
    key_kinds: Path | None,
    json_out: Path,
    html_out: Path | None,
    analyst_labels: Path | None,
    alert_budget: float,
    closed_loop: bool | None,
) -> None:
    """Backtest detectors on labelled telemetry: train on the past, replay the rest.

    On the twin's own output it also closes the loop: the twin runs again with qabuse
    throttling, challenging and revoking keys as it goes, and the report compares
    legitimate users' queue wait with and without it.
    """
    import json
    import os

    from rich.console import Console
    from rich.table import Table

    from qabuse_dagster.evaluation.families import ENSEMBLE, TrainingParams, resolve_names
    from qabuse_dagster.evaluation.html_report import write_html
    from qabuse_dagster.evaluation.report import (
        BASELINE,
        KIND_TABLE_COLUMNS,
        BacktestError,
        TelemetryFileError,
        kind_table_rows,
        log_to_mlflow,
        read_telemetry_jsonl,
        run_backtests,
    )
    from qabuse_dagster.simulation.twin import MANIFEST_FILE
    from qabuse_dagster.telemetry.labels import LabelsError, read_labels

    try:
        table = read_telemetry_jsonl(telemetry)
        incidents = read_labels(labels)
    except (TelemetryFileError, LabelsError) as exc:
        raise click.ClickException(str(exc)) from None
    incidents += _analyst_labels(analyst_labels, table, {i.incident_id for i in incidents})
    kinds = None
    if key_kinds is not None:
        kinds = json.loads(key_kinds.read_text(encoding="utf-8"))
        if not isinstance(kinds, dict):
            raise click.ClickException(f"{key_kinds}: expected a JSON object key -> kind")
    cutoff = None
    if train_until is not None:
        cutoff = train_until if train_until.tzinfo else train_until.replace(tzinfo=UTC)
    wanted = [name.strip() for name in detector.split(",") if name.strip()]
    if wanted == ["all"]:
        names = [ENSEMBLE, *resolve_names("all"), BASELINE]
    else:
        try:
            resolve_names([n for n in wanted if n not in (ENSEMBLE, BASELINE)])
        except (KeyError, ValueError) as exc:
            raise click.BadParameter(str(exc).strip("'\""), param_hint="--detector") from None
        names = wanted
    try:
        reports = run_backtests(
            table,
            incidents,
            train_until=cutoff,
            detectors=names,
            key_kinds=kinds,
            params=TrainingParams(alert_budget=alert_budget),
        )
    except BacktestError as exc:
        raise click.ClickException(f"{labels}: {exc}") from None
    manifest_path = telemetry.parent / MANIFEST_FILE
    loop = None
    if closed_loop or (closed_loop is None and manifest_path.exists()):
        try:
            loop = _closed_loop(manifest_path, table, reports[0].train_until, alert_budget)
        except click.ClickException as exc:
            if closed_loop:
                raise
            click.echo(f"closed loop skipped: {exc.message}", err=True)
    out = reports[0].to_dict()
    out["detectors"] = {report.detector: report.to_dict() for report in reports}
    if BASELINE in out["detectors"]:
        out["baseline"] = out["detectors"][BASELINE]
    if loop is not None:
        out["closed_loop"] = loop.to_dict()
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(out, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    view = Table(title=f"Backtest from {reports[0].train_until:%Y-%m-%d %H:%M} UTC")
    for column in KIND_TABLE_COLUMNS:
        view.add_column(column, justify="left" if column in ("kind", "detector") else "right")
    for row in kind_table_rows(reports):
        view.add_row(*row)
    console = Console(width=160)
    console.print(view)
    if loop is not None:
        from qabuse_dagster.evaluation.closed_loop import (
            CLOSED_LOOP_COLUMNS,
            closed_loop_rows,
            closed_loop_summary,
        )

        loop_view = Table(title="Closed loop: the twin without -> with qabuse mitigating")
        for column in CLOSED_LOOP_COLUMNS:
            loop_view.add_column(column, justify="left" if column == "scope" else "right")
        for row in closed_loop_rows(loop):
            loop_view.add_row(*row)
        console.print(loop_view)
        click.echo(closed_loop_summary(loop))
    for report in reports:
        feedback = report.analyst
        if feedback is not None:
            precision = "-" if feedback.precision is None else f"{feedback.precision:.2f}"
            click.echo(
                f"{report.detector}: alerts on {feedback.alerted_confirmed} of "
                f"{feedback.confirmed} confirmed and {feedback.alerted_false_positives} of "
                f"{feedback.false_positives} false-positive analyst labels "
                f"(precision {precision})"
            )
    click.echo(f"report -> {json_out}")
    if html_out is not None:
        click.echo(f"html -> {write_html(reports, html_out, closed_loop=loop)}")
    tracking_uri = os.environ.get(settings.MLFLOW_URI_ENV)
    if tracking_uri:
        run_ids = log_to_mlflow(reports, tracking_uri, closed_loop=loop)
        click.echo(f"metrics logged to MLflow runs {', '.join(run_ids)}")


def _analyst_labels(path: Path | None, table: pa.Table, known: set[str]) -> list[Any]:
    """The analysts' labels for keys of ``table``, counted aloud; none without the file."""
    from qabuse_dagster.telemetry.labels import (
        BENIGN_LABEL_KINDS,
        LabelsError,
        read_labels,
    )

    explicit = path is not None
    path = path if path is not None else settings.paths().analyst_labels
    if not path.exists():
        if explicit:
            raise click.BadParameter(f"{path} does not exist", param_hint="--analyst-labels")
        return []
    try:
        given = read_labels(path)
    except LabelsError as exc:
        raise click.ClickException(str(exc)) from None
    keys = set(table.column("api_key_id").unique().to_pylist())
    users = set(table.column("user").unique().to_pylist())
    kept = [
        label
        for label in given
        if label.incident_id not in known
        and (set(label.api_key_ids or ()) <= keys and set(label.users or ()) <= users)
    ]
    benign = sum(label.kind in BENIGN_LABEL_KINDS for label in kept)
    click.echo(
        f"analyst labels from {path}: {len(kept)} of {len(given)} name keys of this "
        f"telemetry ({benign} false positive, {len(kept) - benign} confirmed abuse)"
    )
    return kept


def _closed_loop(
    manifest_path: Path,
    telemetry: pa.Table,
    train_until: datetime,
    alert_budget: float,
) -> ClosedLoopReport:
    """Rerun the twin of ``manifest_path`` with and without qabuse; click errors on misuse."""
    from qabuse_dagster.evaluation.closed_loop import closed_loop_backtest
    from qabuse_dagster.evaluation.families import TrainingParams
    from qabuse_dagster.simulation.twin import TwinManifest

    try:
        manifest = TwinManifest.read(manifest_path)
        return closed_loop_backtest(
            manifest,
            _hasher(manifest.demo_key),
            train_until=train_until,
            params=TrainingParams(alert_budget=alert_budget),
            expected_keys=set(telemetry.column("api_key_id").to_pylist()),
            progress=True,
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def audit() -> None:
    """Check the decision ledger's integrity."""


@audit.command("verify")
@click.option(
    "--ledger",
    "url",
    metavar="URL",
    default=None,
    help="sqlite:///PATH or postgresql://...; default QABUSE_LEDGER_URL, else the embedded "
    "ledger under QABUSE_HOME.",
)
def audit_verify(url: str | None) -> None:
    """Recompute the ledger's hash chain and compare it with its head.

    Prints one line per problem (edited, deleted, reordered or truncated records) and
    exits 1, or prints the count and the head hash to anchor elsewhere.
    """
    from qabuse_dagster.response.ledger import LedgerError, verify_ledger

    try:
        report = verify_ledger(url)
    except ValueError as exc:  # the URL's scheme, or a malformed QABUSE_SIGNING_KEY
        raise click.UsageError(str(exc)) from None
    except LedgerError as exc:
        raise click.ClickException(str(exc)) from None
    if report.ok:
        click.echo(f"ok: {report.count} entries, head {report.head_hash[:12]}")
        return
    for problem in report.problems:
        click.echo(str(problem))
    sys.exit(1)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8181, show_default=True)
def gateway(host: str, port: int) -> None:
    """Serve the gateway decision API, POST /v1/authorize (foreground).

    Answers come from a decision table that follows the ledger; an API gateway calls it
    as an Envoy ext_authz HTTP service, with a bearer token of the gateway role.
    """
    import uvicorn

    settings.export_home()
    uvicorn.run(
        "qabuse_dagster.response.gateway:app", factory=True, host=host, port=port, workers=1
    )


@main.group()
def tokens() -> None:
    """Bearer tokens of the gateway, analysts, approvers and key owners."""


@tokens.command("add")
@click.argument("principal")
@click.option(
    "--role",
    "roles",
    multiple=True,
    required=True,
    type=click.Choice(["gateway", "analyst", "approver", "owner"]),
    help="Repeat for several roles.",
)
@click.option("--key", "api_keys", multiple=True, help="An api key id an owner may act on.")
def tokens_add(principal: str, roles: tuple[str, ...], api_keys: tuple[str, ...]) -> None:
    """Create PRINCIPAL's token; it is printed once and stored only as a hash."""
    from qabuse_dagster.response.auth import add_token

    try:
        token = add_token(principal, list(roles), api_keys=list(api_keys))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(token)


def _principal(token: str | None):  # type: ignore[no-untyped-def]
    """The principal a bearer token names, or a usage error that says why not."""
    from qabuse_dagster.response.auth import TokenStore

    if not token:
        raise click.UsageError("give your token with --token or QABUSE_TOKEN")
    principal = TokenStore.load().authenticate(token)
    if principal is None:
        raise click.UsageError("that token is unknown: see `qabuse tokens add`")
    return principal


_TOKEN = click.option(
    "--token", envvar="QABUSE_TOKEN", default=None, help="Your bearer token (or QABUSE_TOKEN)."
)


@main.command()
@click.argument(
    "step",
    type=click.Choice(["list", "approve", "deny", "uphold", "reject", "propose"]),
    default="list",
)
@click.argument("target", required=False)
@click.option("--reason", default="", help="Why: it goes to the ledger.")
@click.option(
    "--action",
    type=click.Choice(["revoke", "rotate"]),
    default="revoke",
    show_default=True,
    help="With propose: what to propose.",
)
@_TOKEN
@click.option("--json", "as_json", is_flag=True, help="With list: print JSON.")
def review(
    step: str,
    target: str | None,
    reason: str,
    action: str,
    token: str | None,
    as_json: bool,
) -> None:
    """The review queue: list it, or act on entry TARGET (propose: on api key TARGET).

    approve/deny: a proposed revocation or a review (approvers; never your own proposal).
    uphold/reject: an owner's appeal (analysts). propose: a revocation by hand.
    """
    from qabuse_dagster.response import review as workflow
    from qabuse_dagster.response.ledger import LedgerError, open_ledger

    try:
        with open_ledger() as ledger:
            if step == "list":
                _print_queue(workflow.review_queue(ledger), as_json)
                return
            principal = _principal(token)
            if target is None:
                raise click.UsageError(f"{step} needs a TARGET")
            if step == "propose":
                written = [workflow.propose(ledger, principal, target, action, reason)]
            else:
                try:
                    seq = int(target)
                except ValueError:
                    raise click.UsageError(
                        f"TARGET must be a ledger entry number: {target!r}"
                    ) from None
                steps: dict[str, Any] = {
                    "approve": workflow.approve,
                    "deny": workflow.deny,
                    "uphold": workflow.uphold_appeal,
                    "reject": workflow.reject_appeal,
                }
                done = steps[step](ledger, principal, seq, reason)
                written = done if isinstance(done, list) else [done]
    except workflow.ReviewError as exc:
        raise click.ClickException(str(exc)) from None
    except LedgerError as exc:
        raise click.ClickException(str(exc)) from None
    for record in written:
        entry = record.entry
        click.echo(f"{record.seq}: {entry.action} {entry.api_key_id} by {entry.actor}")


def _print_queue(items: list[Any], as_json: bool) -> None:
    rows = [
        {
            "seq": item.seq,
            "waits_for": item.kind,
            "action": item.record.entry.action,
            "api_key_id": item.api_key_id,
            "by": item.record.entry.actor,
            "reason": item.record.entry.reason,
        }
        for item in items
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("the review queue is empty")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"review queue ({len(rows)})")
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(value) for value in row.values()))
    Console().print(table)


@main.group()
def model() -> None:
    """The served model's @champion, moved by hand: promote a version, or roll back."""


@model.command("promote")
@click.argument("version")
@click.option("--reason", required=True, help="Why: it goes to the ledger.")
@_TOKEN
def model_promote(version: str, reason: str, token: str | None) -> None:
    """Make VERSION of the served model @champion (approvers); the ledger records it.

    The scorers follow the alias within their refresh interval; `qabuse model rollback`
    returns to the champion VERSION replaces.
    """
    from qabuse_dagster import model_registry

    principal = _approver(token)
    with _model_ledger() as ledger:
        try:
            previous, new = model_registry.promote(version)
        except (model_registry.ModelNotFoundError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        if previous is not None and previous.version == new.version:
            click.echo(f"{new.name} v{new.version} is @champion already; nothing changed")
            return
        record = ledger.append(_model_entry("promote_model", principal.name, previous, new, reason))
    before = f"v{previous.version}" if previous is not None else "none"
    click.echo(f"{record.seq}: @champion of {new.name}: {before} -> v{new.version}")


@model.command("rollback")
@click.option("--reason", required=True, help="Why: it goes to the ledger.")
@_TOKEN
def model_rollback(reason: str, token: str | None) -> None:
    """Return @champion to the version the current champion replaced (approvers)."""
    from qabuse_dagster import model_registry

    principal = _approver(token)
    with _model_ledger() as ledger:
        try:
            current, target = model_registry.rollback()
        except model_registry.ModelNotFoundError as exc:
            raise click.ClickException(str(exc)) from None
        entry = _model_entry("rollback_model", principal.name, current, target, reason)
        record = ledger.append(entry)
    click.echo(f"{record.seq}: @champion of {target.name}: v{current.version} -> v{target.version}")


def _approver(token: str | None):  # type: ignore[no-untyped-def]
    principal = _principal(token)
    if not principal.has_role("approver"):
        raise click.UsageError(f"{principal.name} is not an approver: only approvers move models")
    return principal


@contextlib.contextmanager
def _model_ledger() -> Iterator[Any]:
    """The decision ledger, opened before @champion moves: a move it cannot record is refused."""
    from qabuse_dagster.response.ledger import LedgerError, open_ledger

    try:
        ledger = open_ledger()
    except (LedgerError, ValueError) as exc:  # unreachable, or misconfigured (URL, key)
        raise click.ClickException(f"the ledger cannot record the move: {exc}") from None
    with ledger:
        yield ledger


def _model_entry(action: str, actor: str, before: Any, now: Any, reason: str) -> Any:
    """The ledger entry of a hand-moved @champion."""
    import time

    from qabuse_dagster.response.records import LedgerEntry, model_subject

    return LedgerEntry(
        at_ms=int(time.time() * 1000),
        api_key_id=model_subject(now.name),
        action=action,
        actor=actor,
        reason=reason,
        params={
            "alias": settings.CHAMPION_ALIAS,
            "from_version": None if before is None else before.version,
            "to_version": now.version,
        },
        model_name=now.name,
        model_version=now.version,
    )


@main.group()
def alerts() -> None:
    """Alerts the stream worker wrote: list, show, act on one, and the sinks' outbox."""


@alerts.command("list")
@click.option(
    "--status",
    default="open",
    show_default=True,
    help="open, released, escalated, false_positive, confirmed_abuse, resolved, or all.",
)
@click.option("--action", default=None, help="Only alerts of this action (throttle, ...).")
@click.option("--family", default=None, help="Only alerts whose top family is this.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines (whole alerts).")
def alerts_list(
    status: str, action: str | None, family: str | None, limit: int, as_json: bool
) -> None:
    """Alerts by score, then impact, highest first (what the triage page's queue shows)."""
    from qabuse_dagster.response.alert_store import STATUSES, AlertStore

    if status != "all" and status not in STATUSES:
        raise click.BadParameter(f"expected all or one of {STATUSES}", param_hint="--status")
    with AlertStore() as store:
        found = store.alerts(
            status=None if status == "all" else status,
            action=action,
            family=family,
            limit=limit,
        )
    if as_json:
        for stored in found:
            click.echo(stored.alert.to_json())
        return
    if not found:
        click.echo(f"no {'' if status == 'all' else status + ' '}alerts")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"alerts ({len(found)})")
    for column in ("alert", "score", "action", "mode", "key", "top family", "decided", "status"):
        table.add_column(column)
    for stored in found:
        alert = stored.alert
        table.add_row(
            alert.alert_id[:12],
            f"{alert.score:.2f}",
            alert.action,
            alert.mode,
            alert.api_key_id[:12],
            alert.top_family or "-",
            alert.decided_at.isoformat(timespec="seconds"),
            stored.status,
        )
    Console(width=160).print(table)


@alerts.command("show")
@click.argument("alert_id")
def alerts_show(alert_id: str) -> None:
    """One alert as JSON (an id prefix of 8 characters or more will do)."""
    click.echo(_stored_alert(alert_id).alert.model_dump_json(indent=2))


@alerts.command("act")
@click.argument("alert_id")
@click.argument(
    "step", type=click.Choice(["confirm-abuse", "escalate", "false-positive", "release"])
)
@click.option("--reason", default="", help="Why: it goes to the ledger.")
@click.option(
    "--kind",
    default="confirmed_abuse",
    show_default=True,
    help="With confirm-abuse: the incident label's kind (e.g. runaway_ci).",
)
@_TOKEN
def alerts_act(alert_id: str, step: str, reason: str, kind: str, token: str | None) -> None:
    """Take a triage step on an alert, as the triage page's buttons do."""
    from qabuse_dagster.response import review as workflow
    from qabuse_dagster.response.alert_store import AlertStore
    from qabuse_dagster.response.ledger import LedgerError, open_ledger

    principal = _principal(token)
    stored = _stored_alert(alert_id)
    try:
        with open_ledger() as ledger, AlertStore() as store:
            status = workflow.act_on_alert(
                ledger,
                store,
                principal,
                stored.alert,
                workflow.ALERT_STEPS[step],
                reason or f"{step} from the command line",
                labels_path=settings.paths().analyst_labels,
                kind=kind,
            )
    except workflow.ReviewError as exc:
        raise click.ClickException(str(exc)) from None
    except LedgerError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"alert {stored.alert_id}: {status} by {principal.name}")


@alerts.command("outbox")
def alerts_outbox() -> None:
    """Each sink's deliveries: waiting, delivered, attempts and the last error."""
    from qabuse_dagster.response.alert_store import AlertStore

    with AlertStore() as store:
        status = store.outbox_status()
    if not status:
        click.echo("the outbox is empty")
        return
    for sink, state in sorted(status.items()):
        error = f"; last error: {state['last_error']}" if state["last_error"] else ""
        click.echo(
            f"{sink}: {state['pending']} waiting, {state['delivered']} delivered, "
            f"at most {state['max_attempts']} attempts{error}"
        )


def _stored_alert(alert_id: str):  # type: ignore[no-untyped-def]
    """The stored alert ``alert_id`` names (whole, or a prefix of 8+ characters)."""
    from qabuse_dagster.response.alert_store import AlertStore

    with AlertStore() as store:
        stored = store.get(alert_id)
        if stored is None and len(alert_id) >= 8:
            matches = store.with_prefix(alert_id)
            if len(matches) > 1:
                raise click.BadParameter(f"{alert_id!r} names more than one alert: say more")
            stored = matches[0] if matches else None
    if stored is None:
        raise click.BadParameter(f"no alert {alert_id!r}", param_hint="ALERT_ID")
    return stored


@main.group()
def response() -> None:
    """What mitigation did, or in shadow mode would have done."""


@response.command("report")
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Incident labels (JSONL): keys they name are abusive, every other key legitimate.",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path))
def response_report(labels: Path | None, json_out: Path | None) -> None:
    """The shadow-mode counterfactual: would-be actions, on whom, legitimate keys touched."""
    from rich.console import Console
    from rich.table import Table

    from qabuse_dagster.response.ledger import LedgerError, open_ledger
    from qabuse_dagster.response.review import benign_labels
    from qabuse_dagster.response.shadow import shadow_report
    from qabuse_dagster.telemetry.labels import BENIGN_LABEL_KIND, LabelsError, read_labels

    abusive: set[str] | None = None
    if labels is not None:
        try:
            known = read_labels(labels)
        except (LabelsError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        abusive = {
            key
            for label in known
            if label.kind != BENIGN_LABEL_KIND
            for key in (label.api_key_ids or [])
        }
    try:
        with open_ledger(create=False) as ledger:
            records = list(ledger.records())
    except LedgerError as exc:
        raise click.ClickException(str(exc)) from None
    appealed = {key for label in benign_labels(records) for key in label["api_key_ids"]}
    report = shadow_report(records, abusive_keys=abusive, benign_keys=appealed)
    if json_out is not None:
        json_out.write_text(json.dumps(report.to_dict(), indent=2))
    if not report.rows:
        click.echo("no shadow-mode decisions in the ledger")
        return
    table = Table(title="shadow mode: what enforcement would have done")
    for column in ("action", "decisions", "keys", "legitimate keys", "first", "last"):
        table.add_column(column)
    for row in report.rows:
        table.add_row(
            row.action,
            str(row.decisions),
            str(row.keys),
            "-" if row.legit_keys is None else str(row.legit_keys),
            _iso_ms(row.first_ms),
            _iso_ms(row.last_ms),
        )
    Console().print(table)


def _iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


if __name__ == "__main__":
    main()

"""Collector throughput: records accepted per second over loopback HTTP, and compaction.

Ours: ``qabuse collector`` as a subprocess on 127.0.0.1, ``rounds`` times per worker count in
``Settings.workers``, each with a fresh spool, fed by client threads that POST JSON
arrays of contract records (from the workload twin) on keep-alive connections; the rate
is accepted records over the wall time from the first request to the last answer, each
answer durable (committed and fsynced to the spool) before it is sent. The clients run
on the same 2 cores. The baseline is the file path every collector replaces: ``qabuse
ingest`` of the same records from a JSONL file, in-process (validation and staging, no
network, no fsync per batch). Then the spool is compacted into the landing area and
timed. The cross-check: every record sent is accepted exactly once in every run, and the
compaction stages them all.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from benchmarks.contract_validation import simulated_records
from benchmarks.report import (
    BenchmarkResult,
    busy_machine_note,
    comparison,
    load_average,
    progress_display,
)

NAME = "collector"
BASELINE = "qabuse ingest of the same records from a JSONL file (in-process, no HTTP)"
GOAL_RECORDS_PER_S = 50_000
_TOKEN = "bench-token-0123456789"


@dataclass(frozen=True)
class Settings:
    """Records sent, batch size and client threads."""

    records: int = 60_000
    batch: int = 1_000
    clients: int = 4
    #: Collector processes (``--workers``), one run each; the last is the headline.
    workers: tuple[int, ...] = (1, 2)
    #: Runs of each configuration; the median is reported, with the range.
    rounds: int = 3
    seed: int = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(port: int, server: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the collector exited with {server.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the collector did not become healthy")


def _post_all(port: int, bodies: list[bytes], answers: list[dict[str, Any]]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {_TOKEN}", "Content-Type": "application/json"}
    for body in bodies:
        conn.request("POST", "/v1/telemetry", body=body, headers=headers)
        response = conn.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"collector answered {response.status}: {payload[:200]!r}")
        answers.append(json.loads(payload))
    conn.close()


def _load(
    home: Path,
    workers: int,
    bodies: list[bytes],
    clients: int,
    answers: list[dict[str, Any]],
    progress: Progress,
) -> float:
    """Start a collector on ``home``, send ``bodies`` from ``clients`` threads; seconds taken."""
    port = _free_port()
    env = {**os.environ, "QABUSE_HOME": str(home), "QABUSE_COLLECTOR_TOKENS": f"bench:{_TOKEN}"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qabuse_dagster.cli",
            "collector",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--rate",
            "100000",
            "--burst",
            "100000",
            "--compact-every",
            "3600",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its workers are stopped with it, as a group
    )
    try:
        task = progress.add_task(f"starting qabuse collector --workers {workers}", total=None)
        _wait_healthy(port, server)
        progress.update(task, total=1, completed=1)
        task = progress.add_task(
            f"ours ({workers} worker(s)): {len(bodies)} POSTs from {clients} clients", total=None
        )
        threads = [
            threading.Thread(target=_post_all, args=(port, bodies[i::clients], answers))
            for i in range(clients)
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        progress.update(task, total=1, completed=1)
    finally:
        # SIGKILL: every answer was durable, and a clean stop would compact the spool
        # itself, leaving nothing to time below.
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    return seconds


def run(settings: Settings, console: Console) -> BenchmarkResult:
    """Start a collector, load it from client threads, compact, and time file ingest."""
    from qabuse_dagster.ingest.files import ingest_telemetry
    from qabuse_dagster.ingest.spool import compact
    from qabuse_dagster.settings import Paths

    logging.getLogger("qabuse_dagster").setLevel(logging.WARNING)
    result = BenchmarkResult(name=NAME, title="Telemetry collector throughput", baseline=BASELINE)
    load_averages = [load_average()]
    with (
        tempfile.TemporaryDirectory(prefix="qabuse-bench-collector-") as tmp,
        progress_display(console) as progress,
    ):
        task = progress.add_task(f"simulating {settings.records:,} records", total=None)
        records, _ = simulated_records(settings.records, 6.0, settings.seed)
        progress.update(task, total=1, completed=1)
        n = len(records)
        batches = [records[i : i + settings.batch] for i in range(0, n, settings.batch)]
        bodies = [json.dumps(b).encode() for b in batches]

        answers: list[dict[str, Any]] = []
        spread: dict[int, list[float]] = {workers: [] for workers in settings.workers}
        # Rounds alternate the configurations: this machine's speed drifts by half within
        # minutes, and alternating spreads the drift over both.
        for round_ in range(settings.rounds):
            for workers in settings.workers:
                home = Path(tmp) / f"collector-home-{workers}-{round_}"
                answers = []
                http_s = _load(home, workers, bodies, settings.clients, answers, progress)
                accepted = sum(a["accepted"] for a in answers)
                spread[workers].append(accepted / http_s)
                if accepted != n:
                    result.problems.append(f"{workers} worker(s): accepted {accepted} of {n}")
        rates = {workers: statistics.median(runs) for workers, runs in spread.items()}

        task = progress.add_task("compacting the spool into the landing area", total=None)
        started = time.perf_counter()
        report = compact(Paths(home))
        compact_s = time.perf_counter() - started
        progress.update(task, total=1, completed=1)

        task = progress.add_task("baseline: qabuse ingest of a JSONL file", total=None)
        jsonl = Path(tmp) / "records.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        started = time.perf_counter()
        ingest = ingest_telemetry([jsonl], Paths(Path(tmp) / "ingest-home"))
        ingest_s = time.perf_counter() - started
        progress.update(task, total=1, completed=1)

    load_averages.append(load_average())
    accepted = sum(a["accepted"] for a in answers)
    best = settings.workers[-1]
    result.comparisons = [
        comparison(
            f"accepted records/s, {workers} worker(s)",
            "records/s",
            rate,
            n / ingest_s,
            higher_is_better=True,
        )
        for workers, rate in rates.items()
    ]
    result.facts = {
        "records": n,
        "batch": settings.batch,
        "clients": settings.clients,
        "accepted": accepted,
        "duplicates": sum(a["duplicates"] for a in answers),
        "rejected": sum(len(a["rejected"]) for a in answers),
        "workers": best,
        "http_records_per_s": round(rates[best]),
        **{f"http_records_per_s_{w}_workers": round(r) for w, r in rates.items()},
        **{
            f"http_records_per_s_{w}_workers_range": [round(min(runs)), round(max(runs))]
            for w, runs in spread.items()
        },
        "compaction_records_per_s": round(report.records / compact_s) if compact_s else None,
        "compacted": report.records,
        "ingest_records_per_s": round(n / ingest_s),
        "goal_records_per_s": GOAL_RECORDS_PER_S,
    }
    result.shown_facts = (
        "records",
        "clients",
        "http_records_per_s",
        *(f"http_records_per_s_{w}_workers_range" for w in spread),
        "compaction_records_per_s",
        "ingest_records_per_s",
    )
    if rates[best] < GOAL_RECORDS_PER_S:
        result.notes.append(
            f"median below the issue's goal of {GOAL_RECORDS_PER_S:,} accepted records/s "
            f"with {best} worker(s) (runs: {', '.join(f'{r:,.0f}' for r in spread[best])})"
        )
    busy = busy_machine_note(load_averages)
    if busy:
        result.notes.append(busy)
    if accepted != n or report.records != n or ingest.accepted != n:
        result.problems.append(
            f"sent {n}, accepted {accepted}, compacted {report.records}, "
            f"file ingest accepted {ingest.accepted}"
        )
    return result

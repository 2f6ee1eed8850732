"""``kill -9`` of the collector under load: every acknowledged record survives, none twice."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.records import record_dict

from qabuse_dagster.ingest.collector import TOKENS_ENV
from qabuse_dagster.ingest.partitions import compact_hour, landing_hours, read_raw
from qabuse_dagster.ingest.spool import compact, connect, spool_path
from qabuse_dagster.settings import Paths

H0 = datetime(2026, 3, 2, 13, 0, tzinfo=UTC)
TOKEN = "crash-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
THREADS = 4
BATCH = 200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(home: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, TOKENS_ENV: f"load:{TOKEN}", "QABUSE_HOME": str(home)}
    # Compact often, so the kill can land in the middle of a compaction too.
    command = [sys.executable, "-m", "qabuse_dagster.cli", "collector", "--port", str(port)]
    command += ["--rate", "100000", "--burst", "100000", "--compact-every", "0.2"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "collector exited at start"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("collector did not start")


def batch_records(thread: int, number: int) -> list[dict[str, Any]]:
    # Spread over three hours so compaction writes several partitions.
    return [
        record_dict(f"t{thread}-b{number}-{i}", H0 + timedelta(minutes=(number * 7 + i) % 180))
        for i in range(BATCH)
    ]


@pytest.mark.integration
def test_acknowledged_records_survive_kill_9_exactly_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/telemetry"
    acked: list[set[str]] = [set() for _ in range(THREADS)]
    sent: list[set[str]] = [set() for _ in range(THREADS)]
    failures = [0] * THREADS
    stop = threading.Event()

    def client(thread: int) -> None:
        number = 0
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                records = batch_records(thread, number)
                # Every third request repeats the previous batch: a client retry.
                if number % 3 == 2:
                    records = batch_records(thread, number - 1)
                ids = {r["job_id"] for r in records}
                sent[thread] |= ids
                try:
                    answer = http.post(url, json=records, headers=AUTH)
                except httpx.HTTPError:
                    failures[thread] += 1
                    time.sleep(0.02)
                else:
                    if answer.status_code == 200:
                        body = answer.json()
                        assert body["rejected"] == []
                        assert body["accepted"] + body["duplicates"] == len(records)
                        acked[thread] |= ids
                number += 1

    server = start(home, port)
    threads = [threading.Thread(target=client, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        acked_before_kill = sum(len(a) for a in acked)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        time.sleep(0.3)
        server = start(home, port)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    server.terminate()
    server.wait(timeout=60)

    all_acked = set().union(*acked)
    all_sent = set().union(*sent)
    assert acked_before_kill > 0, "no batch was acknowledged before the kill"
    assert len(all_acked) > acked_before_kill, "no batch was acknowledged after the restart"
    assert sum(failures) > 0, "the kill cut no request short"

    paths = Paths(home)
    conn = connect(spool_path(paths))
    spooled = [job for (job,) in conn.execute("SELECT job_id FROM identities").fetchall()]
    conn.close()
    assert all_acked <= set(spooled)
    assert set(spooled) <= all_sent

    compact(paths)
    for hour in landing_hours(paths.landing):
        compact_hour(hour, paths.landing, paths.raw_telemetry)
    landed = read_raw(paths.raw_telemetry)["job_id"].to_pylist()
    assert len(landed) == len(set(landed)), "a record landed twice"
    assert set(landed) == set(spooled)
    assert all_acked <= set(landed)

"""The ingest bus on a real ``nats-server -js``: collectors publish, sharded workers consume.

Three hours of the twin (every abuse scenario) go through a collector's spool and its
`BusPublisher` in ten-minute batches, one message per shard of each (4 shards), with one
message published twice, as two collectors that accepted the same records would. The
rows the workers push are compared with `StreamingWindows` fed every record once, in the
same order: one worker on every shard, two workers on half each (their cross-entity
features, backend load and code-hash sharing, read every shard), and a worker SIGKILLed
before an acknowledgement whose messages a restarted worker gets again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from fastapi.testclient import TestClient
from support.bus_workers import Rows, bus_worker, drain, read_pushed_files, rows_of
from support.nats_server import local_nats, nats_server_binary
from support.records import record_dict
from support.required import require_installed

from qabuse_dagster.features.definitions import ENTITY_COLUMNS
from qabuse_dagster.features.streaming import StreamingWindows, StreamRecord
from qabuse_dagster.ingest.bus import (
    PUBLISHER,
    STREAM,
    BusConsumer,
    BusPublisher,
    RecordIdentities,
    WorkerShard,
    bus_messages,
    ensure_stream,
    shard_of,
)
from qabuse_dagster.ingest.collector import create_app
from qabuse_dagster.ingest.spool import (
    Spool,
    compact,
    connect,
    consumer_position,
    read_batches,
    spool_path,
)
from qabuse_dagster.ingest.wire import to_spool_row
from qabuse_dagster.processes import free_port
from qabuse_dagster.settings import Paths
from qabuse_dagster.telemetry.contract import format_rfc3339_utc

pytestmark = pytest.mark.integration

SHARDS = 4
#: Longer than a batch's ten minutes: a batch's messages, each in time order, may come in
#: any order among themselves (see `qabuse_dagster.ingest.bus`).
LATENESS = timedelta(minutes=15)
_KEY, _USER = ENTITY_COLUMNS["api_key"], ENTITY_COLUMNS["user"]
_FIELDS = list(StreamRecord._fields)
TOKEN = "bus-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    require_installed(
        nats_server_binary() is not None, "nats-server", "nats-server", "the ingest bus"
    )
    with local_nats() as url:
        yield url


async def _reset_stream(url: str) -> None:
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(STREAM)
        await ensure_stream(js)
    finally:
        await client.close()


def _read_all(url: str, name: str) -> list[Any]:
    consumer = BusConsumer(url, name)
    try:
        batches, got = [], consumer.fetch(1000, 1.0)
        while got:
            batches += got
            consumer.commit(got[-1].seq)  # what follows, not these again
            got = consumer.fetch(1000, 0.2)
        return batches
    finally:
        consumer.close()


def test_a_keys_shard_is_a_stable_hash_and_each_shard_has_one_worker() -> None:
    # Pinned on purpose: another hash would move every key to another shard, and so to
    # another worker, in a running deployment.
    assert [shard_of(k, 16) for k in ("2" * 64, "3" * 64, "a" * 64)] == [3, 8, 4]
    for workers in (1, 2, 3, 16):
        owners = [[i for i in range(workers) if WorkerShard(i, workers).owns(s)] for s in range(16)]
        assert all(len(found) == 1 for found in owners), workers
    assert WorkerShard.parse(" 1/3 ") == WorkerShard(1, 3)
    for bad in ("3/3", "1", "-1/2", "0/0"):
        with pytest.raises(ValueError):
            WorkerShard.parse(bad)


def test_record_identities_are_kept_an_hour_behind_the_watermark() -> None:
    identities = RecordIdentities(timedelta(hours=1))
    hour_ms = 3_600_000
    assert identities.first(("k", "j", "submitted"), 0)
    assert identities.first(("k2", "j", "submitted"), 0)  # another key's job: its own
    assert identities.first(("k", "j", "completed"), 10)  # another status: another record
    identities.forget(watermark_ms=hour_ms)
    assert not identities.first(("k", "j", "submitted"), 0)
    identities.forget(watermark_ms=hour_ms + 5)
    assert len(identities) == 1  # only the record at 10 ms is kept
    assert identities.first(("k", "j", "submitted"), 0)


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--shard", "1/2"], {}, "needs the bus"),
        (["--bus", "nats://127.0.0.1:1", "--shard", "2/2"], {}, "expected 0 <= i < n"),
        (["--bus", "nats://127.0.0.1:1", "--shard", "0/4"], {"QABUSE_BUS_SHARDS": "2"}, "own none"),
    ],
)
def test_qabuse_stream_refuses_a_shard_it_cannot_run(
    args: list[str], env: dict[str, str], says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from qabuse_dagster.cli import main

    monkeypatch.delenv("QABUSE_BUS_URL", raising=False)
    result = CliRunner().invoke(main, ["stream", *args], env=env)
    assert result.exit_code == 2 and says in result.output, result.output


# A collector publishing, end to end.


def test_a_collector_publishes_what_it_accepted_once_after_an_outage(
    nats_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    asyncio.run(_reset_stream(nats_url))
    paths = Paths(tmp_path / "home")
    at = datetime.now(UTC) - timedelta(minutes=5)
    keys = [f"{i:x}" * 64 for i in range(1, 7)]
    first = [record_dict(f"a-{i}", at, api_key_id=keys[i % 6]) for i in range(12)]
    second = [record_dict(f"b-{i}", at, api_key_id=keys[i % 6]) for i in range(12)]
    # The server is away: the collector answers, keeps the batch, and compaction keeps it
    # in the spool until it is published.
    away = f"nats://127.0.0.1:{free_port()}"
    app = create_app(paths, {TOKEN: "ci"}, bus_url=away, bus_shards=SHARDS)
    with caplog.at_level(logging.ERROR, "qabuse_dagster.ingest.bus"), TestClient(app) as client:
        answer = client.post("/v1/telemetry", json=first, headers=AUTH)
        assert answer.status_code == 200 and answer.json()["accepted"] == 12
        # Again: a duplicate for the spool, never published.
        assert client.post("/v1/telemetry", json=first, headers=AUTH).json()["duplicates"] == 12
        _wait(lambda: "publishing failed" in caplog.text)
    assert compact(paths).records == 0
    conn = connect(spool_path(paths))
    assert consumer_position(conn, PUBLISHER) == 0
    # Back: the publisher catches up from its cursor, then follows.
    app = create_app(paths, {TOKEN: "ci"}, bus_url=nats_url, bus_shards=SHARDS)
    with TestClient(app) as client:
        assert client.post("/v1/telemetry", json=second, headers=AUTH).json()["accepted"] == 12
        last = read_batches(conn, 0, 100)[-1].seq
        _wait(lambda: consumer_position(conn, PUBLISHER) == last)
    conn.close()
    assert compact(paths).records == 24  # published: compaction may stage them now
    batches = _read_all(nats_url, "collector-test")
    published = [json.loads(text) for batch in batches for text in batch.records]
    assert sorted(r["job_id"] for r in published) == sorted(r["job_id"] for r in first + second)
    for batch in batches:
        keys_in = {json.loads(text)["api_key_id"] for text in batch.records}
        assert {shard_of(key, SHARDS) for key in keys_in} == {batch.shard}
    assert {b.shard for b in batches} == {shard_of(key, SHARDS) for key in keys}
    assert all(b.accepted_at_ms is not None for b in batches)


def _wait(probe: Any, within_s: float = 15.0) -> None:
    deadline = time.monotonic() + within_s
    while not probe():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.05)


# The twin on the bus.


@dataclass(frozen=True)
class Published:
    url: str
    #: Every record once, in the order published.
    records: list[dict[str, Any]]
    #: The rows of `StreamingWindows` fed those records, once each.
    expected: Rows
    #: How many records the second copy of a message held.
    copied: int


def _twin_records(out: Path) -> list[dict[str, Any]]:
    """Three twin hours with every scenario, moved whole hours to end one to two hours ago."""
    from qabuse_dagster.simulation import simulate
    from qabuse_dagster.telemetry.hashing import KeyedHasher

    logging.getLogger("qabuse_dagster.telemetry.hashing").setLevel(logging.ERROR)
    sim = simulate(hours=3, seed=2, out=out, hasher=KeyedHasher.demo(), scenarios=["all"])
    records = [json.loads(line) for line in sim.telemetry_path.read_text().splitlines()]
    end = max(_instant(r["timestamp"]) for r in records)
    shift = timedelta(hours=(datetime.now(UTC) - timedelta(hours=1) - end) // timedelta(hours=1))
    moved = [
        {**r, "timestamp": format_rfc3339_utc(_instant(r["timestamp"]) + shift)} for r in records
    ]
    return sorted(moved, key=lambda r: r["timestamp"])


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _expected_rows(records: list[dict[str, Any]]) -> Rows:
    rows: Rows = {}
    for entity_column, sequences in ((_KEY, True), (_USER, False)):
        windows = StreamingWindows(LATENESS, entity_column=entity_column, sequences=sequences)
        for r in records:
            record = {name: r.get(name) for name in _FIELDS}
            record["timestamp"] = _instant(r["timestamp"])
            assert windows.update(record)
        rows |= rows_of([(entity_column, windows.advance())])
    return rows


async def _publish(url: str, spool: Spool, groups: list[list[dict[str, Any]]]) -> int:
    """Publish the groups as spool batches; the third last's messages twice. The records
    in the copy."""
    publisher = BusPublisher(spool.database, url, shards=SHARDS)
    client = await nats.connect(url)
    copied = 0
    try:
        js = client.jetstream()
        for i, group in enumerate(groups):
            rows = [to_spool_row(json.dumps(r).encode()) for r in group]
            assert spool.add([r for r in rows if r is not None], "twin", any_key=True).accepted
            assert await publisher.publish_pending(js) == 1
            if i == len(groups) - 3:
                # As a second collector that accepted the same records would publish them.
                (batch,) = read_batches(spool.database, publisher.cursor - 1)
                for subject, payload, headers in bus_messages(batch, SHARDS):
                    headers["Nats-Msg-Id"] += "-from-another-collector"
                    ack = await js.publish(subject, payload, headers=headers, stream=STREAM)
                    assert not ack.duplicate
                    copied += payload.count(b"\n") + 1
    finally:
        await client.close()
    return copied


@pytest.fixture(scope="module")
def published(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Published:
    asyncio.run(_reset_stream(nats_url))
    records = _twin_records(tmp_path_factory.mktemp("bus-twin"))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:  # ten-minute batches
        groups.setdefault(r["timestamp"][:15], []).append(r)
    spool = Spool(spool_path(Paths(tmp_path_factory.mktemp("bus-collector"))))
    try:
        copied = asyncio.run(_publish(nats_url, spool, [groups[k] for k in sorted(groups)]))
    finally:
        spool.close()
    return Published(nats_url, records, _expected_rows(records), copied)


def _shard_rows(rows: Rows, shard: WorkerShard) -> Rows:
    return {k: row for k, row in rows.items() if shard.owns_entity(k[1], SHARDS)}


def _assert_same_rows(got: Rows, expected: Rows) -> None:
    assert sorted(got) == sorted(expected)
    for k, row in expected.items():
        assert got[k] == row, k


def test_two_sharded_workers_give_the_rows_of_one_worker_with_each_record_once(
    published: Published, tmp_path: Path
) -> None:
    expected = published.expected
    got: dict[str, Rows] = {}
    counters = {}
    for shard in ("0/1", "0/2", "1/2"):
        home = tmp_path / shard.replace("/", "-of-")
        with bus_worker(
            published.url, home, shard=shard, shards=SHARDS, consumer="sharded", lateness=LATENESS
        ) as (worker, store):
            drain(worker)
            assert worker.key_windows.late_records == 0
        got[shard] = rows_of(store.pushed)
        counters[shard] = worker.counters
    _assert_same_rows(got["0/1"], expected)
    halves = [_shard_rows(expected, WorkerShard.parse(s)) for s in ("0/2", "1/2")]
    assert all(len({k[1] for k in half}) > 10 for half in halves)  # both shards hold keys
    _assert_same_rows(got["0/2"], halves[0])
    _assert_same_rows(got["1/2"], halves[1])
    for counted in counters.values():
        # The copy's records were dropped by their identity, by every worker.
        assert counted.duplicate_records == published.copied > 0
        assert counted.records == len(published.records) + published.copied
    # The comparison covers the cross-entity features, and they need the other shard.
    key_rows = [row for k, row in expected.items() if k[0] == _KEY]
    for name in ("backend_load_at_submit_5m", "code_hash_sharing_1h"):
        assert sum(row[name] > 0 for row in key_rows) > 50, name
    alone = StreamingWindows(LATENESS, sequences=True)
    shard = WorkerShard.parse("0/2")
    for r in published.records:
        if shard.owns_entity(r[_KEY], SHARDS):
            alone.update({**{n: r.get(n) for n in _FIELDS}, "timestamp": _instant(r["timestamp"])})
    own_only = rows_of([(_KEY, alone.advance())])
    assert any(
        row["backend_load_at_submit_5m"] != halves[0][k]["backend_load_at_submit_5m"]
        for k, row in own_only.items()
        if k in halves[0]
    ), "a shard's records alone would give the same load: the test would prove nothing"


def test_a_killed_workers_messages_come_again_and_count_once(
    published: Published, tmp_path: Path
) -> None:
    shard, consumer = "0/2", "killed"
    out = tmp_path / "killed"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "support.bus_workers", published.url, str(tmp_path / "a")]
    command += [shard, str(SHARDS), consumer, str(LATENESS.total_seconds()), "6", str(out)]
    log = (tmp_path / "worker.log").open("wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (out / "stalled.json").exists():
            assert process.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    stalled = json.loads((out / "stalled.json").read_text())
    before = read_pushed_files(out)
    assert stalled["acknowledged"] < stalled["unacknowledged"]
    with bus_worker(
        published.url,
        tmp_path / "b",
        shard=shard,
        shards=SHARDS,
        consumer=consumer,
        lateness=LATENESS,
    ) as (worker, store):
        # Restarted from the acknowledgement floor: the unacknowledged message comes again.
        assert worker.cursor == stalled["acknowledged"]
        applied: list[int] = []
        apply = worker._apply
        worker._apply = lambda batch: (applied.append(batch.seq), apply(batch))[1]  # type: ignore[method-assign]
        drain(worker)
        assert applied[0] == stalled["unacknowledged"]
        assert worker.key_windows.late_records == 0
    # What the killed worker pushed and what its successor pushed: every row once counted,
    # the unacknowledged message's rows pushed twice, the same both times.
    killed = rows_of(before)
    assert killed
    _assert_same_rows(
        rows_of(before + store.pushed), _shard_rows(published.expected, WorkerShard.parse(shard))
    )
    assert all(published.expected[k] == row for k, row in killed.items())
    assert worker.counters.duplicate_records == published.copied


def test_messages_fetched_by_a_failed_step_are_applied_by_the_next(
    published: Published, tmp_path: Path
) -> None:
    shard = "1/2"
    with bus_worker(
        published.url, tmp_path, shard=shard, shards=SHARDS, consumer="retried", lateness=LATENESS
    ) as (worker, store):
        store.refuse = 3
        failures = 0
        while True:  # what `StreamWorker.run` does, without its backoff
            try:
                if not worker.step():
                    break
            except ConnectionError:
                failures += 1
        assert failures == 3
    _assert_same_rows(
        rows_of(store.pushed), _shard_rows(published.expected, WorkerShard.parse(shard))
    )

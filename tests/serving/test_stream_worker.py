"""The stream worker, with real parts: a spool, the session's Feast store and @champion,
a decision ledger.

The session's simulated twin (tests/conftest.py) supplies the records: the last day of
its three busiest benign keys, and for the last half hour a new key running the twin's
runaway CI. Every key and user is renamed, so the session's online rows stay as they
were, and the timeline is moved whole hours back (keeping its minutes within the hour) to
end one to two hours ago: a replay, whose watermark follows event time. The day of history goes to
the spool in hourly batches, the last half hour minute by minute, as a live collector
would commit it.
"""

from __future__ import annotations

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

import pyarrow as pa
import pytest
from support.stream_replay import Replay, replay_of

from qabuse_dagster import model_registry, settings
from qabuse_dagster.features.definitions import (
    DETECTOR_FEATURES,
    ENTITY_COLUMNS,
    FEATURE_NAMES,
    SEQUENCE_COLUMNS,
)
from qabuse_dagster.features.store import (
    FEATURE_SERVICE,
    SEQUENCE_FEATURE_SERVICE,
    USER_FEATURE_SERVICE,
    online_vectors,
    open_store,
)
from qabuse_dagster.features.windows import sequence_table, window_features
from qabuse_dagster.ingest.spool import (
    Spool,
    connect,
    consumer_position,
    read_batches,
    register_consumer,
    spool_path,
    unregister_consumer,
)
from qabuse_dagster.ingest.wire import SpoolRow, to_spool_row
from qabuse_dagster.response.ledger import Ledger, open_ledger
from qabuse_dagster.serving.scoring import Champion
from qabuse_dagster.serving.stream_worker import (
    CONSUMER,
    StreamWorker,
    stats_path,
)
from qabuse_dagster.telemetry.contract import format_rfc3339_utc

pytestmark = pytest.mark.integration

LEDGER_KEY = b"stream-worker-test-key-32-bytes!"
_KEY, _USER = ENTITY_COLUMNS["api_key"], ENTITY_COLUMNS["user"]


def _spool(spool: Spool, replay: Replay) -> int:
    """Commit the history hour by hour and the flood minute by minute; the batches made."""
    flood_start = format_rfc3339_utc(replay.flood_start)
    groups: dict[str, list[SpoolRow]] = {}
    for r in replay.records:
        group = r["timestamp"][:16] if r["timestamp"] >= flood_start else r["timestamp"][:13]
        row = to_spool_row(json.dumps(r).encode())
        assert row is not None, r
        groups.setdefault(group, []).append(row)
    for _, rows in sorted(groups.items()):
        assert spool.add(rows, "twin", any_key=True).accepted == len(rows)
    return len(groups)


def _drain(worker: StreamWorker) -> None:
    """Step until the spool holds nothing new."""
    while worker.step():
        pass


@dataclass
class Streamed:
    replay: Replay
    worker: StreamWorker
    ledger: Ledger
    paths: settings.Paths
    champion: Champion
    damaged_seq: int
    log: list[str]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def champion(pipeline_run) -> Champion:
    return Champion(refresh_s=3600, store=open_store())


@pytest.fixture(scope="module")
def streamed(
    pipeline_run, champion: Champion, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Streamed]:
    replay = replay_of(pipeline_run, "stream-test")
    paths = settings.Paths(tmp_path_factory.mktemp("stream-home"))
    spool = Spool(spool_path(paths))
    _spool(spool, replay)
    # One record that is not one, in a flood minute's batch (a damaged disk, a hand edit).
    conn = connect(spool_path(paths))
    damaged = read_batches(conn, 0, limit=10_000)[-10].seq
    with conn:
        conn.execute(
            "UPDATE batches SET records = records || char(10) || '{oops' WHERE seq = ?",
            (damaged,),
        )
    conn.close()
    spool.close()
    ledger = open_ledger(f"sqlite:///{paths.home / 'ledger.db'}", key=LEDGER_KEY)
    lines = _Lines()
    logger = logging.getLogger("qabuse_dagster.serving.stream_worker")
    logger.addHandler(lines)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(settings.ENFORCE_ENV, raising=False)
        worker = StreamWorker(paths, ledger=ledger, store=champion.store, champion=champion)
        _drain(worker)
        worker.write_stats()
    logger.removeHandler(lines)
    yield Streamed(replay, worker, ledger, paths, champion, damaged, lines.lines)
    worker.close()
    ledger.close()


def _online_instant(store: Any, key: str, service: str, entity_column: str) -> datetime:
    (vector,) = online_vectors(
        store, [key], service, entity_column=entity_column, max_age=timedelta(days=30)
    )
    assert vector.event_timestamp is not None, key
    return vector.event_timestamp


def test_the_online_store_holds_the_batch_rows_of_the_streamed_records(
    streamed: Streamed,
) -> None:
    store = streamed.champion.store
    telemetry = streamed.replay.table()
    replay = streamed.replay
    key_views = [v for v in store.list_feature_views() if v.tags.get("kind") is None]
    for entity_column, keys, service in (
        (_KEY, [replay.flood_key, *replay.benign_keys], FEATURE_SERVICE),
        (_USER, sorted({r[_USER] for r in replay.records}), USER_FEATURE_SERVICE),
    ):
        views = [v for v in key_views if entity_column in {c.name for c in v.entity_columns}]
        refs = [f"{v.name}:{f.name}" for v in views for f in v.features]
        for key in keys:
            at = _online_instant(store, key, service, entity_column)
            if key == replay.flood_key:
                assert at >= replay.flood_start  # a row of the last half hour
            expected = window_features(telemetry, at, at + timedelta(minutes=1), entity_column)
            (row,) = [r for r in expected.to_pylist() if r[entity_column] == key]
            online = store.get_online_features(
                features=refs, entity_rows=[{entity_column: key}]
            ).to_dict()
            compared = [name for name in FEATURE_NAMES if name in online]
            assert len(compared) == len(FEATURE_NAMES)
            for name in compared:
                assert online[name][0] == pytest.approx(row[name], abs=1e-9), (key, name)
    # The flood key's per-minute sequences are the batch sequences at the same instant.
    at = _online_instant(store, replay.flood_key, SEQUENCE_FEATURE_SERVICE, _KEY)
    instants = pa.table({_KEY: [replay.flood_key], "event_timestamp": [at]})
    expected = sequence_table(telemetry, instants).to_pylist()[0]
    sequences = store.get_online_features(
        features=[f"api_key_sequence:{c}" for c in SEQUENCE_COLUMNS.values()],
        entity_rows=[{_KEY: replay.flood_key}],
    ).to_dict()
    for column in SEQUENCE_COLUMNS.values():
        assert sequences[column][0] == expected[column], column


def test_the_flood_is_throttled_with_the_model_and_the_features_it_saw(
    streamed: Streamed,
) -> None:
    champion = model_registry.resolve_alias(settings.CHAMPION_ALIAS)
    entries = [r.entry for r in streamed.ledger.records()]
    flood = [e for e in entries if e.api_key_id == streamed.replay.flood_key]
    assert flood and flood[0].action == "throttle", [(e.action, e.reason) for e in flood]
    first = flood[0]
    assert first.actor == "system" and first.mode == "enforce"
    assert first.at_ms % 60_000 == 0  # a row's instant: the minute that alerted
    assert first.at_ms >= int(streamed.replay.flood_start.timestamp() * 1000)
    assert first.expires_at_ms is not None and first.expires_at_ms > first.at_ms
    assert first.params["jobs_per_minute"] > 0
    assert first.model_name == champion.name and first.model_version == champion.version
    assert first.score is not None and first.score > champion.threshold
    # The scalars of the online vector the members read, as /score reports them.
    _, _, inputs = streamed.champion.get()
    read = {name for _, names in inputs.key_views for name in names}
    assert first.features and set(first.features) <= read
    assert set(first.features) & set(DETECTOR_FEATURES)
    assert first.feature_service and "alert above the threshold" in first.reason
    # Still alerting ten minutes into the throttle: the engine climbed a rung.
    assert [e.action for e in flood][:2] == ["throttle", "challenge"]


def test_each_decision_writes_one_alert_with_its_context(streamed: Streamed) -> None:
    streamed.worker.alert_writer.flush()
    flood_key = streamed.replay.flood_key
    decided = {
        (r.entry.action, r.entry.at_ms): r.seq
        for r in streamed.ledger.records()
        if r.entry.api_key_id == flood_key and r.entry.actor == "system"
    }
    stored = streamed.worker.alerts.alerts(status=None, api_key_id=flood_key)
    assert {(a.alert.action, int(a.alert.decided_at.timestamp() * 1000)) for a in stored} == set(
        decided
    )
    throttle = next(a.alert for a in stored if a.alert.action == "throttle")
    assert throttle.links.ledger_seqs == [
        decided["throttle", int(throttle.decided_at.timestamp() * 1000)]
    ]
    assert throttle.score > throttle.threshold and throttle.mode == "enforce"
    ensemble = {f.family for f in throttle.family_scores}
    assert throttle.top_family in ensemble and len(ensemble) > 1
    # The top features, largest contribution first, each with its value and usual value.
    contributions = [f.contribution for f in throttle.top_features]
    assert 1 <= len(contributions) <= 5 and contributions == sorted(contributions, reverse=True)
    assert all(f.value is not None or f.usual_from == "none" for f in throttle.top_features)
    # The last hour, minute by minute, ends at the decision's row and holds the flood.
    assert len(throttle.minutes) == 60
    assert throttle.minutes[-1].minute < throttle.decided_at
    assert throttle.submissions_last_hour > 0
    assert len(throttle.recent_jobs) == 10
    # The key's newest jobs when the alert was written (a replay's batch may run past
    # the decision's minute): the flood's, within its last hour.
    hour_before = throttle.decided_at - timedelta(hours=1)
    assert all(job.submitted_at >= hour_before for job in throttle.recent_jobs)
    assert [j.submitted_at for j in throttle.recent_jobs] == sorted(
        (j.submitted_at for j in throttle.recent_jobs), reverse=True
    )
    assert throttle.code_hash_cluster  # the flood ran code: the hashes are named
    # Delivered to the default sink: one JSONL line per alert.
    sink = streamed.paths.home / "alerts" / "alerts.jsonl"
    _wait(lambda: sink.is_file() and len(sink.read_text().splitlines()) >= len(decided))
    ids = [json.loads(line)["alert_id"] for line in sink.read_text().splitlines()]
    assert sorted(set(ids)) == sorted(
        a.alert_id for a in streamed.worker.alerts.alerts(status=None)
    )


def _wait(probe: Any, within_s: float = 15.0) -> None:
    deadline = time.monotonic() + within_s
    while not probe():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.1)


def test_benign_keys_get_no_decision(streamed: Streamed) -> None:
    decided = {r.entry.api_key_id for r in streamed.ledger.records()}
    assert not decided & set(streamed.replay.benign_keys)
    for key in streamed.replay.benign_keys:
        state = streamed.worker.keys[key]
        assert state.last is not None and not state.last.anomalous, key


def test_the_cursor_advanced_and_the_figures_were_written(streamed: Streamed) -> None:
    conn = connect(spool_path(streamed.paths))
    last = read_batches(conn, 0, limit=100_000)[-1].seq
    assert consumer_position(conn, CONSUMER) == last == streamed.worker.cursor
    conn.close()
    stats = json.loads(stats_path(streamed.paths).read_text())
    assert stats["cursor"] == last
    assert stats["records"] == len(streamed.replay.records)
    assert stats["records_are"] == "replay" and stats["late_records"] == 0
    assert stats["decisions"]["throttle"] == 1
    latency = stats["acceptance_to_decision"]
    assert latency["count"] > 0
    assert 0 < latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"] <= latency["max_ms"]


def test_a_malformed_record_is_logged_with_its_batch_and_skipped(streamed: Streamed) -> None:
    assert streamed.worker.counters.malformed_records == 1
    assert any(f"spool batch {streamed.damaged_seq}: record" in line for line in streamed.log)


def test_a_restart_from_an_older_cursor_decides_nothing_twice(streamed: Streamed) -> None:
    before = [r.entry for r in streamed.ledger.records()]
    conn = connect(spool_path(streamed.paths))
    # The crash came after the decisions were written, before the cursor moved.
    unregister_consumer(conn, CONSUMER)
    register_consumer(conn, CONSUMER)
    conn.close()
    again = StreamWorker(
        streamed.paths,
        ledger=streamed.ledger,
        store=streamed.champion.store,
        champion=streamed.champion,
    )
    try:
        _drain(again)
        assert again.counters.records == len(streamed.replay.records)
        assert again.counters.decisions == {}
        assert again.cursor == streamed.worker.cursor
    finally:
        again.close()
    assert [r.entry for r in streamed.ledger.records()] == before


def test_shadow_mode_records_would_be_decisions_as_shadow(
    pipeline_run, champion: Champion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(settings.ENFORCE_ENV, "shadow")
    replay = replay_of(pipeline_run, "stream-shadow-test", benign=0)
    paths = settings.Paths(tmp_path)
    spool = Spool(spool_path(paths))
    _spool(spool, replay)
    spool.close()
    with open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}", key=LEDGER_KEY) as ledger:
        worker = StreamWorker(paths, ledger=ledger, store=champion.store, champion=champion)
        try:
            _drain(worker)
        finally:
            worker.close()
        entries = [r.entry for r in ledger.records()]
    assert [e.action for e in entries][:1] == ["throttle"]
    assert {e.mode for e in entries} == {"shadow"}


# `qabuse stream` as a real process.


@contextlib.contextmanager
def _stream_process(home: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = dict(os.environ)
    env.update(
        {
            settings.HOME_ENV: str(home),
            "DAGSTER_HOME": str(home / "dagster"),
            "FEAST_USAGE": "False",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
    )
    env.pop(settings.MLFLOW_URI_ENV, None)
    qabuse = Path(sys.executable).parent / "qabuse"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(qabuse), "-v", "stream"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def test_sigterm_stops_qabuse_stream_with_its_cursor_saved(tmp_path: Path) -> None:
    """A fresh home: no model yet, so the worker applies the repository and pushes only."""
    from support.records import record_dict

    home = tmp_path / "home"
    paths = settings.Paths(home)
    spool = Spool(spool_path(paths))
    at = datetime.now(UTC) - timedelta(minutes=2)
    rows = [to_spool_row(json.dumps(record_dict(f"j-{i}", at)).encode()) for i in range(3)]
    spool.add([row for row in rows if row is not None], "lab")
    spool.close()
    log = tmp_path / "stream.log"
    conn = connect(spool_path(paths))
    try:
        with _stream_process(home, log) as process:
            deadline = time.monotonic() + 120
            while consumer_position(conn, CONSUMER) != 1:
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0, log.read_text()[-3000:]
        assert consumer_position(conn, CONSUMER) == 1
    finally:
        conn.close()
    stats = json.loads(stats_path(paths).read_text())
    assert stats["cursor"] == 1 and stats["records"] == 3


def test_live_records_are_decided_before_their_minute_closes(
    pipeline_run, champion: Champion, tmp_path: Path
) -> None:
    """A provisional row scores the open minute: the decision comes before it closes."""
    replay = replay_of(
        pipeline_run, "stream-live-test", benign=0, after_onset=timedelta(seconds=50)
    )
    # Moved to the current minute it is live, and the worker's clock stands a second
    # before that minute (of 50 s of runaway) closes.
    last = max(_instant(r["timestamp"]) for r in replay.records).replace(second=0, microsecond=0)
    delta = datetime.now(UTC).replace(second=0, microsecond=0) - last
    live = [
        {**r, "timestamp": format_rfc3339_utc(_instant(r["timestamp"]) + delta)}
        for r in replay.records
    ]
    row_at = max(_instant(r["timestamp"]) for r in live).replace(second=0, microsecond=0)
    row_at += timedelta(minutes=1)
    clock = (row_at - timedelta(seconds=1)).timestamp()
    paths = settings.Paths(tmp_path)
    spool = Spool(spool_path(paths))
    _spool(spool, Replay(live, replay.flood_key, [], replay.flood_start + delta))
    spool.close()
    with open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}", key=LEDGER_KEY) as ledger:
        worker = StreamWorker(
            paths, ledger=ledger, store=champion.store, champion=champion, clock=lambda: clock
        )
        try:
            _drain(worker)
        finally:
            worker.close()
        entries = [r.entry for r in ledger.records()]
    assert worker.counters.keys_scored_provisionally >= 1
    (first,) = [e for e in entries if e.api_key_id == replay.flood_key][:1]
    assert first.action in ("throttle", "cap")
    assert first.at_ms == round(clock * 1000) < row_at.timestamp() * 1000
    assert first.model_version and first.features
    # The provisional row never went to the online store: it holds final rows only.
    (vector,) = online_vectors(
        champion.store, [replay.flood_key], FEATURE_SERVICE, max_age=timedelta(days=30)
    )
    assert vector.event_timestamp is None or vector.event_timestamp < row_at


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))

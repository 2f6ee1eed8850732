"""A job log (one terminal record per job) and an event stream count the same jobs.

DESIGN.md: "a job counts once, at its earliest record". Both engines follow it, so these
tests check the batch rows against that rule and the streaming rows against the batch.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from qabuse_dagster.features.streaming import StreamingWindows, StreamRecord
from qabuse_dagster.features.windows import (
    ENTITY_COLUMN,
    FEATURE_NAMES,
    INPUT_TYPES,
    TIMESTAMP_COLUMN,
    window_features,
)

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
INPUT_SCHEMA = pa.schema([(name, INPUT_TYPES[name]) for name in StreamRecord._fields])
TERMINAL = {"completed", "failed", "cancelled", "rejected"}
#: The features that count submissions and nothing else.
SUBMISSION_FEATURES = (
    "submissions_1m",
    "submissions_per_min_5m",
    "submissions_per_min_1h",
    "submission_rate_change_1m",
    "submission_rate_change_5m",
    "submission_rate_change_1h",
    "submissions_per_min_p95_1h",
    "submissions_1m_zscore",
    "burstiness_5m",
    "burstiness_1h",
    "submissions_24h",
    "active_hours_24h",
    "submissions_1h_vs_24h",
)


def _table(records: list[StreamRecord]) -> pa.Table:
    return pa.Table.from_pylist([r._asdict() for r in records], schema=INPUT_SCHEMA)


def _batch(records: list[StreamRecord]) -> pa.Table:
    first = min(r.timestamp for r in records)
    last = max(r.timestamp for r in records)
    return window_features(_table(records), first - MINUTE, last + 10 * MINUTE)


def _stream(records: list[StreamRecord], lateness: timedelta) -> pa.Table:
    stream = StreamingWindows(allowed_lateness=lateness)
    parts = []
    for record in records:
        assert stream.update(record)
        parts.append(stream.advance())
    parts.append(stream.flush())
    return pa.concat_tables(parts)


def _keyed(rows: pa.Table) -> dict[tuple[str, datetime], dict[str, Any]]:
    return {(r[ENTITY_COLUMN], r[TIMESTAMP_COLUMN]): r for r in rows.to_pylist()}


def _job_log(records: list[StreamRecord], *, at_submission: bool = False) -> list[StreamRecord]:
    """One record per job: its terminal record, or its ``submitted`` one when it has none.

    With ``at_submission`` each terminal record carries its job's first instant instead.
    """
    first: dict[str, datetime] = {}
    terminal: set[str] = set()
    for r in records:
        assert r.job_id is not None
        first[r.job_id] = min(first.get(r.job_id, r.timestamp), r.timestamp)
        if r.status in TERMINAL:
            terminal.add(r.job_id)
    out = []
    for r in records:
        if r.status in TERMINAL:
            out.append(r._replace(timestamp=first[r.job_id]) if at_submission else r)
        elif r.status == "submitted" and r.job_id not in terminal:
            out.append(r)
    return sorted(out, key=lambda r: r.timestamp)


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> list[StreamRecord]:
    """Six simulated hours with every abuse scenario: an event stream, in time order."""
    from qabuse_dagster.evaluation.report import read_telemetry_jsonl
    from qabuse_dagster.simulation import simulate
    from qabuse_dagster.telemetry.hashing import KeyedHasher

    logging.getLogger("qabuse_dagster.telemetry.hashing").setLevel(logging.ERROR)
    out: Path = tmp_path_factory.mktemp("job-log-sim")
    sim = simulate(hours=6, seed=5, out=out, hasher=KeyedHasher.demo(), scenarios=["all"])
    table = read_telemetry_jsonl(sim.telemetry_path).select(list(StreamRecord._fields))
    records = sorted((StreamRecord(**r) for r in table.to_pylist()), key=lambda r: r.timestamp)
    statuses = Counter(r.status for r in records)
    assert statuses["submitted"] >= 1_000 and statuses["completed"] >= 1_000
    return records


@pytest.fixture(scope="module")
def event_rows(events: list[StreamRecord]) -> pa.Table:
    return _batch(events)


def _submissions_per_key(rows: pa.Table) -> dict[str, int]:
    # Every active minute m has a row at m + 1, whose submissions_1m are m's.
    grouped = rows.group_by(ENTITY_COLUMN).aggregate([("submissions_1m", "sum")])
    return dict(
        zip(
            grouped[ENTITY_COLUMN].to_pylist(),
            grouped["submissions_1m_sum"].to_pylist(),
            strict=True,
        )
    )


def test_a_job_log_counts_each_job_once_as_the_event_stream_does(
    events: list[StreamRecord], event_rows: pa.Table
) -> None:
    log = _job_log(events)
    assert sum(r.status == "completed" for r in log) >= 1_000
    jobs = Counter({key: 0 for key in {r.api_key_id for r in events}})
    jobs.update(r.api_key_id for r in {(r.api_key_id, r.job_id): r for r in events}.values())

    from_events = _submissions_per_key(event_rows)
    from_log = _submissions_per_key(_batch(log))

    # Whole-span totals: the job log's submissions lie later (at the terminal records),
    # but every job counts once either way.
    assert from_log == from_events
    assert from_events == {key: n for key, n in jobs.items() if key in from_events}


def test_a_job_log_at_the_submission_instants_gives_the_same_submission_features(
    events: list[StreamRecord], event_rows: pa.Table
) -> None:
    log_rows = _keyed(_batch(_job_log(events, at_submission=True)))
    event_keyed = _keyed(event_rows)

    # Its records lie at submission instants, which the event stream has too.
    assert log_rows.keys() <= event_keyed.keys()
    assert sum(row["submissions_1m"] for row in log_rows.values()) >= 1_000
    for key, row in log_rows.items():
        for name in SUBMISSION_FEATURES:
            assert row[name] == event_keyed[key][name], (name, key)


def test_a_shuffled_job_log_streams_to_the_batch_rows(events: list[StreamRecord]) -> None:
    log = _job_log(events)
    # Shuffle within 90 s windows, so records of one job (and neighbours) swap places.
    lateness = timedelta(seconds=90)
    rng = random.Random(7)
    order = sorted(log, key=lambda r: r.timestamp + rng.random() * lateness)

    got, expected = _stream(order, lateness), _batch(log)

    assert got.schema == expected.schema and got.num_rows == expected.num_rows
    assert got.equals(expected), "streaming rows differ from the batch rows"


def _rec(at: timedelta, status: str, job: str | None = "j", key: str = "a", **kw: Any):  # type: ignore[no-untyped-def]
    return StreamRecord(key, T0 + at, status, 100, "c", job_id=job, **kw)


def _both(records: list[StreamRecord], lateness: timedelta = timedelta(minutes=5)) -> pa.Table:
    batch = _batch(records)
    streamed = _stream(records, lateness)
    assert streamed.equals(batch), "streaming rows differ from the batch rows"
    return batch


def _subs(rows: pa.Table, minute: int) -> int:
    at = T0 + minute * MINUTE
    row = rows.filter(pc.equal(rows[TIMESTAMP_COLUMN], pa.scalar(at, rows[TIMESTAMP_COLUMN].type)))
    return row["submissions_1m"][0].as_py() if row.num_rows else 0


@pytest.mark.parametrize(
    ("records", "counted_at"),
    [
        pytest.param(
            [_rec(timedelta(seconds=5), "submitted"), _rec(timedelta(seconds=70), "completed")],
            {1: 1, 2: 0},
            id="event-stream-counts-the-submitted-record",
        ),
        pytest.param(
            [_rec(timedelta(seconds=70), "completed")], {1: 0, 2: 1}, id="job-log-terminal-only"
        ),
        pytest.param(
            [_rec(timedelta(seconds=70), "completed"), _rec(timedelta(seconds=5), "submitted")],
            {1: 1, 2: 0},
            id="out-of-order-pair-counts-the-earlier",
        ),
        pytest.param(
            [_rec(timedelta(seconds=5), "completed"), _rec(timedelta(seconds=5), "submitted")],
            {1: 1},
            id="one-instant-counts-once",
        ),
        pytest.param(
            [
                _rec(timedelta(seconds=5), "rejected", job=None),
                _rec(timedelta(seconds=6), "failed", job=None),
            ],
            {1: 1},
            id="no-job-id-submitted-or-rejected-only",
        ),
        pytest.param(
            [_rec(timedelta(seconds=5), "submitted"), _rec(timedelta(hours=25), "completed")],
            {1: 1, 25 * 60 + 1: 1},
            id="beyond-the-job-memory-counts-again",
        ),
        pytest.param(
            [_rec(timedelta(seconds=5), "submitted"), _rec(timedelta(hours=23), "completed")],
            {1: 1, 23 * 60 + 1: 0},
            id="within-the-job-memory-counts-once",
        ),
        pytest.param(
            [
                _rec(timedelta(seconds=5), "submitted", key="a"),
                _rec(timedelta(seconds=9), "submitted", key="b"),
            ],
            {1: 1},
            id="job-ids-are-per-entity",
        ),
    ],
)
def test_a_job_counts_once_at_its_earliest_record(
    records: list[StreamRecord], counted_at: dict[int, int]
) -> None:
    rows = _both(records)
    rows = rows.filter(pc.equal(rows[ENTITY_COLUMN], "a"))
    for minute, expected in counted_at.items():
        assert _subs(rows, minute) == expected, minute


def test_a_job_log_reads_shots_and_cost_from_its_one_record() -> None:
    rows = _both([_rec(timedelta(seconds=70), "failed", num_circuits=2, depth=3, backend="sv1")])
    row = _keyed(rows)["a", T0 + 2 * MINUTE]
    assert row["max_shots_1m"] == 100 and row["distinct_code_hashes_1m"] == 1
    assert row["estimated_cost_1m"] == 100 * 2 * 3 * 1 / 100
    assert set(FEATURE_NAMES) <= set(row)

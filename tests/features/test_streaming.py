"""Streaming window features: the same rows as the batch SQL, record by record, late or not."""

from __future__ import annotations

import itertools
import logging
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qabuse_dagster.features.push import PUSH_SOURCE, latest_per_key, push_online
from qabuse_dagster.features.streaming import StreamingWindows, StreamRecord
from qabuse_dagster.features.windows import (
    DETECTOR_FEATURES,
    ENTITY_COLUMN,
    FEATURE_NAMES,
    INPUT_TYPES,
    TIMESTAMP_COLUMN,
    feature_schema,
    sequence_table,
    window_features,
)
from qabuse_dagster.telemetry.contract import STATUSES

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
LATENESS = timedelta(seconds=90)
FIELDS = StreamRecord._fields
INPUT_SCHEMA = pa.schema([(name, INPUT_TYPES[name]) for name in StreamRecord._fields])


def _table(records: list[StreamRecord]) -> pa.Table:
    return pa.Table.from_pylist([r._asdict() for r in records], schema=INPUT_SCHEMA)


def _batch(records: list[StreamRecord], entity_column: str = ENTITY_COLUMN) -> pa.Table:
    """`window_features` over every row the records can produce."""
    if not records:
        return feature_schema(entity_column).empty_table()
    first = min(r.timestamp for r in records)
    last = max(r.timestamp for r in records)
    return window_features(_table(records), first - MINUTE, last + 10 * MINUTE, entity_column)


def _stream(
    records: list[Any], lateness: timedelta = LATENESS, **kwargs: Any
) -> tuple[pa.Table, StreamingWindows]:
    """Feed records in the given order, advancing after each one, then flush."""
    stream = StreamingWindows(allowed_lateness=lateness, **kwargs)
    parts = []
    for record in records:
        stream.update(record)
        parts.append(stream.advance())
    parts.append(stream.flush())
    return pa.concat_tables(parts), stream


def _assert_same_rows(got: pa.Table, expected: pa.Table) -> None:
    """The same rows, every feature equal to 1e-9."""
    assert got.schema == expected.schema
    assert got.num_rows == expected.num_rows
    entity = got.column_names[0]
    for g, e in zip(got.to_pylist(), expected.to_pylist(), strict=True):
        assert (g[entity], g[TIMESTAMP_COLUMN]) == (e[entity], e[TIMESTAMP_COLUMN])
        for name in FEATURE_NAMES:
            assert g[name] == pytest.approx(e[name], abs=1e-9, rel=0), (name, g, e)


def _keyed(rows: pa.Table) -> dict[tuple[str, datetime], dict[str, Any]]:
    return {(r[ENTITY_COLUMN], r[TIMESTAMP_COLUMN]): r for r in rows.to_pylist()}


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> list[StreamRecord]:
    """Six simulated hours with every abuse scenario, in time order."""
    from qabuse_dagster.evaluation.report import read_telemetry_jsonl
    from qabuse_dagster.simulation import simulate
    from qabuse_dagster.telemetry.hashing import KeyedHasher

    logging.getLogger("qabuse_dagster.telemetry.hashing").setLevel(logging.ERROR)
    out: Path = tmp_path_factory.mktemp("streaming-sim")
    sim = simulate(hours=6, seed=11, out=out, hasher=KeyedHasher.demo(), scenarios=["all"])
    table = read_telemetry_jsonl(sim.telemetry_path).select(list(FIELDS))
    records = [StreamRecord(**r) for r in table.to_pylist()]
    records.sort(key=lambda r: r.timestamp)
    assert len(records) >= 2_000
    return records


@pytest.fixture(scope="module")
def simulated_batch(simulated: list[StreamRecord]) -> pa.Table:
    return _batch(simulated)


# --- consistency with the batch path -------------------------------------------------


def test_in_order_replay_of_simulated_telemetry_gives_the_batch_rows(
    simulated: list[StreamRecord], simulated_batch: pa.Table
) -> None:
    got, stream = _stream(simulated)

    assert stream.late_records == 0
    assert simulated_batch.num_rows > 1_000
    _assert_same_rows(got, simulated_batch)


def test_user_rows_replayed_from_simulated_telemetry_give_the_batch_rows(
    simulated: list[StreamRecord],
) -> None:
    got, stream = _stream(simulated, entity_column="user")

    expected = _batch(simulated, entity_column="user")
    assert stream.late_records == 0
    assert expected.column_names[0] == "user" and expected.num_rows > 1_000
    _assert_same_rows(got, expected)


def test_simulated_replay_exercises_every_feature(simulated_batch: pa.Table) -> None:
    """The consistency tests above compare something: no feature is constant on the twin."""
    import pyarrow.compute as pc

    constant = [
        name
        for name in FEATURE_NAMES
        if pc.min(simulated_batch[name]).as_py() == pc.max(simulated_batch[name]).as_py()
    ]
    assert not constant


def test_dict_records_as_decoded_from_json_give_the_same_rows(
    simulated: list[StreamRecord], simulated_batch: pa.Table
) -> None:
    got, _ = _stream([r._asdict() for r in simulated])

    _assert_same_rows(got, simulated_batch)


def test_records_shuffled_within_the_allowed_lateness_give_the_batch_rows(
    simulated: list[StreamRecord], simulated_batch: pa.Table
) -> None:
    rng = random.Random(5)
    # Arrival = event time + a delay below the lateness bound: no record can find the
    # watermark past it, but neighbours up to 90 s apart swap places.
    delays = [timedelta(seconds=rng.uniform(0, LATENESS.total_seconds() - 1e-3)) for _ in simulated]
    arrival = sorted(range(len(simulated)), key=lambda i: simulated[i].timestamp + delays[i])
    shuffled = [simulated[i] for i in arrival]
    assert sum(a > b for a, b in itertools.pairwise(arrival)) > 100

    got, stream = _stream(shuffled)

    assert stream.late_records == 0
    _assert_same_rows(got, simulated_batch)


def test_records_delayed_beyond_the_lateness_are_reported_and_leave_emitted_rows_alone(
    simulated: list[StreamRecord], simulated_batch: pa.Table
) -> None:
    rng = random.Random(9)
    horizon = simulated[-1].timestamp - LATENESS
    candidates = [i for i, r in enumerate(simulated) if r.timestamp < horizon]
    delayed_at = set(rng.sample(candidates, 25))
    delayed = [simulated[i] for i in sorted(delayed_at)]
    on_time = [r for i, r in enumerate(simulated) if i not in delayed_at]
    reported: list[StreamRecord] = []

    # The delayed records arrive after everything else, when the watermark is past them.
    got, stream = _stream(on_time + delayed, on_late=reported.append)

    assert stream.late_records == len(delayed) == 25
    assert reported == delayed
    # The rows are exactly the batch rows of the records that were on time ...
    _assert_same_rows(got, _batch(on_time))
    # ... so they differ from the batch over everything only where a delayed record lies
    # in a row's day (the age and gap features) for the same key, or in its last two hours
    # for any key (backend load and code-hash sharing of the hour's submissions).
    full, ours = _keyed(simulated_batch), _keyed(got)
    differing = {
        k for k in full.keys() | ours.keys() if k not in full or k not in ours or full[k] != ours[k]
    }
    assert differing
    for key, instant in differing:
        assert any(
            (r.api_key_id == key and instant - timedelta(hours=24) <= r.timestamp < instant)
            or instant - timedelta(hours=2) <= r.timestamp < instant
            for r in delayed
        ), (key, instant)


def test_rows_are_emitted_once_and_only_when_the_watermark_passes_them(
    simulated: list[StreamRecord],
) -> None:
    stream = StreamingWindows(allowed_lateness=LATENESS)
    seen: set[tuple[str, datetime]] = set()
    for record in simulated[:3_000]:
        stream.update(record)
        rows = stream.advance()
        watermark = stream.watermark
        assert watermark is not None
        for row in rows.to_pylist():
            assert row[TIMESTAMP_COLUMN] <= watermark
            key = (row[ENTITY_COLUMN], row[TIMESTAMP_COLUMN])
            assert key not in seen
            seen.add(key)
    assert seen


# --- small cases ---------------------------------------------------------------------


def _rec(
    key: str, seconds: float, status: str, shots: int | None = 100, code_hash: str | None = "c1"
) -> StreamRecord:
    return StreamRecord(key, T0 + timedelta(seconds=seconds), status, shots, code_hash)


@pytest.mark.parametrize(
    "records",
    [
        pytest.param([_rec("a", 0, "submitted")], id="first-minute-of-a-key"),
        pytest.param(
            [_rec("a", 5, "completed"), _rec("a", 6, "failed"), _rec("a", 7, "cancelled")],
            id="only-terminal-records",
        ),
        pytest.param(
            [_rec("a", 1, "queued"), _rec("a", 2, "running")],
            id="only-lifecycle",
        ),
        pytest.param(
            [_rec("a", 5, "completed"), _rec("b", 6, "submitted"), _rec("a", 70, "queued")],
            id="terminal-only-minutes-beside-a-submission",
        ),
        pytest.param([_rec("a", 1, "rejected"), _rec("a", 2, "rejected")], id="only-rejected"),
        pytest.param(
            [_rec("a", 1, "submitted", shots=0), _rec("a", 70, "submitted", shots=None)],
            id="zero-and-missing-shots",
        ),
        pytest.param(
            [_rec("a", i / 10, "submitted", code_hash=f"{i:016x}") for i in range(300)]
            + [_rec("a", 100 + i, "submitted", code_hash=f"{i % 7:016x}") for i in range(200)],
            id="many-hashes",
        ),
        pytest.param(
            [_rec("a", 60 * m, "submitted") for m in range(0, 130, 7)]
            + [_rec("a", 60 * 125 + i, "submitted") for i in range(40)],
            id="sparse-hour-then-burst",
        ),
        pytest.param(
            [_rec("a", 0, "submitted"), _rec("a", 60 * 61, "submitted")], id="gap-over-an-hour"
        ),
        pytest.param(
            [_rec("a", 59.999999, "submitted"), _rec("b", 60, "failed"), _rec("a", 60, "rejected")],
            id="minute-boundaries-two-keys",
        ),
    ],
)
def test_edge_cases_match_the_batch_rows(records: list[StreamRecord]) -> None:
    got, stream = _stream(sorted(records, key=lambda r: r.timestamp))

    assert stream.late_records == 0
    _assert_same_rows(got, _batch(records))


def _maybe(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), values)


_records = st.lists(
    st.builds(
        StreamRecord,
        api_key_id=st.sampled_from(["a", "b", "c"]),
        timestamp=st.integers(0, 3 * 3600 * 10**6).map(lambda us: T0 + timedelta(microseconds=us)),
        status=st.sampled_from(STATUSES),
        shots=_maybe(st.integers(0, 10**8)),
        code_hash=st.sampled_from(["c1", "c2", "c3", "c4"]),
        user=st.sampled_from(["u1", "u2"]),
        num_circuits=_maybe(st.integers(0, 50)),
        depth=_maybe(st.integers(0, 500)),
        backend=_maybe(st.sampled_from(["ibm_torino", "aer_simulator", "sv1"])),
        runtime_s=_maybe(st.floats(0, 1e4, allow_nan=False)),
        error_code=_maybe(st.sampled_from(["auth_failed", "quota_exceeded"])),
        source_ip_hash=_maybe(st.sampled_from(["n1", "n2", "n3"])),
        client_agent=st.sampled_from(["qiskit", "cirq", "pennylane"]),
        # Few job ids: jobs with several records, in any order, and records without one.
        job_id=_maybe(st.sampled_from(["j1", "j2", "j3", "j4", "j5", "j6"])),
    ),
    max_size=60,
)


def _by_identity(records: list[StreamRecord]) -> list[StreamRecord]:
    """The first record of each identity (job_id, status), as ingest deduplicates them:
    two records of one identity at one instant would leave the engines no order to agree on.
    """
    seen: set[tuple[str, str]] = set()
    out = []
    for r in records:
        if r.job_id is not None:
            if (r.job_id, r.status) in seen:
                continue
            seen.add((r.job_id, r.status))
        out.append(r)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=_records,
    seed=st.integers(0, 2**32 - 1),
    entity_column=st.sampled_from(["api_key_id", "user"]),
)
def test_random_records_in_any_order_within_the_lateness_match_the_batch(
    records: list[StreamRecord], seed: int, entity_column: str
) -> None:
    # Random order, with the lateness bound set to cover it: nothing may be late.
    records = _by_identity(records)
    order = random.Random(seed).sample(records, len(records))
    spread = timedelta(0)
    latest = None
    for r in order:
        latest = r.timestamp if latest is None else max(latest, r.timestamp)
        spread = max(spread, latest - r.timestamp)

    got, stream = _stream(order, lateness=spread, entity_column=entity_column)

    assert stream.late_records == 0
    _assert_same_rows(got, _batch(records, entity_column))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=_records, seed=st.integers(0, 2**32 - 1))
def test_streamed_sequences_match_the_batch_sequences(
    records: list[StreamRecord], seed: int
) -> None:
    records = _by_identity(records)
    order = random.Random(seed).sample(records, len(records))
    got, _ = _stream(order, lateness=timedelta(hours=4), sequences=True)

    features = got.select(list(feature_schema(ENTITY_COLUMN).names))
    _assert_same_rows(features, _batch(records))
    expected = sequence_table(_table(records), got)
    assert got.select(expected.column_names).equals(expected)


# --- lateness, state and input --------------------------------------------------------


def test_a_late_record_is_counted_reported_and_not_applied(caplog) -> None:
    stream = StreamingWindows(allowed_lateness=timedelta(seconds=30))
    assert stream.update(_rec("a", 300, "submitted"))
    with caplog.at_level(logging.WARNING, logger="qabuse_dagster.features.streaming"):
        assert not stream.update(_rec("a", 0, "submitted"))
        assert not stream.update(_rec("a", 10, "submitted"))
        rows = stream.flush()

    assert stream.late_records == 2
    assert "late record" in caplog.text
    assert "2 late records" in caplog.text
    assert rows.column("submissions_1m").to_pylist() == [1, 0, 0, 0, 0]


def test_advance_with_now_finalises_a_silent_stream_and_forgets_idle_keys() -> None:
    stream = StreamingWindows(allowed_lateness=timedelta(seconds=30))
    stream.update(_rec("a", 0, "submitted"))

    assert stream.advance().num_rows == 0
    assert stream.advance(T0 + 3 * MINUTE).num_rows == 2
    assert stream.advance(T0 + 10 * MINUTE).num_rows == 3
    assert stream.keys == 1
    assert stream.advance(T0 + timedelta(hours=2)).num_rows == 0
    assert stream.keys == 1  # its first-seen and gap features look back a day
    assert stream.advance(T0 + timedelta(hours=25)).num_rows == 0
    assert stream.keys == 0
    # Anything before the watermark is now late.
    assert not stream.update(_rec("a", 3600, "submitted"))


def test_a_record_without_the_entity_is_refused() -> None:
    stream = StreamingWindows(entity_column="user")
    with pytest.raises(ValueError, match="no user"):
        stream.update(_rec("a", 0, "submitted"))
    with pytest.raises(ValueError, match="entity_column"):
        StreamingWindows(entity_column="backend")


def test_naive_timestamps_are_refused() -> None:
    stream = StreamingWindows()
    with pytest.raises(ValueError, match="timezone-aware"):
        stream.update(StreamRecord("a", datetime(2026, 1, 1), "submitted", 1, "c"))


def test_latest_per_key_keeps_each_keys_last_row() -> None:
    rows, _ = _stream([_rec("a", 0, "submitted"), _rec("b", 90, "submitted")])

    latest = latest_per_key(rows).to_pylist()

    assert [(r[ENTITY_COLUMN], r[TIMESTAMP_COLUMN]) for r in latest] == [
        ("a", T0 + 5 * MINUTE),
        ("b", T0 + 6 * MINUTE),
    ]


# --- Feast online store ---------------------------------------------------------------


def test_pushed_rows_are_read_back_from_the_online_store(pipeline_run) -> None:
    from feast import PushSource

    from qabuse_dagster.features import store as feast_ops

    store = feast_ops.open_store()
    source = store.get_data_source(PUSH_SOURCE)
    assert isinstance(source, PushSource)
    assert source.batch_source is not None
    assert source.batch_source.name == "api_key_windows_source"
    # Keys no simulated tenant has (not hex), so the shared online store is not disturbed.
    keys = ["stream-push-test-a", "stream-push-test-b"]
    records = [
        _rec(keys[0], 0, "submitted", shots=200, code_hash="c1"),
        _rec(keys[0], 10, "failed"),
        _rec(keys[1], 30, "submitted", shots=10, code_hash="c3"),
        _rec(keys[0], 70, "rejected", shots=50, code_hash="c2"),
    ]
    stream = StreamingWindows(allowed_lateness=timedelta(seconds=5))
    for record in records:
        assert stream.update(record)
    # Stop after T0 + 3 min, so each key's latest row still has non-zero 5-minute figures.
    rows = stream.advance(T0 + 3 * MINUTE + timedelta(seconds=5))

    assert push_online(store, rows) == 2
    got = feast_ops.online_features(store, keys)

    expected = {r[ENTITY_COLUMN]: r for r in latest_per_key(rows).to_pylist()}
    assert expected[keys[0]]["fail_rate_5m"] == pytest.approx(2 / 2)
    for key, vector in zip(keys, got, strict=True):
        assert set(DETECTOR_FEATURES) <= set(vector)
        for name in set(FEATURE_NAMES) & set(vector):
            assert vector[name] == pytest.approx(expected[key][name], abs=1e-9), (key, name)

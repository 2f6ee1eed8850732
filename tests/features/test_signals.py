"""Hand answers for the bot and fraud signals, and the per-minute sequences."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from qabuse_dagster.features.definitions import (
    REGULARITY_MIN_GAPS,
    SEQUENCE_CHANNELS,
    SEQUENCE_MINUTES,
)
from qabuse_dagster.features.streaming import StreamingWindows, StreamRecord
from qabuse_dagster.features.windows import (
    INPUT_TYPES,
    TIMESTAMP_COLUMN,
    minute_sequences,
    sequence_table,
    window_features,
)

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
SCHEMA = pa.schema([(name, INPUT_TYPES[name]) for name in StreamRecord._fields])


def _rec(key: str, at: timedelta, status: str = "submitted", **kw: Any) -> StreamRecord:
    return StreamRecord(key, T0 + at, status, kw.pop("shots", 100), kw.pop("code", "c"), **kw)


def _table(records: list[StreamRecord]) -> pa.Table:
    return pa.Table.from_pylist([r._asdict() for r in records], schema=SCHEMA)


def _rows(records: list[StreamRecord]) -> dict[tuple[str, datetime], dict[str, Any]]:
    """Batch rows, checked equal to the streamed ones."""
    first = min(r.timestamp for r in records)
    last = max(r.timestamp for r in records)
    batch = window_features(_table(records), first - MINUTE, last + 10 * MINUTE)
    stream = StreamingWindows(allowed_lateness=timedelta(0))
    for r in sorted(records, key=lambda r: r.timestamp):
        stream.update(r)
    assert stream.flush().equals(batch)
    return {(r["api_key_id"], r[TIMESTAMP_COLUMN]): r for r in batch.to_pylist()}


def test_a_regular_bot_has_no_interarrival_variation_and_a_burst_has_much() -> None:
    bot = [_rec("bot", timedelta(seconds=10 * i)) for i in range(60)]  # every 10 s
    # Bursts: 5 submissions 100 ms apart, every 5 minutes.
    burst = [
        _rec("human", timedelta(minutes=5 * b, milliseconds=100 * i))
        for b in range(2)
        for i in range(5)
    ]
    rows = _rows(bot + burst)
    at = T0 + 10 * MINUTE
    assert rows["bot", at]["interarrival_cv_1h"] == 0.0
    # Gaps 100 ms x 8 and one of 300 s - 400 ms: mean 33_300, std by hand.
    gaps = [100] * 8 + [300_000 - 400]
    mean = sum(gaps) / 9
    std = math.sqrt(sum(g * g for g in gaps) / 9 - mean**2)
    assert rows["human", at]["interarrival_cv_1h"] == pytest.approx(std / mean, rel=1e-12)
    assert rows["human", at]["interarrival_cv_1h"] > 2.5
    # Two submissions: one gap, no variation to speak of.
    assert rows["human", T0 + MINUTE]["interarrival_cv_1h"] == 0.0  # 4 equal gaps
    two = _rows([_rec("k", timedelta(0)), _rec("k", timedelta(seconds=30))])
    # Too few gaps to tell: the value of random arrivals, never "perfectly regular".
    assert two["k", T0 + MINUTE]["interarrival_cv_1h"] == 1.0


def _cv(gaps: list[int]) -> float:
    mean = sum(gaps) / len(gaps)
    return math.sqrt(sum(g * g for g in gaps) / len(gaps) - mean**2) / mean


def test_a_poller_steady_all_day_stays_regular_and_a_session_worker_does_not() -> None:
    # A poller every 4 minutes, 2 s late every other time, for 10 hours.
    poller = [_rec("poller", timedelta(minutes=4 * i, seconds=2 * (i % 2))) for i in range(150)]
    # A worker: 12 submissions a minute apart, a 50-minute break, again, for 10 hours.
    worker = [_rec("worker", timedelta(hours=h, minutes=i)) for h in range(10) for i in range(12)]
    rows = _rows(poller + worker)
    at = T0 + timedelta(hours=10)
    # Poller gaps alternate 242 s and 238 s: cv about 2 / 240.
    poller_gaps = [242_000 if i % 2 == 0 else 238_000 for i in range(149)]
    assert rows["poller", at]["interarrival_regularity_24h"] == pytest.approx(
        -math.log10(_cv(poller_gaps)), rel=1e-9
    )
    # Worker gaps: 11 of 60 s per hour, then 49 min to the next hour's first (under the
    # hour's cap, so counted); the 1-hour window sees one session and reads it as steady.
    worker_gaps = ([60_000] * 11 + [49 * 60_000]) * 9 + [60_000] * 11
    worker_row = rows["worker", T0 + timedelta(hours=9, minutes=12)]
    assert worker_row["interarrival_regularity_24h"] == pytest.approx(
        -math.log10(_cv(worker_gaps)), rel=1e-9
    )
    assert worker_row["interarrival_regularity_24h"] < 0 < worker_row["interarrival_regularity_1h"]
    # Under REGULARITY_MIN_GAPS gaps: no evidence (0), however steady they look.
    fewer = T0 + timedelta(minutes=4 * (REGULARITY_MIN_GAPS - 1) + 1)
    enough = T0 + timedelta(minutes=4 * REGULARITY_MIN_GAPS + 1)
    for window in ("1h", "24h"):
        name = f"interarrival_regularity_{window}"
        assert rows["poller", fewer][name] == 0.0
        assert rows["poller", enough][name] > 2.0


def test_random_arrivals_rarely_pass_for_a_clock_with_the_minimum_of_gaps() -> None:
    """The reason for `REGULARITY_MIN_GAPS`: a person's few jobs can come out evenly spaced.

    Of Poisson (random) arrivals observed over just enough gaps, at most 1 in 10,000 reads
    as steady as a poller with cv 0.2 (regularity 0.7): every api key is looked at every
    minute, so the chance of a benign clock must be small per window.
    """
    rng = np.random.default_rng(0)
    gaps = rng.exponential(size=(200_000, REGULARITY_MIN_GAPS))
    cv = gaps.std(axis=1) / gaps.mean(axis=1)
    assert (cv <= 0.2).mean() <= 1e-4


def test_gaps_longer_than_an_hour_are_breaks_not_part_of_the_rhythm() -> None:
    # Bursts of 11 submissions a second apart, with two-hour breaks between bursts.
    records = [_rec("k", timedelta(hours=2 * b, seconds=i)) for b in range(3) for i in range(11)]
    rows = _rows(records)
    row = rows["k", T0 + timedelta(hours=4, minutes=1)]
    assert row["interarrival_regularity_24h"] == 3.0  # 30 equal 1-s gaps: the floor's value
    assert row["submissions_24h"] == 33


def test_day_features_count_hours_submissions_and_cost_against_the_day() -> None:
    # One submission at the start of each of 20 hours, then 10 in the last hour.
    records = [_rec("k", timedelta(hours=h)) for h in range(20)]
    records += [_rec("k", timedelta(hours=20, minutes=i)) for i in range(10)]
    rows = _rows(records)
    row = rows["k", T0 + timedelta(hours=20, minutes=10)]
    assert row["active_hours_24h"] == 21
    assert row["submissions_24h"] == 30
    assert row["submissions_1h_vs_24h"] == 10 * 24 / 30
    assert row["estimated_cost_24h"] == 30 * 100.0  # ibm default weight, 100 shots
    assert row["cost_1h_vs_24h"] == 10 * 24 / 30
    # A day later only what is left of the last day counts.
    late = _rows([*records, _rec("k", timedelta(hours=44, minutes=5))])
    row = late["k", T0 + timedelta(hours=44, minutes=6)]
    assert row["submissions_24h"] == 1 + 4  # of those at hour 20, minutes 6 .. 9 remain
    assert row["active_hours_24h"] == 1  # 08:0x UTC both days: one hour of the day


def test_network_auth_failures_count_other_keys_failing_from_the_same_network() -> None:
    stuffing = [
        _rec(
            f"k{i}", timedelta(seconds=i), "rejected", error_code="auth_failed", source_ip_hash="n"
        )
        for i in range(4)
    ]
    records = [
        *stuffing,
        _rec("victim", timedelta(seconds=30), source_ip_hash="n"),
        _rec("elsewhere", timedelta(seconds=30), source_ip_hash="m"),
        _rec("later", timedelta(minutes=70), source_ip_hash="n"),  # over an hour later
    ]
    rows = _rows(records)
    assert rows["victim", T0 + MINUTE]["network_auth_failure_entities_1h"] == 4
    assert rows["k0", T0 + MINUTE]["network_auth_failure_entities_1h"] == 3  # not itself
    assert rows["elsewhere", T0 + MINUTE]["network_auth_failure_entities_1h"] == 0
    assert rows["later", T0 + 71 * MINUTE]["network_auth_failure_entities_1h"] == 0


def test_minute_sequences_hold_each_minutes_sums_oldest_first() -> None:
    records = [
        _rec("k", timedelta(seconds=1), shots=10, code="a"),
        _rec("k", timedelta(seconds=2), shots=20, code="b"),
        _rec("k", timedelta(seconds=3), shots=5, code="a"),
        _rec("k", timedelta(minutes=2), "failed", job_id="x", error_code="auth_failed"),
        _rec("other", timedelta(seconds=1)),
    ]
    at = T0 + 3 * MINUTE
    seq = minute_sequences(_table(records), ["k", "nobody", "k"], [at, at, T0 + 90 * MINUTE])
    assert seq.shape == (3, SEQUENCE_MINUTES, len(SEQUENCE_CHANNELS)) and seq.dtype == np.int64
    by_channel = dict(zip(SEQUENCE_CHANNELS, seq[0].T, strict=True))
    assert by_channel["submissions"][-3:].tolist() == [3, 0, 1]  # the failed job's record
    assert by_channel["shots_sum"][-3:].tolist() == [35, 0, 100]
    assert by_channel["distinct_code_hashes"][-3:].tolist() == [2, 0, 1]
    assert by_channel["failures"][-3:].tolist() == [0, 0, 1]
    assert by_channel["auth_failures"][-3:].tolist() == [0, 0, 1]
    assert not seq[0, :-3].any() and not seq[1].any() and not seq[2].any()


def test_minute_sequences_agree_with_the_window_features_they_sum_to(tmp_path) -> None:
    from qabuse_dagster.evaluation.report import read_telemetry_jsonl
    from qabuse_dagster.simulation import simulate
    from qabuse_dagster.telemetry.hashing import KeyedHasher

    sim = simulate(hours=3, seed=2, out=tmp_path, hasher=KeyedHasher.demo(), scenarios=["all"])
    telemetry = read_telemetry_jsonl(sim.telemetry_path)
    start = min(telemetry["timestamp"].to_pylist())
    rows = window_features(telemetry, start, start + timedelta(hours=4))
    table = sequence_table(telemetry, rows)
    assert table.num_rows == rows.num_rows >= 1_000
    subs = np.array(table["submissions_last_60_min"].to_pylist())
    auth = np.array(table["auth_failures_last_60_min"].to_pylist())
    assert (subs[:, -1] == rows["submissions_1m"].to_numpy()).all()
    assert (subs.sum(axis=1) == np.rint(rows["submissions_per_min_1h"].to_numpy() * 60)).all()
    assert (auth.sum(axis=1) == rows["auth_failures_1h"].to_numpy()).all()
    assert (subs[:, -5:].sum(axis=1) == rows["submissions_per_min_5m"].to_numpy() * 5).all()

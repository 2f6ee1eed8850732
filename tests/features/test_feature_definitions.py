"""The wide feature set: a naive per-row oracle, exact hand answers, and the numpy kernels."""

from __future__ import annotations

import itertools
import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qabuse_dagster.features.definitions import (
    ACTIVITY_LOOKBACK_MINUTES,
    AGGREGATES,
    DAY_MINUTES,
    DETECTOR_FEATURES,
    FEATURE_NAMES,
    FEATURES,
    JOB_MEMORY_MINUTES,
    RATE_PERCENTILE_RANK,
    SHARING_MINUTES,
    SUBMISSION_PRECEDENCE,
    WINDOWS,
    aggregates_for,
    backend_cost_weight,
    derive,
)
from qabuse_dagster.features.windows import INPUT_TYPES, _range_kth, window_features
from qabuse_dagster.telemetry.contract import STATUSES

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
SCHEMA = pa.schema([(name, INPUT_TYPES[name]) for name in INPUT_TYPES])


def _record(key: str, at: timedelta, status: str = "submitted", **fields: Any) -> dict[str, Any]:
    base = {name: None for name in SCHEMA.names}
    base.update(api_key_id=key, user=f"user-of-{key}", timestamp=T0 + at, status=status)
    base.update(shots=100, code_hash="c", client_agent="qiskit", backend="ibm_torino")
    base.update(fields)
    return base


def _rows(records: list[dict[str, Any]], entity: str = "api_key_id", **window: Any) -> dict:
    start = window.get("start", T0 - timedelta(hours=3))
    end = window.get("end", T0 + timedelta(hours=3))
    table = window_features(pa.Table.from_pylist(records, schema=SCHEMA), start, end, entity)
    return {(r[entity], r["event_timestamp"]): r for r in table.to_pylist()}


# --- a naive oracle: every aggregate by filtering the records, row by row ----------------

_SUBMISSION = {"submitted", "rejected"}
_OUTCOME = {"completed", "failed", "cancelled", "rejected"}
_FAILURE = {"failed", "rejected"}


def _minute(record: dict[str, Any]) -> int:
    return int((record["timestamp"] - T0).total_seconds() // 60)


def _cost(r: dict[str, Any]) -> float:
    shots = r["shots"] if r["shots"] is not None else 1
    circuits = r["num_circuits"] if r["num_circuits"] is not None else 1
    depth = max(r["depth"] if r["depth"] is not None else 1, 1)
    return float(shots * circuits * depth * backend_cost_weight(r["backend"]))


def _submission_ids(records: list[dict[str, Any]], entity: str) -> set[int]:
    """``id`` of each record that is its job's submission: a job counts at its earliest."""
    out = set()
    for r in records:
        if r.get("job_id") is None:
            if r["status"] in _SUBMISSION:
                out.add(id(r))
            continue
        key = (r["timestamp"], SUBMISSION_PRECEDENCE[r["status"]])
        before = [
            o
            for o in records
            if o[entity] == r[entity]
            and o.get("job_id") == r["job_id"]
            and (o["timestamp"], SUBMISSION_PRECEDENCE[o["status"]]) < key
        ]
        if not any(
            r["timestamp"] - o["timestamp"] <= timedelta(minutes=JOB_MEMORY_MINUTES) for o in before
        ):
            out.add(id(r))
    return out


def _ms(record: dict[str, Any]) -> int:
    return (record["timestamp"] - T0) // timedelta(milliseconds=1)


def _oracle(records: list[dict[str, Any]], entity: str) -> dict[tuple[str, int], dict]:
    """Aggregates per (entity, row minute) straight from the definitions' conventions."""
    by_entity: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_entity.setdefault(r[entity], []).append(r)
    sub_ids = _submission_ids(records, entity)

    def is_sub(r: dict[str, Any]) -> bool:
        return id(r) in sub_ids

    subs_all = [r for r in records if is_sub(r)]
    out = {}
    for name, own in by_entity.items():
        active = {_minute(r) for r in own}
        for t in sorted({m + k for m in active for k in range(1, 6)}):
            agg: dict[str, Any] = {}

            def span(lo: int, hi: int, own: list = own) -> list[dict[str, Any]]:
                return [r for r in own if lo <= _minute(r) <= hi]

            def per_minute(lo: int, hi: int, statuses: set[str], own: list = own) -> list[int]:
                return [
                    sum(1 for r in own if _minute(r) == m and r["status"] in statuses)
                    for m in range(lo, hi + 1)
                ]

            def subs_per_minute(lo: int, hi: int, own: list = own) -> list[int]:
                return [
                    sum(1 for r in own if _minute(r) == m and is_sub(r)) for m in range(lo, hi + 1)
                ]

            for w in WINDOWS.values():
                rs = span(t - w, t - 1)
                prev = span(t - 2 * w, t - w - 1)
                subs = [r for r in rs if is_sub(r)]
                shots = [r["shots"] for r in subs if r["shots"] is not None]
                agg[f"subs_{w}"] = len(subs)
                agg[f"shots_sum_{w}"] = sum(shots)
                agg[f"shots_n_{w}"] = len(shots)
                agg[f"outcomes_{w}"] = sum(r["status"] in _OUTCOME for r in rs)
                agg[f"failures_{w}"] = sum(r["status"] in _FAILURE for r in rs)
                agg[f"rejected_{w}"] = sum(r["status"] == "rejected" for r in rs)
                agg[f"auth_{w}"] = sum(r["error_code"] == "auth_failed" for r in rs)
                agg[f"load_{w}"] = sum(
                    sum(
                        1
                        for o in subs_all
                        if o["backend"] == s["backend"] and _minute(o) == _minute(s)
                    )
                    for s in subs
                )
                agg[f"prev_subs_{w}"] = sum(is_sub(r) for r in prev)
                agg[f"prev_outcomes_{w}"] = sum(r["status"] in _OUTCOME for r in prev)
                agg[f"prev_failures_{w}"] = sum(r["status"] in _FAILURE for r in prev)
                agg[f"shots_max_{w}"] = max(shots, default=0)
                agg[f"peak_subs_{w}"] = max(subs_per_minute(t - w, t - 1))
                agg[f"share_max_{w}"] = max(
                    (
                        len(
                            {
                                o[entity]
                                for o in subs_all
                                if o["code_hash"] == s["code_hash"]
                                and _minute(s) - SHARING_MINUTES < _minute(o) <= _minute(s)
                            }
                        )
                        - 1
                        for s in subs
                        if s["code_hash"] is not None
                    ),
                    default=0,
                )
                for agg_name, field in (
                    ("codes", "code_hash"),
                    ("networks", "source_ip_hash"),
                    ("agents", "client_agent"),
                ):
                    agg[f"{agg_name}_{w}"] = len({s[field] for s in subs} - {None})
                agg[f"cost_{w}"] = math.fsum(_cost(r) for r in subs if r["status"] != "rejected")
                runtimes = [
                    r["runtime_s"]
                    for r in rs
                    if r["status"] == "completed" and r["runtime_s"] is not None
                ]
                agg[f"median_runtime_{w}"] = float(np.median(runtimes)) if runtimes else 0.0
            subs_hist = subs_per_minute(t - 60, t - 2)
            fail_hist = per_minute(t - 60, t - 2, _FAILURE)
            agg["hist_subs"] = sum(subs_hist)
            agg["hist_subs_sq"] = sum(x * x for x in subs_hist)
            agg["hist_failures"] = sum(fail_hist)
            agg["hist_failures_sq"] = sum(x * x for x in fail_hist)
            agg["p95_subs"] = sorted(subs_per_minute(t - 60, t - 1))[RATE_PERCENTILE_RANK]
            day = sorted(m for m in active if t - ACTIVITY_LOOKBACK_MINUTES <= m <= t - 1)
            agg["first_seen_min"] = t - day[0]
            agg["gap_min"] = day[-1] - day[-2] if len(day) > 1 else ACTIVITY_LOOKBACK_MINUTES
            instants = sorted(_ms(r) for r in span(t - 60, t - 1) if is_sub(r))
            gaps = [b - a for a, b in itertools.pairwise(instants)]
            agg["iat_span_ms"] = sum(gaps)
            agg["iat_sq_ms"] = sum(g * g for g in gaps)
            day_subs = [r for r in span(t - DAY_MINUTES, t - 1) if is_sub(r)]
            agg["subs_day"] = len(day_subs)
            agg["cost_day"] = math.fsum(_cost(r) for r in day_subs if r["status"] != "rejected")
            agg["active_hours_day"] = len({r["timestamp"].hour for r in day_subs})
            day_gaps = [
                b - a
                for a, b in itertools.pairwise(sorted(_ms(r) for r in day_subs))
                if b - a <= SHARING_MINUTES * 60_000
            ]
            agg["iat_day_gaps"] = len(day_gaps)
            agg["iat_day_sum_ms"] = sum(day_gaps)
            agg["iat_day_sq_ms"] = sum(g * g for g in day_gaps)
            agg["net_auth_max"] = max(
                (
                    len(
                        {
                            o[entity]
                            for o in records
                            if o["error_code"] == "auth_failed"
                            and o["source_ip_hash"] == r["source_ip_hash"]
                            and _minute(r) - SHARING_MINUTES < _minute(o) <= _minute(r)
                        }
                        - {r[entity]}
                    )
                    for r in span(t - 60, t - 1)
                    if r["source_ip_hash"] is not None
                ),
                default=0,
            )
            assert set(agg) == set(AGGREGATES)
            out[name, t] = agg
    return out


def _random_records(seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    records = []
    for _ in range(160):
        key = rng.choice("abcd")
        # Mostly within 3 hours; a few a day or more before (outside the lookback or not).
        at = timedelta(seconds=rng.uniform(0, 3 * 3600))
        if rng.random() < 0.05:
            at -= timedelta(hours=rng.choice([23, 25, 30]))
        records.append(
            _record(
                key,
                at,
                rng.choice(STATUSES),
                user=f"u{'abcd'.index(key) % 2}",
                shots=rng.choice([None, 0, 1, 1000, 10**6]),
                code_hash=rng.choice([None, "c1", "c2", "c3"]),
                num_circuits=rng.choice([None, 1, 7]),
                depth=rng.choice([None, 0, 40]),
                backend=rng.choice([None, "ibm_torino", "aer_simulator", "sv1"]),
                runtime_s=rng.choice([None, 0.5, 2.0, 7.25, 100.0]),
                error_code=rng.choice([None, None, "auth_failed", "timeout"]),
                source_ip_hash=rng.choice([None, "n1", "n2"]),
                client_agent=rng.choice(["qiskit", "cirq"]),
                # Jobs with several records (an event stream), one (a job log), or none.
                job_id=rng.choice([None, *(f"j{i}" for i in range(40))]),
            )
        )
    return records


@pytest.mark.parametrize("entity", ["api_key_id", "user"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_feature_matches_a_naive_oracle_on_random_records(seed: int, entity: str) -> None:
    records = _random_records(seed)
    oracle = _oracle(records, entity)
    start, end = T0 - timedelta(hours=40), T0 + timedelta(hours=4)
    got = _rows(records, entity, start=start, end=end)

    expected_keys = {(name, T0 + t * MINUTE) for name, t in oracle}
    assert set(got) == expected_keys
    names = sorted(oracle)
    aggregates = {a: np.array([oracle[k][a] for k in names]) for a in AGGREGATES}
    features = derive(aggregates)
    for i, (name, t) in enumerate(names):
        row = got[name, T0 + t * MINUTE]
        for feature in FEATURE_NAMES:
            assert row[feature] == pytest.approx(features[feature][i], rel=1e-12, abs=1e-12), (
                feature,
                name,
                t,
            )


# --- exact hand answers --------------------------------------------------------------


def test_code_hash_sharing_counts_other_keys_in_the_hour_up_to_each_submission() -> None:
    records = [
        _record("A", 0 * MINUTE, code_hash="h"),
        _record("B", 10 * MINUTE, code_hash="h"),
        _record("C", 30 * MINUTE, code_hash="h"),
        _record("C", 30 * MINUTE + timedelta(seconds=5), code_hash="other"),
        _record("D", 100 * MINUTE, code_hash="h"),  # A, B and C used it over an hour ago
    ]
    rows = _rows(records)

    assert rows["A", T0 + MINUTE]["code_hash_sharing_1m"] == 0  # nobody else yet
    assert rows["C", T0 + 31 * MINUTE]["code_hash_sharing_1m"] == 2  # A and B
    assert rows["C", T0 + 35 * MINUTE]["code_hash_sharing_5m"] == 2
    assert rows["D", T0 + 101 * MINUTE]["code_hash_sharing_1h"] == 0


def test_backend_load_is_everyones_submissions_to_the_backend_in_that_minute() -> None:
    records = [
        _record("A", timedelta(seconds=1), backend="ibm_torino"),
        _record("B", timedelta(seconds=2), backend="ibm_torino"),
        _record("B", timedelta(seconds=3), backend="ibm_torino"),
        _record("C", timedelta(seconds=4), backend="aer_simulator"),
        _record("A", timedelta(seconds=5), "completed", backend="ibm_torino"),  # not a submission
    ]
    rows = _rows(records)

    assert rows["A", T0 + MINUTE]["backend_load_at_submit_1m"] == 3.0
    assert rows["B", T0 + MINUTE]["backend_load_at_submit_1m"] == 3.0
    assert rows["C", T0 + MINUTE]["backend_load_at_submit_1m"] == 1.0


def test_median_runtime_reads_completed_jobs_and_averages_the_middle_pair() -> None:
    records = [
        _record("A", timedelta(seconds=s), "completed", runtime_s=r)
        for s, r in [(1, 20.0), (2, 1.0), (3, 10.0), (4, 2.0)]
    ] + [
        _record("A", timedelta(seconds=5), "failed", runtime_s=999.0),  # not completed
        _record("A", MINUTE + timedelta(seconds=1), "completed", runtime_s=3.0),
    ]
    rows = _rows(records)

    assert rows["A", T0 + MINUTE]["median_runtime_s_1m"] == 6.0  # (2 + 10) / 2
    assert rows["A", T0 + 2 * MINUTE]["median_runtime_s_1m"] == 3.0
    assert rows["A", T0 + 2 * MINUTE]["median_runtime_s_5m"] == 3.0  # 1 2 [3] 10 20


def test_estimated_cost_weighs_qpus_over_simulators() -> None:
    records = [
        _record("A", timedelta(seconds=1), shots=1000, num_circuits=2, depth=10),
        _record(
            "B", timedelta(seconds=1), shots=1000, num_circuits=2, depth=10, backend="aer_simulator"
        ),
        _record("C", timedelta(seconds=1), shots=None, num_circuits=3, backend="default.qubit"),
        _record("D", timedelta(seconds=1), "rejected", shots=1000),  # never ran
    ]
    rows = _rows(records)

    assert rows["A", T0 + MINUTE]["estimated_cost_1m"] == 20_000.0
    assert rows["B", T0 + MINUTE]["estimated_cost_1m"] == 200.0
    assert rows["C", T0 + MINUTE]["estimated_cost_1m"] == pytest.approx(0.03)
    assert rows["D", T0 + MINUTE]["estimated_cost_1m"] == 0.0


def test_auth_failures_rejections_networks_and_agents() -> None:
    records = [
        _record(
            "A",
            timedelta(seconds=1),
            "rejected",
            error_code="auth_failed",
            source_ip_hash="n1",
            client_agent="curl",
        ),
        _record(
            "A",
            timedelta(seconds=2),
            "rejected",
            error_code="quota_exceeded",
            source_ip_hash="n2",
            client_agent="curl",
        ),
        _record("A", timedelta(seconds=3), "submitted", source_ip_hash="n3"),
        _record("A", timedelta(seconds=4), "failed", error_code="auth_failed", source_ip_hash="n9"),
    ]
    row = _rows(records)["A", T0 + MINUTE]

    assert row["auth_failures_1m"] == 2
    assert row["rejected_1m"] == 2
    assert row["distinct_networks_1m"] == 3  # n9 is on a non-submission
    assert row["distinct_client_agents_1m"] == 2
    assert row["fail_rate_1m"] == 1.0  # three outcomes, all failures


def test_change_features_compare_with_the_previous_window_of_the_same_length() -> None:
    records = [_record("A", timedelta(seconds=s), "failed") for s in (1, 2)]
    records += [_record("A", MINUTE + timedelta(seconds=s), "completed") for s in (1, 2, 3, 4)]
    records += [_record("A", MINUTE + timedelta(seconds=5))]
    row = _rows(records)["A", T0 + 2 * MINUTE]

    assert row["fail_rate_change_1m"] == -1.0  # 0/4 after 2/2
    assert row["submission_rate_change_1m"] == 1.0  # 1 submission after none


def test_rate_percentile_burstiness_and_reuse() -> None:
    per_minute = {0: 10, 7: 3, 20: 2, 41: 1}
    records = [
        _record("A", m * MINUTE + timedelta(seconds=i), code_hash="loop" if i else "start")
        for m, n in per_minute.items()
        for i in range(n)
    ]
    rows = _rows(records)

    at_42 = rows["A", T0 + 42 * MINUTE]
    assert at_42["submissions_per_min_p95_1h"] == 1  # 56 idle minutes, then 1 2 3 10
    assert rows["A", T0 + 21 * MINUTE]["submissions_per_min_p95_1h"] == 0  # only 3 busy
    assert at_42["burstiness_1h"] == pytest.approx(10 / (16 / 60))
    assert at_42["burstiness_5m"] == 5.0  # one busy minute in five
    assert rows["A", T0 + MINUTE]["circuit_reuse_fraction_1m"] == pytest.approx(8 / 10)


def test_first_seen_and_gap_look_back_one_day() -> None:
    records = [
        _record("A", -timedelta(hours=30)),  # more than a day before: out of sight
        _record("A", -timedelta(minutes=120)),
        _record("A", timedelta(0)),
    ]
    rows = _rows(records, start=T0 - timedelta(hours=31), end=T0 + timedelta(hours=1))

    assert rows["A", T0 + MINUTE]["hours_since_first_seen_24h"] == pytest.approx(121 / 60)
    assert rows["A", T0 + MINUTE]["gap_before_latest_activity_min"] == 120
    assert rows["A", T0 - 119 * MINUTE]["gap_before_latest_activity_min"] == 1440
    first = rows["A", T0 - timedelta(hours=30) + MINUTE]
    assert first["hours_since_first_seen_24h"] == pytest.approx(1 / 60)


def test_user_rows_pool_the_keys_of_one_user() -> None:
    records = [
        _record("A", timedelta(seconds=1), user="u", shots=10),
        _record("B", timedelta(seconds=2), user="u", shots=30),
    ]
    row = _rows(records, entity="user")["u", T0 + MINUTE]

    assert row["submissions_1m"] == 2
    assert row["mean_shots_1m"] == 20.0
    assert row["max_shots_1m"] == 30


def test_missing_columns_and_unknown_entities_are_refused() -> None:
    table = pa.table({"api_key_id": ["a"], "timestamp": [T0]})
    with pytest.raises(ValueError, match="status"):
        window_features(table, T0, T0 + MINUTE)
    with pytest.raises(ValueError, match="entity_column"):
        window_features(table, T0, T0 + MINUTE, entity_column="backend")


def test_specs_have_bounds_units_and_a_view() -> None:
    assert {f.window for f in FEATURES} == set(WINDOWS)
    for f in FEATURES:
        assert f.unit.strip() and f.description.strip()
        assert f.low is None or f.high is None or f.low < f.high


# --- the numpy kernels against brute force -------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(st.integers(0, 2**20), min_size=1, max_size=80),
    data=st.data(),
)
def test_range_kth_is_the_kth_smallest_of_the_slice(values: list[int], data: st.DataObject) -> None:
    queries = []
    for _ in range(20):
        a = data.draw(st.integers(0, len(values) - 1))
        b = data.draw(st.integers(a + 1, len(values)))
        queries.append((a, b, data.draw(st.integers(0, b - a - 1))))
    first, last, k = (np.array(col) for col in zip(*queries, strict=True))

    got = _range_kth(np.array(values), first, last, k)

    assert got.tolist() == [sorted(values[a:b])[kk] for a, b, kk in queries]


@pytest.mark.parametrize(
    "names",
    [
        DETECTOR_FEATURES,
        ("median_runtime_s_1h", "gap_before_latest_activity_min"),
        ("code_hash_sharing_5m", "submissions_per_min_p95_1h", "estimated_cost_1m"),
    ],
)
def test_a_subset_of_features_equals_those_columns_of_the_full_set(names: tuple[str, ...]) -> None:
    records = pa.Table.from_pylist(_random_records(7), schema=SCHEMA)
    start, end = T0 - timedelta(hours=1), T0 + timedelta(hours=4)

    full = window_features(records, start, end)
    subset = window_features(records, start, end, features=names)

    assert subset.column_names == ["api_key_id", "event_timestamp", *names]
    assert subset.equals(full.select(subset.column_names))
    # The aggregates a subset reads are the union of its formulas', and no more.
    assert aggregates_for(names) < set(AGGREGATES)


def test_unknown_or_repeated_features_are_refused() -> None:
    table = pa.Table.from_pylist([_record("A", timedelta(0))], schema=SCHEMA)
    for names in (["submissions_1m", "no_such_feature"], ["submissions_1m", "submissions_1m"]):
        with pytest.raises(ValueError, match="FEATURE_NAMES"):
            window_features(table, T0, T0 + MINUTE, features=names)

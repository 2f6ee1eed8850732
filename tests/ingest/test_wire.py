"""The wire fast path agrees with the contract: never accepts more, never stores differently.

For every record the fast path accepts, the slow path (`validate_record` plus the int64
limit) accepts it too and produces the very same spool text; every canonical record (what
`record_to_json` writes, what instrumentors send) takes the fast path. The collector's
readers give the same outcome as the slow reader on whole bodies.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.contract_cases import (
    BAD_TIMESTAMPS,
    EDGE_CASES,
    FAST,
    GOOD_TIMESTAMPS,
    VALID_RECORD,
    VALID_RECORDS,
    mutated_records,
)
from support.records import record_dict

from qabuse_dagster.ingest import collector, wire
from qabuse_dagster.ingest.partitions import records_to_table
from qabuse_dagster.telemetry.contract import ContractViolation, record_to_json, validate_record

# The same value written the ways clients write JSON.
ENCODINGS = [
    lambda obj: json.dumps(obj).encode(),
    lambda obj: json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode(),
    lambda obj: json.dumps(obj, indent=2).encode(),
]


def slow_row(obj: Any) -> wire.SpoolRow | None:
    try:
        return wire.spool_row_of(collector._check(obj))
    except ContractViolation:
        return None


def assert_agrees(obj: Any) -> wire.SpoolRow | None:
    """The fast path on each encoding of ``obj``: declined, or exactly the slow path's row."""
    expected = slow_row(obj)
    fast = None
    for encode in ENCODINGS:
        try:
            raw = encode(obj)
        except ValueError:  # a value json cannot write (it never reaches the wire)
            continue
        fast = wire.to_spool_row(raw)
        if fast is not None:
            assert expected is not None, f"fast path accepted what the contract refuses: {raw!r}"
            assert fast == expected, raw
    return fast


@FAST
@given(mutated_records())
def test_fast_path_never_accepts_what_the_contract_refuses(case: tuple[str, dict]) -> None:
    assert_agrees(case[1])


@FAST
@given(VALID_RECORDS)
def test_fast_path_matches_the_slow_path_on_valid_records(obj: dict[str, Any]) -> None:
    assert_agrees(obj)


@pytest.mark.parametrize(("field", "value"), EDGE_CASES)
def test_fast_path_matches_the_slow_path_on_edge_values(field: str, value: Any) -> None:
    assert_agrees({**VALID_RECORD, field: value})


@FAST
@given(VALID_RECORDS)
def test_every_canonical_record_takes_the_fast_path(obj: dict[str, Any]) -> None:
    row = slow_row(obj)
    if row is None:  # valid, but beyond int64: refused by both
        return
    canonical = record_to_json(validate_record(obj))
    for encode in ENCODINGS:
        assert wire.to_spool_row(encode(canonical)) == row


@pytest.mark.parametrize(
    "raw",
    [
        b'{"schema_version": 1, "job_id": "\\ud800"}',  # lone surrogate escape
        b"[1]",
        b"null",
        b"",
        b"{",
        b'{"a": NaN}',
        json.dumps(VALID_RECORD).replace('"job-1"', '"job-\xff"').encode("latin-1"),
        json.dumps({**VALID_RECORD, "tags": {"k": "v"}})
        .replace("k", "\xed\xa0\x80")
        .encode("latin-1"),
    ],
)
def test_fast_path_declines_what_it_cannot_read(raw: bytes) -> None:
    assert wire.to_spool_row(raw) is None


def body_cases() -> st.SearchStrategy[list[Any]]:
    elements = st.one_of(
        VALID_RECORDS, mutated_records().map(lambda case: case[1]), st.integers(), st.none()
    )
    return st.lists(elements, max_size=6)


@FAST
@given(body_cases())
def test_collector_reads_arrays_as_the_slow_reader_does(batch: list[Any]) -> None:
    body = json.dumps(batch).encode()
    fast = collector.read_array(body, "test")
    slow = collector._read_array_slowly(body, "test")
    assert fast == slow


def canonical_or_mutated() -> st.SearchStrategy[Any]:
    canonical = VALID_RECORDS.map(lambda obj: record_to_json(validate_record(obj)))
    return st.one_of(canonical, canonical, mutated_records().map(lambda case: case[1]))


@FAST
@given(st.lists(canonical_or_mutated(), max_size=6))
def test_whole_batch_fast_path_reads_as_the_slow_reader_does(batch: list[Any]) -> None:
    body = json.dumps(batch).encode()
    expected = collector._read_array_slowly(body, "test")
    rows = wire.array_to_spool_rows(body)
    if rows is not None:
        assert not expected.rejected and rows == expected.rows
    assert collector.read_array(body, "test") == expected


@pytest.mark.parametrize(
    "stamp", GOOD_TIMESTAMPS + BAD_TIMESTAMPS + ["2026-01-01T24:00:00.000000Z"]
)
def test_whole_batch_timestamps_as_the_contract_reads_them(stamp: Any) -> None:
    canonical = record_to_json(validate_record(VALID_RECORD))
    body = json.dumps([canonical, {**canonical, "job_id": "j2", "timestamp": stamp}])
    expected = collector._read_array_slowly(body.encode(), "test")
    rows = wire.array_to_spool_rows(body.encode())
    if rows is not None:
        assert not expected.rejected and rows == expected.rows


@pytest.mark.parametrize(
    "body",
    [
        b"[" + json.dumps(VALID_RECORD).encode() + b", 1e999]",
        b"[" + json.dumps(VALID_RECORD).encode() + b', {"shots": ' + b"9" * 5000 + b"}]",
        b"[" + json.dumps(VALID_RECORD).encode() + b', {"x": "\xff"}]',
        b"[" + json.dumps(VALID_RECORD).replace('"job-1"', '"\xff"').encode("latin-1") + b"]",
        b"[" + json.dumps(VALID_RECORD).encode() + b", NaN]",
        b"\xef\xbb\xbf[]",
        b"[" * 3000 + b"]" * 3000,
    ],
)
def test_bodies_only_the_slow_reader_words_get_its_answer(body: bytes) -> None:
    try:
        slow: Any = collector._read_array_slowly(body, "test")
    except collector.BodyError as exc:
        slow = str(exc)
    try:
        fast: Any = collector.read_array(body, "test")
    except collector.BodyError as exc:
        fast = str(exc)
    assert fast == slow


def test_ndjson_lines_fast_and_slow_alike() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    good = [record_dict(f"j{i}", at + timedelta(seconds=i)) for i in range(3)]
    lines = [
        json.dumps(good[0]),
        json.dumps({**good[1], "shots": 1024.0}),  # valid, slow path
        json.dumps({**good[2], "shots": -1}),  # invalid
        "not json",
    ]
    outcome = collector.read_ndjson("\n".join(lines).encode(), "test")
    assert [row.job_id for row in outcome.rows] == ["j0", "j1"]
    assert outcome.rows[1] == wire.spool_row_of(validate_record({**good[1], "shots": 1024}))
    assert [r.index for r in outcome.rejected] == [2, 3]
    assert outcome.rejected[0].errors == [("shots", "must be >= 0 (got -1)")]


@FAST
@given(st.lists(VALID_RECORDS, max_size=8))
def test_spool_texts_become_the_same_table_as_validated_records(batch: list[dict]) -> None:
    rows = [row for row in map(slow_row, batch) if row is not None]
    table = wire.spool_rows_to_table([row.text for row in rows])
    assert table is not None
    expected = records_to_table([validate_record(json.loads(row.text)) for row in rows])
    assert table.equals(expected)


def test_a_text_that_is_not_canonical_is_left_to_the_caller() -> None:
    assert wire.spool_rows_to_table(['{"schema_version": 1}']) is None
    empty = wire.spool_rows_to_table([])
    assert isinstance(empty, pa.Table) and empty.num_rows == 0

"""``qabuse ingest``: hostile JSONL lines are quarantined, every valid record is kept."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support.records import HEX_KEY, HEX_USER, record_dict

from qabuse_dagster import settings
from qabuse_dagster.ingest.files import MAX_LINE_BYTES, ingest_labels, ingest_telemetry
from qabuse_dagster.ingest.partitions import compact_hour, landing_hours, read_raw
from qabuse_dagster.settings import Paths
from qabuse_dagster.telemetry.labels import LabelsError, read_labels

H0 = datetime(2026, 3, 2, 13, 0, tzinfo=UTC)


def _line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path / "home")


def _compact_all(paths: Paths) -> None:
    for hour in landing_hours(paths.landing):
        compact_hour(hour, paths.landing, paths.raw_telemetry)


def _quarantined(paths: Paths) -> list[dict[str, Any]]:
    files = sorted(paths.quarantine.glob("*.jsonl"))
    assert len(files) == 1
    return [json.loads(line) for line in files[0].read_text(encoding="utf-8").splitlines()]


def _hostile_file(path: Path) -> tuple[list[tuple[str, str]], dict[int, str]]:
    """Write a JSONL file mixing valid and hostile lines.

    Returns:
        The identities of valid unique records, and for each rejected 1-based line
        a fragment its quarantine reason must contain.
    """
    missing_backend = record_dict("bad-missing", H0)
    del missing_backend["backend"]
    no_fraction = record_dict("ok-2", H0 + timedelta(hours=1, minutes=2))
    no_fraction["timestamp"] = "2026-03-02T14:02:00Z"
    lines: list[tuple[bytes, str | None]] = [
        (_line(record_dict("ok-1", H0 + timedelta(minutes=1))), None),
        (b"\n", None),
        (b'{"schema_version": 1, "job_id": \n', "<line>: not JSON"),
        (_line([record_dict("bad-array", H0)]), "<record>: expected a JSON object"),
        (_line(record_dict("bad-type", H0, shots="1024")), "shots: expected an integer"),
        (_line(record_dict("bad-type2", H0, num_circuits=True)), "num_circuits"),
        (_line(missing_backend), "backend: missing required field"),
        (_line(record_dict("bad-extra", H0, circuit_source="OPENQASM")), "circuit_source"),
        (
            _line(record_dict("bad-utf8", H0)).replace(b"bad-utf8", b"bad-\xff\xfe-utf8"),
            "<line>: not UTF-8",
        ),
        (_line(record_dict("bad-long", H0, client_agent="x" * 100_000)), "<line>: longer than"),
        (b"[" * 100_000 + b"\n", "<line>: longer than"),
        (b"[" * 50_000 + b"\n", "<line>: JSON nested too deeply"),
        (_line(record_dict("bad-negative", H0, shots=-1)), "shots: must be >= 0"),
        (_line(record_dict("ok-1", H0 + timedelta(minutes=7), shots=7)), None),  # duplicate
        (b"   \t \n", None),
        (_line(record_dict("ok-1", H0 + timedelta(minutes=3), "completed")), None),
        (_line(record_dict("bad-hash", H0, api_key_id="ABC")), "api_key_id: must match"),
        (_line(record_dict("bad-time", H0, timestamp="2026-03-02 13:00:00")), "timestamp"),
        (_line(record_dict("bad-version", H0, schema_version=2)), "schema_version"),
        (b"null\n", "<record>: expected a JSON object, got null"),
        (_line(no_fraction).rstrip(b"\n"), None),  # last line, no newline at the end
    ]
    path.write_bytes(b"".join(raw for raw, _ in lines))
    reasons = {n: reason for n, (_, reason) in enumerate(lines, start=1) if reason is not None}
    valid = [("ok-1", "submitted"), ("ok-1", "completed"), ("ok-2", "submitted")]
    return valid, reasons


def test_hostile_lines_are_counted_quarantined_and_valid_ones_kept(
    tmp_path: Path, paths: Paths
) -> None:
    source = tmp_path / "telemetry.jsonl"
    valid, reasons = _hostile_file(source)

    report = ingest_telemetry([source], paths)

    assert report.files == 1
    assert report.accepted == len(valid)
    assert report.duplicates == 1
    assert report.rejected == len(reasons)
    assert report.lines == len(valid) + 1 + len(reasons)  # blank lines are not counted
    assert report.quarantine_file is not None and report.quarantine_file.exists()
    assert report.landing_files

    quarantined = _quarantined(paths)
    assert [q["line"] for q in quarantined] == sorted(reasons)
    for entry in quarantined:
        assert entry["source"] == str(source)
        assert reasons[entry["line"]] in entry["reason"], entry
        assert len(entry["raw"]) <= MAX_LINE_BYTES
    not_utf8 = next(q for q in quarantined if "not UTF-8" in q["reason"])
    assert "bad-\ufffd" in not_utf8["raw"]  # kept, with the bad bytes replaced

    _compact_all(paths)
    stored = read_raw(paths.raw_telemetry)
    identities = list(zip(stored["job_id"].to_pylist(), stored["status"].to_pylist(), strict=True))
    assert sorted(identities) == sorted(valid)
    ok1 = next(r for r in stored.to_pylist() if (r["job_id"], r["status"]) == ("ok-1", "submitted"))
    assert ok1["shots"] == 1024  # the first copy, not the duplicate line's
    ok2 = next(r for r in stored.to_pylist() if r["job_id"] == "ok-2")
    assert ok2["timestamp"] == datetime(2026, 3, 2, 14, 2, tzinfo=UTC)


def test_valid_file_writes_no_quarantine(tmp_path: Path, paths: Paths) -> None:
    source = tmp_path / "ok.jsonl"
    source.write_bytes(b"".join(_line(record_dict(f"j{i}", H0)) for i in range(5)))

    report = ingest_telemetry([source], paths)

    assert (report.accepted, report.duplicates, report.rejected) == (5, 0, 0)
    assert report.quarantine_file is None
    assert not paths.quarantine.exists()


def test_several_files_number_their_own_lines_and_share_dedup(tmp_path: Path, paths: Paths) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_bytes(_line(record_dict("j1", H0)) + b"{oops\n")
    second.write_bytes(
        b"\n" + _line(record_dict("j1", H0, shots=1)) + b"{oops\n" + _line(record_dict("j2", H0))
    )
    progress: list[int] = []

    report = ingest_telemetry([first, second], paths, on_progress=progress.append)

    assert (report.files, report.accepted, report.duplicates, report.rejected) == (2, 2, 1, 2)
    assert sum(progress) == report.lines == 5
    assert [(q["source"], q["line"]) for q in _quarantined(paths)] == [
        (str(first), 2),
        (str(second), 3),
    ]


def _label(incident_id: str, **extra: Any) -> dict[str, Any]:
    label = {
        "incident_id": incident_id,
        "kind": "credential_stuffing",
        "start": "2026-03-02T13:00:00Z",
        "end": "2026-03-02T14:00:00Z",
        "api_key_ids": [HEX_KEY],
    }
    label.update(extra)
    return label


def _write_labels(path: Path, labels: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(label) + "\n" for label in labels), encoding="utf-8")
    return path


def test_ingest_labels_merges_and_accepts_identical_reingest(tmp_path: Path, paths: Paths) -> None:
    first = _write_labels(tmp_path / "one.jsonl", [_label("inc-1"), _label("inc-2")])
    second = _write_labels(
        tmp_path / "two.jsonl", [_label("inc-2"), _label("inc-3", users=[HEX_USER])]
    )

    assert [label.incident_id for label in ingest_labels(first, paths)] == ["inc-1", "inc-2"]
    merged = ingest_labels(second, paths)

    assert [label.incident_id for label in merged] == ["inc-1", "inc-2", "inc-3"]
    assert read_labels(paths.labels) == merged
    stored = paths.labels.read_bytes()
    assert ingest_labels(first, paths) == merged
    assert paths.labels.read_bytes() == stored


def test_ingest_labels_refuses_a_changed_label(tmp_path: Path, paths: Paths) -> None:
    ingest_labels(_write_labels(tmp_path / "one.jsonl", [_label("inc-1")]), paths)
    stored = paths.labels.read_bytes()
    changed = _write_labels(
        tmp_path / "changed.jsonl",
        [_label("inc-9"), _label("inc-1", end="2026-03-02T15:00:00Z")],
    )

    with pytest.raises(LabelsError, match="inc-1"):
        ingest_labels(changed, paths)

    assert paths.labels.read_bytes() == stored
    assert [label.incident_id for label in read_labels(paths.labels)] == ["inc-1"]


def test_ingest_labels_rejects_an_invalid_file_without_writing(
    tmp_path: Path, paths: Paths
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_label("inc-1", api_key_ids=["XYZ"])) + "\n", encoding="utf-8")

    with pytest.raises(LabelsError, match="api_key_ids"):
        ingest_labels(bad, paths)
    assert not paths.labels.exists()


def test_integer_too_long_to_parse_is_quarantined(tmp_path: Path, paths: Paths) -> None:
    source = tmp_path / "huge-int.jsonl"
    huge = json.dumps(record_dict("bad-huge", H0)).replace(
        '"shots": 1024', '"shots": ' + "9" * 5000
    )
    source.write_bytes(
        _line(record_dict("ok-1", H0)) + huge.encode() + b"\n" + _line(record_dict("ok-2", H0))
    )

    report = ingest_telemetry([source], paths)

    assert (report.accepted, report.rejected) == (2, 1)
    assert [q["line"] for q in _quarantined(paths)] == [2]


def test_lone_surrogate_does_not_cost_the_valid_lines(tmp_path: Path, paths: Paths) -> None:
    source = tmp_path / "surrogate.jsonl"
    source.write_bytes(_line(record_dict("ok-1", H0)) + _line(record_dict("bad-\ud800", H0)))

    report = ingest_telemetry([source], paths)

    assert report.accepted + report.rejected == 2
    _compact_all(paths)
    assert "ok-1" in read_raw(paths.raw_telemetry)["job_id"].to_pylist()


def test_ingest_labels_with_lone_surrogate_stores_it_or_raises_labels_error(
    tmp_path: Path, paths: Paths
) -> None:
    source = _write_labels(tmp_path / "surrogate.jsonl", [_label("inc-\ud800")])
    try:
        ingest_labels(source, paths)
    except LabelsError:
        assert not paths.labels.exists()
    else:
        assert len(read_labels(paths.labels)) == 1


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_a_line_in_another_unicode_encoding_is_refused_as_not_utf8(encoding: str) -> None:
    from qabuse_dagster.ingest.files import parse_line
    from qabuse_dagster.telemetry.contract import ContractViolation

    line = json.dumps(record_dict("j", datetime(2026, 11, 2, tzinfo=UTC))).encode(encoding)

    with pytest.raises(ContractViolation, match="not UTF-8"):
        parse_line(line)


def test_parquet_files_are_ingested_row_by_row_like_jsonl(tmp_path: Path, paths: Paths) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qabuse_dagster.ingest.partitions import TELEMETRY_SCHEMA, records_to_table
    from qabuse_dagster.telemetry.contract import validate_record

    t0 = datetime(2026, 11, 2, 9, tzinfo=UTC)
    good = [
        record_dict(f"p{i}", t0 + timedelta(minutes=i), gate_counts={"cx": i, "h": 1})
        for i in range(5)
    ]
    table = records_to_table([validate_record(r) for r in good])
    bad = table.slice(0, 1).to_pylist()
    bad[0] |= {"job_id": "bad-shots", "shots": -1}
    source = tmp_path / "telemetry.parquet"
    pq.write_table(
        pa.concat_tables([table, table.slice(1, 1), pa.Table.from_pylist(bad, TELEMETRY_SCHEMA)]),
        source,
    )

    report = ingest_telemetry([source], paths)
    _compact_all(paths)

    assert (report.accepted, report.duplicates, report.rejected) == (5, 1, 1)
    rejected = _quarantined(paths)
    assert rejected[0]["line"] == 7 and "shots" in rejected[0]["reason"]
    stored = read_raw(paths.raw_telemetry).sort_by("job_id")
    assert stored["job_id"].to_pylist() == [f"p{i}" for i in range(5)]
    assert stored.to_pylist() == table.sort_by("job_id").to_pylist()  # gate counts included


FAR_DATED = {
    "before-start": datetime(2025, 6, 1, tzinfo=UTC),
    "year-1": datetime(1, 1, 1, tzinfo=UTC),
    "far-future": datetime(2099, 1, 1, tzinfo=UTC),
    "year-9999": datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
}


def test_records_outside_the_accepted_range_are_quarantined_with_a_reason(
    tmp_path: Path, paths: Paths
) -> None:
    source = tmp_path / "mixed.jsonl"
    lines = [_line(record_dict(f"ok-{i}", H0 + timedelta(minutes=i))) for i in range(3)]
    lines += [_line(record_dict(job, at)) for job, at in FAR_DATED.items()]
    source.write_bytes(b"".join(lines))

    report = ingest_telemetry([source], paths)

    assert (report.accepted, report.rejected, report.out_of_range) == (3, 4, 4)
    quarantined = {json.loads(q["raw"])["job_id"]: q["reason"] for q in _quarantined(paths)}
    assert set(quarantined) == set(FAR_DATED)
    assert "before 2026-01-01T00:00:00.000000Z" in quarantined["before-start"]
    assert "before" in quarantined["year-1"]
    assert "ahead of the receiver's clock" in quarantined["far-future"]
    assert quarantined["year-9999"].startswith("timestamp: 9999-12-31T23:59:59")
    assert landing_hours(paths.landing) == [H0]


def test_the_accepted_range_follows_its_settings(
    tmp_path: Path, paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(settings.TELEMETRY_START_ENV, "2025-01-01T00:00:00Z")
    monkeypatch.setenv(settings.MAX_CLOCK_SKEW_ENV, "0")
    now = datetime.now(UTC)
    source = tmp_path / "t.jsonl"
    source.write_bytes(
        _line(record_dict("old", FAR_DATED["before-start"]))
        + _line(record_dict("ahead", now + timedelta(minutes=5)))
    )

    report = ingest_telemetry([source], paths)

    assert (report.accepted, report.out_of_range) == (1, 1)
    assert "ahead" in _quarantined(paths)[0]["raw"]


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        (settings.TELEMETRY_START_ENV, "last tuesday", "RFC 3339"),
        (settings.TELEMETRY_START_ENV, "2026-01-01T00:00:00", "UTC offset"),
        (settings.MAX_CLOCK_SKEW_ENV, "-5", "seconds from 0 to 86400"),
        (settings.MAX_CLOCK_SKEW_ENV, "soon", "seconds from 0 to 86400"),
    ],
)
def test_a_malformed_range_setting_is_named(
    tmp_path: Path, paths: Paths, monkeypatch: pytest.MonkeyPatch, name: str, value: str, says: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=says) as error:
        ingest_telemetry([], paths)
    assert name in str(error.value)

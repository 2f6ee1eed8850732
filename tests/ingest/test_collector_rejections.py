"""What the collector answers and quarantines for rejected records: bounded, deduplicated,
worded by the contract, and never the cause of a good neighbour's loss."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from support.records import record_dict

from qabuse_dagster.ingest.collector import create_app
from qabuse_dagster.ingest.files import INT64_MAX
from qabuse_dagster.settings import Paths

pytestmark = pytest.mark.fuzz  # a hostile-input suite: `make fuzz` runs it

H0 = datetime(2026, 3, 2, 13, 0, tzinfo=UTC)
TOKEN = "rejections-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NDJSON = {**AUTH, "Content-Type": "application/x-ndjson"}
PYTHON_HINT = "set_int_max_str_digits"
#: 600 KB of empty objects: 200,000 records that each miss every required field.
EMPTY_OBJECTS = b"{}\n" * 200_000


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path / "home")


def collector(paths: Paths, **options: Any) -> TestClient:
    return TestClient(create_app(paths, {TOKEN: "ci"}, rate_per_s=1000, burst=1000, **options))


@pytest.fixture
def client(paths: Paths) -> Iterator[TestClient]:
    with collector(paths) as test_client:
        yield test_client


def quarantine_bytes(paths: Paths) -> int:
    return sum(path.stat().st_size for path in paths.quarantine.glob("*.jsonl"))


def quarantined(paths: Paths) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted(paths.quarantine.glob("*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
    ]


# -- defect 3: a rejection costs about what the rejected input did -------------------------


def test_a_body_of_empty_objects_is_answered_and_quarantined_in_bounded_bytes(
    paths: Paths,
) -> None:
    # Over the default of records per request (refused 413, see below): allowed here.
    with collector(paths, max_records=200_000) as client:
        answer = client.post("/v1/telemetry", content=EMPTY_OBJECTS, headers=NDJSON)

    assert answer.status_code == 200
    assert len(answer.content) <= 256 * 1024, len(answer.content)
    assert quarantine_bytes(paths) <= 3 * len(EMPTY_OBJECTS) + 64 * 1024, quarantine_bytes(paths)
    body = answer.json()
    assert (body["accepted"], body["duplicates"], body["rejected_total"]) == (0, 0, 200_000)
    assert body["rejections_truncated"] is True
    assert [r["index"] for r in body["rejected"]] == list(range(100))
    assert body["rejected"][0]["errors"][0] == ["schema_version", "missing required field"]
    # One reason, said once, with how often and where first.
    assert len(body["reasons"]) == 1
    reason = body["reasons"][0]
    assert (reason["count"], reason["first_index"]) == (200_000, 0)
    assert reason["reason"].startswith("schema_version: missing required field")
    # What did not fit the quarantine is counted, and what did is one compact line each.
    kept = quarantined(paths)
    assert len(kept) + body["not_quarantined"] == 200_000
    assert kept[0] == {
        "source": "collector:ci",
        "line": 1,
        "reason": reason["reason"],
        "raw": "{}",
    }


def test_each_rejection_keeps_its_raw_input_and_a_short_reason(
    client: TestClient, paths: Paths
) -> None:
    spaced = b'{"job_id" :  "x",   "extra": 1}'
    body = b"\n".join([spaced, b"[1, 2]", json.dumps(record_dict("ok", H0)).encode()])

    answer = client.post("/v1/telemetry", content=body, headers=NDJSON).json()

    assert (answer["accepted"], answer["rejected_total"], answer["not_quarantined"]) == (1, 2, 0)
    assert answer["rejections_truncated"] is False
    first, second = quarantined(paths)
    assert first["raw"] == spaced.decode()  # as received, spaces and all
    assert first["reason"].startswith("schema_version: missing required field (and ")
    assert len(first["reason"]) <= 300
    assert second == {
        "source": "collector:ci",
        "line": 2,
        "reason": "<record>: expected a JSON object, got array",
        "raw": "[1, 2]",
    }
    assert {r["reason"]: r["count"] for r in answer["reasons"]} == {
        first["reason"]: 1,
        second["reason"]: 1,
    }


def test_an_array_element_is_quarantined_as_sent(client: TestClient, paths: Paths) -> None:
    body = b'[ {"shots" :-1} , "text"]'

    answer = client.post("/v1/telemetry", content=body, headers=AUTH).json()

    assert answer["rejected_total"] == 2
    assert [q["raw"] for q in quarantined(paths)] == ['{"shots" :-1}', '"text"']


def test_distinct_reasons_are_summarised_up_to_a_bound(client: TestClient) -> None:
    # Each value is its own reason (the message quotes it): 300 of them.
    records = [record_dict(f"job-{i}", H0, shots=-1 - i) for i in range(300)]

    answer = client.post("/v1/telemetry", json=records, headers=AUTH).json()

    assert answer["rejected_total"] == 300
    assert len(answer["rejected"]) == 100
    reasons = answer["reasons"]
    assert len(reasons) <= 101
    assert sum(r["count"] for r in reasons) == 300
    assert reasons[-1]["reason"] == "(other reasons)"


def test_a_record_with_thousands_of_errors_is_answered_in_bounded_bytes(
    client: TestClient,
) -> None:
    junk = {f"field-{i}-" + "x" * 500: i for i in range(2000)}

    answer = client.post("/v1/telemetry", json=[junk] * 3, headers=AUTH)

    assert answer.status_code == 200
    assert len(answer.content) <= 64 * 1024, len(answer.content)
    errors = answer.json()["rejected"][0]["errors"]
    assert len(errors) <= 21
    assert all(len(path) <= 200 and len(message) <= 200 for path, message in errors)


def test_the_quarantine_budget_stops_writing_but_keeps_counting(paths: Paths) -> None:
    budget = 20_000
    broken = [record_dict(f"job-{i}", H0, sdk="braket") for i in range(100)]  # ~50 KB
    with collector(paths, quarantine_bytes_per_hour=budget) as client:
        first = client.post("/v1/telemetry", json=broken, headers=AUTH).json()
        written = quarantine_bytes(paths)
        second = client.post("/v1/telemetry", json=broken[:10], headers=AUTH).json()

    assert first["rejected_total"] == 100
    assert 0 < first["not_quarantined"] < 100
    assert 0 < written <= budget
    assert len(quarantined(paths)) == 100 - first["not_quarantined"]
    # Spent: the next request's rejections are answered and counted, not written.
    assert (second["rejected_total"], second["not_quarantined"]) == (10, 10)
    assert second["rejected"][0]["errors"][0][0] == "sdk"
    assert quarantine_bytes(paths) == written


def test_the_quarantine_budget_is_shared_by_collectors_on_one_spool(paths: Paths) -> None:
    broken = [record_dict(f"job-{i}", H0, sdk="braket") for i in range(100)]
    with (
        collector(paths, quarantine_bytes_per_hour=20_000) as one,
        collector(paths, quarantine_bytes_per_hour=20_000) as two,
    ):
        assert one.post("/v1/telemetry", json=broken, headers=AUTH).json()["not_quarantined"]
        assert two.post("/v1/telemetry", json=broken, headers=AUTH).json()["not_quarantined"] == 100


def test_a_tenant_past_its_rejection_budget_waits_for_the_next_minute(paths: Paths) -> None:
    # Junk costs the slow path's CPU within every byte cap: the budget bounds it per minute.
    junk = [record_dict(f"job-{i}", H0, sdk="braket") for i in range(30)]
    if time.time() % 60 > 50:  # all three requests in one budget minute
        time.sleep(61 - time.time() % 60)
    with (
        collector(paths, rejections_per_minute=50) as one,
        collector(paths, rejections_per_minute=50) as two,  # another worker, one budget
    ):
        first = one.post("/v1/telemetry", json=junk, headers=AUTH)
        crossing = two.post("/v1/telemetry", json=junk, headers=AUTH)
        refused = one.post("/v1/telemetry", json=[record_dict("ok", H0)], headers=AUTH)

    assert first.json()["rejected_total"] == 30
    assert crossing.json()["rejected_total"] == 30  # answered in full as it crosses
    assert refused.status_code == 429
    assert "rejected records this minute" in refused.json()["detail"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60


@pytest.mark.parametrize("ndjson", [False, True])
def test_too_many_records_are_refused_before_any_is_validated(paths: Paths, ndjson: bool) -> None:
    with collector(paths, max_records=1000) as client:
        for count, status in ((1000, 200), (1001, 413)):
            if ndjson:
                answer = client.post("/v1/telemetry", content=b"{}\n" * count, headers=NDJSON)
            else:
                answer = client.post("/v1/telemetry", json=[{}] * count, headers=AUTH)
            assert answer.status_code == status, answer.text
        assert "1000 records" in answer.json()["detail"]
    assert quarantine_bytes(paths) > 0  # the first request's, none from the refused one
    assert len(quarantined(paths)) <= 1000


def test_the_default_record_cap_refuses_a_body_of_empty_objects(
    client: TestClient, paths: Paths
) -> None:
    answer = client.post("/v1/telemetry", content=EMPTY_OBJECTS, headers=NDJSON)

    assert answer.status_code == 413
    assert "100000 records" in answer.json()["detail"]
    assert quarantine_bytes(paths) == 0


# -- defect 4: an integer too long for Python costs only its own record ---------------------

HUGE = "9" * 5000


def _huge_lines() -> list[bytes]:
    ok = json.dumps(record_dict("ok-1", H0))
    deep = json.dumps(record_dict("bad-depth", H0, depth=1)).replace(
        '"depth": 1', f'"depth": {HUGE}'
    )
    shots = json.dumps(record_dict("bad-shots", H0)).replace('"shots": 1024', f'"shots": -{HUGE}')
    return [
        ok.encode(),
        deep.encode(),
        HUGE.encode(),
        shots.encode(),
        ok.replace("ok-1", "ok-2").encode(),
    ]


def _check_huge_answer(answer: Any) -> None:
    assert answer.status_code == 200, answer.text
    assert PYTHON_HINT not in answer.text
    body = answer.json()
    assert body["accepted"] == 2
    errors = {r["index"]: r["errors"] for r in body["rejected"]}
    assert sorted(errors) == [1, 2, 3]
    assert errors[1] == [["depth", f"exceeds the largest storable integer {INT64_MAX}"]]
    assert (
        errors[2][0][0] == "<record>" and "expected a JSON object, got integer" in errors[2][0][1]
    )
    assert errors[3][0][0] == "shots" and errors[3][0][1].startswith("must be >= 0")


def test_a_huge_integer_in_an_array_rejects_its_element_alone(
    client: TestClient, paths: Paths
) -> None:
    body = b"[" + b",".join(_huge_lines()) + b"]"

    _check_huge_answer(client.post("/v1/telemetry", content=body, headers=AUTH))
    assert all(PYTHON_HINT not in q["reason"] for q in quarantined(paths))


def test_a_huge_integer_in_ndjson_rejects_its_line_with_the_contracts_words(
    client: TestClient, paths: Paths
) -> None:
    body = b"\n".join(_huge_lines())

    _check_huge_answer(client.post("/v1/telemetry", content=body, headers=NDJSON))
    assert all(PYTHON_HINT not in q["reason"] for q in quarantined(paths))

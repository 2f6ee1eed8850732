"""The collector: every hostile request gets its own clear answer, valid records are kept once."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from support.collector_server import CollectorServer, free_port
from support.records import record_dict

from qabuse_dagster.ingest.collector import TOKENS_ENV, create_app, parse_tokens
from qabuse_dagster.ingest.partitions import compact_hour, landing_hours, read_raw
from qabuse_dagster.ingest.spool import compact, connect, spool_path
from qabuse_dagster.settings import Paths
from qabuse_dagster.telemetry.http_sink import HttpSink

H0 = datetime(2026, 3, 2, 13, 0, tzinfo=UTC)
TOKEN = "s3cret-token-of-ci"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NDJSON = {**AUTH, "Content-Type": "application/x-ndjson"}
#: The rest of an answer that rejected nothing.
NONE_REJECTED = {
    "rejected_total": 0,
    "rejections_truncated": False,
    "reasons": [],
    "not_quarantined": 0,
}


def recs(n: int, prefix: str = "job", status: str = "submitted") -> list[dict[str, Any]]:
    return [record_dict(f"{prefix}-{i}", H0 + timedelta(seconds=i), status) for i in range(n)]


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path / "home")


@pytest.fixture
def client(paths: Paths) -> Iterator[TestClient]:
    app = create_app(paths, {TOKEN: "ci"}, max_body_bytes=64 * 1024, rate_per_s=1000, burst=1000)
    with TestClient(app) as test_client:
        yield test_client


def stored_ids(paths: Paths) -> list[tuple[str, str]]:
    conn = connect(spool_path(paths))
    try:
        return sorted(conn.execute("SELECT job_id, status FROM identities").fetchall())
    finally:
        conn.close()


def quarantined(paths: Paths) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted(paths.quarantine.glob("*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
    ]


def compact_to_raw(paths: Paths) -> list[tuple[str, str]]:
    compact(paths)
    for hour in landing_hours(paths.landing):
        compact_hour(hour, paths.landing, paths.raw_telemetry)
    raw = read_raw(paths.raw_telemetry)
    return sorted(zip(raw["job_id"].to_pylist(), raw["status"].to_pylist(), strict=True))


# -- fast cases (in-process) ----------------------------------------------------------------


def test_json_array_is_accepted_and_stored(client: TestClient, paths: Paths) -> None:
    answer = client.post("/v1/telemetry", json=recs(5), headers=AUTH)
    assert answer.status_code == 200
    assert answer.json() == {"accepted": 5, "duplicates": 0, "rejected": [], **NONE_REJECTED}
    assert stored_ids(paths) == sorted((f"job-{i}", "submitted") for i in range(5))


def test_ndjson_is_accepted(client: TestClient) -> None:
    body = "\n".join(json.dumps(r) for r in recs(3)) + "\n\n"
    answer = client.post("/v1/telemetry", content=body, headers=NDJSON)
    assert answer.json() == {"accepted": 3, "duplicates": 0, "rejected": [], **NONE_REJECTED}


def test_duplicates_within_and_across_requests(client: TestClient, paths: Paths) -> None:
    batch = recs(3) + recs(2)  # job-0, job-1 twice
    assert client.post("/v1/telemetry", json=batch, headers=AUTH).json()["duplicates"] == 2
    again = client.post("/v1/telemetry", json=recs(4), headers=AUTH).json()
    assert again == {"accepted": 1, "duplicates": 3, "rejected": [], **NONE_REJECTED}
    # Another status of the same job is another event, not a duplicate.
    other = client.post("/v1/telemetry", json=recs(1, status="queued"), headers=AUTH).json()
    assert other["accepted"] == 1
    assert len(stored_ids(paths)) == 5


def test_flood_of_duplicates(client: TestClient, paths: Paths) -> None:
    one = recs(1)[0]
    answer = client.post("/v1/telemetry", json=[one] * 100, headers=AUTH).json()
    assert answer == {"accepted": 1, "duplicates": 99, "rejected": [], **NONE_REJECTED}
    for _ in range(5):
        assert (
            client.post("/v1/telemetry", json=[one] * 100, headers=AUTH).json()["duplicates"] == 100
        )
    assert len(stored_ids(paths)) == 1


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}],
)
def test_bad_token_is_401(client: TestClient, paths: Paths, headers: dict[str, str]) -> None:
    answer = client.post("/v1/telemetry", json=recs(1), headers=headers)
    assert answer.status_code == 401
    assert "token" in answer.json()["detail"]
    assert not spool_path(paths).exists() or stored_ids(paths) == []


def test_too_large_body_is_413(client: TestClient, paths: Paths) -> None:
    big = recs(400)  # about 150 KB, over the 64 KiB limit
    answer = client.post("/v1/telemetry", json=big, headers=AUTH)
    assert answer.status_code == 413
    assert stored_ids(paths) == []


def test_too_large_chunked_body_is_413(client: TestClient) -> None:
    # No Content-Length: the cap applies while the body streams in.
    def chunks() -> Iterator[bytes]:
        yield b"["
        for _ in range(200):
            yield json.dumps(recs(1)[0]).encode() + b","
        yield b"{}]"

    answer = client.post("/v1/telemetry", content=chunks(), headers=AUTH)
    assert answer.status_code == 413


def test_rate_limit_is_429_with_retry_after(paths: Paths) -> None:
    app = create_app(paths, {TOKEN: "ci", "other": "b"}, rate_per_s=0.5, burst=2)
    with TestClient(app) as client:
        codes = [client.post("/v1/telemetry", json=[], headers=AUTH).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        limited = client.post("/v1/telemetry", json=[], headers=AUTH)
        assert limited.status_code == 429
        assert int(limited.headers["Retry-After"]) >= 1
        # The bucket is per token.
        other = {"Authorization": "Bearer other"}
        assert client.post("/v1/telemetry", json=[], headers=other).status_code == 200


def test_rate_limit_is_shared_by_collectors_on_one_spool(paths: Paths) -> None:
    # Two apps stand for two worker processes: one bucket per token between them.
    first = create_app(paths, {TOKEN: "ci"}, rate_per_s=0.01, burst=3)
    second = create_app(paths, {TOKEN: "ci"}, rate_per_s=0.01, burst=3)
    with TestClient(first) as one, TestClient(second) as two:
        codes = [
            client.post("/v1/telemetry", json=[], headers=AUTH).status_code
            for client in (one, two, one, two, one)
        ]
    assert codes == [200, 200, 200, 429, 429]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'[{"schema_version": 1, "job_id": ', "not JSON"),
        (b"[1, 2,]", "line 1 column 7"),
        (b"", "not JSON"),
        (b'{"job_id": "x"}', "must be a JSON array"),
        (b'"\xff\xfe"', "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_unreadable_body_is_400(
    client: TestClient, body: bytes, fragment: str, paths: Paths
) -> None:
    big_client_app = create_app(paths, {TOKEN: "ci"}, rate_per_s=1000, burst=1000)
    with TestClient(big_client_app) as big:
        answer = big.post("/v1/telemetry", content=body, headers=AUTH)
        assert answer.status_code == 400, answer.text
        assert fragment in answer.json()["detail"]
        assert big.get("/healthz").json()["status"] == "ok"


def test_hostile_records_are_rejected_one_by_one(client: TestClient, paths: Paths) -> None:
    missing = record_dict("bad-missing", H0)
    del missing["backend"]
    batch: list[Any] = [
        record_dict("ok-1", H0),
        record_dict("bad-type", H0, shots="1024"),
        missing,
        record_dict("bad-extra", H0, circuit_source="OPENQASM 3;"),
        record_dict("bad-negative", H0, num_circuits=-1),
        record_dict("bad-absurd", H0, depth=2**70),
        record_dict("bad-bool", H0, num_qubits=True),
        record_dict("bad-year", H0, timestamp="10000-01-01T00:00:00Z"),
        # Valid under the contract, but before the partitions or past the clock's skew.
        record_dict("far-past", H0, timestamp="1000-01-01T00:00:00Z"),
        record_dict("far-future", H0, timestamp="9999-12-31T23:59:59.999999Z"),
        [record_dict("bad-nested", H0)],
        "a string",
        None,
        record_dict("ok-2", H0, status="completed", runtime_s=1e300),
    ]
    answer = client.post("/v1/telemetry", json=batch, headers=AUTH)
    assert answer.status_code == 200
    body = answer.json()
    assert body["accepted"] == 2
    errors = {r["index"]: r["errors"] for r in body["rejected"]}
    assert sorted(errors) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert errors[1][0][0] == "shots" and "integer" in errors[1][0][1]
    assert errors[2] == [["backend", "missing required field"]]
    assert errors[3][0][0] == "circuit_source"
    assert errors[4][0][0] == "num_circuits" and ">= 0" in errors[4][0][1]
    assert errors[5][0][0] == "depth" and "largest storable" in errors[5][0][1]
    assert errors[6][0][0] == "num_qubits"
    assert errors[7][0][0] == "timestamp"
    assert errors[8][0][0] == "timestamp" and "before 2026-01-01" in errors[8][0][1]
    assert errors[9][0][0] == "timestamp" and "ahead of the receiver's clock" in errors[9][0][1]
    assert errors[10][0] == ["<record>", "expected a JSON object, got array"]
    assert {job for job, _ in stored_ids(paths)} == {"ok-1", "ok-2"}
    kept = quarantined(paths)
    assert [q["line"] for q in kept] == [i + 1 for i in sorted(errors)]
    assert set(kept[0]) == {"source", "line", "reason", "raw"}
    assert kept[0]["source"] == "collector:ci"
    assert kept[0]["reason"].startswith("shots: expected an integer")
    assert "bad-type" in kept[0]["raw"]
    far = {json.loads(q["raw"])["job_id"]: q["reason"] for q in kept[7:9]}
    assert set(far) == {"far-past", "far-future"}  # retrievable, with the reason
    assert all(reason.startswith("timestamp: ") for reason in far.values())
    assert compact_to_raw(paths) == [("ok-1", "submitted"), ("ok-2", "completed")]


@pytest.mark.parametrize(
    "stamp",
    ["0001-01-01T00:00:00Z", "2025-12-31T23:59:59.999999Z", "2099-01-01T00:00:00Z"],
)
def test_a_far_dated_record_is_quarantined_beside_valid_ones_that_land(
    client: TestClient, paths: Paths, stamp: str
) -> None:
    # One such record once made `qabuse materialize` plan thousands of hours.
    batch = [record_dict("ok-1", H0), record_dict("far", H0, timestamp=stamp)]
    answer = client.post("/v1/telemetry", json=batch, headers=AUTH).json()
    assert (answer["accepted"], answer["rejected_total"]) == (1, 1)
    assert answer["rejected"][0]["errors"][0][0] == "timestamp"
    assert [json.loads(q["raw"])["job_id"] for q in quarantined(paths)] == ["far"]
    assert compact_to_raw(paths) == [("ok-1", "submitted")]


def test_ndjson_bad_lines_are_rejected_others_kept(client: TestClient, paths: Paths) -> None:
    lines = [
        json.dumps(record_dict("ok-1", H0)).encode(),
        b'{"broken": ',
        b"\xff\xfe not utf-8",
        b"[" * 30_000 + b"]" * 30_000,  # under the 64 KiB line limit: parsed, too deep
        b"",
        json.dumps(record_dict("bad", H0, sdk="braket")).encode(),
        json.dumps(record_dict("ok-2", H0)).encode(),
        json.dumps(record_dict("utf-16", H0)).encode("utf-16"),
    ]
    answer = client.post("/v1/telemetry", content=b"\n".join(lines), headers=NDJSON)
    body = answer.json()
    assert body["accepted"] == 2
    errors = {r["index"]: r["errors"] for r in body["rejected"]}
    assert sorted(errors) == [1, 2, 3, 5, 7]
    assert "not JSON" in errors[1][0][1]
    assert "not UTF-8" in errors[2][0][1]
    assert errors[3] == [["<line>", "JSON nested too deeply"]]
    assert errors[5][0][0] == "sdk"
    assert "not UTF-8" in errors[7][0][1]  # json.loads alone would take UTF-16
    assert [q["line"] for q in quarantined(paths)] == [2, 3, 4, 6, 8]
    assert client.get("/healthz").status_code == 200


def test_other_content_type_is_415(client: TestClient) -> None:
    headers = {**AUTH, "Content-Type": "text/plain"}
    assert client.post("/v1/telemetry", content=b"[]", headers=headers).status_code == 415


def test_compaction_lands_each_record_once(client: TestClient, paths: Paths) -> None:
    client.post("/v1/telemetry", json=recs(10), headers=AUTH)
    first = compact(paths)
    assert first.records == 10
    assert compact(paths).records == 0  # nothing is staged twice
    client.post("/v1/telemetry", json=recs(15), headers=AUTH)  # 10 duplicates, 5 new
    assert compact(paths).records == 5
    assert compact_to_raw(paths) == sorted((f"job-{i}", "submitted") for i in range(15))


def test_restage_after_a_crash_is_deduplicated_by_raw_compaction(
    client: TestClient, paths: Paths
) -> None:
    client.post("/v1/telemetry", json=recs(6), headers=AUTH)
    conn = connect(spool_path(paths))
    batches = conn.execute("SELECT records, tenant FROM batches").fetchall()
    compact(paths)
    # A crash between staging and deleting: the batches are still there.
    conn.executemany("INSERT INTO batches (records, tenant) VALUES (?, ?)", batches)
    conn.close()
    assert compact(paths).records == 6
    assert compact_to_raw(paths) == sorted((f"job-{i}", "submitted") for i in range(6))


def test_identities_expire_after_the_retention(client: TestClient, paths: Paths) -> None:
    client.post("/v1/telemetry", json=recs(4), headers=AUTH)
    kept = compact(paths, retention=timedelta(days=1))
    assert (kept.records, kept.expired) == (4, 0)
    answer = client.post("/v1/telemetry", json=recs(4), headers=AUTH).json()
    assert answer["duplicates"] == 4  # remembered within the retention
    conn = connect(spool_path(paths))
    conn.execute(
        "UPDATE identities SET accepted_at = accepted_at - 2 * 86400 WHERE job_id < 'job-2'"
    )
    conn.close()
    client.post("/v1/telemetry", json=recs(6, prefix="new"), headers=AUTH)
    report = compact(paths, retention=timedelta(days=1))
    assert (report.records, report.expired) == (6, 2)
    assert len(stored_ids(paths)) == 8  # 4 + 6 - 2
    # A late copy of a forgotten record is accepted again, and still lands once.
    assert client.post("/v1/telemetry", json=recs(4), headers=AUTH).json()["accepted"] == 2
    landed = compact_to_raw(paths)
    assert sorted(set(landed)) == landed and len(landed) == 10


def test_duplicates_within_and_across_batches_are_found_one_by_one(
    client: TestClient, paths: Paths
) -> None:
    first = client.post("/v1/telemetry", json=recs(3), headers=AUTH).json()
    assert (first["accepted"], first["duplicates"]) == (3, 0)
    mixed = recs(5) + recs(2, prefix="again") + recs(2, prefix="again")
    answer = client.post("/v1/telemetry", json=mixed, headers=AUTH).json()
    assert (answer["accepted"], answer["duplicates"]) == (4, 5)  # job-3/4, again-0/1
    assert compact(paths).records == 7
    assert len(compact_to_raw(paths)) == 7


def test_a_first_layout_spool_is_migrated(paths: Paths) -> None:
    database = spool_path(paths)
    database.parent.mkdir(parents=True)
    old = sqlite3.connect(database)
    old.executescript(
        "CREATE TABLE records (job_id TEXT NOT NULL, status TEXT NOT NULL, record TEXT NOT NULL,"
        " compacted INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (job_id, status));"
    )
    texts = [json.dumps(r) for r in recs(3)]
    old.executemany(
        "INSERT INTO records (job_id, status, record, compacted) VALUES (?, 'submitted', ?, ?)",
        [(f"job-{i}", text, i % 2) for i, text in enumerate(texts)],
    )
    old.commit()
    old.close()
    assert compact(paths).records == 3  # every row again: raw compaction drops repeats
    assert compact_to_raw(paths) == sorted((f"job-{i}", "submitted") for i in range(3))
    conn = connect(spool_path(paths))
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert "records" not in tables
    assert stored_ids(paths) == sorted((f"job-{i}", "submitted") for i in range(3))


def test_openapi_documents_the_request_body(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/telemetry"]["post"]
    content = operation["requestBody"]["content"]
    assert "job_id" in content["application/json"]["schema"]["items"]["properties"]
    assert "application/x-ndjson" in content
    assert {"200", "400", "401", "413", "429"} <= set(operation["responses"])


def test_parse_tokens() -> None:
    assert parse_tokens(" ci:abc , lab:def ,") == {"abc": "ci", "def": "lab"}
    assert parse_tokens("lab:a1,lab:a2") == {"a1": "lab", "a2": "lab"}  # two tokens, one tenant
    assert parse_tokens("") == {}
    with pytest.raises(ValueError, match="tenant:token"):
        parse_tokens("justatoken")
    with pytest.raises(ValueError, match="twice"):
        parse_tokens("a:x,b:x")


# -- the real server ------------------------------------------------------------------------


class Server(CollectorServer):
    """``qabuse collector`` as a subprocess, with this module's token."""

    def __init__(self, home: Path, port: int | None = None, *extra: str) -> None:
        super().__init__(home, TOKEN, *extra, port=port)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = Server(tmp_path / "home")
    yield running
    running.stop()


def test_cli_refuses_to_start_without_tokens(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != TOKENS_ENV}
    env["QABUSE_HOME"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "qabuse_dagster.cli", "collector", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert TOKENS_ENV in done.stderr


@pytest.mark.integration
def test_real_server_dedups_across_a_restart_and_survives_hostile_input(tmp_path: Path) -> None:
    home = tmp_path / "home"
    server = Server(home)
    try:
        url = server.url + "/v1/telemetry"
        assert httpx.post(url, json=recs(20), headers=AUTH).json()["accepted"] == 20
        hostile = b"[" * 200_000 + b"]" * 200_000
        assert httpx.post(url, content=hostile, headers=AUTH).status_code == 400
        assert httpx.post(url, content=b"\xc3\x28", headers=AUTH).status_code == 400
        assert httpx.get(server.url + "/healthz").status_code == 200
    finally:
        server.stop()
    server = Server(home, server.port)
    try:
        answer = httpx.post(server.url + "/v1/telemetry", json=recs(25), headers=AUTH).json()
        assert answer == {"accepted": 5, "duplicates": 20, "rejected": [], **NONE_REJECTED}
    finally:
        server.stop()  # a clean stop compacts once more
    paths = Paths(home)
    assert compact(paths).records == 0
    assert compact_to_raw(paths) == sorted((f"job-{i}", "submitted") for i in range(25))


@pytest.mark.integration
def test_worker_processes_share_one_spool(tmp_path: Path) -> None:
    home = tmp_path / "home"
    server = Server(home, None, "--workers", "2", "--rate", "10000", "--burst", "10000")
    url = server.url + "/v1/telemetry"
    answers: list[dict[str, Any]] = []
    pids: set[int] = set()

    def send(part: int) -> None:
        # New connections each time, so the kernel spreads them over both workers.
        for batch in range(10):
            body = recs(50, prefix=f"p{part}-b{batch}") + recs(10, prefix="shared")
            answers.append(httpx.post(url, json=body, headers=AUTH).json())

    try:
        threads = [threading.Thread(target=send, args=(part,)) for part in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for _ in range(50):
            pids.add(int(httpx.get(server.url + "/healthz").json()["pid"]))
    finally:
        server.stop()
    assert len(pids) == 2, "both workers should have served"
    assert sum(a["accepted"] for a in answers) == 4 * 10 * 50 + 10
    assert sum(a["duplicates"] for a in answers) == 4 * 10 * 10 - 10
    assert len(compact_to_raw(Paths(home))) == 4 * 10 * 50 + 10


@pytest.mark.integration
def test_http_sink_talks_to_the_real_server(server: Server, tmp_path: Path) -> None:
    sink = HttpSink(server.url, TOKEN, spool_dir=tmp_path / "sink", batch_size=100)
    records = [*recs(250), record_dict("bad", H0, shots=-5)]
    sink.write(records)
    sink.write(recs(10))  # all duplicates
    sink.close()
    assert sink.stats["sent"] == 260  # duplicates count as delivered
    assert sink.stats["rejected"] == 1
    assert sink.stats["duplicates"] == 10
    assert sink.stats["spooled"] == 0


@pytest.mark.integration
def test_http_sink_halves_batches_on_413(tmp_path: Path) -> None:
    server = Server(tmp_path / "home", None, "--max-body-mb", "0.05")
    try:
        sink = HttpSink(server.url, TOKEN, spool_dir=tmp_path / "sink", batch_size=1000)
        sink.write(recs(600))  # about 220 KB a batch: split down to fit 50 KiB
        sink.close()
        assert sink.stats["sent"] == 600
        assert sink.stats["spooled"] == 0
    finally:
        server.stop()

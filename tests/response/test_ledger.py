"""The decision ledger on both backends: the chain, concurrent appends, and tampering found.

Every tampering test goes around the ledger, through a raw connection (``sqlite3`` or
``psycopg``), the way someone with database access but not the signing key would.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qabuse_dagster.response.ledger import (
    GENESIS_HASH,
    MAX_ENTRY_BYTES,
    Ledger,
    LedgerError,
    VerifyReport,
    open_ledger,
    verify_ledger,
)
from qabuse_dagster.response.records import LedgerEntry

KEY = b"ledger-test-signing-key-of-32-bytes!"
ACTIONS = ("throttle", "cap", "challenge", "review", "release", "label")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty ledger's URL: a SQLite file, or a fresh database on the session's server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger' / 'decisions.db'}"
    url: str = request.getfixturevalue("postgres_database")
    return url


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    with open_ledger(ledger_url, key=KEY) as opened:
        yield opened


def entry(i: int, actor: str = "system") -> LedgerEntry:
    """A distinct entry per ``i``, using most fields."""
    return LedgerEntry(
        at_ms=60_000 * (i + 1),
        api_key_id=f"{i:016x}",
        action=ACTIONS[i % len(ACTIONS)],
        actor=actor,
        reason=f"score {0.5 + i / 1000:.3f} over 0.72",
        params={"jobs_per_minute": i % 7 + 1, "note": f"n{i}"},
        expires_at_ms=60_000 * (i + 1) + 3_600_000,
        score=0.5 + i / 1000,
        model_name="qabuse-api-key-detector",
        model_version=str(i % 3 + 1),
        feature_service="api_key_detector_v1",
        features={"jobs_1h": float(i), "shots_1h": i * 1024.0},
    )


def fill(ledger: Ledger, n: int) -> None:
    ledger.append_many(entry(i) for i in range(n))


def raw(url: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one statement around the ledger, through a raw connection, and commit it."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            with conn:
                return conn.execute(statement, params).fetchall()
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(url, autocommit=True) as pg:
        cursor = pg.execute(statement.replace("?", "%s"), params)
        return cursor.fetchall() if cursor.description else []


def problems(report: VerifyReport) -> list[tuple[str, int]]:
    return [(p.kind, p.seq) for p in report.problems]


def test_an_entry_reads_back_as_it_was_appended(ledger: Ledger) -> None:
    written = entry(1)
    record = ledger.append(written)
    assert (record.seq, record.prev_hash) == (1, GENESIS_HASH)
    assert record.entry == written
    assert len(record.hash) == 64 and record.hash != GENESIS_HASH
    assert record.recorded_at_ms > 1_700_000_000_000
    assert ledger.get(1) == record
    assert ledger.get(2) is None
    assert list(ledger.records()) == [record]
    assert ledger.head() == (1, record.hash)


def test_seqs_rise_from_one_without_gaps_and_chain(ledger: Ledger) -> None:
    singles = [ledger.append(entry(i)) for i in range(4)]
    batch = ledger.append_many([entry(i) for i in range(4, 9)])
    assert ledger.append_many([]) == []
    records = list(ledger.records())
    assert records == singles + batch
    assert [r.seq for r in records] == list(range(1, 10))
    assert [r.prev_hash for r in records] == [GENESIS_HASH] + [r.hash for r in records[:-1]]
    assert all(a.recorded_at_ms <= b.recorded_at_ms for a, b in itertools.pairwise(records))
    assert [r.seq for r in ledger.records(since_seq=6)] == [7, 8, 9]
    assert ledger.head() == (9, records[-1].hash)


def test_records_survive_close_and_reopen(ledger_url: str) -> None:
    with open_ledger(ledger_url, key=KEY) as first:
        fill(first, 3)
        written = list(first.records())
    with open_ledger(ledger_url, key=KEY) as again:
        assert list(again.records()) == written
        assert again.append(entry(3)).seq == 4
        fourth = again.get(4)
        assert fourth is not None and again.append(entry(4)).prev_hash == fourth.hash
        report = again.verify()
    assert report.ok and report.count == 5


def _append_from_process(url: str, actor: str, n: int) -> None:
    with open_ledger(url, key=KEY) as ledger:
        for i in range(n):
            ledger.append(entry(i, actor=actor))


def test_two_processes_appending_at_once_make_one_valid_chain(ledger_url: str) -> None:
    open_ledger(ledger_url, key=KEY).close()  # the tables, before any process forks
    # fork: the workers are this module's functions, which spawn could not import by name.
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_append_from_process, args=(ledger_url, actor, 50))
        for actor in ("alice", "bob")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    with open_ledger(ledger_url, key=KEY) as ledger:
        report = ledger.verify()
        records = list(ledger.records())
    assert report.ok, report.problems
    assert report.count == 100
    assert [r.seq for r in records] == list(range(1, 101))
    for actor in ("alice", "bob"):
        mine = [r.entry for r in records if r.entry.actor == actor]
        assert mine == [entry(i, actor=actor) for i in range(50)]  # each in its own order


def test_threads_share_one_ledger(ledger: Ledger) -> None:
    # A gateway appends from request threads while its follower reads on another.
    seen: list[int] = []
    done = threading.Event()

    def follow() -> None:
        while not done.is_set():
            seen.extend(r.seq for r in ledger.records(since_seq=seen[-1] if seen else 0))

    def append(actor: str) -> None:
        for i in range(25):
            ledger.append(entry(i, actor=actor))

    follower = threading.Thread(target=follow)
    follower.start()
    writers = [threading.Thread(target=append, args=(actor,)) for actor in ("alice", "bob")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(30)
    done.set()
    follower.join(30)
    seen.extend(r.seq for r in ledger.records(since_seq=seen[-1] if seen else 0))
    assert seen == list(range(1, 51))
    assert ledger.verify().ok


def test_an_untouched_ledger_verifies(ledger: Ledger) -> None:
    empty = ledger.verify()
    assert (empty.ok, empty.count, empty.head_hash, empty.problems) == (
        True,
        0,
        GENESIS_HASH,
        [],
    )
    fill(ledger, 12)
    report = ledger.verify()
    assert report.ok and report.problems == []
    assert (report.count, report.head_hash) == ledger.head()


@pytest.mark.parametrize("change", ["reason", "params", "recorded_at_ms", "prev_hash"])
def test_an_edited_record_is_found_at_its_seq(ledger: Ledger, ledger_url: str, change: str) -> None:
    fill(ledger, 6)
    if change == "recorded_at_ms":
        raw(
            ledger_url,
            "UPDATE ledger_records SET recorded_at_ms = recorded_at_ms + 1 WHERE seq = 3",
        )
    elif change == "prev_hash":
        raw(ledger_url, "UPDATE ledger_records SET prev_hash = ? WHERE seq = 3", "f" * 64)
    else:
        [(text,)] = raw(ledger_url, "SELECT entry FROM ledger_records WHERE seq = 3")
        data = json.loads(text)
        if change == "reason":
            data["reason"] = "looked fine to me"
        else:
            data["params"]["jobs_per_minute"] = 1000
        raw(ledger_url, "UPDATE ledger_records SET entry = ? WHERE seq = 3", json.dumps(data))
    report = ledger.verify()
    assert not report.ok
    assert problems(report) == [("edited", 3)]
    assert "record 3" in report.problems[0].message


def test_a_deleted_middle_record_is_missing(ledger: Ledger, ledger_url: str) -> None:
    fill(ledger, 10)
    raw(ledger_url, "DELETE FROM ledger_records WHERE seq = 5")
    report = ledger.verify()
    assert problems(report) == [("missing", 5)]
    assert "record 5 is missing" in report.problems[0].message
    assert report.count == 9


@pytest.mark.parametrize("columns", ["entry", "whole row"])
def test_swapped_records_are_reordered_at_both_seqs(
    ledger: Ledger, ledger_url: str, columns: str
) -> None:
    fill(ledger, 8)
    names = ["entry"] if columns == "entry" else ["entry", "prev_hash", "hash", "recorded_at_ms"]
    select = f"SELECT {', '.join(names)} FROM ledger_records WHERE seq = ?"
    update = f"UPDATE ledger_records SET {', '.join(f'{n} = ?' for n in names)} WHERE seq = ?"
    [third], [seventh] = raw(ledger_url, select, 3), raw(ledger_url, select, 7)
    raw(ledger_url, update, *seventh, 3)
    raw(ledger_url, update, *third, 7)
    report = ledger.verify()
    assert problems(report) == [("reordered", 3), ("reordered", 7)]
    assert "written as seq 7" in report.problems[0].message
    assert "written as seq 3" in report.problems[1].message


def test_deleting_the_newest_records_is_truncation(ledger: Ledger, ledger_url: str) -> None:
    fill(ledger, 10)
    raw(ledger_url, "DELETE FROM ledger_records WHERE seq > 7")
    report = ledger.verify()
    assert problems(report) == [("truncated", 8)]
    assert "10 records" in report.problems[0].message
    assert "8 to 10" in report.problems[0].message


def test_a_head_rewritten_to_hide_truncation_fails_its_mac(ledger: Ledger, ledger_url: str) -> None:
    fill(ledger, 10)
    [(seventh_hash,)] = raw(ledger_url, "SELECT hash FROM ledger_records WHERE seq = 7")
    raw(ledger_url, "DELETE FROM ledger_records WHERE seq > 7")
    raw(ledger_url, "UPDATE ledger_head SET n_records = 7, last_hash = ?", seventh_hash)
    report = ledger.verify()
    assert problems(report) == [("truncated", 0)]
    assert "fails its MAC" in report.problems[0].message
    # Nothing is chained onto a head that is not trusted.
    with pytest.raises(LedgerError, match="head fails its MAC"):
        ledger.append(entry(99))
    assert raw(ledger_url, "SELECT count(*) FROM ledger_records") == [(7,)]


def test_an_unparseable_row_is_unreadable(ledger: Ledger, ledger_url: str) -> None:
    fill(ledger, 4)
    raw(ledger_url, "UPDATE ledger_records SET entry = ? WHERE seq = 2", "{not json")
    report = ledger.verify()
    assert problems(report) == [("unreadable", 2)]
    with pytest.raises(LedgerError, match="record 2 does not parse"):
        list(ledger.records())


def test_an_intact_record_spliced_from_another_ledger_breaks_the_link(
    ledger: Ledger, ledger_url: str, tmp_path: Path
) -> None:
    fill(ledger, 5)
    # Another ledger with the same key: its record 3 verifies as a seq 3, but follows
    # a different record 2.
    other_url = f"sqlite:///{tmp_path / 'other.db'}"
    with open_ledger(other_url, key=KEY) as other:
        fill(other, 2)
        other.append(entry(40))
    columns = "entry, prev_hash, hash, recorded_at_ms"
    [row] = raw(other_url, f"SELECT {columns} FROM ledger_records WHERE seq = 3")
    raw(
        ledger_url,
        "UPDATE ledger_records SET entry = ?, prev_hash = ?, hash = ?, recorded_at_ms = ? "
        "WHERE seq = 3",
        *row,
    )
    assert problems(ledger.verify()) == [("broken_link", 3), ("broken_link", 4)]


def test_another_signing_key_verifies_nothing(ledger: Ledger, ledger_url: str) -> None:
    fill(ledger, 3)
    with open_ledger(ledger_url, key=b"another-key" * 4) as wrong:
        report = wrong.verify()
    assert problems(report) == [("truncated", 0), ("edited", 1), ("edited", 2), ("edited", 3)]
    assert "another signing key" in report.problems[0].message


@pytest.mark.parametrize(
    ("params", "features", "match"),
    [
        ({"rate": float("nan")}, {}, "finite"),
        ({}, {"jobs_1h": float("inf")}, "finite"),
        ({"backends": {"ibm_kyiv"}}, {}, "not plain, finite JSON"),
        ({"blob": "x" * MAX_ENTRY_BYTES}, {}, f"over the {MAX_ENTRY_BYTES}-byte limit"),
    ],
    ids=["nan-param", "inf-feature", "set-param", "huge-params"],
)
def test_a_bad_entry_is_refused_and_nothing_is_written(
    ledger: Ledger, ledger_url: str, params: dict[str, Any], features: dict[str, float], match: str
) -> None:
    fill(ledger, 3)
    before = (ledger.head(), list(ledger.records()))
    bad = LedgerEntry(60_000, "ab" * 8, "cap", "system", "bad", params=params, features=features)
    with pytest.raises(ValueError, match=match):
        ledger.append(bad)
    with pytest.raises(ValueError, match=match):
        ledger.append_many([entry(3), bad, entry(4)])  # all or none
    assert (ledger.head(), list(ledger.records())) == before
    assert raw(ledger_url, "SELECT count(*) FROM ledger_records") == [(3,)]
    assert ledger.verify().ok


def test_unknown_schemes_and_absent_ledgers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported ledger URL"):
        open_ledger("mysql://somewhere/ledger", key=KEY)
    absent = tmp_path / "nowhere" / "decisions.db"
    with pytest.raises(LedgerError, match="no ledger at"):
        verify_ledger(f"sqlite:///{absent}", key=KEY)
    assert not absent.parent.exists()  # verifying creates nothing


def test_the_sqlite_ledger_syncs_every_append_and_lets_readers_in(tmp_path: Path) -> None:
    path = tmp_path / "decisions.db"
    with open_ledger(f"sqlite:///{path}", key=KEY) as ledger:
        ledger.append(entry(0))
        # A per-connection setting: only the ledger's own connection can tell. 2 is FULL.
        assert ledger._conn.execute("PRAGMA synchronous").fetchone() == (2,)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()


def test_the_default_ledger_lives_under_qabuse_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QABUSE_HOME", str(tmp_path))
    monkeypatch.delenv("QABUSE_LEDGER_URL", raising=False)
    monkeypatch.setenv("QABUSE_SIGNING_KEY", "s" * 40)
    with open_ledger() as ledger:
        ledger.append(entry(0))
    assert (tmp_path / "ledger" / "decisions.db").exists()
    assert verify_ledger().ok


@pytest.mark.integration
def test_a_dropped_postgres_connection_is_made_again(postgres_database: str) -> None:
    import psycopg

    with open_ledger(postgres_database, key=KEY) as ledger:
        fill(ledger, 2)
        raw(
            postgres_database,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        with pytest.raises(psycopg.OperationalError):
            ledger.head()
        assert ledger.append(entry(2)).seq == 3
        assert ledger.verify().ok

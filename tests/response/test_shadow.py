"""The shadow-mode counterfactual: would-be actions per rung, and the legitimate keys hit."""

from __future__ import annotations

from qabuse_dagster.response.records import LedgerEntry, LedgerRecord
from qabuse_dagster.response.shadow import shadow_report

ABUSER, LEGIT, APPEALED = "a1" * 16, "b2" * 16, "c3" * 16


def _records(*entries: LedgerEntry) -> list[LedgerRecord]:
    return [LedgerRecord(i + 1, e, "0" * 64, f"{i:064x}", e.at_ms) for i, e in enumerate(entries)]


def _shadow(at: int, key: str, action: str) -> LedgerEntry:
    return LedgerEntry(at, key, action, "system", "alert", mode="shadow")


RECORDS = _records(
    _shadow(1_000, ABUSER, "throttle"),
    _shadow(2_000, LEGIT, "throttle"),
    _shadow(3_000, ABUSER, "challenge"),
    _shadow(4_000, ABUSER, "throttle"),
    LedgerEntry(5_000, APPEALED, "throttle", "system", "enforced, not shadow"),
    _shadow(6_000, APPEALED, "cap"),
)


def test_counts_keys_and_legitimate_keys_per_action() -> None:
    report = shadow_report(RECORDS, abusive_keys={ABUSER, APPEALED}, benign_keys={APPEALED})
    rows = {row.action: row for row in report.rows}
    assert [row.action for row in report.rows] == ["throttle", "challenge", "cap"]
    assert (rows["throttle"].decisions, rows["throttle"].keys) == (3, 2)
    assert rows["throttle"].legit_keys == 1  # LEGIT: named by no incident
    assert rows["challenge"].legit_keys == 0
    assert rows["cap"].legit_keys == 1  # APPEALED: its appeal was upheld
    assert (rows["throttle"].first_ms, rows["throttle"].last_ms) == (1_000, 4_000)
    assert report.legit_keys_touched == sorted([LEGIT, APPEALED])


def test_enforced_entries_are_not_counterfactual() -> None:
    report = shadow_report(RECORDS)
    assert sum(row.decisions for row in report.rows) == 5
    assert APPEALED not in report.keys_by_action["throttle"]


def test_without_labels_nobody_is_called_legitimate() -> None:
    report = shadow_report(RECORDS)
    assert all(row.legit_keys is None for row in report.rows)
    assert report.legit_keys_touched is None
    assert shadow_report([]).rows == []

"""The shadow-mode counterfactual: what enforcement would have done, to whom, at what cost.

In shadow mode (``QABUSE_ENFORCE=shadow``, or per rung) every would-be action is written
to the ledger with ``mode="shadow"`` and the gateway allows. Before switching a rung to
enforce, an operator reads this report: per action, how many would-be decisions, on how
many keys, and how many of those keys are legitimate as far as labels say (keys that no
incident names, and keys whose appeal was upheld).

Example:
    >>> from qabuse_dagster.response.records import LedgerEntry, LedgerRecord
    >>> entry = LedgerEntry(0, "ab" * 8, "throttle", "system", "alert", mode="shadow")
    >>> report = shadow_report([LedgerRecord(1, entry, "0" * 64, "f" * 64, 0)])
    >>> report.rows[0].action, report.rows[0].keys
    ('throttle', 1)
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from qabuse_dagster.response.records import LedgerRecord

__all__ = ["ShadowReport", "ShadowRow", "shadow_report"]


@dataclass(frozen=True)
class ShadowRow:
    """The would-be decisions of one action.

    Attributes:
        action: The rung shadow mode held back.
        decisions: Would-be decisions.
        keys: Distinct keys they would have touched.
        legit_keys: Of those, keys the labels call legitimate (None without labels).
        first_ms: The first one's instant.
        last_ms: The last one's.
    """

    action: str
    decisions: int
    keys: int
    legit_keys: int | None
    first_ms: int
    last_ms: int


@dataclass(frozen=True)
class ShadowReport:
    """Every action shadow mode held back, and the keys each would have touched."""

    rows: list[ShadowRow]
    keys_by_action: dict[str, list[str]] = field(repr=False)
    legit_keys_touched: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [asdict(row) for row in self.rows],
            "keys_by_action": self.keys_by_action,
            "legit_keys_touched": self.legit_keys_touched,
        }


def shadow_report(
    records: Iterable[LedgerRecord],
    *,
    abusive_keys: Collection[str] | None = None,
    benign_keys: Collection[str] = (),
) -> ShadowReport:
    """Fold the ledger's shadow entries into a counterfactual.

    Args:
        records: The ledger, in seq order.
        abusive_keys: Keys that incident labels name; with them, any other key is
            legitimate. None: no labels, so the legitimate counts are None.
        benign_keys: Keys confirmed legitimate (an upheld appeal), whatever else says.
    """
    keys: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    span: dict[str, tuple[int, int]] = {}
    for record in records:
        entry = record.entry
        if entry.mode != "shadow":
            continue
        action = entry.action
        keys.setdefault(action, set()).add(entry.api_key_id)
        counts[action] = counts.get(action, 0) + 1
        lo, hi = span.get(action, (entry.at_ms, entry.at_ms))
        span[action] = (min(lo, entry.at_ms), max(hi, entry.at_ms))
    benign = set(benign_keys)

    def legit(touched: set[str]) -> set[str] | None:
        if abusive_keys is None and not benign:
            return None
        named = set(abusive_keys or ())
        return {k for k in touched if k in benign or (abusive_keys is not None and k not in named)}

    rows = []
    for action in sorted(counts, key=lambda a: span[a][0]):
        legit_touched = legit(keys[action])
        rows.append(
            ShadowRow(
                action=action,
                decisions=counts[action],
                keys=len(keys[action]),
                legit_keys=None if legit_touched is None else len(legit_touched),
                first_ms=span[action][0],
                last_ms=span[action][1],
            )
        )
    all_touched = set().union(*keys.values()) if keys else set()
    legit_all = legit(all_touched)
    return ShadowReport(
        rows=rows,
        keys_by_action={action: sorted(k) for action, k in keys.items()},
        legit_keys_touched=None if legit_all is None else sorted(legit_all),
    )

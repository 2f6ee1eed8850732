"""Ledger records built directly, for tests of what reads the ledger (no ledger needed)."""

from __future__ import annotations

from typing import Any

from qabuse_dagster.response.records import LedgerEntry, LedgerRecord

KEY = "ab" * 16
OTHER_KEY = "cd" * 16
MINUTE_MS = 60_000


class Ledger:
    """A list of records with consecutive ``seq``, and the ledger's ``records`` reader.

    Example:
        >>> ledger = Ledger()
        >>> ledger.add("throttle", params={"jobs_per_minute": 3}).seq
        1
    """

    def __init__(self) -> None:
        self.items: list[LedgerRecord] = []

    def add(
        self,
        action: str,
        *,
        key: str = KEY,
        at_ms: int = 0,
        actor: str = "system",
        reason: str = "",
        **fields: Any,
    ) -> LedgerRecord:
        entry = LedgerEntry(
            at_ms=at_ms, api_key_id=key, action=action, actor=actor, reason=reason, **fields
        )
        seq = len(self.items) + 1
        record = LedgerRecord(seq, entry, "0" * 64, f"{seq:064x}", at_ms)
        self.items.append(record)
        return record

    def append(self, entry: LedgerEntry) -> LedgerRecord:
        """The ledger's ``append``: what the gateway calls for a solved challenge."""
        return self.add(
            entry.action,
            key=entry.api_key_id,
            at_ms=entry.at_ms,
            actor=entry.actor,
            reason=entry.reason,
            refers_to=entry.refers_to,
        )

    def records(self, since_seq: int = 0) -> list[LedgerRecord]:
        return [record for record in self.items if record.seq > since_seq]

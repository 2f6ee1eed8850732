"""Where alerts live: one SQLite file with the alerts, their triage state and a durable outbox.

An alert is stored once (its `~qabuse_dagster.response.alerts.alert_id` is the primary
key, so a restart that replays a decision writes nothing new), in the same transaction
as one outbox row per sink. A sink's deliverer (`qabuse_dagster.response.alert_sinks`)
claims due rows for a lease, delivers, and marks them delivered or failed with the next
attempt's time: a sink that is down loses nothing, its rows wait, and a second
deliverer never sends a row another holds.

Triage state (``status``) moves from ``open`` to what an analyst decided
(`RESOLUTIONS`); the ledger, not this table, is the audit trail of who did what.

Example:
    >>> import tempfile
    >>> from qabuse_dagster.response.alerts import Alert, example_alert
    >>> with tempfile.TemporaryDirectory() as d, AlertStore(Path(d) / "a.db") as store:
    ...     alert = Alert.model_validate(example_alert())
    ...     store.add(alert, sinks=["jsonl"]), store.add(alert, sinks=["jsonl"])
    ...     [s.status for s in store.alerts()]
    (True, False)
    ['open']
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qabuse_dagster import settings
from qabuse_dagster.response.alerts import Alert

__all__ = [
    "IMPACT",
    "RESOLUTIONS",
    "AlertStore",
    "OutboxItem",
    "StoredAlert",
    "alerts_path",
]

#: What an analyst may decide about an open alert.
RESOLUTIONS = ("released", "escalated", "false_positive", "confirmed_abuse", "resolved")
STATUSES = ("open", *RESOLUTIONS)
#: How much an action costs the key's owner: the queue sorts by it after the score.
IMPACT = {"review": 1, "throttle": 2, "cap": 3, "challenge": 4, "rotate": 5, "revoke": 6}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    alert_id TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    decided_ms INTEGER NOT NULL,
    api_key_id TEXT NOT NULL,
    action TEXT NOT NULL,
    mode TEXT NOT NULL,
    top_family TEXT,
    score REAL NOT NULL,
    impact INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'open',
    status_by TEXT,
    status_ms INTEGER,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_status ON alerts (status, score);
CREATE INDEX IF NOT EXISTS alerts_key ON alerts (api_key_id, decided_ms);
CREATE TABLE IF NOT EXISTS outbox (
    alert_id TEXT NOT NULL REFERENCES alerts (alert_id),
    sink TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    claimed_until_ms INTEGER NOT NULL DEFAULT 0,
    delivered_ms INTEGER,
    last_error TEXT,
    PRIMARY KEY (alert_id, sink)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (sink, delivered_ms, next_attempt_ms);
"""


def alerts_path(paths: settings.Paths | None = None) -> Path:
    """The alert store of a home: ``$QABUSE_HOME/alerts/alerts.db``."""
    return (paths or settings.paths()).home / "alerts" / "alerts.db"


@dataclass(frozen=True)
class StoredAlert:
    """An alert and where triage stands with it."""

    alert: Alert
    status: str
    status_by: str | None
    status_ms: int | None

    @property
    def alert_id(self) -> str:
        return self.alert.alert_id

    @property
    def impact(self) -> int:
        return IMPACT.get(self.alert.action, 0)


@dataclass(frozen=True)
class OutboxItem:
    """One alert waiting for one sink."""

    alert: Alert
    sink: str
    attempts: int


class AlertStore:
    """The alerts of one home (module docstring). Safe to share between threads.

    Args:
        path: The SQLite file; created, with its folder, when missing.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else alerts_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    def __enter__(self) -> AlertStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.rollback()
                raise
            self._conn.commit()

    # Alerts.

    def add(self, alert: Alert, sinks: Iterable[str] = (), *, now_ms: int | None = None) -> bool:
        """Store ``alert`` and queue it for every sink, at once; False when it is there already."""
        now = _now(now_ms)
        with self._write() as conn:
            inserted = conn.execute(
                "INSERT OR IGNORE INTO alerts (alert_id, created_ms, decided_ms, api_key_id,"
                " action, mode, top_family, score, impact, body)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    alert.alert_id,
                    int(alert.created_at.timestamp() * 1000),
                    int(alert.decided_at.timestamp() * 1000),
                    alert.api_key_id,
                    alert.action,
                    alert.mode,
                    alert.top_family,
                    alert.score,
                    IMPACT.get(alert.action, 0),
                    alert.to_json(),
                ),
            ).rowcount
            if inserted:
                conn.executemany(
                    "INSERT OR IGNORE INTO outbox (alert_id, sink, next_attempt_ms)"
                    " VALUES (?, ?, ?)",
                    [(alert.alert_id, sink, now) for sink in dict.fromkeys(sinks)],
                )
        return bool(inserted)

    def get(self, alert_id: str) -> StoredAlert | None:
        rows = self._read(_SELECT + " WHERE alert_id = ?", (alert_id,))
        return rows[0] if rows else None

    def with_prefix(self, prefix: str, limit: int = 2) -> list[StoredAlert]:
        """Alerts whose id starts with ``prefix`` (hex), at most ``limit``."""
        if not prefix or any(c not in "0123456789abcdef" for c in prefix):
            return []
        return self._read(_SELECT + " WHERE alert_id LIKE ? LIMIT ?", (prefix + "%", limit))

    def alerts(
        self,
        *,
        status: str | None = "open",
        action: str | None = None,
        family: str | None = None,
        api_key_id: str | None = None,
        limit: int = 500,
    ) -> list[StoredAlert]:
        """Alerts by score, then impact, highest first; each filter narrows them."""
        where, args = [], []
        for column, value in (
            ("status", status),
            ("action", action),
            ("top_family", family),
            ("api_key_id", api_key_id),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY score DESC, impact DESC, decided_ms DESC LIMIT ?"
        return self._read(sql, (*args, int(limit)))

    def set_status(
        self, alert_id: str, status: str, actor: str, *, now_ms: int | None = None
    ) -> StoredAlert:
        """Record what triage decided about an alert.

        Raises:
            KeyError: No such alert.
            ValueError: ``status`` is not one of `STATUSES`.
        """
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE alerts SET status = ?, status_by = ?, status_ms = ? WHERE alert_id = ?",
                (status, actor, _now(now_ms), alert_id),
            ).rowcount
        if not changed:
            raise KeyError(f"no alert {alert_id}")
        stored = self.get(alert_id)
        assert stored is not None
        return stored

    def counts(self) -> dict[tuple[str, str, str], int]:
        """Alerts per (action, mode, status): what the Prometheus collector exports."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT action, mode, status, COUNT(*) FROM alerts GROUP BY action, mode, status"
            ).fetchall()
        return {(a, m, s): int(n) for a, m, s, n in rows}

    # The outbox.

    def claim(
        self, sink: str, *, limit: int = 50, lease_ms: int = 30_000, now_ms: int | None = None
    ) -> list[OutboxItem]:
        """Take up to ``limit`` due rows of ``sink`` for ``lease_ms``, oldest first."""
        now = _now(now_ms)
        with self._write() as conn:
            rows = conn.execute(
                "SELECT o.alert_id, o.attempts, a.body FROM outbox o JOIN alerts a USING (alert_id)"
                " WHERE o.sink = ? AND o.delivered_ms IS NULL AND o.next_attempt_ms <= ?"
                " AND o.claimed_until_ms <= ? ORDER BY o.next_attempt_ms, a.created_ms LIMIT ?",
                (sink, now, now, int(limit)),
            ).fetchall()
            conn.executemany(
                "UPDATE outbox SET claimed_until_ms = ? WHERE alert_id = ? AND sink = ?",
                [(now + lease_ms, alert_id, sink) for alert_id, _, _ in rows],
            )
        return [
            OutboxItem(Alert.model_validate_json(body), sink, int(attempts))
            for _, attempts, body in rows
        ]

    def delivered(self, alert_id: str, sink: str, *, now_ms: int | None = None) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE outbox SET delivered_ms = ?, attempts = attempts + 1, last_error = NULL,"
                " claimed_until_ms = 0 WHERE alert_id = ? AND sink = ?",
                (_now(now_ms), alert_id, sink),
            )

    def failed(self, alert_id: str, sink: str, error: str, *, retry_at_ms: int) -> None:
        """A delivery failed: try again at ``retry_at_ms``."""
        with self._write() as conn:
            conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_ms = ?,"
                " claimed_until_ms = 0 WHERE alert_id = ? AND sink = ?",
                (error[:1000], int(retry_at_ms), alert_id, sink),
            )

    def outbox_status(self) -> dict[str, dict[str, Any]]:
        """Per sink: rows waiting, delivered, the oldest waiting row's age and last error."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT sink, SUM(delivered_ms IS NULL), SUM(delivered_ms IS NOT NULL),"
                " MIN(CASE WHEN delivered_ms IS NULL THEN next_attempt_ms END),"
                " MAX(CASE WHEN delivered_ms IS NULL THEN attempts END)"
                " FROM outbox GROUP BY sink"
            ).fetchall()
            errors = dict(
                self._conn.execute(
                    "SELECT sink, last_error FROM outbox WHERE delivered_ms IS NULL"
                    " AND last_error IS NOT NULL GROUP BY sink"
                ).fetchall()
            )
        return {
            sink: {
                "pending": int(pending or 0),
                "delivered": int(done or 0),
                "next_attempt_ms": next_ms,
                "max_attempts": int(attempts or 0),
                "last_error": errors.get(sink),
            }
            for sink, pending, done, next_ms, attempts in rows
        }

    def _read(self, sql: str, args: Sequence[Any]) -> list[StoredAlert]:
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [
            StoredAlert(Alert.model_validate_json(body), status, by, at)
            for body, status, by, at in rows
        ]


_SELECT = "SELECT body, status, status_by, status_ms FROM alerts"


def _now(now_ms: int | None) -> int:
    return now_ms if now_ms is not None else int(time.time() * 1000)

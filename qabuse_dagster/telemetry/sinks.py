"""Where instrumentors' records go: in memory, rotating JSONL files, or the collector.

A sink takes batches of contract records (JSON-ready dicts, as `record_to_json` makes
them) from the emitter's background thread; it may raise, and the emitter counts the
failure and carries on, so a sink never breaks the user's code. `HttpSink` lives in
`qabuse_dagster.telemetry.http_sink`.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["JsonlSink", "MemorySink", "Sink"]


@runtime_checkable
class Sink(Protocol):
    """Receives batches of records from one emitter thread."""

    def write(self, records: list[dict[str, Any]]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class MemorySink:
    """Keeps every record in a list, for tests and notebooks."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def write(self, records: list[dict[str, Any]]) -> None:
        with self._lock:
            self.records.extend(records)

    def flush(self) -> None:
        """Nothing is buffered."""

    def close(self) -> None:
        """Nothing to release."""


class JsonlSink:
    """Appends records to a JSONL file, rotating it past ``max_bytes``.

    ``path`` is the live file; on rotation it becomes ``path.1`` (``path.1`` becomes
    ``path.2`` and so on), and the oldest beyond ``backups`` is deleted. Every line is a
    whole record: a batch is written with one ``write`` call and flushed, and `flush`
    also fsyncs.

    Args:
        path: The live file; its folder is created.
        max_bytes: Size past which the file is rotated before the next batch.
        backups: Rotated files kept.
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = 64 << 20, backups: int = 5):
        if max_bytes <= 0 or backups < 0:
            raise ValueError("max_bytes must be positive and backups not negative")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        with self._lock:
            if self._file.tell() > 0 and self._file.tell() + len(text) > self.max_bytes:
                self._rotate()
            self._file.write(text)
            self._file.flush()

    def _rotate(self) -> None:
        self._file.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._file = self.path.open("a", encoding="utf-8")

    def flush(self) -> None:
        with self._lock:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()

"""Stream workers on the ingest bus for tests: no Feast store, no model; their rows are kept.

`bus_worker` runs a real `StreamWorker` on a bus consumer, with a store that only names the
push sources, `push_online` replaced by a recorder, and no champion (so nothing is scored:
the rows are what these tests compare). Run as a script, it is a worker process that stops
for good before acknowledging its N-th message, for a test to SIGKILL::

    python -m support.bus_workers URL HOME SHARD SHARDS CONSUMER LATENESS_S N OUT
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq

from qabuse_dagster import settings
from qabuse_dagster.features.definitions import TIMESTAMP_COLUMN
from qabuse_dagster.features.push import PUSH_SOURCES, latest_per_key
from qabuse_dagster.ingest.bus import WorkerShard
from qabuse_dagster.response.ledger import open_ledger
from qabuse_dagster.serving import stream_worker
from qabuse_dagster.serving.scoring import ChampionUnavailable
from qabuse_dagster.serving.stream_worker import StreamOptions, StreamWorker

LEDGER_KEY = b"bus-worker-test-key-of-32-bytes!"

#: (entity column, entity, row instant) -> the row.
Rows = dict[tuple[str, str, datetime], dict[str, Any]]


class RecordingStore:
    """Stands in for the Feast store: the push sources exist, and pushes land in ``pushed``."""

    def __init__(self) -> None:
        self.pushed: list[tuple[str, pa.Table]] = []
        #: Pushes to refuse before the next one goes through (the store is away).
        self.refuse = 0

    def list_data_sources(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=name) for name in PUSH_SOURCES.values()]


class NoChampion:
    """No model: the worker pushes rows and scores nothing."""

    def get(self) -> Any:
        raise ChampionUnavailable("no model in the bus tests")


def record_push(store: RecordingStore, rows: pa.Table, entity_column: str) -> int:
    """`push_online` of the tests: every row emitted is kept, not only each key's latest."""
    if store.refuse:
        store.refuse -= 1
        raise ConnectionError("the online store is away")
    store.pushed.append((entity_column, rows))
    return latest_per_key(rows, entity_column).num_rows


def rows_of(pushed: list[tuple[str, pa.Table]]) -> Rows:
    """The rows pushed, by (entity column, entity, instant); a row pushed again replaces
    the first copy (the online store keeps the last write)."""
    rows: Rows = {}
    for entity_column, table in pushed:
        for row in table.to_pylist():
            rows[entity_column, row[entity_column], row[TIMESTAMP_COLUMN]] = row
    return rows


def worker_options(
    url: str, shard: str, shards: int, consumer: str, lateness: timedelta
) -> StreamOptions:
    return StreamOptions(
        allowed_lateness=lateness,
        bus_url=url,
        shard=WorkerShard.parse(shard),
        bus_shards=shards,
        consumer=consumer,
        provisional_s=0,
        stats_every_s=3600,
    )


@contextlib.contextmanager
def bus_worker(
    url: str,
    home: Path,
    *,
    shard: str,
    shards: int,
    consumer: str,
    lateness: timedelta,
) -> Iterator[tuple[StreamWorker, RecordingStore]]:
    """A `StreamWorker` on the bus (module docstring) and the store its rows go to."""
    store = RecordingStore()
    with (
        mock.patch.object(stream_worker, "push_online", record_push),
        open_ledger(f"sqlite:///{home / 'ledger.db'}", key=LEDGER_KEY) as ledger,
    ):
        worker = StreamWorker(
            settings.Paths(home),
            options=worker_options(url, shard, shards, consumer, lateness),
            ledger=ledger,
            store=store,
            champion=NoChampion(),  # type: ignore[arg-type]  # a stand-in
        )
        try:
            yield worker, store
        finally:
            worker.close()


def drain(worker: StreamWorker) -> None:
    """Step until the bus holds nothing new for the worker."""
    while worker.step():
        pass


def _stalling_worker(argv: list[str]) -> None:
    """The script: a worker that hangs (until killed) instead of its ``n``-th acknowledgement.

    Each push is written to ``OUT/rows-<i>.parquet``; when it hangs, ``OUT/stalled.json``
    says the last stream seq acknowledged and the one left unacknowledged.
    """
    url, home, shard, shards, consumer, lateness_s, n, out = argv
    out_dir = Path(out)
    pushes = iter(range(10**9))

    def push_to_files(store: RecordingStore, rows: pa.Table, entity_column: str) -> int:
        table = rows.append_column("entity_column", pa.array([entity_column] * rows.num_rows))
        pq.write_table(table, out_dir / f"rows-{next(pushes):05d}.parquet")
        return rows.num_rows

    with bus_worker(
        url,
        Path(home),
        shard=shard,
        shards=int(shards),
        consumer=consumer,
        lateness=timedelta(seconds=float(lateness_s)),
    ) as (worker, _):
        stream_worker.push_online = push_to_files  # type: ignore[assignment]  # the script's
        commit = worker.source.commit
        commits = iter(range(1, 10**9))

        def commit_or_hang(seq: int) -> None:
            if next(commits) == int(n):
                stalled = {"acknowledged": worker.source.position, "unacknowledged": seq}
                (out_dir / "stalled.json").write_text(json.dumps(stalled))
                while True:  # killed here: applied and pushed, never acknowledged
                    time.sleep(1)
            commit(seq)

        worker.source.commit = commit_or_hang  # type: ignore[method-assign]
        drain(worker)


def read_pushed_files(out_dir: Path) -> list[tuple[str, pa.Table]]:
    """What `_stalling_worker` pushed, as `RecordingStore.pushed` holds it."""
    pushed = []
    for path in sorted(out_dir.glob("rows-*.parquet")):
        table = pq.read_table(path)
        entity_column = table["entity_column"][0].as_py()
        pushed.append((entity_column, table.drop_columns(["entity_column"])))
    return pushed


if __name__ == "__main__":
    _stalling_worker(sys.argv[1:])

"""Sharded streaming windows: each shard's rows are the unsharded rows of its entities.

A shard feeds its own entities' records through `StreamingWindows.update` and every other
record through `update_cross_entity`, as stream workers on the ingest bus do; the rows of
all shards together are the rows of one instance fed everything, cross-entity features
(backend load, code-hash and network sharing) included.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from qabuse_dagster.features.definitions import TIMESTAMP_COLUMN
from qabuse_dagster.features.streaming import StreamingWindows, StreamRecord
from qabuse_dagster.ingest.bus import WorkerShard

SHARDS = 8
LATENESS = timedelta(seconds=30)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> list[StreamRecord]:
    """Three simulated hours with every abuse scenario, in time order."""
    from qabuse_dagster.evaluation.report import read_telemetry_jsonl
    from qabuse_dagster.simulation import simulate
    from qabuse_dagster.telemetry.hashing import KeyedHasher

    logging.getLogger("qabuse_dagster.telemetry.hashing").setLevel(logging.ERROR)
    out: Path = tmp_path_factory.mktemp("sharded-sim")
    sim = simulate(hours=3, seed=2, out=out, hasher=KeyedHasher.demo(), scenarios=["all"])
    table = read_telemetry_jsonl(sim.telemetry_path).select(list(StreamRecord._fields))
    records = sorted((StreamRecord(**r) for r in table.to_pylist()), key=lambda r: r.timestamp)
    assert len({r.api_key_id for r in records}) > 100
    return records


def _rows(
    records: list[StreamRecord], entity_column: str, shard: WorkerShard, cross_entity: bool = True
) -> dict[tuple[str, Any], dict[str, Any]]:
    windows = StreamingWindows(LATENESS, entity_column=entity_column)
    for record in records:
        if shard.owns_entity(getattr(record, entity_column), SHARDS):
            windows.update(record)
        elif cross_entity:
            windows.update_cross_entity(record)
    rows = pa.concat_tables([windows.advance(), windows.flush()])
    return {(r[entity_column], r[TIMESTAMP_COLUMN]): r for r in rows.to_pylist()}


@pytest.mark.parametrize("entity_column", ["api_key_id", "user"])
def test_three_shards_give_the_rows_of_one_instance(
    simulated: list[StreamRecord], entity_column: str
) -> None:
    whole = _rows(simulated, entity_column, WorkerShard())
    sharded: dict[tuple[str, Any], dict[str, Any]] = {}
    for i in range(3):
        part = _rows(simulated, entity_column, WorkerShard(i, 3))
        assert part and not part.keys() & sharded.keys()  # each entity in one shard
        sharded |= part
    assert sharded == whole
    for name in ("backend_load_at_submit_1m", "code_hash_sharing_1h"):
        assert sum(row[name] > 0 for row in whole.values()) > 100, name


def test_a_shard_without_the_others_records_gets_the_cross_entity_features_wrong(
    simulated: list[StreamRecord],
) -> None:
    shard = WorkerShard(0, 2)
    right = _rows(simulated, "api_key_id", shard)
    alone = _rows(simulated, "api_key_id", shard, cross_entity=False)
    assert alone.keys() == right.keys()
    loads = [
        (alone[k]["backend_load_at_submit_5m"], right[k]["backend_load_at_submit_5m"])
        for k in right
    ]
    assert any(a < r for a, r in loads) and all(a <= r for a, r in loads)

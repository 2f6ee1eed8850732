"""Feast repositories applied in a home of their own, with known rows materialised online.

The session-wide ``QABUSE_HOME`` (tests/conftest.py) holds what the pipeline wrote; these
tests need a store whose every online row they chose, so they apply the repository again
elsewhere, once per module (``apply_repo`` imports the repo modules afresh, so the
registered source paths are this home's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import pyarrow as pa
import pytest
from support.local_redis import local_redis, redis_server_binary
from support.required import require_installed

from qabuse_dagster import settings
from qabuse_dagster.features.definitions import (
    DETECTOR_FEATURES,
    ENTITY_COLUMNS,
    SEQUENCE_COLUMNS,
    SEQUENCE_MINUTES,
    TIMESTAMP_COLUMN,
    feature_schema,
)
from qabuse_dagster.features.push import push_online
from qabuse_dagster.features.store import (
    FEATURE_SERVICE,
    apply_repo,
    entity_views,
    materialize,
    online_vectors,
    open_store,
    sequence_folder,
)

FRESH_KEY = "a1" * 32
STALE_KEY = "b2" * 32
UNKNOWN_KEY = "c3" * 32
USER = "d4" * 32
#: How long before ``written_at`` each seeded api key (and the user) last submitted.
AGES = {FRESH_KEY: timedelta(seconds=30), STALE_KEY: timedelta(hours=1)}
USER_AGE = timedelta(seconds=45)


@dataclass(frozen=True)
class SeededStore:
    """An applied store and exactly what was materialised into its online store."""

    fresh_key: ClassVar[str] = FRESH_KEY
    stale_key: ClassVar[str] = STALE_KEY
    #: Never written: the store has nothing for it.
    unknown_key: ClassVar[str] = UNKNOWN_KEY
    #: The one user written (the user views' source), at ``written_at - USER_AGE``.
    user: ClassVar[str] = USER

    store: Any
    home: Path
    online_store: str
    #: The instant the rows' ages are measured from (whole seconds, UTC).
    written_at: datetime
    #: Every feature value per key (api keys and the user), as written.
    values: dict[str, dict[str, float | int]]
    event_times: dict[str, datetime]
    #: Per api key, its sequence columns as written (``api_key_sequence``).
    sequences: dict[str, dict[str, list[int]]]
    #: Feast's connection string of the Redis server; None for SQLite.
    redis: str | None = None

    def detector_values(self, key: str) -> dict[str, float | int]:
        """What the detector's service (``api_key_detector_v1``) reads of ``key``'s row."""
        return {name: self.values[key][name] for name in DETECTOR_FEATURES}


def _feature_values(store: Any, seed: int) -> dict[str, float | int]:
    """Distinct, exactly representable values; integers where the views' field is Int64."""
    from feast.types import Int64

    # Every entity's window views carry the same feature names; one value per name.
    fields = {
        f.name: f.dtype
        for view in store.list_feature_views()
        if view.tags.get("kind") is None  # the window views, not sequences or campaigns
        for f in view.features
    }
    return {
        name: (seed * 100 + i if dtype == Int64 else seed + i / 4)
        for i, (name, dtype) in enumerate(sorted(fields.items()))
    }


def seed_store(home: Path, online_store: str, redis: str | None = None) -> SeededStore:
    """Apply the repository under ``home`` and materialise one row per seeded key and user."""
    written_at = datetime.now(UTC).replace(microsecond=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(settings.HOME_ENV, str(home))
        patch.setenv("FEAST_USAGE", "False")
        if redis is not None:
            patch.setenv(settings.REDIS_ENV, redis)
        store = open_store(online_store=online_store)
        apply_repo(store)
        ages = {**AGES, USER: USER_AGE}
        values = {key: _feature_values(store, seed) for seed, key in enumerate(ages, start=1)}
        event_times = {key: written_at - age for key, age in ages.items()}
        for entity, keys in (("api_key", list(AGES)), ("user", [USER])):
            rows = pd.DataFrame(
                [
                    {
                        ENTITY_COLUMNS[entity]: key,
                        TIMESTAMP_COLUMN: event_times[key],
                        **values[key],
                    }
                    for key in keys
                ]
            )
            source = settings.paths().entity_windows(entity)
            source.mkdir(parents=True, exist_ok=True)
            rows.to_parquet(source / "seed.parquet", index=False)
        # Distinct sequences per key and channel (minute i of channel c: seed, c, i).
        sequences = {
            key: {
                column: [seed * 10_000 + c * 100 + i for i in range(SEQUENCE_MINUTES)]
                for c, column in enumerate(SEQUENCE_COLUMNS.values())
            }
            for seed, key in enumerate(AGES, start=1)
        }
        folder = sequence_folder()
        folder.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(
            [
                {ENTITY_COLUMNS["api_key"]: key, TIMESTAMP_COLUMN: event_times[key], **columns}
                for key, columns in sequences.items()
            ]
        ).to_parquet(folder / "seed.parquet", index=False)
        # Campaign features (the graph family's view): one row per key, in no group.
        from models.campaign import CAMPAIGN_FEATURES
        from qabuse_dagster.features.store import campaign_folder

        campaign = campaign_folder()
        campaign.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(
            [
                {
                    ENTITY_COLUMNS["api_key"]: key,
                    TIMESTAMP_COLUMN: event_times[key],
                    **dict.fromkeys(CAMPAIGN_FEATURES, 0.0),
                }
                for key in sequences
            ]
        ).to_parquet(campaign / "seed.parquet", index=False)
        # Every view of both entities.
        materialize(store, written_at - timedelta(days=1), written_at + timedelta(minutes=1))
    return SeededStore(store, home, online_store, written_at, values, event_times, sequences, redis)


def require_redis_server() -> None:
    """Skip without ``redis-server``; under CI (``CI`` set) fail instead: CI installs it."""
    require_installed(
        redis_server_binary() is not None, "redis-server", "redis-server", "the Redis online store"
    )


@pytest.fixture(scope="module")
def seeded_sqlite(tmp_path_factory: pytest.TempPathFactory) -> SeededStore:
    return seed_store(tmp_path_factory.mktemp("qabuse-sqlite-home"), "sqlite")


@pytest.fixture(scope="module")
def seeded_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeededStore]:
    require_redis_server()
    with local_redis() as connection:
        yield seed_store(tmp_path_factory.mktemp("qabuse-redis-home"), "redis", connection)


#: Pushed a newer row first: materialising its older offline row must leave it.
PUSHED_NEWER = "e5" * 32
#: Pushed an older row first: materialising its newer offline row must replace it.
PUSHED_OLDER = "f6" * 32


def _guard_row(key: str, at: datetime, seed: int) -> dict[str, Any]:
    """A full api-key window row: every feature a distinct value, integers where Int64."""
    row: dict[str, Any] = {ENTITY_COLUMNS["api_key"]: key, TIMESTAMP_COLUMN: at}
    for i, spec in enumerate(feature_schema(ENTITY_COLUMNS["api_key"])):
        if spec.name in row:
            continue
        row[spec.name] = seed * 1000 + i if pa.types.is_integer(spec.type) else seed + i / 4
    return row


def _assert_materialise_keeps_newer_online_rows(seeded: SeededStore) -> None:
    """Push, then materialise an overlapping range: each key holds its newest row."""
    store = seeded.store
    older = seeded.written_at - timedelta(hours=2)
    newer = seeded.written_at - timedelta(minutes=90)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(settings.HOME_ENV, str(seeded.home))
        if seeded.redis is not None:
            patch.setenv(settings.REDIS_ENV, seeded.redis)
        offline = pd.DataFrame(
            [_guard_row(PUSHED_NEWER, older, 1), _guard_row(PUSHED_OLDER, newer, 2)]
        )
        source = settings.paths().entity_windows("api_key") / "online-guard.parquet"
        offline.to_parquet(source, index=False)
        try:
            pushed = pd.DataFrame(
                [_guard_row(PUSHED_OLDER, older, 3), _guard_row(PUSHED_NEWER, newer, 4)]
            )
            push_online(store, pa.Table.from_pandas(pushed, preserve_index=False))
            views = entity_views(store, "api_key")
            report = materialize(store, older - timedelta(minutes=1), newer, views)
        finally:
            source.unlink()
    kept_newer, replaced = online_vectors(
        store, [PUSHED_NEWER, PUSHED_OLDER], FEATURE_SERVICE, max_age=timedelta(days=1)
    )
    expected = {
        PUSHED_NEWER: _guard_row(PUSHED_NEWER, newer, 4),
        PUSHED_OLDER: _guard_row(PUSHED_OLDER, newer, 2),
    }
    for vector in (kept_newer, replaced):
        assert vector.event_timestamp == newer, vector.key
        for name, value in vector.values.items():
            assert value == pytest.approx(expected[vector.key][name]), (vector.key, name)
    # Each view wrote one row and left the pushed one alone, and says so.
    assert all(report.written[view] >= 1 for view in views), report
    assert all(report.kept_online[view] >= 1 for view in views), report


@pytest.fixture
def assert_materialise_keeps_newer_online_rows() -> Callable[[SeededStore], None]:
    """The check that materialisation never writes an older row over a newer online one:
    push, then materialise an overlapping range; each key holds its newest row."""
    return _assert_materialise_keeps_newer_online_rows

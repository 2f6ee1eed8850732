"""Push streaming feature rows to the Feast online store through an entity's push source.

Feast imports slowly, so it is imported inside the function, as in
`qabuse_dagster.features.store`.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from qabuse_dagster.features.definitions import ENTITY_COLUMNS, SEQUENCE_COLUMNS, TIMESTAMP_COLUMN

if TYPE_CHECKING:
    from feast import FeatureStore

logger = logging.getLogger(__name__)

#: Entity column -> the `PushSource` of ``feature_repo/data_sources.py`` behind its views.
PUSH_SOURCES: dict[str, str] = {
    column: f"{entity}_windows_push_source" for entity, column in ENTITY_COLUMNS.items()
}
#: The api-key push source, the default.
PUSH_SOURCE = PUSH_SOURCES[ENTITY_COLUMNS["api_key"]]
#: Entity column -> the `PushSource` of its per-minute sequences (api keys only).
SEQUENCE_PUSH_SOURCES: dict[str, str] = {ENTITY_COLUMNS["api_key"]: "api_key_sequence_push_source"}


def latest_per_key(rows: pa.Table, entity_column: str = ENTITY_COLUMNS["api_key"]) -> pa.Table:
    """The latest row of each entity (the only one the online store keeps), in time order."""
    ordered = rows.sort_by([(TIMESTAMP_COLUMN, "ascending"), (entity_column, "ascending")])
    last = {key: i for i, key in enumerate(ordered[entity_column].to_pylist())}
    return ordered.take(sorted(last.values()))


def push_online(
    store: FeatureStore, rows: pa.Table, entity_column: str = ENTITY_COLUMNS["api_key"]
) -> int:
    """Write the latest of ``rows`` per entity to the online store; return the rows written.

    The SQLite (and Redis) online store keeps the last value written per key and feature,
    whatever its event time, so only each entity's latest row is pushed, and rows must be
    pushed in event-time order (as `StreamingWindows.advance` returns them).

    What ``FeatureStore.push`` does (each feature view fed by the push source gets
    ``write_to_online_store``; no qabuse feature service precomputes vectors), with the
    views of each push source resolved once per store object (`push_views`): ``push``
    lists and parses every view and feature service of the registry at each call, four
    fifths of its cost for the few rows a stream worker pushes at once.

    Args:
        store: An applied feature store (`qabuse_dagster.features.store.open_store`).
        rows: Feature rows with the columns of `window_features` for ``entity_column``;
            rows of ``StreamingWindows(sequences=True)`` also carry the sequence columns,
            which go to the entity's sequence push source (`SEQUENCE_PUSH_SOURCES`).
        entity_column: The rows' entity column (a value of `ENTITY_COLUMNS`); it picks the
            push source (`PUSH_SOURCES`) feeding that entity's feature views.
    """
    if entity_column not in PUSH_SOURCES:
        raise ValueError(f"no push source for {entity_column!r}: expected one of {PUSH_SOURCES}")
    source = PUSH_SOURCES[entity_column]
    latest = latest_per_key(rows, entity_column)
    if latest.num_rows == 0:
        return 0
    sequences = [c for c in SEQUENCE_COLUMNS.values() if c in latest.column_names]
    if sequences:
        if entity_column not in SEQUENCE_PUSH_SOURCES:
            raise ValueError(f"no sequence push source for {entity_column!r}")
        keys = [entity_column, TIMESTAMP_COLUMN]
        _push(store, SEQUENCE_PUSH_SOURCES[entity_column], latest.select([*keys, *sequences]))
        latest = latest.drop_columns(sequences)
    _push(store, source, latest)
    logger.debug("pushed %d rows to %s", latest.num_rows, source)
    return latest.num_rows


#: Store -> push source -> the names of the feature views it feeds.
_VIEWS_OF_SOURCE: weakref.WeakKeyDictionary[Any, dict[str, list[str]]] = weakref.WeakKeyDictionary()


def push_views(store: FeatureStore, source: str) -> list[str]:
    """The feature views the push source ``source`` feeds, resolved once per store object.

    Raises:
        ValueError: No feature view has that push source (the repository is not applied).
    """
    from feast.data_source import PushSource

    known = _VIEWS_OF_SOURCE.setdefault(store, {})
    if source not in known:
        views = sorted(
            view.name
            for view in store.list_feature_views()
            if isinstance(view.stream_source, PushSource) and view.stream_source.name == source
        )
        if not views:
            raise ValueError(f"no feature view is fed by the push source {source!r}")
        known[source] = views
    return known[source]


def _push(store: FeatureStore, source: str, table: pa.Table) -> None:
    frame = table.to_pandas()
    for view in push_views(store, source):
        store.write_to_online_store(view, frame, allow_registry_cache=True)

"""Push streaming feature rows to the Feast online store through the api-key push source.

Feast imports slowly, so it is imported inside the function, as in
`qabuse_dagster.features.store`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pyarrow as pa

from qabuse_dagster.features.windows import ENTITY_COLUMN, TIMESTAMP_COLUMN

if TYPE_CHECKING:
    from feast import FeatureStore

logger = logging.getLogger(__name__)

#: The `PushSource` of ``feature_repo/data_sources.py`` behind both api-key feature views.
PUSH_SOURCE = "api_key_windows_push_source"


def latest_per_key(rows: pa.Table) -> pa.Table:
    """The latest row of each api key (the only one the online store keeps), in time order."""
    ordered = rows.sort_by([(TIMESTAMP_COLUMN, "ascending"), (ENTITY_COLUMN, "ascending")])
    last = {key: i for i, key in enumerate(ordered[ENTITY_COLUMN].to_pylist())}
    return ordered.take(sorted(last.values()))


def push_online(store: FeatureStore, rows: pa.Table, source: str = PUSH_SOURCE) -> int:
    """Write the latest of ``rows`` per key to the online store; return the rows written.

    The SQLite (and Redis) online store keeps the last value written per key and feature,
    whatever its event time, so only each key's latest row is pushed, and rows must be
    pushed in event-time order (as `StreamingWindows.advance` returns them).

    Args:
        store: An applied feature store (`qabuse_dagster.features.store.open_store`).
        rows: Feature rows with the columns of `window_features`.
        source: Name of the push source feeding the api-key feature views.
    """
    from feast.data_source import PushMode

    latest = latest_per_key(rows)
    if latest.num_rows == 0:
        return 0
    store.push(source, latest.to_pandas(), to=PushMode.ONLINE)
    logger.debug("pushed %d rows to %s", latest.num_rows, source)
    return latest.num_rows

"""Feast data sources: the offline Parquet tables the Dagster feature assets write.

Each entity has a file source (its rows, one Parquet file per hour) and a push source over
it: the streaming path pushes the same rows straight to the online store, and the batch
source is what materialisation and historical retrieval read.
"""

from pathlib import Path

from feast import FileSource, PushSource
from feast.data_format import ParquetFormat

from qabuse_dagster.features.definitions import ENTITY_COLUMNS, TIMESTAMP_COLUMN
from qabuse_dagster.features.push import PUSH_SOURCES, SEQUENCE_PUSH_SOURCES
from qabuse_dagster.features.store import sequence_folder
from qabuse_dagster.settings import paths


def _windows_source(name: str, folder: Path, who: str) -> FileSource:
    # A folder of hourly Parquet files (one per Dagster partition), read as one table.
    return FileSource(
        name=name,
        path=str(folder),
        file_format=ParquetFormat(),
        timestamp_field=TIMESTAMP_COLUMN,
        description=f"Per-{who} 1-minute, 5-minute and 1-hour window features, one row per "
        f"{who} and minute.",
    )


api_key_windows_source = _windows_source(
    "api_key_windows_source", paths().api_key_windows, "api-key"
)
user_windows_source = _windows_source("user_windows_source", paths().user_windows, "user")

api_key_windows_push_source = PushSource(
    name=PUSH_SOURCES[ENTITY_COLUMNS["api_key"]],
    batch_source=api_key_windows_source,
    description="Streaming rows of api_key_windows_source, pushed as each minute closes.",
)

user_windows_push_source = PushSource(
    name=PUSH_SOURCES[ENTITY_COLUMNS["user"]],
    batch_source=user_windows_source,
    description="Streaming rows of user_windows_source, pushed as each minute closes.",
)

api_key_sequence_source = FileSource(
    name="api_key_sequence_source",
    path=str(sequence_folder()),
    file_format=ParquetFormat(),
    timestamp_field=TIMESTAMP_COLUMN,
    description="Per-api-key sequences of the last 60 minutes' per-minute counts: each key's "
    "latest row of each hour (serving reads only the latest).",
)

api_key_sequence_push_source = PushSource(
    name=SEQUENCE_PUSH_SOURCES[ENTITY_COLUMNS["api_key"]],
    batch_source=api_key_sequence_source,
    description="Streaming sequence rows of api_key_sequence_source, pushed as each minute closes.",
)

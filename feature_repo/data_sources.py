"""Feast data sources: the offline Parquet tables the Dagster feature assets write.

The push source lets the streaming path write the same rows straight to the online
store; its batch source is what materialisation and historical retrieval read.
"""

from feast import FileSource, PushSource
from feast.data_format import ParquetFormat

from qabuse_dagster.features.push import PUSH_SOURCE
from qabuse_dagster.settings import paths

# A folder of hourly Parquet files (one per Dagster partition), read as one table.
api_key_windows_source = FileSource(
    name="api_key_windows_source",
    path=str(paths().api_key_windows),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
    description="Per-api-key 1- and 5-minute window features, one row per key and minute.",
)

api_key_windows_push_source = PushSource(
    name=PUSH_SOURCE,
    batch_source=api_key_windows_source,
    description="Streaming rows of api_key_windows_source, pushed as each minute closes.",
)

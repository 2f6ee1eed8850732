"""Feast data sources: the offline Parquet tables the Dagster feature assets write."""

from feast import FileSource
from feast.data_format import ParquetFormat

from qabuse_dagster.settings import paths

# A folder of hourly Parquet files (one per Dagster partition), read as one table.
api_key_windows_source = FileSource(
    name="api_key_windows_source",
    path=str(paths().api_key_windows),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
    description="Per-api-key 1- and 5-minute window features, one row per key and minute.",
)

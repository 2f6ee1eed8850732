"""Hourly raw-telemetry partitions: Arrow schema, landing files, atomic compaction, reads.

Layout under ``QABUSE_HOME``::

    landing/telemetry/date=2026-11-02/hour=13/batch-<digest>.parquet   validated, not compacted
    raw/telemetry/date=2026-11-02/hour=13/part-0.parquet                 one file per hour

A raw partition is rewritten whole and moved into place with ``os.replace``, so a
reader sees the old file or the new one, never a torn one. Compaction merges the
existing partition with its landing files, drops duplicates on (tenant, job_id, status)
keeping the record accepted first, and only then deletes the landing files: a crash
in between leaves landing files that the next compaction de-duplicates away.

Landing files and raw partitions store the contract's columns and one more, ``tenant``:
who sent the record (the collector token's tenant, or ``qabuse ingest --tenant``).
Identity is per tenant, so one tenant's record can never shadow another's. Files written
before tenants existed read with ``tenant`` null, one tenant of their own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from qabuse_dagster.telemetry.contract import CONTRACT_COLUMNS, TelemetryRecord

logger = logging.getLogger(__name__)

HOUR = timedelta(hours=1)

#: The telemetry contract (v1) as Arrow columns, in the contract's order.
TELEMETRY_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int8(), nullable=False),
        pa.field("job_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("user", pa.string(), nullable=False),
        pa.field("api_key_id", pa.string(), nullable=False),
        pa.field("provider", pa.string(), nullable=False),
        pa.field("region", pa.string()),
        pa.field("backend", pa.string(), nullable=False),
        pa.field("sdk", pa.string(), nullable=False),
        pa.field("sdk_version", pa.string()),
        pa.field("num_circuits", pa.int64(), nullable=False),
        pa.field("shots", pa.int64()),
        pa.field("num_qubits", pa.int64()),
        pa.field("depth", pa.int64()),
        pa.field("gate_counts", pa.map_(pa.string(), pa.int64())),
        pa.field("two_qubit_gates", pa.int64()),
        pa.field("submit_latency_s", pa.float64()),
        pa.field("queue_time_s", pa.float64()),
        pa.field("runtime_s", pa.float64()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_code", pa.string()),
        pa.field("retry_count", pa.int64(), nullable=False),
        pa.field("client_agent", pa.string(), nullable=False),
        pa.field("code_hash", pa.string(), nullable=False),
        pa.field("source_ip_hash", pa.string()),
        pa.field("country", pa.string()),
        pa.field("tags", pa.map_(pa.string(), pa.string())),
    ]
)
assert tuple(TELEMETRY_SCHEMA.names) == CONTRACT_COLUMNS, "Arrow schema drifted from the contract"

#: Who sent a record: stored beside the contract's columns, not part of the contract.
TENANT_COLUMN = "tenant"
#: Landing files and raw partitions: the contract's columns, then the sending tenant.
STORED_SCHEMA = TELEMETRY_SCHEMA.append(pa.field(TENANT_COLUMN, pa.string()))
#: A record's identity in storage: the contract's (job_id, status), per tenant.
IDENTITY_COLUMNS = (TENANT_COLUMN, "job_id", "status")


@dataclass(frozen=True)
class CompactionReport:
    """What one hourly compaction did."""

    hour: datetime
    rows: int
    new_rows: int
    duplicates_dropped: int
    landing_files: int


def records_to_table(records: Sequence[TelemetryRecord]) -> pa.Table:
    """Validated records as an Arrow table with ``TELEMETRY_SCHEMA``."""
    columns: dict[str, list[object]] = {name: [] for name in CONTRACT_COLUMNS}
    for record in records:
        for name in CONTRACT_COLUMNS:
            value = getattr(record, name)
            if isinstance(value, dict):
                value = list(value.items())
            columns[name].append(value)
    return pa.table(columns, schema=TELEMETRY_SCHEMA)


def hour_of(instant: datetime) -> datetime:
    """The UTC hour that holds ``instant``."""
    return instant.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def partition_dir(root: Path, hour: datetime) -> Path:
    """Hive-style folder of one hour: ``date=YYYY-MM-DD/hour=HH``."""
    hour = hour_of(hour)
    # date.isoformat pads the year to 4 digits; strftime's %Y does not on Linux (year 1).
    return root / f"date={hour.date().isoformat()}" / f"hour={hour:%H}"


def hours_between(start: datetime, end: datetime) -> list[datetime]:
    """Every UTC hour overlapping ``[start, end)``."""
    hours, hour = [], hour_of(start)
    while hour < end:
        hours.append(hour)
        hour += HOUR
    return hours


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` via a fsynced temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            pq.write_table(table, handle, compression="zstd")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage_landing(table: pa.Table, landing_root: Path, *, tenant: str | None) -> list[Path]:
    """Split validated records sent by ``tenant`` by hour into landing files, in staging order.

    ``tenant`` is None only for records spooled before tenants existed.
    A name starts with the staging instant (nanoseconds, zero-padded), so compaction
    reads batches in the order they were accepted and keeps the first copy of a
    duplicate; a digest of the batch's identities follows, for tracing.
    """
    written: list[Path] = []
    if table.num_rows == 0:
        return written
    table = table.append_column(
        STORED_SCHEMA.field(TENANT_COLUMN), pa.array([tenant] * table.num_rows, pa.string())
    )
    hours = pc.floor_temporal(table["timestamp"], unit="hour")
    for hour_value in pc.unique(hours).to_pylist():
        part = table.filter(pc.equal(hours, pa.scalar(hour_value, hours.type)))
        digest = hashlib.sha256()
        for job_id, status in zip(
            part["job_id"].to_pylist(), part["status"].to_pylist(), strict=True
        ):
            digest.update(f"{tenant}\x00{job_id}\x00{status}\x01".encode())
        staged = f"{time.time_ns():020d}"
        name = f"batch-{staged}-{digest.hexdigest()[:16]}.parquet"
        path = partition_dir(landing_root, hour_value) / name
        write_parquet_atomic(part, path)
        written.append(path)
    return written


def landing_hours(landing_root: Path) -> list[datetime]:
    """Hours that have landing files waiting to be compacted.

    A folder whose name is no hour (put there by hand) is logged and passed over: it must
    not stop the hours beside it.
    """
    hours = set()
    for folder in {p.parent for p in landing_root.glob("date=*/hour=*/batch-*.parquet")}:
        day = folder.parent.name.removeprefix("date=")
        hour = folder.name.removeprefix("hour=")
        try:
            hours.add(datetime.strptime(f"{day} {hour}", "%Y-%m-%d %H").replace(tzinfo=UTC))
        except ValueError:
            logger.warning("landing folder %s names no hour; left as it is", folder)
    return sorted(hours)


def contiguous_spans(hours: Iterable[datetime]) -> list[tuple[datetime, datetime]]:
    """Hours grouped into runs of consecutive hours, each as ``[first, last + 1 h)``.

    Processing sparse hours span by span costs time for those hours only, never for the
    empty stretch between the oldest and the newest. Hours must end before year 9999's
    last hour (``AcceptedRange`` keeps them far from it).
    """
    spans: list[tuple[datetime, datetime]] = []
    for hour in sorted({hour_of(h) for h in hours}):
        if spans and spans[-1][1] == hour:
            spans[-1] = (spans[-1][0], hour + HOUR)
        else:
            spans.append((hour, hour + HOUR))
    return spans


def compact_hour(hour: datetime, landing_root: Path, raw_root: Path) -> CompactionReport:
    """Merge an hour's landing files into its raw partition, once per (tenant, job_id, status)."""
    hour = hour_of(hour)
    target = partition_dir(raw_root, hour) / "part-0.parquet"
    landing = sorted(partition_dir(landing_root, hour).glob("batch-*.parquet"))
    # STORED_SCHEMA: a file from before tenants reads with the tenant null.
    existing = pq.read_table(target, schema=STORED_SCHEMA) if target.exists() else None
    tables = ([existing] if existing is not None else []) + [
        pq.read_table(p, schema=STORED_SCHEMA) for p in landing
    ]
    previous_rows = existing.num_rows if existing is not None else 0
    if not tables:
        return CompactionReport(hour, 0, 0, 0, 0)
    merged = pa.concat_tables(tables)
    deduped = _drop_duplicate_identities(merged)
    in_hour = pc.equal(pc.floor_temporal(deduped["timestamp"], unit="hour"), pa.scalar(hour))
    if not pc.all(in_hour).as_py():
        raise ValueError(f"landing files for {hour:%Y-%m-%d %H}:00 hold records of other hours")
    ordered = deduped.sort_by([("timestamp", "ascending"), ("job_id", "ascending")])
    if landing:
        write_parquet_atomic(ordered, target)
        for path in landing:
            path.unlink(missing_ok=True)
    report = CompactionReport(
        hour=hour,
        rows=ordered.num_rows,
        new_rows=ordered.num_rows - previous_rows,
        duplicates_dropped=merged.num_rows - ordered.num_rows,
        landing_files=len(landing),
    )
    logger.info("compacted %s: %s", f"{hour:%Y-%m-%d %H}:00", report)
    return report


def _drop_duplicate_identities(table: pa.Table) -> pa.Table:
    # Keep the first occurrence: rows of the existing partition come first, so an
    # accepted record is never replaced by a later copy.
    indexed = table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))
    first = indexed.group_by(list(IDENTITY_COLUMNS), use_threads=False).aggregate([("_row", "min")])
    keep = pc.sort_indices(first["_row_min"])
    return table.take(pc.take(first["_row_min"], keep))


def read_raw(
    raw_root: Path, start: datetime | None = None, end: datetime | None = None
) -> pa.Table:
    """Raw telemetry with ``start <= timestamp < end`` as one table (contract columns only).

    The same data reads as one Hive-partitioned dataset from any Arrow tool:
    ``pyarrow.dataset.dataset(raw_root, partitioning="hive")``.
    """
    files = sorted(raw_root.glob("date=*/hour=*/part-0.parquet"))
    if start is not None and end is not None:
        # Prune partitions by their folder names before touching any file.
        wanted = {partition_dir(raw_root, h) for h in hours_between(start, end)}
        files = [f for f in files if f.parent in wanted]
    if not files:
        return TELEMETRY_SCHEMA.empty_table()
    expression = None
    if start is not None:
        expression = ds.field("timestamp") >= pa.scalar(start, pa.timestamp("us", tz="UTC"))
    if end is not None:
        upper = ds.field("timestamp") < pa.scalar(end, pa.timestamp("us", tz="UTC"))
        expression = upper if expression is None else expression & upper
    dataset = ds.dataset([str(f) for f in files], format="parquet", schema=TELEMETRY_SCHEMA)
    return dataset.to_table(filter=expression)


def partition_files(raw_root: Path, hours: Iterable[datetime]) -> list[Path]:
    """The raw partition files that exist for ``hours``."""
    return [p for p in (partition_dir(raw_root, h) / "part-0.parquet" for h in hours) if p.exists()]

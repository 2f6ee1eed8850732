"""``qabuse ingest``: validate telemetry files record by record and stage what is valid.

Valid records go to the hourly landing area (compacted into raw partitions by the
``raw_telemetry`` asset); each rejected line goes to the quarantine with its file,
line number and reason. A bad line never costs the good lines around it. A valid record
outside the accepted time range (`qabuse_dagster.ingest.time_range`) is rejected the same
way: no partition could hold it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from qabuse_dagster.ingest.partitions import stage_landing
from qabuse_dagster.ingest.time_range import AcceptedRange
from qabuse_dagster.ingest.wire import (
    decode_json_line,
    spool_row_of,
    spool_rows_to_table,
    to_spool_row,
)
from qabuse_dagster.settings import Paths
from qabuse_dagster.telemetry.contract import (
    ContractViolation,
    TelemetryRecord,
    format_rfc3339_utc,
    validate_record,
)
from qabuse_dagster.telemetry.labels import IncidentLabel, LabelsError, read_labels, write_labels

logger = logging.getLogger(__name__)

#: Records staged per landing write: bounds memory for files of any size.
BATCH_SIZE = 100_000
#: A line longer than this is rejected unparsed (no record comes near it).
MAX_LINE_BYTES = 64 * 1024
#: The contract sets no maximum on some integers; Parquet stores them as int64.
INT64_MAX = 2**63 - 1
#: The tenant `qabuse ingest` stores file records under unless told another.
DEFAULT_FILE_TENANT = "local"


@dataclass
class Rejection:
    """One line the contract refused, as kept in the quarantine."""

    source: str
    line: int
    reason: str
    raw: str


@dataclass
class IngestReport:
    """Counts of one ingest run; ``rejections`` holds the first few for display."""

    files: int = 0
    lines: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    #: Of ``rejected``: valid records outside the accepted time range.
    out_of_range: int = 0
    landing_files: list[Path] = field(default_factory=list)
    quarantine_file: Path | None = None
    rejections: list[Rejection] = field(default_factory=list)


def _read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line or row number, the record as JSON bytes) of a JSONL or Parquet file."""
    if path.suffix.lower() == ".parquet":
        yield from _parquet_rows(path)
        return
    with path.open("rb") as handle:
        yield from enumerate(handle, start=1)


def _parquet_rows(path: Path) -> Iterator[tuple[int, bytes]]:
    """Each row of a Parquet file as the JSON line it stands for, so one parser checks both.

    Timestamps become RFC 3339 text; map columns (``gate_counts``, ``tags``) objects.
    Columns that are not contract fields stay in the row, and the contract refuses them.
    """
    import pyarrow.parquet as pq

    def jsonable(value: object) -> object:
        if isinstance(value, datetime):
            if value.tzinfo is None:
                return value.isoformat()  # no offset: the contract refuses it, saying so
            return format_rfc3339_utc(value)
        if isinstance(value, list) and all(isinstance(v, tuple) and len(v) == 2 for v in value):
            return dict(value)
        return value

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_SIZE):
        for row in batch.to_pylist():
            number += 1
            record = {name: jsonable(value) for name, value in row.items()}
            yield number, json.dumps(record, default=str).encode()


def parse_line(raw: bytes) -> TelemetryRecord:
    """Decode and validate one JSONL line of telemetry.

    Raises:
        ContractViolation: the line is too long, not UTF-8, not JSON, or not a valid
            record, or holds an integer no storage column can hold; names the field.
    """
    obj = decode_json_line(raw, MAX_LINE_BYTES)
    record = validate_record(obj)
    too_large = _beyond_int64(record)
    if too_large:
        raise ContractViolation(
            [(name, f"exceeds the largest storable integer {INT64_MAX}") for name in too_large]
        )
    return record


def _beyond_int64(record: TelemetryRecord) -> list[str]:
    # Valid under the contract (no maximum), but no int64 column can hold them: refuse the
    # one record here rather than fail the whole batch when it is written.
    fields = [
        name
        for name in ("depth", "two_qubit_gates", "retry_count")
        if (getattr(record, name) or 0) > INT64_MAX
    ]
    fields += [
        f"gate_counts.{gate}"
        for gate, count in (record.gate_counts or {}).items()
        if count > INT64_MAX
    ]
    return fields


def ingest_telemetry(
    files: Iterable[Path],
    paths: Paths,
    *,
    tenant: str = DEFAULT_FILE_TENANT,
    accepted_range: AcceptedRange | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> IngestReport:
    """Validate telemetry files and stage their valid records for compaction.

    Args:
        files: JSONL files, one contract record per line (blank lines are skipped), or
            Parquet files (``.parquet``), one record per row; a rejection names the line
            or row.
        paths: where landing files and the quarantine live.
        tenant: who the records are stored as sent by; duplicates are judged per tenant.
        accepted_range: timestamps accepted (default from the settings); a record
            outside is rejected, like an invalid one.
        on_progress: called with the number of lines read since the last call.

    Returns:
        Counts, the landing files written and the quarantine file (if any line was rejected).
    """
    report = IngestReport()
    bounds = (accepted_range or AcceptedRange.from_settings()).at()
    seen: set[tuple[str, str]] = set()
    batch: list[str] = []  # spool rows' canonical texts
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    quarantine_file = paths.quarantine / f"rejected-{stamp}.jsonl"
    quarantine = None

    def flush() -> None:
        if batch:
            table = spool_rows_to_table(batch)
            assert table is not None, "canonical texts always decode"
            report.landing_files.extend(stage_landing(table, paths.landing, tenant=tenant))
            batch.clear()

    try:
        for path in files:
            report.files += 1
            read_since_progress = 0
            for number, raw in _read_lines(Path(path)):
                if not raw.strip():
                    continue
                report.lines += 1
                read_since_progress += 1
                if on_progress and read_since_progress >= 10_000:
                    on_progress(read_since_progress)
                    read_since_progress = 0
                # The wire fast path takes plain-form lines; parse_line judges the rest.
                row = to_spool_row(raw) if len(raw) <= MAX_LINE_BYTES else None
                try:
                    if row is None:
                        row = spool_row_of(parse_line(raw))
                    out_of_range = bounds.reason(row.timestamp)
                    if out_of_range is not None:
                        report.out_of_range += 1
                        raise ContractViolation([("timestamp", out_of_range)])
                except ContractViolation as exc:
                    report.rejected += 1
                    rejection = Rejection(
                        str(path), number, str(exc), raw[:MAX_LINE_BYTES].decode(errors="replace")
                    )
                    if len(report.rejections) < 20:
                        report.rejections.append(rejection)
                    if quarantine is None:
                        paths.quarantine.mkdir(parents=True, exist_ok=True)
                        quarantine = quarantine_file.open("a", encoding="utf-8")
                        report.quarantine_file = quarantine_file
                    quarantine.write(json.dumps(rejection.__dict__) + "\n")
                    continue
                identity = (row.job_id, row.status)
                if identity in seen:
                    report.duplicates += 1
                    continue
                seen.add(identity)
                batch.append(row.text)
                report.accepted += 1
                if len(batch) >= BATCH_SIZE:
                    flush()
            if on_progress and read_since_progress:
                on_progress(read_since_progress)
        flush()
    finally:
        if quarantine is not None:
            quarantine.close()
    logger.info(
        "ingested %d lines: %d accepted, %d duplicates, %d rejected (%d out of range)",
        report.lines,
        report.accepted,
        report.duplicates,
        report.rejected,
        report.out_of_range,
    )
    return report


def ingest_labels(source: Path, paths: Paths) -> list[IncidentLabel]:
    """Merge a labels file into ``$QABUSE_HOME/labels/incidents.jsonl``.

    A label whose ``incident_id`` is already known replaces nothing: it must be
    identical, else the merge fails and the stored labels stay as they were.

    Returns:
        Every stored label after the merge.
    """
    incoming = read_labels(source)
    stored = read_labels(paths.labels) if paths.labels.exists() else []
    by_id = {label.incident_id: label for label in stored}
    for number, label in enumerate(incoming, start=1):
        known = by_id.get(label.incident_id)
        if known is not None and known != label:
            raise LabelsError(
                source,
                None,
                f"incident {label.incident_id!r} (label {number}) differs from the stored one "
                f"in {paths.labels}; give it a new incident_id",
            )
        by_id[label.incident_id] = label
    paths.labels.parent.mkdir(parents=True, exist_ok=True)
    merged = list(by_id.values())
    write_labels(merged, paths.labels)
    return merged

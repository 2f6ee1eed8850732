"""Labelled abuse incidents (incident-labels contract v1): model and JSONL file I/O.

`IncidentLabel` accepts exactly what ``shared/contracts/incident-labels.schema.json``
accepts (with the same documented divergences as the telemetry contract, see
`qabuse_dagster.telemetry.contract`), plus one rule the schema cannot express: ``end``
must be after ``start``, since an incident covers the half-open window ``[start, end)``
and an empty window would silently label nothing.

Example:
    >>> label = IncidentLabel.model_validate({
    ...     "incident_id": "inc-1", "kind": "key_leak",
    ...     "start": "2026-01-01T00:00:00Z", "end": "2026-01-01T06:00:00+02:00",
    ...     "api_key_ids": ["0123456789abcdef"],
    ... })
    >>> label_to_json(label)["end"]
    '2026-01-01T04:00:00.000000Z'
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from qabuse_dagster.telemetry.contract import (
    JSON_INPUT_CONTEXT,
    HexHash,
    Rfc3339Utc,
    errors_from_validation,
    format_rfc3339_utc,
    json_array,
    json_string,
    json_type_name,
    show_value,
)

__all__ = [
    "ANALYST_LABEL_PREFIXES",
    "BENIGN_LABEL_KIND",
    "BENIGN_LABEL_KINDS",
    "FALSE_POSITIVE_KIND",
    "FileLineError",
    "IncidentLabel",
    "LabelsError",
    "add_labels",
    "is_analyst_label",
    "label_to_json",
    "read_labels",
    "write_labels",
]

#: The ``kind`` of a label that says a window was legitimate use, not an incident: what
#: an upheld appeal writes. Evaluation reads such a label as confirmed benign.
BENIGN_LABEL_KIND = "benign_appeal"
#: The ``kind`` an analyst's "false positive" on the triage page writes.
FALSE_POSITIVE_KIND = "false_positive"
#: Kinds that say "legitimate use": evaluation counts their keys as benign, never as incidents.
BENIGN_LABEL_KINDS = frozenset({BENIGN_LABEL_KIND, FALSE_POSITIVE_KIND})
#: ``incident_id`` prefixes of labels people gave on alerts (triage, appeals): the
#: promotion gate reports a model's precision on them.
ANALYST_LABEL_PREFIXES = ("analyst-", "ledger-")


def is_analyst_label(label: IncidentLabel) -> bool:
    """A label a person gave on an alert: an analyst's verdict or an upheld appeal."""
    return label.kind in BENIGN_LABEL_KINDS or label.incident_id.startswith(ANALYST_LABEL_PREFIXES)


class FileLineError(ValueError):
    """A file that cannot be read, naming the file and the 1-based line at fault.

    Attributes:
        path: The file.
        line: The 1-based line number, or ``None`` when the problem is not on one line.
        detail: What is wrong.
    """

    def __init__(self, path: Path, line: int | None, detail: str) -> None:
        self.path = path
        self.line = line
        self.detail = detail
        super().__init__(path, line, detail)

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.detail}"


class LabelsError(FileLineError):
    """A labels file that cannot be read or written, naming the file and 1-based line."""


class IncidentLabel(BaseModel):
    """One labelled incident: the listed keys (or users) were abusive in ``[start, end)``.

    ``start`` and ``end`` are aware UTC datetimes. At least one of ``api_key_ids`` and
    ``users`` is set; ``None`` means the key is absent from the JSON (it may not be null).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    incident_id: Annotated[str, BeforeValidator(json_string(min_length=1, max_length=128))]
    kind: Annotated[str, BeforeValidator(json_string(min_length=1, max_length=64))]
    start: Rfc3339Utc
    end: Rfc3339Utc
    api_key_ids: Annotated[
        tuple[HexHash, ...] | None, BeforeValidator(json_array(min_items=1, optional=True))
    ] = None
    users: Annotated[
        tuple[HexHash, ...] | None, BeforeValidator(json_array(min_items=1, optional=True))
    ] = None
    notes: Annotated[str | None, BeforeValidator(json_string(max_length=2000, nullable=True))] = (
        None
    )

    @model_validator(mode="after")
    def _check_targets_and_window(self) -> Self:
        if self.api_key_ids is None and self.users is None:
            raise ValueError("needs api_key_ids or users (or both)")
        # Stricter than the schema, which cannot compare two fields.
        if self.end <= self.start:
            raise ValueError(
                f"end must be after start (got start {format_rfc3339_utc(self.start)}, "
                f"end {format_rfc3339_utc(self.end)})"
            )
        return self


def label_to_json(label: IncidentLabel) -> dict[str, Any]:
    """Convert a label to a JSON-ready dict that validates against the labels schema.

    Args:
        label: A validated label.

    Returns:
        The label's fields in schema order, timestamps as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``;
        ``api_key_ids``, ``users`` and ``notes`` are left out when ``None``.
    """
    out: dict[str, Any] = {
        "incident_id": label.incident_id,
        "kind": label.kind,
        "start": format_rfc3339_utc(label.start),
        "end": format_rfc3339_utc(label.end),
    }
    if label.api_key_ids is not None:
        out["api_key_ids"] = list(label.api_key_ids)
    if label.users is not None:
        out["users"] = list(label.users)
    if label.notes is not None:
        out["notes"] = label.notes
    return out


def _reject_constant(name: str) -> float:
    # NaN and Infinity are not JSON, though Python's json.loads takes them by default.
    raise ValueError(f"{name} is not valid JSON")


def _parse_line(path: Path, number: int, raw: bytes) -> IncidentLabel:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LabelsError(path, number, f"not valid UTF-8 ({exc.reason})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise LabelsError(path, number, f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise LabelsError(path, number, f"expected a JSON object, got {json_type_name(obj)}")
    try:
        return IncidentLabel.model_validate(obj, context=JSON_INPUT_CONTEXT)
    except ValidationError as exc:
        detail = "; ".join(f"{field}: {msg}" for field, msg in errors_from_validation(exc))
        raise LabelsError(path, number, detail) from None


def read_labels(path: Path) -> list[IncidentLabel]:
    """Read an incident-labels JSONL file.

    Blank lines are skipped; an empty file holds no incidents.

    Args:
        path: The JSONL file, one label object per line, UTF-8.

    Returns:
        The labels in file order.

    Raises:
        LabelsError: A line is not UTF-8 or not JSON, violates the labels contract, or
            repeats an earlier line's ``incident_id``; the message names the line.
        OSError: The file cannot be read.
    """
    path = Path(path)
    labels: list[IncidentLabel] = []
    first_line: dict[str, int] = {}
    # Split bytes on "\n" only: str.splitlines would also split on U+2028 and other
    # characters that JSON strings may contain unescaped.
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        label = _parse_line(path, number, raw)
        if label.incident_id in first_line:
            raise LabelsError(
                path,
                number,
                f"duplicate incident_id {show_value(label.incident_id)} "
                f"(first on line {first_line[label.incident_id]})",
            )
        first_line[label.incident_id] = number
        labels.append(label)
    return labels


def write_labels(labels: Iterable[IncidentLabel], path: Path) -> None:
    """Write labels as JSONL, atomically: readers see the old file or the new one, whole.

    Args:
        labels: The labels to write; their ``incident_id`` values must be distinct.
        path: The destination file; its directory must exist.

    Raises:
        LabelsError: Two labels share an ``incident_id`` (nothing is written).
        OSError: The file cannot be written (the old file, if any, is left as it was).
    """
    path = Path(path)
    lines: list[str] = []
    first_index: dict[str, int] = {}
    for index, label in enumerate(labels, start=1):
        if label.incident_id in first_index:
            raise LabelsError(
                path,
                None,
                f"duplicate incident_id {show_value(label.incident_id)} "
                f"(labels {first_index[label.incident_id]} and {index})",
            )
        first_index[label.incident_id] = index
        lines.append(json.dumps(label_to_json(label), ensure_ascii=False) + "\n")

    # The temporary file lives in the destination directory so os.replace is a rename
    # within one file system, which POSIX makes atomic.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as tmp:
            # mkstemp makes the file owner-only; keep the old file's mode, or the usual 0644.
            os.fchmod(tmp.fileno(), path.stat().st_mode & 0o777 if path.exists() else 0o644)
            tmp.writelines(lines)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def add_labels(labels: Iterable[IncidentLabel], path: Path) -> list[IncidentLabel]:
    """Add labels to a JSONL file (created with its folder when missing), atomically.

    A label whose ``incident_id`` the file holds already is not added twice: feedback
    given twice (a retried form, two analysts) is one label. Writers on one host are
    serialised by an advisory lock (``flock``) on a lock file beside it.

    Returns:
        The labels actually added.

    Raises:
        LabelsError: The existing file does not read (nothing is written).
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        existing = read_labels(path) if path.exists() else []
        known = {label.incident_id for label in existing}
        added = []
        for label in labels:
            if label.incident_id not in known:
                known.add(label.incident_id)
                added.append(label)
        if added:
            write_labels([*existing, *added], path)
    return added

"""Valid telemetry records for tests, as decoded JSON or as validated models."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qabuse_dagster.telemetry.contract import (
    TelemetryRecord,
    format_rfc3339_utc,
    validate_record,
)

HEX_USER = "1" * 64
HEX_KEY = "2" * 64
HEX_CODE = "3" * 64


def rfc3339(instant: datetime) -> str:
    # The contract's own formatter: strftime's %Y drops the zero padding of year 1 on Linux.
    return format_rfc3339_utc(instant.astimezone(UTC))


def record_dict(job_id: str, at: datetime, status: str = "submitted", **extra: Any) -> dict:
    """A valid contract record as decoded JSON; ``extra`` overrides or adds fields."""
    rec = {
        "schema_version": 1,
        "job_id": job_id,
        "timestamp": rfc3339(at),
        "user": HEX_USER,
        "api_key_id": HEX_KEY,
        "provider": "ibm_quantum",
        "backend": "ibm_torino",
        "sdk": "qiskit",
        "num_circuits": 1,
        "shots": 1024,
        "status": status,
        "client_agent": "qabuse-qiskit/0.1 qiskit/2.6.1",
        "code_hash": HEX_CODE,
    }
    rec.update(extra)
    return rec


def record(job_id: str, at: datetime, status: str = "submitted", **extra: Any) -> TelemetryRecord:
    """The same record, validated."""
    return validate_record(record_dict(job_id, at, status, **extra))


def key_users(telemetry_path: Path) -> dict[str, str]:
    """Each api key's user, from a JSONL telemetry file (the first record of the key)."""
    users: dict[str, str] = {}
    with telemetry_path.open() as lines:
        for line in lines:
            record = json.loads(line)
            users.setdefault(record["api_key_id"], record["user"])
    return users

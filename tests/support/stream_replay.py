"""A replay of the session twin's telemetry for the real-time path's tests.

The last day of the twin's busiest benign keys and, for its last half hour, the twin's
runaway CI. Every key, user and job id is renamed with a salt, so the session's online
rows stay as they were, and the timeline is moved a whole number of hours, to end between
two hours and an hour before now: a replay, whose watermark follows event time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa

from qabuse_dagster.features.streaming import StreamRecord
from qabuse_dagster.ingest.partitions import TELEMETRY_SCHEMA
from qabuse_dagster.telemetry.contract import format_rfc3339_utc

FLOOD_MINUTES = 30
HISTORY = timedelta(hours=26)


def renamed(value: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}:{value}".encode()).hexdigest()


@dataclass(frozen=True)
class Replay:
    """Records taken from the twin, renamed and moved; which keys flood and which do not."""

    records: list[dict[str, Any]]
    flood_key: str
    benign_keys: list[str]
    #: Where the minute-by-minute part starts.
    flood_start: datetime

    def table(self) -> pa.Table:
        rows = [
            {**r, "timestamp": datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00"))}
            for r in self.records
        ]
        names = list(StreamRecord._fields)
        schema = pa.schema([TELEMETRY_SCHEMA.field(n) for n in names])
        return pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows], schema=schema)


def replay_of(
    pipeline_run: Any, salt: str, *, benign: int = 3, after_onset: timedelta | None = None
) -> Replay:
    """The replay of the session twin (see the module docstring).

    Args:
        pipeline_run: The session's `PipelineRun`.
        salt: Renames keys, users and job ids, so that replays do not meet.
        benign: How many of the busiest benign keys come along.
        after_onset: None: the flood is the runaway's last `FLOOD_MINUTES`, without its
            history. Else the replay ends this long after the runaway's labelled onset,
            the runaway key's own history before it included: the flood starts at onset.
    """
    sim = pipeline_run.simulation
    (incident_key,) = sim.incident_api_key_ids
    with sim.telemetry_path.open() as lines:
        twin = [json.loads(line) for line in lines]
    if after_onset is None:
        end = max(_instant(r["timestamp"]) for r in twin)
        flood_start = format_rfc3339_utc(end - timedelta(minutes=FLOOD_MINUTES))
        incident_from = flood_start
    else:
        (label,) = [json.loads(line) for line in sim.labels_path.read_text().splitlines() if line]
        onset = _instant(label["start"])
        end = onset + after_onset
        flood_start = format_rfc3339_utc(onset)
        incident_from = format_rfc3339_utc(end - HISTORY)
    history_start = format_rfc3339_utc(end - HISTORY)
    until = format_rfc3339_utc(end)
    counts: dict[str, int] = {}
    for r in twin:
        if history_start <= r["timestamp"] < until and r["api_key_id"] != incident_key:
            counts[r["api_key_id"]] = counts.get(r["api_key_id"], 0) + 1
    quiet = sorted(counts, key=lambda k: (-counts[k], k))[:benign]
    # Whole hours: the replay keeps the twin's minutes within the hour (a feature counts
    # distinct clock hours), so its scores do not depend on when the test runs.
    shift = timedelta(hours=(datetime.now(UTC) - timedelta(hours=1) - end) // timedelta(hours=1))
    records = []
    for r in twin:
        key = r["api_key_id"]
        if r["timestamp"] >= until:
            continue
        wanted = (key in quiet and r["timestamp"] >= history_start) or (
            key == incident_key and r["timestamp"] >= incident_from
        )
        if wanted:
            at = _instant(r["timestamp"]) + shift
            records.append(
                {
                    **r,
                    "api_key_id": renamed(key, salt),
                    "user": renamed(r["user"], salt),
                    "job_id": f"{salt}-{r['job_id']}",
                    "timestamp": format_rfc3339_utc(at),
                }
            )
    records.sort(key=lambda r: r["timestamp"])
    return Replay(
        records,
        flood_key=renamed(incident_key, salt),
        benign_keys=[renamed(k, salt) for k in quiet],
        flood_start=_instant(flood_start) + shift,
    )


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def incident_slice(
    telemetry: Any, labels: Any, salt: str, *, onset_at: datetime, length: timedelta
) -> list[dict[str, Any]]:
    """One incident's records from its labelled start for ``length``, moved to ``onset_at``.

    Args:
        telemetry: A twin's ``telemetry.jsonl``.
        labels: Its ``incidents.jsonl``, holding one incident.
        salt: Renames keys, users and job ids.
        onset_at: Where the incident's start lands.
        length: How much of the incident to take.
    """
    (label,) = [json.loads(line) for line in Path(labels).read_text().splitlines() if line]
    start = _instant(label["start"])
    keys = set(label["api_key_ids"])
    shift = onset_at - start
    records = []
    with Path(telemetry).open() as lines:
        for line in lines:
            r = json.loads(line)
            at = _instant(r["timestamp"])
            if r["api_key_id"] in keys and start <= at < start + length:
                records.append(
                    {
                        **r,
                        "api_key_id": renamed(r["api_key_id"], salt),
                        "user": renamed(r["user"], salt),
                        "job_id": f"{salt}-{r['job_id']}",
                        "timestamp": format_rfc3339_utc(at + shift),
                    }
                )
    return sorted(records, key=lambda r: r["timestamp"])

"""Turn simulated jobs into contract telemetry records, written as JSON lines.

Each job becomes two lifecycle records with one ``job_id``: ``submitted`` when it was
sent and a terminal ``completed`` or ``failed`` record when it ended, carrying
``queue_time_s`` and ``runtime_s``. Files are written atomically (temporary file, then
rename), so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from qabuse_dagster.simulation.circuits import circuit_catalogue
from qabuse_dagster.simulation.jobs import JobBatch

__all__ = ["SCHEMA_VERSION", "write_telemetry"]

SCHEMA_VERSION = 1
_CHUNK_RECORDS = 10_000


@contextlib.contextmanager
def _atomic_text(path: Path) -> Iterator[IO[str]]:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="\n") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _rfc3339_utc(epoch_ms: np.ndarray) -> list[str]:
    # The contract module's canonical form (format_rfc3339_utc): six fractional digits, Z.
    text = np.datetime_as_string(epoch_ms.astype("datetime64[ms]"), unit="us")
    return [f"{t}Z" for t in text.tolist()]


def write_telemetry(
    jobs: JobBatch,
    path: Path,
    *,
    job_id_prefix: str,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Write two records per job to ``path``, sorted by timestamp.

    Jobs are numbered in submission order (``{job_id_prefix}{n:09d}``). Records with the
    same timestamp keep job order, and a job's ``submitted`` precedes its terminal
    record, so the output is a pure function of ``jobs``.

    Args:
        jobs: The simulated jobs, in any order.
        path: The JSONL file to (over)write.
        job_id_prefix: Prefix of every job id, e.g. ``job-42-``.
        on_progress: Called with the number of records written since the last call.

    Returns:
        The number of records written (twice the number of jobs).
    """
    jobs = jobs.take(np.argsort(jobs.submit_ms, kind="stable"))
    n = len(jobs)
    record_ms = np.concatenate([jobs.submit_ms, jobs.end_ms])
    job_of_record = np.concatenate([np.arange(n), np.arange(n)])
    is_terminal = np.repeat(np.array([False, True]), n)
    order = np.lexsort((is_terminal, job_of_record, record_ms))
    timestamps = _rfc3339_utc(record_ms[order])

    catalogue = circuit_catalogue()
    gate_counts_cache: dict[tuple[int, int], dict[str, int]] = {}

    def gate_counts(circuit: int, copies: int) -> dict[str, int]:
        key = (circuit, copies)
        if key not in gate_counts_cache:
            gate_counts_cache[key] = {
                name: count * copies for name, count in catalogue[circuit].gate_counts.items()
            }
        return gate_counts_cache[key]

    # Python lists: indexing them is several times faster than indexing numpy arrays.
    user = jobs.user.tolist()
    api_key_id = jobs.api_key_id.tolist()
    provider = jobs.provider.tolist()
    region = jobs.region.tolist()
    backend = jobs.backend.tolist()
    sdk = jobs.sdk.tolist()
    sdk_version = jobs.sdk_version.tolist()
    client_agent = jobs.client_agent.tolist()
    code_hash = jobs.code_hash.tolist()
    source_ip_hash = jobs.source_ip_hash.tolist()
    country = jobs.country.tolist()
    circuit = jobs.circuit.tolist()
    num_circuits = jobs.num_circuits.tolist()
    shots = jobs.shots.tolist()
    error_code = jobs.error_code.tolist()
    latency_ms = jobs.submit_latency_ms.tolist()
    queue_ms = jobs.queue_ms.tolist()
    runtime_ms = jobs.runtime_ms.tolist()

    dumps = json.JSONEncoder(separators=(",", ":")).encode
    with _atomic_text(path) as handle:
        lines: list[str] = []
        for k, (r, timestamp) in enumerate(zip(order.tolist(), timestamps, strict=True)):
            terminal = r >= n
            j = r - n if terminal else r
            stats = catalogue[circuit[j]]
            copies = num_circuits[j]
            if terminal:
                status = "failed" if error_code[j] is not None else "completed"
            else:
                status = "submitted"
            record: dict[str, Any] = {
                "schema_version": SCHEMA_VERSION,
                "job_id": f"{job_id_prefix}{j:09d}",
                "timestamp": timestamp,
                "user": user[j],
                "api_key_id": api_key_id[j],
                "provider": provider[j],
                "region": region[j],
                "backend": backend[j],
                "sdk": sdk[j],
                "sdk_version": sdk_version[j],
                "num_circuits": copies,
                "shots": shots[j],
                "num_qubits": stats.num_qubits,
                "depth": stats.depth,
                "gate_counts": gate_counts(circuit[j], copies),
                "two_qubit_gates": stats.two_qubit_gates * copies,
                "submit_latency_s": None if terminal else latency_ms[j] / 1000,
                "queue_time_s": queue_ms[j] / 1000 if terminal else None,
                "runtime_s": runtime_ms[j] / 1000 if terminal else None,
                "status": status,
                "error_code": error_code[j] if terminal else None,
                "retry_count": 0,
                "client_agent": client_agent[j],
                "code_hash": code_hash[j],
                "source_ip_hash": source_ip_hash[j],
                "country": country[j],
            }
            lines.append(dumps(record))
            if len(lines) == _CHUNK_RECORDS or k == 2 * n - 1:
                handle.write("\n".join(lines))
                handle.write("\n")
                if on_progress is not None:
                    on_progress(len(lines))
                lines = []
    return 2 * n

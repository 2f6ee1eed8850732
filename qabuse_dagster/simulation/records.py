"""Turn simulated jobs into contract telemetry records, written as JSON lines.

Each job becomes two lifecycle records with one ``job_id``: ``submitted`` when it was
sent and a terminal ``completed`` or ``failed`` record when it ended, carrying
``queue_time_s`` and ``runtime_s``. A job the API refused (``JobBatch.rejected``) is
one ``rejected`` record at its submission instant. Files are written atomically
(temporary file, then rename), so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

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
    until_ms: int | None = None,
) -> int:
    """Write two records per job (one per refused job) to ``path``, sorted by timestamp.

    Jobs are numbered in submission order (``{job_id_prefix}{n:09d}``). Records with the
    same timestamp keep job order, and a job's ``submitted`` precedes its terminal
    record, so the output is a pure function of ``jobs``.

    Args:
        jobs: The simulated jobs, in any order.
        path: The JSONL file to (over)write.
        job_id_prefix: Prefix of every job id, e.g. ``job-42-``.
        on_progress: Called with the number of records written since the last call.
        until_ms: When the telemetry ends: a job that ends at or after it is still in
            flight, so it has its ``submitted`` record and no terminal one.

    Returns:
        The number of records written: twice the number of jobs, less the refused ones
        and those still in flight.
    """
    jobs = jobs.take(np.argsort(jobs.submit_ms, kind="stable"))
    n = len(jobs)
    finished = ~jobs.rejected
    if until_ms is not None:
        finished &= jobs.end_ms < until_ms
    ran = np.flatnonzero(finished)
    n_records = n + len(ran)
    record_ms = np.concatenate([jobs.submit_ms, jobs.end_ms[ran]])
    job_of_record = np.concatenate([np.arange(n), ran])
    is_terminal = np.arange(n_records) >= n
    order = np.lexsort((is_terminal, job_of_record, record_ms))
    timestamps = _rfc3339_utc(record_ms[order])

    sdk_names = jobs.sdk.tolist()
    catalogues = {name: circuit_catalogue(name) for name in sorted(set(sdk_names))}
    dumps = json.JSONEncoder(separators=(",", ":")).encode

    # The records are built as text, in exactly the bytes ``dumps(record)`` would give
    # with the fields in contract order: the fields a job's two records share are
    # encoded once per job, and each distinct string once per file, which makes writing
    # several times faster than encoding a dict per record.
    def encoded(column: np.ndarray) -> list[str]:
        values = column.tolist()
        memo = {value: dumps(value) for value in set(values)}
        return [memo[value] for value in values]

    gate_counts_memo: dict[tuple[str, int, int], str] = {}

    def gate_counts(sdk_name: str, circuit: int, copies: int) -> str:
        key = (sdk_name, circuit, copies)
        if key not in gate_counts_memo:
            counts = catalogues[sdk_name][circuit].gate_counts.items()
            gate_counts_memo[key] = dumps({name: count * copies for name, count in counts})
        return gate_counts_memo[key]

    user, key, provider, region = (
        encoded(jobs.user),
        encoded(jobs.api_key_id),
        encoded(jobs.provider),
        encoded(jobs.region),
    )
    backend, sdk, sdk_version = encoded(jobs.backend), encoded(jobs.sdk), encoded(jobs.sdk_version)
    agent, code, network = (
        encoded(jobs.client_agent),
        encoded(jobs.code_hash),
        encoded(jobs.source_ip_hash),
    )
    country, shots = encoded(jobs.country), encoded(jobs.shots)
    circuit, copies = jobs.circuit.tolist(), jobs.num_circuits.tolist()
    retries = jobs.retry_count.tolist()

    def shared_fields(j: int) -> tuple[str, str]:
        """The fields before and after the timing fields, the same in both records."""
        stats = catalogues[sdk_names[j]][circuit[j]]
        before = (
            f'"user":{user[j]},"api_key_id":{key[j]},"provider":{provider[j]},'
            f'"region":{region[j]},"backend":{backend[j]},"sdk":{sdk[j]},'
            f'"sdk_version":{sdk_version[j]},"num_circuits":{copies[j]},"shots":{shots[j]},'
            f'"num_qubits":{stats.num_qubits},"depth":{stats.depth},'
            f'"gate_counts":{gate_counts(sdk_names[j], circuit[j], copies[j])},'
            f'"two_qubit_gates":{stats.two_qubit_gates * copies[j]}'
        )
        after = (
            f'"retry_count":{retries[j]},"client_agent":{agent[j]},"code_hash":{code[j]},'
            f'"source_ip_hash":{network[j]},"country":{country[j]}}}'
        )
        return before, after

    error_code = jobs.error_code.tolist()
    error_json = encoded(jobs.error_code)
    # Finite floats as json writes them (float.__repr__), from the same division.
    seconds = float.__repr__
    latency_ms = jobs.submit_latency_ms.tolist()
    queue_ms = jobs.queue_ms.tolist()
    runtime_ms = jobs.runtime_ms.tolist()
    rejected = jobs.rejected.tolist()
    job_index = job_of_record.tolist()
    head = f'{{"schema_version":{SCHEMA_VERSION},"job_id":{dumps(job_id_prefix)[:-1]}'

    # A job's shared fields wait here from its submitted record to its terminal one, so
    # memory follows the jobs in flight, not the whole file.
    in_flight: dict[int, tuple[str, str]] = {}
    with _atomic_text(path) as handle:
        lines: list[str] = []
        for k, (r, timestamp) in enumerate(zip(order.tolist(), timestamps, strict=True)):
            j = job_index[r]
            if r >= n:
                before, after = in_flight.pop(j)
                status = "failed" if error_code[j] is not None else "completed"
                timing = (
                    f'"submit_latency_s":null,"queue_time_s":{seconds(queue_ms[j] / 1000)},'
                    f'"runtime_s":{seconds(runtime_ms[j] / 1000)},"status":"{status}",'
                    f'"error_code":{error_json[j]}'
                )
            else:
                before, after = shared_fields(j)
                latency = seconds(latency_ms[j] / 1000)
                if rejected[j]:
                    timing = (
                        f'"submit_latency_s":{latency},"queue_time_s":null,'
                        f'"runtime_s":null,"status":"rejected","error_code":{error_json[j]}'
                    )
                else:
                    in_flight[j] = (before, after)
                    timing = (
                        f'"submit_latency_s":{latency},"queue_time_s":null,'
                        '"runtime_s":null,"status":"submitted","error_code":null'
                    )
            lines.append(f'{head}{j:09d}","timestamp":"{timestamp}",{before},{timing},{after}')
            if len(lines) == _CHUNK_RECORDS or k == n_records - 1:
                handle.write("\n".join(lines))
                handle.write("\n")
                if on_progress is not None:
                    on_progress(len(lines))
                lines = []
    return n_records

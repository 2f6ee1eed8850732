"""The instrumentation base: patching, the emitter's queue, sinks and the structure hash."""

from __future__ import annotations

import importlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from qabuse_dagster.telemetry.circuit_stats import CircuitStats
from qabuse_dagster.telemetry.contract import validate_record
from qabuse_dagster.telemetry.hashing import KeyedHasher
from qabuse_dagster.telemetry.instrument import (
    INSTRUMENTORS,
    Emitter,
    Instrumentor,
    instrument,
    structure_hash,
)
from qabuse_dagster.telemetry.sinks import JsonlSink, MemorySink

# The module itself (the package attribute of the same name is the function).
inst = importlib.import_module("qabuse_dagster.telemetry.instrument")
HASHER = KeyedHasher.demo()


class Device:
    """A stand-in for an SDK class with a submission method (not an SDK fake: a target)."""

    def run(self, circuit: list[tuple[str, tuple[int, ...]]], shots: int = 100) -> str:
        if shots < 0:
            raise ValueError("negative shots")
        return "result"


class Child(Device):
    pass


class DeviceInstrumentor(Instrumentor):
    sdk = "other"
    distribution = "numpy"
    supported = ((1,), (99,))

    def patch_points(self) -> list[tuple[object, str, Any]]:
        return [(Device, "run", self._wrap), (Child, "run", self._wrap)]

    def _wrap(self, original: Any) -> Any:
        instrumentor = self

        def run(device: Device, circuit: list[tuple[str, tuple[int, ...]]], shots: int = 100):
            with instrumentor.outermost() as outermost:
                if not outermost:  # Child.run reaches Device.run: one job
                    return original(device, circuit, shots)
                return record(device, circuit, shots)

        def record(device: Device, circuit: list[tuple[str, tuple[int, ...]]], shots: int):
            job_id = instrumentor.new_job_id()
            code = instrumentor.guard("hashing", lambda: instrumentor.code_hash([circuit]))
            try:
                result = original(device, circuit, shots)
            except Exception as exc:
                instrumentor.emit(
                    instrumentor.record(
                        job_id=job_id,
                        status="failed",
                        backend="device",
                        num_circuits=1,
                        shots=shots,
                        stats=None,
                        code_hash=code,
                        error_code=type(exc).__name__,
                    )
                )
                raise
            instrumentor.emit(
                instrumentor.record(
                    job_id=job_id,
                    status="submitted",
                    backend="device",
                    num_circuits=1,
                    shots=shots,
                    stats=None,
                    code_hash=code,
                )
            )
            return result

        return run


@pytest.fixture
def device_sdk(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setitem(INSTRUMENTORS, "device", f"{__name__}:DeviceInstrumentor")
    yield "device"
    active = inst._ACTIVE.get("device")
    if active is not None:
        active.uninstrument()


CIRCUIT = [("h", (0,)), ("cx", (0, 1))]


def test_instrument_patches_emits_valid_records_and_uninstrument_restores(device_sdk: str) -> None:
    original_run, child_has_run = Device.run, "run" in vars(Child)
    sink = MemorySink()

    handle = instrument(device_sdk, sink, user_id="alice", api_key_id="key-1", hasher=HASHER)
    assert Device().run(CIRCUIT) == "result" and Child().run(CIRCUIT) == "result"
    assert handle.flush()
    handle.uninstrument()
    Device().run(CIRCUIT)

    assert Device.run is original_run and ("run" in vars(Child)) == child_has_run
    assert len(sink.records) == 2
    for record in sink.records:
        validate_record(record)
    text = json.dumps(sink.records)
    assert "alice" not in text and "key-1" not in text
    assert sink.records[0]["client_agent"].startswith("qabuse-other/")
    handle.uninstrument()  # idempotent


def test_instrumenting_twice_returns_the_active_handle_and_patches_once(device_sdk: str) -> None:
    sink = MemorySink()
    first = instrument(device_sdk, sink, user_id="u", api_key_id="k", hasher=HASHER)
    second = instrument(device_sdk, MemorySink(), user_id="u", api_key_id="k", hasher=HASHER)

    Device().run(CIRCUIT)
    first.flush()

    assert second is first
    assert len(sink.records) == 1


def test_the_sdk_error_reaches_the_user_after_a_failed_record(device_sdk: str) -> None:
    sink = MemorySink()
    handle = instrument(device_sdk, sink, user_id="u", api_key_id="k", hasher=HASHER)

    with pytest.raises(ValueError, match="negative shots"):
        Device().run(CIRCUIT, shots=-1)
    handle.flush()

    assert [r["status"] for r in sink.records] == ["failed"]
    assert sink.records[0]["error_code"] == "ValueError"


def test_an_instrumentation_error_is_counted_and_the_call_goes_on(
    device_sdk: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = instrument(device_sdk, MemorySink(), user_id="u", api_key_id="k", hasher=HASHER)

    def broken(*args: object) -> str:
        raise RuntimeError("hash failure")

    monkeypatch.setattr(inst, "structure_hash", broken)
    assert Device().run(CIRCUIT) == "result"

    assert handle.stats["instrumentation_errors"] == 1


@pytest.mark.parametrize(
    ("sdk", "user", "key", "message"),
    [("braket", "u", "k", "expected one of"), ("device", "", "k", "non-empty")],
)
def test_bad_arguments_are_refused(
    device_sdk: str, sdk: str, user: str, key: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        instrument(sdk, MemorySink(), user_id=user, api_key_id=key, hasher=HASHER)


# --- the emitter -----------------------------------------------------------------------


class SlowSink(MemorySink):
    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    def write(self, records: list[dict[str, Any]]) -> None:
        self.gate.wait(5)
        super().write(records)


class FailingSink(MemorySink):
    def write(self, records: list[dict[str, Any]]) -> None:
        raise OSError("disk full")


def test_a_full_queue_drops_and_counts_without_blocking() -> None:
    gate = threading.Event()
    sink = SlowSink(gate)
    emitter = Emitter(sink, max_queue=10, batch=1)

    started = time.perf_counter()
    for i in range(1_000):
        emitter.emit({"i": i})
    elapsed = time.perf_counter() - started
    gate.set()
    assert emitter.stop()

    assert elapsed < 1.0  # never waited for the sink
    assert emitter.dropped > 900
    assert emitter.emitted + emitter.dropped == 1_000
    assert len(sink.records) == emitter.emitted


def test_a_failing_sink_is_counted_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    emitter = Emitter(FailingSink(), batch=10)
    for i in range(25):
        emitter.emit({"i": i})

    emitter.stop()

    assert emitter.sink_failures == 25
    assert caplog.text.count("telemetry sink failed") == 1  # once per run of failures


# --- sinks ---------------------------------------------------------------------------


def test_jsonl_sink_rotates_and_keeps_whole_lines(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "t" / "records.jsonl", max_bytes=2_000, backups=2)
    for batch in range(20):
        sink.write([{"batch": batch, "i": i, "pad": "x" * 50} for i in range(5)])
    sink.close()

    files = sorted((tmp_path / "t").iterdir())
    assert [f.name for f in files] == ["records.jsonl", "records.jsonl.1", "records.jsonl.2"]
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert all(f.stat().st_size <= 2_000 for f in files)
    assert {r["batch"] for r in lines} >= {17, 18, 19}  # the newest survive rotation
    with pytest.raises(ValueError):
        JsonlSink(tmp_path / "x.jsonl", max_bytes=0)


# --- the structure hash -----------------------------------------------------------------


def test_structure_hash_ignores_qubit_labels_but_not_structure() -> None:
    base = [[("h", ("q0",)), ("cx", ("q0", "q1")), ("rz", ("q1",))]]
    relabelled = [[("H", (7,)), ("cx", (7, 3)), ("rz", (3,))]]
    swapped_roles = [[("h", ("q1",)), ("cx", ("q1", "q0")), ("rz", ("q1",))]]
    other_order = [[("cx", ("q0", "q1")), ("h", ("q0",)), ("rz", ("q1",))]]

    h = structure_hash(HASHER, base)

    assert h == structure_hash(HASHER, relabelled)
    assert h != structure_hash(HASHER, swapped_roles)  # rz on the control, not the target
    assert h != structure_hash(HASHER, other_order)
    assert h != structure_hash(HASHER, base * 2)
    assert len(h) == 64 and h != structure_hash(KeyedHasher(b"another-key-of-16+bytes"), base)


def test_the_public_api_is_importable_from_the_package_without_any_sdk() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from qabuse_dagster.telemetry import instrument, JsonlSink, HttpSink; "
        "assert callable(instrument) and not isinstance(instrument, type(sys)); "
        "print(sorted(m for m in ('qiskit', 'cirq', 'pennylane') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("version", "expected"),
    [("2.6.2", (2, 6, 2)), ("1.7.0rc1", (1, 7, 0)), ("0.45.1+local", (0, 45, 1)), ("x", ())],
)
def test_release_parses_the_numeric_prefix(version: str, expected: tuple[int, ...]) -> None:
    assert inst._release(version) == expected


def test_deferred_records_are_built_on_the_emitter_thread_and_failures_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = MemorySink()
    emitter = Emitter(sink)
    threads: list[threading.Thread] = []

    def deferred() -> dict[str, Any]:
        threads.append(threading.current_thread())
        return {"n": 2}

    def broken() -> dict[str, Any]:
        raise RuntimeError("cannot build")

    memo = inst.Memo(lambda: [{"n": 3}, {"n": 4}])
    emitter.emit({"n": 1})
    emitter.emit(deferred)
    emitter.emit(broken)
    emitter.emit(broken)
    emitter.emit(memo.get)
    assert emitter.stop()

    assert sink.records == [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}]
    assert threads and threading.current_thread() not in threads
    assert (emitter.emitted, emitter.build_failures, emitter.dropped) == (5, 2, 0)
    assert caplog.text.count("building a deferred record failed") == 1


def test_a_memo_computes_once_and_keeps_its_error() -> None:
    calls: list[int] = []

    def compute() -> int:
        calls.append(1)
        return len(calls)

    memo = inst.Memo(compute)
    assert (memo.get(), memo.get(), calls) == (1, 1, [1])
    failing = inst.Memo(lambda: 1 // 0)
    for _ in range(2):
        with pytest.raises(ZeroDivisionError):
            failing.get()


def test_record_keeps_the_timestamp_it_is_given() -> None:
    handle = None
    try:
        inst.INSTRUMENTORS["device"] = f"{__name__}:DeviceInstrumentor"
        handle = instrument("device", MemorySink(), user_id="u", api_key_id="k", hasher=HASHER)
        at = Instrumentor.stamp(1_700_000_000.25)
        record = handle.instrumentor.record(
            job_id="j",
            status="submitted",
            backend="b",
            num_circuits=1,
            shots=None,
            stats=None,
            code_hash="c",
            timestamp=at,
        )
        assert record["timestamp"] == "2023-11-14T22:13:20.250000Z"
    finally:
        if handle is not None:
            handle.uninstrument()
        inst.INSTRUMENTORS.pop("device", None)


def test_a_structure_cache_keeps_values_by_key_bounded_and_never_a_failure() -> None:
    cache: inst.StructureCache[int] = inst.StructureCache(size=2)
    calls: list[str] = []

    def compute(value: int) -> Any:
        return lambda: calls.append(str(value)) or value

    assert cache.get("a", compute(1)) == 1
    assert cache.get("a", compute(99)) == 1  # known: not computed again
    assert cache.get(None, compute(2)) == 2
    assert cache.get(None, compute(3)) == 3  # no fingerprint: always computed
    cache.get("b", compute(4))
    cache.get("a", compute(99))  # "a" is now the most recently used
    cache.get("c", compute(5))  # evicts "b", the least recently used
    assert cache.get("b", compute(6)) == 6
    assert calls == ["1", "2", "3", "4", "5", "6"]
    assert (cache.hits, cache.misses) == (2, 6)

    def broken() -> int:
        raise RuntimeError("cannot compute")

    with pytest.raises(RuntimeError):
        cache.get("d", broken)
    assert cache.get("d", compute(7)) == 7


@pytest.mark.parametrize(
    "when",
    [
        Instrumentor.stamp(1_700_000_000.25),
        Instrumentor.stamp(1_700_000_000.0),  # no microseconds: still written, as zeros
        Instrumentor.stamp(-1.5),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC),  # strftime does not pad such a year
        datetime(2026, 3, 1, 0, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2026, 3, 1, 0, 30, 0, 7),
    ],
)
def test_a_record_timestamp_is_what_strftime_writes(when: datetime) -> None:
    assert inst._utc_text(when) == when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_a_record_lists_every_contract_field_in_the_contracts_order(device_sdk: str) -> None:
    handle = instrument(device_sdk, MemorySink(), user_id="u", api_key_id="k", hasher=HASHER)
    schema = json.loads(
        (Path(inst.__file__).parent / "schemas" / "telemetry-record.v1.schema.json").read_text()
    )
    stats = CircuitStats(2, 3, MappingProxyType({"cx": 1, "h": 1}), 1)
    first, second = (
        handle.instrumentor.record(
            job_id="j",
            status="failed",
            backend="b",
            num_circuits=1,
            shots=5,
            stats=stats,
            code_hash="0123456789abcdef",
            error_code="quota_exceeded",
            retry_count=2,
        )
        for _ in range(2)
    )
    assert list(first) == list(schema["properties"])
    assert (first["error_code"], first["retry_count"], first["gate_counts"]) == (
        "quota_exceeded",
        2,
        {"cx": 1, "h": 1},
    )
    first["gate_counts"]["cx"] = 99  # each record has its own counts
    assert second["gate_counts"] == {"cx": 1, "h": 1}
    validate_record(second)


def test_new_job_ids_are_random_uuid4s_as_uuid_writes_them() -> None:
    ids = [Instrumentor.new_job_id() for _ in range(1_000)]  # several pools
    assert len(set(ids)) == len(ids)
    for job_id in ids:
        assert job_id.startswith("qabuse-")
        value = uuid.UUID(hex=job_id.removeprefix("qabuse-"))
        assert (value.version, value.variant) == (4, uuid.RFC_4122)
        assert value.hex == job_id.removeprefix("qabuse-")
    pool = inst._RandomUuids(ids=2)
    for _ in range(50):
        chunk = os.urandom(16)
        pool._pool, pool._at = chunk, 0
        assert pool.next_hex() == uuid.UUID(bytes=chunk, version=4).hex


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_repeats_none_of_its_parents_job_ids() -> None:
    Instrumentor.new_job_id()  # the parent holds a pool, most of it unused
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id, then out without pytest's teardown
        try:
            os.write(write, Instrumentor.new_job_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read()
    os.waitpid(pid, 0)
    parents = {Instrumentor.new_job_id() for _ in range(64)}  # the rest of its pool, and more
    assert child.startswith("qabuse-") and child not in parents

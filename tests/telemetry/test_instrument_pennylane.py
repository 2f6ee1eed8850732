"""PennyLane instrumentation, on the real default.qubit and lightning.qubit simulators."""

from __future__ import annotations

import importlib
import json
import math
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pennylane as qml
import pytest
from pennylane import numpy as pnp
from pennylane.devices import DefaultQubit
from pennylane.tape import QuantumScript
from pennylane_lightning.lightning_qubit import LightningQubit

from qabuse_dagster.telemetry.circuit_stats import CircuitStats, pennylane_circuit_stats
from qabuse_dagster.telemetry.contract import validate_record
from qabuse_dagster.telemetry.hashing import KeyedHasher
from qabuse_dagster.telemetry.instrument import Handle, combine_stats, instrument
from qabuse_dagster.telemetry.sinks import MemorySink

inst = importlib.import_module("qabuse_dagster.telemetry.instrument")
instrumentor_module = importlib.import_module("qabuse_dagster.telemetry.instrumentors.pennylane")
METHODS = instrumentor_module.EXECUTION_METHODS

USER, KEY = "user-pl-7f3a9c", "key-pl-51be02"
# Distinctive parameter values: none may appear in a record.
ANGLE, OTHER_ANGLE, FIXED = 0.123456789, 0.987654321, 0.314159265


@pytest.fixture
def telemetry() -> Iterator[tuple[Handle, MemorySink]]:
    sink = MemorySink()
    handle = instrument("pennylane", sink, user_id=USER, api_key_id=KEY, hasher=KeyedHasher.demo())
    try:
        yield handle, sink
    finally:
        handle.uninstrument()


def ansatz(x: Any, wires: tuple[Any, Any] = (0, 1)) -> Any:
    qml.RX(x, wires[0])
    qml.CNOT(wires)
    qml.RY(FIXED, wires[1])
    return qml.expval(qml.Z(wires[1]))


def qnode(device: str, shots: int | None = None, diff_method: str = "best", **kwargs: Any) -> Any:
    return qml.set_shots(
        qml.QNode(ansatz, qml.device(device, **kwargs), diff_method=diff_method), shots
    )


def device_tapes(node: Any, *args: Any) -> list[QuantumScript]:
    """The tapes as the device receives them, after its own decomposition."""
    batch, _ = qml.workflow.construct_batch(node, level="device")(*args)
    return list(batch)


def jobs(handle: Handle, sink: MemorySink) -> dict[str, list[dict[str, Any]]]:
    """Records by job id, each validated, in the order they were emitted."""
    assert handle.flush()
    by_job: dict[str, list[dict[str, Any]]] = {}
    for record in sink.records:
        validate_record(record)
        by_job.setdefault(record["job_id"], []).append(record)
    return by_job


def assert_one_job_per_call(by_job: dict[str, list[dict[str, Any]]]) -> None:
    for records in by_job.values():
        assert [r["status"] for r in records] == ["submitted", "completed"]
        assert all(r["retry_count"] == 0 and r["error_code"] is None for r in records)
        assert records[0]["runtime_s"] is None and records[1]["runtime_s"] >= 0


def assert_stats(record: dict[str, Any], stats: CircuitStats | None) -> None:
    assert stats is not None
    assert record["num_qubits"] == stats.num_qubits
    assert record["depth"] == stats.depth
    assert record["gate_counts"] == dict(stats.gate_counts)
    assert record["two_qubit_gates"] == stats.two_qubit_gates


@pytest.mark.parametrize(
    ("device", "shots"),
    [("default.qubit", None), ("default.qubit", 1000), ("lightning.qubit", None)],
)
def test_a_qnode_call_is_one_job_with_the_tapes_figures(
    telemetry: tuple[Handle, MemorySink], device: str, shots: int | None
) -> None:
    handle, sink = telemetry
    node = qnode(device, shots, wires=2)

    node(ANGLE)

    (records,) = jobs(handle, sink).values()
    assert_one_job_per_call({"job": records})
    for record in records:
        assert record["backend"] == device
        assert record["num_circuits"] == 1
        assert record["shots"] == shots
        assert record["sdk"] == "pennylane" and record["provider"] == "local"
        assert record["client_agent"].startswith("qabuse-pennylane/")
        assert_stats(record, pennylane_circuit_stats(device_tapes(node, ANGLE)[0]))
    assert records[0]["gate_counts"] == {"cnot": 1, "rx": 1, "ry": 1}


def test_lightning_differentiating_itself_is_one_job(
    telemetry: tuple[Handle, MemorySink],
) -> None:
    handle, sink = telemetry
    dev = qml.device("lightning.qubit", wires=2)
    node = qml.QNode(ansatz, dev, diff_method="adjoint")

    qml.grad(node)(pnp.array(ANGLE, requires_grad=True))

    by_job = jobs(handle, sink)
    # Adjoint runs the tape and its derivatives in one execute_and_compute_derivatives call.
    # (qml.Tracker counts it twice: lightning.qubit stacks PennyLane's tracking wrapper twice.)
    assert len(by_job) == 1
    assert_one_job_per_call(by_job)
    assert next(iter(by_job.values()))[0]["backend"] == "lightning.qubit"


def test_a_batch_through_qml_execute_is_one_job_of_every_tape(
    telemetry: tuple[Handle, MemorySink],
) -> None:
    handle, sink = telemetry
    dev = qml.device("default.qubit", wires=3)
    tapes = [
        QuantumScript([qml.Hadamard(0), qml.CNOT([0, 1])], [qml.expval(qml.Z(1))]),
        QuantumScript([qml.RX(ANGLE, 0)], [qml.expval(qml.Z(0))]),
        QuantumScript([qml.CZ([0, 1]), qml.CNOT([1, 2]), qml.RZ(FIXED, 2)], [qml.probs()]),
    ]

    qml.execute(tapes, dev)

    (records,) = jobs(handle, sink).values()
    assert_one_job_per_call({"job": records})
    assert records[0]["num_circuits"] == 3
    assert records[0]["shots"] is None
    assert_stats(records[0], combine_stats([pennylane_circuit_stats(t) for t in tapes]))


def test_a_parameter_shift_gradient_is_one_job_per_device_batch(
    telemetry: tuple[Handle, MemorySink],
) -> None:
    handle, sink = telemetry
    dev = qml.device("default.qubit", wires=2, seed=7)
    node = qml.set_shots(qml.QNode(ansatz, dev, diff_method="parameter-shift"), 500)

    with qml.Tracker(dev) as tracker:
        qml.grad(node)(pnp.array(ANGLE, requires_grad=True))

    by_job = jobs(handle, sink)
    assert_one_job_per_call(by_job)
    # Forward pass, then the shifted tapes: each device batch is one job of its tapes.
    assert len(by_job) == tracker.totals["batches"] >= 2
    submitted = [records[0] for records in by_job.values()]
    assert sum(r["num_circuits"] for r in submitted) == tracker.totals["executions"]
    assert [r["num_circuits"] for r in submitted] == [1, 2]
    assert {r["shots"] for r in submitted} == {500}


def code_hash_of(handle: Handle, sink: MemorySink, run: Any) -> str:
    sink.records.clear()
    run()
    (records,) = jobs(handle, sink).values()
    assert records[0]["code_hash"] == records[1]["code_hash"]
    return str(records[0]["code_hash"])


def test_code_hash_ignores_parameters_and_wire_labels_but_not_structure(
    telemetry: tuple[Handle, MemorySink],
) -> None:
    handle, sink = telemetry
    dev = qml.device("default.qubit")

    def on(wires: tuple[Any, Any], body: Any = ansatz) -> Any:
        return qml.QNode(lambda x: body(x, wires), dev)

    def other(x: Any, wires: tuple[Any, Any]) -> Any:
        qml.RX(x, wires[0])
        qml.CZ(wires)
        return qml.expval(qml.Z(wires[1]))

    base = code_hash_of(handle, sink, lambda: on((0, 1))(ANGLE))
    assert code_hash_of(handle, sink, lambda: on((0, 1))(OTHER_ANGLE)) == base
    assert code_hash_of(handle, sink, lambda: on(("a", "b"))(ANGLE)) == base
    assert code_hash_of(handle, sink, lambda: on((5, 2))(OTHER_ANGLE)) == base
    assert code_hash_of(handle, sink, lambda: on((0, 1), other)(ANGLE)) != base


def test_no_identifier_or_parameter_value_leaves_in_a_record(
    telemetry: tuple[Handle, MemorySink],
) -> None:
    handle, sink = telemetry
    qnode("default.qubit", wires=2)(ANGLE)
    qnode("lightning.qubit", shots=100, wires=2)(OTHER_ANGLE)
    jobs(handle, sink)

    text = json.dumps(sink.records)
    assert len(sink.records) == 4
    for secret in (USER, KEY, repr(ANGLE), repr(OTHER_ANGLE), repr(FIXED)):
        assert secret not in text


def test_a_failing_execution_emits_failed_and_reraises(
    telemetry: tuple[Handle, MemorySink],
) -> None:
    handle, sink = telemetry
    dev = qml.device("default.qubit", wires=1)
    # Samples need shots: default.qubit refuses an analytic tape asking for them.
    tape = QuantumScript([qml.RX(ANGLE, 0)], [qml.sample(wires=0)])

    with pytest.raises(NotImplementedError):
        dev.execute([tape])

    (records,) = jobs(handle, sink).values()
    assert [r["status"] for r in records] == ["submitted", "failed"]
    assert records[1]["error_code"] == "not_implemented_error"
    assert records[1]["runtime_s"] >= 0
    assert_stats(records[1], pennylane_circuit_stats(tape))


def test_a_method_reaching_another_instrumented_one_is_one_job(
    telemetry: tuple[Handle, MemorySink],
) -> None:
    handle, sink = telemetry
    dev = qml.device("lightning.qubit", wires=2)
    tape = QuantumScript([qml.RX(ANGLE, 0), qml.CNOT([0, 1])], [qml.expval(qml.Z(1))])
    config = dev.setup_execution_config(qml.devices.ExecutionConfig(gradient_method="adjoint"))

    # Device.execute_and_compute_jvp runs self.execute (instrumented too), then
    # compute_jvp, which lightning.qubit does not implement.
    with pytest.raises(NotImplementedError):
        dev.execute_and_compute_jvp([tape], [(1.0,)], config)

    (records,) = jobs(handle, sink).values()
    assert [r["status"] for r in records] == ["submitted", "failed"]


def test_instrumenting_twice_returns_the_same_handle_and_records_once(
    telemetry: tuple[Handle, MemorySink],
) -> None:
    handle, sink = telemetry
    again = instrument(
        "pennylane", MemorySink(), user_id=USER, api_key_id=KEY, hasher=KeyedHasher.demo()
    )

    qnode("default.qubit", wires=2)(ANGLE)

    assert again is handle
    assert len(jobs(handle, sink)) == 1 and len(sink.records) == 2


def test_an_instrumentation_error_never_reaches_the_user(
    telemetry: tuple[Handle, MemorySink], monkeypatch: pytest.MonkeyPatch
) -> None:
    handle, sink = telemetry

    def broken(tape: QuantumScript) -> CircuitStats:
        raise RuntimeError("stats failure")

    monkeypatch.setattr(instrumentor_module, "pennylane_circuit_stats", broken)
    assert qnode("default.qubit", wires=2)(0.0) == pytest.approx(math.cos(FIXED))

    # The figures are computed on the emitter's thread: both records of the job fail to
    # build there, are counted and left out; the user's call saw nothing.
    assert jobs(handle, sink) == {}
    assert handle.stats["build_failures"] == 2
    assert handle.stats["instrumentation_errors"] == 0


def test_the_call_computes_no_figures_and_the_records_are_as_computed_eagerly(
    telemetry: tuple[Handle, MemorySink], monkeypatch: pytest.MonkeyPatch
) -> None:
    handle, sink = telemetry
    threads: list[threading.Thread] = []

    def spy_stats(tape: QuantumScript) -> CircuitStats:
        threads.append(threading.current_thread())
        return pennylane_circuit_stats(tape)

    def spy_hash(*args: Any) -> str:
        threads.append(threading.current_thread())
        return real_hash(*args)

    real_hash = inst.structure_hash
    monkeypatch.setattr(instrumentor_module, "pennylane_circuit_stats", spy_stats)
    monkeypatch.setattr(inst, "structure_hash", spy_hash)
    node = qnode("default.qubit", 100, wires=2)
    called = datetime.now(UTC)
    node(ANGLE)
    returned = datetime.now(UTC)
    time.sleep(0.01)  # records built later must still carry the call's instants

    (records,) = jobs(handle, sink).values()
    assert len(threads) == 2 and threading.current_thread() not in threads
    tapes = device_tapes(node, ANGLE)
    instrumentor = handle.instrumentor
    expected = instrumentor.record(
        job_id=records[0]["job_id"],
        status="submitted",
        backend="default.qubit",
        num_circuits=1,
        shots=100,
        stats=combine_stats([pennylane_circuit_stats(t) for t in tapes]),
        code_hash=instrumentor.code_hash(instrumentor_module._structure(t) for t in tapes),
    )
    volatile = ("timestamp", "runtime_s")
    for record, status in zip(records, ("submitted", "completed"), strict=True):
        assert {k: v for k, v in record.items() if k not in volatile} == {
            **{k: v for k, v in expected.items() if k not in volatile},
            "status": status,
        }
        stamped = datetime.strptime(record["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
        assert called <= stamped.replace(tzinfo=UTC) <= returned


def test_uninstrument_restores_the_devices_exactly() -> None:
    before = {
        (cls, name): vars(cls).get(name)
        for cls in (DefaultQubit, LightningQubit)
        for name in METHODS
    }
    sink = MemorySink()
    handle = instrument("pennylane", sink, user_id=USER, api_key_id=KEY, hasher=KeyedHasher.demo())
    try:
        assert DefaultQubit.execute is not before[(DefaultQubit, "execute")]
        qnode("default.qubit", wires=2)(ANGLE)
        assert handle.flush() and len(sink.records) == 2
    finally:
        handle.uninstrument()

    assert {(cls, name): vars(cls).get(name) for cls, name in before} == before
    assert "pennylane" not in inst._ACTIVE
    qnode("default.qubit", wires=2)(ANGLE)
    qnode("lightning.qubit", wires=2)(ANGLE)
    assert len(sink.records) == 2


def test_figures_are_computed_once_per_structure_and_differ_where_specs_differs(
    telemetry: tuple[Handle, MemorySink], monkeypatch: pytest.MonkeyPatch
) -> None:
    handle, sink = telemetry
    computed: list[int] = []

    def spy_stats(tape: QuantumScript) -> CircuitStats:
        computed.append(len(tape.operations))
        return pennylane_circuit_stats(tape)

    monkeypatch.setattr(instrumentor_module, "pennylane_circuit_stats", spy_stats)
    node = qnode("default.qubit", wires=2)
    node(ANGLE)
    assert handle.flush()
    node(OTHER_ANGLE)  # a loop step: same structure, other parameter
    # Same class, name and wires, but specs counts one as "C(MultiRZ)", the other as
    # "2C(MultiRZ)": the control split is part of the structure.
    one_control = qml.ctrl(qml.MultiRZ(FIXED, wires=[1, 2]), 0)
    two_controls = qml.ctrl(qml.MultiRZ(FIXED, wires=[2]), [0, 1])
    tapes = [
        QuantumScript([qml.Hadamard(0), op], [qml.probs(wires=[0, 1, 2])])
        for op in (one_control, two_controls)
    ]
    device = qml.device("default.qubit", wires=3)
    for tape in tapes:
        device.execute([tape])

    by_job = list(jobs(handle, sink).values())
    assert_one_job_per_call({str(i): records for i, records in enumerate(by_job)})
    assert len(computed) == 3  # the second QNode call's structure was already known
    assert handle.instrumentor.structures.hits == 1
    node_stats = pennylane_circuit_stats(device_tapes(node, OTHER_ANGLE)[0])
    assert_stats(by_job[1][0], node_stats)
    assert by_job[0][0]["code_hash"] == by_job[1][0]["code_hash"]
    for records, tape in zip(by_job[2:], tapes, strict=True):
        assert_stats(records[0], pennylane_circuit_stats(tape))
    assert by_job[2][0]["gate_counts"] != by_job[3][0]["gate_counts"]


def test_controlled_wires_are_read_in_their_two_parts_and_tell_tapes_apart(
    telemetry: tuple[Handle, MemorySink],
) -> None:
    handle, sink = telemetry
    reads = instrumentor_module._reads
    assert reads(qml.CNOT) == (False, True)  # Controlled.wires: control + target
    assert reads(qml.Hadamard) == (False, False)
    assert reads(qml.MultiControlledX) == (False, False)  # its own wires property
    assert reads(type(qml.ctrl(qml.MultiRZ(FIXED, wires=[1, 2]), 0))) == (True, True)

    class Counted(qml.resource.ResourcesOperation):
        num_wires = 1

        def resources(self) -> Any:
            raise NotImplementedError

    assert reads(Counted) is None

    def tape(*ops: Any) -> QuantumScript:
        return QuantumScript([qml.Hadamard(0), *ops], [qml.probs(wires=[0, 1, 2])])

    fingerprint = instrumentor_module._fingerprint
    tapes = [
        tape(qml.CNOT([0, 1])),
        tape(qml.CNOT([1, 0])),
        tape(qml.CNOT([0, 2])),
        tape(qml.ctrl(qml.RX(FIXED, 2), [0, 1])),
        tape(qml.ctrl(qml.RX(FIXED, 1), [0, 2])),
        tape(qml.ctrl(qml.MultiRZ(FIXED, wires=[1, 2]), 0)),
        tape(qml.ctrl(qml.MultiRZ(FIXED, wires=[2]), [0, 1])),
        tape(qml.MultiControlledX(wires=[0, 1, 2])),
    ]
    prints = [fingerprint(t) for t in tapes]
    assert len(set(prints)) == len(prints)
    assert fingerprint(tape(qml.CNOT([1, 0]))) == prints[1]

    device = qml.device("default.qubit", wires=3)
    for t in tapes:
        device.execute([t])
    by_job = list(jobs(handle, sink).values())
    assert_one_job_per_call({str(i): records for i, records in enumerate(by_job)})
    instrumentor = handle.instrumentor
    for records, t in zip(by_job, tapes, strict=True):
        assert_stats(records[0], pennylane_circuit_stats(t))
        expected_hash = instrumentor.code_hash([instrumentor_module._structure(t)])
        assert records[0]["code_hash"] == records[1]["code_hash"] == expected_hash

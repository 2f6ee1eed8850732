"""Circuit statistics per SDK: what the SDK itself reports, under names parameters never change."""

from __future__ import annotations

import subprocess
import sys

import cirq
import pennylane as qml
import pytest
from qiskit import QuantumCircuit
from qiskit.circuit import Gate

from qabuse_dagster.telemetry.circuit_stats import (
    CircuitStats,
    cirq_circuit_stats,
    cirq_gate_name,
    pennylane_circuit_stats,
    qiskit_circuit_stats,
)


def _assert_lower_case(stats: CircuitStats) -> None:
    assert stats.gate_counts, stats
    assert all(name == name.lower() for name in stats.gate_counts), stats
    assert list(stats.gate_counts) == sorted(stats.gate_counts)


# Qiskit


def _qiskit_circuit(angle: float, *, barrier: bool) -> QuantumCircuit:
    qc = QuantumCircuit(3)
    qc.h(0)
    qc.cx(0, 1)
    qc.rz(angle, 1)
    if barrier:
        qc.barrier()
    qc.cz(1, 2)
    qc.sx(2)
    qc.measure_all()
    return qc


def test_qiskit_stats_are_what_qiskit_reports_without_barriers() -> None:
    qc = _qiskit_circuit(0.3, barrier=True)
    stats = qiskit_circuit_stats(qc)
    reported = {name: count for name, count in qc.count_ops().items() if name != "barrier"}
    assert dict(stats.gate_counts) == reported
    assert stats.depth == qc.depth()
    assert stats.num_qubits == qc.num_qubits
    # Every gate here acts on one or two qubits, so the non-local ones are the two-qubit ones.
    assert stats.two_qubit_gates == qc.num_nonlocal_gates() == 2
    assert stats == qiskit_circuit_stats(_qiskit_circuit(0.3, barrier=False))
    _assert_lower_case(stats)


def test_qiskit_names_ignore_parameters_and_case() -> None:
    assert qiskit_circuit_stats(_qiskit_circuit(0.1, barrier=False)) == qiskit_circuit_stats(
        _qiskit_circuit(2.5, barrier=False)
    )
    qc = QuantumCircuit(2)
    qc.append(Gate("MyEntangler", 2, []), [0, 1])
    assert dict(qiskit_circuit_stats(qc).gate_counts) == {"myentangler": 1}


# Cirq


def _cirq_circuit(angle: float, exponent: float) -> cirq.Circuit:
    a, b, c = cirq.LineQubit.range(3)
    return cirq.Circuit(
        cirq.H(a),
        cirq.CNOT(a, b),
        cirq.rz(angle)(b),
        cirq.CZ(b, c) ** exponent,
        cirq.X(a),
        (cirq.X**exponent)(c),
        cirq.measure(a, b, c, key="m"),
    )


def test_cirq_stats_are_moments_and_operations_as_cirq_holds_them() -> None:
    circuit = _cirq_circuit(0.3, 0.5)
    stats = cirq_circuit_stats(circuit)
    operations = list(circuit.all_operations())
    assert stats.depth == len(circuit)
    assert stats.num_qubits == len(circuit.all_qubits())
    assert sum(stats.gate_counts.values()) == len(operations)
    # The three-qubit measurement is one operation and no two-qubit gate.
    assert stats.two_qubit_gates == sum(
        1 for op in operations if cirq.num_qubits(op) == 2 and not cirq.is_measurement(op)
    )
    assert dict(stats.gate_counts) == {"cx": 1, "cz": 1, "h": 1, "measurement": 1, "rz": 1, "x": 2}
    _assert_lower_case(stats)


def test_cirq_names_ignore_parameters() -> None:
    assert cirq_circuit_stats(_cirq_circuit(0.3, 0.5)) == cirq_circuit_stats(
        _cirq_circuit(1.7, 1.0)
    )
    q = cirq.LineQubit(0)
    phased = {
        cirq_gate_name(cirq.PhasedXZGate(x_exponent=x, z_exponent=z, axis_phase_exponent=p)(q))
        for x, z, p in [(0.1, 0.2, 0.3), (0.5, -0.25, 0.0), (1.0, 0.0, 0.75)]
    }
    assert phased == {"phasedxz"}
    # cirq.S and cirq.T are Z at exponents 1/2 and 1/4: one family.
    assert {cirq_gate_name(g(q)) for g in (cirq.Z, cirq.S, cirq.T, cirq.Z**0.1)} == {"z"}


def test_cirq_tags_classical_control_and_subcircuits_do_not_rename_or_hide_gates() -> None:
    a, b = cirq.LineQubit.range(2)
    assert cirq_gate_name(cirq.CZ(a, b).with_tags("calibrated")) == "cz"
    assert cirq_gate_name(cirq.X(a).with_classical_controls("m")) == "x"
    assert cirq_gate_name(cirq.reset(a)) == "reset"
    body = cirq.FrozenCircuit(cirq.H(a), cirq.CNOT(a, b))
    nested = cirq.Circuit(cirq.CircuitOperation(body, repetitions=2), cirq.measure(a, b, key="m"))
    unrolled = cirq.Circuit(*body.moments, *body.moments, cirq.measure(a, b, key="m"))
    assert cirq_circuit_stats(nested) == cirq_circuit_stats(unrolled)
    assert cirq_circuit_stats(nested).depth == len(unrolled)


# PennyLane


def _pennylane_tape(angle: float, *, barrier: bool) -> qml.tape.QuantumScript:
    ops = [
        qml.Hadamard(0),
        qml.CNOT([0, 1]),
        qml.RZ(angle, 1),
        *([qml.Barrier([0, 1, 2]), qml.Snapshot()] if barrier else []),
        qml.CZ([1, 2]),
        qml.RZ(angle / 2, 2),
    ]
    return qml.tape.QuantumScript(ops, [qml.counts(wires=[0, 1, 2])], shots=100)


def test_pennylane_stats_are_what_specs_reports_for_the_gates() -> None:
    tape = _pennylane_tape(0.3, barrier=False)
    stats = pennylane_circuit_stats(tape)
    resources = tape.specs["resources"]
    assert dict(stats.gate_counts) == {
        name.lower(): count for name, count in resources.gate_types.items()
    }
    assert dict(stats.gate_counts) == {"cnot": 1, "cz": 1, "hadamard": 1, "rz": 2}
    assert stats.depth == resources.depth == 5  # H, CNOT, RZ, CZ, RZ: one chain
    assert stats.num_qubits == len(tape.wires) == 3
    assert stats.two_qubit_gates == resources.gate_sizes[2] == 2
    _assert_lower_case(stats)


def test_pennylane_barriers_and_snapshots_are_not_gates() -> None:
    with_barrier = _pennylane_tape(0.3, barrier=True)
    # PennyLane itself counts them, and as layers.
    without = _pennylane_tape(0.3, barrier=False)
    assert with_barrier.specs["resources"].depth > without.specs["resources"].depth
    assert pennylane_circuit_stats(with_barrier) == pennylane_circuit_stats(without)


def test_pennylane_names_ignore_parameters_and_follow_op_names() -> None:
    assert pennylane_circuit_stats(_pennylane_tape(0.1, barrier=False)) == (
        pennylane_circuit_stats(_pennylane_tape(2.9, barrier=False))
    )

    def quantum_function(theta: float) -> None:
        qml.IsingZZ(theta, wires=[0, 1])
        qml.adjoint(qml.S(1))
        qml.ControlledPhaseShift(theta, wires=[1, 2])

    tape = qml.tape.make_qscript(quantum_function)(0.4)
    stats = pennylane_circuit_stats(tape)
    assert dict(stats.gate_counts) == {op.name.lower(): 1 for op in tape.operations}
    assert stats.two_qubit_gates == 2


def test_importing_the_module_imports_no_sdk_and_no_platform() -> None:
    forbidden = ("qiskit", "cirq", "pennylane", "dagster", "feast", "mlflow", "bentoml", "torch")
    code = (
        "import sys, qabuse_dagster.telemetry.circuit_stats\n"
        f"print(sorted(m for m in {forbidden!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_stats_are_frozen_and_read_only() -> None:
    for stats in (
        qiskit_circuit_stats(_qiskit_circuit(0.3, barrier=True)),
        cirq_circuit_stats(_cirq_circuit(0.3, 0.5)),
        pennylane_circuit_stats(_pennylane_tape(0.3, barrier=True)),
    ):
        with pytest.raises(TypeError):
            stats.gate_counts["cx"] = 0  # type: ignore[index]  # must fail
        with pytest.raises(AttributeError):
            stats.depth = 0  # type: ignore[misc]  # must fail

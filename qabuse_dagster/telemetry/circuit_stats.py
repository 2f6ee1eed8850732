"""Circuit statistics for a telemetry record, computed from a real circuit of each SDK.

A record's ``num_qubits``, ``depth``, ``gate_counts`` and ``two_qubit_gates`` describe the
circuit as its own SDK sees it: each function here reads them the way an instrumentor of
that SDK does, with the SDK's gate names, so the same algorithm reports ``cx`` from Qiskit,
``cz`` from Cirq and ``cnot`` from PennyLane. Across the three SDKs:

* Gate names are lower case and never carry parameter values: ``rz(0.1)`` and ``rz(0.2)``
  both count as ``rz``.
* Barriers (Qiskit ``barrier``, PennyLane ``Barrier`` and ``Snapshot``) are directives to a
  compiler, not gates: they are neither counted nor add to the depth.
* ``two_qubit_gates`` counts operations acting on exactly two qubits, measurements
  excluded.
* Counts are of operations, as the SDK holds them: a Qiskit ``measure`` is one qubit, a
  Cirq ``cirq.measure(a, b)`` one operation on two.

Each SDK is imported inside its function, so importing this module imports none of them.

Example:
    >>> from qiskit import QuantumCircuit
    >>> qc = QuantumCircuit(2)
    >>> _ = qc.h(0), qc.cx(0, 1), qc.measure_all()
    >>> stats = qiskit_circuit_stats(qc)
    >>> dict(stats.gate_counts), stats.depth, stats.two_qubit_gates
    ({'cx': 1, 'h': 1, 'measure': 2}, 3, 1)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import cirq
    from pennylane.tape import QuantumScript
    from qiskit import QuantumCircuit

__all__ = [
    "CircuitStats",
    "cirq_circuit_stats",
    "cirq_flatten",
    "cirq_gate_name",
    "pennylane_circuit_stats",
    "qiskit_circuit_stats",
]

# Class-name endings that say what kind of Cirq object it is, not which gate: XPowGate is
# the x family at any exponent, ResetChannel is reset.
_CIRQ_KIND_SUFFIXES = ("PowGate", "Gate", "Channel", "Operation")


@dataclass(frozen=True)
class CircuitStats:
    """What a telemetry record says about one circuit.

    Attributes:
        num_qubits: Width of the circuit, as the SDK counts it.
        depth: Layers of operations, barriers excluded (see each function).
        gate_counts: Lower-case gate name to count, sorted by name, barriers excluded
            (read-only).
        two_qubit_gates: Operations acting on exactly two qubits, measurements excluded.
    """

    num_qubits: int
    depth: int
    gate_counts: MappingProxyType[str, int]
    two_qubit_gates: int


def frozen_counts(names: Iterable[tuple[str, int]]) -> MappingProxyType[str, int]:
    """Sum counts by lower-cased name, sorted by name, read-only."""
    counts: dict[str, int] = {}
    for name, count in names:
        key = name.lower()
        counts[key] = counts.get(key, 0) + count
    return MappingProxyType(dict(sorted(counts.items())))


def qiskit_circuit_stats(circuit: QuantumCircuit) -> CircuitStats:
    """Statistics of a Qiskit circuit, as Qiskit reports them.

    Gate names are ``instruction.operation.name`` in lower case, as ``count_ops`` keys
    them (``cx``, ``rz``, ``sx``, ``measure``; a custom gate by the name it was given).
    Barriers are dropped, which ``count_ops`` does not do. A control-flow block counts as
    one operation of its own name (``if_else``), not as the gates inside it.

    Args:
        circuit: The circuit as submitted, usually after transpilation.

    Returns:
        ``num_qubits`` is ``circuit.num_qubits`` (idle qubits included), ``depth`` is
        ``circuit.depth()``, whose default already skips barriers.
    """
    names: list[tuple[str, int]] = []
    two_qubit = 0
    for instruction in circuit.data:
        name = instruction.operation.name
        if name == "barrier":
            continue
        names.append((name, 1))
        if len(instruction.qubits) == 2:
            two_qubit += 1
    return CircuitStats(
        num_qubits=circuit.num_qubits,
        depth=circuit.depth(),
        gate_counts=frozen_counts(names),
        two_qubit_gates=two_qubit,
    )


def cirq_gate_name(operation: cirq.Operation) -> str:
    """The name a Cirq operation is counted under: its gate's family, in lower case.

    Cirq keeps a gate's parameters in the gate object, not in its type, so the name is
    the gate's class with the ending that says what kind of class it is (``PowGate``,
    ``Gate``, ``Channel``) removed: ``cirq.CZ`` and ``cirq.CZ**0.5`` are both ``cz``,
    ``cirq.PhasedXZGate`` is ``phasedxz``, ``cirq.rz`` is ``rz``, ``cirq.measure`` is
    ``measurement`` and ``cirq.reset`` is ``reset``. ``cirq.S`` and ``cirq.T`` are
    ``ZPowGate``s in Cirq, so they count as ``z``. The Pauli singletons ``cirq.X``, ``cirq.Y``
    and ``cirq.Z`` belong to private subclasses of ``XPowGate`` and so on and are named after
    that public family, as ``cirq.X**0.5`` is. Tags are ignored; a classically controlled
    operation is named after the operation it controls; an operation without a gate after
    its own class, less an ``Operation`` ending.

    Args:
        operation: Any Cirq operation.

    Returns:
        The lower-case family name, e.g. ``cz`` or ``phasedxz``.

    Example:
        >>> import cirq
        >>> q = cirq.LineQubit.range(2)
        >>> [cirq_gate_name(op) for op in (cirq.CZ(*q) ** 0.5, cirq.X(q[0]), cirq.rz(0.3)(q[1]))]
        ['cz', 'x', 'rz']
    """
    import cirq

    operation = operation.untagged
    if isinstance(operation, cirq.ClassicallyControlledOperation):
        operation = operation.without_classical_controls().untagged
    kind: type = type(operation if operation.gate is None else operation.gate)
    if kind.__name__.startswith("_"):
        kind = next((c for c in kind.__mro__ if c.__name__.endswith("PowGate")), kind)
    name = kind.__name__.lstrip("_")
    for suffix in _CIRQ_KIND_SUFFIXES:
        if name.endswith(suffix) and name != suffix:
            name = name.removesuffix(suffix)
            break
    return name.lower()


def cirq_circuit_stats(circuit: cirq.AbstractCircuit) -> CircuitStats:
    """Statistics of a Cirq circuit, as Cirq structures it.

    Sub-circuits (``cirq.CircuitOperation``) are unrolled first, so their moments and
    operations count where they run. Gate names follow :func:`cirq_gate_name`.

    Args:
        circuit: The circuit as submitted, usually after
            ``cirq.optimize_for_target_gateset``.

    Returns:
        ``depth`` is the number of moments (``len(circuit)``, empty moments included: each
        is a time step on the device), ``num_qubits`` the number of qubits any operation
        touches, and each operation counts once however many qubits it acts on.
    """
    import cirq

    flat = cirq_flatten(circuit)
    names: list[tuple[str, int]] = []
    two_qubit = 0
    for operation in flat.all_operations():
        names.append((cirq_gate_name(operation), 1))
        if len(operation.qubits) == 2 and not cirq.is_measurement(operation):
            two_qubit += 1
    return CircuitStats(
        num_qubits=len(flat.all_qubits()),
        depth=len(flat),
        gate_counts=frozen_counts(names),
        two_qubit_gates=two_qubit,
    )


def cirq_flatten(circuit: cirq.AbstractCircuit) -> cirq.AbstractCircuit:
    """``circuit`` with its sub-circuits unrolled; itself when it has none (no copy)."""
    import cirq

    if not any(isinstance(op.untagged, cirq.CircuitOperation) for op in circuit.all_operations()):
        return circuit
    return cirq.unroll_circuit_op(circuit, deep=True, tags_to_check=None)


def pennylane_circuit_stats(tape: QuantumScript) -> CircuitStats:
    """Statistics of a PennyLane tape, as ``tape.specs`` reports them.

    A tape (``qml.tape.QuantumScript``) is what a PennyLane device executes: a QNode builds
    one per call, and ``qml.tape.make_qscript`` builds one from a quantum function. Gate
    names are the keys of ``specs["resources"].gate_types`` in lower case, which is
    ``op.name`` (``hadamard``, ``cnot``, ``rz``, ``controlledphaseshift``,
    ``adjoint(s)``), with a control count before a multi-controlled operation (``2c(rx)``).
    Terminal measurements (``qml.counts``, ``qml.expval``) are measurement processes, not
    operations, so they are not counted; a mid-circuit ``qml.measure`` is, as
    ``midmeasuremp``. ``Barrier`` and ``Snapshot`` are dropped before counting, since
    ``specs`` counts them as gates and layers.

    Args:
        tape: The tape as executed, usually after the device's decomposition.

    Returns:
        ``num_qubits`` is the number of wires the tape uses (barriers' wires included),
        ``depth`` the specs depth of the tape without barriers, ``two_qubit_gates`` the
        specs gate count of size two.
    """
    import pennylane as qml

    gates = [op for op in tape.operations if not isinstance(op, qml.Barrier | qml.Snapshot)]
    resources = tape.copy(operations=gates).specs["resources"]
    return CircuitStats(
        num_qubits=len(tape.wires),
        depth=int(resources.depth),
        gate_counts=frozen_counts(resources.gate_types.items()),
        two_qubit_gates=int(resources.gate_sizes.get(2, 0)),
    )

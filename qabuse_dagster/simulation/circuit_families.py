"""The circuit families behind the catalogue, built natively in each SDK and measured.

A handful of circuit families (GHZ, QFT, a hardware-efficient ansatz, a QAOA ring, random
circuits) are built at a few sizes in each SDK a simulated tenant uses, natively with that
SDK's own gates, and compiled the way its users' jobs are:

* Qiskit: transpiled to the basis of IBM's devices (:data:`BASIS_GATES`), fixed seed.
* Cirq: compiled with ``cirq.optimize_for_target_gateset`` to ``cirq.CZTargetGateset``
  (CZ, PhasedXZ and measurement), the gate set of Google's devices, then laid out as one
  PhasedXZ per qubit between its CZs: which of Cirq's single-qubit gates survive depends on
  the CPU's BLAS kernel, the CZs do not (see :func:`_in_single_qubit_layers`).
* PennyLane: a tape whose templates (``qml.QFT``, ``qml.RandomLayers``) are expanded by
  ``qml.transforms.decompose`` into PennyLane's own gates (``Hadamard``, ``CNOT``,
  ``ControlledPhaseShift``...). PennyLane has no device-independent compiler to a hardware
  gate set (its graph decomposition to one warns, falls back and adds ``GlobalPhase``
  gates), and a device decomposes a tape further only when it runs it.

The statistics of each circuit are read by :mod:`qabuse_dagster.telemetry.circuit_stats`,
as that SDK's instrumentor reads them, so a simulated record carries the gate names a real
one would. GHZ, QFT, the ansatz and the QAOA ring are the same circuits in every SDK,
angles included; a random circuit is drawn by each SDK's own generator (Qiskit's
``random_circuit``, Cirq's ``cirq.testing.random_circuit``, PennyLane's
``qml.RandomLayers``) from the same seed.

Building takes seconds (Cirq's QFT decompositions most), so the result is shipped with the
package (:data:`~qabuse_dagster.simulation.circuits.CATALOGUE_FILE`) and the twin never
imports an SDK; a test rebuilds it and compares. After changing a family, regenerate it:

    python -m qabuse_dagster.simulation.circuit_families
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qiskit import QuantumCircuit, transpile
from qiskit.circuit.library import QFTGate
from qiskit.circuit.random import random_circuit

from qabuse_dagster.simulation.circuits import (
    BASIS_GATES,
    CATALOGUE_FILE,
    CATALOGUE_SDKS,
    CATALOGUE_SIZES,
    FAMILIES,
    CatalogueEntry,
)
from qabuse_dagster.telemetry.circuit_stats import (
    CircuitStats,
    cirq_circuit_stats,
    pennylane_circuit_stats,
    qiskit_circuit_stats,
)

if TYPE_CHECKING:
    import cirq
    import pennylane as qml

logger = logging.getLogger(__name__)

# Fixed seeds: the catalogue, and so every simulated record, must not change between runs.
_TRANSPILE_SEED = 20261102
_PARAMETER_SEED = 7
_RANDOM_CIRCUIT_SEED = 1234
_ANSATZ_LAYERS = 3
_QAOA_LAYERS = 2
_RANDOM_DEPTH = 8


def _ansatz_angles(n: int) -> list[list[float]]:
    """The ansatz's RY angles, one row per rotation layer (the last one closes it)."""
    rng = np.random.default_rng(_PARAMETER_SEED + n)
    return [
        [float(rng.uniform(0.1, np.pi - 0.1)) for _ in range(n)] for _ in range(_ANSATZ_LAYERS + 1)
    ]


def _qaoa_angles(n: int) -> list[tuple[float, float]]:
    """The QAOA ring's (gamma, beta) per layer."""
    rng = np.random.default_rng(_PARAMETER_SEED + 100 + n)
    return [
        (float(rng.uniform(0.1, np.pi - 0.1)), float(rng.uniform(0.1, np.pi / 2 - 0.1)))
        for _ in range(_QAOA_LAYERS)
    ]


def _ghz(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n, name=f"ghz_{n}")
    qc.h(0)
    for q in range(n - 1):
        qc.cx(q, q + 1)
    qc.measure_all()
    return qc


def _qft(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n, name=f"qft_{n}")
    qc.h(range(n))
    qc.append(QFTGate(n), range(n))
    qc.measure_all()
    return qc


def _hardware_efficient_ansatz(n: int) -> QuantumCircuit:
    *layers, closing = _ansatz_angles(n)
    qc = QuantumCircuit(n, name=f"hea_{n}")
    for angles in layers:
        for q, angle in enumerate(angles):
            qc.ry(angle, q)
        for q in range(n - 1):
            qc.cx(q, q + 1)
    for q, angle in enumerate(closing):
        qc.ry(angle, q)
    qc.measure_all()
    return qc


def _qaoa_ring(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n, name=f"qaoa_ring_{n}")
    qc.h(range(n))
    for gamma, beta in _qaoa_angles(n):
        for q in range(n):
            qc.rzz(gamma, q, (q + 1) % n)
        for q in range(n):
            qc.rx(2 * beta, q)
    qc.measure_all()
    return qc


def _random(n: int) -> QuantumCircuit:
    return random_circuit(
        n, _RANDOM_DEPTH, max_operands=2, measure=True, seed=_RANDOM_CIRCUIT_SEED + n
    )


_QISKIT_BUILDERS: dict[str, Callable[[int], QuantumCircuit]] = {
    "ghz": _ghz,
    "qft": _qft,
    "hea": _hardware_efficient_ansatz,
    "qaoa_ring": _qaoa_ring,
    "random": _random,
}


def _qiskit_catalogue() -> list[CircuitStats]:
    circuits = [_QISKIT_BUILDERS[family](n) for family in FAMILIES for n in CATALOGUE_SIZES]
    # No coupling map: routing would depend on a device and cost seconds; the basis
    # change alone gives realistic gate mixes and depths.
    transpiled = transpile(
        circuits,
        basis_gates=list(BASIS_GATES),
        optimization_level=1,
        seed_transpiler=_TRANSPILE_SEED,
    )
    return [qiskit_circuit_stats(qc) for qc in transpiled]


def _cirq_ghz(n: int) -> cirq.Circuit:
    import cirq

    q = cirq.LineQubit.range(n)
    return cirq.Circuit(
        cirq.H(q[0]),
        [cirq.CNOT(a, b) for a, b in itertools.pairwise(q)],
        cirq.measure(*q, key="m"),
    )


def _cirq_qft(n: int) -> cirq.Circuit:
    import cirq

    q = cirq.LineQubit.range(n)
    return cirq.Circuit(cirq.H.on_each(q), cirq.qft(*q), cirq.measure(*q, key="m"))


def _cirq_hardware_efficient_ansatz(n: int) -> cirq.Circuit:
    import cirq

    q = cirq.LineQubit.range(n)
    *layers, closing = _ansatz_angles(n)
    circuit = cirq.Circuit()
    for angles in layers:
        circuit.append(cirq.ry(angle)(qubit) for qubit, angle in zip(q, angles, strict=True))
        circuit.append(cirq.CNOT(a, b) for a, b in itertools.pairwise(q))
    circuit.append(cirq.ry(angle)(qubit) for qubit, angle in zip(q, closing, strict=True))
    circuit.append(cirq.measure(*q, key="m"))
    return circuit


def _cirq_qaoa_ring(n: int) -> cirq.Circuit:
    import cirq

    q = cirq.LineQubit.range(n)
    circuit = cirq.Circuit(cirq.H.on_each(q))
    for gamma, beta in _qaoa_angles(n):
        # ZZ**t is exp(-i pi t ZZ / 2) up to a global phase: Qiskit's rzz(gamma) at gamma / pi.
        circuit.append(cirq.ZZ(q[i], q[(i + 1) % n]) ** (gamma / np.pi) for i in range(n))
        circuit.append(cirq.rx(2 * beta).on_each(q))
    circuit.append(cirq.measure(*q, key="m"))
    return circuit


def _cirq_random(n: int) -> cirq.Circuit:
    import cirq

    q = cirq.LineQubit.range(n)
    # op_density 1: every moment is filled, as in Qiskit's random_circuit.
    circuit = cirq.testing.random_circuit(
        q, n_moments=_RANDOM_DEPTH, op_density=1.0, random_state=_RANDOM_CIRCUIT_SEED + n
    )
    circuit.append(cirq.measure(*q, key="m"))
    return circuit


_CIRQ_BUILDERS: dict[str, Callable[[int], cirq.Circuit]] = {
    "ghz": _cirq_ghz,
    "qft": _cirq_qft,
    "hea": _cirq_hardware_efficient_ansatz,
    "qaoa_ring": _cirq_qaoa_ring,
    "random": _cirq_random,
}


def _cirq_compiled(circuit: cirq.AbstractCircuit) -> cirq.Circuit:
    """``circuit`` compiled to Google's CZ gate set, one PhasedXZ layer between CZs."""
    import cirq

    compiled = cirq.optimize_for_target_gateset(circuit, gateset=cirq.CZTargetGateset())
    return _in_single_qubit_layers(compiled)


def _in_single_qubit_layers(circuit: cirq.AbstractCircuit) -> cirq.Circuit:
    """``circuit`` with each qubit's single-qubit gates between two other operations merged.

    ``cirq.optimize_for_target_gateset`` rewrites each two-qubit block by a KAK decomposition.
    For the blocks these families are made of (CNOT, a partial CZ or ZZ, SWAP, iSWAP) its
    single-qubit gates are not unique: they come from eigenvectors of a repeated eigenvalue,
    so the ones it returns follow the last bits of the BLAS kernel the CPU selects. Which
    layers then merge to the identity, or to a Z that the measurement absorbs, and are
    dropped, differs from one CPU to another (a GHZ on 3 qubits has 6 or 7 PhasedXZ), while
    the CZs do not. So every layer is kept, one ``PhasedXZ`` per qubit before, between and
    after its CZs, identity or not, and the circuit is rebuilt with each operation as early
    as it goes: its statistics then depend on the CZs alone.
    """
    import cirq

    identity = np.eye(2, dtype=complex)
    # The product of each qubit's single-qubit gates since its last other operation; every
    # operation but a measurement opens a layer after it.
    open_layers: dict[cirq.Qid, np.ndarray] = {}
    operations: list[cirq.Operation] = []

    def close_layer(qubit: cirq.Qid) -> None:
        layer = open_layers.pop(qubit, identity)
        operations.append(cirq.PhasedXZGate.from_matrix(layer).on(qubit))

    for operation in circuit.all_operations():
        if cirq.num_qubits(operation) == 1 and cirq.has_unitary(operation):
            (qubit,) = operation.qubits
            open_layers[qubit] = cirq.unitary(operation) @ open_layers.get(qubit, identity)
            continue
        for qubit in operation.qubits:
            close_layer(qubit)
        operations.append(operation)
        if not cirq.is_measurement(operation):
            open_layers.update(dict.fromkeys(operation.qubits, identity))
    for qubit in list(open_layers):
        close_layer(qubit)
    return cirq.Circuit(operations)


def _cirq_catalogue() -> list[CircuitStats]:
    return [
        cirq_circuit_stats(_cirq_compiled(_CIRQ_BUILDERS[family](n)))
        for family in FAMILIES
        for n in CATALOGUE_SIZES
    ]


def _pennylane_ghz(n: int) -> list[qml.operation.Operator]:
    import pennylane as qml

    return [qml.Hadamard(0), *(qml.CNOT([q, q + 1]) for q in range(n - 1))]


def _pennylane_qft(n: int) -> list[qml.operation.Operator]:
    import pennylane as qml

    return [*(qml.Hadamard(q) for q in range(n)), qml.QFT(wires=range(n))]


def _pennylane_hardware_efficient_ansatz(n: int) -> list[qml.operation.Operator]:
    import pennylane as qml

    *layers, closing = _ansatz_angles(n)
    ops: list[qml.operation.Operator] = []
    for angles in layers:
        ops.extend(qml.RY(angle, q) for q, angle in enumerate(angles))
        ops.extend(qml.CNOT([q, q + 1]) for q in range(n - 1))
    ops.extend(qml.RY(angle, q) for q, angle in enumerate(closing))
    return ops


def _pennylane_qaoa_ring(n: int) -> list[qml.operation.Operator]:
    import pennylane as qml

    ops: list[qml.operation.Operator] = [qml.Hadamard(q) for q in range(n)]
    for gamma, beta in _qaoa_angles(n):
        ops.extend(qml.IsingZZ(gamma, [q, (q + 1) % n]) for q in range(n))
        ops.extend(qml.RX(2 * beta, q) for q in range(n))
    return ops


def _pennylane_random(n: int) -> list[qml.operation.Operator]:
    import pennylane as qml

    rng = np.random.default_rng(_RANDOM_CIRCUIT_SEED + n)
    # One rotation slot per qubit per layer, as many layers as Qiskit's random circuits.
    weights = rng.uniform(0.0, 2 * np.pi, size=(_RANDOM_DEPTH, n))
    return [qml.RandomLayers(weights, wires=range(n), seed=_RANDOM_CIRCUIT_SEED + n)]


_PENNYLANE_BUILDERS: dict[str, Callable[[int], list[qml.operation.Operator]]] = {
    "ghz": _pennylane_ghz,
    "qft": _pennylane_qft,
    "hea": _pennylane_hardware_efficient_ansatz,
    "qaoa_ring": _pennylane_qaoa_ring,
    "random": _pennylane_random,
}


def _pennylane_catalogue() -> list[CircuitStats]:
    import pennylane as qml

    stats = []
    for family in FAMILIES:
        for n in CATALOGUE_SIZES:
            sampled = qml.tape.QuantumScript(
                _PENNYLANE_BUILDERS[family](n), [qml.counts(wires=range(n))]
            )
            (decomposed,), _ = qml.transforms.decompose(sampled)
            stats.append(pennylane_circuit_stats(decomposed))
    return stats


_CATALOGUE_BUILDERS: dict[str, Callable[[], list[CircuitStats]]] = {
    "qiskit": _qiskit_catalogue,
    "cirq": _cirq_catalogue,
    "pennylane": _pennylane_catalogue,
}


def build_catalogue(sdk: str) -> tuple[CatalogueEntry, ...]:
    """Build, compile and measure every catalogue circuit of ``sdk`` (seconds).

    Returns:
        One entry per (family, size), ordered by ``FAMILIES`` then ``CATALOGUE_SIZES``.

    Raises:
        ValueError: If ``sdk`` has no catalogue.
    """
    if sdk not in _CATALOGUE_BUILDERS:
        raise ValueError(f"no circuit catalogue for sdk {sdk!r}; known: {CATALOGUE_SDKS}")
    started = time.perf_counter()
    stats = _CATALOGUE_BUILDERS[sdk]()
    families = [family for family in FAMILIES for _ in CATALOGUE_SIZES]
    catalogue = tuple(
        CatalogueEntry(
            family=family,
            num_qubits=s.num_qubits,
            depth=s.depth,
            gate_counts=s.gate_counts,
            two_qubit_gates=s.two_qubit_gates,
        )
        for family, s in zip(families, stats, strict=True)
    )
    logger.debug(
        "built the %s circuit catalogue of %d circuits in %.2f s",
        sdk,
        len(catalogue),
        time.perf_counter() - started,
    )
    return catalogue


def write_catalogue_file(path: Path = CATALOGUE_FILE) -> Path:
    """Build every SDK's catalogue and write them as the JSON the twin reads."""
    data = {
        sdk: [
            {
                "family": e.family,
                "num_qubits": e.num_qubits,
                "depth": e.depth,
                "gate_counts": dict(e.gate_counts),
                "two_qubit_gates": e.two_qubit_gates,
            }
            for e in build_catalogue(sdk)
        ]
        for sdk in CATALOGUE_SDKS
    }
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)  # the SDKs' own INFO logs are noise here
    logger.setLevel(logging.INFO)
    logger.info("wrote %s", write_catalogue_file())

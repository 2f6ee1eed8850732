"""Catalogue of real circuit shapes, so simulated jobs carry believable circuit statistics.

A handful of circuit families (GHZ, QFT, a hardware-efficient ansatz, a QAOA ring, random
circuits) are built once with Qiskit at a few sizes and transpiled to an IBM-like basis
with a fixed seed. The simulator samples job statistics (qubits, depth, gate counts,
two-qubit gates) from this catalogue instead of inventing numbers.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from qiskit import QuantumCircuit, transpile
from qiskit.circuit.library import QFTGate
from qiskit.circuit.random import random_circuit

__all__ = [
    "BASIS_GATES",
    "CATALOGUE_SIZES",
    "FAMILIES",
    "CircuitStats",
    "circuit_catalogue",
    "select_circuits",
]

logger = logging.getLogger(__name__)

#: Basis the catalogue is transpiled to: the native gates of IBM's Eagle/Heron devices.
BASIS_GATES: tuple[str, ...] = ("rz", "sx", "x", "cx")
#: Qubit counts each family is built at.
CATALOGUE_SIZES: tuple[int, ...] = (3, 5, 8, 12, 16, 20)
#: Circuit families in the catalogue.
FAMILIES: tuple[str, ...] = ("ghz", "qft", "hea", "qaoa_ring", "random")

# Fixed seeds: the catalogue, and so every simulated record, must not change between runs.
_TRANSPILE_SEED = 20261102
_PARAMETER_SEED = 7
_RANDOM_CIRCUIT_SEED = 1234
_ANSATZ_LAYERS = 3
_QAOA_LAYERS = 2
_RANDOM_DEPTH = 8


@dataclass(frozen=True)
class CircuitStats:
    """The metadata a telemetry record carries about one transpiled circuit.

    Attributes:
        family: Which family it was built from, e.g. ``ghz``.
        num_qubits: Width of the circuit.
        depth: Depth after transpilation, barriers excluded.
        gate_counts: Lower-case gate name to count, barriers excluded (read-only).
        two_qubit_gates: Number of operations acting on two qubits.
    """

    family: str
    num_qubits: int
    depth: int
    gate_counts: MappingProxyType[str, int]
    two_qubit_gates: int


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
    rng = np.random.default_rng(_PARAMETER_SEED + n)
    qc = QuantumCircuit(n, name=f"hea_{n}")
    for _ in range(_ANSATZ_LAYERS):
        for q in range(n):
            qc.ry(float(rng.uniform(0.1, np.pi - 0.1)), q)
        for q in range(n - 1):
            qc.cx(q, q + 1)
    for q in range(n):
        qc.ry(float(rng.uniform(0.1, np.pi - 0.1)), q)
    qc.measure_all()
    return qc


def _qaoa_ring(n: int) -> QuantumCircuit:
    rng = np.random.default_rng(_PARAMETER_SEED + 100 + n)
    qc = QuantumCircuit(n, name=f"qaoa_ring_{n}")
    qc.h(range(n))
    for _ in range(_QAOA_LAYERS):
        gamma = float(rng.uniform(0.1, np.pi - 0.1))
        beta = float(rng.uniform(0.1, np.pi / 2 - 0.1))
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


_BUILDERS: dict[str, Callable[[int], QuantumCircuit]] = {
    "ghz": _ghz,
    "qft": _qft,
    "hea": _hardware_efficient_ansatz,
    "qaoa_ring": _qaoa_ring,
    "random": _random,
}


def _stats(family: str, circuit: QuantumCircuit) -> CircuitStats:
    counts: dict[str, int] = {}
    two_qubit = 0
    for instruction in circuit.data:
        name = instruction.operation.name.lower()
        if name == "barrier":
            continue
        counts[name] = counts.get(name, 0) + 1
        if len(instruction.qubits) == 2:
            two_qubit += 1
    return CircuitStats(
        family=family,
        num_qubits=circuit.num_qubits,
        depth=circuit.depth(),
        gate_counts=MappingProxyType(dict(sorted(counts.items()))),
        two_qubit_gates=two_qubit,
    )


@functools.cache
def circuit_catalogue() -> tuple[CircuitStats, ...]:
    """Build, transpile and measure every catalogue circuit, once per process.

    Returns:
        One entry per (family, size), ordered by :data:`FAMILIES` then
        :data:`CATALOGUE_SIZES`; the order is stable, so an index into it is too.
    """
    circuits = [_BUILDERS[family](n) for family in FAMILIES for n in CATALOGUE_SIZES]
    # No coupling map: routing would depend on a device and cost seconds; the basis
    # change alone gives realistic gate mixes and depths.
    transpiled = transpile(
        circuits,
        basis_gates=list(BASIS_GATES),
        optimization_level=1,
        seed_transpiler=_TRANSPILE_SEED,
    )
    names = [family for family in FAMILIES for _ in CATALOGUE_SIZES]
    catalogue = tuple(_stats(family, qc) for family, qc in zip(names, transpiled, strict=True))
    logger.debug("built circuit catalogue of %d circuits", len(catalogue))
    return catalogue


def select_circuits(
    families: Sequence[str] | None = None,
    *,
    min_qubits: int = 0,
    max_qubits: int | None = None,
) -> np.ndarray:
    """Indices into :func:`circuit_catalogue` matching a filter.

    Args:
        families: Families to keep; all when None.
        min_qubits: Smallest width to keep.
        max_qubits: Largest width to keep; no limit when None.

    Returns:
        Sorted ``int64`` indices; never empty.

    Raises:
        ValueError: If no catalogue circuit matches.
    """
    keep = set(FAMILIES if families is None else families)
    unknown = keep.difference(FAMILIES)
    if unknown:
        raise ValueError(f"unknown circuit families {sorted(unknown)}; known: {FAMILIES}")
    indices = [
        i
        for i, c in enumerate(circuit_catalogue())
        if c.family in keep
        and c.num_qubits >= min_qubits
        and (max_qubits is None or c.num_qubits <= max_qubits)
    ]
    if not indices:
        raise ValueError(
            f"no catalogue circuit in families {sorted(keep)} with "
            f"{min_qubits}..{max_qubits} qubits"
        )
    return np.asarray(indices, dtype=np.int64)

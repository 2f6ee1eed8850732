"""Catalogue of real circuit shapes, so simulated jobs carry believable circuit statistics.

Each SDK a simulated tenant uses has a catalogue: circuit families (GHZ, QFT, a
hardware-efficient ansatz, a QAOA ring, random circuits) at a few widths, built natively
with that SDK, compiled as its users' jobs are and measured as its instrumentor measures
them (see :mod:`qabuse_dagster.simulation.circuit_families`). The catalogues line up: entry
``i`` is the same family at the same width in every SDK, so a job's ``circuit`` index means
the same circuit whatever its SDK.

They are built once, shipped with the package as :data:`CATALOGUE_FILE`, and read here, so
the twin neither imports an SDK nor depends on its installed version.

Example:
    >>> [e.family for e in circuit_catalogue("cirq")][:2]
    ['ghz', 'ghz']
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from qabuse_dagster.telemetry.circuit_stats import CircuitStats

__all__ = [
    "BASIS_GATES",
    "CATALOGUE_FILE",
    "CATALOGUE_SDKS",
    "CATALOGUE_SIZES",
    "FAMILIES",
    "CatalogueEntry",
    "CircuitStats",
    "circuit_catalogue",
    "select_circuits",
]

#: Basis the Qiskit catalogue is transpiled to: the native gates of IBM's Eagle/Heron devices.
BASIS_GATES: tuple[str, ...] = ("rz", "sx", "x", "cx")
#: Qubit counts each family is built at.
CATALOGUE_SIZES: tuple[int, ...] = (3, 5, 8, 12, 16, 20)
#: Circuit families in the catalogue.
FAMILIES: tuple[str, ...] = ("ghz", "qft", "hea", "qaoa_ring", "random")
#: SDKs with a catalogue: those of the simulated tenants.
CATALOGUE_SDKS: tuple[str, ...] = ("qiskit", "cirq", "pennylane")
#: The built catalogues, shipped with the package.
CATALOGUE_FILE = Path(__file__).with_name("circuit_catalogue.json")


@dataclass(frozen=True)
class CatalogueEntry(CircuitStats):
    """The statistics of one compiled catalogue circuit, as its SDK reports them.

    Attributes:
        family: Which family it was built from, e.g. ``ghz``.
    """

    family: str


def circuit_catalogue(sdk: str = "qiskit") -> tuple[CatalogueEntry, ...]:
    """Every catalogue circuit of one SDK, read once per process.

    Args:
        sdk: One of :data:`CATALOGUE_SDKS`.

    Returns:
        One entry per (family, size), ordered by :data:`FAMILIES` then
        :data:`CATALOGUE_SIZES`, the same order for every SDK; the order is stable, so an
        index into it is too.

    Raises:
        ValueError: If ``sdk`` has no catalogue.
    """
    catalogues = _catalogues()
    if sdk not in catalogues:
        raise ValueError(f"no circuit catalogue for sdk {sdk!r}; known: {CATALOGUE_SDKS}")
    return catalogues[sdk]


@functools.cache
def _catalogues() -> dict[str, tuple[CatalogueEntry, ...]]:
    data = json.loads(CATALOGUE_FILE.read_text(encoding="utf-8"))
    return {
        sdk: tuple(
            CatalogueEntry(
                family=entry["family"],
                num_qubits=entry["num_qubits"],
                depth=entry["depth"],
                gate_counts=MappingProxyType(dict(entry["gate_counts"])),
                two_qubit_gates=entry["two_qubit_gates"],
            )
            for entry in data[sdk]
        )
        for sdk in CATALOGUE_SDKS
    }


def select_circuits(
    families: Sequence[str] | None = None,
    *,
    min_qubits: int = 0,
    max_qubits: int | None = None,
) -> np.ndarray:
    """Indices into :func:`circuit_catalogue` matching a filter, the same for every SDK.

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

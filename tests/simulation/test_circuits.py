"""The circuit catalogues: real compiled circuits per SDK, consistent statistics, stable order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from qabuse_dagster.simulation.circuits import (
    BASIS_GATES,
    CATALOGUE_SDKS,
    CATALOGUE_SIZES,
    FAMILIES,
    CatalogueEntry,
    circuit_catalogue,
    select_circuits,
)
from qabuse_dagster.simulation.twin import simulate
from qabuse_dagster.telemetry.contract import validate_record
from qabuse_dagster.telemetry.hashing import KeyedHasher

if TYPE_CHECKING:
    import cirq


def test_catalogue_covers_every_family_and_size_in_order() -> None:
    catalogue = circuit_catalogue()
    assert [(c.family, c.num_qubits) for c in catalogue] == [
        (f, n) for f in FAMILIES for n in CATALOGUE_SIZES
    ]


def test_catalogue_is_built_once() -> None:
    assert circuit_catalogue() is circuit_catalogue()


def test_gate_counts_are_lower_case_basis_gates_and_consistent() -> None:
    allowed = {*BASIS_GATES, "measure"}
    for stats in circuit_catalogue():
        assert set(stats.gate_counts) <= allowed, stats
        assert all(name == name.lower() for name in stats.gate_counts)
        assert stats.two_qubit_gates == stats.gate_counts.get("cx", 0)
        assert stats.gate_counts["measure"] == stats.num_qubits
        assert stats.depth > 0


def test_ghz_has_a_cx_chain() -> None:
    for stats in circuit_catalogue():
        if stats.family == "ghz":
            assert stats.two_qubit_gates == stats.num_qubits - 1


def test_deeper_families_grow_with_width() -> None:
    qft = [c for c in circuit_catalogue() if c.family == "qft"]
    assert [c.two_qubit_gates for c in qft] == sorted(c.two_qubit_gates for c in qft)
    assert qft[-1].two_qubit_gates > qft[0].two_qubit_gates


def test_gate_counts_are_read_only() -> None:
    with pytest.raises(TypeError):
        circuit_catalogue()[0].gate_counts["cx"] = 0  # type: ignore[index]  # must fail


def test_select_circuits_filters() -> None:
    catalogue = circuit_catalogue()
    chosen = select_circuits(["ghz", "qft"], max_qubits=5)
    assert len(chosen) == 4
    assert all(catalogue[i].family in {"ghz", "qft"} for i in chosen)
    assert all(catalogue[i].num_qubits <= 5 for i in chosen)
    assert len(select_circuits()) == len(catalogue)


def test_select_circuits_rejects_unknown_or_empty() -> None:
    with pytest.raises(ValueError, match="unknown"):
        select_circuits(["teleport"])
    with pytest.raises(ValueError, match="no catalogue circuit"):
        select_circuits(["ghz"], max_qubits=2)


@pytest.fixture(scope="module")
def catalogues() -> dict[str, tuple[CatalogueEntry, ...]]:
    return {sdk: circuit_catalogue(sdk) for sdk in CATALOGUE_SDKS}


def test_catalogues_line_up_index_by_index(
    catalogues: dict[str, tuple[CatalogueEntry, ...]],
) -> None:
    shapes = {sdk: [(c.family, c.num_qubits) for c in cat] for sdk, cat in catalogues.items()}
    assert shapes["cirq"] == shapes["pennylane"] == shapes["qiskit"]


def test_every_sdk_names_gates_in_lower_case(
    catalogues: dict[str, tuple[CatalogueEntry, ...]],
) -> None:
    for sdk, catalogue in catalogues.items():
        for stats in catalogue:
            assert stats.gate_counts, (sdk, stats)
            assert all(name == name.lower() for name in stats.gate_counts), (sdk, stats)
            assert stats.depth > 0 and stats.two_qubit_gates > 0, (sdk, stats)


def test_cirq_catalogue_is_compiled_to_the_cz_gateset(
    catalogues: dict[str, tuple[CatalogueEntry, ...]],
) -> None:
    for stats in catalogues["cirq"]:
        assert set(stats.gate_counts) <= {"cz", "phasedxz", "measurement"}, stats
        assert stats.two_qubit_gates == stats.gate_counts["cz"]
        # One cirq.measure over every qubit.
        assert stats.gate_counts["measurement"] == 1
        # One PhasedXZ layer per qubit before, between and after its CZs.
        assert stats.gate_counts["phasedxz"] == stats.num_qubits + 2 * stats.gate_counts["cz"]


def test_pennylane_catalogue_holds_pennylane_gates_not_templates(
    catalogues: dict[str, tuple[CatalogueEntry, ...]],
) -> None:
    import pennylane as qml

    operators = {
        name.lower(): getattr(qml, name)
        for name in dir(qml)
        if isinstance(getattr(qml, name), type)
        and issubclass(getattr(qml, name), qml.operation.Operator)
    }
    for stats in catalogues["pennylane"]:
        for name in stats.gate_counts:
            assert name in operators, (name, stats)
            assert operators[name] not in (qml.QFT, qml.RandomLayers), stats


def test_the_same_family_is_the_same_circuit_in_every_sdk(
    catalogues: dict[str, tuple[CatalogueEntry, ...]],
) -> None:
    # GHZ is a chain of n - 1 CNOTs and the ansatz has one per neighbour pair per layer;
    # each compiles to one two-qubit gate in every SDK's gate set.
    for sdk, catalogue in catalogues.items():
        for stats in catalogue:
            if stats.family == "ghz":
                assert stats.two_qubit_gates == stats.num_qubits - 1, (sdk, stats)
            if stats.family == "hea":
                assert stats.two_qubit_gates == 3 * (stats.num_qubits - 1), (sdk, stats)


def test_each_sdk_catalogue_is_built_once(
    catalogues: dict[str, tuple[CatalogueEntry, ...]],
) -> None:
    for sdk, catalogue in catalogues.items():
        assert circuit_catalogue(sdk) is catalogue
    assert circuit_catalogue() is circuit_catalogue("qiskit")


def test_unknown_sdk_has_no_catalogue() -> None:
    with pytest.raises(ValueError, match="no circuit catalogue"):
        circuit_catalogue("braket")


def test_simulated_records_carry_their_own_sdk_gate_names(
    tmp_path: Path, catalogues: dict[str, tuple[CatalogueEntry, ...]]
) -> None:
    result = simulate(hours=1, seed=3, out=tmp_path, hasher=KeyedHasher.demo())
    lines = result.telemetry_path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    by_sdk: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        validate_record(record)
        by_sdk.setdefault(record["sdk"], []).append(record)
    assert set(by_sdk) == set(CATALOGUE_SDKS)
    for sdk, sdk_records in by_sdk.items():
        # A record describes num_circuits copies of one catalogue circuit of its own SDK.
        shapes = {
            (c.num_qubits, c.depth, tuple(c.gate_counts.items()), c.two_qubit_gates)
            for c in catalogues[sdk]
        }
        for record in sdk_records:
            copies = record["num_circuits"]
            per_circuit = tuple((n, k // copies) for n, k in record["gate_counts"].items())
            shape = (record["num_qubits"], record["depth"], per_circuit)
            assert (*shape, record["two_qubit_gates"] // copies) in shapes, (sdk, record)
    cirq_names = {name for r in by_sdk["cirq"] for name in r["gate_counts"]}
    assert {"cz", "phasedxz"} <= cirq_names
    assert not cirq_names & {"cx", "sx", "cnot"}
    pennylane_names = {name for r in by_sdk["pennylane"] for name in r["gate_counts"]}
    assert "cnot" in pennylane_names
    assert not pennylane_names & {"cx", "sx", "cz", "phasedxz"}


@pytest.mark.parametrize("sdk", CATALOGUE_SDKS)
def test_the_shipped_catalogue_is_what_the_sdk_builds_today(sdk: str) -> None:
    """Fails when a family or an SDK changed: regenerate with `python -m ...circuit_families`."""
    from qabuse_dagster.simulation.circuit_families import build_catalogue

    assert build_catalogue(sdk) == circuit_catalogue(sdk)


def test_the_twin_reads_the_catalogue_without_importing_an_sdk() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from qabuse_dagster.simulation.circuits import circuit_catalogue; "
        "[circuit_catalogue(s) for s in ('qiskit', 'cirq', 'pennylane')]; "
        "print(sorted({'qiskit', 'cirq', 'pennylane'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def _nudged(operation: cirq.Operation, factor: float) -> cirq.Operation:
    """``operation`` with its exponent scaled by ``factor``, a CZ left as it is.

    A CZ is in the gate set the compiler targets and one ulp off it is not, so it would take
    another path through the compiler, not the same path with other rounding.
    """
    import cirq

    if operation.gate == cirq.CZ:
        return operation
    return cirq.pow(operation, factor, operation)


@pytest.mark.parametrize("factor", [np.nextafter(1.0, 2.0), np.nextafter(1.0, 0.0)])
@pytest.mark.parametrize("family", FAMILIES)
def test_cirq_statistics_do_not_depend_on_the_last_bit_of_an_exponent(
    family: str, factor: float
) -> None:
    """One ulp on every exponent moves Cirq's KAK decompositions as another CPU's BLAS does.

    Cirq's own output then differs: a GHZ on 3 qubits has 6 PhasedXZ rather than 7.
    """
    import cirq

    from qabuse_dagster.simulation.circuit_families import _CIRQ_BUILDERS, _cirq_compiled
    from qabuse_dagster.telemetry.circuit_stats import cirq_circuit_stats

    for n in CATALOGUE_SIZES[:3]:
        # Expanded first, as the compiler does, so that a QFT's controlled phases move too.
        circuit = cirq.expand_composite(
            _CIRQ_BUILDERS[family](n), no_decomp=lambda op: cirq.num_qubits(op) <= 2
        )
        nudged = cirq.map_operations(circuit, lambda op, _: _nudged(op, factor))
        assert nudged != circuit
        assert cirq_circuit_stats(_cirq_compiled(nudged)) == cirq_circuit_stats(
            _cirq_compiled(circuit)
        ), (family, n)


@pytest.mark.parametrize("family", FAMILIES)
def test_cirq_catalogue_circuits_do_what_the_family_does(family: str) -> None:
    import cirq

    from qabuse_dagster.simulation.circuit_families import _CIRQ_BUILDERS, _cirq_compiled

    circuit = _CIRQ_BUILDERS[family](CATALOGUE_SIZES[0])
    compiled = _cirq_compiled(circuit)
    assert {type(op.gate) for op in compiled.all_operations()} <= {
        cirq.CZPowGate,
        cirq.PhasedXZGate,
        cirq.MeasurementGate,
    }
    cirq.testing.assert_circuits_with_terminal_measurements_are_equivalent(
        compiled, circuit, atol=1e-6
    )

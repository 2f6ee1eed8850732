"""The circuit catalogue: real transpiled circuits, consistent statistics, stable order."""

from __future__ import annotations

import pytest

from qabuse_dagster.simulation.circuits import (
    BASIS_GATES,
    CATALOGUE_SIZES,
    FAMILIES,
    circuit_catalogue,
    select_circuits,
)


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

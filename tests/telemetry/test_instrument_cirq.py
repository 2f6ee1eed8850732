"""Cirq instrumentation, on Cirq's own simulators and on samplers built on them."""

from __future__ import annotations

import asyncio
import importlib
import json
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import cirq
import duet
import pytest
import sympy

from qabuse_dagster.telemetry.circuit_stats import CircuitStats, cirq_circuit_stats
from qabuse_dagster.telemetry.contract import validate_record
from qabuse_dagster.telemetry.hashing import KeyedHasher
from qabuse_dagster.telemetry.instrument import Handle, combine_stats, instrument
from qabuse_dagster.telemetry.instrumentors import cirq as cirq_instrumentor
from qabuse_dagster.telemetry.sinks import MemorySink

inst = importlib.import_module("qabuse_dagster.telemetry.instrument")
USER_ID = "alice@example.org"
API_KEY_ID = "key-7f3a9c21"
ANGLE = 0.123456789
OTHER_ANGLE = 0.987654321
THETA = sympy.Symbol("theta")
ENTRY_POINTS = ("run", "run_sweep", "run_batch")
ASYNC_ENTRY_POINTS = ("run_async", "run_sweep_async", "run_batch_async")


class DelegatingSampler(cirq.Sampler):
    """A sampler of one's own that hands its sweeps to Cirq's simulator."""

    def __init__(self) -> None:
        self.inner = cirq.Simulator(seed=7)

    def run_sweep(
        self, program: cirq.AbstractCircuit, params: cirq.Sweepable, repetitions: int = 1
    ) -> Sequence[cirq.Result]:
        return self.inner.run_sweep(program, params, repetitions)


class AsyncOnlySampler(cirq.Sampler):
    """Implements only ``run_sweep_async``: Cirq's metaclass fills in ``run_sweep``."""

    async def run_sweep_async(
        self, program: cirq.AbstractCircuit, params: cirq.Sweepable, repetitions: int = 1
    ) -> Sequence[cirq.Result]:
        return cirq.DensityMatrixSimulator(seed=7).run_sweep(program, params, repetitions)


class AwaitingSampler(cirq.Sampler):
    """A truly asynchronous sampler: it yields to the event loop, then runs Cirq's simulator.

    Its async methods never reach an instrumented synchronous one of its own, so only the
    async wrappers can record them; its inner simulator's run is part of its job.
    """

    def __init__(self) -> None:
        self.inner = cirq.Simulator(seed=7)

    async def run_sweep_async(
        self, program: cirq.AbstractCircuit, params: cirq.Sweepable, repetitions: int = 1
    ) -> Sequence[cirq.Result]:
        await asyncio.sleep(0)  # another task runs here
        return self.inner.run_sweep(program, params, repetitions)


class BrokenBackendError(RuntimeError):
    pass


BROKEN = BrokenBackendError("the backend is down")


class BrokenSampler(cirq.Sampler):
    def run_sweep(
        self, program: cirq.AbstractCircuit, params: cirq.Sweepable, repetitions: int = 1
    ) -> Sequence[cirq.Result]:
        raise BROKEN


SAMPLERS: dict[str, Callable[[], cirq.Sampler]] = {
    "Simulator": lambda: cirq.Simulator(seed=7),
    "DensityMatrixSimulator": lambda: cirq.DensityMatrixSimulator(seed=7),
    "DelegatingSampler": DelegatingSampler,
    "AsyncOnlySampler": AsyncOnlySampler,
}


def _circuit(qubits: Sequence[cirq.Qid] | None = None, *, extra_cz: bool = False) -> cirq.Circuit:
    a, b, c = qubits or cirq.LineQubit.range(3)
    circuit = cirq.Circuit(
        cirq.H(a),
        cirq.CNOT(a, b),
        cirq.rz(THETA)(b),
        cirq.CZ(b, c) ** 0.5,
        cirq.measure(a, b, c, key="m"),
    )
    if extra_cz:
        circuit.insert(1, cirq.CZ(a, c))
    return circuit


def _resolved_stats(runs: Sequence[tuple[cirq.Circuit, cirq.Sweepable]]) -> CircuitStats | None:
    """What a record must say: the statistics of every circuit as each resolution ran it."""
    return combine_stats(
        [
            cirq_circuit_stats(cirq.resolve_parameters(circuit, resolver))
            for circuit, params in runs
            for resolver in cirq.to_resolvers(params)
        ]
    )


@pytest.fixture
def cirq_sdk() -> Iterator[tuple[Handle, MemorySink]]:
    sink = MemorySink()
    handle = instrument("cirq", sink, USER_ID, API_KEY_ID, hasher=KeyedHasher.demo())
    try:
        yield handle, sink
    finally:
        handle.uninstrument()


def _records(handle: Handle, sink: MemorySink) -> list[dict[str, Any]]:
    assert handle.flush()
    for record in sink.records:
        validate_record(record)
    return sink.records


def _one_job(handle: Handle, sink: MemorySink) -> tuple[dict[str, Any], dict[str, Any]]:
    records = _records(handle, sink)
    assert [r["status"] for r in records[:1]] == ["submitted"], records
    assert len(records) == 2, records
    submitted, finished = records
    assert submitted["job_id"] == finished["job_id"]
    sink.records.clear()
    return submitted, finished


@pytest.mark.parametrize("method", ENTRY_POINTS)
@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_each_entry_point_is_one_job_with_the_circuits_figures(
    cirq_sdk: tuple[Handle, MemorySink], sampler_name: str, method: str
) -> None:
    handle, sink = cirq_sdk
    sampler = SAMPLERS[sampler_name]()
    wide = _circuit(cirq.LineQubit.range(3), extra_cz=True)
    if method == "run":
        runs: list[tuple[cirq.Circuit, cirq.Sweepable]] = [(_circuit(), {THETA: ANGLE})]
        results: Any = sampler.run(_circuit(), {THETA: ANGLE}, repetitions=50)
        expected_shots, expected_circuits = 50, 1
    elif method == "run_sweep":
        sweep = cirq.Linspace(THETA, 0.0, ANGLE, 3)
        runs = [(_circuit(), sweep)]
        results = sampler.run_sweep(_circuit(), params=sweep, repetitions=20)
        expected_shots, expected_circuits = 20, 3
    else:
        params_list = [{THETA: ANGLE}, [{THETA: ANGLE}, {THETA: OTHER_ANGLE}]]
        runs = list(zip([_circuit(), wide], params_list, strict=True))
        results = sampler.run_batch([_circuit(), wide], params_list, repetitions=[10, 30])
        expected_shots, expected_circuits = 30, 3
    assert results  # the user's results come back

    submitted, completed = _one_job(handle, sink)
    assert completed["status"] == "completed"
    expected = _resolved_stats(runs)
    assert expected is not None
    for record in (submitted, completed):
        assert record["sdk"] == "cirq"
        assert record["backend"] == type(sampler).__name__
        assert record["num_circuits"] == expected_circuits
        assert record["shots"] == expected_shots
        assert record["gate_counts"] == dict(expected.gate_counts)
        assert record["depth"] == expected.depth
        assert record["num_qubits"] == expected.num_qubits
        assert record["two_qubit_gates"] == expected.two_qubit_gates
        assert record["client_agent"].startswith("qabuse-cirq/")
        assert record["retry_count"] == 0
    assert submitted["runtime_s"] is None
    assert completed["runtime_s"] >= 0
    assert completed["error_code"] is None


@pytest.mark.parametrize("method", ["run_async", "run_sweep_async"])
@pytest.mark.parametrize("sampler_name", ["Simulator", "DensityMatrixSimulator", "Awaiting"])
def test_an_async_run_through_asyncio_is_one_job_with_the_circuits_figures(
    cirq_sdk: tuple[Handle, MemorySink], sampler_name: str, method: str
) -> None:
    handle, sink = cirq_sdk
    sampler = AwaitingSampler() if sampler_name == "Awaiting" else SAMPLERS[sampler_name]()
    if method == "run_async":
        params: cirq.Sweepable = {THETA: ANGLE}
        results: Any = asyncio.run(sampler.run_async(_circuit(), params, repetitions=40))
        expected_circuits = 1
    else:
        params = cirq.Linspace(THETA, 0.0, ANGLE, 4)
        results = asyncio.run(sampler.run_sweep_async(_circuit(), params, repetitions=40))
        expected_circuits = 4
    assert results

    submitted, completed = _one_job(handle, sink)
    expected = _resolved_stats([(_circuit(), params)])
    assert expected is not None
    assert (submitted["status"], completed["status"]) == ("submitted", "completed")
    for record in (submitted, completed):
        assert record["backend"] == type(sampler).__name__
        assert (record["num_circuits"], record["shots"]) == (expected_circuits, 40)
        assert record["gate_counts"] == dict(expected.gate_counts)
        assert (record["depth"], record["num_qubits"]) == (expected.depth, expected.num_qubits)
        assert record["two_qubit_gates"] == expected.two_qubit_gates
    assert completed["runtime_s"] >= 0


def test_run_batch_async_is_one_job(cirq_sdk: tuple[Handle, MemorySink]) -> None:
    # Cirq's run_batch_async fans out with duet.pstarmap_async, which only runs under
    # duet's own scheduler (asyncio cannot drive it), so the call goes through duet.run.
    handle, sink = cirq_sdk
    wide = _circuit(cirq.LineQubit.range(3), extra_cz=True)
    params_list = [{THETA: ANGLE}, [{THETA: ANGLE}, {THETA: OTHER_ANGLE}]]
    results = duet.run(
        cirq.Simulator(seed=7).run_batch_async,
        [_circuit(), wide],
        params_list,
        repetitions=[10, 30],
    )
    assert [len(r) for r in results] == [1, 2]

    submitted, completed = _one_job(handle, sink)
    expected = _resolved_stats(list(zip([_circuit(), wide], params_list, strict=True)))
    assert expected is not None
    assert completed["status"] == "completed"
    assert (submitted["num_circuits"], submitted["shots"]) == (3, 30)
    assert submitted["gate_counts"] == dict(expected.gate_counts)


def test_concurrent_async_runs_on_one_loop_are_separate_jobs(
    cirq_sdk: tuple[Handle, MemorySink],
) -> None:
    handle, sink = cirq_sdk
    sampler = AwaitingSampler()

    async def both() -> list[cirq.Result]:
        # Each yields to the loop inside its job, so the two jobs interleave.
        return await asyncio.gather(
            sampler.run_async(_circuit(), {THETA: ANGLE}, repetitions=3),
            sampler.run_async(_circuit(), {THETA: ANGLE}, repetitions=4),
        )

    assert len(asyncio.run(both())) == 2
    records = _records(handle, sink)
    by_job: dict[str, list[str]] = {}
    for record in records:
        by_job.setdefault(record["job_id"], []).append(record["status"])
    assert sorted(by_job.values()) == [["submitted", "completed"]] * 2
    assert sorted(r["shots"] for r in records if r["status"] == "submitted") == [3, 4]
    assert {r["backend"] for r in records} == {"AwaitingSampler"}


def test_a_failing_async_run_is_recorded_and_the_error_reaches_the_user(
    cirq_sdk: tuple[Handle, MemorySink],
) -> None:
    handle, sink = cirq_sdk
    with pytest.raises(BrokenBackendError):
        asyncio.run(BrokenSampler().run_async(_circuit(), {THETA: ANGLE}, repetitions=5))
    submitted, failed = _one_job(handle, sink)
    assert (submitted["status"], failed["status"]) == ("submitted", "failed")
    assert failed["error_code"] == "broken_backend_error"


def test_sample_on_a_sweep_is_recorded_once(cirq_sdk: tuple[Handle, MemorySink]) -> None:
    handle, sink = cirq_sdk
    cirq.Simulator(seed=7).sample(
        _circuit(), repetitions=5, params=cirq.Points(THETA, [ANGLE, OTHER_ANGLE])
    )
    submitted, _ = _one_job(handle, sink)
    assert (submitted["num_circuits"], submitted["shots"]) == (2, 5)


def test_code_hash_ignores_parameters_and_qubit_labels_not_structure(
    cirq_sdk: tuple[Handle, MemorySink],
) -> None:
    handle, sink = cirq_sdk
    simulator = cirq.Simulator(seed=7)
    grid = [cirq.GridQubit(4, 2), cirq.GridQubit(5, 2), cirq.GridQubit(9, 9)]
    simulator.run(_circuit(), {THETA: ANGLE}, repetitions=5)
    base = _one_job(handle, sink)[0]["code_hash"]
    simulator.run(_circuit(), {THETA: OTHER_ANGLE}, repetitions=5)
    assert _one_job(handle, sink)[0]["code_hash"] == base
    simulator.run(cirq.resolve_parameters(_circuit(), {THETA: OTHER_ANGLE}), repetitions=5)
    assert _one_job(handle, sink)[0]["code_hash"] == base
    simulator.run(_circuit(grid), {THETA: ANGLE}, repetitions=5)
    assert _one_job(handle, sink)[0]["code_hash"] == base
    simulator.run_sweep(_circuit(), cirq.Linspace(THETA, 0, 1, 4), repetitions=5)
    assert _one_job(handle, sink)[0]["code_hash"] == base
    simulator.run(_circuit(extra_cz=True), {THETA: ANGLE}, repetitions=5)
    assert _one_job(handle, sink)[0]["code_hash"] != base


def test_no_raw_identifier_or_parameter_value_is_emitted(
    cirq_sdk: tuple[Handle, MemorySink],
) -> None:
    handle, sink = cirq_sdk
    simulator = cirq.Simulator(seed=7)
    simulator.run(_circuit(), {THETA: ANGLE}, repetitions=5)
    simulator.run_batch([_circuit()], [{THETA: OTHER_ANGLE}], repetitions=5)
    emitted = json.dumps(_records(handle, sink))
    for secret in (USER_ID, API_KEY_ID, str(ANGLE), str(OTHER_ANGLE), "123456789", "987654321"):
        assert secret not in emitted


def test_a_failing_run_is_recorded_and_the_error_reaches_the_user(
    cirq_sdk: tuple[Handle, MemorySink],
) -> None:
    handle, sink = cirq_sdk
    with pytest.raises(BrokenBackendError) as raised:
        BrokenSampler().run(_circuit(), {THETA: ANGLE}, repetitions=5)
    assert raised.value is BROKEN
    submitted, failed = _one_job(handle, sink)
    assert (failed["status"], failed["error_code"]) == ("failed", "broken_backend_error")
    assert failed["runtime_s"] >= 0

    # Cirq's own refusal: a circuit without measurements cannot be sampled.
    unmeasured = cirq.Circuit(cirq.H(cirq.LineQubit(0)))
    with pytest.raises(ValueError, match="no measurements"):
        cirq.Simulator().run(unmeasured, repetitions=5)
    submitted, failed = _one_job(handle, sink)
    assert (failed["status"], failed["error_code"]) == ("failed", "value_error")
    assert submitted["gate_counts"] == {"h": 1}


def test_an_instrumentation_error_never_reaches_the_user(
    cirq_sdk: tuple[Handle, MemorySink], monkeypatch: pytest.MonkeyPatch
) -> None:
    handle, sink = cirq_sdk

    def broken_stats(circuit: cirq.AbstractCircuit) -> CircuitStats:
        raise RuntimeError("a bug in the instrumentation")

    monkeypatch.setattr(cirq_instrumentor, "cirq_circuit_stats", broken_stats)
    result = cirq.Simulator(seed=7).run(_circuit(), {THETA: ANGLE}, repetitions=5)
    assert result.measurements["m"].shape == (5, 3)
    # The figures are computed on the emitter's thread: both records of the job fail to
    # build there, are counted and left out; the user's call saw nothing.
    assert _records(handle, sink) == []
    assert handle.stats["build_failures"] == 2
    assert handle.stats["instrumentation_errors"] == 0


def test_the_call_computes_no_figures_and_the_records_are_as_computed_eagerly(
    cirq_sdk: tuple[Handle, MemorySink], monkeypatch: pytest.MonkeyPatch
) -> None:
    handle, sink = cirq_sdk
    threads: list[threading.Thread] = []

    def spy_stats(circuit: cirq.AbstractCircuit) -> CircuitStats:
        threads.append(threading.current_thread())
        return cirq_circuit_stats(circuit)

    def spy_hash(*args: Any) -> str:
        threads.append(threading.current_thread())
        return real_hash(*args)

    real_hash = inst.structure_hash
    monkeypatch.setattr(cirq_instrumentor, "cirq_circuit_stats", spy_stats)
    monkeypatch.setattr(inst, "structure_hash", spy_hash)
    programs = [_circuit(), _circuit(extra_cz=True)]
    sweeps: list[cirq.Sweepable] = [cirq.Linspace(THETA, 0, 1, 3), {THETA: ANGLE}]
    originals = [program.copy() for program in programs]
    # Hold the emitter's thread so that the user mutates the circuits before it reads them.
    release = threading.Event()

    def hold() -> list[dict[str, Any]]:
        release.wait(10)
        return []

    handle.emitter.emit(hold)
    called = datetime.now(UTC)
    cirq.Simulator(seed=7).run_batch(programs, sweeps, repetitions=[5, 9])
    returned = datetime.now(UTC)
    for program in programs:
        program.append(cirq.X.on_each(*cirq.LineQubit.range(4)))
    time.sleep(0.01)  # records built later must still carry the call's instants
    release.set()

    records = _records(handle, sink)
    assert len(threads) == 3 and threading.current_thread() not in threads
    instrumentor = handle.instrumentor
    expected = instrumentor.record(
        job_id=records[0]["job_id"],
        status="submitted",
        backend="Simulator",
        num_circuits=4,
        shots=9,
        stats=_resolved_stats(list(zip(originals, sweeps, strict=True))),
        code_hash=instrumentor.code_hash(cirq_instrumentor._structure(c) for c in originals),
    )
    volatile = ("timestamp", "runtime_s")
    assert [r["status"] for r in records] == ["submitted", "completed"]
    for record in records:
        assert {k: v for k, v in record.items() if k not in volatile} == {
            **{k: v for k, v in expected.items() if k not in volatile},
            "status": record["status"],
        }
        stamped = datetime.strptime(record["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
        assert called <= stamped.replace(tzinfo=UTC) <= returned


def test_instrumenting_twice_returns_the_handle_and_records_once(
    cirq_sdk: tuple[Handle, MemorySink],
) -> None:
    handle, sink = cirq_sdk
    again = instrument("cirq", MemorySink(), USER_ID, API_KEY_ID, hasher=KeyedHasher.demo())
    assert again is handle
    cirq.Simulator(seed=7).run(_circuit(), {THETA: ANGLE}, repetitions=5)
    _one_job(handle, sink)


def _entry_points() -> dict[tuple[type, str], Any]:
    """Every sampler class's own entry points, sync and async, as the class holds them."""
    return {
        (cls, name): vars(cls)[name]
        for cls in cirq_instrumentor._with_subclasses(cirq.Sampler)
        for name in (*ENTRY_POINTS, *ASYNC_ENTRY_POINTS)
        if name in vars(cls)
    }


def test_import_patches_nothing_and_uninstrument_restores_cirq() -> None:
    before = _entry_points()
    assert all(f.__code__.co_filename != cirq_instrumentor.__file__ for f in before.values())
    sink = MemorySink()
    handle = instrument("cirq", sink, USER_ID, API_KEY_ID, hasher=KeyedHasher.demo())
    try:
        patched = _entry_points()
        assert patched.keys() == before.keys()
        assert all(patched[key] is not before[key] for key in before)
        assert (cirq.SimulatesSamples, "run_sweep") in before
        assert (AsyncOnlySampler, "run_sweep") in before  # filled in by Cirq's metaclass
        assert (cirq.Sampler, "run_batch_async") in before
        assert (cirq.SimulatesSamples, "run_sweep_async") in before
        cirq.Simulator(seed=7).run(_circuit(), {THETA: ANGLE}, repetitions=5)
        assert len(_records(handle, sink)) == 2
    finally:
        handle.uninstrument()
    after = _entry_points()
    assert after.keys() == before.keys()
    assert all(after[key] is before[key] for key in before)
    assert cirq.Sampler.run is before[(cirq.Sampler, "run")]
    assert cirq.Simulator.run_sweep is before[(cirq.SimulatesSamples, "run_sweep")]
    assert "run_sweep" not in vars(cirq.Simulator)
    cirq.Simulator(seed=7).run(_circuit(), {THETA: ANGLE}, repetitions=5)
    AsyncOnlySampler().run_batch([_circuit()], [{THETA: ANGLE}], repetitions=5)
    asyncio.run(cirq.Simulator(seed=7).run_async(_circuit(), {THETA: ANGLE}, repetitions=5))
    assert len(sink.records) == 2


def test_a_sampler_class_defined_after_instrumenting_is_recorded_and_restored() -> None:
    sink = MemorySink()
    handle = instrument("cirq", sink, USER_ID, API_KEY_ID, hasher=KeyedHasher.demo())
    try:

        class LateSampler(cirq.Sampler):
            def __init__(self) -> None:
                self._inner = cirq.Simulator(seed=11)

            def run_sweep(
                self, program: cirq.AbstractCircuit, params: Any, repetitions: int = 1
            ) -> Any:
                return self._inner.run_sweep(program, params, repetitions)

        patched = vars(LateSampler)["run_sweep"]
        original = patched.__wrapped__  # patched as the class was created
        circuit = _circuit()
        results = LateSampler().run_sweep(circuit, [{THETA: ANGLE}, {THETA: 0.1}], 7)
        assert [r.repetitions for r in results] == [7, 7]
        submitted, finished = _one_job(handle, sink)
        assert (submitted["num_circuits"], submitted["shots"]) == (2, 7)
        assert finished["status"] == "completed"
        LateSampler().run(circuit, {THETA: ANGLE}, repetitions=3)  # run -> run_sweep: one job
        assert len(_records(handle, sink)) == 2
    finally:
        handle.uninstrument()
    assert vars(LateSampler)["run_sweep"] is original
    assert "__init_subclass__" not in vars(cirq.Sampler)
    sink.records.clear()
    LateSampler().run_sweep(_circuit(), [{THETA: ANGLE}], 3)
    assert sink.records == []


def test_figures_are_computed_once_per_structure_and_stay_right_after_a_mutation(
    cirq_sdk: tuple[Handle, MemorySink], monkeypatch: pytest.MonkeyPatch
) -> None:
    handle, sink = cirq_sdk
    computed: list[int] = []

    def spy_stats(circuit: cirq.AbstractCircuit) -> CircuitStats:
        computed.append(len(circuit))
        return cirq_circuit_stats(circuit)

    monkeypatch.setattr(cirq_instrumentor, "cirq_circuit_stats", spy_stats)
    simulator = cirq.Simulator(seed=7)
    a, b, c = cirq.LineQubit.range(3)

    def bound(angle: float) -> cirq.Circuit:  # a loop step: the angle bound into the gate
        return cirq.Circuit(cirq.H(a), cirq.CNOT(a, b), cirq.rz(angle)(b), cirq.measure(a, b))

    circuit = bound(ANGLE)
    simulator.run(circuit, repetitions=3)
    assert handle.flush()
    simulator.run(bound(OTHER_ANGLE), repetitions=3)
    circuit.append(cirq.CZ(b, c))  # the user changes the first circuit and submits it again
    simulator.run(circuit, repetitions=3)
    circuit.append(cirq.X(c))  # and once more right after submitting
    records = _records(handle, sink)[::2]

    assert len(computed) == 2  # the second job's structure was already known
    changed = bound(ANGLE)
    changed.append(cirq.CZ(b, c))
    for record, expected in zip(records, [bound(ANGLE), bound(OTHER_ANGLE), changed], strict=True):
        stats = cirq_circuit_stats(expected)
        assert record["gate_counts"] == dict(stats.gate_counts)
        assert (record["depth"], record["num_qubits"]) == (stats.depth, stats.num_qubits)
        assert record["two_qubit_gates"] == stats.two_qubit_gates
    assert records[0]["code_hash"] == records[1]["code_hash"] != records[2]["code_hash"]


def test_a_moment_replaced_in_place_between_submissions_gives_the_new_figures(
    cirq_sdk: tuple[Handle, MemorySink],
) -> None:
    handle, sink = cirq_sdk
    simulator = cirq.Simulator(seed=7)
    a, b, c = cirq.LineQubit.range(3)
    circuit = cirq.Circuit(cirq.H(a), cirq.CNOT(a, b), cirq.measure(a, b, c))
    first = circuit.copy()
    simulator.run(circuit, repetitions=3)
    simulator.run(circuit, repetitions=3)  # its moments' prints are known now
    circuit[1] = cirq.Moment([cirq.CZ(a, c)])  # same length, one moment swapped
    simulator.run(circuit, repetitions=3)
    records = _records(handle, sink)[::2]

    instrumentor = handle.instrumentor
    for record, expected in zip(records, [first, first, circuit], strict=True):
        stats = cirq_circuit_stats(expected)
        assert record["gate_counts"] == dict(stats.gate_counts)
        assert (record["depth"], record["num_qubits"]) == (stats.depth, stats.num_qubits)
        assert record["two_qubit_gates"] == stats.two_qubit_gates
        assert record["code_hash"] == instrumentor.code_hash(
            [cirq_instrumentor._structure(expected)]
        )
    assert records[0]["code_hash"] == records[1]["code_hash"] != records[2]["code_hash"]


def test_moment_prints_are_kept_by_moment_object_and_equal_those_read_afresh() -> None:
    a, b, c = cirq.LineQubit.range(3)
    circuit = _circuit()
    snapshot = cirq_instrumentor._snapshot(circuit)
    prints = cirq_instrumentor._MomentPrints(size=64)
    key = cirq_instrumentor._fingerprint(snapshot, prints)
    assert key == cirq_instrumentor._fingerprint(snapshot, cirq_instrumentor._MomentPrints())
    assert key == cirq_instrumentor._fingerprint(snapshot, prints)  # looked up this time
    grown = circuit + cirq.Circuit(cirq.X(a))  # shares the first moments
    assert cirq_instrumentor._fingerprint(
        cirq_instrumentor._snapshot(grown), prints
    ) == cirq_instrumentor._fingerprint(
        cirq_instrumentor._snapshot(grown), cirq_instrumentor._MomentPrints()
    )

    # An entry left by a moment that died, under the id a new moment now has, is not its.
    alive, new = cirq.Moment([cirq.H(a)]), cirq.Moment([cirq.CZ(b, c)])
    prints._entries[id(new)] = (weakref.ref(alive), prints.get(alive))
    assert prints.get(new) == hash(cirq_instrumentor._moment_print(new))
    assert prints.get(new) != prints.get(alive)

    # A sub-circuit is counted from what it holds: no print for its moment, nor its program.
    sub = cirq.Circuit(cirq.CircuitOperation(cirq.FrozenCircuit(cirq.H(a))))
    assert prints.get(sub.moments[0]) is None
    assert cirq_instrumentor._fingerprint(cirq_instrumentor._snapshot(sub), prints) is None

    small = cirq_instrumentor._MomentPrints(size=2)
    for moment in grown.moments:
        small.get(moment)
    assert len(small._entries) == 2

"""Qiskit instrumentation against Qiskit's own simulators: BasicSimulator and the primitives."""

from __future__ import annotations

import importlib
import json
import math
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from qiskit import QuantumCircuit
from qiskit.circuit import Instruction, Parameter
from qiskit.primitives import (
    BackendEstimatorV2,
    BackendSamplerV2,
    BaseEstimatorV2,
    BaseSamplerV2,
    PrimitiveJob,
    StatevectorEstimator,
    StatevectorSampler,
)
from qiskit.providers import BackendV2
from qiskit.providers.basic_provider import BasicProviderError, BasicProviderJob, BasicSimulator
from qiskit.quantum_info import SparsePauliOp

from qabuse_dagster.telemetry.circuit_stats import qiskit_circuit_stats
from qabuse_dagster.telemetry.contract import validate_record
from qabuse_dagster.telemetry.hashing import KeyedHasher
from qabuse_dagster.telemetry.instrument import Handle, combine_stats, instrument
from qabuse_dagster.telemetry.sinks import MemorySink

inst = importlib.import_module("qabuse_dagster.telemetry.instrument")
USER = "alice@example.org-user-7781"
API_KEY = "key-id-qiskit-99231"
ANGLE = 0.123456789
SEED = 1234


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()


@pytest.fixture
def handle(sink: MemorySink) -> Iterator[Handle]:
    active = instrument("qiskit", sink, USER, API_KEY, hasher=KeyedHasher.demo())
    try:
        yield active
    finally:
        active.uninstrument()


def _records(handle: Handle, sink: MemorySink) -> list[dict[str, Any]]:
    assert handle.flush()
    for record in sink.records:
        validate_record(record)
    return sink.records


def _pairs(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    by_job: dict[str, list[str]] = {}
    for record in records:
        by_job.setdefault(record["job_id"], []).append(record["status"])
    return by_job


def _ansatz(angle: float, qubits: tuple[int, int, int] = (0, 1, 2)) -> QuantumCircuit:
    a, b, c = qubits
    qc = QuantumCircuit(3, 3)
    qc.h(a)
    qc.cx(a, b)
    qc.rz(angle, b)
    qc.barrier()
    qc.cx(b, c)
    qc.measure([a, b, c], [0, 1, 2])
    return qc


def _parametric() -> tuple[QuantumCircuit, Parameter]:
    theta = Parameter("theta")
    qc = QuantumCircuit(2)
    qc.ry(theta, 0)
    qc.cx(0, 1)
    qc.measure_all()
    return qc, theta


def _assert_stats(record: dict[str, Any], circuits: list[QuantumCircuit]) -> None:
    stats = combine_stats([qiskit_circuit_stats(c) for c in circuits])
    assert stats is not None
    assert record["num_qubits"] == stats.num_qubits
    assert record["depth"] == stats.depth
    assert record["gate_counts"] == dict(stats.gate_counts)
    assert record["two_qubit_gates"] == stats.two_qubit_gates


def test_backend_run_emits_submitted_then_completed(handle: Handle, sink: MemorySink) -> None:
    circuit = _ansatz(ANGLE)
    job = BasicSimulator().run(circuit, shots=321, seed_simulator=SEED)
    assert sum(job.result().get_counts().values()) == 321
    job.result()  # a second result() emits nothing more

    submitted, completed = _records(handle, sink)
    assert (submitted["status"], completed["status"]) == ("submitted", "completed")
    assert submitted["job_id"] == completed["job_id"] == job.job_id()
    for record in (submitted, completed):
        assert record["backend"] == "basic_simulator"
        assert record["sdk"] == "qiskit"
        assert (record["num_circuits"], record["shots"]) == (1, 321)
        assert record["code_hash"] == submitted["code_hash"]
        _assert_stats(record, [circuit])
    assert submitted["gate_counts"] == {"cx": 2, "h": 1, "measure": 3, "rz": 1}
    assert submitted["submit_latency_s"] >= 0
    assert completed["runtime_s"] == pytest.approx(job.result().time_taken)
    assert completed["error_code"] is None and completed["retry_count"] == 0


def test_backend_batch_and_default_shots(handle: Handle, sink: MemorySink) -> None:
    circuits = [_ansatz(ANGLE), QuantumCircuit(1)]
    circuits[1].x(0)
    circuits[1].measure_all()
    BasicSimulator().run(circuits, seed_simulator=SEED).result()

    submitted, completed = _records(handle, sink)
    assert submitted["num_circuits"] == 2
    assert submitted["shots"] == BasicSimulator().options.shots
    _assert_stats(submitted, circuits)
    _assert_stats(completed, circuits)


def test_statevector_sampler_shots(handle: Handle, sink: MemorySink) -> None:
    circuit, _ = _parametric()
    sampler = StatevectorSampler(seed=SEED)
    sampler.run([(circuit, [ANGLE])], shots=77).result()
    sampler.run([(circuit, [ANGLE], 55), circuit.assign_parameters([0.5])]).result()
    sampler.run([circuit.assign_parameters([0.25])]).result()

    records = _records(handle, sink)
    assert [r["status"] for r in records[::2]] == ["submitted"] * 3
    assert all(statuses == ["submitted", "completed"] for statuses in _pairs(records).values())
    assert [r["shots"] for r in records[::2]] == [77, max(55, sampler.default_shots), 1024]
    assert [r["num_circuits"] for r in records[::2]] == [1, 2, 1]
    assert {r["backend"] for r in records} == {"statevector_sampler"}
    assert all(r["runtime_s"] >= 0 for r in records[1::2])
    _assert_stats(records[0], [circuit])
    # Same structure, other parameter values: one code hash.
    assert len({r["code_hash"] for r in records[::2] if r["num_circuits"] == 1}) == 1


def test_estimators_shots(handle: Handle, sink: MemorySink) -> None:
    theta = Parameter("theta")
    circuit = QuantumCircuit(2)
    circuit.rx(theta, 0)
    circuit.cx(0, 1)
    pub = (circuit, SparsePauliOp("ZZ"), [ANGLE])
    StatevectorEstimator().run([pub]).result()
    BackendEstimatorV2(backend=BasicSimulator()).run([pub], precision=0.05).result()

    records = _records(handle, sink)
    assert len(records) == 4  # the backend runs inside BackendEstimatorV2 are its own job
    exact, _, sampled, sampled_done = records
    assert exact["shots"] is None and exact["backend"] == "statevector_estimator"
    assert sampled["shots"] == sampled_done["shots"] == math.ceil(1 / 0.05**2)
    assert sampled["backend"] == "basic_simulator"
    assert exact["code_hash"] == sampled["code_hash"]
    _assert_stats(exact, [circuit])


def test_backend_sampler_is_one_job(handle: Handle, sink: MemorySink) -> None:
    circuit = _ansatz(ANGLE)
    job = BackendSamplerV2(backend=BasicSimulator()).run([circuit], shots=99)
    job.result()

    submitted, completed = _records(handle, sink)
    assert submitted["job_id"] == completed["job_id"] == job.job_id()
    assert (submitted["backend"], submitted["shots"], completed["status"]) == (
        "basic_simulator",
        99,
        "completed",
    )


def test_code_hash_reads_structure_only(handle: Handle, sink: MemorySink) -> None:
    backend = BasicSimulator()
    for circuit in (
        _ansatz(ANGLE),
        _ansatz(0.987654321),  # other parameter value
        _ansatz(ANGLE, qubits=(2, 0, 1)),  # relabelled qubits
    ):
        backend.run(circuit, shots=10, seed_simulator=SEED).result()
    other = _ansatz(ANGLE)
    other.cz(0, 2)
    backend.run(other, shots=10, seed_simulator=SEED).result()

    hashes = [r["code_hash"] for r in _records(handle, sink)[::2]]
    assert hashes[0] == hashes[1] == hashes[2]
    assert hashes[3] != hashes[0]


def test_no_raw_identifiers_or_parameters(handle: Handle, sink: MemorySink) -> None:
    circuit, _ = _parametric()
    StatevectorSampler(seed=SEED).run([(circuit, [ANGLE])]).result()
    BasicSimulator().run(_ansatz(ANGLE), seed_simulator=SEED).result()

    text = json.dumps(_records(handle, sink))
    for secret in (USER, API_KEY, str(ANGLE), "123456789", "theta"):
        assert secret not in text


def test_failed_submission_reraises(handle: Handle, sink: MemorySink) -> None:
    too_wide = QuantumCircuit(30)
    too_wide.h(0)
    too_wide.measure_all()
    with pytest.raises(BasicProviderError, match="greater than maximum"):
        BasicSimulator().run(too_wide)
    circuit, _ = _parametric()
    with pytest.raises(ValueError, match="shots must be positive"):
        StatevectorSampler().run([(circuit, [ANGLE])], shots=0)

    backend_failure, sampler_failure = _records(handle, sink)
    assert backend_failure["status"] == sampler_failure["status"] == "failed"
    assert backend_failure["error_code"] == "basic_provider_error"
    assert sampler_failure["error_code"] == "value_error"
    assert backend_failure["num_qubits"] == 30
    assert backend_failure["submit_latency_s"] >= 0
    assert handle.stats["instrumentation_errors"] == 0


def test_failed_job_reraises(handle: Handle, sink: MemorySink) -> None:
    circuit = QuantumCircuit(1, 1)
    circuit.h(0)
    circuit.append(Instruction("mystery", 1, 0, []), [0])  # no definition: cannot simulate
    circuit.measure(0, 0)
    job = StatevectorSampler().run([circuit])
    with pytest.raises(Exception, match="mystery") as raised:
        job.result()
    assert type(raised.value).__name__ == "QiskitError"

    submitted, failed = _records(handle, sink)
    assert submitted["job_id"] == failed["job_id"] == job.job_id()
    assert (submitted["status"], failed["status"]) == ("submitted", "failed")
    assert failed["error_code"] == "qiskit_error"


def test_instrumentation_error_never_reaches_the_user(
    handle: Handle, sink: MemorySink, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qabuse_dagster.telemetry.instrumentors import qiskit as module

    def broken(_circuit: QuantumCircuit) -> None:
        raise RuntimeError("stats exploded")

    monkeypatch.setattr(module, "qiskit_circuit_stats", broken)
    result = BasicSimulator().run(_ansatz(ANGLE), shots=5, seed_simulator=SEED).result()
    assert sum(result.get_counts().values()) == 5
    # The figures are computed on the emitter's thread: both records of the job fail to
    # build there, are counted and left out; the user's call saw nothing.
    assert _records(handle, sink) == []
    assert handle.stats["build_failures"] == 2
    assert handle.stats["instrumentation_errors"] == 0


@pytest.mark.parametrize("primitive", [False, True])
def test_the_call_computes_no_figures_and_the_records_are_as_computed_eagerly(
    handle: Handle, sink: MemorySink, monkeypatch: pytest.MonkeyPatch, primitive: bool
) -> None:
    from qabuse_dagster.telemetry.instrumentors import qiskit as module

    threads: list[threading.Thread] = []

    def spy_stats(circuit: QuantumCircuit) -> Any:
        threads.append(threading.current_thread())
        return qiskit_circuit_stats(circuit)

    def spy_hash(*args: Any) -> str:
        threads.append(threading.current_thread())
        return real_hash(*args)

    real_hash = inst.structure_hash
    monkeypatch.setattr(module, "qiskit_circuit_stats", spy_stats)
    monkeypatch.setattr(inst, "structure_hash", spy_hash)
    circuits = [_ansatz(ANGLE), _ansatz(ANGLE, (2, 0, 1))]
    originals = [c.copy() for c in circuits]
    # Hold the emitter's thread so that the user mutates the circuits before it reads them.
    release = threading.Event()

    def hold() -> list[dict[str, Any]]:
        release.wait(10)
        return []

    handle.emitter.emit(hold)
    called = datetime.now(UTC)
    if primitive:
        job = StatevectorSampler(seed=SEED).run(circuits, shots=7)
    else:
        job = BasicSimulator().run(circuits, shots=7, seed_simulator=SEED)
    job.result()
    returned = datetime.now(UTC)
    for circuit in circuits:
        circuit.h(0)
        circuit.cx(0, 2)
    time.sleep(0.01)  # records built later must still carry the call's instants
    release.set()

    records = _records(handle, sink)
    assert len(threads) == 3 and threading.current_thread() not in threads
    instrumentor = handle.instrumentor
    expected = instrumentor.record(
        job_id=records[0]["job_id"],
        status="submitted",
        backend="statevector_sampler" if primitive else "basic_simulator",
        num_circuits=2,
        shots=7,
        stats=combine_stats([qiskit_circuit_stats(c) for c in originals]),
        code_hash=instrumentor.code_hash(module._structure(c) for c in originals),
    )
    volatile = ("timestamp", "runtime_s", "submit_latency_s")
    assert [r["status"] for r in records] == ["submitted", "completed"]
    for record in records:
        assert {k: v for k, v in record.items() if k not in volatile} == {
            **{k: v for k, v in expected.items() if k not in volatile},
            "status": record["status"],
        }
        stamped = datetime.strptime(record["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
        assert called <= stamped.replace(tzinfo=UTC) <= returned


def test_instrument_is_idempotent(handle: Handle, sink: MemorySink) -> None:
    again = instrument("qiskit", MemorySink(), USER, API_KEY, hasher=KeyedHasher.demo())
    assert again is handle
    BasicSimulator().run(_ansatz(ANGLE), seed_simulator=SEED).result()
    assert [r["status"] for r in _records(handle, sink)] == ["submitted", "completed"]


def test_uninstrument_restores_qiskit(sink: MemorySink) -> None:
    import qabuse_dagster.telemetry.instrumentors.qiskit  # noqa: F401  # importing patches nothing

    patched = [
        (BackendV2, "run"),
        (BasicSimulator, "run"),
        (StatevectorSampler, "run"),
        (StatevectorEstimator, "run"),
        (BackendSamplerV2, "run"),
        (BackendEstimatorV2, "run"),
        (BasicProviderJob, "result"),
        (PrimitiveJob, "result"),
        (BackendV2, "__init_subclass__"),
        (BaseSamplerV2, "__init_subclass__"),
        (BaseEstimatorV2, "__init_subclass__"),
    ]
    before = {(owner, name): vars(owner).get(name) for owner, name in patched}
    handle = instrument("qiskit", sink, USER, API_KEY, hasher=KeyedHasher.demo())
    try:
        assert BasicSimulator.run is not before[(BasicSimulator, "run")]
        BasicSimulator().run(_ansatz(ANGLE), seed_simulator=SEED).result()
        StatevectorSampler().run([_ansatz(ANGLE)]).result()
        assert BasicProviderJob.result is not before[(BasicProviderJob, "result")]
    finally:
        handle.uninstrument()
    assert {(owner, name): vars(owner).get(name) for owner, name in patched} == before
    assert getattr(BackendV2.run, "__isabstractmethod__", False)

    count = len(sink.records)
    job = BasicSimulator().run(_ansatz(ANGLE), seed_simulator=SEED)
    job.result()
    StatevectorSampler().run([_ansatz(ANGLE)]).result()
    assert len(sink.records) == count == 4


def _late_backend_class() -> type[BackendV2]:
    """A BackendV2 subclass created now (after instrumenting) that runs BasicSimulator."""

    class LateBackend(BackendV2):
        def __init__(self) -> None:
            super().__init__(name="late_backend")
            self._inner = BasicSimulator()

        @property
        def target(self) -> Any:
            return self._inner.target

        @property
        def max_circuits(self) -> int | None:
            return None

        @classmethod
        def _default_options(cls) -> Any:
            return BasicSimulator._default_options()

        def run(self, run_input: Any, **options: Any) -> Any:
            return self._inner.run(run_input, **options)

    return LateBackend


def test_a_backend_class_defined_after_instrumenting_is_recorded_and_restored(
    sink: MemorySink,
) -> None:
    handle = instrument("qiskit", sink, USER, API_KEY, hasher=KeyedHasher.demo())
    try:
        late = _late_backend_class()
        patched = vars(late)["run"]
        original_run = patched.__wrapped__  # patched as the class was created
        assert patched.__module__ == original_run.__module__ and patched is not original_run

        class LaterStill(late):  # type: ignore[valid-type,misc]  # a class made at run time
            def run(self, run_input: Any, **options: Any) -> Any:
                return super().run(run_input, **options)  # nested: one job, not two

        circuit = _ansatz(ANGLE)
        job = late().run(circuit, shots=64, seed_simulator=SEED)
        assert sum(job.result().get_counts().values()) == 64
        LaterStill().run(circuit, shots=8, seed_simulator=SEED).result()

        records = _records(handle, sink)
        assert [r["status"] for r in records] == ["submitted", "completed"] * 2
        assert {r["backend"] for r in records} == {"late_backend"}
        assert [r["shots"] for r in records] == [64, 64, 8, 8]
        assert records[0]["job_id"] == job.job_id()
        _assert_stats(records[0], [circuit])
    finally:
        handle.uninstrument()
    assert vars(late)["run"] is original_run
    assert vars(LaterStill)["run"].__code__.co_filename == __file__
    assert "__init_subclass__" not in vars(BackendV2)
    count = len(sink.records)
    late().run(_ansatz(ANGLE), shots=8, seed_simulator=SEED).result()
    _late_backend_class()().run(_ansatz(ANGLE), shots=8, seed_simulator=SEED).result()
    assert len(sink.records) == count


def test_a_primitive_class_defined_after_instrumenting_is_recorded(
    handle: Handle, sink: MemorySink
) -> None:
    # Each hands its pubs to one of Qiskit's primitives, whose own run is then nested:
    # unless the new class's run is patched, the record names Qiskit's primitive.
    class LateSampler(BaseSamplerV2):
        def __init__(self) -> None:
            self._inner = StatevectorSampler(seed=SEED)

        def run(self, pubs: Any, *, shots: int | None = None) -> Any:
            return self._inner.run(pubs, shots=shots)

    class LateEstimator(BaseEstimatorV2):
        def __init__(self) -> None:
            self._inner = StatevectorEstimator()

        def run(self, pubs: Any, *, precision: float | None = None) -> Any:
            return self._inner.run(pubs, precision=precision)

    circuit, _ = _parametric()
    LateSampler().run([(circuit, [ANGLE])], shots=21).result()
    estimated = QuantumCircuit(2)
    estimated.h(0)
    estimated.cx(0, 1)
    LateEstimator().run([(estimated, SparsePauliOp("ZZ"))]).result()

    records = _records(handle, sink)
    assert [r["status"] for r in records] == ["submitted", "completed"] * 2
    assert [r["backend"] for r in records[::2]] == ["late_sampler", "late_estimator"]
    assert records[0]["shots"] == 21
    _assert_stats(records[0], [circuit])


def test_figures_are_computed_once_per_structure_and_stay_right_after_a_mutation(
    handle: Handle, sink: MemorySink, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qabuse_dagster.telemetry.instrumentors import qiskit as module

    computed: list[int] = []

    def spy_stats(circuit: QuantumCircuit) -> Any:
        computed.append(circuit.size())
        return qiskit_circuit_stats(circuit)

    monkeypatch.setattr(module, "qiskit_circuit_stats", spy_stats)
    backend = BasicSimulator()
    circuit = _ansatz(ANGLE)
    first = circuit.copy()
    backend.run(circuit, shots=5, seed_simulator=SEED).result()
    assert handle.flush()
    rebound = _ansatz(0.5)  # a new loop step: same structure, other angle
    backend.run(rebound, shots=5, seed_simulator=SEED).result()
    circuit.cz(0, 2)  # the user changes the first circuit, then submits it again
    backend.run(circuit, shots=5, seed_simulator=SEED).result()
    circuit.rz(0.1, 0)  # and changes it once more right after submitting
    records = _records(handle, sink)[::2]

    assert len(computed) == 2  # the second job's structure was already known
    _assert_stats(records[0], [first])
    _assert_stats(records[1], [rebound])
    changed = first.copy()
    changed.cz(0, 2)
    _assert_stats(records[2], [changed])
    assert records[0]["code_hash"] == records[1]["code_hash"] != records[2]["code_hash"]
    assert handle.instrumentor.structures.hits == 1


def test_a_fingerprint_reads_bits_as_wires_and_what_it_keys_is_right(
    handle: Handle, sink: MemorySink
) -> None:
    from qiskit.circuit import QuantumRegister, Qubit

    from qabuse_dagster.telemetry.instrumentors import qiskit as module

    def fingerprint(circuit: QuantumCircuit) -> Any:
        return module._fingerprint(module._snapshot(circuit), handle.instrumentor._conditions)

    register = QuantumRegister(3, "q")
    anonymous_bits = [Qubit() for _ in range(3)]
    forward = QuantumCircuit(register)
    backward = QuantumCircuit(list(reversed(register)))  # same bits, listed the other way
    anonymous = QuantumCircuit(anonymous_bits)
    for qc, (a, b, c) in ((forward, register), (backward, register), (anonymous, anonymous_bits)):
        qc.h(a)
        qc.cx(a, b)
        qc.barrier(a, b, c)
        qc.cz(b, c)
    # The same instructions on the same wires: one key, and the figures it keys are right
    # for both circuits (the code hash renumbers qubits by first use).
    assert fingerprint(forward) == fingerprint(backward)
    assert fingerprint(_ansatz(ANGLE)) == fingerprint(_ansatz(0.5))
    assert fingerprint(_ansatz(ANGLE)) != fingerprint(_ansatz(ANGLE, (0, 2, 1)))
    assert fingerprint(anonymous) != fingerprint(forward)  # other bits: another key

    backend = BasicSimulator()
    circuits = [forward, backward, anonymous, _ansatz(ANGLE, (0, 2, 1))]
    for qc in circuits:
        backend.run(qc, shots=5, seed_simulator=SEED).result()
    records = _records(handle, sink)[::2]
    instrumentor = handle.instrumentor
    for record, qc in zip(records, circuits, strict=True):
        _assert_stats(record, [qc])
        assert record["code_hash"] == instrumentor.code_hash([module._structure(qc)])
    assert records[0]["code_hash"] == records[1]["code_hash"] == records[2]["code_hash"]
    assert instrumentor.structures.hits == 1  # backward reused forward's figures

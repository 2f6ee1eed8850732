"""Instrumentation overhead: one job submitted through each SDK, bare and instrumented.

Each side calls the same submission on the same small circuit (a 3-qubit GHZ state with
a parameterised rotation, 100 shots) on the SDK's local simulator: Qiskit
``BasicSimulator.run``, Cirq ``Simulator.run`` and a PennyLane QNode on ``default.qubit``.
Bare and instrumented blocks alternate, so drift of the machine hits both; the median
per call of each side is compared, and their difference is what qabuse adds to a
submission (the goal: under 50 µs). The cross-check: every instrumented call produced
exactly its two records (``submitted`` and terminal), none dropped.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from benchmarks.report import BenchmarkResult, busy_machine_note, comparison, load_average

NAME = "instrumentation"
BASELINE = "the same submission with no instrumentation (bare SDK call)"
SDKS = ("qiskit", "cirq", "pennylane")
GOAL_ADDED_US = 50.0


@dataclass(frozen=True)
class Settings:
    """Calls per block and blocks per side."""

    calls: int = 200
    blocks: int = 5
    shots: int = 100


def _qiskit_call(shots: int) -> Callable[[], object]:
    from qiskit import QuantumCircuit
    from qiskit.providers.basic_provider import BasicSimulator

    circuit = QuantumCircuit(3)
    circuit.h(0)
    circuit.cx(0, 1)
    circuit.cx(1, 2)
    circuit.rz(0.3, 2)
    circuit.measure_all()
    backend = BasicSimulator()
    return lambda: backend.run(circuit, shots=shots).result()


def _cirq_call(shots: int) -> Callable[[], object]:
    import cirq

    q = cirq.LineQubit.range(3)
    circuit = cirq.Circuit(
        cirq.H(q[0]),
        cirq.CNOT(q[0], q[1]),
        cirq.CNOT(q[1], q[2]),
        cirq.rz(0.3)(q[2]),
        cirq.measure(*q, key="m"),
    )
    simulator = cirq.Simulator(seed=1)
    return lambda: simulator.run(circuit, repetitions=shots)


def _pennylane_call(shots: int) -> Callable[[], object]:
    import pennylane as qml

    device = qml.device("default.qubit", wires=3)

    @qml.set_shots(shots)
    @qml.qnode(device)
    def ghz(theta: float) -> object:
        qml.Hadamard(0)
        qml.CNOT([0, 1])
        qml.CNOT([1, 2])
        qml.RZ(theta, 2)
        return qml.counts()

    return lambda: ghz(0.3)


_CALLS = {"qiskit": _qiskit_call, "cirq": _cirq_call, "pennylane": _pennylane_call}


def _block(call: Callable[[], object], n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter_ns()
        call()
        times.append((time.perf_counter_ns() - started) / 1e3)
    return times


def run(settings: Settings, console: Console) -> BenchmarkResult:
    """Time bare and instrumented submissions per SDK; check every call was recorded."""
    from qabuse_dagster.telemetry import MemorySink, instrument
    from qabuse_dagster.telemetry.hashing import KeyedHasher

    logging.getLogger("qabuse_dagster.telemetry.hashing").setLevel(logging.ERROR)
    hasher = KeyedHasher.demo()
    result = BenchmarkResult(
        name=NAME, title="Instrumentation overhead per submission", baseline=BASELINE
    )
    load_averages = [load_average()]
    added: dict[str, float] = {}
    medians: dict[str, dict[str, float]] = {}
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        for sdk in SDKS:
            task = progress.add_task(f"{sdk}: bare and instrumented blocks", total=settings.blocks)
            call = _CALLS[sdk](settings.shots)
            _block(call, 20)  # warm caches and lazy imports outside the timing
            bare: list[float] = []
            ours: list[float] = []
            sink = MemorySink()
            for _ in range(settings.blocks):
                bare += _block(call, settings.calls)
                handle = instrument(sdk, sink, user_id="bench", api_key_id="bench", hasher=hasher)
                try:
                    ours += _block(call, settings.calls)
                    handle.flush()
                finally:
                    handle.uninstrument()
                progress.advance(task)
            calls = settings.calls * settings.blocks
            medians[sdk] = {
                "bare": statistics.median(bare),
                "ours": statistics.median(ours),
                "bare_mean": statistics.fmean(bare),
                "ours_mean": statistics.fmean(ours),
            }
            added[sdk] = medians[sdk]["ours"] - medians[sdk]["bare"]
            result.comparisons.append(
                comparison(
                    f"{sdk} submission (median)",
                    "µs",
                    medians[sdk]["ours"],
                    medians[sdk]["bare"],
                    higher_is_better=False,
                )
            )
            statuses = [r["status"] for r in sink.records]
            if len(statuses) != 2 * calls or statuses.count("submitted") != calls:
                result.problems.append(
                    f"{sdk}: {calls} instrumented calls gave {len(statuses)} records "
                    f"({statuses.count('submitted')} submitted); expected {2 * calls}"
                )
    load_averages.append(load_average())
    result.facts = {
        "calls_per_side": settings.calls * settings.blocks,
        "added_us_median": {sdk: round(v, 1) for sdk, v in added.items()},
        # The mean includes the records' building on the emitter thread, which shares the
        # interpreter lock with back-to-back submissions.
        "added_us_mean": {
            sdk: round(m["ours_mean"] - m["bare_mean"], 1) for sdk, m in medians.items()
        },
        "median_us": medians,
        "goal_added_us": GOAL_ADDED_US,
    }
    result.shown_facts = ("calls_per_side", "added_us_median", "added_us_mean")
    over = [sdk for sdk, v in added.items() if v > GOAL_ADDED_US]
    if over:
        result.notes.append(
            f"added median above the {GOAL_ADDED_US:g} µs goal for: {', '.join(over)}"
        )
    busy = busy_machine_note(load_averages)
    if busy:
        result.notes.append(busy)
    return result

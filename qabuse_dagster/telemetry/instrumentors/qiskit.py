"""Qiskit instrumentation: backend ``run`` and the V2 primitives' ``run``.

Patched when `qabuse_dagster.telemetry.instrument` installs it, never at import:

* ``BackendV2.run`` and the ``run`` of every imported ``BackendV2`` subclass that defines
  its own (``BasicSimulator``, ``GenericBackendV2``, Aer's and IBM's backends when those
  packages are installed: their modules are imported first so they are covered).
* ``run`` of every imported ``BaseSamplerV2`` and ``BaseEstimatorV2`` subclass that defines
  its own: ``StatevectorSampler``, ``StatevectorEstimator``, ``BackendSamplerV2``,
  ``BackendEstimatorV2`` and, when installed, ``qiskit_ibm_runtime``'s ``SamplerV2`` and
  ``EstimatorV2``.
* The ``run`` of a backend or primitive class defined (or first imported) after
  `instrument`: the three bases get an ``__init_subclass__`` hook that patches the
  ``run`` of each new subclass defining one, as the class is created. `uninstrument`
  removes the hooks and restores those classes' ``run`` too.
* ``result`` of each job class the first time a job of it is returned, so that the first
  ``job.result()`` of an instrumented job emits its terminal record.

Limits: a job whose ``result()`` is never called gets no terminal record. ``backend.run``
called by Qiskit's own primitives (``BackendSamplerV2`` runs its pubs through it) is part
of the primitive's job and emits no record of its own, so one submission is one pair of
records.

Where the work happens: on the user's thread a submission captures the backend name,
shots, the number of circuits, the job id, the time and a snapshot of each circuit; the
records are deferred (`Emitter.emit`) and the statistics and code hash are computed once
per job (`Memo`) on the emitter's thread. A ``QuantumCircuit`` is mutable (a user may
append to it right after ``run``), so the snapshot is a shallow copy of its instruction
list (``circuit._data.copy()``, a few µs for a small circuit, where ``circuit.copy()``
costs several times more and computing the statistics ten times more); the emitter's
thread rebuilds a circuit from it (``QuantumCircuit.from_circuit_data``). The figures are
those of the circuit as submitted. On a Qiskit without that pair the snapshot is
``circuit.copy()``. Statistics and code hash are computed once per structure
(`StructureCache`, keyed by `_fingerprint` of the snapshot: each instruction's name and
bits), so a loop resubmitting one structure with new parameters costs a fingerprint and
no rebuilt circuit.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib
import math
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from qabuse_dagster.telemetry.circuit_stats import CircuitStats, qiskit_circuit_stats
from qabuse_dagster.telemetry.hashing import KeyedHasher
from qabuse_dagster.telemetry.instrument import (
    Emitter,
    Identity,
    Instrumentor,
    Memo,
    combine_stats,
    error_code,
)

if TYPE_CHECKING:
    from types import FrameType

    from qiskit import QuantumCircuit

__all__ = ["QiskitInstrumentor"]

#: Modules imported before patching so that the backends and primitives they define exist
#: as classes to patch; a module that is not installed is skipped.
_BACKEND_MODULES = (
    "qiskit.providers.basic_provider",
    "qiskit.providers.fake_provider",
    "qiskit_aer",
    "qiskit_ibm_runtime",
)
#: Frames of these modules call ``backend.run`` on behalf of an instrumented primitive.
_PRIMITIVE_MODULE_PREFIX = "qiskit.primitives."
#: The job method whose first call emits the terminal record.
_JOB_RESULT = "result"
_SNAKE_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


@dataclass(frozen=True)
class _Figures:
    """What the emitter's thread computes once per job, for both of its records."""

    stats: CircuitStats | None
    code_hash: str


@dataclass(slots=True)  # per job; frozen would cost 4x to build
class _Submission:
    """What both records of one submission say about it."""

    backend: str
    num_circuits: int
    shots: int | None
    figures: Memo[_Figures]

    def fields(self) -> dict[str, Any]:
        """The record's fields about the circuits: on the emitter's thread (computes once)."""
        figures = self.figures.get()
        return {
            "backend": self.backend,
            "num_circuits": self.num_circuits,
            "shots": self.shots,
            "stats": figures.stats,
            "code_hash": figures.code_hash,
        }


class _JobWatch:
    """Emits the terminal record of one submitted job, once."""

    def __init__(
        self, instrumentor: QiskitInstrumentor, job_id: str, submission: _Submission, start: float
    ) -> None:
        self.instrumentor = instrumentor
        self.job_id = job_id
        self.submission = submission
        self.start = start
        self.done_at: float | None = None
        self.has_future = False

    def mark_done(self, _future: object) -> None:
        """Done-callback of a job's future: when the execution ended, measured here."""
        self.done_at = time.perf_counter()

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        ins = self.instrumentor
        runtime_s = _reported_runtime(result)
        if runtime_s is None and self.has_future:
            # Without a done-callback yet, the future completed just now: result() waited.
            runtime_s = (self.done_at or time.perf_counter()) - self.start
        failed = error is not None or getattr(result, "success", True) is False
        ins.emit(
            functools.partial(
                ins.build,
                self.submission,
                job_id=self.job_id,
                status="failed" if failed else "completed",
                at=time.time(),
                runtime_s=runtime_s,
                error_code=(error_code(error) if error else "job_error") if failed else None,
            )
        )


class QiskitInstrumentor(Instrumentor):
    """Records Qiskit backend and V2 primitive submissions (see the module docstring)."""

    sdk: ClassVar[str] = "qiskit"
    distribution: ClassVar[str] = "qiskit"
    supported: ClassVar[tuple[tuple[int, ...], tuple[int, ...]]] = ((1, 0), (3, 0))

    def __init__(self, identity: Identity, hasher: KeyedHasher, emitter: Emitter) -> None:
        super().__init__(identity, hasher, emitter)
        self._lock = threading.Lock()
        self._installed = False
        self._job_classes: set[type] = set()
        self._watches: weakref.WeakKeyDictionary[Any, _JobWatch] = weakref.WeakKeyDictionary()
        self._local = threading.local()
        from qiskit.circuit import Instruction

        # Qiskit 1 has classical conditions on instructions (``c_if``); Qiskit 2 has none.
        self._conditions = hasattr(Instruction, "c_if")

    def patch_points(self) -> list[tuple[object, str, Callable[[Any], Any]]]:
        for module in _BACKEND_MODULES:
            try:
                importlib.import_module(module)
            except ImportError:
                continue
        from qiskit.primitives import BaseEstimatorV2, BaseSamplerV2
        from qiskit.providers import BackendV2

        points: list[tuple[object, str, Callable[[Any], Any]]] = [
            (BackendV2, "run", self._wrap_backend_run)
        ]
        bases: tuple[tuple[type, Callable[[Any], Any]], ...] = (
            (BackendV2, self._wrap_backend_run),
            (BaseSamplerV2, self._wrap_sampler_run),
            (BaseEstimatorV2, self._wrap_estimator_run),
        )
        for base, wrap in bases:
            points += [(c, "run", wrap) for c in _own_run(base)]
        # Classes defined (or first imported) from now on are patched as they are created.
        for base, wrap in bases:
            points.append(self.new_subclasses(base, functools.partial(_patch_run, self, wrap)))
        return points

    def install(self) -> None:
        with self._lock:
            super().install()
            self._installed = True

    def uninstall(self) -> None:
        with self._lock:
            self._installed = False
            super().uninstall()
            self._job_classes.clear()
            self._watches.clear()

    # -- wrappers -------------------------------------------------------------------------

    def _wrap_backend_run(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)  # keeps __isabstractmethod__ of BackendV2.run
        def run(backend: Any, *args: Any, **kwargs: Any) -> Any:
            if self._nested() or _called_by_primitive():
                return original(backend, *args, **kwargs)
            args, kwargs = _materialise(args, kwargs, "run_input")
            submission = self.guard(
                "reading a backend submission",
                lambda: self._backend_submission(backend, args, kwargs),
            )
            return self._submit(submission, lambda: original(backend, *args, **kwargs))

        return run

    def _wrap_sampler_run(self, original: Callable[..., Any]) -> Callable[..., Any]:
        return self._wrap_primitive_run(original, sampler=True)

    def _wrap_estimator_run(self, original: Callable[..., Any]) -> Callable[..., Any]:
        return self._wrap_primitive_run(original, sampler=False)

    def _wrap_primitive_run(
        self, original: Callable[..., Any], sampler: bool
    ) -> Callable[..., Any]:
        @functools.wraps(original)
        def run(primitive: Any, *args: Any, **kwargs: Any) -> Any:
            if self._nested():
                return original(primitive, *args, **kwargs)
            args, kwargs = _materialise(args, kwargs, "pubs")
            submission = self.guard(
                "reading a primitive submission",
                lambda: self._primitive_submission(primitive, args, kwargs, sampler),
            )
            return self._submit(submission, lambda: original(primitive, *args, **kwargs))

        return run

    def _wrap_job_result(self, original: Callable[..., Any]) -> Callable[..., Any]:
        from qiskit.providers.exceptions import JobTimeoutError

        @functools.wraps(original)
        def result(job: Any, *args: Any, **kwargs: Any) -> Any:
            watch = self._take_watch(job)
            if watch is None:
                return original(job, *args, **kwargs)
            try:
                value = original(job, *args, **kwargs)
            except (JobTimeoutError, TimeoutError):
                # The wait ended, not the job: the next result() call reports it.
                self.guard("re-arming a job", lambda: self._put_watch(job, watch))
                raise
            except Exception as exc:
                self.guard("recording a failed job", functools.partial(watch.finish, error=exc))
                raise
            self.guard("recording a finished job", lambda: watch.finish(result=value))
            return value

        return result

    # -- submission ------------------------------------------------------------------------

    def _nested(self) -> bool:
        """True inside another instrumented submission on this thread (a super().run)."""
        return getattr(self._local, "depth", 0) > 0

    def _submit(self, submission: _Submission | None, call: Callable[[], Any]) -> Any:
        if submission is None:  # reading it failed (counted by guard): run uninstrumented
            return call()
        self._local.depth = getattr(self._local, "depth", 0) + 1
        start = time.perf_counter()
        try:
            job = call()
        except Exception as exc:
            latency = time.perf_counter() - start
            self.guard(
                "recording a failed submission",
                functools.partial(self._failed_submission, submission, latency, exc),
            )
            raise
        finally:
            self._local.depth -= 1
        latency = time.perf_counter() - start
        self.guard(
            "recording a submission", lambda: self._submitted(job, submission, latency, start)
        )
        return job

    def build(
        self, submission: _Submission, *, job_id: str, status: str, at: float, **fields: Any
    ) -> dict[str, Any]:
        """One record of a submission, on the emitter's thread (a deferred record)."""
        return self.record(
            job_id=job_id,
            status=status,
            timestamp=self.stamp(at),
            **fields,
            **submission.fields(),
        )

    def _failed_submission(
        self, submission: _Submission, latency: float, error: BaseException
    ) -> None:
        self.emit(
            functools.partial(
                self.build,
                submission,
                job_id=self.new_job_id(),
                status="failed",
                at=time.time(),
                submit_latency_s=latency,
                error_code=error_code(error),
            )
        )

    def _submitted(self, job: Any, submission: _Submission, latency: float, start: float) -> None:
        at = time.time()
        job_id_of = getattr(job, "job_id", None)
        job_id = str(job_id_of()) if callable(job_id_of) else ""
        job_id = job_id or self.new_job_id()
        self.emit(
            functools.partial(
                self.build,
                submission,
                job_id=job_id,
                status="submitted",
                at=at,
                submit_latency_s=latency,
            )
        )
        watch = _JobWatch(self, job_id, submission, start)
        if not self._put_watch(job, watch):
            return
        future = getattr(job, "_future", None)  # PrimitiveJob runs in a thread pool
        if isinstance(future, concurrent.futures.Future):
            watch.has_future = True
            future.add_done_callback(watch.mark_done)

    def _put_watch(self, job: Any, watch: _JobWatch) -> bool:
        """Register the job's terminal record; patch its class's result() on first sight."""
        with self._lock:
            if not self._installed:
                return False
            cls = type(job)
            if cls not in self._job_classes:
                # Restored with the other patches by Instrumentor.uninstall.
                self.patch(cls, _JOB_RESULT, self._wrap_job_result)
                self._job_classes.add(cls)
            self._watches[job] = watch
            return True

    def _take_watch(self, job: Any) -> _JobWatch | None:
        with self._lock:
            try:
                return self._watches.pop(job, None)
            except TypeError:  # an unhashable or not weakly referenceable job
                return None

    # -- reading circuits -----------------------------------------------------------------

    def _backend_submission(
        self, backend: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> _Submission:
        circuit_class = _circuit_class()
        run_input = args[0] if args else kwargs.get("run_input")
        items = [run_input] if isinstance(run_input, circuit_class) else list(run_input or ())
        circuits = [c for c in items if isinstance(c, circuit_class)]
        shots = kwargs.get("shots")
        if shots is None:
            shots = getattr(getattr(backend, "options", None), "shots", None)
        return self._submission(_backend_name(backend), len(items), _count(shots), circuits)

    def _primitive_submission(
        self, primitive: Any, args: tuple[Any, ...], kwargs: dict[str, Any], sampler: bool
    ) -> _Submission:
        from qiskit.primitives import BackendEstimatorV2

        pubs = list(args[0] if args else kwargs.get("pubs") or ())
        circuits = [_pub_circuit(pub) for pub in pubs]
        options = getattr(primitive, "options", None)
        per_pub: list[int | None]
        if sampler:
            default = kwargs.get("shots")
            if default is None:
                default = getattr(primitive, "default_shots", None)
            if default is None:
                default = getattr(options, "default_shots", None)
            per_pub = [_count(_pub_setting(pub, "shots", 2, default)) for pub in pubs]
        elif isinstance(primitive, BackendEstimatorV2):
            # It runs ceil(1 / precision**2) shots per circuit, as its pub metadata says.
            default = kwargs.get("precision")
            if default is None:
                default = getattr(options, "default_precision", None)
            per_pub = [_precision_shots(_pub_setting(pub, "precision", 3, default)) for pub in pubs]
        else:  # StatevectorEstimator is exact; a remote estimator's shots are its own
            per_pub = []
        known = [s for s in per_pub if s is not None]
        shots = max(known) if known else None  # pubs may differ: the largest is reported
        return self._submission(_primitive_backend(primitive), len(pubs), shots, circuits)

    def _submission(
        self, backend: str, num_circuits: int, shots: int | None, circuits: list[QuantumCircuit]
    ) -> _Submission:
        snapshots = [_snapshot(c) for c in circuits]
        return _Submission(
            backend=backend,
            num_circuits=num_circuits,
            shots=shots,
            figures=Memo(functools.partial(self._figures, snapshots)),
        )

    def _figures(self, snapshots: list[Any]) -> _Figures:
        """The circuits' statistics and code hash: once per job, on the emitter's thread.

        Computed once per structure (`StructureCache`): a job whose circuits all have a
        fingerprint reuses the figures of an earlier job of the same structure.
        """
        prints = [_fingerprint(snapshot, self._conditions) for snapshot in snapshots]
        key = None if None in prints else tuple(prints)
        return self.structures.get(key, functools.partial(self._compute_figures, snapshots))

    def _compute_figures(self, snapshots: list[Any]) -> _Figures:
        circuits = [_thaw(snapshot) for snapshot in snapshots]
        return _Figures(
            stats=combine_stats([qiskit_circuit_stats(c) for c in circuits]),
            code_hash=self.code_hash(_structure(c) for c in circuits),
        )


class _Data:
    """A circuit's instruction list copied at submission (``QuantumCircuit._data.copy()``)."""

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data


@functools.cache
def _circuit_class() -> type[QuantumCircuit]:
    """``QuantumCircuit``, imported once: an import statement costs a µs on each call."""
    from qiskit import QuantumCircuit

    return QuantumCircuit


@functools.cache
def _from_data() -> Callable[[Any], QuantumCircuit] | None:
    """Qiskit's constructor of a circuit from its ``CircuitData``, if this Qiskit has one."""
    rebuild = getattr(_circuit_class(), "from_circuit_data", None)
    return rebuild or getattr(_circuit_class(), "_from_circuit_data", None)


def _snapshot(circuit: QuantumCircuit) -> _Data | QuantumCircuit:
    """What the emitter's thread reads of a circuit: a copy of it as submitted."""
    data = getattr(circuit, "_data", None)
    if data is not None and _from_data() is not None:
        try:
            return _Data(data.copy(copy_instructions=False))
        except (AttributeError, TypeError):
            pass
    return circuit.copy()


def _patch_run(instrumentor: Instrumentor, wrap: Callable[[Any], Any], cls: type) -> None:
    """Patch the ``run`` of a class created while instrumented, if it defines one."""
    if "run" in vars(cls):
        instrumentor.patch(cls, "run", wrap)


def _fingerprint(snapshot: _Data | QuantumCircuit, conditions: bool) -> Hashable | None:
    """What a snapshot's statistics and code hash depend on; None when it is more than that.

    Per instruction: its name, whether it is a directive (not counted in the depth) and
    its qubits and clbits (the depth counts both); with the circuit's width. The bits are
    Qiskit's own objects, not their indices: within a circuit two of them are equal only
    if they are the same wire, which is all the figures read of them (the code hash
    renumbers qubits by first use), and an index would cost a lookup per bit. Parameter
    values are not read. Control flow, ``store`` and (Qiskit 1) classical conditions
    (``conditions``: this Qiskit has them) make the depth depend on classical
    expressions: such a circuit has none.
    """
    if not isinstance(snapshot, _Data):
        return None
    data = snapshot.data
    if data.has_control_flow_op():
        return None
    instructions: list[tuple[str, bool, tuple[Any, ...], tuple[Any, ...]]] = []
    append = instructions.append
    for instruction in data:
        name = instruction.name
        if name == "store" or (
            conditions and getattr(instruction.operation, "condition", None) is not None
        ):
            return None
        append((name, instruction.is_directive(), instruction.qubits, instruction.clbits))
    return data.num_qubits, tuple(instructions)


def _thaw(snapshot: _Data | QuantumCircuit) -> QuantumCircuit:
    if isinstance(snapshot, _Data):
        rebuild = _from_data()
        assert rebuild is not None  # checked by _snapshot
        return rebuild(snapshot.data)
    return snapshot


def _own_run(base: type) -> list[type]:
    """Every imported subclass of ``base`` (recursively) whose class body defines ``run``."""
    found: list[type] = []
    seen: set[type] = set()
    stack: list[type] = list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if "run" in vars(cls):
            found.append(cls)
        stack.extend(cls.__subclasses__())
    return found


def _called_by_primitive() -> bool:
    """True when a Qiskit primitive's job thread is the caller of ``backend.run``."""
    frame: FrameType | None = sys._getframe(2)  # the caller of the wrapped run
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith(_PRIMITIVE_MODULE_PREFIX):
            return True
        frame = frame.f_back
    return False


def _materialise(
    args: tuple[Any, ...], kwargs: dict[str, Any], name: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Turn a one-shot iterator of circuits or pubs into a list, so reading it consumes nothing.

    The SDK's own ``run`` iterates it once either way; a list, tuple or circuit is passed on
    unchanged.
    """
    value = args[0] if args else kwargs.get(name)
    if (
        value is None
        or isinstance(value, (_circuit_class(), Sequence))
        or not isinstance(value, Iterable)
    ):
        return args, kwargs
    if args:
        return (list(value), *args[1:]), kwargs
    return args, {**kwargs, name: list(value)}


def _structure(circuit: QuantumCircuit) -> list[tuple[str, tuple[int, ...]]]:
    """Gate names and qubit indices in order, barriers excluded: what ``code_hash`` reads."""
    return [
        (inst.operation.name, tuple(circuit.find_bit(q).index for q in inst.qubits))
        for inst in circuit.data
        if inst.operation.name != "barrier"
    ]


def _pub_circuit(pub: Any) -> QuantumCircuit:
    """The circuit of a pub: a ``SamplerPub``/``EstimatorPub``, a circuit, or a tuple."""
    from qiskit import QuantumCircuit

    if isinstance(pub, QuantumCircuit):
        return pub
    circuit = getattr(pub, "circuit", None)
    if isinstance(circuit, QuantumCircuit):
        return circuit
    return pub[0]  # type: ignore[no-any-return]  # a tuple pub: (circuit, ...)


def _pub_setting(pub: Any, name: str, position: int, default: Any) -> Any:
    """A pub's own shots or precision (attribute of a Pub, or tuple slot), else ``default``."""
    from qiskit import QuantumCircuit

    value = getattr(pub, name, None)
    if value is None and not isinstance(pub, QuantumCircuit) and isinstance(pub, Sequence):
        value = pub[position] if len(pub) > position else None
    return default if value is None else value


def _count(value: Any) -> int | None:
    """A shot count fit for a record, or None for anything else (e.g. an unset option)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _precision_shots(precision: Any) -> int | None:
    if isinstance(precision, int | float) and not isinstance(precision, bool) and precision > 0:
        return math.ceil(1.0 / precision**2)
    return None


def _backend_name(backend: Any) -> str:
    name = getattr(backend, "name", None)
    if callable(name):  # BackendV1 and some providers expose name()
        name = name()
    return str(name) if name else _snake(type(backend).__name__)


def _primitive_backend(primitive: Any) -> str:
    """The backend a primitive runs on, else the primitive itself (``statevector_sampler``)."""
    from qiskit.providers import BackendV2

    for attribute in ("backend", "_backend"):
        backend = getattr(primitive, attribute, None)
        if isinstance(backend, BackendV2):
            return _backend_name(backend)
    return _snake(type(primitive).__name__)


def _reported_runtime(result: Any) -> float | None:
    """Execution seconds the SDK reports in a ``qiskit.result.Result`` (``time_taken``)."""
    taken = getattr(result, "time_taken", None)
    if isinstance(taken, int | float) and not isinstance(taken, bool) and taken >= 0:
        return float(taken)
    return None


def _snake(name: str) -> str:
    """``BasicProviderError`` -> ``basic_provider_error``."""
    return _SNAKE_BOUNDARY.sub("_", name).lower()

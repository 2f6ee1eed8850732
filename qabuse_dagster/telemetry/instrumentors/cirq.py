"""Cirq instrumentation: every ``cirq.Sampler`` run, simulators included.

Cirq samplers execute synchronously, so one call is one job: the ``submitted`` record is
emitted as the call starts, the ``completed`` or ``failed`` record when it returns or
raises, with ``runtime_s`` the measured wall time of the call (Cirq reports no queue or
run time of its own). The job id is client-side (`Instrumentor.new_job_id`).

What is patched, at `instrument` time: ``run``, ``run_sweep`` and ``run_batch`` and their
async forms ``run_async``, ``run_sweep_async`` and ``run_batch_async`` wherever a class
defines them, on ``cirq.Sampler`` and on every subclass of it imported by then.
That matters because Cirq's samplers override these: ``SimulatesSamples`` (so
``cirq.Simulator`` and ``cirq.DensityMatrixSimulator``) and ``StabilizerSampler`` define
their own ``run_sweep``, and a sampler that implements only ``run_sweep_async`` has a
``run_sweep`` filled in on its own class by Cirq's metaclass.

One user call is one job: ``run`` calls ``run_sweep``, ``run_batch`` calls ``run_sweep``
per program, an async method calls another or a synchronous one, and a sampler may
delegate to another; every sampler call made inside an instrumented call runs unrecorded
(`Instrumentor.outermost`). An async call is a job from its first step to its result,
``runtime_s`` the wall time in between; concurrent async calls are separate jobs, since
each asyncio task has its own nesting depth.

What a record counts:

* ``num_circuits`` is the number of (circuit, parameter resolution) executions: 1 for
  ``run``, the length of the sweep for ``run_sweep``, their sum over programs for
  ``run_batch``. ``gate_counts`` and ``two_qubit_gates`` are summed over those
  executions too, as over a batch of bound circuits; ``num_qubits`` and ``depth`` are
  the largest program's.
* ``shots`` is ``repetitions``; when a batch gives programs different repetitions, the
  largest.
* ``code_hash`` is over the distinct programs (not the executions), so a sweep's length
  and values leave it unchanged.

A ``Sampler`` subclass defined (or first imported) after `instrument` has its own entry
points patched as the class is created (`Instrumentor.new_subclasses`), and restored by
`uninstrument`.

Limitations:

* Cirq's own ``run_batch_async`` fans out with ``duet.pstarmap_async``, so it runs under
  ``duet.run``, not under asyncio (a limit of Cirq, not of the recording): under duet it
  is one job like the others.
* ``Sampler.sample`` with a list of sweeps calls ``run_sweep`` once per sweep: one job each.
* A sweep passed as a one-shot iterator is counted as one execution, since counting it
  would consume it.

Where the work happens: on the user's thread a call captures only its arguments, the time
and an immutable snapshot of each ``cirq.Circuit`` (the tuple of its moments: a
``cirq.Moment`` is immutable, so this costs a tuple, not a copy; a ``FrozenCircuit`` is
taken as it is). The records are deferred (`Emitter.emit`); statistics, the code hash, the
job id and the sweep lengths (``num_circuits``) are computed once per job (`Memo`) on the
emitter's thread. So the figures describe the programs as submitted even if the user
mutates a circuit right after the call; the sweep (``params``) is not copied, so a sweep
given as a mutable container (a list of dicts) and changed right after the call may be
counted as changed. Each program's statistics and the code hash are computed once per
structure (`StructureCache`, keyed by `_fingerprint`: per moment, the class naming each
operation and its qubits), so a sweep or a loop resubmitting one structure costs a
fingerprint; and a moment's part of it is read once per moment object (`_MomentPrints`),
so resubmitting a circuit, or one that shares moments with an earlier one, costs a
lookup per moment.
"""

from __future__ import annotations

import functools
import inspect
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from qabuse_dagster.telemetry.circuit_stats import (
    CircuitStats,
    cirq_circuit_stats,
    cirq_flatten,
    cirq_gate_name,
    frozen_counts,
)
from qabuse_dagster.telemetry.hashing import KeyedHasher
from qabuse_dagster.telemetry.instrument import (
    Emitter,
    Identity,
    Instrumentor,
    Memo,
    combine_stats,
)
from qabuse_dagster.telemetry.instrument import error_code as _error_code

if TYPE_CHECKING:
    import cirq

__all__ = ["CirqInstrumentor"]

#: The sampler methods wrapped, with their arguments' names in Cirq's own signatures.
_ENTRY_POINTS: dict[str, tuple[str, str, str]] = {
    "run": ("program", "param_resolver", "repetitions"),
    "run_sweep": ("program", "params", "repetitions"),
    "run_batch": ("programs", "params_list", "repetitions"),
    "run_async": ("program", "param_resolver", "repetitions"),
    "run_sweep_async": ("program", "params", "repetitions"),
    "run_batch_async": ("programs", "params_list", "repetitions"),
}
#: The schema's bound on ``num_circuits``; a longer sweep is reported at the bound.
_MAX_CIRCUITS = 1_000_000


#: A missing argument, told apart from an explicit None.
_MISSING: Any = object()


@dataclass(slots=True)  # per job; frozen would cost 4x to build
class _Figures:
    """What the emitter's thread computes once per job, for both of its records."""

    job_id: str
    num_circuits: int
    stats: CircuitStats | None
    code_hash: str


@dataclass(slots=True)  # per job; frozen would cost 4x to build
class _Job:
    """What both records of one sampler call share."""

    backend: str
    shots: int | None
    figures: Memo[_Figures]


class _Argument(NamedTuple):
    """Where a wrapped method takes one of its arguments: keyword, position, default."""

    name: str
    position: int
    default: Any


def _arguments(method: str, signature: inspect.Signature) -> tuple[_Argument, ...] | None:
    """How to read (program, params, repetitions) of ``method`` without binding per call.

    Cirq's names first, else the parameter at Cirq's position; None when the signature
    takes them through ``*args`` or ``**kwargs`` (then every call is bound).
    """
    parameters = list(signature.parameters.values())[1:]  # after self
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY)
    if len(parameters) < 3 or any(p.kind not in plain for p in parameters[:3]):
        return None
    names = [p.name for p in parameters]
    arguments = []
    for i, cirq_name in enumerate(_ENTRY_POINTS[method]):
        position = names.index(cirq_name) if cirq_name in names else i
        parameter = parameters[position]
        default = _MISSING if parameter.default is parameter.empty else parameter.default
        keyword = parameter.name if parameter.kind is not inspect.Parameter.POSITIONAL_ONLY else ""
        arguments.append(_Argument(keyword, position, default))
    return tuple(arguments)


class CirqInstrumentor(Instrumentor):
    """Records ``cirq.Sampler`` runs: ``run``, ``run_sweep`` and ``run_batch``."""

    sdk = "cirq"
    distribution = "cirq-core"
    supported = ((1, 0), (2, 0))

    def __init__(self, identity: Identity, hasher: KeyedHasher, emitter: Emitter) -> None:
        super().__init__(identity, hasher, emitter)
        #: Each moment's part of a `_fingerprint` (emitter's thread).
        self.moments = _MomentPrints()

    def patch_points(self) -> list[tuple[object, str, Callable[[Any], Any]]]:
        import cirq

        points: list[tuple[object, str, Callable[[Any], Any]]] = []
        for cls in _with_subclasses(cirq.Sampler):
            points += self._own_entry_points(cls)
        # Samplers defined (or first imported) from now on are patched as they are created.
        points.append(self.new_subclasses(cirq.Sampler, self._patch_new_sampler))
        return points

    def _own_entry_points(self, cls: type) -> list[tuple[object, str, Callable[[Any], Any]]]:
        return [
            (cls, method, functools.partial(self._wrap, method))
            for method in _ENTRY_POINTS
            if inspect.isfunction(vars(cls).get(method))
        ]

    def _patch_new_sampler(self, cls: type) -> None:
        for owner, name, make in self._own_entry_points(cls):
            self.patch(owner, name, make)

    def _wrap(self, method: str, original: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(original)
        arguments = _arguments(method, signature)
        read = functools.partial(self._submitted, method, signature, arguments)

        if method.endswith("_async"):

            @functools.wraps(original)
            async def wrapper_async(sampler: Any, *args: Any, **kwargs: Any) -> Any:
                with self.outermost() as outermost:
                    if not outermost:
                        return await original(sampler, *args, **kwargs)
                    job = self.guard(
                        f"recording cirq {method}", lambda: read(sampler, args, kwargs)
                    )
                    start = time.perf_counter()
                    try:
                        result = await original(sampler, *args, **kwargs)
                    except BaseException as exc:
                        self._ended(method, job, start, exc)
                        raise
                    self._ended(method, job, start, None)
                    return result

            return wrapper_async

        @functools.wraps(original)
        def wrapper(sampler: Any, *args: Any, **kwargs: Any) -> Any:
            with self.outermost() as outermost:
                if not outermost:
                    return original(sampler, *args, **kwargs)
                job = self.guard(f"recording cirq {method}", lambda: read(sampler, args, kwargs))
                start = time.perf_counter()
                try:
                    result = original(sampler, *args, **kwargs)
                except BaseException as exc:
                    self._ended(method, job, start, exc)
                    raise
                self._ended(method, job, start, None)
                return result

        return wrapper

    def _ended(
        self, method: str, job: _Job | None, start: float, error: BaseException | None
    ) -> None:
        """Emit the terminal record of a job whose call returned or raised just now."""
        runtime = time.perf_counter() - start
        if job is None:  # reading the call failed (counted by guard): no record
            return
        at = time.time()
        status = "completed" if error is None else "failed"
        self.guard(
            f"recording a {status} cirq {method}",
            lambda: self._finished(
                job, status, at, runtime, None if error is None else _error_code(error)
            ),
        )

    def _submitted(
        self,
        method: str,
        signature: inspect.Signature,
        arguments: tuple[_Argument, ...] | None,
        sampler: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> _Job:
        """On the user's thread: read the call's arguments, snapshot, emit ``submitted``."""
        at = time.time()
        program_arg, params_arg, repetitions_arg = _read(
            method, signature, arguments, sampler, args, kwargs
        )
        if method.startswith("run_batch"):
            programs = [_snapshot(program) for program in program_arg]
            params_list = [None] * len(programs) if params_arg is None else list(params_arg)
            repetitions = (
                [repetitions_arg] * len(programs)
                if isinstance(repetitions_arg, int)
                else list(repetitions_arg)
            )
        else:
            programs = [_snapshot(program_arg)]
            repetitions = [repetitions_arg]
            params_list = [params_arg]
        # A one-shot iterator is told apart now: the emitter's thread must not consume it.
        sweeps = [
            _ONE if method in ("run", "run_async") or isinstance(params, Iterator) else params
            for params in params_list
        ]
        job = _Job(
            backend=type(sampler).__name__,
            shots=max((int(r) for r in repetitions), default=None),
            figures=Memo(functools.partial(self._figures, programs, sweeps)),
        )
        self.emit(functools.partial(self._build, job, "submitted", at, None, None))
        return job

    def _figures(self, programs: list[Any], sweeps: list[Any]) -> _Figures:
        """The job's figures: run once, on the emitter's thread."""
        executions = [1 if params is _ONE else _executions(params) for params in sweeps]
        prints = [_fingerprint(program, self.moments) for program in programs]
        key = None if None in prints else tuple(prints)
        per_program, code_hash = self.structures.get(
            key, functools.partial(self._programs_figures, programs)
        )
        # Mismatched lengths are Cirq's ValueError to raise; the record just goes on.
        counted = zip(per_program, executions, strict=False)
        return _Figures(
            job_id=self.new_job_id(),
            num_circuits=min(sum(executions), _MAX_CIRCUITS),
            stats=combine_stats([_repeated(stats, n) for stats, n in counted if n > 0]),
            code_hash=code_hash,
        )

    def _programs_figures(self, programs: list[Any]) -> tuple[list[CircuitStats], str]:
        """Each program's statistics and their code hash: once per structure (`StructureCache`)."""
        circuits = [_thaw(program) for program in programs]
        per_program = [cirq_circuit_stats(circuit) for circuit in circuits]
        return per_program, self.code_hash(_structure(circuit) for circuit in circuits)

    def _finished(
        self, job: _Job, status: str, at: float, runtime_s: float, error_code: str | None
    ) -> None:
        self.emit(functools.partial(self._build, job, status, at, runtime_s, error_code))

    def _build(
        self,
        job: _Job,
        status: str,
        at: float,
        runtime_s: float | None,
        error_code: str | None,
    ) -> dict[str, Any]:
        """One record of the job, on the emitter's thread (a deferred record)."""
        figures = job.figures.get()
        return self.record(
            job_id=figures.job_id,
            status=status,
            backend=job.backend,
            num_circuits=figures.num_circuits,
            shots=job.shots,
            stats=figures.stats,
            code_hash=figures.code_hash,
            runtime_s=runtime_s,
            error_code=error_code,
            timestamp=self.stamp(at),
        )


#: One execution: ``run`` has a single parameter resolution (or a one-shot iterator).
_ONE: Any = object()


def _read(
    method: str,
    signature: inspect.Signature,
    arguments: tuple[_Argument, ...] | None,
    sampler: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> list[Any]:
    """(program, params, repetitions) of a call, as ``signature.bind`` would read them."""
    if arguments is None:
        bound = signature.bind(sampler, *args, **kwargs)
        bound.apply_defaults()
        positional = list(bound.arguments.values())[1:]
        return [
            bound.arguments[name] if name in bound.arguments else positional[i]
            for i, name in enumerate(_ENTRY_POINTS[method])
        ]
    values = []
    for argument in arguments:
        if argument.position < len(args):
            value = args[argument.position]
        else:
            value = kwargs.get(argument.name, argument.default) if argument.name else _MISSING
        if value is _MISSING:
            signature.bind(sampler, *args, **kwargs)  # raises Cirq's own TypeError
            value = None
        values.append(value)
    return values


def _snapshot(program: Any) -> Any:
    """An immutable view of a program as submitted: a ``cirq.Circuit``'s moments."""
    import cirq

    if type(program) is cirq.Circuit:
        return _Moments(program.moments)
    return program  # a FrozenCircuit is immutable; another AbstractCircuit is read later


class _Moments(tuple):  # type: ignore[type-arg]
    """The moments of a ``cirq.Circuit`` at submission (each ``cirq.Moment`` is immutable)."""

    __slots__ = ()


def _thaw(program: Any) -> Any:
    """The circuit of a `_snapshot`, rebuilt on the emitter's thread."""
    import cirq

    if isinstance(program, _Moments):
        return cirq.Circuit.from_moments(*program)
    return program


def _fingerprint(program: Any, moments: _MomentPrints) -> Hashable | None:
    """What a snapshot's statistics and code hash depend on; None when it is more than that.

    Per moment, the hash of its `_moment_print`, looked up by moment object in
    ``moments``: `StructureCache` keeps figures by the key's hash either way, and a tuple
    of ints hashes without hashing every qubit again.
    """
    import cirq

    if isinstance(program, _Moments):
        held: Sequence[cirq.Moment] = program
    elif isinstance(program, cirq.FrozenCircuit):
        held = program.moments
    else:
        return None
    key = tuple([moments.get(moment) for moment in held])
    return None if None in key else key


def _moment_print(moment: cirq.Moment) -> Hashable | None:
    """One moment's part of a `_fingerprint`; None when its figures depend on more.

    Per operation: the class that names it (`cirq_gate_name`: the gate's, else the
    operation's), its qubits and, for one on two qubits, whether it is a measurement.
    Parameter values are not read. A sub-circuit or a classically controlled operation is
    named and counted from what it holds: a moment with one has none.
    """
    import cirq

    operations = []
    for operation in moment.operations:
        bare = operation.untagged
        if isinstance(bare, cirq.CircuitOperation | cirq.ClassicallyControlledOperation):
            return None
        gate = bare.gate
        qubits = bare.qubits
        operations.append(
            (
                type(bare) if gate is None else type(gate),
                qubits,
                len(qubits) == 2 and cirq.is_measurement(operation),
            )
        )
    return tuple(operations)


class _MomentPrints:
    """The hash of the `_moment_print` of moments seen lately, by moment object (None for
    a moment that has none); on the emitter's thread only.

    A ``cirq.Moment`` is immutable, and a circuit submitted again (the same object, or a
    copy, or one that grew by a moment) holds the same moment objects: their prints are
    looked up rather than read again from every operation. Entries are keyed by ``id``
    and hold the moment by a weak reference, so a moment is never kept alive here and one
    that died is not mistaken for a new moment given its id. The oldest entry goes when
    ``size`` are held.
    """

    __slots__ = ("_entries", "size")

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._entries: dict[int, tuple[weakref.ref[cirq.Moment], int | None]] = {}

    def get(self, moment: cirq.Moment) -> int | None:
        key = id(moment)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is moment:
            return entry[1]
        printed = _moment_print(moment)
        value = None if printed is None else hash(printed)
        self._entries[key] = (weakref.ref(moment), value)
        if len(self._entries) > self.size:
            del self._entries[next(iter(self._entries))]
        return value


def _with_subclasses(cls: type) -> list[type]:
    """``cls`` and every subclass of it defined so far, each once, parents first."""
    found: list[type] = [cls]
    for klass in found:
        subclasses: list[type] = type.__subclasses__(klass)
        found.extend(sub for sub in subclasses if sub not in found)
    return found


def _executions(params: Any) -> int:
    """How many parameter resolutions a sweepable runs (1 for a one-shot iterator)."""
    import cirq

    if isinstance(params, Iterator):
        return 1
    return sum(len(sweep) for sweep in cirq.to_sweeps(params))


def _repeated(stats: CircuitStats, times: int) -> CircuitStats:
    """One circuit's statistics, run ``times`` times: gates summed, width and depth kept."""
    if times == 1:
        return stats
    return CircuitStats(
        num_qubits=stats.num_qubits,
        depth=stats.depth,
        gate_counts=frozen_counts((name, n * times) for name, n in stats.gate_counts.items()),
        two_qubit_gates=stats.two_qubit_gates * times,
    )


def _structure(circuit: cirq.AbstractCircuit) -> Sequence[tuple[str, Sequence[Hashable]]]:
    """(gate name, qubits) per operation in moment order, sub-circuits unrolled as counted."""
    flat = cirq_flatten(circuit)
    return [(cirq_gate_name(op), tuple(op.qubits)) for op in flat.all_operations()]

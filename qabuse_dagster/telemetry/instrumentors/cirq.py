"""Cirq instrumentation: every ``cirq.Sampler`` run, simulators included.

Cirq samplers execute synchronously, so one call is one job: the ``submitted`` record is
emitted as the call starts, the ``completed`` or ``failed`` record when it returns or
raises, with ``runtime_s`` the measured wall time of the call (Cirq reports no queue or
run time of its own). The job id is client-side (`Instrumentor.new_job_id`).

What is patched, at `instrument` time: ``run``, ``run_sweep`` and ``run_batch`` wherever a
class defines them, on ``cirq.Sampler`` and on every subclass of it imported by then.
That matters because Cirq's samplers override these: ``SimulatesSamples`` (so
``cirq.Simulator`` and ``cirq.DensityMatrixSimulator``) and ``StabilizerSampler`` define
their own ``run_sweep``, and a sampler that implements only ``run_sweep_async`` has a
``run_sweep`` filled in on its own class by Cirq's metaclass.

One user call is one job: ``run`` calls ``run_sweep``, ``run_batch`` calls ``run_sweep``
per program, and a sampler may delegate to another; every sampler call made inside an
instrumented call runs unrecorded (`Instrumentor.outermost`).

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

Limitations:

* The async methods (``run_async``, ``run_sweep_async``, ``run_batch_async``) are not
  wrapped. On the simulators they call ``run_sweep``, so each program is recorded as a
  job of its own; a sampler whose async methods talk to a service is not recorded.
* A ``Sampler`` subclass defined after `instrument` is recorded through the inherited
  ``run`` and ``run_batch``, but not when its own ``run_sweep`` is called directly.
* ``Sampler.sample`` with a list of sweeps calls ``run_sweep`` once per sweep: one job each.
* A sweep passed as a one-shot iterator is counted as one execution, since counting it
  would consume it.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qabuse_dagster.telemetry.circuit_stats import (
    CircuitStats,
    cirq_circuit_stats,
    cirq_flatten,
    cirq_gate_name,
    frozen_counts,
)
from qabuse_dagster.telemetry.instrument import Instrumentor, combine_stats
from qabuse_dagster.telemetry.instrument import error_code as _error_code

if TYPE_CHECKING:
    import cirq

__all__ = ["CirqInstrumentor"]

#: The sampler methods wrapped, with their arguments' names in Cirq's own signatures.
_ENTRY_POINTS: dict[str, tuple[str, str, str]] = {
    "run": ("program", "param_resolver", "repetitions"),
    "run_sweep": ("program", "params", "repetitions"),
    "run_batch": ("programs", "params_list", "repetitions"),
}
#: The schema's bound on ``num_circuits``; a longer sweep is reported at the bound.
_MAX_CIRCUITS = 1_000_000


@dataclass(frozen=True)
class _Job:
    """What both records of one sampler call share."""

    job_id: str
    backend: str
    num_circuits: int
    shots: int | None
    stats: CircuitStats | None
    code_hash: str


class CirqInstrumentor(Instrumentor):
    """Records ``cirq.Sampler`` runs: ``run``, ``run_sweep`` and ``run_batch``."""

    sdk = "cirq"
    distribution = "cirq-core"
    supported = ((1, 0), (2, 0))

    def patch_points(self) -> list[tuple[object, str, Callable[[Any], Any]]]:
        import cirq

        points: list[tuple[object, str, Callable[[Any], Any]]] = []
        for cls in _with_subclasses(cirq.Sampler):
            for method in _ENTRY_POINTS:
                if inspect.isfunction(vars(cls).get(method)):
                    points.append((cls, method, functools.partial(self._wrap, method)))
        return points

    def _wrap(self, method: str, original: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(original)

        @functools.wraps(original)
        def wrapper(sampler: Any, *args: Any, **kwargs: Any) -> Any:
            with self.outermost() as outermost:
                if not outermost:
                    return original(sampler, *args, **kwargs)
                return self._recorded(method, original, signature, sampler, args, kwargs)

        return wrapper

    def _recorded(
        self,
        method: str,
        original: Callable[..., Any],
        signature: inspect.Signature,
        sampler: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Run the user's call between its ``submitted`` and its terminal record."""
        job: _Job | None = self.guard(
            f"recording cirq {method}",
            lambda: self._submitted(method, signature, sampler, args, kwargs),
        )
        start = time.perf_counter()
        try:
            result = original(sampler, *args, **kwargs)
        except BaseException as exc:
            runtime = time.perf_counter() - start
            if job is not None:
                failed, code = job, _error_code(exc)
                self.guard(
                    f"recording a failed cirq {method}",
                    lambda: self._finished(failed, "failed", runtime, code),
                )
            raise
        runtime = time.perf_counter() - start
        if job is not None:
            completed = job
            self.guard(
                f"recording a completed cirq {method}",
                lambda: self._finished(completed, "completed", runtime, None),
            )
        return result

    def _submitted(
        self,
        method: str,
        signature: inspect.Signature,
        sampler: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> _Job:
        bound = signature.bind(sampler, *args, **kwargs)
        bound.apply_defaults()
        positional = list(bound.arguments.values())[1:]
        program_arg, params_arg, repetitions_arg = (
            bound.arguments[name] if name in bound.arguments else positional[i]
            for i, name in enumerate(_ENTRY_POINTS[method])
        )
        if method == "run_batch":
            programs = list(program_arg)
            params_list = [None] * len(programs) if params_arg is None else list(params_arg)
            repetitions = (
                [repetitions_arg] * len(programs)
                if isinstance(repetitions_arg, int)
                else list(repetitions_arg)
            )
            executions = [_executions(params) for params in params_list]
        else:
            programs = [program_arg]
            repetitions = [repetitions_arg]
            executions = [1 if method == "run" else _executions(params_arg)]
        per_program = [cirq_circuit_stats(program) for program in programs]
        # Mismatched lengths are Cirq's ValueError to raise; the record just goes on.
        counted = zip(per_program, executions, strict=False)
        job = _Job(
            job_id=self.new_job_id(),
            backend=type(sampler).__name__,
            num_circuits=min(sum(executions), _MAX_CIRCUITS),
            shots=max((int(r) for r in repetitions), default=None),
            stats=combine_stats([_repeated(stats, n) for stats, n in counted if n > 0]),
            code_hash=self.code_hash(_structure(program) for program in programs),
        )
        self.emit(self._record(job, "submitted"))
        return job

    def _finished(self, job: _Job, status: str, runtime_s: float, error_code: str | None) -> None:
        self.emit(self._record(job, status, runtime_s=runtime_s, error_code=error_code))

    def _record(
        self,
        job: _Job,
        status: str,
        *,
        runtime_s: float | None = None,
        error_code: str | None = None,
    ) -> dict[str, Any]:
        return self.record(
            job_id=job.job_id,
            status=status,
            backend=job.backend,
            num_circuits=job.num_circuits,
            shots=job.shots,
            stats=job.stats,
            code_hash=job.code_hash,
            runtime_s=runtime_s,
            error_code=error_code,
        )


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

"""PennyLane instrumentation: one job per batch a simulator device executes.

Every QNode call and every ``qml.execute`` ends in one call of a device's execution
method (`pennylane.devices.Device`): ``execute`` for a forward pass and for each batch of
shifted tapes a parameter-shift gradient runs, or ``execute_and_compute_derivatives``
(``_jvp``, ``_vjp``) when the device differentiates itself, as ``lightning.qubit`` does by
default for an analytic QNode with trainable parameters. Those four methods are wrapped on
``default.qubit`` (`DefaultQubit`) and, when ``pennylane-lightning`` is installed,
``lightning.qubit`` (`LightningQubit`); a subclass that does not override them is covered
by inheritance. ``compute_derivatives`` and its kin, which only differentiate a batch
``execute`` already ran, are not jobs.

What a record says:

* One job is one outermost call on a thread: a method reaching another wrapped one
  (the base ``execute_and_compute_jvp`` calls ``execute``) is the same job.
* ``num_circuits`` is the number of tapes in the batch (a lone tape is one), gate figures
  are `combine_stats` of `pennylane_circuit_stats` of each tape as the device receives it,
  after its decomposition.
* ``shots`` is ``tape.shots.total_shots`` of the first tape (a shot vector counts its
  sum; ``None`` when analytic). PennyLane gives every tape of a batch the QNode's shots,
  so a batch with mixed shots, built by hand, reports its first tape's.
* PennyLane executes synchronously and has no queue: ``submitted`` is emitted when the call
  starts, with no ``submit_latency_s``, and ``completed`` or ``failed`` when it returns,
  with ``runtime_s`` the call's measured wall time.
* ``code_hash`` reads each tape's operations as (``op.name`` lower-cased, wires);
  measurement processes are left out, as `pennylane_circuit_stats` leaves them out.

Where the work happens: on the user's thread a call captures only the device name, the
number of tapes, the first tape's shots, the time and references to the tapes; the records
are deferred (`Emitter.emit`), and the batch's statistics, code hash and job id are
computed once per job (`Memo`) on the emitter's thread. A tape is immutable once built
(PennyLane's transforms return new tapes), so no snapshot is taken: the figures are
those of the tapes the device received. Statistics and code hash are computed once per
structure (`StructureCache`, keyed by `_fingerprint`: classes, names, wires and control
counts of the operations, measurements' classes and wires), so a QNode called again with
new parameters costs a fingerprint; the fingerprint reads no cached property of the tape,
whose computation takes a lock PennyLane's own thread may be waiting on.
"""

from __future__ import annotations

import functools
import importlib
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qabuse_dagster.telemetry.circuit_stats import CircuitStats, pennylane_circuit_stats
from qabuse_dagster.telemetry.instrument import Instrumentor, Memo, combine_stats
from qabuse_dagster.telemetry.instrument import error_code as _error_code

if TYPE_CHECKING:
    from pennylane.tape import QuantumScript

logger = logging.getLogger(__name__)

__all__ = ["PennyLaneInstrumentor"]

#: Device classes wrapped, as "module:class"; one whose package is missing is skipped.
DEVICES: tuple[str, ...] = (
    "pennylane.devices.default_qubit:DefaultQubit",
    "pennylane_lightning.lightning_qubit:LightningQubit",
)
#: The `pennylane.devices.Device` methods that run a batch of tapes.
EXECUTION_METHODS: tuple[str, ...] = (
    "execute",
    "execute_and_compute_derivatives",
    "execute_and_compute_jvp",
    "execute_and_compute_vjp",
)


@dataclass(slots=True)  # per job; frozen would cost 4x to build
class _Figures:
    """What the emitter's thread computes once per job, for all of its records."""

    job_id: str
    stats: CircuitStats | None
    code_hash: str


@dataclass(slots=True)  # per job; frozen would cost 4x to build
class _Batch:
    """What the records of one execution say about its tapes."""

    backend: str
    num_circuits: int
    shots: int | None
    figures: Memo[_Figures]


class PennyLaneInstrumentor(Instrumentor):
    """Records each batch of tapes that ``default.qubit`` or ``lightning.qubit`` executes."""

    sdk = "pennylane"
    distribution = "pennylane"
    supported = ((0, 40), (1, 0))

    def patch_points(self) -> list[tuple[object, str, Callable[[Any], Any]]]:
        points: list[tuple[object, str, Callable[[Any], Any]]] = []
        for path in DEVICES:
            module, _, name = path.partition(":")
            try:
                device = getattr(importlib.import_module(module), name)
            except ImportError:
                logger.debug("qabuse-pennylane: %s is not installed; not instrumented", path)
                continue
            except Exception:  # a plugin that fails to load must not stop the others
                logger.warning("qabuse-pennylane: %s failed to import", path, exc_info=True)
                continue
            points.extend((device, method, self._wrap) for method in EXECUTION_METHODS)
        return points

    def _wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        instrumentor = self

        @functools.wraps(original)
        def execute(device: Any, circuits: Any, *args: Any, **kwargs: Any) -> Any:
            with instrumentor.outermost() as outermost:
                if not outermost:  # reached from an instrumented call: the same job
                    return original(device, circuits, *args, **kwargs)
                return instrumentor._run_job(original, device, circuits, args, kwargs)

        return execute

    def _run_job(
        self,
        original: Callable[..., Any],
        device: Any,
        circuits: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        batch: _Batch | None = self.guard(
            "reading the batch", lambda: self._batch(device, circuits)
        )
        record = functools.partial(self._emit, batch)
        self.guard("recording submission", functools.partial(record, "submitted", time.time()))
        started = time.perf_counter()
        try:
            result = original(device, circuits, *args, **kwargs)
        except Exception as exc:
            failed = functools.partial(
                record,
                "failed",
                time.time(),
                runtime_s=time.perf_counter() - started,
                error_code=_error_code(exc),
            )
            self.guard("recording failure", failed)
            raise
        runtime = time.perf_counter() - started
        completed = functools.partial(record, "completed", time.time(), runtime_s=runtime)
        self.guard("recording completion", completed)
        return result

    def _batch(self, device: Any, circuits: Any) -> _Batch | None:
        if isinstance(circuits, _tape_class()):
            tapes: list[QuantumScript] = [circuits]
        elif isinstance(circuits, Sequence):  # never consume an iterator the device needs
            tapes = list(circuits)
        else:
            logger.debug("qabuse-pennylane: %s is not a batch of tapes", type(circuits))
            return None
        return _Batch(
            backend=str(device.name),
            num_circuits=len(tapes),
            shots=tapes[0].shots.total_shots if tapes else None,
            figures=Memo(functools.partial(self._figures, tapes)),
        )

    def _figures(self, tapes: list[QuantumScript]) -> _Figures:
        """The batch's statistics and code hash: once per job, on the emitter's thread.

        Computed once per structure (`StructureCache`): a batch whose tapes all have a
        fingerprint reuses the figures of an earlier batch of the same structure.
        """
        prints = [_fingerprint(tape) for tape in tapes]
        key = None if None in prints else tuple(prints)
        stats, code_hash = self.structures.get(key, functools.partial(self._tapes_figures, tapes))
        return _Figures(job_id=self.new_job_id(), stats=stats, code_hash=code_hash)

    def _tapes_figures(self, tapes: list[QuantumScript]) -> tuple[CircuitStats | None, str]:
        return (
            combine_stats([pennylane_circuit_stats(tape) for tape in tapes]),
            self.code_hash(_structure(tape) for tape in tapes),
        )

    def _emit(
        self,
        batch: _Batch | None,
        status: str,
        at: float,
        *,
        runtime_s: float | None = None,
        error_code: str | None = None,
    ) -> None:
        if batch is None:  # the batch could not be read: no record rather than a wrong one
            return
        self.emit(
            functools.partial(
                self._build, batch, status, at, runtime_s=runtime_s, error_code=error_code
            )
        )

    def _build(
        self,
        batch: _Batch,
        status: str,
        at: float,
        *,
        runtime_s: float | None,
        error_code: str | None,
    ) -> dict[str, Any]:
        """One record of the job, on the emitter's thread (a deferred record)."""
        figures = batch.figures.get()
        return self.record(
            job_id=figures.job_id,
            status=status,
            backend=batch.backend,
            num_circuits=batch.num_circuits,
            shots=batch.shots,
            stats=figures.stats,
            code_hash=figures.code_hash,
            runtime_s=runtime_s,
            error_code=error_code,
            timestamp=self.stamp(at),
        )


@functools.cache
def _tape_class() -> type[QuantumScript]:
    """``QuantumScript``, imported once: an import statement costs a µs on each call."""
    from pennylane.tape import QuantumScript

    return QuantumScript


def _structure(tape: QuantumScript) -> list[tuple[str, tuple[Any, ...]]]:
    """A tape's operations as (lower-case name, wires): no parameter value is read."""
    return [(op.name.lower(), tuple(op.wires)) for op in tape.operations]


def _fingerprint(tape: QuantumScript) -> Hashable | None:
    """What a tape's statistics and code hash depend on; None when it is more than that.

    Per operation: its class, ``name``, wires and, for a ``Controlled`` that ``specs``
    names by its control count, that count; per measurement its class and wires (they
    count in the width and the depth). Parameter values are not read, and neither is a
    cached property of the tape: computing one takes a lock that PennyLane's own
    thread may be waiting on. An operation that counts its own resources
    (``ResourcesOperation``) and a measurement of a mid-circuit value give None.
    """
    operations = []
    for op in tape.operations:
        kind: type = type(op)
        reads = _reads(kind)
        if reads is None:
            return None
        counts_controls, joins_wires = reads
        controls = len(op.control_wires) if counts_controls else 0
        # Controlled.wires joins the two parts into a new Wires on each read (a few µs,
        # the most of a fingerprint): the parts say the same for less.
        wires = (
            (op.control_wires.labels, op.target_wires.labels) if joins_wires else op.wires.labels
        )
        operations.append((kind, op.name, wires, controls))
    measurements = []
    for mp in tape.measurements:
        if getattr(mp, "mv", None) is not None:
            return None
        measurements.append((type(mp), mp.wires.labels))
    return tuple(operations), tuple(measurements)


@functools.cache
def _reads(kind: type) -> tuple[bool, bool] | None:
    """What `_fingerprint` reads of an operation of class ``kind``, decided once per class.

    None for a ``ResourcesOperation`` (it counts its own resources: no fingerprint), else
    whether ``specs`` names it by its control count (a plain ``Controlled`` or
    ``ControlledOp``) and whether its ``wires`` is ``Controlled.wires``, which is
    ``control_wires + target_wires``.
    """
    from pennylane.ops import Controlled, ControlledOp
    from pennylane.resource import ResourcesOperation

    if issubclass(kind, ResourcesOperation):
        return None
    joins_wires = issubclass(kind, Controlled) and getattr(kind, "wires", None) is Controlled.wires
    return kind is Controlled or kind is ControlledOp, joins_wires

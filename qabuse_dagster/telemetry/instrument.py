"""SDK instrumentation: ``instrument("qiskit" | "cirq" | "pennylane", sink=...)``.

One instrumentor per SDK, on the shared `Instrumentor` base here. An instrumentor wraps
the SDK's submission entry points (`Instrumentor.patch_points`); each wrapped call emits
a ``submitted`` record before it returns and a terminal record (``completed`` or
``failed``) when the job finishes. Guarantees shared by every SDK:

* **Nothing is patched at import**: `instrument` imports the SDK's instrumentor module
  and patches; `Handle.uninstrument` restores exactly the attributes it replaced, in
  reverse order. Instrumenting an SDK twice is a no-op that returns the active handle.
* **The user's code is never slowed for long or broken**: records go to a bounded queue
  drained by a background thread (`Emitter`); a full queue or a failing sink counts the
  records as dropped, never raises, and an error inside the instrumentation itself is
  logged and counted while the SDK call goes on as if uninstrumented.
* **No raw identifier leaves the process**: the user id, API key id and circuit
  structure are HMAC-SHA256 hashed (`qabuse_dagster.telemetry.hashing`) before a record
  exists; circuit text and parameter values are never read into a record.
* **The submission call does only what the record's identity and timing need**: an
  instrumentor captures the job, its timestamps and references to (or cheap snapshots
  of) the circuits on the user's thread and emits a *deferred record* (a callable, see
  `Emitter.emit`); circuit statistics and the code hash are computed once per job
  (`Memo`) on the emitter's thread, just before the batch reaches the sink, and once per
  circuit structure (`StructureCache`): a variational loop resubmitting one structure
  with new parameter values pays for a structural fingerprint, not for the figures.
* **One script run many times is one code hash**: `structure_hash` reads gate names and
  qubit positions only, with qubits renumbered by first use, so parameter values and
  qubit relabelling leave it unchanged.
"""

from __future__ import annotations

import contextvars
import importlib
import importlib.metadata
import itertools
import json
import logging
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, TypeVar, cast

from qabuse_dagster.telemetry.circuit_stats import CircuitStats, frozen_counts
from qabuse_dagster.telemetry.hashing import KeyedHasher
from qabuse_dagster.telemetry.sinks import Sink

logger = logging.getLogger(__name__)

__all__ = [
    "Deferred",
    "Emitter",
    "Handle",
    "Instrumentor",
    "Memo",
    "StructureCache",
    "error_code",
    "instrument",
    "structure_hash",
]

#: Version in every record's ``client_agent`` (``qabuse-<sdk>/<version> <sdk>/<version>``).
INSTRUMENTOR_VERSION = "0.1"
#: SDK name -> "module:class" of its instrumentor, imported only by `instrument`.
INSTRUMENTORS: dict[str, str] = {
    "qiskit": "qabuse_dagster.telemetry.instrumentors.qiskit:QiskitInstrumentor",
    "cirq": "qabuse_dagster.telemetry.instrumentors.cirq:CirqInstrumentor",
    "pennylane": "qabuse_dagster.telemetry.instrumentors.pennylane:PennyLaneInstrumentor",
}
_ACTIVE: dict[str, Handle] = {}
_ACTIVE_LOCK = threading.Lock()

#: A deferred record: called on the emitter's thread to build the record (or records).
Deferred = Callable[[], "dict[str, Any] | list[dict[str, Any]]"]
_T = TypeVar("_T")


class Memo(Generic[_T]):
    """A value computed on first use, then shared: what the records of one job have in common.

    Built on the user's thread around a closure over what was captured there; `get` is
    called by deferred records on the emitter's thread, so the closure runs there, once.
    An exception is kept and raised again by every later `get` (each record that needs
    the value fails to build, see `Emitter`). The closure is dropped after it ran, and
    with it the references to the job's circuits.
    """

    __slots__ = ("_compute", "_error", "_value")

    def __init__(self, compute: Callable[[], _T]) -> None:
        self._compute: Callable[[], _T] | None = compute
        self._error: Exception | None = None
        self._value: _T | None = None

    def get(self) -> _T:
        compute = self._compute
        if compute is not None:
            self._compute = None
            try:
                self._value = compute()
            except Exception as exc:
                self._error = exc
        if self._error is not None:
            raise self._error
        return cast("_T", self._value)


class StructureCache(Generic[_T]):
    """Figures already computed for a circuit structure, keyed by a structural fingerprint.

    A variational loop submits the same circuit structure again and again with other
    parameter values; its statistics and code hash are the same each time, so they are
    computed once per structure. A fingerprint is what an instrumentor reads from the
    snapshot of a job's circuits: everything the figures depend on (gate kinds and names,
    the qubits or wires they act on, the width) and no parameter value. An instrumentor
    gives None for a circuit whose figures depend on more than that (control flow, a
    sub-circuit, an operation that counts its own resources); it is then computed, not
    cached. Used on the emitter's thread only, so it takes no lock. The oldest entry goes
    when ``size`` are held; a failed computation is not kept. Entries are keyed by the
    fingerprint's 64-bit hash, not the fingerprint itself, so a big circuit's entry costs
    a few bytes rather than a copy of its structure; two structures sharing a hash (odds
    about ``size / 2**64`` per job) would share figures.
    """

    __slots__ = ("_entries", "hits", "misses", "size")

    def __init__(self, size: int = 512) -> None:
        if size <= 0:
            raise ValueError("size must be positive")
        self.size = size
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, _T] = OrderedDict()

    def get(self, key: Hashable | None, compute: Callable[[], _T]) -> _T:
        """The value cached under ``key``, else ``compute()`` (kept unless ``key`` is None)."""
        if key is not None:
            key = hash(key)
            try:
                value = self._entries[key]
            except KeyError:
                pass
            else:
                self.hits += 1
                self._entries.move_to_end(key)
                return value
        self.misses += 1
        value = compute()
        if key is not None:
            self._entries[key] = value
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value


class Emitter:
    """A bounded queue of records, drained into a sink by one background thread.

    `emit` never blocks and never raises: when the queue is full the record is counted
    in `dropped`. A sink that raises has the batch counted in `sink_failures` (and logged
    once per run of failures); the thread carries on with the next batch.

    A record may be *deferred*: a callable with no arguments that returns the record (or
    a list of records). It takes one place in the queue and counts as one record for
    `emitted` and `dropped`; the thread calls it just before handing the batch to the
    sink. A deferred record that raises is counted in `build_failures` (the first
    failure is logged) and left out of the batch; nothing is raised.

    `emit` is an append to a deque and wakes the thread only when it is idle: a thread
    woken for each record would take the interpreter lock from the user's thread once per
    record, in the middle of the user's next submission.

    Args:
        sink: Where batches go.
        max_queue: Records waiting at most; more are dropped.
        batch: Records handed to the sink at once, at most.
        linger_s: How long the thread waits for a batch to fill after its first record
            (a flush cuts the wait short).
    """

    def __init__(
        self, sink: Sink, max_queue: int = 10_000, batch: int = 256, linger_s: float = 0.05
    ) -> None:
        if max_queue <= 0 or batch <= 0 or linger_s < 0:
            raise ValueError("max_queue and batch must be positive, linger_s not negative")
        self.sink = sink
        self.max_queue = max_queue
        self.batch = batch
        self.linger_s = linger_s
        self.emitted = 0
        self.dropped = 0
        self.sink_failures = 0
        self.build_failures = 0
        self._pending: deque[dict[str, Any] | Deferred] = deque()
        self._done = 0  # records taken from `_pending` and finished (written or counted)
        self._finished = threading.Condition()
        self._idle = True  # the thread waits for a first record; `emit` wakes it
        self._wake = threading.Event()  # a record arrived while idle, or stop
        self._hurry = threading.Event()  # end the linger now: a flush, a full batch, stop
        self._stopping = False
        self._failing = False
        self._build_logged = False
        self._thread = threading.Thread(target=self._run, name="qabuse-emitter", daemon=True)
        self._thread.start()

    def emit(self, record: dict[str, Any] | Deferred) -> None:
        """Queue a record, or a deferred record (see the class); never blocks or raises."""
        pending = self._pending
        if len(pending) >= self.max_queue or self._stopping:
            self.dropped += 1
            return
        pending.append(record)
        self.emitted += 1
        if self._idle:
            self._idle = False
            self._wake.set()
        elif len(pending) >= self.batch and not self._hurry.is_set():
            self._hurry.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            # Linger for a batch: records are built and written in bursts, between the
            # user's calls more often than in the middle of one.
            if not self._stopping and len(self._pending) < self.batch:
                self._hurry.wait(self.linger_s)
            self._hurry.clear()
            while self._pending:
                items = [
                    self._pending.popleft() for _ in range(min(self.batch, len(self._pending)))
                ]
                self._write(self._build(items))
                with self._finished:
                    self._done += len(items)
                    self._finished.notify_all()
            if self._stopping:
                return
            # Idle again; a record emitted just before this reads `_idle` as False and
            # does not wake the thread, so look once more after saying so.
            self._idle = True
            if self._pending and self._idle:
                self._idle = False
                self._wake.set()

    def _write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        try:
            self.sink.write(records)
            self._failing = False
        except Exception:
            self.sink_failures += len(records)
            if not self._failing:
                logger.warning("telemetry sink failed; records dropped", exc_info=True)
            self._failing = True

    def _build(self, items: list[dict[str, Any] | Deferred]) -> list[dict[str, Any]]:
        """The batch's records, deferred ones built now; a failing build is counted."""
        records: list[dict[str, Any]] = []
        for item in items:
            if isinstance(item, dict):
                records.append(item)
                continue
            try:
                built = item()
            except Exception:
                self.build_failures += 1
                if not self._build_logged:
                    self._build_logged = True
                    logger.warning(
                        "telemetry: building a deferred record failed; it is dropped (logged "
                        "once, counted in build_failures)",
                        exc_info=True,
                    )
                continue
            if isinstance(built, dict):
                records.append(built)
            else:
                records.extend(built)
        return records

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record queued so far reached the sink, then flush it.

        Cuts the thread's linger short. False on timeout or when the thread is gone.
        """
        deadline = time.monotonic() + timeout
        target = self.emitted
        self._hurry.set()
        with self._finished:
            while self._done < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._finished.wait(left)
        try:
            self.sink.flush()
        except Exception:
            logger.warning("telemetry sink failed to flush", exc_info=True)
            return False
        return True

    def stop(self, timeout: float = 10.0) -> bool:
        """Flush, then end the thread (the sink stays open: its owner closes it).

        Records emitted after this are dropped and counted.
        """
        flushed = self.flush(timeout)
        if self._thread.is_alive():
            self._stopping = True
            self._hurry.set()
            self._wake.set()
            self._thread.join(timeout)
        return flushed


@dataclass(frozen=True)
class Identity:
    """Who submits, already hashed."""

    user: str
    api_key_id: str
    provider: str | None


@dataclass
class Handle:
    """An active instrumentation of one SDK; `uninstrument` undoes it."""

    sdk: str
    instrumentor: Instrumentor
    emitter: Emitter
    instrumentation_errors: int = 0
    _active: bool = field(default=True, repr=False)

    @property
    def stats(self) -> dict[str, int]:
        """Records emitted, dropped (queue full), lost to sink failures or to a failing
        deferred build (`Emitter`); internal errors on the user's thread."""
        return {
            "emitted": self.emitter.emitted,
            "dropped": self.emitter.dropped,
            "sink_failures": self.emitter.sink_failures,
            "build_failures": self.emitter.build_failures,
            "instrumentation_errors": self.instrumentation_errors,
        }

    def flush(self, timeout: float = 10.0) -> bool:
        return self.emitter.flush(timeout)

    def uninstrument(self) -> None:
        """Restore the SDK's own entry points and deliver what is queued. Idempotent."""
        with _ACTIVE_LOCK:
            if not self._active:
                return
            self._active = False
            self.instrumentor.uninstall()
            if _ACTIVE.get(self.sdk) is self:
                del _ACTIVE[self.sdk]
        self.emitter.stop()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstrument()


class _Outermost:
    """`Instrumentor.outermost`: a plain class, as a generator-based context manager costs
    several times more and runs on every instrumented call."""

    __slots__ = ("_depth", "_token")

    def __init__(self, depth: contextvars.ContextVar[int]) -> None:
        self._depth = depth

    def __enter__(self) -> bool:
        depth = self._depth.get()
        self._token = self._depth.set(depth + 1)
        return depth == 0

    def __exit__(self, *exc: object) -> None:
        self._depth.reset(self._token)


class Instrumentor(ABC):
    """The base of one SDK's instrumentor: patching, identity, record building.

    A subclass names its SDK (`sdk`, `distribution`, `supported`) and lists the entry
    points to wrap (`patch_points`); its wrappers call `submitted` and `finished`.
    """

    sdk: ClassVar[str]
    #: The pip distribution whose version is reported (``qiskit``, ``cirq-core`` ...).
    distribution: ClassVar[str]
    #: SDK versions the instrumentor is tested with: at least the first, below the second.
    supported: ClassVar[tuple[tuple[int, ...], tuple[int, ...]]]

    def __init__(self, identity: Identity, hasher: KeyedHasher, emitter: Emitter) -> None:
        self.identity = identity
        self.hasher = hasher
        self.emitter = emitter
        self.handle: Handle | None = None
        self.sdk_version = importlib.metadata.version(self.distribution)
        low, high = self.supported
        if not low <= _release(self.sdk_version) < high:
            logger.warning(
                "%s %s is outside the versions qabuse-%s supports (>=%s, <%s): records "
                "may lack fields or miss submissions",
                self.distribution,
                self.sdk_version,
                self.sdk,
                ".".join(map(str, low)),
                ".".join(map(str, high)),
            )
        self.client_agent = (
            f"qabuse-{self.sdk}/{INSTRUMENTOR_VERSION} {self.sdk}/{self.sdk_version}"
        )
        # Every field of a record in the contract's order, those that never change filled
        # in: `record` copies it and sets the others, which keeps that order.
        self._record_template: dict[str, Any] = dict.fromkeys(_RECORD_FIELDS)
        self._record_template.update(
            schema_version=1,
            user=identity.user,
            api_key_id=identity.api_key_id,
            provider=(identity.provider or "local")[:64],
            sdk=self.sdk,
            sdk_version=self.sdk_version[:32],
            client_agent=self.client_agent[:128],
        )
        self._originals: list[tuple[object, str, Any, bool]] = []
        self._depth: contextvars.ContextVar[int] = contextvars.ContextVar(
            f"qabuse_{self.sdk}_depth", default=0
        )
        self._classes_lock = threading.Lock()
        self._watching_classes = False
        #: Figures per circuit structure, shared by this instrumentor's jobs (emitter's thread).
        self.structures: StructureCache[Any] = StructureCache()

    @abstractmethod
    def patch_points(self) -> list[tuple[object, str, Callable[[Any], Any]]]:
        """(owner, attribute, make) triples: ``owner.attribute`` becomes ``make(original)``.

        ``original`` is what ``getattr(owner, attribute)`` returns (a plain function for
        a method); ``make`` returns the replacement, to be set on ``owner``.
        """

    def install(self) -> None:
        for owner, name, make in self.patch_points():
            self.patch(owner, name, make)
        with self._classes_lock:
            self._watching_classes = True

    def new_subclasses(
        self, base: type, on_new: Callable[[type], None]
    ) -> tuple[object, str, Callable[[Any], Any]]:
        """A patch point for ``base.__init_subclass__``: ``on_new(cls)`` for each new subclass.

        Covers classes defined, or first imported, after `install`: ``on_new`` patches
        them with `patch`, so `uninstall` restores them with the rest. The base's own
        ``__init_subclass__`` (else the next in the MRO) runs first, as uninstrumented.
        """

        def make(_inherited: Any) -> classmethod[Any, ..., None]:
            own = vars(base).get("__init_subclass__")

            def __init_subclass__(cls: type, **kwargs: Any) -> None:
                if own is not None:
                    own.__get__(None, cls)(**kwargs)
                else:
                    parent: Any = super(base, cls)  # the next __init_subclass__ after base's
                    parent.__init_subclass__(**kwargs)
                self.guard(
                    f"instrumenting {cls.__qualname__}", lambda: self._new_class(on_new, cls)
                )

            return classmethod(__init_subclass__)

        return base, "__init_subclass__", make

    def _new_class(self, on_new: Callable[[type], None], cls: type) -> None:
        with self._classes_lock:
            if self._watching_classes:  # not once `uninstall` has begun
                on_new(cls)

    def patch(self, owner: object, name: str, make: Callable[[Any], Any]) -> None:
        """Replace ``owner.name`` with ``make(original)``; `uninstall` restores it.

        For patches found only while instrumented (a job class first seen at submission).
        """
        own = name in vars(owner)
        original = vars(owner)[name] if own else None
        setattr(owner, name, make(getattr(owner, name)))
        self._originals.append((owner, name, original, own))

    def uninstall(self) -> None:
        with self._classes_lock:
            self._watching_classes = False
        while self._originals:
            owner, name, original, own = self._originals.pop()
            if own:
                setattr(owner, name, original)
            else:  # it was inherited: remove the override
                delattr(owner, name)

    def outermost(self) -> _Outermost:
        """Whether this is the outermost instrumented call in this context.

        Used as ``with self.outermost() as outermost:``. SDK entry points call each other
        (a subclass's ``run`` calls its base's, ``run`` calls ``run_sweep``): only the
        outermost call is the user's job, so wrappers record only when this yields True.
        The depth is a context variable: each thread has its own, and so has each asyncio
        task, so two coroutines awaiting instrumented calls on one event loop are two
        jobs, not one nested in the other.
        """
        return _Outermost(self._depth)

    def guard(self, what: str, action: Callable[[], Any]) -> Any:
        """Run instrumentation code; on any error log it, count it and return None."""
        try:
            return action()
        except Exception:
            if self.handle is not None:
                self.handle.instrumentation_errors += 1
            logger.warning("qabuse-%s: %s failed; the job runs on", self.sdk, what, exc_info=True)
            return None

    def record(
        self,
        *,
        job_id: str,
        status: str,
        backend: str,
        num_circuits: int,
        shots: int | None,
        stats: CircuitStats | None,
        code_hash: str,
        submit_latency_s: float | None = None,
        queue_time_s: float | None = None,
        runtime_s: float | None = None,
        error_code: str | None = None,
        retry_count: int = 0,
        timestamp: datetime | None = None,
    ) -> dict[str, Any]:
        """A contract record (JSON-ready) for one lifecycle event.

        Stamped ``timestamp`` (an aware UTC datetime), else now: a deferred record passes
        the instant of the event, captured on the user's thread (see `stamp`).
        """
        when = timestamp or datetime.now(UTC)
        record = self._record_template.copy()
        record["job_id"] = job_id[:128]
        record["timestamp"] = _utc_text(when)
        record["backend"] = (backend or "unknown")[:128]
        record["num_circuits"] = num_circuits
        record["shots"] = shots
        if stats is not None:
            record["num_qubits"] = stats.num_qubits
            record["depth"] = stats.depth
            record["gate_counts"] = stats.gate_counts.copy()  # a dict of the read-only counts
            record["two_qubit_gates"] = stats.two_qubit_gates
        record["submit_latency_s"] = submit_latency_s
        record["queue_time_s"] = queue_time_s
        record["runtime_s"] = runtime_s
        record["status"] = status
        if error_code:
            record["error_code"] = error_code[:64]
        record["retry_count"] = retry_count
        record["code_hash"] = code_hash
        return record

    def emit(self, record: dict[str, Any] | Deferred) -> None:
        self.emitter.emit(record)

    @staticmethod
    def stamp(seconds: float) -> datetime:
        """The aware UTC datetime of a ``time.time()`` taken on the user's thread."""
        return datetime.fromtimestamp(seconds, UTC)

    def code_hash(self, circuits: Iterable[Sequence[tuple[str, Sequence[Hashable]]]]) -> str:
        return structure_hash(self.hasher, circuits)

    @staticmethod
    def new_job_id() -> str:
        """A client-side job id, for SDKs whose jobs have none.

        ``qabuse-`` and a random (version 4) UUID in hex, as ``uuid.uuid4().hex`` writes
        it (see `_RandomUuids`).
        """
        return f"qabuse-{_RANDOM_UUIDS.next_hex()}"


#: A record's fields in the contract's order (``shared/contracts``), as records list them.
_RECORD_FIELDS = (
    "schema_version",
    "job_id",
    "timestamp",
    "user",
    "api_key_id",
    "provider",
    "region",
    "backend",
    "sdk",
    "sdk_version",
    "num_circuits",
    "shots",
    "num_qubits",
    "depth",
    "gate_counts",
    "two_qubit_gates",
    "submit_latency_s",
    "queue_time_s",
    "runtime_s",
    "status",
    "error_code",
    "retry_count",
    "client_agent",
    "code_hash",
    "source_ip_hash",
    "country",
    "tags",
)


def _utc_text(when: datetime) -> str:
    """``when`` as a record's timestamp: ``when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")``.

    ``isoformat`` gives the same characters for half the cost; before year 1000, where
    ``strftime`` does not pad the year, ``strftime`` it is.
    """
    if when.year < 1000:
        return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return when.isoformat(timespec="microseconds")[:26] + "Z"


class _RandomUuids:
    """Random (version 4) UUIDs in hex, as ``uuid.uuid4().hex``, from a pool of random bytes.

    ``uuid.uuid4`` reads 16 bytes of ``os.urandom`` per id: a system call, during which
    the thread lets go of the interpreter lock, so on the emitter's thread each job would
    hand the lock to the user's thread and wait to get it back. The pool reads the same
    source ``ids`` at a time and sets the version and variant bits as
    ``uuid.UUID(bytes=..., version=4)`` does. A forked child drops its pool, so it never
    repeats its parent's ids (the hook is registered with the first pool, not at import).
    """

    #: ``uuid.UUID(version=4)`` clears these bits, then sets variant RFC 4122, version 4.
    _CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
    _SET = (0x8000 << 48) | (4 << 76)

    def __init__(self, ids: int = 64) -> None:
        self._size = 16 * ids
        self._pool = b""
        self._at = 0
        self._lock = threading.Lock()
        self._watching_forks = False

    def next_hex(self) -> str:
        with self._lock:
            at = self._at
            if at >= len(self._pool):
                if not self._watching_forks and hasattr(os, "register_at_fork"):  # POSIX
                    os.register_at_fork(after_in_child=self.forget)
                self._watching_forks = True
                self._pool = os.urandom(self._size)
                at = 0
            self._at = at + 16
            chunk = self._pool[at : at + 16]
        return f"{int.from_bytes(chunk) & self._CLEAR | self._SET:032x}"

    def forget(self) -> None:
        """Drop the pool: in a forked child, its bytes are the parent's."""
        self._lock = threading.Lock()  # the parent's may have been held by another thread
        self._pool = b""
        self._at = 0


_RANDOM_UUIDS = _RandomUuids()


def error_code(exc: BaseException) -> str:
    """A record's ``error_code`` for an exception: its class name in snake case.

    ``NotImplementedError`` -> ``not_implemented_error``, ``HTTPError`` -> ``http_error``.
    """
    return _SNAKE_BOUNDARY.sub("_", type(exc).__name__).lower()[:64]


_SNAKE_BOUNDARY = re.compile(r"(?<=[A-Z])(?=[A-Z][a-z])|(?<=[a-z0-9])(?=[A-Z])")


def _release(version: str) -> tuple[int, ...]:
    """``2.6.2`` -> (2, 6, 2); a pre-release or local suffix is ignored."""
    parts = []
    for part in version.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def combine_stats(stats: Sequence[CircuitStats]) -> CircuitStats | None:
    """One record's figures for a batch of circuits: widest, deepest, gates summed.

    A batch of one is that circuit's figures, as they are (a `CircuitStats` is frozen and
    its counts already summed by name, see `frozen_counts`).
    """
    if not stats:
        return None
    if len(stats) == 1:
        return stats[0]
    return CircuitStats(
        num_qubits=max(s.num_qubits for s in stats),
        depth=max(s.depth for s in stats),
        gate_counts=frozen_counts(item for s in stats for item in s.gate_counts.items()),
        two_qubit_gates=sum(s.two_qubit_gates for s in stats),
    )


def structure_hash(
    hasher: KeyedHasher, circuits: Iterable[Sequence[tuple[str, Sequence[Hashable]]]]
) -> str:
    """The ``code``-domain hash of circuits' structure: gate names and qubit positions.

    Each circuit is its operations in order, as (lower-case gate name, qubits acted on);
    parameter values are not part of it. Qubits are renumbered by first use within each
    circuit, so relabelling them gives the same hash.
    """
    canonical = []
    for ops in circuits:
        numbers: dict[Hashable, int] = {}
        canonical.append(
            [
                [name.lower(), [numbers.setdefault(q, len(numbers)) for q in qubits]]
                for name, qubits in ops
            ]
        )
    return hasher.hash(json.dumps(canonical, separators=(",", ":")), domain="code")


def instrument(
    sdk: str,
    sink: Sink,
    user_id: str,
    api_key_id: str,
    provider: str | None = None,
    *,
    hasher: KeyedHasher | None = None,
    max_queue: int = 10_000,
) -> Handle:
    """Instrument one SDK's job submission; records go to ``sink``.

    Args:
        sdk: ``qiskit``, ``cirq`` or ``pennylane``.
        sink: A `JsonlSink`, `HttpSink`, `MemorySink` or any `Sink`.
        user_id: The submitting user's id; hashed here, never sent.
        api_key_id: The API key's id (never its secret); hashed here.
        provider: The provider of the backends (default ``local``).
        hasher: The keyed hasher; default from ``QABUSE_HASH_KEY``.
        max_queue: Records waiting for the sink at most; more are dropped and counted.

    Returns:
        The active handle; ``handle.uninstrument()`` undoes the patching. If the SDK is
        already instrumented, that handle is returned and nothing is patched twice.
    """
    if sdk not in INSTRUMENTORS:
        raise ValueError(f"sdk {sdk!r}: expected one of {sorted(INSTRUMENTORS)}")
    if not user_id or not api_key_id:
        raise ValueError("user_id and api_key_id must be non-empty")
    with _ACTIVE_LOCK:
        if sdk in _ACTIVE:
            logger.warning("%s is already instrumented: returning the active handle", sdk)
            return _ACTIVE[sdk]
        hasher = hasher or KeyedHasher.from_env()
        identity = Identity(
            user=hasher.hash(user_id, domain="user"),
            api_key_id=hasher.hash(api_key_id, domain="api_key"),
            provider=provider,
        )
        module, _, name = INSTRUMENTORS[sdk].partition(":")
        cls = getattr(importlib.import_module(module), name)
        emitter = Emitter(sink, max_queue=max_queue)
        instrumentor: Instrumentor = cls(identity, hasher, emitter)
        handle = Handle(sdk=sdk, instrumentor=instrumentor, emitter=emitter)
        instrumentor.handle = handle
        instrumentor.install()
        _ACTIVE[sdk] = handle
        return handle

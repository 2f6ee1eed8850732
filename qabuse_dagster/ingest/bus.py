"""The ingest bus: accepted telemetry from collectors to sharded stream workers (NATS JetStream).

With ``QABUSE_BUS_URL`` set (`settings.bus_url`), ``qabuse collector --bus`` publishes what
it accepts to a JetStream stream, and ``qabuse stream --bus --shard i/n`` runs one of ``n``
stream workers on it, each on any machine that reaches the NATS server. Unset, nothing
changes: one stream worker tails the collector's spool.

Layout. One stream, `STREAM` (``QABUSE_TELEMETRY``), on the subjects ``qabuse.telemetry.<s>``
for the shards ``s`` in ``0 .. shards - 1``, where ``shards`` is fixed in the deployment's
configuration (``QABUSE_BUS_SHARDS``, `settings.bus_shards`) and never changes while the
stream holds data. A record's shard is a stable hash of its api key (`shard_of`: blake2b,
the same in every process and release, unlike Python's ``hash``). A worker ``i`` of ``n``
owns the shards ``s`` with ``s % n == i`` (`WorkerShard`): more shards than workers, so the
worker count can change (up to ``shards``) without moving a key between shards. The stream
keeps messages for `STREAM_MAX_AGE`, longer than the features' lookback: it is where a
worker that starts rebuilds its windows from (`BusConsumer.history`).

Publishing. The spool stays the source of truth. The collector commits a batch to its
spool first (and answers); `BusPublisher` then reads the spool after its own cursor, a
spool consumer named `PUBLISHER` (`read_batches`, `commit_consumer`, exactly as the stream
worker tails the spool), splits each batch by shard, publishes one message per shard and
moves the cursor only once JetStream has acknowledged every message of the batches before
it. A publish that fails (the server down, a timeout) leaves the cursor where it was: the
loop retries with a backoff and catches up, and compaction, which waits for every spool
consumer, never stages a batch before it was published. A batch published again after a
crash between the acknowledgement and the cursor's commit is recognised by JetStream
(``Nats-Msg-Id``, a hash of the message, within `DUPLICATE_WINDOW`); beyond that window,
or when two collectors accept the same record, the workers' identity check drops it.
Collector processes sharing one spool take turns: one publishes (a file lock), the others
wait to take over.

Consuming. A worker has one durable pull consumer, named after its shard (``stream-worker-0-of-2``),
over *every* subject, in stream order, with explicit acknowledgement (`BusConsumer`): the
records of the shards it owns go through its per-entity windows, and those of the other
shards only through the cross-entity step that runs when a minute closes (backend load,
code-hash and network sharing need every entity's submissions of the minute; see
`StreamingWindows.update_cross_entity`). Every worker so sees the same records in the same
order as one unsharded worker, with the same watermark: its rows are exactly that worker's
rows for its entities. What the shards divide is the per-entity work (windows, pushes to
the online store, scoring, decisions); the transport is read ``n`` times. One spool batch
becomes one message per shard, each in the batch's order, so the records of one batch may
come in another order across shards: the worker's allowed lateness must cover the time a
batch spans (seconds for a collector's request; more for a bulk replay). And a key's
score reads its user's online row, which the user's worker pushes, maybe another one.

Delivery is at least once, and counted once. The worker acknowledges a message (and every
one before it) only after the rows of its records are pushed and their decisions written,
as the spool worker commits its cursor. At start it rebuilds its windows from the stream's
messages up to its consumer's acknowledgement floor, then re-creates the consumer from the
message after the floor: a worker killed before its acknowledgement gets its messages again,
in order, and they are counted once, since the windows hold only what was acknowledged.
Messages delivered again within one run (the acknowledgement wait ran out while the worker
retried a failed push) are recognised by their stream sequence and dropped; those fetched
and not yet applied (a step failed) are handed out again until committed, as the spool's
batches after a cursor are. A record published twice (above) is dropped by its identity,
(api_key_id, job_id, status), which `RecordIdentities` keeps while a copy could still
count: until the watermark passes the record (a later copy is late, so never counted).
That is the contract's (job_id, status), within its key, so that one tenant's record never
shadows another tenant's (a key has one owner, see `qabuse_dagster.ingest.spool`). One
process per worker name: a second one would take the first's consumer.

nats-py is asyncio. The publisher runs in the collector's event loop; `BusConsumer` runs its
own loop in a thread, so the (synchronous) stream worker calls it like the spool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import re
import sqlite3
import threading
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from filelock import FileLock, Timeout
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from qabuse_dagster.ingest.spool import (
    SpoolBatch,
    commit_consumer,
    connect,
    read_batches,
    register_consumer,
)

__all__ = [
    "PUBLISHER",
    "STREAM",
    "BusBatch",
    "BusConsumer",
    "BusPublisher",
    "RecordIdentities",
    "WorkerShard",
    "bus_messages",
    "ensure_stream",
    "shard_of",
    "subject_of",
]

logger = logging.getLogger(__name__)

#: The JetStream stream of accepted telemetry.
STREAM = "QABUSE_TELEMETRY"
#: Subjects are ``qabuse.telemetry.<shard>``.
SUBJECT_PREFIX = "qabuse.telemetry"
#: How long the stream keeps a message: the features' lookback (a day of activity, a day of
#: job memory) is rebuilt from it at a worker's start, with a margin for a stopped worker.
STREAM_MAX_AGE = timedelta(days=3)
#: JetStream drops a message whose ``Nats-Msg-Id`` it saw this recently.
DUPLICATE_WINDOW = timedelta(minutes=10)
#: A delivered message not acknowledged within this long is delivered again. Generous: the
#: worker acknowledges after its pushes and decisions, and it drops a second delivery of a
#: message it holds anyway.
ACK_WAIT = timedelta(seconds=60)
#: Unacknowledged messages a worker may hold: a few polls' worth.
MAX_ACK_PENDING = 4096
#: The spool consumer the publisher registers as (compaction waits for it).
PUBLISHER = "bus-publisher"
#: Headers every message carries.
ACCEPTED_AT_HEADER = "Qabuse-Accepted-At-Ms"
SHARD_HEADER = "Qabuse-Shard"
SHARDS_HEADER = "Qabuse-Shards"
#: How long an identity is kept past the watermark (event time), beyond the allowed
#: lateness: a copy of a record older than the watermark is late, so never counted anyway
#: (it shows among the late records). Memory is a few minutes of records.
IDENTITY_MEMORY = timedelta(minutes=1)

_T = TypeVar("_T")
_SHARD_SPEC = re.compile(r"^(\d+)/(\d+)$")


def shard_of(api_key_id: str, shards: int) -> int:
    """The shard of an api key: blake2b of the key, modulo ``shards``; stable everywhere.

    Example:
        >>> shard_of("k", 1)
        0
        >>> shard_of("2" * 64, 8) == shard_of("2" * 64, 8)
        True
    """
    if shards < 1:
        raise ValueError("the bus needs at least one shard")
    digest = hashlib.blake2b(api_key_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def subject_of(shard: int) -> str:
    """The subject of one shard's messages: ``qabuse.telemetry.<shard>``."""
    return f"{SUBJECT_PREFIX}.{shard}"


@dataclass(frozen=True)
class WorkerShard:
    """Which shards one stream worker owns: ``index`` of ``count`` workers.

    Example:
        >>> w = WorkerShard.parse("1/2")
        >>> [s for s in range(4) if w.owns(s)], w.consumer_name("stream-worker")
        ([1, 3], 'stream-worker-1-of-2')
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"worker shard {self.index}/{self.count}: expected 0 <= i < n")

    @classmethod
    def parse(cls, text: str) -> WorkerShard:
        """``"i/n"``: the ``i``-th of ``n`` workers (0-based)."""
        match = _SHARD_SPEC.match(text.strip())
        if match is None:
            raise ValueError(f"worker shard {text!r}: expected i/n, such as 0/2")
        return cls(int(match[1]), int(match[2]))

    def owns(self, shard: int) -> bool:
        """Whether this worker computes the entities of bus shard ``shard``."""
        return shard % self.count == self.index

    def owns_entity(self, entity: str, shards: int) -> bool:
        """Whether this worker computes the rows of ``entity`` (an api key or a user)."""
        return self.count == 1 or self.owns(shard_of(entity, shards))

    def consumer_name(self, prefix: str) -> str:
        """The name of this worker's durable consumer: ``<prefix>-<i>-of-<n>``."""
        return f"{prefix}-{self.index}-of-{self.count}"


class BusBatch(NamedTuple):
    """One message: the records of one spool batch that fall in one shard.

    ``seq``, ``accepted_at_ms`` and ``records`` read as those of a `SpoolBatch`.
    """

    #: The stream sequence number.
    seq: int
    #: When the collector committed the batch (epoch milliseconds).
    accepted_at_ms: int | None
    #: The records' canonical JSON texts, in the order they were accepted.
    records: list[str]
    shard: int


class _Owner(msgspec.Struct):
    api_key_id: str


_owner_decoder = msgspec.json.Decoder(_Owner)


def bus_messages(batch: SpoolBatch, shards: int) -> list[tuple[str, bytes, dict[str, str]]]:
    """The (subject, payload, headers) of a spool batch's messages: one per shard it touches.

    The payload is the shard's records as JSON lines (the spool's own text); the message id
    is a hash of the payload, so JetStream drops the same message published again.
    """
    by_shard: dict[int, list[str]] = {}
    for text in batch.records:
        try:
            key = _owner_decoder.decode(text).api_key_id
        except msgspec.DecodeError:  # never written by the collector; the worker logs it
            key = ""
        by_shard.setdefault(shard_of(key, shards), []).append(text)
    messages = []
    for shard, texts in sorted(by_shard.items()):
        payload = "\n".join(texts).encode()
        headers = {
            "Nats-Msg-Id": hashlib.blake2b(payload, digest_size=16).hexdigest(),
            SHARD_HEADER: str(shard),
            SHARDS_HEADER: str(shards),
        }
        if batch.accepted_at_ms is not None:
            headers[ACCEPTED_AT_HEADER] = str(batch.accepted_at_ms)
        messages.append((subject_of(shard), payload, headers))
    return messages


async def ensure_stream(js: JetStreamContext) -> None:
    """Create `STREAM` unless it exists (its settings then are left as they are)."""
    try:
        await js.stream_info(STREAM)
        return
    except nats.js.errors.NotFoundError:
        pass
    config = api.StreamConfig(
        name=STREAM,
        subjects=[f"{SUBJECT_PREFIX}.*"],
        retention=api.RetentionPolicy.LIMITS,  # every worker reads every message
        storage=api.StorageType.FILE,
        max_age=STREAM_MAX_AGE.total_seconds(),
        duplicate_window=DUPLICATE_WINDOW.total_seconds(),
    )
    with contextlib.suppress(nats.js.errors.BadRequestError):  # created meanwhile
        await js.add_stream(config)
    logger.info("bus: stream %s created", STREAM)


class BusPublisher:
    """Publishes the spool's batches to the bus after its cursor (module docstring).

    Args:
        database: The collector's spool (`spool_path`).
        url: The NATS server, ``nats://host:port``.
        shards: The deployment's shard count (`settings.bus_shards`).
        poll_s: Seconds between looks at the spool when nobody calls `wake`.
        batches_per_round: Spool batches read (and published) per round.
    """

    def __init__(
        self,
        database: Path,
        url: str,
        *,
        shards: int,
        poll_s: float = 0.25,
        batches_per_round: int = 256,
    ) -> None:
        if shards < 1:
            raise ValueError("the bus needs at least one shard")
        self.database = database
        self.url = url
        self.shards = shards
        self.poll_s = poll_s
        self.batches_per_round = batches_per_round
        self.cursor = 0
        self.published_messages = 0
        self._wake: asyncio.Event | None = None
        self._conn: sqlite3.Connection | None = None

    def wake(self) -> None:
        """Look at the spool now (call from the publisher's event loop after a commit)."""
        if self._wake is not None:
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set; failures are logged and retried with a backoff."""
        self._wake = asyncio.Event()
        lock = FileLock(
            self.database.with_name(self.database.name + ".publish.lock"), thread_local=False
        )
        while not stop.is_set():  # one publisher per spool; the others stand by
            try:
                lock.acquire(timeout=0)  # a flock that does not wait: no thread needed
                break
            except Timeout:
                await _wait(stop, 5.0)
        if stop.is_set():
            return
        try:
            # Registered before the first connection: compaction keeps every batch from
            # now on until it is published, however long the server stays away.
            self._conn = await asyncio.to_thread(connect, self.database)
            self.cursor = await asyncio.to_thread(register_consumer, self._conn, PUBLISHER)
            await self._run(stop)
        finally:
            lock.release()
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def _run(self, stop: asyncio.Event) -> None:
        backoff = 0.0
        client: Client | None = None
        try:
            while not stop.is_set():
                try:
                    if client is None or client.is_closed:
                        # Few reconnections of its own: this loop's backoff takes over.
                        client = await _connect(self.url, 5.0, reconnect_attempts=1)
                        await ensure_stream(client.jetstream())
                        logger.info("bus: publishing %s to %s", self.database, self.url)
                    published = await self.publish_pending(client.jetstream())
                except Exception:  # the spool keeps the batches: retry from the cursor
                    backoff = min(max(1.0, 2 * backoff), 30.0)
                    logger.exception("bus: publishing failed; retrying in %.0f s", backoff)
                    await _wait(stop, backoff)
                    continue
                backoff = 0.0
                if published < self.batches_per_round:
                    assert self._wake is not None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_s)
                    self._wake.clear()
        finally:
            if client is not None and not client.is_closed:
                await client.close()

    async def publish_pending(self, js: JetStreamContext) -> int:
        """Publish the spool's batches after the cursor, then move it; the batches published."""
        if self._conn is None:
            self._conn = await asyncio.to_thread(connect, self.database)
            self.cursor = await asyncio.to_thread(register_consumer, self._conn, PUBLISHER)
        conn = self._conn
        batches = await asyncio.to_thread(read_batches, conn, self.cursor, self.batches_per_round)
        for batch in batches:
            # A batch's messages hold disjoint records; the order among them is free.
            messages = bus_messages(batch, self.shards)
            await asyncio.gather(
                *(js.publish(s, p, headers=h, stream=STREAM) for s, p, h in messages)
            )
            self.published_messages += len(messages)
        if batches:
            await asyncio.to_thread(commit_consumer, conn, PUBLISHER, batches[-1].seq)
            self.cursor = batches[-1].seq
        return len(batches)


async def _connect(url: str, timeout_s: float, *, reconnect_attempts: int) -> Client:
    """A connection whose errors are logged in one line (nats-py logs each with a traceback).

    nats-py spends ``reconnect_attempts`` on the first connection as well: bounded, a server
    that is away fails the call within seconds.
    """

    async def on_error(exc: Exception) -> None:
        logger.warning("bus: %s: %s", url, exc or type(exc).__name__)

    return await nats.connect(
        url,
        connect_timeout=timeout_s,
        max_reconnect_attempts=reconnect_attempts,
        reconnect_time_wait=0.5,
        error_cb=on_error,
    )


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class BusConsumer:
    """A stream worker's durable pull consumer on the bus, called synchronously.

    At construction it reads its consumer's acknowledgement floor (`position`; 0 for a new
    one) and re-creates the consumer from the message after it, so that what a previous
    run fetched and never acknowledged comes again, in order.

    Args:
        url: The NATS server.
        name: The durable consumer's name (`WorkerShard.consumer_name`): one process each.
        timeout_s: The most a call to the server may take.
    """

    def __init__(self, url: str, name: str, *, timeout_s: float = 10.0) -> None:
        self.url = url
        self.name = name
        self.timeout_s = timeout_s
        self.position = 0
        #: Messages delivered and not acknowledged yet, by stream sequence.
        self._held: dict[int, tuple[Msg, BusBatch]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"bus-{name}", daemon=True
        )
        self._thread.start()
        self._client: Client | None = None
        self._subscription: Any = None
        try:
            self._call(self._open())
        except BaseException:
            self.close()
            raise

    def _call(self, coroutine: Coroutine[Any, Any, _T], timeout_s: float | None = None) -> _T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout_s if timeout_s is not None else 3 * self.timeout_s)

    async def _open(self) -> None:
        # Reconnects for as long as it takes: the worker retries a failed step meanwhile.
        self._client = await _connect(self.url, self.timeout_s, reconnect_attempts=-1)
        js = self._client.jetstream(timeout=self.timeout_s)
        await ensure_stream(js)
        try:
            info = await js.consumer_info(STREAM, self.name)
            self.position = info.ack_floor.stream_seq if info.ack_floor else 0
            await js.delete_consumer(STREAM, self.name)
        except nats.js.errors.NotFoundError:
            self.position = 0
        config = api.ConsumerConfig(
            durable_name=self.name,
            filter_subject=f"{SUBJECT_PREFIX}.>",
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT.total_seconds(),
            # Never given up on: a message dropped from the consumer would be missing from
            # the features without a trace. A worker drops nothing it holds, and records it
            # cannot parse are logged and skipped, so no message can stall it.
            max_deliver=-1,
            max_ack_pending=MAX_ACK_PENDING,
        )
        if self.position:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = self.position + 1
        await js.add_consumer(STREAM, config)
        self._subscription = await js.pull_subscribe_bind(durable=self.name, stream=STREAM)
        logger.info("bus: consumer %s on %s from stream seq %d", self.name, self.url, self.position)

    def history(self, since: datetime, *, per_fetch: int = 256) -> Iterator[BusBatch]:
        """The messages published since ``since`` up to `position`, in stream order.

        What the worker processed (acknowledged) before this run: it rebuilds its windows
        from them. Read through a short-lived consumer that acknowledges nothing.
        """
        if not self.position:
            return
        assert self._client is not None
        js = self._client.jetstream(timeout=self.timeout_s)
        config = api.ConsumerConfig(
            filter_subject=f"{SUBJECT_PREFIX}.>",
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.BY_START_TIME,
            opt_start_time=since,
            inactive_threshold=60.0,
        )
        subscription = self._call(
            js.pull_subscribe(f"{SUBJECT_PREFIX}.>", stream=STREAM, config=config)
        )
        try:
            while True:
                messages = self._call(_fetch(subscription, per_fetch, 1.0))
                if not messages:
                    return
                for message in messages:
                    batch = _batch_of(message)
                    if batch.seq > self.position:
                        return
                    yield batch
                    if batch.seq == self.position:
                        return
        finally:
            self._call(subscription.unsubscribe())

    def fetch(self, limit: int, timeout_s: float) -> list[BusBatch]:
        """Up to ``limit`` messages after the last `commit`, in stream order, as the spool's
        `read_batches` gives the batches after a cursor: those in hand first (fetched, not
        committed: a step that failed never applied them), then new ones, waiting
        ``timeout_s`` at most for the first. A second delivery of a message in hand, or of
        one acknowledged, is dropped (acknowledged again, for the latter)."""
        held = sorted(batch for _, batch in self._held.values())
        if len(held) < limit:
            for message in self._call(_fetch(self._subscription, limit - len(held), timeout_s)):
                seq = message.metadata.sequence.stream
                if seq <= self.position:
                    self._call(message.ack())
                elif seq in self._held:  # the newest delivery is the one to acknowledge
                    self._held[seq] = (message, self._held[seq][1])
                else:
                    batch = _batch_of(message)
                    self._held[seq] = (message, batch)
                    held.append(batch)
        return sorted(held)[:limit]

    def commit(self, seq: int) -> None:
        """Acknowledge every message in hand up to ``seq``, and wait for the server to have
        the last acknowledgement (so all of them: they travel in order on one connection)."""
        done = sorted(s for s in self._held if s <= seq)
        if not done:
            return
        self._call(_ack_all([self._held.pop(s)[0] for s in done], self.timeout_s))
        self.position = max(self.position, done[-1])

    def close(self) -> None:
        """Close the connection (messages in hand, not acknowledged, come again) and the loop."""
        if self._client is not None and not self._client.is_closed:
            with contextlib.suppress(Exception):
                self._call(self._client.close(), self.timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.timeout_s)
        if not self._thread.is_alive():
            self._loop.close()


async def _fetch(subscription: Any, limit: int, timeout_s: float) -> list[Msg]:
    try:
        return list(await subscription.fetch(limit, timeout=max(timeout_s, 0.01)))
    except nats.errors.TimeoutError:
        return []


async def _ack_all(messages: Sequence[Msg], timeout_s: float) -> None:
    for message in messages[:-1]:
        await message.ack()
    await messages[-1].ack_sync(timeout=timeout_s)


def _batch_of(message: Msg) -> BusBatch:
    headers = message.headers or {}
    accepted = headers.get(ACCEPTED_AT_HEADER)
    return BusBatch(
        seq=message.metadata.sequence.stream,
        accepted_at_ms=int(accepted) if accepted else None,
        records=message.data.decode().split("\n"),
        shard=int(headers.get(SHARD_HEADER, message.subject.rsplit(".", 1)[-1])),
    )


class RecordIdentities:
    """The (api_key_id, job_id, status) of the records counted, kept ``memory`` behind the
    watermark (the stream worker's allowed lateness plus `IDENTITY_MEMORY`).

    Example:
        >>> ids = RecordIdentities(timedelta(minutes=1))
        >>> ids.first(("k", "j", "completed"), 1_000), ids.first(("k", "j", "completed"), 1_000)
        (True, False)
    """

    def __init__(self, memory: timedelta) -> None:
        self._memory_ms = memory // timedelta(milliseconds=1)
        self._seen: set[tuple[str, str, str]] = set()
        self._order: collections.deque[tuple[int, tuple[str, str, str]]] = collections.deque()

    def __len__(self) -> int:
        return len(self._seen)

    def first(self, identity: tuple[str, str, str], at_ms: int) -> bool:
        """Whether ``identity`` (of a record at ``at_ms``) is new; it is remembered if so."""
        if identity in self._seen:
            return False
        self._seen.add(identity)
        self._order.append((at_ms, identity))
        return True

    def forget(self, watermark_ms: int) -> None:
        """Drop the identities of records more than the memory before the watermark.

        Records arrive nearly in order: one out of order is kept a little longer, never
        dropped early.
        """
        order, horizon = self._order, watermark_ms - self._memory_ms
        while order and order[0][0] < horizon:
            self._seen.discard(order.popleft()[1])

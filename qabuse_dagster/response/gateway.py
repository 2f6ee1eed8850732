"""The gateway's authorize API: may this submission go through, answered from memory.

An API gateway asks before it forwards a job to a quantum backend. Two ways in:

* **HTTP**, as an Envoy ``ext_authz`` HTTP authorization service: ``/v1/authorize``
  (Envoy's ``path_override: /v1/authorize``; any method, as Envoy forwards the original
  one unless ``method_override`` says POST). Envoy forwards the original request's
  headers; qabuse reads ``x-qabuse-api-key`` (the key's keyed-hash id), ``x-qabuse-shots``
  and ``x-qabuse-circuits`` (the job's size) and ``x-qabuse-challenge-proof`` (a solved
  challenge). The call itself carries the gateway's own ``Authorization: Bearer`` token:
  configure Envoy's ``headers_to_add`` with it, which overrides the client's header.
* **In process**, for a Python gateway: :class:`QabuseAuthorizeMiddleware` in front of
  its submission endpoint, the same logic without the HTTP hop.

Answers (Envoy passes a non-200 answer, with its body, back to the client):

* 200: allowed; with ``x-qabuse-reroute: <backend>`` when a cap sends the job to a
  simulator, ``x-qabuse-shadow: <action>`` when a rung in shadow mode (or a shadow ledger
  entry) would have acted, ``x-qabuse-fail-open: 1`` when the answer could not be looked
  up in time. List them in Envoy's ``allowed_upstream_headers``.
* 429 with ``Retry-After``: the key is over its throttle.
* 403 with a JSON body ``{"reason", "action", "challenge"?}``: revoked, rotated, capped
  or challenged; a challenge is solved by the key's owner at
  ``POST /v1/challenges/{api_key_id}/solve``.
* 400: a malformed ``x-qabuse-*`` header. A request without ``x-qabuse-api-key`` is not
  a submission qabuse knows of: allowed.

Answers come only from a :class:`~qabuse_dagster.response.decision_table.DecisionTable`
in memory; a :class:`LedgerFollower` keeps it current from the ledger. Scoring fails open
(DESIGN.md): a lookup that raises, or is not done within :data:`LOOKUP_BUDGET_S` (a
stuck lock, a stalled table source), is answered 200 with ``x-qabuse-fail-open: 1``,
counted and logged. The lookup runs on a worker thread so that nothing it does can hold
up the event loop; the answer never waits for it past the budget.

Shadow mode is per rung (:func:`settings.enforce_modes`, read once when the app is made):
a rung in shadow mode is answered 200 with ``x-qabuse-shadow`` and counted. The kill
switch turns rungs off outright (``disabled``): their keys are allowed.

Given an alert store and a ledger, the app also serves the triage page under ``/triage``
(:mod:`~qabuse_dagster.response.triage`): analysts and approvers work alerts there.

Run it with ``uvicorn --factory qabuse_dagster.response.gateway:app``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qabuse_dagster import settings
from qabuse_dagster.response.alert_sinks import metrics_text
from qabuse_dagster.response.alert_store import AlertStore
from qabuse_dagster.response.auth import TokenStore, require_role
from qabuse_dagster.response.challenge import (
    DEFAULT_CHALLENGE_TTL_S,
    DEFAULT_PROOF_TTL_S,
    ChallengeError,
    ChallengeSigner,
    epoch_ms,
)
from qabuse_dagster.response.decision_table import DecisionTable, Verdict
from qabuse_dagster.response.ledger import Ledger, open_ledger
from qabuse_dagster.response.records import LedgerEntry, LedgerRecord
from qabuse_dagster.response.review import ReviewError, appeal
from qabuse_dagster.response.triage import triage_routes
from qabuse_dagster.telemetry.contract import HEX_HASH_PATTERN
from qabuse_dagster.telemetry.hashing import KeyedHasher, MissingHashKeyError

__all__ = [
    "API_KEY_HEADER",
    "CIRCUITS_HEADER",
    "ELAPSED_HEADER",
    "FAIL_OPEN_HEADER",
    "LOOKUP_BUDGET_S",
    "PROOF_HEADER",
    "REROUTE_HEADER",
    "SHADOW_HEADER",
    "SHOTS_HEADER",
    "Answer",
    "Authorizer",
    "GatewayStats",
    "LedgerFollower",
    "QabuseAuthorizeMiddleware",
    "TableSource",
    "app",
    "create_gateway_app",
]

logger = logging.getLogger(__name__)

API_KEY_HEADER = "x-qabuse-api-key"
SHOTS_HEADER = "x-qabuse-shots"
CIRCUITS_HEADER = "x-qabuse-circuits"
PROOF_HEADER = "x-qabuse-challenge-proof"
REROUTE_HEADER = "x-qabuse-reroute"
SHADOW_HEADER = "x-qabuse-shadow"
FAIL_OPEN_HEADER = "x-qabuse-fail-open"
#: Server-side time from the request to its answer (ms): what the fail-open bound is about.
ELAPSED_HEADER = "x-qabuse-elapsed-ms"
#: Headers qabuse sets on the way to the backend; a client's own copies are dropped.
_OUTBOUND = (REROUTE_HEADER, SHADOW_HEADER, FAIL_OPEN_HEADER)

#: The lookup's budget. The answer must be out within 50 ms of the request; the rest of
#: the 50 ms is for auth, the timer's own lateness and writing the answer (a few ms on an
#: idle machine, more under load). A healthy lookup takes microseconds.
LOOKUP_BUDGET_S = 0.030
#: How often the follower asks the ledger for new records.
REFRESH_INTERVAL_S = 0.2
#: Worker threads for lookups per event loop. A stalled table holds one per waiting
#: request until it returns; the others wait at most the budget for one, then fail open.
_LOOKUP_THREADS = 16
_FAIL_OPEN_LOG_EVERY_S = 10.0
_MAX_SOLVE_BODY = 16_384
#: Shots and circuits above this are not a job but a malformed header.
_MAX_COUNT = 10**12

_API_KEY_ID = re.compile(HEX_HASH_PATTERN)
_COUNT = re.compile(r"^[0-9]{1,13}$")

TableSource = DecisionTable | Callable[[], DecisionTable]
"""A table, or a callable returning the current one (e.g. one a refresher swaps)."""

_lookup_threads: RunVar[anyio.CapacityLimiter] = RunVar("qabuse_lookup_threads")


def _lookup_limiter() -> anyio.CapacityLimiter:
    # Our own threads, per event loop: a stalled table must not starve the host app's
    # thread pool (the middleware runs inside someone else's app).
    try:
        return _lookup_threads.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(_LOOKUP_THREADS)
        _lookup_threads.set(limiter)
        return limiter


@dataclass(frozen=True, slots=True)
class Answer:
    """What the gateway answers one submission.

    Attributes:
        status: 200, 400, 403 or 429.
        headers: Headers of the answer (``Retry-After``, ``x-qabuse-*``).
        body: The JSON body of a refusal, or None.
        action: ``allow`` or the rung that decided.
        shadow: The rung that would have acted in enforce mode.
        disabled: A rung in force that the kill switch turned off.
        fail_open: Allowed because the lookup failed or ran out of time.
    """

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: Mapping[str, Any] | None = None
    action: str = "allow"
    shadow: str | None = None
    disabled: str | None = None
    fail_open: bool = False

    def response(self, started: float) -> Response:
        """The HTTP response, stamped with the time since ``started`` (``perf_counter``)."""
        headers = dict(self.headers)
        headers[ELAPSED_HEADER] = f"{(time.perf_counter() - started) * 1000:.2f}"
        if self.body is None:
            return Response(status_code=self.status, headers=headers)
        content = json.dumps(self.body, separators=(",", ":")).encode()
        return Response(content, self.status, headers, media_type="application/json")


_NO_KEY = Answer(200)
_FAIL_OPEN = Answer(200, ((FAIL_OPEN_HEADER, "1"),), fail_open=True)


class GatewayStats:
    """Counters of the gateway's answers: by status, by action, shadow, disabled, fail-open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: Counter[str] = Counter()
        self._action: Counter[str] = Counter()
        self._shadow: Counter[str] = Counter()
        self._disabled: Counter[str] = Counter()
        self._fail_open: Counter[str] = Counter()

    def count(self, answer: Answer, fail_cause: str | None = None) -> None:
        with self._lock:
            self._status[str(answer.status)] += 1
            self._action[answer.action] += 1
            if answer.shadow:
                self._shadow[answer.shadow] += 1
            if answer.disabled:
                self._disabled[answer.disabled] += 1
            if fail_cause:
                self._fail_open[fail_cause] += 1

    @property
    def fail_open(self) -> int:
        with self._lock:
            return sum(self._fail_open.values())

    def snapshot(self) -> dict[str, Any]:
        """The counters as JSON values."""
        with self._lock:
            return {
                "answers": dict(self._status),
                "actions": dict(self._action),
                "shadow": dict(self._shadow),
                "disabled": dict(self._disabled),
                "fail_open": sum(self._fail_open.values()),
                "fail_open_causes": dict(self._fail_open),
            }


class _BadHeader(ValueError):
    pass


class Authorizer:
    """The decision logic behind both the HTTP endpoint and the middleware.

    Args:
        table: The decision table, or a callable that returns the current one.
        modes: ``shadow`` or ``enforce`` per rung; :func:`settings.enforce_modes` if None.
        disabled: Rungs the kill switch turns off (their keys are allowed).
        challenges: Signs challenges and checks proofs; one on the settings' key if None.
        clock: Epoch milliseconds (tests pass a fake one); the wall clock if None.
        budget_s: The lookup's time budget before the answer fails open.
        stats: Where answers are counted; a fresh :class:`GatewayStats` if None.
    """

    def __init__(
        self,
        table: TableSource,
        *,
        modes: Mapping[str, str] | None = None,
        disabled: Iterable[str] = (),
        challenges: ChallengeSigner | None = None,
        clock: Callable[[], int] | None = None,
        budget_s: float = LOOKUP_BUDGET_S,
        stats: GatewayStats | None = None,
    ) -> None:
        if callable(table) and not isinstance(table, DecisionTable):
            self._source: Callable[[], DecisionTable] = table
        else:
            self._source = lambda: table
        modes = settings.enforce_modes() if modes is None else dict(modes)
        for rung, mode in modes.items():
            if rung not in settings.ENFORCEABLE_RUNGS or mode not in settings.ENFORCE_MODES:
                raise ValueError(
                    f"modes: {rung}={mode} is not a rung of {settings.ENFORCEABLE_RUNGS} "
                    f"set to one of {settings.ENFORCE_MODES}"
                )
        self.shadow = frozenset(rung for rung, mode in modes.items() if mode == "shadow")
        self.disabled = frozenset(disabled)
        unknown = self.disabled - set(settings.ENFORCEABLE_RUNGS)
        if unknown:
            raise ValueError(
                f"disabled: {sorted(unknown)} are not rungs of {settings.ENFORCEABLE_RUNGS}"
            )
        self.clock = clock or epoch_ms
        self.challenges = challenges or ChallengeSigner(clock=self.clock)
        if not budget_s > 0:
            raise ValueError(f"budget_s must be positive, got {budget_s}")
        self.budget_s = budget_s
        self.stats = stats or GatewayStats()
        self._fail_open_logged = -math.inf

    async def warm_up(self) -> None:
        """Load what the first lookup would otherwise load (anyio's backend, a worker thread).

        Call it at startup: loading them takes tens of milliseconds, which would spend the
        first request's budget.
        """
        await anyio.to_thread.run_sync(lambda: None, limiter=_lookup_limiter())

    async def authorize(self, headers: Mapping[str, str], api_key_id: str | None = None) -> Answer:
        """The answer for one submission, within the budget, and counted.

        Args:
            headers: The submission's headers (``x-qabuse-*``).
            api_key_id: The key's id, when the caller knows it from elsewhere; the
                ``x-qabuse-api-key`` header otherwise.
        """
        key = headers.get(API_KEY_HEADER) if api_key_id is None else api_key_id
        if key is None:
            answer, cause = _NO_KEY, None
        else:
            answer, cause = await self._bounded(key, headers)
        self.stats.count(answer, cause)
        return answer

    async def _bounded(self, key: str, headers: Mapping[str, str]) -> tuple[Answer, str | None]:
        try:
            with anyio.fail_after(self.budget_s):
                answer = await anyio.to_thread.run_sync(
                    self.decide, key, headers, abandon_on_cancel=True, limiter=_lookup_limiter()
                )
            return answer, None
        except TimeoutError:
            self._log_fail_open("the lookup took over %.0f ms", self.budget_s * 1000)
            return _FAIL_OPEN, "timeout"
        except Exception:
            self._log_fail_open("the lookup failed", exc_info=True)
            return _FAIL_OPEN, "error"

    def _log_fail_open(self, message: str, *args: Any, exc_info: bool = False) -> None:
        # Once per interval: a stuck table would otherwise log on every request.
        now = time.monotonic()
        if now - self._fail_open_logged >= _FAIL_OPEN_LOG_EVERY_S:
            self._fail_open_logged = now
            logger.error(
                "failing open: " + message + " (%d fail-open answers so far)",
                *args,
                self.stats.fail_open + 1,
                exc_info=exc_info,
            )

    def decide(self, api_key_id: str, headers: Mapping[str, str]) -> Answer:
        """The answer for one submission, without the time budget (runs on a worker thread)."""
        if not _API_KEY_ID.match(api_key_id):
            return _bad_request(f"{API_KEY_HEADER} must be a hex key id ({HEX_HASH_PATTERN})")
        try:
            shots = _count(headers, SHOTS_HEADER)
            circuits = _count(headers, CIRCUITS_HEADER)
        except _BadHeader as exc:
            return _bad_request(str(exc))
        solved: int | None = None
        proof_error: ChallengeError | None = None
        proof = headers.get(PROOF_HEADER)
        if proof:
            try:
                solved = self.challenges.verify_proof(proof, api_key_id).decision_seq
            except ChallengeError as exc:
                proof_error = exc
        verdict = self._source().lookup(
            api_key_id,
            self.clock(),
            shots=shots,
            circuits=circuits,
            solved_challenge=solved,
            shadow=self.shadow,
            disabled=self.disabled,
        )
        return self._answer(api_key_id, verdict, proof_error)

    def _answer(
        self, api_key_id: str, verdict: Verdict, proof_error: ChallengeError | None
    ) -> Answer:
        shadow, disabled = verdict.shadow_action, verdict.disabled_action
        if verdict.status == 200:
            headers: list[tuple[str, str]] = []
            backend = verdict.reroute_backend
            if backend:
                headers.append((REROUTE_HEADER, backend))
            if shadow:
                headers.append((SHADOW_HEADER, shadow))
            return Answer(200, tuple(headers), None, verdict.action, shadow, disabled)
        body: dict[str, Any] = {"reason": verdict.reason, "action": verdict.action}
        if verdict.status == 429:
            retry = str(verdict.retry_after_s or 1)
            body["retry_after_s"] = verdict.retry_after_s or 1
            return Answer(429, (("Retry-After", retry),), body, verdict.action, shadow, disabled)
        if verdict.action == "challenge":
            ttl = verdict.params.get("token_ttl_s", DEFAULT_CHALLENGE_TTL_S)
            if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
                ttl = DEFAULT_CHALLENGE_TTL_S
            body["challenge"] = self.challenges.issue(
                api_key_id, decision_seq=verdict.seq, ttl_s=float(ttl)
            )
            body["solve"] = f"/v1/challenges/{api_key_id}/solve"
            body["proof_header"] = PROOF_HEADER
            if proof_error is not None:
                body["proof_refused"] = str(proof_error)
        return Answer(verdict.status, (), body, verdict.action, shadow, disabled)


def _bad_request(reason: str) -> Answer:
    return Answer(400, (), {"reason": reason, "action": "invalid"}, "invalid")


def _count(headers: Mapping[str, str], name: str) -> int | None:
    text = headers.get(name)
    if text is None:
        return None
    text = text.strip()
    if not _COUNT.match(text) or int(text) > _MAX_COUNT:
        raise _BadHeader(f"{name} must be a whole number up to {_MAX_COUNT}, got {text[:20]!r}")
    return int(text)


class LedgerFollower:
    """Applies the ledger's new records to a table, every ``interval_s``, on its own thread.

    Args:
        table: The table to keep current.
        records: ``records(since_seq)``: the ledger's records after ``since_seq``, in order
            (the ledger's ``records`` method). Records at or below the table's
            :attr:`~DecisionTable.last_seq` are skipped, so returning more is harmless.
        interval_s: Seconds between polls.
    """

    def __init__(
        self,
        table: DecisionTable,
        records: Callable[[int], Iterable[LedgerRecord]],
        *,
        interval_s: float = REFRESH_INTERVAL_S,
    ) -> None:
        self.table = table
        self.records = records
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def poll(self) -> int:
        """Apply what is new now; how many records were applied."""
        return self.table.apply_all(self.records(self.table.last_seq))

    def start(self) -> None:
        """Poll in the background until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="qabuse-ledger-follower", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop polling; waits up to ``timeout_s`` for a poll in progress."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:
                # The table keeps answering from what it has; say so once per outage.
                if not self._failing:
                    logger.exception("cannot read the ledger; the decision table goes stale")
                self._failing = True
            else:
                if self._failing:
                    logger.warning("reading the ledger again (up to seq %d)", self.table.last_seq)
                self._failing = False


def create_gateway_app(
    table: TableSource,
    *,
    modes: Mapping[str, str] | None = None,
    disabled: Iterable[str] = (),
    tokens: TokenStore | None = None,
    clock: Callable[[], int] | None = None,
    challenges: ChallengeSigner | None = None,
    records: Callable[[int], Iterable[LedgerRecord]] | None = None,
    append: Callable[[LedgerEntry], object] | None = None,
    lookup_budget_s: float = LOOKUP_BUDGET_S,
    proof_ttl_s: float = DEFAULT_PROOF_TTL_S,
    appeals: Ledger | None = None,
    hash_key: Callable[[str], str] | None = None,
    alerts: AlertStore | None = None,
    triage_ledger: Ledger | None = None,
    labels_path: Path | None = None,
    signing_key: bytes | None = None,
) -> Starlette:
    """The gateway's ASGI app (see the module docstring).

    Args:
        table: The decision table, or a callable returning the current one.
        modes: ``shadow`` or ``enforce`` per rung; :func:`settings.enforce_modes` if None.
        disabled: Rungs the kill switch turns off.
        tokens: Bearer tokens; the tokens file (:func:`settings.tokens_file`) if None.
        clock: Epoch milliseconds, for tests.
        challenges: The challenge signer; one on :func:`settings.signing_key` if None.
        records: The ledger's ``records(since_seq)``: a :class:`LedgerFollower` polls it
            every 200 ms while the app runs (``table`` must then be a table).
        append: The ledger's ``append(entry)``: a solved challenge is recorded with it.
        lookup_budget_s: The lookup's budget before an answer fails open.
        proof_ttl_s: How long a solved challenge lets submissions through.
        appeals: The ledger appeals go to (``POST /v1/appeals/{api_key_id}``, for the
            key's owner); None: no appeal endpoint.
        hash_key: The deployment's keyed hash of a raw api key, to check an appeal's
            proof of the key; required with ``appeals``.
        alerts: The alert store; with ``triage_ledger``, the app serves the triage page
            (:mod:`~qabuse_dagster.response.triage`) under ``/triage``.
        triage_ledger: The ledger the triage page's steps write to.
        labels_path: Where the triage page's labels go; ``settings.paths().analyst_labels``
            if None.
        signing_key: Signs the triage page's sessions; :func:`settings.signing_key` if None.
    """
    if appeals is not None and hash_key is None:
        raise TypeError("appeals need hash_key, to check the proof of the key")
    if (alerts is None) != (triage_ledger is None):
        raise TypeError("the triage page needs both alerts and triage_ledger")
    tokens = TokenStore.load() if tokens is None else tokens
    clock = clock or epoch_ms
    challenges = challenges or ChallengeSigner(clock=clock)
    authorizer = Authorizer(
        table,
        modes=modes,
        disabled=disabled,
        challenges=challenges,
        clock=clock,
        budget_s=lookup_budget_s,
    )
    as_gateway = require_role(tokens, "gateway")
    as_reader = require_role(tokens, "gateway", "analyst")
    as_owner = require_role(tokens, "owner")
    follower: LedgerFollower | None = None
    if records is not None:
        if not isinstance(table, DecisionTable):
            raise TypeError("records needs a DecisionTable to apply them to, not a callable")
        follower = LedgerFollower(table, records)

    async def authorize(request: Request) -> Response:
        started = time.perf_counter()
        as_gateway(request)
        answer = await authorizer.authorize(request.headers)
        return answer.response(started)

    async def stats(request: Request) -> Response:
        as_reader(request)
        return JSONResponse(authorizer.stats.snapshot())

    async def solve(request: Request) -> Response:
        principal = as_owner(request)
        api_key_id = request.path_params["api_key_id"]
        if not principal.owns(api_key_id):
            raise HTTPException(403, "only the key's owner may solve its challenge")
        token = await _challenge_token(request)
        try:
            challenge = challenges.verify(token, api_key_id)
            proof = challenges.solve(token, api_key_id, ttl_s=proof_ttl_s)
        except ChallengeError as exc:
            return JSONResponse({"reason": str(exc), "error": exc.code}, 400)
        expires = challenges.verify_proof(proof, api_key_id).expires_at_ms
        if append is not None:
            entry = LedgerEntry(
                at_ms=clock(),
                api_key_id=api_key_id,
                action="challenge_solved",
                actor=principal.name,
                reason="the owner solved the challenge",
                refers_to=challenge.decision_seq,
            )
            try:
                await run_in_threadpool(append, entry)
            except Exception:
                # The proof works on its own; the ledger entry only lifts the challenge.
                logger.exception("could not record the solved challenge of %s", api_key_id)
        return JSONResponse(
            {"proof": proof, "proof_header": PROOF_HEADER, "expires_at_ms": expires}
        )

    async def file_appeal(request: Request) -> Response:
        principal = as_owner(request)
        api_key_id = request.path_params["api_key_id"]
        body = await _json_body(request, 'JSON: {"api_key": "<the key>", "reason": "..."}')
        raw, reason = body.get("api_key"), body.get("reason", "")
        if not isinstance(raw, str) or not isinstance(reason, str):
            raise HTTPException(400, 'the body must be JSON: {"api_key": "...", "reason": "..."}')
        assert appeals is not None and hash_key is not None
        try:
            filed = await run_in_threadpool(
                appeal, appeals, principal, api_key_id, raw, reason, hash_key=hash_key
            )
        except ReviewError as exc:
            status = 403 if "not an owner" in str(exc) or "does not hash" in str(exc) else 409
            return JSONResponse({"reason": str(exc)}, status)
        return JSONResponse({"appeal_seq": filed.seq, "status": "in the review queue"}, 202)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        """Prometheus text: alerts written and by triage status, and each sink's outbox."""
        as_reader(request)
        assert alerts is not None
        body, content_type = await run_in_threadpool(metrics_text, alerts)
        return Response(body, media_type=content_type)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
        headers = exc.headers if isinstance(exc, HTTPException) else None
        return JSONResponse({"reason": detail}, status, headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await authorizer.warm_up()
        if follower is not None:
            try:  # catch up before the first answer, so a restart does not open the gates
                await anyio.to_thread.run_sync(follower.poll)
            except Exception:
                logger.exception("cannot read the ledger at start; answering from an empty table")
            follower.start()
        try:
            yield
        finally:
            if follower is not None:
                await anyio.to_thread.run_sync(follower.stop)

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/v1/authorize", authorize, methods=methods),
            Route("/v1/authorize/stats", stats, methods=["GET"]),
            Route("/v1/challenges/{api_key_id}/solve", solve, methods=["POST"]),
            *(
                [Route("/v1/appeals/{api_key_id}", file_appeal, methods=["POST"])]
                if appeals is not None
                else []
            ),
            *([Route("/metrics", metrics, methods=["GET"])] if alerts is not None else []),
            *(
                triage_routes(
                    alerts=alerts,
                    ledger=triage_ledger,
                    tokens=tokens,
                    signing_key=settings.signing_key() if signing_key is None else signing_key,
                    labels_path=labels_path or settings.paths().analyst_labels,
                    clock=clock,
                )
                if alerts is not None and triage_ledger is not None
                else []
            ),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.authorizer = authorizer
    app.state.follower = follower
    return app


async def _json_body(request: Request, shape: str) -> dict[str, Any]:
    """The body as a JSON object, read up to a small limit; 400 or 413 otherwise."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_SOLVE_BODY:
            raise HTTPException(413, f"the body is over {_MAX_SOLVE_BODY} bytes")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HTTPException(400, f"the body must be {shape}") from None
    if not isinstance(data, dict):
        raise HTTPException(400, f"the body must be {shape}")
    return data


async def _challenge_token(request: Request) -> str:
    """``{"challenge": "<token>"}`` from the body, read up to a small limit."""
    data = await _json_body(request, 'JSON: {"challenge": "<token>"}')
    token = data.get("challenge")
    if not isinstance(token, str) or not token:
        raise HTTPException(400, 'the body must be JSON: {"challenge": "<token>"}')
    return token


def app() -> Starlette:
    """The gateway built from settings, for ``uvicorn --factory`` (``qabuse gateway``).

    It follows the deployment's ledger (:func:`settings.ledger_url`), records solved
    challenges and takes appeals there, checks proofs of keys with ``QABUSE_HASH_KEY``,
    reads the kill switch from ``QABUSE_DISABLED_ACTIONS``, and serves the triage page
    over the home's alert store.
    """
    ledger = open_ledger()
    hash_key = _api_key_hash()
    return create_gateway_app(
        DecisionTable(),
        disabled=settings.disabled_actions(),
        records=ledger.records,
        append=ledger.append,
        appeals=ledger if hash_key is not None else None,
        hash_key=hash_key,
        alerts=AlertStore(),
        triage_ledger=ledger,
        labels_path=settings.paths().analyst_labels,
        signing_key=settings.signing_key(),
    )


def _api_key_hash() -> Callable[[str], str] | None:
    """The deployment's keyed hash of a raw api key; None (no appeals) without the key."""
    try:
        hasher = KeyedHasher.from_env()
    except MissingHashKeyError:
        logger.warning(
            "%s is not set: owners' appeals are off, since no proof of a key can be checked",
            settings.HASH_KEY_ENV,
        )
        return None

    def hash_key(raw: str) -> str:
        return hasher.hash(raw, domain="api_key")

    return hash_key


class QabuseAuthorizeMiddleware:
    """ASGI middleware that authorizes submissions in process, before the app sees them.

    Refusals (429, 403, 400) are answered here; an allowed request reaches the app with
    ``x-qabuse-reroute`` / ``x-qabuse-shadow`` / ``x-qabuse-fail-open`` added to its
    headers (a client's own copies dropped) and on the response. It fails open like the
    HTTP endpoint.

    Example:
        >>> from starlette.applications import Starlette
        >>> guarded = QabuseAuthorizeMiddleware(Starlette(), DecisionTable(), modes={},
        ...                                     challenges=ChallengeSigner(b"s" * 32))

    Args:
        app: The gateway's own ASGI app.
        table: The decision table, or a callable returning the current one.
        modes: ``shadow`` or ``enforce`` per rung; :func:`settings.enforce_modes` if None.
        disabled: Rungs the kill switch turns off.
        challenges: The challenge signer; one on :func:`settings.signing_key` if None.
        clock: Epoch milliseconds, for tests.
        methods: HTTP methods that are submissions (others pass untouched).
        path_prefix: Only paths under it are submissions.
        key_id: The key's keyed-hash id from the request's headers (e.g. hashing the
            gateway's own API key header); ``x-qabuse-api-key`` if None. A request
            without one passes untouched.
        lookup_budget_s: The lookup's budget before the request fails open.
    """

    def __init__(
        self,
        app: ASGIApp,
        table: TableSource,
        *,
        modes: Mapping[str, str] | None = None,
        disabled: Iterable[str] = (),
        challenges: ChallengeSigner | None = None,
        clock: Callable[[], int] | None = None,
        methods: Collection[str] = ("POST",),
        path_prefix: str = "/",
        key_id: Callable[[Headers], str | None] | None = None,
        lookup_budget_s: float = LOOKUP_BUDGET_S,
    ) -> None:
        self.app = app
        self.authorizer = Authorizer(
            table,
            modes=modes,
            disabled=disabled,
            challenges=challenges,
            clock=clock,
            budget_s=lookup_budget_s,
        )
        self.methods = frozenset(method.upper() for method in methods)
        self.path_prefix = path_prefix
        self.key_id = key_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._warming(receive), send)
            return
        if (
            scope["type"] != "http"
            or scope["method"] not in self.methods
            or not scope["path"].startswith(self.path_prefix)
        ):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        # Only qabuse says whether to reroute: a client's own x-qabuse-* verdicts go.
        kept = [(k, v) for k, v in scope["headers"] if k.decode("latin-1").lower() not in _OUTBOUND]
        key = self.key_id(headers) if self.key_id is not None else headers.get(API_KEY_HEADER)
        if key is None:
            await self.app({**scope, "headers": kept}, receive, send)
            return
        answer = await self.authorizer.authorize(headers, api_key_id=key)
        if answer.status != 200:
            await answer.response(started)(scope, receive, send)
            return
        added = [(name.encode(), value.encode()) for name, value in answer.headers]
        await self.app({**scope, "headers": kept + added}, receive, _adding(send, added))

    def _warming(self, receive: Receive) -> Receive:
        """``receive`` that warms the authorizer up when the server starts."""

        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.authorizer.warm_up()
            return message

        return receiving


def _adding(send: Send, added: list[tuple[bytes, bytes]]) -> Send:
    """``send`` with ``added`` put on the response's headers."""
    if not added:
        return send

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *added]}
        await send(message)

    return sending

"""The gateway's authorize API against the BentoML echo floor: latency and answers per second.

Ours is ``POST /v1/authorize`` served by uvicorn (one worker), answering from a decision
table of `Settings.api_keys` keys, a mix of allowed, throttled, capped, challenged and
revoked ones, as the ledger would leave it. The baseline is
``benchmarks.echo_service:Echo`` under ``bentoml serve``: what BentoML and HTTP alone cost
on this machine, the floor `/score` is measured against too.

Two measurements, side by side in one run:

* **sequential latency**: one persistent client per service, alternating request by
  request, client-side p50/p99; the gateway's own ``x-qabuse-elapsed-ms`` header gives
  its server-side p50/p99, the figure the goal (p99 at most `SERVER_P99_GOAL_MS`) names.
* **answers per second** under load from ``wrk`` (compiled; Debian package ``wrk``),
  `Settings.connections` connections for `Settings.seconds` seconds per service.

Every gateway answer is checked against the table's verdict for its key: a wrong status
is a problem, and a run with problems exits 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks import wrk
from benchmarks.report import (
    BenchmarkResult,
    busy_machine_note,
    comparison,
    environment_variables,
    load_average,
    percentile,
    progress_display,
)

NAME = "authorize"
BASELINE = "BentoML echo service (bentoml serve, one worker, no decision)"
HOST = "127.0.0.1"
SERVER_P99_GOAL_MS = 2.0
THROUGHPUT_GOAL = 3_000.0
_ACTIONS = ("throttle", "cap", "challenge", "revoke")
_MINUTE_MS = 60_000


@dataclass(frozen=True)
class Settings:
    """Sizes of one authorize benchmark run."""

    calls: int = 5_000
    warmup: int = 500
    api_keys: int = 10_000
    #: Share of the keys under some mitigation.
    mitigated: float = 0.2
    seconds: float = 10.0
    connections: int = 32
    threads: int = 2


def _key(i: int) -> str:
    return f"{i:032x}"


def _records(settings: Settings) -> list[Any]:
    """Ledger records leaving ``mitigated`` of the keys under each rung in turn."""
    from qabuse_dagster.response.records import LedgerEntry, LedgerRecord

    now = int(time.time() * 1000)
    records = []
    every = max(1, round(1 / settings.mitigated)) if settings.mitigated > 0 else 0
    for i in range(0, settings.api_keys, every or settings.api_keys + 1):
        action = _ACTIONS[(i // max(every, 1)) % len(_ACTIONS)]
        params: dict[str, Any] = {"jobs_per_minute": 6.0}
        if action == "cap":
            params |= {"max_shots": 10_000, "max_circuits": 100, "reroute_backend": None}
        entry = LedgerEntry(now - _MINUTE_MS, _key(i), action, "system", "bench", params)
        records.append(LedgerRecord(len(records) + 1, entry, "0" * 64, "0" * 64, now))
        if action == "revoke":  # a second principal approves it, so it is in force
            approval = LedgerEntry(
                now - _MINUTE_MS + 1, _key(i), "approve", "bob", "bench", refers_to=len(records)
            )
            records.append(LedgerRecord(len(records) + 1, approval, "0" * 64, "0" * 64, now))
    return records


def bench_gateway() -> Any:
    """The gateway app the benchmark serves (``uvicorn --factory``), from its environment."""
    from qabuse_dagster.response.auth import TokenStore
    from qabuse_dagster.response.decision_table import DecisionTable
    from qabuse_dagster.response.gateway import create_gateway_app

    settings = Settings(**json.loads(os.environ["QABUSE_BENCH_SETTINGS"]))
    table = DecisionTable.from_records(_records(settings))
    modes = dict.fromkeys(_ACTIONS, "enforce")
    return create_gateway_app(table, modes=modes, tokens=TokenStore.load())


@contextlib.contextmanager
def _gateway_server(log: Path, ready_timeout: float = 60.0) -> Iterator[str]:
    import httpx

    from qabuse_dagster.processes import ChildProcesses, free_port
    from qabuse_dagster.serving.server import start_server

    port = free_port(HOST)
    command = [sys.executable, "-m", "uvicorn", "--factory", f"{__name__}:bench_gateway"]
    command += ["--host", HOST, "--port", str(port), "--log-level", "warning", "--no-access-log"]
    with ChildProcesses() as children:
        process = start_server(children, command, log)
        url = f"http://{HOST}:{port}"
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the gateway exited; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway did not start in {ready_timeout:.0f} s")
            time.sleep(0.2)
        yield url


def run(settings: Settings, console: Console) -> BenchmarkResult:
    """Serve the gateway and the echo floor; time them sequentially and under wrk."""
    import httpx

    from benchmarks.scoring import _echo_server
    from qabuse_dagster.response.auth import add_token
    from qabuse_dagster.response.decision_table import DecisionTable
    from qabuse_dagster.response.gateway import API_KEY_HEADER, ELAPSED_HEADER

    result = BenchmarkResult(
        name=NAME,
        title="/v1/authorize: latency and answers per second (gateway vs BentoML echo)",
        baseline=BASELINE,
    )
    if not wrk.available():
        result.problems.append("wrk is not installed (Debian: apt-get install wrk)")
        return result
    load_averages = [load_average()]
    table = DecisionTable.from_records(_records(settings))
    now = int(time.time() * 1000)
    expected = {i: table.lookup(_key(i), now).status for i in range(settings.api_keys)}
    client_ms: dict[str, list[float]] = {"gateway": [], "echo": []}
    server_ms: list[float] = []
    wrong: list[str] = []
    with contextlib.ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qabuse-authz-")))
        tokens = home / "tokens.json"
        token = add_token("bench-gateway", ["gateway"], path=tokens)
        stack.enter_context(
            environment_variables(
                QABUSE_HOME=str(home),
                BENTOML_HOME=str(home / "bentoml"),
                BENTOML_DO_NOT_TRACK="true",
                QABUSE_TOKENS_FILE=str(tokens),
                QABUSE_SIGNING_KEY="b" * 40,
                QABUSE_BENCH_SETTINGS=json.dumps(settings.__dict__),
            )
        )
        progress = stack.enter_context(progress_display(console))
        task = progress.add_task("starting the gateway and the echo service", total=None)
        gateway_url = stack.enter_context(_gateway_server(home / "gateway.log"))
        echo_url = stack.enter_context(_echo_server())
        progress.update(task, total=1, completed=1)
        auth = {"authorization": f"Bearer {token}"}
        gateway = stack.enter_context(httpx.Client(base_url=gateway_url, headers=auth))
        echo = stack.enter_context(httpx.Client(base_url=echo_url))

        total = settings.warmup + settings.calls
        task = progress.add_task(f"{settings.calls:,} sequential requests each", total=total)
        for n in range(total):
            i = (n * 7919) % settings.api_keys  # a stride through the keys, every kind met
            started = time.perf_counter()
            answer = gateway.post("/v1/authorize", headers={API_KEY_HEADER: _key(i)})
            took = (time.perf_counter() - started) * 1e3
            if answer.status_code != expected[i] and not (
                expected[i] == 200 and answer.status_code == 429
            ):
                wrong.append(f"key {i}: {answer.status_code}, the table says {expected[i]}")
            started = time.perf_counter()
            echo.post("/score", json={"api_key_id": _key(i)})
            took_echo = (time.perf_counter() - started) * 1e3
            if n >= settings.warmup:
                client_ms["gateway"].append(took)
                client_ms["echo"].append(took_echo)
                server_ms.append(float(answer.headers[ELAPSED_HEADER]))
            progress.advance(task)

        task = progress.add_task(
            f"wrk: {settings.connections} connections, {settings.seconds:g} s each", total=2
        )
        mitigated = {record.entry.api_key_id for record in _records(settings)}
        allowed = next(i for i in range(settings.api_keys) if _key(i) not in mitigated)
        sent = {**auth, API_KEY_HEADER: _key(allowed)}
        load = {
            "threads": settings.threads,
            "connections": settings.connections,
            "seconds": settings.seconds,
        }
        ours = wrk.run_wrk(gateway_url, "/v1/authorize", wrk.post_script("", sent), home, **load)
        progress.advance(task)
        body = json.dumps({"api_key_id": _key(allowed)})
        floor = wrk.run_wrk(echo_url, "/score", wrk.post_script(body), home, **load)
        progress.advance(task)
    load_averages.append(load_average())

    def q(values: list[float], p: float) -> float:
        return percentile(sorted(values), p)

    result.comparisons = [
        comparison(
            "p50 latency",
            "ms",
            q(client_ms["gateway"], 50),
            q(client_ms["echo"], 50),
            higher_is_better=False,
        ),
        comparison(
            "p99 latency",
            "ms",
            q(client_ms["gateway"], 99),
            q(client_ms["echo"], 99),
            higher_is_better=False,
        ),
        comparison(
            "answers per second (wrk)",
            "1/s",
            ours["answers_per_s"],
            floor["answers_per_s"],
            higher_is_better=True,
        ),
    ]
    server_p99 = q(server_ms, 99)
    result.facts = {
        "calls": settings.calls,
        "api_keys": settings.api_keys,
        "mitigated_share": settings.mitigated,
        "server_p50_ms": q(server_ms, 50),
        "server_p99_ms": server_p99,
        "server_p99_goal_ms": SERVER_P99_GOAL_MS,
        "wrk": {"gateway": ours, "echo": floor, "connections": settings.connections},
        "throughput_goal_per_s": THROUGHPUT_GOAL,
        "wrong_answers": len(wrong),
    }
    result.shown_facts = ("server_p50_ms", "server_p99_ms", "api_keys")
    if server_p99 > SERVER_P99_GOAL_MS:
        result.notes.append(f"server-side p99 {server_p99:.2f} ms is over {SERVER_P99_GOAL_MS} ms")
    if ours["answers_per_s"] < THROUGHPUT_GOAL:
        result.notes.append(
            f"{ours['answers_per_s']:,.0f} answers/s is under the {THROUGHPUT_GOAL:,.0f} goal"
        )
    if ours["non_2xx"]:
        result.problems.append(f"wrk got {ours['non_2xx']:.0f} non-2xx answers for an allowed key")
    busy = busy_machine_note(load_averages)
    if busy:
        result.notes.append(busy)
    if wrong:
        result.problems.append(f"{len(wrong)} wrong answers, e.g. {wrong[0]}")
    return result

"""End to end, with real processes: collector, stream worker and gateway, on a trained home.

The session twin's runaway CI, renamed and moved whole hours back (to end one to two
hours ago), is replayed into a real ``qabuse collector`` beside three benign keys and, from the
same instant, another twin's credential stuffing: the day before the onset at once, then
from the onset on, ten seconds of telemetry time per wall second. Each replayed
submission asks a real ``qabuse gateway`` whether it may go through, as an API gateway
would. A real ``qabuse stream`` tails the collector's spool, pushes the features to the
Feast online store, scores with @champion and writes its decisions to the ledger that
the gateway follows.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.browser import artifacts_dir, headless_chromium
from support.exclusive import running_alone
from support.stream_replay import incident_slice, replay_of

from qabuse_dagster import settings
from qabuse_dagster.processes import free_port
from qabuse_dagster.response.auth import add_token
from qabuse_dagster.response.gateway import API_KEY_HEADER
from qabuse_dagster.response.ledger import open_ledger
from qabuse_dagster.response.records import LedgerEntry
from qabuse_dagster.simulation import simulate
from qabuse_dagster.telemetry.hashing import KeyedHasher

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIGNING_KEY = "end-to-end-signing-key-of-forty-chars-00"
COLLECTOR_TOKEN = "e2e-collector-token"
#: Telemetry seconds replayed per wall second, in chunks of this many telemetry seconds.
CHUNK_S = 10
SPEED_UP = 10
#: The requirement: the runaway key gets 429 within this long of its onset (telemetry time).
WITHIN_S = 90.0


def _at(record: dict) -> datetime:
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))


@contextlib.contextmanager
def _server(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen(
        [sys.executable, "-m", "qabuse_dagster.cli", *command],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, within_s: float = 90) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"{url} never answered:\n{log.read_text(errors='replace')[-3000:]}")


@dataclass
class Stack:
    """The replay's outcome, with the three processes still running."""

    home: Path
    env: dict[str, str]
    ledger_url: str
    gateway: str
    tokens: dict[str, str]
    replay: Any
    onset: datetime
    stuffing_keys: set[str]
    logs: dict[str, Path]
    throttled_at: datetime | None = None
    benign_answers: list[int] = field(default_factory=list)


@pytest.fixture(scope="module")
def stack(pipeline_run, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The runaway and the credential stuffing replayed through the real processes."""
    tmp_path = tmp_path_factory.mktemp("end-to-end")
    # A copy of the trained home: the processes' online rows, spool and landing files
    # stay out of the session's. MLflow's artifacts are read where they are.
    home = tmp_path / "home"
    shutil.copytree(pipeline_run.home, home, ignore=shutil.ignore_patterns("dagster", "bentoml"))
    tokens = tmp_path / "tokens.json"
    gateway_token = add_token("envoy", ["gateway"], path=tokens)
    people = {
        "analyst": add_token("ada", ["analyst"], path=tokens),
        "approver": add_token("grace", ["approver"], path=tokens),
    }
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    collector_port, gateway_port = free_port(), free_port()
    env = {
        **os.environ,
        settings.HOME_ENV: str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        settings.LEDGER_URL_ENV: ledger_url,
        settings.SIGNING_KEY_ENV: SIGNING_KEY,
        settings.TOKENS_FILE_ENV: str(tokens),
        settings.ENFORCE_ENV: "enforce",
        settings.HASH_KEY_ENV: "end-to-end-hash-key-0123456789abcdef",
        "QABUSE_COLLECTOR_TOKENS": f"twin:{COLLECTOR_TOKEN}",
        settings.TRIAGE_URL_ENV: f"http://127.0.0.1:{gateway_port}",
    }
    # The runaway from its labelled onset, after a day of its own and three benign keys'
    # history, as an API gateway would have seen it.
    replay = replay_of(pipeline_run, "end-to-end", after_onset=timedelta(minutes=10))
    onset = replay.flood_start
    # The twin's credential stuffing (hundreds of stolen keys, bursts of auth failures
    # from few networks) starts at the same instant.
    stuffing_twin = simulate(
        hours=72,
        seed=11,
        out=tmp_path / "stuffing",
        hasher=KeyedHasher.demo(),
        scenarios=["credential_stuffing"],
    )
    stuffing = incident_slice(
        stuffing_twin.telemetry_path,
        stuffing_twin.labels_path,
        "end-to-end-stuffing",
        onset_at=onset,
        length=timedelta(minutes=10),
    )
    assert len({r["api_key_id"] for r in stuffing}) > 50
    flood = sorted(
        [*stuffing, *(r for r in replay.records if _at(r) >= onset)], key=lambda r: r["timestamp"]
    )
    history = [r for r in replay.records if _at(r) < onset]
    stuffing_keys = {r["api_key_id"] for r in stuffing}

    logs = {name: tmp_path / f"{name}.log" for name in ("collector", "stream", "gateway")}
    collector_args = ["collector", "--host", "127.0.0.1", "--port", str(collector_port)]
    with (
        _server([*collector_args, "--trusted-tenant", "twin"], env, logs["collector"]) as col,
        _server(["-v", "stream", "--lateness", "5", "--poll", "0.1"], env, logs["stream"]),
        _server(
            ["gateway", "--host", "127.0.0.1", "--port", str(gateway_port)], env, logs["gateway"]
        ) as gate,
        httpx.Client(timeout=30) as client,
    ):
        collector = f"http://127.0.0.1:{collector_port}"
        gateway = f"http://127.0.0.1:{gateway_port}"
        _wait_healthy(collector + "/healthz", col, logs["collector"])
        _wait_healthy(gateway + "/healthz", gate, logs["gateway"])

        def send(records: list[dict]) -> None:
            answer = client.post(
                collector + "/v1/telemetry",
                content="\n".join(json.dumps(r) for r in records),
                headers={
                    "authorization": f"Bearer {COLLECTOR_TOKEN}",
                    "content-type": "application/x-ndjson",
                },
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["accepted"] + answer.json()["duplicates"] == len(records)

        for start in range(0, len(history), 5_000):
            send(history[start : start + 5_000])
        # The day before the onset is a backlog; live, the worker is caught up when a
        # runaway starts. Wait for it (its figures file names the batch it is at).
        batches = len(range(0, len(history), 5_000))
        stats = home / "run" / "stream-stats.json"
        deadline = time.monotonic() + 180
        while not (stats.is_file() and json.loads(stats.read_text())["cursor"] >= batches):
            assert time.monotonic() < deadline, "the stream worker never caught up"
            time.sleep(0.5)

        as_gateway = {"authorization": f"Bearer {gateway_token}"}
        benign_answers: list[int] = []
        throttled_at: datetime | None = None
        chunk_start = onset - timedelta(seconds=CHUNK_S)
        # The replay runs on the wall clock, 10x: no other xdist worker's test beside it.
        with running_alone():
            while chunk_start <= _at(flood[-1]):
                chunk_end = chunk_start + timedelta(seconds=CHUNK_S)
                chunk = [r for r in flood if chunk_start <= _at(r) < chunk_end]
                if chunk:
                    send(chunk)
                for record in chunk:
                    if record["status"] != "submitted":
                        continue
                    key = record["api_key_id"]
                    answer = client.post(
                        gateway + "/v1/authorize", headers={**as_gateway, API_KEY_HEADER: key}
                    )
                    if key in stuffing_keys:
                        # Abusive too; what the runaway and the benign keys get is asserted.
                        continue
                    if key != replay.flood_key:
                        benign_answers.append(answer.status_code)
                    elif answer.status_code == 429 and throttled_at is None:
                        throttled_at = _at(record)
                        assert int(answer.headers["retry-after"]) >= 1
                chunk_start = chunk_end
                time.sleep(CHUNK_S / SPEED_UP)

        yield Stack(
            home=home,
            env=env,
            ledger_url=ledger_url,
            gateway=gateway,
            tokens={"gateway": gateway_token, **people},
            replay=replay,
            onset=onset,
            stuffing_keys=stuffing_keys,
            logs=logs,
            throttled_at=throttled_at,
            benign_answers=benign_answers,
        )


def test_the_gateway_throttles_a_runaway_replayed_through_the_real_path(stack: Stack) -> None:
    throttled_at, onset, replay, logs = stack.throttled_at, stack.onset, stack.replay, stack.logs
    benign_answers, ledger_url, env = stack.benign_answers, stack.ledger_url, stack.env
    assert throttled_at is not None, (
        "the runaway key was never throttled:\n"
        + logs["stream"].read_text(errors="replace")[-3000:]
    )
    assert (throttled_at - onset).total_seconds() <= WITHIN_S
    assert len(benign_answers) >= 3 and set(benign_answers) == {200}

    with open_ledger(ledger_url, key=SIGNING_KEY.encode()) as ledger:
        assert ledger.verify().ok
        entries = [r.entry for r in ledger.records()]
    first = next(e for e in entries if e.api_key_id == replay.flood_key)
    assert first.action in ("throttle", "cap") and first.mode == "enforce"
    assert first.actor == "system" and first.model_name and first.model_version
    assert first.score is not None and first.feature_service and first.features
    assert first.at_ms <= int(throttled_at.timestamp() * 1000)
    assert not [e for e in entries if e.api_key_id in replay.benign_keys]
    verified = subprocess.run(
        [sys.executable, "-m", "qabuse_dagster.cli", "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verified.returncode == 0 and verified.stdout.startswith("ok:"), verified.stdout


def _wait_for(what: str, probe: Callable[[], Any], within_s: float = 60.0) -> Any:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {within_s:.0f} s")


def test_an_analyst_releases_the_runaway_and_an_approver_approves_a_revoke_in_a_browser(
    stack: Stack,
) -> None:
    """The triage page in headless Chromium, on the state the replay left."""
    from selenium.webdriver.common.by import By

    from qabuse_dagster.response.alert_store import AlertStore, alerts_path

    shots = artifacts_dir() / "triage"
    shots.mkdir(parents=True, exist_ok=True)
    key = stack.replay.flood_key
    with AlertStore(alerts_path(settings.Paths(stack.home))) as store:
        alert = _wait_for(
            "the runaway's alert", lambda: store.alerts(status="open", api_key_id=key)
        )[-1].alert
    assert alert.action in ("throttle", "cap") and alert.model_version
    # The engine's proposals wait for a person: a system revoke of one stuffed key.
    victim = sorted(stack.stuffing_keys)[0]
    with open_ledger(stack.ledger_url, key=SIGNING_KEY.encode()) as ledger:
        proposal = ledger.append(
            LedgerEntry(
                int(time.time() * 1000),
                victim,
                "revoke",
                "system",
                "challenge refused 3 times (stolen-key pattern)",
                params={"requires_approval": True},
            )
        )
    as_gateway = {"authorization": f"Bearer {stack.tokens['gateway']}"}

    def answer(api_key_id: str) -> int:
        headers = {**as_gateway, API_KEY_HEADER: api_key_id}
        return httpx.post(stack.gateway + "/v1/authorize", headers=headers).status_code

    assert answer(key) == 429

    with headless_chromium() as browser:

        def log_in(token: str) -> None:
            browser.get(stack.gateway + "/triage")
            assert "/triage/login" in browser.current_url  # no session: the login page
            browser.find_element(By.NAME, "token").send_keys(token)
            browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
            _wait_for("the queue", lambda: browser.current_url.rstrip("/").endswith("/triage"))

        log_in(stack.tokens["analyst"])
        browser.save_screenshot(str(shots / "1-queue-analyst.png"))
        browser.find_element(By.CSS_SELECTOR, f"a[href$='/triage/alerts/{alert.alert_id}']").click()
        spark = browser.find_element(By.ID, "sparkline")
        points = [
            line.get_attribute("points") or ""
            for line in spark.find_elements(By.TAG_NAME, "polyline")
        ]
        assert points and all(p.strip() for p in points)
        assert alert.submissions_last_hour > 0
        jobs = browser.find_elements(By.CSS_SELECTOR, "#recent-jobs tr.job")
        assert len(jobs) == 10
        assert all(job.text.strip() for job in jobs)
        shown = " ".join(job.text for job in jobs)
        assert all(job.job_id in shown for job in alert.recent_jobs)
        # The whole page, as the README shows it.
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1280, int(height) + 40)
        browser.save_screenshot(str(shots / "2-alert-runaway-ci.png"))
        (shots / "2-alert-runaway-ci.json").write_text(alert.model_dump_json(indent=2))
        browser.set_window_size(1280, 1000)
        browser.find_element(By.ID, "release").click()
        _wait_for("the release's page", lambda: "done=release" in browser.current_url, 10)
        browser.save_screenshot(str(shots / "3-released.png"))

        with open_ledger(stack.ledger_url, key=SIGNING_KEY.encode()) as ledger:
            released = [
                r.entry
                for r in ledger.records()
                if r.entry.api_key_id == key and r.entry.action == "release"
            ]
        assert released and released[-1].actor == "ada"
        _wait_for("the gateway letting the key through", lambda: answer(key) == 200, 10)

        browser.delete_all_cookies()
        log_in(stack.tokens["approver"])
        browser.find_element(By.CSS_SELECTOR, f"a[href$='/triage/keys/{victim}']")
        browser.save_screenshot(str(shots / "4-queue-approver.png"))
        browser.get(stack.gateway + f"/triage/keys/{victim}")
        browser.find_element(By.ID, f"approve-{proposal.seq}").click()
        _wait_for("the approval's page", lambda: "done=approve" in browser.current_url, 10)
        browser.save_screenshot(str(shots / "5-approved.png"))

    with open_ledger(stack.ledger_url, key=SIGNING_KEY.encode()) as ledger:
        assert ledger.verify().ok
        approvals = [r.entry for r in ledger.records() if r.entry.refers_to == proposal.seq]
    assert [(e.action, e.actor) for e in approvals] == [("approve", "grace")]
    _wait_for("the gateway refusing the revoked key", lambda: answer(victim) == 403, 10)
    assert sorted(p.name for p in shots.glob("*.png")) == [  # the test's artifacts
        "1-queue-analyst.png",
        "2-alert-runaway-ci.png",
        "3-released.png",
        "4-queue-approver.png",
        "5-approved.png",
    ]

"""The triage page in the gateway: sessions, CSRF, the queue, an alert in full, each step."""

from __future__ import annotations

import json
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from starlette.applications import Starlette
from starlette.testclient import TestClient

from qabuse_dagster import settings
from qabuse_dagster.response.alert_store import AlertStore
from qabuse_dagster.response.alerts import Alert, alert_id, example_alert
from qabuse_dagster.response.auth import Principal, TokenStore, hash_token
from qabuse_dagster.response.challenge import ChallengeSigner
from qabuse_dagster.response.decision_table import DecisionTable
from qabuse_dagster.response.gateway import API_KEY_HEADER, create_gateway_app
from qabuse_dagster.response.ledger import Ledger, open_ledger
from qabuse_dagster.response.records import LedgerEntry
from qabuse_dagster.response.review import review_queue
from qabuse_dagster.response.triage import (
    CONTENT_SECURITY_POLICY,
    SESSION_COOKIE,
    SESSION_SALT,
)
from qabuse_dagster.telemetry.labels import read_labels

GATEWAY = "gateway-token-" + "g" * 24
ANALYST = "analyst-token-" + "a" * 24
APPROVER = "approver-token-" + "p" * 24
OWNER = "owner-token-" + "o" * 24
TOKENS = TokenStore.from_plaintext(
    {
        GATEWAY: Principal("envoy", frozenset({"gateway"})),
        ANALYST: Principal("alice", frozenset({"analyst"})),
        APPROVER: Principal("bob", frozenset({"approver"})),
        OWNER: Principal("olga", frozenset({"owner"})),
    }
)
SIGNING_KEY = b"triage-test-signing-key-of-32-bytes!"
ENFORCE = dict.fromkeys(settings.ENFORCEABLE_RUNGS, "enforce")

ALERT = Alert.model_validate(example_alert())
KEY = ALERT.api_key_id
DECIDED_MS = int(ALERT.decided_at.timestamp() * 1000)
FIRST_MINUTE_MS = int(ALERT.minutes[0].minute.timestamp() * 1000)
NOW_MS = DECIDED_MS + 5 * 60_000
#: A second, milder alert on another key, of another family.
OTHER_KEY = "5e" * 8
OTHER = ALERT.model_copy(
    update={
        "alert_id": alert_id(OTHER_KEY, "challenge", DECIDED_MS),
        "api_key_id": OTHER_KEY,
        "action": "challenge",
        "score": 1.4,
        "top_family": "lof",
    }
)


@dataclass
class Triage:
    app: Starlette
    client: TestClient
    ledger: Ledger
    alerts: AlertStore
    labels: Path
    throttle_seq: int

    def session(self, token: str) -> TestClient:
        """A browser of its own, signed in with ``token``."""
        browser = TestClient(self.app, follow_redirects=False)
        signed_in = _login(browser, token)
        assert signed_in.status_code == 303, signed_in.text
        return browser

    def authorize(self) -> int:
        self.app.state.follower.poll()
        headers = {"Authorization": f"Bearer {GATEWAY}", API_KEY_HEADER: KEY}
        return self.client.post("/v1/authorize", headers=headers).status_code

    def actions(self) -> list[tuple[str, str]]:
        return [(r.entry.action, r.entry.actor) for r in self.ledger.records()]


@pytest.fixture
def triage(tmp_path: Path) -> Iterator[Triage]:
    with (
        open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}", key=b"k" * 32) as ledger,
        AlertStore(tmp_path / "alerts.db") as alerts,
    ):
        throttle = ledger.append(
            LedgerEntry(
                DECIDED_MS,
                KEY,
                "throttle",
                "system",
                ALERT.reason,
                params={"jobs_per_minute": 1},
                score=ALERT.score,
                model_name=ALERT.model_name,
                model_version=ALERT.model_version,
            )
        )
        alerts.add(ALERT)
        alerts.add(OTHER)
        labels = tmp_path / "labels" / "analyst.jsonl"
        app = create_gateway_app(
            DecisionTable(),
            modes=ENFORCE,
            tokens=TOKENS,
            clock=lambda: NOW_MS,
            challenges=ChallengeSigner(b"c" * 32),
            records=ledger.records,
            append=ledger.append,
            alerts=alerts,
            triage_ledger=ledger,
            labels_path=labels,
            signing_key=SIGNING_KEY,
        )
        with TestClient(app, follow_redirects=False) as client:
            yield Triage(app, client, ledger, alerts, labels, throttle.seq)


class _Page(HTMLParser):
    """The parts of a page the tests look at: element ids, job rows, forms' hidden fields."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.jobs: list[str] = []
        self.hidden: dict[str, str] = {}
        self._in_job = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self.ids.add(str(found["id"]))
        if tag == "tr":
            self._in_job = found.get("class") == "job"
        if tag == "input" and found.get("type") == "hidden" and found.get("name"):
            self.hidden[str(found["name"])] = str(found.get("value"))

    def handle_data(self, data: str) -> None:
        if self._in_job and data.strip().startswith("job-"):
            self.jobs.append(data.strip())
            self._in_job = False


def _login(browser: TestClient, token: str, target: str = "/triage") -> httpx.Response:
    form = _Page(browser.get("/triage/login").text).hidden
    return browser.post(
        "/triage/login", data={"csrf": form["csrf"], "token": token, "next": target}
    )


def _csrf(browser: TestClient) -> str:
    return _Page(browser.get("/triage").text).hidden["csrf"]


def _step(browser: TestClient, path: str, csrf: str | None, **fields: str) -> httpx.Response:
    data = {"reason": "checked the tenant's jobs", **fields}
    if csrf is not None:
        data["csrf"] = csrf
    return browser.post(path, data=data)


def test_a_wrong_token_is_refused(triage: Triage) -> None:
    browser = TestClient(triage.app, follow_redirects=False)
    refused = _login(browser, "not-a-token-" + "x" * 24)
    assert refused.status_code == 403 and "Unknown token" in refused.text
    assert SESSION_COOKIE not in refused.cookies
    gateway = _login(browser, GATEWAY)  # a principal, but no analyst or approver
    assert gateway.status_code == 403 and SESSION_COOKIE not in gateway.cookies
    assert browser.get("/triage").status_code == 303


def test_the_login_form_carries_its_own_csrf_nonce(triage: Triage) -> None:
    browser = TestClient(triage.app, follow_redirects=False)
    forged = browser.post("/triage/login", data={"csrf": "guess", "token": ANALYST})
    assert forged.status_code == 403 and SESSION_COOKIE not in forged.cookies


def test_a_session_cookie_is_http_only_strict_and_scoped_to_the_page(triage: Triage) -> None:
    browser = TestClient(triage.app, follow_redirects=False)
    signed_in = _login(browser, ANALYST)
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/triage"
    cookie = next(
        c for c in signed_in.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE + "=")
    )
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite", "path", "max-age"} <= attributes
    assert "SameSite=strict" in cookie or "samesite=strict" in cookie.lower()
    assert "Path=/triage" in cookie and "Max-Age=28800" in cookie


def test_without_a_session_every_page_sends_to_the_login(triage: Triage) -> None:
    browser = TestClient(triage.app, follow_redirects=False)
    for path in (
        "/triage",
        f"/triage/alerts/{ALERT.alert_id}",
        f"/triage/alerts/{ALERT.alert_id}/sparkline.png",
        f"/triage/keys/{KEY}",
    ):
        answer = browser.get(path)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/triage/login"), path
    posted = _step(browser, f"/triage/alerts/{ALERT.alert_id}/release", "whatever")
    assert posted.status_code == 303
    assert triage.actions() == [("throttle", "system")]


def test_the_login_returns_to_the_page_asked_for_and_nowhere_else(triage: Triage) -> None:
    browser = TestClient(triage.app, follow_redirects=False)
    path = f"/triage/alerts/{ALERT.alert_id}"
    sent = browser.get(path)
    assert sent.headers["location"] == f"/triage/login?next={path}"
    assert _login(browser, ANALYST, target=path).headers["location"] == path
    for elsewhere in ("//evil.example/triage", "https://evil.example/", "/triage/../admin"):
        assert _login(browser, ANALYST, target=elsewhere).headers["location"] == "/triage"


def test_the_queue_lists_open_alerts_by_score_and_filters_them(triage: Triage) -> None:
    analyst = triage.session(ANALYST)
    page = analyst.get("/triage")
    assert page.status_code == 200
    assert page.text.index(ALERT.alert_id) < page.text.index(OTHER.alert_id)  # score first
    assert f'title="{KEY}"' in page.text and f">{KEY[:12]}<" in page.text
    assert "2026-03-02T14:07:00Z" in page.text
    throttles = analyst.get("/triage", params={"action": "throttle"}).text
    assert ALERT.alert_id in throttles and OTHER.alert_id not in throttles
    lof = analyst.get("/triage", params={"family": "lof"}).text
    assert OTHER.alert_id in lof and ALERT.alert_id not in lof
    none = analyst.get("/triage", params={"action": "revoke", "family": "lof"}).text
    assert "no-alerts" in none


def test_every_page_sends_the_security_headers(triage: Triage) -> None:
    analyst = triage.session(ANALYST)
    for path in ("/triage", f"/triage/alerts/{ALERT.alert_id}", f"/triage/keys/{KEY}"):
        page = analyst.get(path)
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert page.headers["x-frame-options"] == "DENY"
        assert '<meta name="referrer" content="no-referrer">' in page.text
        assert "<script" not in page.text
    login = TestClient(triage.app).get("/triage/login")
    assert login.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


def test_the_alert_shows_its_sparkline_jobs_scores_and_buttons(triage: Triage) -> None:
    analyst = triage.session(ANALYST)
    page = analyst.get(f"/triage/alerts/{ALERT.alert_id}")
    assert page.status_code == 200
    svg = re.search(r'<svg[^>]*id="sparkline".*?</svg>', page.text, re.S)
    assert svg is not None
    root = ET.fromstring(svg.group(0))
    assert root.get("id") == "sparkline"
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 2
    parsed = _Page(page.text)
    assert parsed.jobs == [job.job_id for job in ALERT.recent_jobs]
    assert len(parsed.jobs) == 10 and "recent-jobs" in parsed.ids
    assert {"release", "escalate", "false-positive", "confirm-abuse"} <= parsed.ids
    for shown in ("isolation_forest", "submissions_5m", "shap.TreeExplainer", "c0" * 6):
        assert shown in page.text
    assert f'href="/triage/keys/{KEY}#seq-12"' in page.text  # links.ledger_seqs
    png = analyst.get(f"/triage/alerts/{ALERT.alert_id}/sparkline.png")
    assert png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert analyst.get(f"/triage/alerts/{'0' * 32}").status_code == 404
    assert analyst.get("/triage/alerts/not-an-id").status_code == 404


def test_an_approver_sees_the_approvals_an_analyst_the_triage_buttons(triage: Triage) -> None:
    proposal = triage.ledger.append(
        LedgerEntry(NOW_MS, KEY, "revoke", "system", "leak", params={"requires_approval": True})
    )
    path = f"/triage/alerts/{ALERT.alert_id}"
    approver = _Page(triage.session(APPROVER).get(path).text).ids
    assert {f"approve-{proposal.seq}", f"deny-{proposal.seq}", "release"} <= approver
    assert "false-positive" not in approver and "confirm-abuse" not in approver
    analyst = _Page(triage.session(ANALYST).get(path).text).ids
    assert f"approve-{proposal.seq}" not in analyst and "false-positive" in analyst


@pytest.mark.parametrize("csrf", [None, "", "forged-nonce", "other-session"])
def test_a_post_without_the_sessions_csrf_nonce_is_refused(
    triage: Triage, csrf: str | None
) -> None:
    analyst = triage.session(ANALYST)
    if csrf == "other-session":
        csrf = _csrf(triage.session(ANALYST))
    for step in ("release", "escalate", "false-positive", "confirm-abuse"):
        refused = _step(analyst, f"/triage/alerts/{ALERT.alert_id}/{step}", csrf)
        assert refused.status_code == 403, step
    proposal = triage.ledger.append(
        LedgerEntry(NOW_MS, KEY, "revoke", "system", "leak", params={"requires_approval": True})
    )
    approver = triage.session(APPROVER)
    assert _step(approver, f"/triage/queue/{proposal.seq}/approve", csrf).status_code == 403
    assert _step(analyst, "/triage/logout", csrf).status_code == 403
    assert triage.actions() == [("throttle", "system"), ("revoke", "system")]
    stored = triage.alerts.get(ALERT.alert_id)
    assert stored is not None and stored.status == "open"
    assert not triage.labels.exists()


def test_release_lifts_the_throttle_in_the_analysts_name(triage: Triage) -> None:
    assert triage.authorize() == 200
    assert triage.authorize() == 429  # one job a minute
    analyst = triage.session(ANALYST)
    done = _step(analyst, f"/triage/alerts/{ALERT.alert_id}/release", _csrf(analyst))
    assert done.status_code == 303
    assert done.headers["location"] == f"/triage/alerts/{ALERT.alert_id}?done=release"
    last = list(triage.ledger.records())[-1]
    assert (last.entry.action, last.entry.actor) == ("release", "alice")
    assert last.entry.refers_to == triage.throttle_seq
    assert last.entry.params == {"alert_id": ALERT.alert_id}
    stored = triage.alerts.get(ALERT.alert_id)
    assert stored is not None and (stored.status, stored.status_by) == ("released", "alice")
    assert all(triage.authorize() == 200 for _ in range(3))
    assert "Released" in analyst.get(done.headers["location"]).text
    # Nothing left to release: refused, said on the page, nothing written.
    again = _step(analyst, f"/triage/alerts/{ALERT.alert_id}/release", _csrf(analyst))
    assert again.status_code == 409 and "no restriction in force" in again.text
    assert len(triage.actions()) == 2


def test_a_false_positive_labels_the_window_and_releases(triage: Triage) -> None:
    analyst = triage.session(ANALYST)
    done = _step(analyst, f"/triage/alerts/{ALERT.alert_id}/false-positive", _csrf(analyst))
    assert done.status_code == 303
    label_entry, release = list(triage.ledger.records())[-2:]
    assert (label_entry.entry.action, label_entry.entry.actor) == ("label", "alice")
    assert label_entry.entry.params["kind"] == "false_positive"
    assert label_entry.entry.params["start_ms"] == FIRST_MINUTE_MS
    assert label_entry.entry.params["end_ms"] == NOW_MS
    assert (release.entry.action, release.entry.actor) == ("release", "alice")
    (label,) = read_labels(triage.labels)
    assert label.incident_id == f"analyst-{label_entry.seq}"
    assert (label.kind, label.api_key_ids) == ("false_positive", (KEY,))
    assert label.start == ALERT.minutes[0].minute
    assert label.end == datetime.fromtimestamp(NOW_MS / 1000, label.start.tzinfo)
    stored = triage.alerts.get(ALERT.alert_id)
    assert stored is not None and stored.status == "false_positive"
    assert triage.authorize() == 200 and triage.authorize() == 200


def test_confirmed_abuse_is_an_incident_label_and_keeps_the_throttle(triage: Triage) -> None:
    analyst = triage.session(ANALYST)
    path = f"/triage/alerts/{ALERT.alert_id}/confirm-abuse"
    done = _step(analyst, path, _csrf(analyst), kind="credential_stuffing")
    assert done.status_code == 303
    last = list(triage.ledger.records())[-1]
    assert (last.entry.action, last.entry.params["kind"]) == ("label", "credential_stuffing")
    (label,) = read_labels(triage.labels)
    assert (label.kind, label.api_key_ids) == ("credential_stuffing", (KEY,))
    assert label.incident_id == f"analyst-{last.seq}"
    stored = triage.alerts.get(ALERT.alert_id)
    assert stored is not None and stored.status == "confirmed_abuse"
    assert triage.authorize() == 200 and triage.authorize() == 429
    benign = _step(analyst, path, _csrf(analyst), kind="false_positive")
    assert benign.status_code == 409 and len(read_labels(triage.labels)) == 1


def test_an_escalation_is_recorded_and_changes_no_access(triage: Triage) -> None:
    analyst = triage.session(ANALYST)
    done = _step(analyst, f"/triage/alerts/{ALERT.alert_id}/escalate", _csrf(analyst))
    assert done.status_code == 303
    assert triage.actions()[-1] == ("escalate", "alice")
    assert triage.authorize() == 200 and triage.authorize() == 429
    queue = analyst.get("/triage").text
    escalated = queue[queue.index('id="escalated"') :]
    assert ALERT.alert_id in escalated


def test_an_approver_approves_a_system_revocation_and_an_analyst_cannot(triage: Triage) -> None:
    proposal = triage.ledger.append(
        LedgerEntry(
            NOW_MS, KEY, "revoke", "system", "key leaked", params={"requires_approval": True}
        )
    )
    analyst = triage.session(ANALYST)
    path = f"/triage/queue/{proposal.seq}/approve"
    refused = _step(analyst, path, _csrf(analyst))
    assert refused.status_code == 403 and "needs the role approver" in refused.text
    assert [i.seq for i in review_queue(triage.ledger)] == [proposal.seq]
    approver = triage.session(APPROVER)
    on_key_page = _Page(approver.get(f"/triage/keys/{KEY}").text)
    assert f"approve-{proposal.seq}" in on_key_page.ids
    assert on_key_page.hidden["back"] == f"/triage/keys/{KEY}"
    done = _step(approver, path, _csrf(approver), back=f"/triage/alerts/{ALERT.alert_id}")
    assert done.status_code == 303
    assert done.headers["location"] == f"/triage/alerts/{ALERT.alert_id}?done=approve"
    last = list(triage.ledger.records())[-1]
    assert (last.entry.action, last.entry.actor, last.entry.refers_to) == (
        "approve",
        "bob",
        proposal.seq,
    )
    assert review_queue(triage.ledger) == []
    assert triage.authorize() == 403  # revoked
    twice = _step(approver, path, _csrf(approver), back="//evil.example/")
    assert twice.status_code == 409 and "nothing waits" in twice.text
    assert 'href="/triage"' in twice.text and "evil.example" not in twice.text


def test_a_forged_expired_or_stale_session_is_refused(triage: Triage) -> None:
    alice = {
        "name": "alice",
        "roles": ["analyst", "approver"],
        "token": hash_token(ANALYST)[:16],
        "csrf": "n",
    }

    class LongAgo(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 9 * 3600

    cookies = {
        "wrong key": URLSafeTimedSerializer(b"x" * 32, salt=SESSION_SALT).dumps(alice),
        "wrong salt": URLSafeTimedSerializer(SIGNING_KEY, salt="other").dumps(alice),
        "expired": URLSafeTimedSerializer(SIGNING_KEY, salt=SESSION_SALT, signer=LongAgo).dumps(
            alice
        ),
        "unknown token": URLSafeTimedSerializer(SIGNING_KEY, salt=SESSION_SALT).dumps(
            {**alice, "token": "0" * 16}
        ),
        "garbage": "not.a.cookie",
    }
    for why, cookie in cookies.items():
        browser = TestClient(triage.app, follow_redirects=False, cookies={SESSION_COOKIE: cookie})
        assert browser.get("/triage").status_code == 303, why
    # A genuine cookie that claims more roles than the token has gets the token's only.
    genuine = URLSafeTimedSerializer(SIGNING_KEY, salt=SESSION_SALT).dumps(alice)
    browser = TestClient(triage.app, follow_redirects=False, cookies={SESSION_COOKIE: genuine})
    page = browser.get("/triage")
    assert page.status_code == 200 and "alice (analyst)" in page.text


def test_logout_ends_the_session(triage: Triage) -> None:
    analyst = triage.session(ANALYST)
    out = _step(analyst, "/triage/logout", _csrf(analyst))
    assert out.status_code == 303 and out.headers["location"] == "/triage/login"
    assert analyst.get("/triage").status_code == 303


def test_the_key_view_escapes_what_the_ledger_says(triage: Triage) -> None:
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    triage.ledger.append(LedgerEntry(NOW_MS, KEY, "review", "system", hostile))
    page = triage.session(ANALYST).get(f"/triage/keys/{KEY}")
    assert page.status_code == 200
    assert "<script" not in page.text and "<img" not in page.text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page.text
    parsed = _Page(page.text)
    assert {f"seq-{triage.throttle_seq}", "ledger", "key-alerts"} <= parsed.ids
    assert ALERT.alert_id in page.text and ALERT.model_version in page.text
    assert triage.session(ANALYST).get("/triage/keys/NOT-HEX").status_code == 404


def test_a_hostile_alert_is_escaped_too(triage: Triage) -> None:
    body: dict[str, Any] = json.loads(ALERT.to_json())
    body.update(
        alert_id=alert_id(KEY, "cap", DECIDED_MS),
        action="cap",
        reason="<script>alert(1)</script>",
        campaign={"name": "</pre><script>x</script>"},
    )
    body["links"]["dagster_run"] = "javascript:alert(1)"
    body["recent_jobs"][0]["job_id"] = 'job-"><script>'
    hostile = Alert.model_validate(body)
    triage.alerts.add(hostile)
    page = triage.session(ANALYST).get(f"/triage/alerts/{hostile.alert_id}")
    assert page.status_code == 200
    assert "<script" not in page.text
    assert 'href="javascript:' not in page.text


def test_the_triage_page_needs_both_an_alert_store_and_a_ledger(tmp_path: Path) -> None:
    with AlertStore(tmp_path / "alerts.db") as alerts, pytest.raises(TypeError, match="both"):
        create_gateway_app(DecisionTable(), tokens=TOKENS, alerts=alerts)


def test_a_button_pressed_without_a_reason_still_names_the_step(triage: Triage) -> None:
    analyst = triage.session(ANALYST)
    done = _step(analyst, f"/triage/alerts/{ALERT.alert_id}/escalate", _csrf(analyst), reason="")
    assert done.status_code == 303
    last = list(triage.ledger.records())[-1]
    assert (last.entry.action, last.entry.reason) == ("escalate", "escalate on the triage page")


def test_metrics_count_alerts_for_a_reader_only(triage: Triage) -> None:
    assert triage.client.get("/metrics").status_code == 401
    answer = triage.client.get("/metrics", headers={"Authorization": f"Bearer {GATEWAY}"})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    lines = answer.text.splitlines()
    assert 'qabuse_alerts_total{action="throttle",mode="enforce"} 1.0' in lines
    assert 'qabuse_alerts_total{action="challenge",mode="enforce"} 1.0' in lines
    assert 'qabuse_alerts_by_status{action="throttle",mode="enforce",status="open"} 1.0' in lines

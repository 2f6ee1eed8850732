"""Alert delivery: the sinks, the outbox deliverer against a real local receiver, metrics."""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from qabuse_dagster import settings
from qabuse_dagster.processes import free_port
from qabuse_dagster.response.alert_sinks import (
    AlertMetrics,
    Deliverer,
    JsonlSink,
    WebhookSink,
    block_kit,
    metrics_text,
    sign,
    sinks_from_settings,
    verify_signature,
)
from qabuse_dagster.response.alert_store import AlertStore
from qabuse_dagster.response.alerts import Alert, alert_id, example_alert

SECRET = b"receiver-shared-secret"
SINKS = ("jsonl", "webhook")


def make_alert(n: int, *, action: str = "throttle", mode: str = "enforce") -> Alert:
    """The example alert for the ``n``-th key, with its own id."""
    data = example_alert()
    key = f"{n:02x}" * 8
    decided_ms = int(Alert.model_validate(data).decided_at.timestamp() * 1000)
    data.update(
        api_key_id=key, action=action, mode=mode, alert_id=alert_id(key, action, decided_ms)
    )
    return Alert.model_validate(data)


class FakeClock:
    """Unix seconds that move only when told to."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    @property
    def ms(self) -> int:
        return int(self.now * 1000)


@dataclass(frozen=True)
class Received:
    alert_id: str
    body: bytes
    headers: dict[str, str]  # lower-cased names


class Receiver:
    """A webhook receiver on 127.0.0.1 that records each POST.

    It answers the statuses of ``script`` in turn, then 200; with ``hold`` it waits for that
    event (at most 10 s) before answering, to stand for a receiver that hangs.
    """

    def __init__(
        self, port: int = 0, script: Sequence[int] = (), hold: threading.Event | None = None
    ) -> None:
        self.received: list[Received] = []
        self.arrived = threading.Event()
        self._script = list(script)
        self._hold = hold
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/alerts"

    def ids(self) -> Counter[str]:
        with self._lock:
            return Counter(r.alert_id for r in self.received)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver._lock:
                    receiver.received.append(
                        Received(headers.get("x-qabuse-alert-id", ""), body, headers)
                    )
                    status = receiver._script.pop(0) if receiver._script else 200
                receiver.arrived.set()
                if receiver._hold is not None:
                    receiver._hold.wait(10)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AlertStore]:
    with AlertStore(tmp_path / "alerts.db") as store:
        yield store


@contextmanager
def webhook(url: str, timeout_s: float = 5.0) -> Iterator[WebhookSink]:
    with WebhookSink(url, SECRET, timeout_s=timeout_s) as sink:
        yield sink


def outbox_attempts(store: AlertStore, sink: str) -> dict[str, tuple[int, bool]]:
    """Per alert id: (attempts, delivered), read from the store's file."""
    with closing(sqlite3.connect(store.path)) as conn:
        rows = conn.execute(
            "SELECT alert_id, attempts, delivered_ms IS NOT NULL FROM outbox WHERE sink = ?",
            (sink,),
        ).fetchall()
    return {a: (int(n), bool(done)) for a, n, done in rows}


# The JSONL sink.


def test_jsonl_sink_writes_one_line_per_alert_once(store: AlertStore, tmp_path: Path) -> None:
    path = tmp_path / "out" / "alerts.jsonl"
    alerts = [make_alert(n) for n in range(3)]
    for alert in alerts:
        store.add(alert, sinks=["jsonl"])
    deliverer = Deliverer(store, {"jsonl": JsonlSink(path)})

    assert deliverer.run_once() == 3
    assert deliverer.run_once() == 0

    lines = path.read_text().splitlines()
    assert [json.loads(line)["alert_id"] for line in lines] == [a.alert_id for a in alerts]
    assert Alert.model_validate_json(lines[0]) == alerts[0]
    status = store.outbox_status()["jsonl"]
    assert (status["pending"], status["delivered"]) == (0, 3)
    assert deliverer.delivered["jsonl"] == 3
    assert deliverer.failed["jsonl"] == 0


def test_jsonl_sink_ends_a_line_a_crash_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "alerts.jsonl"
    path.write_bytes(b'{"alert_id": "cut sh')
    alert = make_alert(1)

    JsonlSink(path).deliver(alert)

    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert Alert.model_validate_json(lines[1]) == alert


def test_jsonl_sink_defaults_under_the_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(settings.HOME_ENV, str(tmp_path))
    assert JsonlSink().path == tmp_path / "alerts" / "alerts.jsonl"


# Signatures and the message.


def test_signature_round_trip_and_refusals() -> None:
    body = json.dumps(block_kit(make_alert(1))).encode()
    now = 1_772_460_420
    signature = sign(SECRET, now, body)

    assert signature.startswith("v1=")
    assert len(signature) == len("v1=") + 64
    assert verify_signature(SECRET, now, body, signature, now=now)
    assert verify_signature(SECRET.decode(), str(now), body, signature, now=now + 299)
    assert not verify_signature(SECRET, now, body + b" ", signature, now=now)
    assert not verify_signature(b"another-secret", now, body, signature, now=now)
    assert not verify_signature(SECRET, now + 1, body, signature, now=now)
    assert not verify_signature(SECRET, now, body, signature, now=now + 301)
    assert not verify_signature(SECRET, now, body, signature, now=now - 301)
    assert not verify_signature(SECRET, "yesterday", body, signature, now=now)
    assert not verify_signature(SECRET, now, body, "v1=" + "0" * 64, now=now)
    assert not verify_signature(SECRET, now, body, "v1=é", now=now)


def test_block_kit_shape() -> None:
    data = example_alert()
    data["links"] = {
        "triage": "https://triage.example/alerts/1",
        "mlflow_model_version": "https://mlflow.example/models/3",
        "ledger_seqs": [12],
    }
    alert = Alert.model_validate(data)

    message = block_kit(alert)

    assert alert.action in message["text"] and alert.api_key_id in message["text"]
    blocks = message["blocks"]
    assert [b["type"] for b in blocks] == ["header", "section", "section", "context"]
    header = blocks[0]["text"]
    assert header["type"] == "plain_text"
    assert "throttle" in header["text"] and alert.api_key_id in header["text"]
    assert len(header["text"]) <= 150
    fields = blocks[1]["fields"]
    assert len(fields) == 6
    assert all(f["type"] == "mrkdwn" and f["text"].strip() for f in fields)
    field_text = "\n".join(f["text"] for f in fields)
    for expected in (alert.api_key_id, "9a" * 8, "2.310 vs threshold 1.000", "v3"):
        assert expected in field_text
    assert "isolation_forest" in field_text
    assert "`submissions_5m` = 196 (usual 9" in blocks[2]["text"]["text"]
    context = " ".join(e["text"] for e in blocks[3]["elements"])
    assert "500 submissions, 30 failures" in context  # 50 minutes of 2, 10 of 40
    assert "<https://triage.example/alerts/1|Triage>" in context
    assert "MLflow model version" in context
    assert "Dagster run" not in context


def test_block_kit_names_shadow_proposals_and_escapes_markup() -> None:
    data = example_alert()
    data.update(mode="shadow", requires_approval=True, reason="score <b> & more")
    message = block_kit(Alert.model_validate(data))

    assert "throttle (shadow, proposal)" in message["blocks"][0]["text"]["text"]
    assert message["blocks"][1]["text"]["text"] == "score &lt;b&gt; &amp; more"


@pytest.mark.parametrize(
    ("url", "secret", "names"),
    [
        ("https://hooks.example/x", b"", settings.ALERT_WEBHOOK_SECRET_ENV),
        ("ftp://hooks.example/x", SECRET, settings.ALERT_WEBHOOK_URL_ENV),
        ("hooks.example/x", SECRET, settings.ALERT_WEBHOOK_URL_ENV),
    ],
)
def test_webhook_sink_refuses_misconfiguration(url: str, secret: bytes, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        WebhookSink(url, secret)


def test_webhook_sink_repr_hides_the_url_path() -> None:
    with WebhookSink("https://hooks.example/services/T0/B0/token", SECRET) as sink:
        assert "token" not in repr(sink) and "hooks.example" in repr(sink)


# The deliverer against a real receiver.


def test_receiver_down_then_up_gets_each_alert_once_signed(
    store: AlertStore, tmp_path: Path
) -> None:
    clock = FakeClock()
    port = free_port()
    alerts = [make_alert(n) for n in range(3)]
    for alert in alerts:
        store.add(alert, sinks=SINKS, now_ms=clock.ms)

    with webhook(f"http://127.0.0.1:{port}/hooks/alerts") as hook:
        deliverer = Deliverer(
            store,
            {"jsonl": JsonlSink(tmp_path / "alerts.jsonl"), "webhook": hook},
            clock=clock,
            rng=random.Random(7),
        )

        # Nothing listens: the webhook fails, the JSONL sink is not held back, nothing lost.
        assert deliverer.run_once() == 3
        status = store.outbox_status()
        assert status["jsonl"]["delivered"] == 3
        assert status["webhook"]["pending"] == 3
        assert status["webhook"]["max_attempts"] >= 1
        assert status["webhook"]["last_error"]
        # The first retry waits base_backoff_s (1 s) times a jitter in [0.5, 1.0].
        assert clock.ms + 500 <= status["webhook"]["next_attempt_ms"] <= clock.ms + 1000
        assert deliverer.failed["webhook"] == 3
        assert deliverer.run_once() == 0  # not due yet

        with Receiver(port) as receiver:
            clock.advance(2)
            for _ in range(5):
                if store.outbox_status()["webhook"]["pending"] == 0:
                    break
                deliverer.run_once()
                clock.advance(2)

    by_id = {a.alert_id: a for a in alerts}
    assert receiver.ids() == Counter(dict.fromkeys(by_id, 1))
    for request in receiver.received:
        assert request.headers["content-type"] == "application/json"
        assert verify_signature(
            SECRET,
            request.headers["x-qabuse-timestamp"],
            request.body,
            request.headers["x-qabuse-signature"],
        )
        header = json.loads(request.body)["blocks"][0]["text"]["text"]
        assert by_id[request.alert_id].api_key_id in header
    status = store.outbox_status()["webhook"]
    assert (status["pending"], status["delivered"], status["last_error"]) == (0, 3, None)
    assert deliverer.delivered == Counter({"jsonl": 3, "webhook": 3})


def test_receiver_failing_twice_gets_the_alert_once_after_three_attempts(
    store: AlertStore,
) -> None:
    clock = FakeClock()
    alert = make_alert(1)
    store.add(alert, sinks=["webhook"], now_ms=clock.ms)

    with Receiver(script=[500, 500]) as receiver, webhook(receiver.url) as hook:
        deliverer = Deliverer(store, {"webhook": hook}, clock=clock, rng=random.Random(1))
        results = []
        for _ in range(3):
            results.append(deliverer.run_once())
            # Past the longest backoff the second try can draw (2 s).
            clock.advance(3)
        assert deliverer.run_once() == 0

    assert results == [0, 0, 1]
    assert len(receiver.received) == 3
    assert receiver.ids() == Counter({alert.alert_id: 3})
    assert outbox_attempts(store, "webhook") == {alert.alert_id: (3, True)}
    assert (deliverer.failed["webhook"], deliverer.delivered["webhook"]) == (2, 1)
    assert store.outbox_status()["webhook"]["delivered"] == 1


def test_a_hanging_receiver_delays_neither_add_nor_other_sinks(
    store: AlertStore, tmp_path: Path
) -> None:
    hold = threading.Event()
    path = tmp_path / "alerts.jsonl"
    store.add(make_alert(1), sinks=SINKS)

    with Receiver(hold=hold) as receiver, webhook(receiver.url, timeout_s=10) as hook:
        deliverer = Deliverer(store, {"jsonl": JsonlSink(path), "webhook": hook}, poll_s=0.01)
        deliverer.start()
        try:
            assert receiver.arrived.wait(5), "the deliverer never posted"
            # The webhook's thread now waits on a receiver that does not answer.
            started = time.monotonic()
            assert store.add(make_alert(2), sinks=SINKS)
            assert time.monotonic() - started < 1.0

            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and len(_lines(path)) < 2:
                time.sleep(0.01)
            assert len(_lines(path)) == 2
            assert store.outbox_status()["webhook"]["pending"] == 2
        finally:
            hold.set()
            deliverer.stop(timeout=15)

    assert not any(t.is_alive() for t in threading.enumerate() if t.name.startswith("qabuse-al"))


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_backoff_doubles_with_jitter_and_caps(store: AlertStore) -> None:
    deliverer = Deliverer(
        store,
        {},
        base_backoff_s=1.0,
        max_backoff_s=300.0,
        rng=random.Random(3),
    )
    for attempts, ceiling in ((0, 1.0), (1, 2.0), (4, 16.0), (8, 256.0), (9, 300.0)):
        draws = [deliverer.backoff_s(attempts) for _ in range(200)]
        assert min(draws) >= ceiling * 0.5
        assert max(draws) <= ceiling
        assert max(draws) - min(draws) > ceiling * 0.3  # jittered, not constant
    assert deliverer.backoff_s(10_000) <= 300.0


def test_a_raising_sink_never_escapes(store: AlertStore, caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        name = "broken"

        def deliver(self, alert: Alert) -> None:
            raise OSError("disk on fire")

    alert = make_alert(1)
    store.add(alert, sinks=["broken"])

    assert Deliverer(store, {"broken": Broken()}).run_once() == 0

    assert store.outbox_status()["broken"]["last_error"] == "OSError: disk on fire"
    assert any(
        alert.alert_id in r.getMessage() and "broken" in r.getMessage() for r in caplog.records
    )


# Metrics.


def test_metrics_text_reads_the_store(store: AlertStore, tmp_path: Path) -> None:
    for n in range(3):
        store.add(make_alert(n), sinks=SINKS)
    store.add(make_alert(9, action="cap", mode="shadow"), sinks=SINKS)
    store.set_status(make_alert(0).alert_id, "resolved", "analyst")
    Deliverer(store, {"jsonl": JsonlSink(tmp_path / "alerts.jsonl")}).run_once()

    body, content_type = metrics_text(store)

    lines = body.decode().splitlines()
    assert content_type.startswith("text/plain")
    assert 'qabuse_alerts_by_status{action="throttle",mode="enforce",status="open"} 2.0' in lines
    assert (
        'qabuse_alerts_by_status{action="throttle",mode="enforce",status="resolved"} 1.0' in lines
    )
    assert 'qabuse_alerts_by_status{action="cap",mode="shadow",status="open"} 1.0' in lines
    # Triage moves alerts between statuses; the total only grows.
    assert 'qabuse_alerts_total{action="throttle",mode="enforce"} 3.0' in lines
    assert 'qabuse_alerts_total{action="cap",mode="shadow"} 1.0' in lines
    assert 'qabuse_alert_outbox_pending{sink="webhook"} 4.0' in lines
    assert 'qabuse_alert_outbox_pending{sink="jsonl"} 0.0' in lines
    assert 'qabuse_alert_outbox_delivered_total{sink="jsonl"} 4.0' in lines
    assert 'qabuse_alert_outbox_max_attempts{sink="webhook"} 0.0' in lines


def test_alert_metrics_on_a_registry_reads_at_scrape_time(store: AlertStore) -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    AlertMetrics(store, registry)
    labels = {"action": "throttle", "mode": "enforce"}
    assert registry.get_sample_value("qabuse_alerts_total", labels) is None

    store.add(make_alert(1), sinks=["jsonl"])

    assert registry.get_sample_value("qabuse_alerts_total", labels) == 1.0
    assert registry.get_sample_value("qabuse_alerts_by_status", {**labels, "status": "open"}) == 1
    assert registry.get_sample_value("qabuse_alert_outbox_pending", {"sink": "jsonl"}) == 1.0
    with pytest.raises(ValueError):
        AlertMetrics(store, registry)  # the names are taken


# Settings.


def test_sinks_from_settings_without_a_webhook(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(settings.HOME_ENV, str(tmp_path))
    monkeypatch.delenv(settings.ALERT_WEBHOOK_URL_ENV, raising=False)

    sinks = sinks_from_settings()

    assert list(sinks) == ["jsonl"]
    assert isinstance(sinks["jsonl"], JsonlSink)
    assert sinks["jsonl"].path == tmp_path / "alerts" / "alerts.jsonl"


def test_sinks_from_settings_with_a_webhook(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(settings.HOME_ENV, str(tmp_path))
    monkeypatch.setenv(settings.ALERT_WEBHOOK_URL_ENV, "https://hooks.example/alerts")
    monkeypatch.setenv(settings.ALERT_WEBHOOK_SECRET_ENV, "s3cret")

    sinks = sinks_from_settings()

    assert list(sinks) == ["jsonl", "webhook"]
    assert {name: sink.name for name, sink in sinks.items()} == {
        "jsonl": "jsonl",
        "webhook": "webhook",
    }
    assert isinstance(sinks["webhook"], WebhookSink)
    assert sinks["webhook"].url == "https://hooks.example/alerts"


def test_sinks_from_settings_refuses_a_webhook_without_a_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(settings.HOME_ENV, str(tmp_path))
    monkeypatch.setenv(settings.ALERT_WEBHOOK_URL_ENV, "https://hooks.example/alerts")
    monkeypatch.delenv(settings.ALERT_WEBHOOK_SECRET_ENV, raising=False)

    with pytest.raises(ValueError, match=settings.ALERT_WEBHOOK_SECRET_ENV):
        sinks_from_settings()

"""Alert delivery: sinks, the deliverer that drains the store's outbox into them, and metrics.

Delivery is at-least-once from a durable outbox. `AlertStore.add
<qabuse_dagster.response.alert_store.AlertStore.add>` writes an alert and one outbox row
per sink in one transaction, and returns: the caller that raises an alert never waits on
a sink. A `Deliverer` claims due rows of each sink for a lease, hands each alert to its
`Sink`, and marks the row delivered, or failed with the next attempt's time (exponential
backoff with jitter, capped). A sink that is down loses nothing: its rows wait in the
outbox and go out once it answers again.

At-least-once means an alert can arrive twice: a crash between a sink accepting an alert
and the store recording it, or a lease that runs out mid-delivery, sends it again.
Receivers dedupe on the alert id (the webhook's ``X-Qabuse-Alert-Id`` header, the JSONL
line's ``alert_id``), which is stable for a decision (`~qabuse_dagster.response.alerts.alert_id`).

Two sinks ship:

- `JsonlSink` appends each alert as one JSON line to ``$QABUSE_HOME/alerts/alerts.jsonl``.
- `WebhookSink` POSTs a Slack-compatible Block Kit message (`block_kit`), signed the way
  Slack signs its requests: ``X-Qabuse-Signature: v1=<hex HMAC-SHA256(secret,
  "v1:{timestamp}:{body}")>`` with ``X-Qabuse-Timestamp`` in unix seconds. A receiver
  checks it with `verify_signature`, which also refuses stale timestamps (replays).

`sinks_from_settings` builds the sinks the environment asks for; `AlertMetrics` exports
the store's alert counts and outbox state to Prometheus at scrape time.

Example:
    >>> import tempfile
    >>> from qabuse_dagster.response.alert_store import AlertStore
    >>> from qabuse_dagster.response.alerts import Alert, example_alert
    >>> with tempfile.TemporaryDirectory() as d, AlertStore(Path(d) / "a.db") as store:
    ...     sinks = {"jsonl": JsonlSink(Path(d) / "alerts.jsonl")}
    ...     store.add(Alert.model_validate(example_alert()), sinks=sinks)
    ...     Deliverer(store, sinks).run_once(), store.outbox_status()["jsonl"]["pending"]
    True
    (1, 0)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qabuse_dagster import settings
from qabuse_dagster.response.alert_store import AlertStore
from qabuse_dagster.response.alerts import Alert

__all__ = [
    "SIGNATURE_VERSION",
    "AlertMetrics",
    "Deliverer",
    "JsonlSink",
    "Sink",
    "WebhookError",
    "WebhookSink",
    "block_kit",
    "jsonl_path",
    "metrics_text",
    "sign",
    "sinks_from_settings",
    "verify_signature",
]

logger = logging.getLogger(__name__)

#: The signature scheme's version: the prefix of the signed string and of the header value.
SIGNATURE_VERSION = "v1"

# Slack's limits on Block Kit: a header's text is plain text of at most 150 characters;
# a section's text at most 3000.
_HEADER_MAX = 150
_SECTION_MAX = 3000


class Sink(Protocol):
    """Where alerts go. ``deliver`` returns once the sink holds the alert, raises otherwise."""

    name: str

    def deliver(self, alert: Alert) -> None: ...


def jsonl_path(paths: settings.Paths | None = None) -> Path:
    """The JSONL sink's file of a home: ``$QABUSE_HOME/alerts/alerts.jsonl``."""
    return (paths or settings.paths()).home / "alerts" / "alerts.jsonl"


class JsonlSink:
    """Appends each alert as one line of JSON (`Alert.to_json`), synced to disk before returning.

    Lines are whole: a line a crash cut short is ended before the next is written, so a
    reader skips at most that one line. An alert can appear twice (module docstring).

    Args:
        path: The file; created, with its folder, when missing. Default `jsonl_path`.
        name: The sink's name in the outbox.
    """

    def __init__(self, path: Path | None = None, *, name: str = "jsonl") -> None:
        self.path = Path(path) if path is not None else jsonl_path()
        self.name = name
        self._lock = threading.Lock()

    def deliver(self, alert: Alert) -> None:
        line = alert.to_json().encode() + b"\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a+b") as file:
                if file.seek(0, os.SEEK_END) > 0:
                    file.seek(-1, os.SEEK_END)
                    if file.read(1) != b"\n":
                        line = b"\n" + line
                file.write(line)
                file.flush()
                os.fsync(file.fileno())

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r}, name={self.name!r})"


class WebhookError(RuntimeError):
    """The webhook answered with a status other than 2xx."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"HTTP {status}: {message}")


class WebhookSink:
    """POSTs each alert as a signed Slack-compatible Block Kit message (module docstring).

    Headers: ``X-Qabuse-Alert-Id`` (receivers dedupe on it), ``X-Qabuse-Timestamp`` (unix
    seconds), ``X-Qabuse-Signature`` (`sign`) and ``Content-Type: application/json``.

    Args:
        url: An http(s) URL, from ``QABUSE_ALERT_WEBHOOK_URL`` in a deployment.
        secret: The signing secret shared with the receiver, from
            ``QABUSE_ALERT_WEBHOOK_SECRET``; must not be empty.
        timeout_s: Per request (connect, read, write each).
        name: The sink's name in the outbox.

    Raises:
        ValueError: ``url`` is not http(s) or ``secret`` is empty.
    """

    def __init__(
        self, url: str, secret: str | bytes, timeout_s: float = 5.0, *, name: str = "webhook"
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"{settings.ALERT_WEBHOOK_URL_ENV} must be an http(s) URL with a host,"
                f" got {parts.scheme or 'no'} scheme"
            )
        secret_bytes = secret.encode() if isinstance(secret, str) else bytes(secret)
        if not secret_bytes:
            raise ValueError(
                f"{settings.ALERT_WEBHOOK_SECRET_ENV} must be set to a non-empty secret"
                " to sign webhook alerts"
            )
        self.url = url
        self.name = name
        self.timeout_s = timeout_s
        self._secret = secret_bytes
        # Where the URL is a credential (Slack's webhook URLs are), only its host is shown.
        self._where = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        self._http = httpx.Client(timeout=timeout_s, follow_redirects=False)

    def deliver(self, alert: Alert) -> None:
        body = json.dumps(block_kit(alert), separators=(",", ":")).encode()
        timestamp = int(time.time())
        response = self._http.post(
            self.url,
            content=body,
            headers={
                "Content-Type": "application/json",
                "X-Qabuse-Alert-Id": alert.alert_id,
                "X-Qabuse-Timestamp": str(timestamp),
                "X-Qabuse-Signature": sign(self._secret, timestamp, body),
            },
        )
        if not response.is_success:
            raise WebhookError(response.status_code, response.text[:200])

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> WebhookSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WebhookSink({self._where!r}, name={self.name!r})"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Qabuse-Signature`` value of a request: ``v1=`` and the hex HMAC-SHA256.

    The signed string is ``v1:{timestamp}:{body}``, as Slack signs with ``v0``.

    >>> sign(b"s3cret", 1700000000, b"{}")[:3]
    'v1='
    """
    message = f"{SIGNATURE_VERSION}:{int(timestamp)}:".encode() + body
    digest = hmac.new(secret, message, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={digest}"


def verify_signature(
    secret: bytes | str,
    timestamp: int | str,
    body: bytes,
    signature: str,
    *,
    now: float | None = None,
    tolerance_s: float = 300,
) -> bool:
    """Whether a request is one the holder of ``secret`` signed within ``tolerance_s``.

    For receivers: pass the raw body and the ``X-Qabuse-Timestamp`` and
    ``X-Qabuse-Signature`` headers as received. A timestamp further than ``tolerance_s``
    from ``now`` (default: this host's clock) is refused, so a captured request cannot be
    replayed later; the comparison takes the same time wherever the signatures differ.

    >>> body = b'{"text": "hi"}'
    >>> verify_signature(b"k", 100, body, sign(b"k", 100, body), now=101)
    True
    >>> verify_signature(b"k", 100, body, sign(b"k", 100, body), now=1000)
    False
    """
    try:
        sent_at = int(timestamp)
    except (TypeError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - sent_at) > tolerance_s:
        return False
    key = secret.encode() if isinstance(secret, str) else secret
    expected = sign(key, sent_at, body).encode()
    return hmac.compare_digest(expected, signature.encode("utf-8", "replace"))


def block_kit(alert: Alert) -> dict[str, Any]:
    """The Slack Block Kit message of an alert: ``{"text": ..., "blocks": [...]}``.

    ``text`` is the one-line fallback notifications show; the blocks are a header (action
    and key), the decision's fields, the top features and a context line with the key's
    last hour and the links that are set.

    >>> from qabuse_dagster.response.alerts import example_alert
    >>> message = block_kit(Alert.model_validate(example_alert()))
    >>> [block["type"] for block in message["blocks"]]
    ['header', 'section', 'section', 'context']
    """
    qualifiers = [
        word
        for word, applies in (
            ("shadow", alert.mode == "shadow"),
            ("proposal", alert.requires_approval),
        )
        if applies
    ]
    action = f"{alert.action} ({', '.join(qualifiers)})" if qualifiers else alert.action
    header = f"qabuse {action}: key {alert.api_key_id}"
    score = f"{alert.score:.3f} vs threshold {alert.threshold:.3f}"
    if alert.stale:
        score += " (stale features)"
    fields = [
        ("Key", f"`{alert.api_key_id}`"),
        ("User", f"`{alert.user}`" if alert.user else "unknown"),
        ("Action", f"{alert.action} ({alert.mode})"),
        ("Score", score),
        ("Model", f"{alert.model_name} v{alert.model_version}"),
        ("Top family", alert.top_family or "none"),
    ]
    return {
        "text": f"{header}, score {score}",
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": header[:_HEADER_MAX]}},
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": _mrkdwn(alert.reason)[:_SECTION_MAX]},
                "fields": [
                    {"type": "mrkdwn", "text": f"*{label}*\n{_mrkdwn(value)}"}
                    for label, value in fields
                ],
            },
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": _features_text(alert)[:_SECTION_MAX]},
            },
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": text} for text in _context_texts(alert)],
            },
        ],
    }


def _features_text(alert: Alert) -> str:
    lines = [
        f"• `{_mrkdwn(c.feature)}` = {_number(c.value)} (usual {_number(c.usual)},"
        f" from {c.usual_from}), contribution {c.contribution:+.3g}"
        for c in alert.top_features
    ]
    title = f"*Top features* ({_mrkdwn(alert.explainer)})"
    return "\n".join([title, *lines]) if lines else f"{title}\nno feature contributions"


def _context_texts(alert: Alert) -> list[str]:
    texts = [
        f"Last hour: {alert.submissions_last_hour} submissions, {alert.failures_last_hour} failures"
    ]
    links = alert.links
    for label, url in (
        ("Triage", links.triage),
        ("MLflow model version", links.mlflow_model_version),
        ("Dagster run", links.dagster_run),
    ):
        if url:
            texts.append(f"<{_mrkdwn(url)}|{label}>")
    return texts


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _mrkdwn(text: str) -> str:
    """Escape the three characters Slack's mrkdwn reads as markup (its documented rule)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def sinks_from_settings(paths: settings.Paths | None = None) -> dict[str, Sink]:
    """The sinks the environment configures, by name.

    The JSONL sink always (under ``paths``' home); the webhook when
    ``QABUSE_ALERT_WEBHOOK_URL`` is set, signed with ``QABUSE_ALERT_WEBHOOK_SECRET``.

    Raises:
        ValueError: The webhook URL is set but not http(s), or its secret is missing.
    """
    sinks: dict[str, Sink] = {"jsonl": JsonlSink(jsonl_path(paths))}
    url = os.environ.get(settings.ALERT_WEBHOOK_URL_ENV, "").strip()
    if url:
        secret = os.environ.get(settings.ALERT_WEBHOOK_SECRET_ENV, "")
        sinks["webhook"] = WebhookSink(url, secret)
    return sinks


class Deliverer:
    """Drains the store's outbox into the sinks (module docstring); at-least-once.

    `run_once` delivers what is due now, in the calling thread. `start` runs each sink in
    its own daemon thread, every ``poll_s``, so a sink that hangs delays no other sink and
    never the code that adds alerts; `stop` ends and joins them. A sink's exception never
    escapes: it is logged with the alert id and the sink, and the row is retried after
    ``min(max_backoff_s, base_backoff_s * 2**attempts)`` times a jitter in [0.5, 1.0].

    ``delivered`` and ``failed`` count this process's attempts per sink; the store holds
    the durable state (`AlertStore.outbox_status`).

    Args:
        store: The alert store whose outbox is drained.
        sinks: The sinks by outbox name.
        poll_s: How long a sink's thread waits when nothing more is due.
        base_backoff_s: The wait after a first failure; doubles with each attempt.
        max_backoff_s: The longest wait between attempts.
        lease_s: How long a claim holds rows against other deliverers. Rows of a batch
            are only started in the lease's first half; the rest wait for the next claim.
        batch: Rows claimed per sink at once, at most.
        clock: Unix seconds; injectable for tests.
        rng: The jitter's source; injectable for tests.
    """

    def __init__(
        self,
        store: AlertStore,
        sinks: Mapping[str, Sink],
        *,
        poll_s: float = 0.5,
        base_backoff_s: float = 1.0,
        max_backoff_s: float = 300.0,
        lease_s: float = 30.0,
        batch: int = 50,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        # A zero backoff would have a thread re-claim its failed rows at once, in a loop.
        if poll_s <= 0 or base_backoff_s <= 0 or lease_s <= 0 or batch <= 0:
            raise ValueError("poll_s, base_backoff_s, lease_s and batch must be positive")
        if max_backoff_s < base_backoff_s:
            raise ValueError("max_backoff_s must be at least base_backoff_s")
        self.store = store
        self.sinks = dict(sinks)
        self.poll_s = poll_s
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.lease_s = lease_s
        self.batch = batch
        self.clock = clock
        self.rng = rng or random.Random()
        self.delivered: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def run_once(self) -> int:
        """Deliver every sink's due rows (one batch each), here; the number delivered."""
        return sum(self._drain(name, sink)[1] for name, sink in self.sinks.items())

    def backoff_s(self, attempts: int) -> float:
        """The wait before the next try of a row that has failed ``attempts`` + 1 times."""
        # The exponent is capped so that a row failing for years cannot overflow a float.
        ceiling = min(self.max_backoff_s, self.base_backoff_s * 2 ** min(attempts, 32))
        return ceiling * self.rng.uniform(0.5, 1.0)

    def start(self) -> None:
        """Deliver in the background, one daemon thread per sink, until `stop`."""
        if self._threads:
            return
        self._stop.clear()
        self._threads = [
            threading.Thread(
                target=self._run, args=(name, sink), name=f"qabuse-alerts-{name}", daemon=True
            )
            for name, sink in self.sinks.items()
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """End the threads and join them (a delivery in progress finishes first)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []

    def __enter__(self) -> Deliverer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, name: str, sink: Sink) -> None:
        while not self._stop.is_set():
            try:
                claimed, _ = self._drain(name, sink, background=True)
            except Exception:
                # The store itself failed (disk, lock timeout): try again after a poll.
                logger.exception("alert deliverer for sink %s failed", name)
                claimed = 0
            if claimed < self.batch:
                self._stop.wait(self.poll_s)

    def _drain(self, name: str, sink: Sink, *, background: bool = False) -> tuple[int, int]:
        """One batch of ``sink``: (rows claimed, rows delivered).

        Rows left unstarted (a `stop` in the background, half the lease gone) stay claimed
        until the lease passes, then the next claim takes them.
        """
        claimed_ms = self._now_ms()
        lease_ms = int(self.lease_s * 1000)
        items = self.store.claim(name, limit=self.batch, lease_ms=lease_ms, now_ms=claimed_ms)
        delivered = 0
        for item in items:
            if (background and self._stop.is_set()) or (
                self._now_ms() >= claimed_ms + lease_ms // 2
            ):
                break
            alert_id = item.alert.alert_id
            try:
                sink.deliver(item.alert)
            except Exception as exc:
                wait_s = self.backoff_s(item.attempts)
                error = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "alert %s to sink %s failed (attempt %d, next in %.1f s): %s",
                    alert_id,
                    name,
                    item.attempts + 1,
                    wait_s,
                    error,
                )
                retry_at_ms = self._now_ms() + int(wait_s * 1000)
                self.store.failed(alert_id, name, error, retry_at_ms=retry_at_ms)
                self._count(self.failed, name)
                continue
            self.store.delivered(alert_id, name, now_ms=self._now_ms())
            self._count(self.delivered, name)
            delivered += 1
        return len(items), delivered

    def _count(self, counter: Counter[str], name: str) -> None:
        with self._counts_lock:
            counter[name] += 1

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)


class AlertMetrics(Collector):
    """A Prometheus collector that reads the alert store at scrape time.

    Exports ``qabuse_alerts_total`` by action and mode (every alert ever written: it
    only grows), ``qabuse_alerts_by_status`` by action, mode and triage status (a gauge:
    an alert moves between statuses when triaged), and per sink
    ``qabuse_alert_outbox_pending``, ``qabuse_alert_outbox_delivered_total`` and
    ``qabuse_alert_outbox_max_attempts`` (the most attempts of a row still waiting).

    Args:
        store: The store to read.
        registry: Registered on it when given.
    """

    def __init__(self, store: AlertStore, registry: CollectorRegistry | None = None) -> None:
        self.store = store
        if registry is not None:
            registry.register(self)

    def describe(self) -> Iterator[Metric]:
        # Names only, so that registering checks for clashes without reading the store.
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        alerts, by_status, pending, delivered, attempts = self._families()
        totals: dict[tuple[str, str], int] = {}
        for (action, mode, status), n in sorted(self.store.counts().items()):
            by_status.add_metric([action, mode, status], n)
            totals[action, mode] = totals.get((action, mode), 0) + n
        for (action, mode), n in sorted(totals.items()):
            alerts.add_metric([action, mode], n)
        for sink, state in sorted(self.store.outbox_status().items()):
            pending.add_metric([sink], state["pending"])
            delivered.add_metric([sink], state["delivered"])
            attempts.add_metric([sink], state["max_attempts"])
        yield from (alerts, by_status, pending, delivered, attempts)

    @staticmethod
    def _families() -> tuple[
        CounterMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        CounterMetricFamily,
        GaugeMetricFamily,
    ]:
        return (
            CounterMetricFamily(
                "qabuse_alerts",
                "Alerts written, by action and mode.",
                labels=["action", "mode"],
            ),
            GaugeMetricFamily(
                "qabuse_alerts_by_status",
                "Alerts in the store, by action, mode and triage status.",
                labels=["action", "mode", "status"],
            ),
            GaugeMetricFamily(
                "qabuse_alert_outbox_pending",
                "Alerts waiting for delivery to a sink.",
                labels=["sink"],
            ),
            CounterMetricFamily(
                "qabuse_alert_outbox_delivered",
                "Alerts delivered to a sink.",
                labels=["sink"],
            ),
            GaugeMetricFamily(
                "qabuse_alert_outbox_max_attempts",
                "The most delivery attempts of an alert still waiting for a sink.",
                labels=["sink"],
            ),
        )


def metrics_text(store: AlertStore) -> tuple[bytes, str]:
    """The store's metrics in Prometheus' text format: (body, content type), for ``/metrics``."""
    registry = CollectorRegistry()
    AlertMetrics(store, registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST

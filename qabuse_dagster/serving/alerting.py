"""From a decision to an alert: the context the stream worker keeps, and the alert it writes.

The stream worker sees every record, so it keeps what an analyst wants beside a
decision at almost no cost (`KeyActivity`): each key's last jobs at their latest
status, its last hour per minute (the rows' own ``submissions_last_60_min`` and
``failures_last_60_min`` sequences) and, over the last day, which keys and users ran
each code hash. When the policy engine acts it takes a snapshot of that and hands it to
an `AlertWriter`, whose thread does the slow part off the decision path: Shapley values
of the family that drove the score (`models.explain.attribute`), the key's usual values
(`UsualValues`: the median of its own offline feature rows over the last day; the
training population's median for a key without any), and the alert's links. It stores the alert
in the `AlertStore` with one outbox row per sink; the sinks' `Deliverer` ships it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from models.campaign import CAMPAIGN_VIEWS
from qabuse_dagster import settings
from qabuse_dagster.response.alert_store import AlertStore
from qabuse_dagster.response.alerts import (
    Alert,
    ClusterHash,
    Contribution,
    FamilyScore,
    JobSummary,
    Links,
    MinuteCounts,
    alert_id,
)
from qabuse_dagster.serving.schemas import ScoreResponse

__all__ = ["AlertSnapshot", "AlertWriter", "KeyActivity", "UsualValues", "build_alert"]

logger = logging.getLogger(__name__)

_MINUTE_MS = 60_000
_DAY_MS = 24 * 3_600_000
#: Jobs kept per key, and keys and users named per shared code hash.
RECENT_JOBS = 10
CLUSTER_IDS = 10
#: Features an alert explains.
TOP_FEATURES = 5
#: How far back a key's usual values look in its offline rows.
USUAL_LOOKBACK = timedelta(hours=24)
_CAMPAIGN_FIELDS = ("group_keys", "group_users", "group_networks", "sync_share")


@dataclass
class _Job:
    job_id: str
    status: str
    submitted_ms: int
    shots: int | None
    backend: str | None


@dataclass
class KeyActivity:
    """What the worker remembers of each key for its alerts (module docstring)."""

    #: key -> job_id -> the job, oldest first, at most `RECENT_JOBS`.
    jobs: dict[str, OrderedDict[str, _Job]] = field(default_factory=dict)
    #: key -> (row instant, submissions per minute, failures per minute) of its last row.
    minutes: dict[str, tuple[int, list[int], list[int]]] = field(default_factory=dict)
    #: code hash -> key -> (user, last seen ms), over the last day.
    by_hash: dict[str, dict[str, tuple[str | None, int]]] = field(default_factory=dict)
    #: key -> code hash -> last seen ms.
    hashes: dict[str, dict[str, int]] = field(default_factory=dict)

    def note(self, record: Mapping[str, Any], at_ms: int) -> None:
        """Take in one telemetry record (a decoded contract record)."""
        key = record["api_key_id"]
        job_id = record.get("job_id")
        if job_id:
            jobs = self.jobs.setdefault(key, OrderedDict())
            job = jobs.get(job_id)
            if job is None:
                jobs[job_id] = _Job(
                    job_id, record["status"], at_ms, record.get("shots"), record.get("backend")
                )
                while len(jobs) > RECENT_JOBS:
                    jobs.popitem(last=False)
            elif at_ms >= job.submitted_ms:
                job.status = record["status"]
                job.shots = record.get("shots") if record.get("shots") is not None else job.shots
                job.backend = record.get("backend") or job.backend
        code = record.get("code_hash")
        if code:
            self.by_hash.setdefault(code, {})[key] = (record.get("user"), at_ms)
            self.hashes.setdefault(key, {})[code] = at_ms

    def note_row(self, key: str, row: Mapping[str, Any], row_ms: int) -> None:
        """Keep the per-minute sequences of the key's newest row."""
        subs, fails = row.get("submissions_last_60_min"), row.get("failures_last_60_min")
        if subs is None or fails is None:
            return
        known = self.minutes.get(key)
        if known is None or known[0] <= row_ms:
            self.minutes[key] = (row_ms, list(subs), list(fails))

    def prune(self, now_ms: int) -> None:
        """Forget code hashes not run for a day, and keys with nothing left."""
        horizon = now_ms - _DAY_MS
        for code in list(self.by_hash):
            users = self.by_hash[code]
            for key in [k for k, (_, at) in users.items() if at < horizon]:
                del users[key]
            if not users:
                del self.by_hash[code]
        for key in list(self.hashes):
            kept = {c: at for c, at in self.hashes[key].items() if at >= horizon}
            if kept:
                self.hashes[key] = kept
            else:
                del self.hashes[key]

    def forget(self, key: str) -> None:
        self.jobs.pop(key, None)
        self.minutes.pop(key, None)

    def recent_jobs(self, key: str) -> list[JobSummary]:
        """The key's last jobs, newest first."""
        jobs = reversed(self.jobs.get(key, OrderedDict()).values())
        return [
            JobSummary(
                job_id=job.job_id,
                status=job.status,
                submitted_at=_instant(job.submitted_ms),
                shots=job.shots,
                backend=job.backend,
            )
            for job in jobs
        ]

    def last_hour(self, key: str) -> list[MinuteCounts]:
        known = self.minutes.get(key)
        if known is None:
            return []
        row_ms, subs, fails = known
        start = row_ms - len(subs) * _MINUTE_MS
        return [
            MinuteCounts(
                minute=_instant(start + i * _MINUTE_MS), submissions=int(s), failures=int(f)
            )
            for i, (s, f) in enumerate(zip(subs, fails, strict=True))
        ]

    def cluster(self, key: str, now_ms: int) -> list[ClusterHash]:
        """The key's code hashes of the last day, most shared first, with who else ran them."""
        horizon = now_ms - _DAY_MS
        mine = [c for c, at in self.hashes.get(key, {}).items() if at >= horizon]
        user = None
        out = []
        for code in mine:
            runners = self.by_hash.get(code, {})
            user = user or runners.get(key, (None, 0))[0]
            others = {k: u for k, (u, at) in runners.items() if k != key and at >= horizon}
            other_users = sorted({u for u in others.values() if u is not None and u != user})
            out.append(
                ClusterHash(
                    code_hash=code,
                    other_keys=len(others),
                    other_users=len(other_users),
                    key_ids=sorted(others)[:CLUSTER_IDS],
                    user_ids=other_users[:CLUSTER_IDS],
                )
            )
        out.sort(key=lambda c: (-c.other_keys, -c.other_users, c.code_hash))
        return out[:10]


@dataclass(frozen=True)
class AlertSnapshot:
    """What the worker knew when the engine acted: everything the alert needs but the slow part."""

    api_key_id: str
    user: str | None
    action: str
    mode: str
    reason: str
    decided_at_ms: int
    requires_approval: bool
    response: ScoreResponse
    minutes: list[MinuteCounts]
    recent_jobs: list[JobSummary]
    cluster: list[ClusterHash]
    ledger_seqs: list[int]


class UsualValues:
    """Each key's usual feature values: the median of its hourly medians over the last day.

    Reads the hourly Parquet files of ``windows`` (the api-key offline rows). A file is
    read once per feature set: its per-key medians are kept (the newest ``max_files``),
    so a burst of alerts (a credential-stuffing wave alerts on hundreds of keys at once)
    reads each hour once, not once per alert.

    Args:
        windows: The api-key feature rows, one ``YYYY-MM-DDTHH.parquet`` file per hour.
        lookback: How far back a key's usual values look.
        max_files: Hourly files whose medians are kept.
    """

    def __init__(
        self, windows: Path, lookback: timedelta = USUAL_LOOKBACK, max_files: int = 96
    ) -> None:
        self.windows = windows
        self.lookback = lookback
        self.max_files = max_files
        self._medians: OrderedDict[tuple[Path, int, tuple[str, ...]], dict[str, Any]] = (
            OrderedDict()
        )

    def __call__(
        self, api_key_id: str, features: Sequence[str], before: datetime
    ) -> dict[str, float]:
        """The key's usual value of each feature before ``before``; empty without rows."""
        start = before - self.lookback
        hourly = []
        for path in sorted(self.windows.glob("*.parquet")):
            try:
                hour = datetime.strptime(path.stem, "%Y-%m-%dT%H").replace(tzinfo=UTC)
            except ValueError:
                continue
            if start <= hour < before:
                medians = self._file_medians(path, tuple(features))
                if api_key_id in medians:
                    hourly.append(medians[api_key_id])
        if not hourly:
            return {}
        stacked = np.vstack(hourly)
        return {
            name: float(np.nanmedian(stacked[:, i]))
            for i, name in enumerate(features)
            if not np.isnan(stacked[:, i]).all()
        }

    def _file_medians(self, path: Path, features: tuple[str, ...]) -> dict[str, Any]:
        import pyarrow.parquet as pq

        try:
            cache_key = (path, path.stat().st_mtime_ns, features)
        except OSError:
            return {}
        if cache_key in self._medians:
            self._medians.move_to_end(cache_key)
            return self._medians[cache_key]
        present = set(pq.read_schema(path).names)
        columns = [name for name in features if name in present]  # a later family's feature
        frame = pq.read_table(path, columns=["api_key_id", *columns]).to_pandas()
        grouped = frame.groupby("api_key_id", sort=False)[columns].median()
        grouped = grouped.reindex(columns=list(features))
        medians = {
            key: row for key, row in zip(grouped.index, grouped.to_numpy(np.float64), strict=True)
        }
        self._medians[cache_key] = medians
        while len(self._medians) > self.max_files:
            self._medians.popitem(last=False)
        return medians


def build_alert(
    snapshot: AlertSnapshot,
    loaded: Any,
    *,
    windows: Path | UsualValues | None,
    user_values: Mapping[str, Any] | None = None,
    created_at: datetime | None = None,
    urls: Mapping[str, str | None] | None = None,
) -> Alert:
    """The alert of one decision: its snapshot, explained with the champion's top family.

    Args:
        snapshot: What the worker knew when the engine acted.
        loaded: The champion (`qabuse_dagster.model_registry.LoadedChampion`).
        windows: The api-key offline rows (the key's usual values), or a `UsualValues`
            on them (kept between alerts), or None.
        user_values: The key's user's feature values, which a user-level top family reads.
        created_at: When the alert is written (default now).
        urls: Base URLs of the links (default `settings.ui_urls`).
    """
    from models.explain import attribute, reference_row
    from models.registry import get_family

    response = snapshot.response
    urls = urls if urls is not None else settings.ui_urls()
    decided = _instant(snapshot.decided_at_ms)
    top = response.top_family
    explainer = f"{top}.explain"
    contributions: list[Contribution] = []
    family = get_family(top) if top in loaded.members else None
    source = response.features if family is None or family.entity == "api_key" else user_values
    if family is not None and family.input_kind == "rows" and source is not None:
        detector = loaded.members[top].detector
        names = list(family.feature_names)
        row = np.array([[_finite(source.get(name)) for name in names]])
        explainer, values = attribute(detector, row)
        order = np.argsort(-values[0])[:TOP_FEATURES]
        usual_of = UsualValues(windows) if isinstance(windows, Path) else windows
        usual = (
            usual_of(snapshot.api_key_id, names, decided)
            if usual_of is not None and family.entity == "api_key"
            else {}
        )
        population = reference_row(detector)
        for i in order:
            name = names[int(i)]
            from_key = name in usual
            contributions.append(
                Contribution(
                    feature=name,
                    value=float(row[0, int(i)]),
                    usual=usual[name]
                    if from_key
                    else (float(population[int(i)]) if population is not None else None),
                    usual_from="key"
                    if from_key
                    else ("population" if population is not None else "none"),
                    contribution=float(values[0, int(i)]),
                )
            )
    else:
        for item in response.top_features[:TOP_FEATURES]:
            contributions.append(
                Contribution(
                    feature=item.feature,
                    value=item.value,
                    usual=None,
                    usual_from="none",
                    contribution=item.contribution,
                )
            )
    family_scores = [
        FamilyScore(
            family=name,
            score=score,
            standardised=response.family_standardised.get(name, 0.0),
            version=response.family_versions.get(name),
        )
        for name, score in sorted(
            response.family_scores.items(),
            key=lambda item: -response.family_standardised.get(item[0], 0.0),
        )
    ]
    ident = alert_id(snapshot.api_key_id, snapshot.action, snapshot.decided_at_ms)
    return Alert(
        alert_id=ident,
        created_at=created_at or datetime.now(UTC),
        decided_at=decided,
        api_key_id=snapshot.api_key_id,
        user=snapshot.user,
        action=snapshot.action,
        mode=snapshot.mode,  # type: ignore[arg-type]
        requires_approval=snapshot.requires_approval,
        reason=snapshot.reason,
        score=response.score,
        threshold=response.threshold,
        model_name=response.model_name,
        model_version=response.model_version,
        feature_service=response.feature_service,
        stale=response.stale,
        family_scores=family_scores,
        top_family=top,
        explainer=explainer,
        top_features=contributions,
        minutes=snapshot.minutes[-60:],
        recent_jobs=snapshot.recent_jobs[:RECENT_JOBS],
        code_hash_cluster=snapshot.cluster[:10],
        campaign=_campaign(response),
        links=_links(ident, loaded, snapshot.ledger_seqs, urls),
    )


def _finite(value: Any) -> float:
    """A feature value as the families read it: 0 when absent or not finite."""
    if isinstance(value, int | float) and np.isfinite(value):
        return float(value)
    return 0.0


def _campaign(response: ScoreResponse) -> dict[str, Any] | None:
    """The key's coordinated group, when the campaign family's features place it in one."""
    features = response.features
    group: dict[str, Any] = {}
    for view in CAMPAIGN_VIEWS:
        if features.get(f"group_keys_{view}", 0.0) > 0:
            group[view] = {
                name: features[f"{name}_{view}"]
                for name in _CAMPAIGN_FIELDS
                if f"{name}_{view}" in features
            }
    if not group:
        return None
    if "campaign" in response.family_scores:
        group["score"] = response.family_scores["campaign"]
        group["standardised"] = response.family_standardised.get("campaign")
    return group


def _links(ident: str, loaded: Any, seqs: Sequence[int], urls: Mapping[str, str | None]) -> Links:
    ref = loaded.ref
    run_id = getattr(ref, "dagster_run_id", None)
    dagster = urls.get("dagster")
    mlflow = urls.get("mlflow")
    triage = urls.get("triage")
    return Links(
        triage=f"{triage}/triage/alerts/{ident}" if triage else None,
        dagster_run=f"{dagster}/runs/{run_id}" if dagster and run_id else None,
        mlflow_model_version=f"{mlflow}/#/models/{ref.name}/versions/{ref.version}"
        if mlflow
        else None,
        ledger_seqs=list(seqs),
    )


def _instant(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


class AlertWriter:
    """Builds and stores alerts on its own thread, so a decision never waits for one.

    Args:
        store: Where alerts go.
        sinks: The sink names each alert is queued for (the outbox).
        champion: Gives the loaded champion, the Feast store and the online inputs (the
            worker's `Champion.get`): the user's online row is read for a user-level family.
        windows: The api-key offline rows, for the keys' usual values.
    """

    def __init__(
        self,
        store: AlertStore,
        sinks: Sequence[str],
        champion: Any,
        windows: Path | None,
    ) -> None:
        self.store = store
        self.sinks = list(sinks)
        self.champion = champion
        self.usual = UsualValues(windows) if windows is not None else None
        self.written = 0
        self.failed = 0
        self._queue: queue.Queue[AlertSnapshot | None] = queue.Queue(maxsize=10_000)
        self._thread = threading.Thread(target=self._run, name="qabuse-alerts", daemon=True)
        self._thread.start()

    def submit(self, snapshot: AlertSnapshot) -> None:
        """Queue an alert; when the queue is full it is dropped, logged and counted."""
        try:
            self._queue.put_nowait(snapshot)
        except queue.Full:
            self.failed += 1
            logger.error("alert queue full: the alert of %s is lost", snapshot.api_key_id)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued alert is stored (tests, shutdown)."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        done.wait(timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        self.flush(timeout_s)
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            snapshot = self._queue.get()
            try:
                if snapshot is None:
                    return
                self._write(snapshot)
            except Exception:
                self.failed += 1
                logger.exception(
                    "alert of %s not written", snapshot.api_key_id if snapshot else None
                )
            finally:
                self._queue.task_done()

    def _write(self, snapshot: AlertSnapshot) -> None:
        loaded, store, inputs = self.champion()
        user_values = None
        if snapshot.user is not None and inputs is not None:
            online = inputs.read(
                store, snapshot.api_key_id, snapshot.user, max_age=timedelta(days=365)
            )
            user_values = online.user_values
        alert = build_alert(snapshot, loaded, windows=self.usual, user_values=user_values)
        if self.store.add(alert, self.sinks):
            self.written += 1
            logger.info("alert %s: %s %s", alert.alert_id, alert.action, alert.api_key_id)

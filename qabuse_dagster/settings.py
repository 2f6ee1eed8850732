"""Paths, endpoints and secrets: every environment variable qabuse reads, in one place.

State lives under ``QABUSE_HOME`` (default ``./.qabuse``): raw telemetry partitions,
features, the Feast registry and online store, the MLflow store and the Dagster instance.
``QABUSE_PROFILE=production`` moves the stores onto servers given by URL instead
(:mod:`qabuse_dagster.profile`), with no fallback to the embedded ones.
Nothing here imports a heavy library, so the telemetry client and the CLI stay fast.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

HOME_ENV = "QABUSE_HOME"
HASH_KEY_ENV = "QABUSE_HASH_KEY"
FEATURE_REPO_ENV = "QABUSE_FEATURE_REPO"
MLFLOW_URI_ENV = "QABUSE_MLFLOW_TRACKING_URI"
MODEL_NAME_ENV = "QABUSE_MODEL_NAME"
MODEL_REFRESH_ENV = "QABUSE_MODEL_REFRESH_S"
ONLINE_STORE_ENV = "QABUSE_ONLINE_STORE"
REDIS_ENV = "QABUSE_REDIS"
ONLINE_MAX_AGE_ENV = "QABUSE_ONLINE_MAX_AGE_S"
TELEMETRY_START_ENV = "QABUSE_TELEMETRY_START"
MAX_CLOCK_SKEW_ENV = "QABUSE_MAX_CLOCK_SKEW_S"
LEDGER_URL_ENV = "QABUSE_LEDGER_URL"
SIGNING_KEY_ENV = "QABUSE_SIGNING_KEY"
ENFORCE_ENV = "QABUSE_ENFORCE"
TOKENS_FILE_ENV = "QABUSE_TOKENS_FILE"
DISABLED_ACTIONS_ENV = "QABUSE_DISABLED_ACTIONS"
ALERT_WEBHOOK_URL_ENV = "QABUSE_ALERT_WEBHOOK_URL"
ALERT_WEBHOOK_SECRET_ENV = "QABUSE_ALERT_WEBHOOK_SECRET"
DAGSTER_UI_URL_ENV = "QABUSE_DAGSTER_UI_URL"
MLFLOW_UI_URL_ENV = "QABUSE_MLFLOW_UI_URL"
TRIAGE_URL_ENV = "QABUSE_TRIAGE_URL"
PROFILE_ENV = "QABUSE_PROFILE"
DAGSTER_PG_URL_ENV = "QABUSE_DAGSTER_PG_URL"
MLFLOW_ARTIFACTS_ENV = "QABUSE_MLFLOW_ARTIFACTS"
DAGSTER_EXECUTOR_ENV = "QABUSE_DAGSTER_EXECUTOR"
BUS_URL_ENV = "QABUSE_BUS_URL"
BUS_SHARDS_ENV = "QABUSE_BUS_SHARDS"

#: Where state lives: ``embedded`` (the default: every store under ``QABUSE_HOME``, no
#: server to install) or ``production`` (PostgreSQL, Redis and NATS servers given by URL;
#: see :mod:`qabuse_dagster.profile`).
PROFILES = ("embedded", "production")

#: The first hour of the raw partitions, and so the earliest telemetry accepted.
DEFAULT_TELEMETRY_START = "2026-01-01T00:00:00Z"

#: The share of training key-days a detector's threshold lets alert, by default. Out of
#: sample, on the 7-day twins of seeds 1-3, the realised benign key-day rate ran up to
#: about twice the calibration budget (fresh keys, a new day's mix): half a percent keeps
#: it near 1%.
DEFAULT_ALERT_BUDGET = 0.005

DEFAULT_MODEL_NAME = "qabuse-api-key-detector"
CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"


@dataclass(frozen=True)
class Paths:
    """Where each embedded store lives under one ``QABUSE_HOME``."""

    home: Path

    @property
    def landing(self) -> Path:
        """Validated, not yet compacted telemetry (hourly staging files)."""
        return self.home / "landing" / "telemetry"

    @property
    def quarantine(self) -> Path:
        """Rejected records with their reasons."""
        return self.home / "quarantine"

    @property
    def raw_telemetry(self) -> Path:
        """Hive-style hourly partitions: ``date=YYYY-MM-DD/hour=HH/part-0.parquet``."""
        return self.home / "raw" / "telemetry"

    @property
    def labels(self) -> Path:
        """Incident labels (JSONL, the incident-labels contract) known for the telemetry."""
        return self.home / "labels" / "incidents.jsonl"

    @property
    def analyst_labels(self) -> Path:
        """Labels analysts gave on the triage page (false positives, confirmed abuse): JSONL
        in the incident-labels contract, read beside `labels` by evaluation and training."""
        return self.home / "labels" / "analyst.jsonl"

    @property
    def features(self) -> Path:
        return self.home / "features"

    @property
    def api_key_windows(self) -> Path:
        """Per-api-key rows, one Parquet file per hourly partition: a Feast offline source."""
        return self.features / "api_key_windows"

    @property
    def user_windows(self) -> Path:
        """The per-user rows, laid out as ``api_key_windows``: the user views' source."""
        return self.features / "user_windows"

    def entity_windows(self, entity: str) -> Path:
        """The feature rows of a Feast entity: ``api_key`` or ``user``."""
        folders = {"api_key": self.api_key_windows, "user": self.user_windows}
        if entity not in folders:
            raise ValueError(f"unknown entity {entity!r}: expected one of {sorted(folders)}")
        return folders[entity]

    @property
    def feast(self) -> Path:
        return self.home / "feast"

    @property
    def mlflow(self) -> Path:
        return self.home / "mlflow"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def reports(self) -> Path:
        return self.home / "reports"

    @property
    def run(self) -> Path:
        """Pid files and logs of the servers ``qabuse up`` starts."""
        return self.home / "run"

    @property
    def ledger(self) -> Path:
        """The embedded decision ledger (SQLite, hash-chained)."""
        return self.home / "ledger" / "decisions.db"

    @property
    def secrets(self) -> Path:
        """Secrets generated for an embedded deployment (mode 0600), e.g. the signing key."""
        return self.home / "secrets"

    @property
    def tokens(self) -> Path:
        """Bearer tokens and their principals and roles (JSON), unless QABUSE_TOKENS_FILE."""
        return self.secrets / "tokens.json"


def qabuse_home() -> Path:
    """The absolute state directory, from ``QABUSE_HOME`` or ``./.qabuse``."""
    return Path(os.environ.get(HOME_ENV, ".qabuse")).expanduser().resolve()


def paths() -> Paths:
    return Paths(qabuse_home())


def export_home(home: Path | None = None) -> Path:
    """Pin ``QABUSE_HOME`` (absolute) in this process's environment.

    Feast's ``feature_store.yaml`` and the servers qabuse starts read it from the
    environment, so it must be set, and absolute, before either is touched.
    """
    resolved = (home or qabuse_home()).expanduser().resolve()
    os.environ[HOME_ENV] = str(resolved)
    return resolved


def feature_repo_dir() -> Path:
    """The Feast repository (``feature_repo/``), overridable for a deployed copy."""
    return Path(os.environ.get(FEATURE_REPO_ENV, PROJECT_ROOT / "feature_repo")).resolve()


def profile() -> str:
    """The deployment profile: ``embedded`` (default) or ``production``, from ``QABUSE_PROFILE``.

    Each server setting below (the MLflow store, the ledger, the Redis online store, the
    Dagster instance's PostgreSQL) is used whenever it is given; ``embedded`` falls back to
    a store under ``QABUSE_HOME`` when it is not, ``production`` refuses to.
    """
    chosen = os.environ.get(PROFILE_ENV, "").strip().lower() or PROFILES[0]
    if chosen not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={chosen!r}: expected one of {PROFILES}")
    return chosen


def _server_setting(name: str) -> str | None:
    """The environment's ``name``; None when unset, which the production profile refuses."""
    given = os.environ.get(name, "").strip()
    if given:
        return given
    if profile() == "production":
        raise ValueError(
            f"{PROFILE_ENV}=production needs {name}: a production deployment never falls back "
            "to an embedded store under QABUSE_HOME"
        )
    return None


def mlflow_tracking_uri() -> str:
    """MLflow tracking + registry store: SQLite under ``QABUSE_HOME`` unless overridden."""
    return _server_setting(MLFLOW_URI_ENV) or f"sqlite:///{paths().mlflow / 'mlflow.db'}"


def mlflow_artifact_root() -> str:
    """Where new experiments keep their artifacts, as a URI.

    ``QABUSE_MLFLOW_ARTIFACTS`` (a URI such as ``s3://bucket/mlflow``, or a local folder),
    else ``$QABUSE_HOME/mlflow/artifacts``, in either profile: the tracking store holds
    where each run's artifacts are, not the artifacts.
    """
    given = os.environ.get(MLFLOW_ARTIFACTS_ENV, "").strip()
    if not given:
        return (paths().mlflow / "artifacts").as_uri()
    if "://" in given:
        return given
    return Path(given).expanduser().resolve().as_uri()


def dagster_postgres_url() -> str | None:
    """The Dagster instance's PostgreSQL (runs, events, schedules), ``QABUSE_DAGSTER_PG_URL``.

    None in the embedded profile when unset: the instance is SQLite under ``QABUSE_HOME``.
    """
    return _server_setting(DAGSTER_PG_URL_ENV)


#: The executor of every job's launched runs: steps in parallel processes on one machine.
DEFAULT_DAGSTER_EXECUTOR = "dagster:multiprocess_executor"


def dagster_executor() -> str:
    """The executor launched runs use, as ``module:attribute`` (``QABUSE_DAGSTER_EXECUTOR``).

    Default ``dagster:multiprocess_executor``; ``dagster_k8s:k8s_job_executor`` or
    ``dagster_celery:celery_executor`` spread steps over a cluster instead, with no code
    change. In-process runs (``qabuse demo``, ``qabuse materialize``) ignore it.
    """
    return os.environ.get(DAGSTER_EXECUTOR_ENV, "").strip() or DEFAULT_DAGSTER_EXECUTOR


def model_name() -> str:
    return os.environ.get(MODEL_NAME_ENV, DEFAULT_MODEL_NAME)


def model_refresh_seconds() -> float:
    """How often the scoring endpoint asks the registry whether @champion moved."""
    return float(os.environ.get(MODEL_REFRESH_ENV, "30"))


#: The Feast online stores qabuse ships a configuration for; the first is the default.
ONLINE_STORES = ("sqlite", "redis")


def online_store() -> str:
    """Which Feast online store to use: ``sqlite`` (embedded, default) or ``redis``.

    The production profile's is Redis, and it refuses ``sqlite``.
    """
    production = profile() == "production"
    default = "redis" if production else ONLINE_STORES[0]
    chosen = os.environ.get(ONLINE_STORE_ENV, default).strip().lower()
    if chosen not in ONLINE_STORES:
        raise ValueError(f"{ONLINE_STORE_ENV}={chosen!r}: expected one of {ONLINE_STORES}")
    if production and chosen != "redis":
        raise ValueError(
            f"{ONLINE_STORE_ENV}={chosen!r}: {PROFILE_ENV}=production serves features from "
            "Redis (leave it unset, or set it to redis)"
        )
    return chosen


def redis_connection_string() -> str:
    """Feast's Redis ``connection_string``: ``host:port[,db=0,password=...,ssl=true]``.

    Default ``localhost:6379``, except in production, which needs ``QABUSE_REDIS``.
    """
    return _server_setting(REDIS_ENV) or "localhost:6379"


def online_max_age_seconds() -> float:
    """Oldest online feature vector still served as fresh; older ones are flagged stale."""
    return float(os.environ.get(ONLINE_MAX_AGE_ENV, "300"))


def telemetry_start() -> datetime:
    """The earliest instant telemetry may carry: the first hour of the raw partitions.

    Records before it are quarantined at the door (``qabuse ingest``, the collector), since
    no partition could hold them. An RFC 3339 instant; it is floored to its UTC hour.
    """
    text = os.environ.get(TELEMETRY_START_ENV, DEFAULT_TELEMETRY_START).strip()
    try:
        instant = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{TELEMETRY_START_ENV}={text!r}: expected an RFC 3339 instant such as "
            f"{DEFAULT_TELEMETRY_START}"
        ) from None
    if instant.tzinfo is None:
        raise ValueError(f"{TELEMETRY_START_ENV}={text!r}: give a UTC offset, e.g. a final Z")
    return instant.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def max_clock_skew_seconds() -> float:
    """How far ahead of the receiver's clock a record's timestamp may lie (default 1 hour)."""
    text = os.environ.get(MAX_CLOCK_SKEW_ENV, "3600")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 86_400:
        raise ValueError(f"{MAX_CLOCK_SKEW_ENV}={text!r}: expected seconds from 0 to 86400")
    return seconds


def ledger_url() -> str:
    """Where the decision ledger lives: ``sqlite:///PATH`` (default) or ``postgresql://...``.

    Production needs ``QABUSE_LEDGER_URL``: there is no embedded default to fall back on.
    """
    return _server_setting(LEDGER_URL_ENV) or f"sqlite:///{paths().ledger}"


#: Shards of the ingest bus when ``QABUSE_BUS_SHARDS`` is unset: room for up to 16 workers.
DEFAULT_BUS_SHARDS = 16


def bus_url() -> str | None:
    """The ingest bus's NATS server (``nats://host:4222``), ``QABUSE_BUS_URL``; None: no bus.

    With no bus, collectors keep what they accept in their spool and one stream worker
    tails it (`qabuse_dagster.ingest.bus`).
    """
    return os.environ.get(BUS_URL_ENV, "").strip() or None


def bus_shards() -> int:
    """The ingest bus's shard count, ``QABUSE_BUS_SHARDS`` (default 16).

    Fixed for a deployment: collectors and stream workers must agree on it, and it bounds
    the number of stream workers.
    """
    shards = int(os.environ.get(BUS_SHARDS_ENV, "").strip() or DEFAULT_BUS_SHARDS)
    if shards < 1:
        raise ValueError(f"{BUS_SHARDS_ENV}={shards}: expected at least 1")
    return shards


def signing_key() -> bytes:
    """The deployment's signing secret: ledger chain MACs and challenge tokens derive from it.

    ``QABUSE_SIGNING_KEY`` when set (at least 32 characters); otherwise a random key
    generated once under ``$QABUSE_HOME/secrets`` (mode 0600), so an embedded deployment
    works with no setup and keeps its key across restarts.
    """
    text = os.environ.get(SIGNING_KEY_ENV)
    if text is not None:
        if len(text) < 32:
            raise ValueError(f"{SIGNING_KEY_ENV} is {len(text)} characters: give at least 32")
        return text.encode()
    path = paths().secrets / "signing.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Written whole under a private name, then linked into place: a process starting
        # at the same time sees no key file or the whole key, never an empty file, and
        # the link fails if another process linked its key first, which all then keep.
        draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))
                out.flush()
                os.fsync(out.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(draft, path)
        finally:
            draft.unlink(missing_ok=True)
    key = path.read_text().strip()
    if len(key) < 32:
        raise ValueError(f"{path} holds {len(key)} characters: delete it to get a new key")
    return key.encode()


#: Rungs of the mitigation ladder that ``QABUSE_ENFORCE`` can put in shadow mode.
ENFORCEABLE_RUNGS = ("throttle", "cap", "challenge", "rotate", "revoke")
ENFORCE_MODES = ("shadow", "enforce")


def enforce_modes() -> dict[str, str]:
    """``shadow`` or ``enforce`` for each rung, from ``QABUSE_ENFORCE`` (default enforce).

    ``QABUSE_ENFORCE=shadow`` sets every rung; ``enforce,revoke=shadow`` sets a default
    and then one rung. In shadow mode a would-be action is recorded and the gateway is
    told to allow.
    """
    text = os.environ.get(ENFORCE_ENV, "enforce")
    modes = dict.fromkeys(ENFORCEABLE_RUNGS, "enforce")
    for raw in text.split(","):
        part = raw.strip().lower()
        if not part:
            continue
        rung, _, mode = part.rpartition("=")
        if mode not in ENFORCE_MODES:
            raise ValueError(
                f"{ENFORCE_ENV}={text!r}: {part!r} is not one of {ENFORCE_MODES} (or RUNG=MODE)"
            )
        if not rung:
            modes = dict.fromkeys(ENFORCEABLE_RUNGS, mode)
        elif rung in modes:
            modes[rung] = mode
        else:
            raise ValueError(
                f"{ENFORCE_ENV}={text!r}: unknown rung {rung!r}; expected one of "
                f"{ENFORCEABLE_RUNGS}"
            )
    return modes


def tokens_file() -> Path:
    """The bearer-token file (principal, role and token hash per entry)."""
    override = os.environ.get(TOKENS_FILE_ENV)
    return Path(override).expanduser().resolve() if override else paths().tokens


def disabled_actions() -> frozenset[str]:
    """Rungs the kill switch turns off at the gateway: ``QABUSE_DISABLED_ACTIONS=cap,revoke``.

    A disabled rung is still decided and recorded; the gateway allows instead of
    enforcing it, and counts it.
    """
    text = os.environ.get(DISABLED_ACTIONS_ENV, "")
    chosen = frozenset(part.strip().lower() for part in text.split(",") if part.strip())
    unknown = sorted(chosen - set(ENFORCEABLE_RUNGS))
    if unknown:
        raise ValueError(
            f"{DISABLED_ACTIONS_ENV}={text!r}: unknown rung(s) {unknown}; expected some of "
            f"{ENFORCEABLE_RUNGS}"
        )
    return chosen


def ui_urls() -> dict[str, str | None]:
    """Base URLs an alert links to: the Dagster UI, the MLflow UI and the triage page.

    ``QABUSE_DAGSTER_UI_URL`` (default ``http://127.0.0.1:3000``, where ``qabuse up``
    serves it), ``QABUSE_MLFLOW_UI_URL`` (none by default: the embedded store has no UI
    running) and ``QABUSE_TRIAGE_URL`` (the decision service, none by default).
    """
    return {
        "dagster": os.environ.get(DAGSTER_UI_URL_ENV, "http://127.0.0.1:3000").rstrip("/"),
        "mlflow": (os.environ.get(MLFLOW_UI_URL_ENV) or "").rstrip("/") or None,
        "triage": (os.environ.get(TRIAGE_URL_ENV) or "").rstrip("/") or None,
    }

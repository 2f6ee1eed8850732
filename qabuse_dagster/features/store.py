"""Feast access for every qabuse path: apply, materialise, historical and online reads.

Feast imports slowly, so it is imported inside the functions here, never at module
level: the CLI, the telemetry client and the Dagster code location load without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qabuse_dagster import settings
from qabuse_dagster.features.definitions import ENTITY_COLUMNS

if TYPE_CHECKING:
    import pandas as pd
    from feast import FeatureService, FeatureStore

logger = logging.getLogger(__name__)

#: What the api-key detector reads: exactly `DETECTOR_FEATURES`.
FEATURE_SERVICE = "api_key_detector_v1"
#: Every window feature of a user.
USER_FEATURE_SERVICE = "user_features_v1"
#: An api key's last 60 minutes of per-minute channels (`definitions.SEQUENCE_COLUMNS`).
SEQUENCE_FEATURE_SERVICE = "api_key_sequence_v1"
#: The tag ``kind`` of the sequence views: `entity_views` leaves them out by default.
SEQUENCE_KIND = "sequence"
_API_KEY = ENTITY_COLUMNS["api_key"]
_REPO_LOCK = threading.Lock()
# Entity keys per online read: SQLite's bound on host parameters is far above it.
_ONLINE_READ_CHUNK = 500


@dataclass(frozen=True)
class ApplyReport:
    """What ``apply_repo`` registered, and the plan it printed."""

    entities: list[str]
    feature_views: list[str]
    feature_services: list[str]
    plan: str


def feature_store_yaml(repo_dir: Path, online_store: str | None = None) -> Path:
    """The repository's Feast configuration for ``online_store`` (default: the chosen one).

    ``feature_store.yaml`` keeps the embedded SQLite online store; ``feature_store.redis.yaml``
    is the same repository with its online store on Redis.
    """
    chosen = online_store or settings.online_store()
    if chosen not in settings.ONLINE_STORES:
        raise ValueError(f"online store {chosen!r}: expected one of {settings.ONLINE_STORES}")
    name = "feature_store.yaml" if chosen == "sqlite" else f"feature_store.{chosen}.yaml"
    return repo_dir / name


def open_store(repo_dir: Path | None = None, online_store: str | None = None) -> FeatureStore:
    """The Feast store of ``feature_repo/`` with its state under ``QABUSE_HOME``.

    Args:
        repo_dir: The Feast repository; default ``settings.feature_repo_dir()``.
        online_store: ``sqlite`` or ``redis``; default ``QABUSE_ONLINE_STORE`` (``sqlite``).
            Redis is reached at ``QABUSE_REDIS`` (default ``localhost:6379``).
    """
    from feast import FeatureStore

    settings.export_home()
    settings.paths().feast.mkdir(parents=True, exist_ok=True)
    repo = (repo_dir or settings.feature_repo_dir()).resolve()
    chosen = online_store or settings.online_store()
    yaml_file = feature_store_yaml(repo, chosen)
    if chosen == "redis":
        # Feast expands ${QABUSE_REDIS} in the yaml, and leaves an unset variable as text.
        os.environ[settings.REDIS_ENV] = settings.redis_connection_string()
    return FeatureStore(repo_path=str(repo), fs_yaml_file=yaml_file)


@contextlib.contextmanager
def _inside_repo(repo_dir: Path) -> Iterator[None]:
    # Feast's repo parser imports the definition modules by path relative to the working
    # directory, and they import each other as top-level modules (the `feast apply` layout).
    with _REPO_LOCK:
        # The modules read QABUSE_HOME when imported (data_sources.py builds its paths then),
        # so a cached import from an earlier apply would register another home's paths.
        for name, module in list(sys.modules.items()):
            source = getattr(module, "__file__", None)
            if source and Path(source).resolve().parent == repo_dir:
                del sys.modules[name]
        old_cwd = Path.cwd()
        sys.path.insert(0, str(repo_dir))
        os.chdir(repo_dir)
        try:
            yield
        finally:
            os.chdir(old_cwd)
            sys.path.remove(str(repo_dir))


def apply_repo(store: FeatureStore) -> ApplyReport:
    """Register the definitions of ``feature_repo/`` exactly as ``feast apply`` finds them."""
    from feast.repo_operations import parse_repo

    repo_dir = Path(store.repo_path).resolve()
    with _inside_repo(repo_dir):
        repo = parse_repo(repo_dir)
    registry_diff, _infra_diff, _infra = store.plan(repo)
    store.apply(
        [*repo.entities, *repo.data_sources, *repo.feature_views, *repo.feature_services],
        partial=False,
    )
    return ApplyReport(
        entities=sorted(e.name for e in repo.entities),
        feature_views=sorted(v.name for v in repo.feature_views),
        feature_services=sorted(s.name for s in repo.feature_services),
        plan=registry_diff.to_string(),
    )


def feature_service(store: FeatureStore, name: str = FEATURE_SERVICE) -> FeatureService:
    return store.get_feature_service(name)


def sequence_folder(paths: settings.Paths | None = None) -> Path:
    """The offline folder of the api-key sequence rows (the ``api_key_sequence`` view's).

    Beside the window tables; one Parquet file per hour holding each key's latest row of
    that hour (`windows.sequence_table`), since serving reads only the latest.
    """
    return (paths or settings.paths()).features / "api_key_sequences"


def campaign_folder(paths: settings.Paths | None = None) -> Path:
    """The offline folder of the api-key campaign rows (the ``api_key_campaign`` view's)."""
    return (paths or settings.paths()).features / "api_key_campaign"


def entity_views(store: FeatureStore, entity: str, *, sequences: bool = False) -> list[str]:
    """The names of the feature views of one Feast entity (``api_key``, ``user``), sorted.

    Args:
        store: An applied store.
        entity: The Feast entity name.
        sequences: Include the per-minute sequence views (tag ``kind=sequence``), whose
            offline rows are written apart from the window tables; default only windows.
    """
    return sorted(
        view.name
        for view in store.list_feature_views()
        if entity in view.entities
        and (view.tags.get("kind") is None or (sequences and view.tags["kind"] == SEQUENCE_KIND))
    )


@dataclass(frozen=True)
class MaterializeReport:
    """What one `materialize` call wrote, per feature view."""

    #: View -> entities whose latest row in the range was written online.
    written: dict[str, int]
    #: View -> entities left alone: the online store already held a row as new or newer
    #: (a pushed streaming row, or an earlier materialisation of the same row).
    kept_online: dict[str, int]


def materialize(
    store: FeatureStore, start: datetime, end: datetime, views: Sequence[str] | None = None
) -> MaterializeReport:
    """Load the latest row per entity in ``[start, end]`` into the online store, never over a
    newer one.

    The online stores keep the last value written per entity, whatever its event time
    (SQLite does; Redis skips older rows itself), so a plain ``feast materialize`` of an
    older range would write hours-old batch rows over the rows the stream worker pushed a
    minute ago. Here, per view, the latest offline row of each entity is read as Feast's
    materialisation reads it (the offline store's ``pull_latest_from_table_or_query``),
    the online store's event time of each of those entities is read with its own
    ``online_read``, and only rows strictly newer than what is online are written.

    The read and the write are not one transaction: a row pushed in the milliseconds
    between them can still be overwritten by an older one, until the next push.

    Args:
        store: An applied store.
        start: First event time loaded (inclusive).
        end: Last event time loaded (inclusive, as Feast's offline stores read it).
        views: The feature views to load (`entity_views`); default every view of every
            entity. Each view's offline folder must hold a Parquet file: Feast's DuckDB
            store fails on an empty one.

    Returns:
        Per view, how many entities' rows were written, and how many were left alone.
    """
    from feast.infra.offline_stores.offline_utils import get_offline_store_from_config
    from feast.infra.online_stores.helpers import get_online_store_from_config

    offline = get_offline_store_from_config(store.config.offline_store)
    online = get_online_store_from_config(store.config.online_store)
    chosen = (
        [store.get_feature_view(name) for name in views]
        if views is not None
        else [view for view in store.list_feature_views() if view.online]
    )
    written: dict[str, int] = {}
    kept: dict[str, int] = {}
    for view in chosen:
        join_keys = [column.name for column in view.entity_columns]
        if len(join_keys) != 1:
            raise ValueError(f"{view.name}: expected one join key, got {join_keys}")
        source = view.batch_source
        if source is None:
            raise ValueError(f"{view.name} has no batch source to materialise from")
        latest = offline.pull_latest_from_table_or_query(
            config=store.config,
            data_source=source,
            join_key_columns=join_keys,
            feature_name_columns=[feature.name for feature in view.features],
            timestamp_field=source.timestamp_field,
            created_timestamp_column=source.created_timestamp_column or None,
            start_date=start,
            end_date=end,
        ).to_df()
        newer = _newer_than_online(store, online, view, latest, join_keys[0], source)
        written[view.name], kept[view.name] = len(newer), len(latest) - len(newer)
        if len(newer):
            store.write_to_online_store(view.name, newer)
        store.registry.apply_materialization(view, store.project, start, end)
        logger.info(
            "%s: %d rows written online, %d left (the online row is as new or newer)",
            view.name,
            written[view.name],
            kept[view.name],
        )
    return MaterializeReport(written, kept)


def online_event_times(
    store: FeatureStore, online: Any, view: Any, join_key: str, keys: Sequence[str]
) -> list[datetime | None]:
    """The event time (UTC) of each key's row in one feature view of the online store.

    Args:
        store: An open store.
        online: The store's online store (``get_online_store_from_config``).
        view: The feature view.
        join_key: The view's join key.
        keys: The entity keys (strings), in order.

    Returns:
        Per key, the event time of its online row, or None when it has none.
    """
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    feature = [view.features[0].name]
    times: list[datetime | None] = []
    for first in range(0, len(keys), _ONLINE_READ_CHUNK):
        chunk = keys[first : first + _ONLINE_READ_CHUNK]
        entities = [
            EntityKey(join_keys=[join_key], entity_values=[Value(string_val=k)]) for k in chunk
        ]
        for stamp, _ in online.online_read(
            config=store.config, table=view, entity_keys=entities, requested_features=feature
        ):
            if stamp is None:
                times.append(None)
            else:  # SQLite gives naive UTC
                times.append(stamp.astimezone(UTC) if stamp.tzinfo else stamp.replace(tzinfo=UTC))
    return times


def _newer_than_online(
    store: FeatureStore, online: Any, view: Any, latest: pd.DataFrame, join_key: str, source: Any
) -> pd.DataFrame:
    """The rows of ``latest`` (one per entity) newer than the entity's online row."""
    import pandas as pd

    if latest.empty:
        return latest
    times = online_event_times(store, online, view, join_key, latest[join_key].astype(str).tolist())
    offline_times = pd.to_datetime(latest[source.timestamp_field], utc=True)
    online_times = pd.to_datetime(pd.Series(times, index=latest.index, dtype=object), utc=True)
    keep = online_times.isna() | (offline_times > online_times)
    return latest[keep.to_numpy()]


def historical_features(
    store: FeatureStore, entity_df: pd.DataFrame, service: str = FEATURE_SERVICE
) -> pd.DataFrame:
    """Point-in-time-correct feature rows for ``entity_df``.

    ``entity_df`` holds the service's entity column (``api_key_id`` for the detector's
    service) and ``event_timestamp``; each row gets the features as they were then.
    """
    job = store.get_historical_features(
        entity_df=entity_df, features=feature_service(store, service)
    )
    return job.to_df()


def online_features(
    store: FeatureStore,
    keys: Sequence[str],
    service: str | FeatureService = FEATURE_SERVICE,
    *,
    entity_column: str = _API_KEY,
) -> list[dict[str, Any]]:
    """The online feature vector of each key; a key unknown to the store has only ``None``.

    Pass the ``FeatureService`` object itself on hot paths: resolving it by name reads
    the registry, which costs more than the online lookup.

    Args:
        store: An open store (``open_store``).
        keys: The entity keys to read, in order.
        service: The feature service, by name or as the object.
        entity_column: The service's join key: ``api_key_id`` (default) or ``user``
            (with ``USER_FEATURE_SERVICE``).
    """
    resolved = feature_service(store, service) if isinstance(service, str) else service
    response = store.get_online_features(
        features=resolved,
        entity_rows=[{entity_column: k} for k in keys],
    ).to_dict()
    return [{name: values[i] for name, values in response.items()} for i in range(len(keys))]


@dataclass(frozen=True)
class OnlineVector:
    """One entity's online feature vector, how old it is, and whether that is too old."""

    #: The entity key read (an api key hash, or a user hash).
    key: str
    values: dict[str, Any]
    #: Event time of the oldest feature present; None when the store has none for the key.
    event_timestamp: datetime | None
    #: Seconds between ``event_timestamp`` and the read; None when there is no feature.
    age_s: float | None
    #: True when older than the bound, or when there is nothing to date: never fresh by default.
    stale: bool


def online_vectors(
    store: FeatureStore,
    keys: Sequence[str],
    service: str | FeatureService = FEATURE_SERVICE,
    *,
    entity_column: str = _API_KEY,
    max_age: timedelta | None = None,
    now: datetime | None = None,
) -> list[OnlineVector]:
    """The online feature vector of each key with its event time and a staleness flag.

    Feast applies no TTL to online reads: a key that stopped submitting keeps its last
    vector in the online store for ever. A vector is as old as its oldest feature (the
    feature views are written separately); one older than ``max_age`` is ``stale``.

    Args:
        store: An open store (``open_store``).
        keys: The entity keys to read, in order.
        service: The feature service, by name or as the object (faster on hot paths).
        entity_column: The service's join key: ``api_key_id`` (default) or ``user``.
        max_age: Staleness bound; default ``QABUSE_ONLINE_MAX_AGE_S`` (300 seconds).
        now: The instant ages are measured from; default the current UTC time.
    """
    from feast.online_response import TIMESTAMP_POSTFIX

    resolved = feature_service(store, service) if isinstance(service, str) else service
    bound = max_age if max_age is not None else timedelta(seconds=settings.online_max_age_seconds())
    read_at = now or datetime.now(UTC)
    names = [f.name for p in resolved.feature_view_projections for f in p.features]
    response = store.get_online_features(
        features=resolved,
        entity_rows=[{entity_column: k} for k in keys],
    ).to_dict(include_event_timestamps=True)
    vectors = []
    for i, key in enumerate(keys):
        values = {name: response[name][i] for name in names}
        # Feast reports whole seconds, and 0 for a feature it has no row for. Truncation
        # can only make a vector look older, never fresher.
        stamps = {name: response[f"{name}{TIMESTAMP_POSTFIX}"][i] for name in names}
        seconds = [s for name, s in stamps.items() if values[name] is not None and s > 0]
        if not seconds:
            vectors.append(OnlineVector(key, values, None, None, stale=True))
            continue
        oldest = datetime.fromtimestamp(min(seconds), UTC)
        age_s = (read_at - oldest).total_seconds()
        stale = age_s > bound.total_seconds()
        vectors.append(OnlineVector(key, values, oldest, age_s, stale=stale))
    return vectors

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
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qabuse_dagster import settings

if TYPE_CHECKING:
    import pandas as pd
    from feast import FeatureService, FeatureStore

logger = logging.getLogger(__name__)

FEATURE_SERVICE = "api_key_detector_v1"
_REPO_LOCK = threading.Lock()


@dataclass(frozen=True)
class ApplyReport:
    """What ``apply_repo`` registered, and the plan it printed."""

    entities: list[str]
    feature_views: list[str]
    feature_services: list[str]
    plan: str


def open_store(repo_dir: Path | None = None) -> FeatureStore:
    """The Feast store of ``feature_repo/`` with its state under ``QABUSE_HOME``."""
    from feast import FeatureStore

    settings.export_home()
    settings.paths().feast.mkdir(parents=True, exist_ok=True)
    return FeatureStore(repo_path=str(repo_dir or settings.feature_repo_dir()))


@contextlib.contextmanager
def _inside_repo(repo_dir: Path) -> Iterator[None]:
    # Feast's repo parser imports the definition modules by path relative to the working
    # directory, and they import each other as top-level modules (the `feast apply` layout).
    with _REPO_LOCK:
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


def materialize(store: FeatureStore, start: datetime, end: datetime) -> None:
    """Load the latest row per key in ``[start, end)`` into the online store."""
    store.materialize(start_date=start, end_date=end)


def historical_features(
    store: FeatureStore, entity_df: pd.DataFrame, service: str = FEATURE_SERVICE
) -> pd.DataFrame:
    """Point-in-time-correct feature rows for ``entity_df`` (api_key_id, event_timestamp)."""
    job = store.get_historical_features(
        entity_df=entity_df, features=feature_service(store, service)
    )
    return job.to_df()


def online_features(
    store: FeatureStore,
    api_key_ids: Sequence[str],
    service: str | FeatureService = FEATURE_SERVICE,
) -> list[dict[str, Any]]:
    """The online feature vector of each key; a key unknown to the store has only ``None``.

    Pass the ``FeatureService`` object itself on hot paths: resolving it by name reads
    the registry, which costs more than the online lookup.
    """
    resolved = feature_service(store, service) if isinstance(service, str) else service
    response = store.get_online_features(
        features=resolved,
        entity_rows=[{"api_key_id": k} for k in api_key_ids],
    ).to_dict()
    return [{name: values[i] for name, values in response.items()} for i in range(len(api_key_ids))]

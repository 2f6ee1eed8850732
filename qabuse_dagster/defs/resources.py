"""Dagster resources: the embedded stores qabuse's assets read and write."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dagster import ConfigurableResource

from qabuse_dagster import settings

if TYPE_CHECKING:
    from feast import FeatureStore

    from qabuse_dagster.telemetry.labels import IncidentLabel


class QabuseStorage(ConfigurableResource):
    """State directory (``QABUSE_HOME``): raw partitions, landing, labels, features."""

    home: str

    def paths(self) -> settings.Paths:
        return settings.Paths(Path(self.home))

    def labels(self) -> list[IncidentLabel]:
        """Every stored label: the incidents ingested and what analysts labelled."""
        from qabuse_dagster.telemetry.labels import read_labels

        paths = self.paths()
        return [
            label
            for path in (paths.labels, paths.analyst_labels)
            if path.exists()
            for label in read_labels(path)
        ]


class FeastResource(ConfigurableResource):
    """The Feast repository (``feature_repo/``) with its registry and stores under ``home``."""

    repo_path: str
    home: str

    def store(self) -> FeatureStore:
        from qabuse_dagster.features.store import open_store

        settings.export_home(Path(self.home))
        return open_store(Path(self.repo_path))


class MlflowResource(ConfigurableResource):
    """MLflow tracking + registry store, and the registered model qabuse trains."""

    tracking_uri: str
    model_name: str = settings.DEFAULT_MODEL_NAME
    ui_url: str = "http://127.0.0.1:5000"

"""One production deployment's settings, as the production profile's tests set them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qabuse_dagster import settings


@dataclass(frozen=True)
class ProductionDeployment:
    """The settings of one production deployment on the session's servers."""

    home: Path
    dagster_postgres_url: str
    mlflow_tracking_uri: str
    ledger_url: str
    redis: str

    def environment(self) -> dict[str, str]:
        return {
            settings.HOME_ENV: str(self.home),
            settings.PROFILE_ENV: "production",
            settings.DAGSTER_PG_URL_ENV: self.dagster_postgres_url,
            settings.MLFLOW_URI_ENV: self.mlflow_tracking_uri,
            settings.LEDGER_URL_ENV: self.ledger_url,
            settings.REDIS_ENV: self.redis,
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "FEAST_USAGE": "False",
            "BENTOML_DO_NOT_TRACK": "true",
            "BENTOML_HOME": str(self.home / "bentoml"),
        }

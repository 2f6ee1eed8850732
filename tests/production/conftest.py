"""Real servers for the production profile's tests: one PostgreSQL and one Redis per session.

Each test that asks for ``production`` gets a home of its own and the environment of a
production deployment on the session's servers: one database each for Dagster, MLflow
and the ledger, made once (``CREATE DATABASE``) and shared by the session's tests. Skipped
where PostgreSQL or redis-server is not installed, except under CI (``CI`` set), which
installs both (``.ci/run``) and fails the test without them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.local_redis import local_redis, redis_server_binary
from support.postgres_server import create_database, local_postgres, postgres_bin_dir
from support.production import ProductionDeployment
from support.required import require_installed

from qabuse_dagster import settings


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of the session's PostgreSQL server, as its superuser."""
    require_installed(
        postgres_bin_dir() is not None, "PostgreSQL", "postgresql", "the production profile"
    )
    with local_postgres() as url:
        yield url


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """Feast's connection string of the session's redis-server."""
    require_installed(
        redis_server_binary() is not None, "redis-server", "redis-server", "the production profile"
    )
    with local_redis() as connection:
        yield connection


@pytest.fixture(scope="session")
def production_databases(postgres_server: str) -> dict[str, str]:
    """Dagster's, MLflow's and the ledger's databases, made once per session.

    Shared by the tests, which tell their own rows apart (run ids, model versions): every
    database made and migrated is some hundred files that the session's end deletes,
    slowly on a busy disk.
    """
    suffix = uuid.uuid4().hex[:12]
    return {
        name: create_database(postgres_server, f"{name}_{suffix}")
        for name in ("dagster", "mlflow", "ledger")
    }


@pytest.fixture
def production(
    production_databases: dict[str, str],
    redis_server: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> ProductionDeployment:
    """A production deployment with a home of its own, its environment set in this process
    (undone after)."""
    deployment = ProductionDeployment(
        home=tmp_path / "home",
        dagster_postgres_url=production_databases["dagster"],
        mlflow_tracking_uri=production_databases["mlflow"],
        ledger_url=production_databases["ledger"],
        redis=redis_server,
    )
    for name, value in deployment.environment().items():
        monkeypatch.setenv(name, value)
    for name in ("DAGSTER_HOME", settings.ONLINE_STORE_ENV, settings.MLFLOW_ARTIFACTS_ENV):
        monkeypatch.delenv(name, raising=False)
    return deployment

"""The production profile: settings checked up front, and each store on a real server.

The misconfiguration tests need no server. The rest run against the session's PostgreSQL
and Redis (``conftest.py``): the Dagster instance (an in-process run and a launched run
whose steps run in processes of their own), the MLflow registry with its aliases, and the
ledger as the profile opens it. What is tested in depth elsewhere is only joined here:
the ledger's chain on PostgreSQL (``tests/response/test_ledger.py``) and the Redis online
store (``tests/features/test_redis_store.py``).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import yaml
from support.production import ProductionDeployment
from support.records import record_dict

from qabuse_dagster import settings
from qabuse_dagster.profile import (
    ProductionServers,
    ProfileError,
    check_profile,
    production_servers,
    shown,
    unreachable,
)

#: One hour of the hourly partitions, long closed, that the Dagster tests materialise.
HOUR = datetime(2026, 6, 1, 10, tzinfo=UTC)

#: The multiprocess executor's run config for the launched run: its steps fork from a
#: server that imported the definitions once (spawning, each would import them again).
LAUNCHED_EXECUTION = {"max_concurrent": 2, "start_method": {"forkserver": {}}}

PRODUCTION_SETTINGS = (
    settings.DAGSTER_PG_URL_ENV,
    settings.MLFLOW_URI_ENV,
    settings.LEDGER_URL_ENV,
    settings.REDIS_ENV,
)


def query(url: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of one statement on the database at ``url``, read around qabuse."""
    scheme, _, rest = url.partition("://")
    with psycopg.connect(f"{scheme.split('+')[0]}://{rest}") as conn:
        return conn.execute(statement, params).fetchall()


@pytest.fixture
def bare_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No profile and no server setting: what a fresh shell has."""
    monkeypatch.setenv(settings.HOME_ENV, str(tmp_path / "home"))
    for name in (
        settings.PROFILE_ENV,
        settings.ONLINE_STORE_ENV,
        settings.BUS_URL_ENV,
        "DAGSTER_HOME",
        *PRODUCTION_SETTINGS,
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# Settings, checked before anything starts: no server needed.


def test_embedded_is_the_default_and_keeps_every_store_under_the_home(
    bare_environment: pytest.MonkeyPatch,
) -> None:
    assert settings.profile() == "embedded"
    assert check_profile() is None
    home = settings.qabuse_home()
    assert settings.mlflow_tracking_uri() == f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    assert settings.ledger_url() == f"sqlite:///{home / 'ledger' / 'decisions.db'}"
    assert settings.online_store() == "sqlite"
    assert settings.dagster_postgres_url() is None


def test_production_names_every_missing_setting_at_once(
    bare_environment: pytest.MonkeyPatch,
) -> None:
    bare_environment.setenv(settings.PROFILE_ENV, "production")
    with pytest.raises(ProfileError) as raised:
        check_profile()
    assert len(raised.value.problems) == len(PRODUCTION_SETTINGS)
    for name in PRODUCTION_SETTINGS:
        assert f"{name} is not set" in str(raised.value)


def test_production_refuses_malformed_settings_and_never_shows_a_password(
    bare_environment: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    environ = {
        settings.PROFILE_ENV: "production",
        # SQLite is the embedded store; production has none.
        settings.DAGSTER_PG_URL_ENV: f"sqlite:///{tmp_path / 'dagster.db'}",
        settings.MLFLOW_URI_ENV: "postgresql://mlflow:hunter2@db:5432",  # no database
        settings.LEDGER_URL_ENV: "postgresql://qabuse:hunter2@db:port/ledger",
        settings.REDIS_ENV: "redis://cache:6379/0",  # a URL, not Feast's host:port
        settings.ONLINE_STORE_ENV: "sqlite",
        settings.BUS_URL_ENV: "http://bus:4222",
    }
    with pytest.raises(ProfileError) as raised:
        production_servers(environ)
    message = str(raised.value)
    for name in (*PRODUCTION_SETTINGS, settings.ONLINE_STORE_ENV, settings.BUS_URL_ENV):
        assert name in message, f"{name} not named in:\n{message}"
    assert len(raised.value.problems) == 6
    assert "hunter2" not in message and "mlflow:***@db" in message


def test_dagster_and_mlflow_may_not_share_a_database(bare_environment: pytest.MonkeyPatch) -> None:
    shared = "postgresql://qabuse:secret@db:5432/qabuse"
    environ = {
        settings.DAGSTER_PG_URL_ENV: shared,
        settings.MLFLOW_URI_ENV: shared.replace("postgresql", "postgresql+psycopg"),
        settings.LEDGER_URL_ENV: shared,  # the ledger's tables are its own
        settings.REDIS_ENV: "cache:6379,db=1",
    }
    with pytest.raises(ProfileError, match="'runs' table"):
        production_servers(environ)
    environ[settings.MLFLOW_URI_ENV] = "postgresql+psycopg://qabuse:secret@db:5432/mlflow"
    servers = production_servers(environ)
    assert servers.mlflow_tracking_uri.endswith("/mlflow") and servers.bus_url is None
    # dagster-postgres's driver (SQLAlchemy 2.1 would pick psycopg 3 for a bare postgresql).
    assert servers.dagster_postgres_url == shared.replace("postgresql", "postgresql+psycopg2")
    environ[settings.DAGSTER_PG_URL_ENV] = shared.replace("postgresql", "postgresql+psycopg")
    with pytest.raises(ProfileError, match="psycopg2"):
        production_servers(environ)


def test_settings_never_fall_back_to_sqlite_in_production(
    bare_environment: pytest.MonkeyPatch,
) -> None:
    """A process started without the profile's check (a stream worker by hand) refuses too."""
    bare_environment.setenv(settings.PROFILE_ENV, "production")
    for read, name in (
        (settings.mlflow_tracking_uri, settings.MLFLOW_URI_ENV),
        (settings.ledger_url, settings.LEDGER_URL_ENV),
        (settings.redis_connection_string, settings.REDIS_ENV),
        (settings.dagster_postgres_url, settings.DAGSTER_PG_URL_ENV),
    ):
        with pytest.raises(ValueError, match=name):
            read()
    assert settings.online_store() == "redis"
    bare_environment.setenv(settings.ONLINE_STORE_ENV, "sqlite")
    with pytest.raises(ValueError, match="Redis"):
        settings.online_store()
    bare_environment.setenv(settings.PROFILE_ENV, "staging")
    with pytest.raises(ValueError, match="embedded"):
        settings.profile()


def test_shown_hides_only_the_password() -> None:
    assert shown("postgresql://u:p%40ss@h:5432/d?sslmode=require") == (
        "postgresql://u:***@h:5432/d?sslmode=require"
    )
    assert shown("postgresql://h/d") == "postgresql://h/d"


def test_a_server_that_does_not_answer_is_named(
    postgres_server: str, bare_environment: pytest.MonkeyPatch
) -> None:
    base = postgres_server.rsplit("/", 1)[0]
    servers = ProductionServers(
        dagster_postgres_url=postgres_server,
        mlflow_tracking_uri=f"{base}/no_such_database",
        ledger_url=postgres_server,
        redis="127.0.0.1:1",  # nothing listens on port 1
    )
    problems = unreachable(servers, timeout_s=1)
    assert len(problems) == 2, problems
    assert settings.MLFLOW_URI_ENV in problems[0] and "no_such_database" in problems[0]
    assert settings.REDIS_ENV in problems[1]


def test_launched_runs_use_the_executor_the_environment_names(
    bare_environment: pytest.MonkeyPatch,
) -> None:
    from qabuse_dagster.definitions import build_definitions, launched_run_executor

    job = build_definitions().resolve_job_def("telemetry_job")
    assert job.executor_def.name == "multiprocess"
    assert launched_run_executor("dagster:in_process_executor").name == "in_process"
    for spec, problem in (
        ("multiprocess", "module:attribute"),
        ("dagster:no_such_executor", "no_such_executor"),
        ("dagster:AssetKey", "not a Dagster executor"),
    ):
        with pytest.raises(ValueError, match=problem):
            launched_run_executor(spec)


# The stores on real servers.


def test_the_dagster_instance_keeps_runs_events_and_schedules_in_postgres(
    production: ProductionDeployment,
) -> None:
    from dagster import DagsterInstance
    from dagster_postgres import (
        PostgresEventLogStorage,
        PostgresRunStorage,
        PostgresScheduleStorage,
    )

    from qabuse_dagster.pipeline import export_dagster_home, instigators

    home = Path(export_dagster_home())
    config = (home / "dagster.yaml").read_text()
    assert production.dagster_postgres_url not in config  # read from the environment
    with DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 10
    # Schedule and sensor state is read from PostgreSQL (the tables dagster-postgres made).
    assert {i.name for i in instigators()} >= {"weekly_training_schedule", "drift_sensor"}
    tables = {
        row[0]
        for row in query(
            production.dagster_postgres_url,
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
        )
    }
    assert {"runs", "event_logs", "instigators", "jobs"} <= tables


def test_back_to_embedded_drops_the_production_storage_and_keeps_the_rest(
    production: ProductionDeployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qabuse_dagster.pipeline import export_dagster_home

    config = Path(export_dagster_home()) / "dagster.yaml"
    written = yaml.safe_load(config.read_text())
    written["run_launcher"] = {"module": "dagster_k8s", "class": "K8sRunLauncher"}
    config.write_text(yaml.safe_dump(written))
    export_dagster_home()  # the operator's run launcher stays
    assert yaml.safe_load(config.read_text())["run_launcher"]["class"] == "K8sRunLauncher"
    monkeypatch.setenv(settings.PROFILE_ENV, "embedded")
    export_dagster_home()
    assert yaml.safe_load(config.read_text()) == {
        "telemetry": {"enabled": False},
        "nux": {"enabled": False},
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher"},
    }


def _land_an_hour(home: Path) -> int:
    """A few valid records in ``HOUR``, landed as the collector would; how many."""
    from qabuse_dagster.ingest.files import ingest_telemetry

    records = [
        record_dict(f"job-{i}", HOUR + timedelta(minutes=3 * i), status=status)
        for i in range(8)
        for status in ("submitted", "completed")
    ]
    source = home / "incoming.jsonl"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text("".join(json.dumps(record) + "\n" for record in records))
    ingest_telemetry([source], settings.paths())
    return len(records)


def test_a_launched_partition_run_runs_its_steps_in_processes_of_their_own(
    production: ProductionDeployment,
) -> None:
    """As the sensor or a backfill launches it: the multiprocess executor, events in PostgreSQL."""
    from dagster import AssetKey, DagsterInstance, execute_job
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    from qabuse_dagster.defs.partitions import partition_key
    from qabuse_dagster.pipeline import QUIET_RUN_CONFIG, export_dagster_home

    landed = _land_an_hour(production.home)
    export_dagster_home()
    job = ReconstructableRepository.for_module(
        "qabuse_dagster.definitions", "defs"
    ).get_reconstructable_job("telemetry_job")
    with DagsterInstance.get() as instance:
        result = execute_job(
            job,
            instance=instance,
            run_config={**QUIET_RUN_CONFIG, "execution": {"config": LAUNCHED_EXECUTION}},
            tags={"dagster/partition": partition_key(HOUR)},
        )
        assert result.success
        events = [e.dagster_event for e in instance.all_logs(result.run_id) if e.dagster_event]
    starts = {e.step_key: e.pid for e in events if e.event_type_value == "STEP_START"}
    assert set(starts) == {"raw_telemetry", "api_key_window_features", "user_window_features"}
    pids = set(starts.values())
    assert len(pids) == 3 and os.getpid() not in pids, starts
    (raw,) = [
        e.step_materialization_data.materialization
        for e in events
        if e.is_step_materialization and e.asset_key == AssetKey("raw_telemetry")
    ]
    assert raw.metadata["rows"].value == landed
    stored = query(
        production.dagster_postgres_url, "SELECT status FROM runs WHERE run_id = %s", result.run_id
    )
    assert stored == [("SUCCESS",)]


def test_an_in_process_run_is_stored_in_postgres_too(production: ProductionDeployment) -> None:
    """``qabuse materialize`` and ``qabuse demo`` run in process, on the same instance."""
    from qabuse_dagster.pipeline import run_pipeline

    _land_an_hour(production.home)
    result = run_pipeline([HOUR], train=False)
    assert result.checks and all(result.checks.values()), result.checks
    (run_id,) = result.telemetry_run_ids
    assert query(
        production.dagster_postgres_url, "SELECT status FROM runs WHERE run_id = %s", run_id
    ) == [("SUCCESS",)]


def test_the_mlflow_registry_on_postgres_keeps_versions_and_aliases(
    production: ProductionDeployment,
) -> None:
    from support.toy_family import NAME, ToyRateDetector, registered

    with registered():
        _log_two_versions_and_alias_them(production, NAME, ToyRateDetector)


def _log_two_versions_and_alias_them(
    production: ProductionDeployment, family: str, detector: type
) -> None:
    from qabuse_dagster.model_registry import (
        family_model_name,
        load_detector,
        log_detector,
        resolve_alias,
        set_alias,
    )

    rows = np.random.default_rng(7).poisson(3.0, size=(200, 2)).astype(float)
    first, _ = log_detector(
        detector().fit(rows), family=family, params={}, metrics={}, run_name="toy-1"
    )
    second, _ = log_detector(
        detector(spread_floor=2.0).fit(rows),
        family=family,
        params={"spread_floor": 2.0},
        metrics={},
        run_name="toy-2",
    )
    assert int(second.version) == int(first.version) + 1
    set_alias(first, settings.CHAMPION_ALIAS)
    set_alias(second, settings.CHALLENGER_ALIAS)
    name = family_model_name(family)
    assert resolve_alias(settings.CHAMPION_ALIAS, name).version == first.version
    loaded = load_detector(settings.CHALLENGER_ALIAS, name)
    assert loaded.ref.version == second.version and loaded.detector.spread_floor == 2.0
    aliases = query(
        production.mlflow_tracking_uri,
        "SELECT alias, version FROM registered_model_aliases WHERE name = %s ORDER BY alias",
        name,
    )
    assert aliases == [
        (settings.CHALLENGER_ALIAS, int(second.version)),
        (settings.CHAMPION_ALIAS, int(first.version)),
    ]
    # Artifacts stay on the file store under the home, wherever the tracking store is.
    assert loaded.ref.run_id and any((production.home / "mlflow" / "artifacts").rglob("toy.json"))


def test_the_ledger_is_the_profiles_postgres(production: ProductionDeployment) -> None:
    from qabuse_dagster.response.ledger import PostgresLedger, open_ledger, verify_ledger
    from qabuse_dagster.response.records import LedgerEntry

    entry = LedgerEntry(
        at_ms=60_000, api_key_id="ab" * 16, action="throttle", actor="system", reason="test"
    )
    with open_ledger() as ledger:
        assert isinstance(ledger, PostgresLedger)
        appended = ledger.append(entry)
    report = verify_ledger()
    assert report.ok and report.count >= appended.seq
    ((stored,),) = query(
        production.ledger_url, "SELECT entry FROM ledger_records WHERE seq = %s", appended.seq
    )
    assert json.loads(stored)["action"] == "throttle"


def test_the_online_store_is_the_profiles_redis(production: ProductionDeployment) -> None:
    """Which Feast configuration production opens; the store itself is tested on a real
    redis-server in tests/features/test_redis_store.py."""
    from qabuse_dagster.features.store import feature_store_yaml

    assert settings.online_store() == "redis"
    assert settings.redis_connection_string() == production.redis
    assert feature_store_yaml(settings.feature_repo_dir()).name == "feature_store.redis.yaml"

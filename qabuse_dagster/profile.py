"""The deployment profile: every store under ``QABUSE_HOME``, or on servers given by URL.

``QABUSE_PROFILE=embedded`` (the default) needs no server: SQLite holds the Dagster
instance, the MLflow store and the decision ledger, and Feast's online store is SQLite
too. ``QABUSE_PROFILE=production`` puts each of them on a server:

- ``QABUSE_DAGSTER_PG_URL``: PostgreSQL for the Dagster instance's runs, events, schedule
  and sensor state (dagster-postgres);
- ``QABUSE_MLFLOW_TRACKING_URI``: PostgreSQL for MLflow's tracking store and registry;
- ``QABUSE_LEDGER_URL``: PostgreSQL for the hash-chained decision ledger;
- ``QABUSE_REDIS``: Redis for Feast's online store;
- ``QABUSE_BUS_URL`` (optional): NATS between collectors and stream workers; without it
  they share the landing folder, so one machine.

Files stay files: MLflow artifacts (``QABUSE_MLFLOW_ARTIFACTS``, default under
``QABUSE_HOME``), raw telemetry partitions and window features.

:func:`production_servers` checks every setting at once and raises :class:`ProfileError`
naming each one missing or malformed, so one failed start lists every mistake; the
servers :mod:`qabuse_dagster.pipeline` and ``qabuse up`` configure come from here. The
getters of :mod:`qabuse_dagster.settings` refuse, one by one, to fall back to SQLite in
production, for a process started any other way.

Dagster and MLflow each need a database of their own: both have a ``runs`` table. The
ledger may share either's (its tables are its own). The URLs are PostgreSQL's
(``postgresql://user:password@host:5432/db``; SQLAlchemy's ``postgresql+psycopg://``
spelling is accepted); passwords are never shown in a message.

Imports only the standard library and settings (psycopg when asked to reach a server),
so the CLI checks a profile before loading anything heavy.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from qabuse_dagster import settings

#: NATS, the collectors' and stream workers' bus; its scheme names a plain or TLS server.
BUS_SCHEMES = ("nats", "tls")


class ProfileError(ValueError):
    """The production profile's settings are missing, malformed or unreachable."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        listed = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{settings.PROFILE_ENV}=production cannot start:\n{listed}")


@dataclass(frozen=True)
class ProductionServers:
    """The servers of a production deployment, each setting checked."""

    #: dagster-postgres: the instance's run, event and schedule storage, in SQLAlchemy's
    #: spelling with the psycopg2 driver (`dagster_sqlalchemy_url`).
    dagster_postgres_url: str
    #: MLflow's tracking and registry store (``mlflow server --backend-store-uri``).
    mlflow_tracking_uri: str
    ledger_url: str
    #: Feast's Redis ``connection_string``: ``host:port[,db=0,password=...]``.
    redis: str
    #: None: collectors and stream workers share the landing folder, on one machine.
    bus_url: str | None = None


def shown(url: str) -> str:
    """``url`` with its password replaced by ``***``: safe for a log or an error."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def _postgres_problem(name: str, url: str) -> str | None:
    """Why ``url`` is not a PostgreSQL database URL, or None when it is one."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parsing the port raises on a bad one)
    except ValueError as exc:
        return f"{name}={shown(url)!r} is not a URL: {exc}"
    if parts.scheme.split("+")[0] != "postgresql":
        return (
            f"{name}={shown(url)!r}: expected postgresql://user:password@host:5432/database "
            f"(or postgresql+psycopg://...), not {parts.scheme or 'no'} scheme"
        )
    if not (parts.hostname or "host=" in parts.query):
        return f"{name}={shown(url)!r} names no host"
    if not parts.path.strip("/"):
        return f"{name}={shown(url)!r} names no database (postgresql://host:5432/DATABASE)"
    return None


#: The driver dagster-postgres works with. SQLAlchemy 2.1 maps a bare ``postgresql://`` to
#: psycopg 3, whose server-side parameters PostgreSQL refuses in dagster-postgres's
#: ``NOTIFY run_events, :id`` (every event write fails), so Dagster's URL names psycopg2.
DAGSTER_POSTGRES_DRIVER = "psycopg2"


def dagster_sqlalchemy_url(url: str) -> str:
    """``url`` (``postgresql://`` or ``postgresql+psycopg2://``) with the psycopg2 driver."""
    scheme, _, rest = url.partition("://")
    if scheme not in ("postgresql", f"postgresql+{DAGSTER_POSTGRES_DRIVER}"):
        raise ValueError(f"{shown(url)!r}: expected postgresql:// for dagster-postgres")
    return f"postgresql+{DAGSTER_POSTGRES_DRIVER}://{rest}"


def _database(url: str) -> tuple[str | None, int, str]:
    parts = urlsplit(url)
    return parts.hostname, parts.port or 5432, parts.path.strip("/")


def _redis_problem(connection: str) -> str | None:
    """Why ``connection`` is not Feast's ``host:port[,key=value...]``, or None."""
    address, *options = connection.split(",")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return (
            f"{settings.REDIS_ENV}={connection!r}: expected host:port[,db=0,password=...], "
            "Feast's Redis connection string (e.g. redis.internal:6379)"
        )
    if any("=" not in option for option in options):
        return f"{settings.REDIS_ENV}={connection!r}: options after the address are key=value"
    return None


def _bus_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parsing the port raises on a bad one)
    except ValueError as exc:
        return f"{settings.BUS_URL_ENV}={shown(url)!r} is not a URL: {exc}"
    if parts.scheme not in BUS_SCHEMES or not parts.hostname:
        return (
            f"{settings.BUS_URL_ENV}={shown(url)!r}: expected nats://host:4222 (or tls://host:4222)"
        )
    return None


def production_servers(environ: Mapping[str, str] | None = None) -> ProductionServers:
    """The production profile's servers from the environment, every setting checked.

    Args:
        environ: where to read the settings (default ``os.environ``).

    Raises:
        ProfileError: naming every setting missing or malformed, and Dagster and MLflow
            sharing one database; or ``QABUSE_ONLINE_STORE`` set to other than redis.
    """
    env = os.environ if environ is None else environ
    problems: list[str] = []
    found: dict[str, str] = {}
    required = {
        settings.DAGSTER_PG_URL_ENV: "the Dagster instance's PostgreSQL (runs, events, "
        "schedules), e.g. postgresql://dagster:PASSWORD@db:5432/dagster",
        settings.MLFLOW_URI_ENV: "MLflow's tracking and registry PostgreSQL, e.g. "
        "postgresql://mlflow:PASSWORD@db:5432/mlflow",
        settings.LEDGER_URL_ENV: "the decision ledger's PostgreSQL, e.g. "
        "postgresql://qabuse:PASSWORD@db:5432/ledger",
        settings.REDIS_ENV: "the Feast online store's Redis, host:port (e.g. redis:6379)",
    }
    for name, what in required.items():
        value = env.get(name, "").strip()
        if not value:
            problems.append(f"{name} is not set: {what}")
            continue
        redis = name == settings.REDIS_ENV
        problem = _redis_problem(value) if redis else _postgres_problem(name, value)
        if problem is None and name == settings.DAGSTER_PG_URL_ENV:
            try:
                value = dagster_sqlalchemy_url(value)
            except ValueError:
                problem = (
                    f"{name}={shown(value)!r}: dagster-postgres runs on psycopg2, so "
                    "postgresql:// (or postgresql+psycopg2://)"
                )
        if problem is not None:
            problems.append(problem)
        else:
            found[name] = value
    online = env.get(settings.ONLINE_STORE_ENV, "redis").strip().lower()
    if online != "redis":
        problems.append(
            f"{settings.ONLINE_STORE_ENV}={online!r}: production serves features from Redis "
            "(leave it unset, or set it to redis)"
        )
    dagster, mlflow = found.get(settings.DAGSTER_PG_URL_ENV), found.get(settings.MLFLOW_URI_ENV)
    if dagster and mlflow and _database(dagster) == _database(mlflow):
        problems.append(
            f"{settings.DAGSTER_PG_URL_ENV} and {settings.MLFLOW_URI_ENV} name one database "
            f"({_database(dagster)[2]!r}): each needs its own, both have a 'runs' table"
        )
    bus = env.get(settings.BUS_URL_ENV, "").strip() or None
    if bus is not None and (problem := _bus_problem(bus)) is not None:
        problems.append(problem)
    if problems:
        raise ProfileError(problems)
    return ProductionServers(
        dagster_postgres_url=found[settings.DAGSTER_PG_URL_ENV],
        mlflow_tracking_uri=found[settings.MLFLOW_URI_ENV],
        ledger_url=found[settings.LEDGER_URL_ENV],
        redis=found[settings.REDIS_ENV],
        bus_url=bus,
    )


def check_profile() -> ProductionServers | None:
    """None in the embedded profile; in production, its servers (:func:`production_servers`).

    Raises:
        ProfileError: in production, as :func:`production_servers`.
        ValueError: ``QABUSE_PROFILE`` is neither embedded nor production.
    """
    if settings.profile() != "production":
        return None
    return production_servers()


def _postgres_unreachable(name: str, url: str, timeout_s: float) -> str | None:
    import psycopg

    scheme, _, rest = url.partition("://")
    try:
        # libpq knows postgresql:// alone; the +driver part is SQLAlchemy's.
        plain = f"{scheme.split('+')[0]}://{rest}"
        with psycopg.connect(plain, connect_timeout=max(1, round(timeout_s))):
            return None
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return f"{name}={shown(url)!r} does not answer: {reason}"


def _tcp_unreachable(name: str, host: str, port: int, timeout_s: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{name}: nothing answers on {host}:{port} ({exc.strerror or exc})"


def unreachable(servers: ProductionServers, timeout_s: float = 3.0) -> list[str]:
    """What of ``servers`` does not answer: each PostgreSQL database, Redis and the bus.

    A PostgreSQL URL must reach its database (created beforehand, as an operator does);
    Redis and NATS must accept a TCP connection. An empty list: all of them answer.
    """
    problems = [
        problem
        for name, url in (
            (settings.DAGSTER_PG_URL_ENV, servers.dagster_postgres_url),
            (settings.MLFLOW_URI_ENV, servers.mlflow_tracking_uri),
            (settings.LEDGER_URL_ENV, servers.ledger_url),
        )
        if (problem := _postgres_unreachable(name, url, timeout_s)) is not None
    ]
    host, _, port = servers.redis.split(",")[0].rpartition(":")
    if (problem := _tcp_unreachable(settings.REDIS_ENV, host, int(port), timeout_s)) is not None:
        problems.append(problem)
    if servers.bus_url is not None:
        bus = urlsplit(servers.bus_url)
        if bus.hostname is not None:
            problem = _tcp_unreachable(
                settings.BUS_URL_ENV, bus.hostname, bus.port or 4222, timeout_s
            )
            if problem is not None:
                problems.append(problem)
    return problems

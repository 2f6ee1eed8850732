"""A real PostgreSQL server for the response layer's tests (the ledger's PostgreSQL backend).

One throwaway server per test session (``support.postgres_server``); each test that asks
for ``postgres_database`` gets a fresh, empty database on it. Skipped where PostgreSQL is
not installed, except under CI (``CI`` set), which installs it (``.ci/run``) and fails
the test without it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from support.postgres_server import local_postgres, postgres_bin_dir
from support.required import require_installed


def require_postgres_server() -> None:
    """Skip without PostgreSQL's server programs; under CI (``CI`` set) fail instead."""
    require_installed(
        postgres_bin_dir() is not None, "PostgreSQL", "postgresql", "the PostgreSQL ledger"
    )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of the session's server, as its superuser, on the ``postgres`` database."""
    require_postgres_server()
    with local_postgres() as url:
        yield url


@pytest.fixture
def postgres_database(postgres_server: str) -> str:
    """The URL of a fresh, empty database on the session's server."""
    import psycopg
    from psycopg import sql

    name = f"test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return f"{postgres_server.rsplit('/', 1)[0]}/{name}"

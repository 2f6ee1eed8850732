"""A throwaway PostgreSQL server on 127.0.0.1 for the PostgreSQL ledger's tests.

``initdb`` makes a cluster in a fresh temporary folder, ``postgres`` serves it on a free
port (its unix socket in the same folder, so no system directory is touched) with
durability off, since nothing outlives the context, and the folder is removed at the end.
PostgreSQL refuses to run as root: as root, the cluster belongs to ``nobody`` and both
programs run as that user.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from qabuse_dagster.processes import free_port

logger = logging.getLogger(__name__)

#: Debian's layout: the server programs live per major version, off PATH.
DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"
UNPRIVILEGED_USER = "nobody"


class PostgresServerMissing(RuntimeError):
    """``initdb`` and ``postgres`` are not installed."""


def _has_server(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in ("initdb", "postgres"))


def postgres_bin_dir() -> Path | None:
    """The folder holding ``initdb`` and ``postgres`` (PATH first, then Debian's newest)."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    debian = sorted(
        glob.glob(DEBIAN_BIN_GLOB),
        key=lambda p: [
            int(part) if part.isdigit() else 0 for part in Path(p).parent.name.split(".")
        ],
        reverse=True,
    )
    candidates += [Path(folder) for folder in debian]
    return next((folder for folder in candidates if _has_server(folder)), None)


def _run_as() -> pwd.struct_passwd | None:
    """The account to run the server as: ``nobody`` when this process is root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        raise RuntimeError(
            f"running as root, and PostgreSQL refuses root, but there is no {UNPRIVILEGED_USER!r} "
            "account to run it as"
        ) from None


def _connects(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=1):
            return True
    except psycopg.OperationalError:
        return False


@contextlib.contextmanager
def local_postgres(host: str = "127.0.0.1", startup_timeout_s: float = 30.0) -> Iterator[str]:
    """Run a fresh PostgreSQL cluster on a free port; yield its URL (superuser, ``postgres`` db).

    Raises:
        PostgresServerMissing: ``initdb`` or ``postgres`` is not installed.
        RuntimeError: ``initdb`` failed, or the server exited or did not accept connections
            within ``startup_timeout_s``.
    """
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise PostgresServerMissing(
            "PostgreSQL's initdb and postgres are neither on PATH nor in "
            f"{DEBIAN_BIN_GLOB} (Debian: apt-get install postgresql)"
        )
    account = _run_as()
    # Under /tmp, not pytest's tmp_path: that sits in a root-only (0700) folder that the
    # unprivileged server could not enter. Short, too: a socket path has 107 bytes at most.
    root = Path(tempfile.mkdtemp(prefix="qabuse-pg-"))
    data = root / "data"
    data.mkdir(mode=0o700)
    uid = gid = None
    if account is not None:
        uid, gid = account.pw_uid, account.pw_gid
        for path in (root, data):
            os.chown(path, uid, gid)
    # Root's supplementary groups are dropped too, not only its uid.
    groups: list[int] | None = None if account is None else []
    # The server's environment: a locale every system has, and no HOME of root's.
    env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "HOME": str(root)}
    process: subprocess.Popen[bytes] | None = None
    try:
        initdb_command = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres"]
        initdb_command += ["-A", "trust", "--no-sync", "--encoding=UTF8", "--locale=C"]
        initdb = subprocess.run(
            initdb_command,
            cwd=root,
            env=env,
            capture_output=True,
            check=False,
            user=uid,
            group=gid,
            extra_groups=groups,
        )
        if initdb.returncode != 0:
            raise RuntimeError(
                f"initdb exited with {initdb.returncode}: {initdb.stderr.decode(errors='replace')}"
            )
        port = free_port(host)
        command = [str(bin_dir / "postgres"), "-D", str(data), "-h", host, "-p", str(port)]
        command += ["-k", str(root)]
        # Nothing here must survive a crash, so skip every fsync.
        for setting in ("fsync=off", "synchronous_commit=off", "full_page_writes=off"):
            command += ["-c", setting]
        log = root / "postgres.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command,
                cwd=root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                user=uid,
                group=gid,
                extra_groups=groups,
            )
        url = f"postgresql://postgres@{host}:{port}/postgres"
        deadline = time.monotonic() + startup_timeout_s
        while not _connects(url):
            if process.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with {process.returncode}: {log.read_text(errors='replace')}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres accepted no connection within {startup_timeout_s}s")
            time.sleep(0.05)
        logger.info("postgres pid %s on %s:%s", process.pid, host, port)
        yield url
    finally:
        if process is not None:
            # SIGINT is PostgreSQL's fast shutdown: it ends open sessions instead of
            # waiting for them, as SIGTERM (smart shutdown) would.
            process.send_signal(signal.SIGINT)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server at ``server_url`` (a superuser's); its URL."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return f"{server_url.rsplit('/', 1)[0]}/{name}"

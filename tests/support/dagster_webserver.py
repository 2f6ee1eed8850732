"""The real Dagster webserver on the test session's instance, for tests that look at the UI.

``dagster-webserver`` starts from the project root with no target, so it reads the code
location from pyproject's ``[tool.dagster]``: ``qabuse``, the name ``qabuse up`` shows.
It runs under :func:`~qabuse_dagster.serving.server.start_server`'s environment (this
process's ``QABUSE_HOME`` and the ``DAGSTER_HOME`` under it) in a
:class:`~qabuse_dagster.processes.ChildProcesses` block, which stops it on exit: SIGTERM,
then SIGKILL for whatever is left after the grace period (its code server too).

A server that exits or never loads the code location fails the test: it is a test of
the UI, never a skip.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from qabuse_dagster.processes import ChildProcesses, free_port
from qabuse_dagster.serving.server import console_script, start_server

LOCATION = "qabuse"
"""The code location, as pyproject's ``[tool.dagster]`` names it."""

_LOCATIONS = """
{
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError { __typename ... on PythonError { message } }
      }
    }
  }
}
"""


@dataclass(frozen=True)
class DagsterWebserver:
    """A running webserver: its base URL and its GraphQL endpoint."""

    url: str

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        """The ``data`` of one GraphQL query; GraphQL errors fail the test."""
        response = httpx.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=30
        )
        response.raise_for_status()
        body = response.json()
        assert not body.get("errors"), body["errors"]
        data: dict[str, Any] = body["data"]
        return data


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def _location_loaded(server: DagsterWebserver) -> bool:
    """Whether the code location has loaded; a load error fails at once, with its message."""
    workspace = server.graphql(_LOCATIONS)["workspaceOrError"]
    assert workspace["__typename"] == "Workspace", workspace
    for entry in workspace["locationEntries"]:
        if entry["name"] == LOCATION and entry["loadStatus"] == "LOADED":
            loaded = entry["locationOrLoadError"]
            assert loaded["__typename"] == "RepositoryLocation", loaded.get("message", loaded)
            return True
    return False


@contextlib.contextmanager
def dagster_webserver(log: Path, within_s: float = 90.0) -> Iterator[DagsterWebserver]:
    """Run ``dagster-webserver`` on 127.0.0.1 for the block, once the code location loaded.

    Args:
        log: where the server's output goes (appended); its tail is in every failure.
        within_s: how long the server may take to answer with the location loaded.
    """
    port = free_port()
    command = [console_script("dagster-webserver"), "-h", "127.0.0.1", "-p", str(port)]
    with ChildProcesses() as children:
        process = start_server(children, command, log)
        server = DagsterWebserver(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + within_s
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"dagster-webserver exited with {process.returncode}:\n{_tail(log)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if _location_loaded(server):
                    break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"dagster-webserver did not load {LOCATION!r} within {within_s:.0f} s:\n"
                    + _tail(log)
                )
            time.sleep(0.25)
        yield server

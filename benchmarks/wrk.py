"""``wrk`` (compiled HTTP load generator, Debian package ``wrk``): run it, read its figures.

Python clients spend a core on their own work on a 2-core machine; wrk's does not take
the server's CPU, so its latency is closer to what the server costs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["available", "post_cycle_script", "post_script", "run_wrk"]

_POST_SCRIPT = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["content-type"] = "application/json"
{headers}
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal here


def post_script(body: str, headers: Mapping[str, str] | None = None) -> str:
    """A wrk script that POSTs one JSON ``body`` with ``headers`` on every request."""
    lines = "\n".join(
        f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in (headers or {}).items()
    )
    return _POST_SCRIPT.format(body=_lua_string(body), headers=lines)


_CYCLE_SCRIPT = """
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
{headers}
local bodies = {{ {bodies} }}
local next_body = 0
request = function()
  next_body = next_body % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[next_body])
end
"""


def post_cycle_script(bodies: Sequence[str], headers: Mapping[str, str] | None = None) -> str:
    """A wrk script that POSTs the JSON ``bodies`` in turn, one per request, on a loop."""
    if not bodies:
        raise ValueError("expected at least one body")
    lines = "\n".join(
        f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in (headers or {}).items()
    )
    return _CYCLE_SCRIPT.format(bodies=", ".join(map(_lua_string, bodies)), headers=lines)


def run_wrk(
    url: str,
    path: str,
    script: str,
    workdir: Path,
    *,
    threads: int,
    connections: int,
    seconds: float,
) -> dict[str, float]:
    """Run wrk against ``url + path``; its answers per second and p50/p99 latency (ms)."""
    lua = workdir / f"wrk-{abs(hash(script))}.lua"
    lua.write_text(script)
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--latency",
        "-s",
        str(lua),
        url + path,
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if found is None:
        raise RuntimeError(f"no Requests/sec in wrk's output:\n{output}")
    figures = {"answers_per_s": float(found.group(1))}
    for q, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", output, re.M):
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
        figures[f"p{q}_ms"] = float(value) * scale
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    figures["non_2xx"] = float(non_2xx.group(1)) if non_2xx else 0.0
    requests = re.search(r"(\d+) requests in", output)
    figures["requests"] = float(requests.group(1)) if requests else 0.0
    return figures

"""Online lookup latency: one key's feature vector from Feast's Redis and SQLite online stores.

Both stores are materialised from the same Parquet rows of one applied repository; the
Redis store is a real ``redis-server`` on 127.0.0.1 (no persistence). Each timed lookup is
``online_features`` (``FeatureStore.get_online_features`` for one entity, with the feature
service resolved once, as the scoring endpoint does); the two stores alternate lookup by
lookup, so a change in machine load touches both sides alike. "Ours" is Redis, the
scale-out store; the baseline is the embedded SQLite default.
"""

from __future__ import annotations

import logging
import os
import random
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.report import (
    BenchmarkResult,
    busy_machine_note,
    comparison,
    environment_variables,
    load_average,
    percentile,
    progress_display,
)

NAME = "online_lookup"
BASELINE = "Feast SQLite online store (the embedded default)"
STORES = ("redis", "sqlite")


@dataclass(frozen=True)
class Settings:
    """Sizes of one online-lookup benchmark run."""

    api_keys: int = 1_000
    lookups: int = 5_000
    warmup: int = 200
    seed: int = 1


def _seed_rows(store: Any, api_keys: int, seed: int, at: datetime) -> list[str]:
    """One Parquet row per key in the repository's offline source; returns the keys."""
    import pandas as pd
    from feast.types import Int64

    from qabuse_dagster import settings
    from qabuse_dagster.features.windows import ENTITY_COLUMN, TIMESTAMP_COLUMN

    rng = random.Random(seed)
    fields = {f.name: f.dtype for view in store.list_feature_views() for f in view.features}
    keys = [f"{rng.getrandbits(256):064x}" for _ in range(api_keys)]
    rows = pd.DataFrame(
        [
            {
                ENTITY_COLUMN: key,
                TIMESTAMP_COLUMN: at,
                **{
                    name: rng.randrange(100) if dtype == Int64 else rng.random()
                    for name, dtype in fields.items()
                },
            }
            for key in keys
        ]
    )
    source = settings.paths().api_key_windows
    source.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(source / "benchmark.parquet", index=False)
    return keys


def _redis_version(binary: str) -> str:
    """``7.0.15`` from ``Redis server v=7.0.15 sha=... bits=64 build=...``."""
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    words = [w for w in done.stdout.split() if w.startswith("v=")]
    return words[0].removeprefix("v=") if words else done.stdout.strip()


def run(settings: Settings, console: Console) -> BenchmarkResult:
    """Materialise both stores, time alternating one-key lookups, check the vectors agree."""
    from qabuse_dagster import settings as qabuse_settings
    from qabuse_dagster.features.store import (
        apply_repo,
        entity_views,
        feature_service,
        materialize,
        online_features,
        open_store,
    )

    # A test fixture (tests/support); ``python -m benchmarks`` runs from the repository root.
    from tests.support.local_redis import local_redis, redis_server_binary

    result = BenchmarkResult(
        name=NAME, title="Online feature lookup, one key (Redis vs SQLite)", baseline=BASELINE
    )
    binary = redis_server_binary()
    if binary is None:
        message = "redis-server is not installed (Debian: apt-get install redis-server)"
        # CI installs it (.ci/run): there a missing server is a failure, not a skip.
        (result.problems if os.environ.get("CI") else result.notes).append(message)
        return result
    # Feast logs each materialisation and lookup setup; the tables are the output here.
    logging.getLogger("feast").setLevel(logging.WARNING)
    load_averages = [load_average()]
    latencies: dict[str, list[float]] = {name: [] for name in STORES}
    disagreements: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="qabuse-bench-online-") as tmp,
        local_redis() as connection,
        environment_variables(
            **{
                qabuse_settings.HOME_ENV: str(Path(tmp).resolve()),
                qabuse_settings.REDIS_ENV: connection,
                "FEAST_USAGE": "False",
            }
        ),
        progress_display(console) as progress,
    ):
        task = progress.add_task("applying the repository, materialising both stores", total=None)
        stores = {name: open_store(online_store=name) for name in STORES}
        apply_repo(stores["sqlite"])
        # Same registry; the apply sets up the Redis store's side of the infrastructure.
        apply_repo(stores["redis"])
        now = datetime.now(UTC)
        keys = _seed_rows(stores["sqlite"], settings.api_keys, settings.seed, now)
        for store in stores.values():
            # Only api-key rows are seeded: materialise the api-key views.
            views = entity_views(store, "api_key")
            materialize(store, now - timedelta(hours=1), now + timedelta(minutes=1), views)
        services = {name: feature_service(store) for name, store in stores.items()}
        progress.update(task, total=1, completed=1)

        rng = random.Random(settings.seed)
        total = settings.warmup + settings.lookups
        task = progress.add_task(f"{settings.lookups:,} lookups per store", total=total)
        for i in range(total):
            key = rng.choice(keys)
            vectors = {}
            # Alternate which store goes first, so neither always finds the caches warm.
            for name in STORES if i % 2 else reversed(STORES):
                started = time.perf_counter()
                (vectors[name],) = online_features(stores[name], [key], services[name])
                elapsed = time.perf_counter() - started
                if i >= settings.warmup:
                    latencies[name].append(elapsed)
            if vectors["redis"] != vectors["sqlite"]:
                disagreements.append(key)
            progress.advance(task)
    load_averages.append(load_average())

    summary: dict[str, dict[str, float]] = {}
    for name, seconds in latencies.items():
        ms = sorted(s * 1e3 for s in seconds)
        summary[name] = {
            "p50_ms": percentile(ms, 50),
            "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms),
            "max_ms": ms[-1],
        }
    result.comparisons = [
        comparison(
            f"{q} latency",
            "ms",
            summary["redis"][f"{q}_ms"],
            summary["sqlite"][f"{q}_ms"],
            higher_is_better=False,
        )
        for q in ("p50", "p99")
    ]
    result.facts = {
        "api_keys": settings.api_keys,
        "lookups_per_store": settings.lookups,
        "warmup_per_store": settings.warmup,
        "seed": settings.seed,
        "latency_ms": summary,
        "vector_disagreements": len(disagreements),
        "redis_server": _redis_version(binary),
    }
    result.shown_facts = ("api_keys", "lookups_per_store", "redis_server")
    busy = busy_machine_note(load_averages)
    if busy:
        result.notes.append(busy)
    if disagreements:
        result.problems.append(
            f"Redis and SQLite return different vectors in {len(disagreements)} lookups; "
            f"first for key {disagreements[0]}"
        )
    return result

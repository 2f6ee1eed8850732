"""``qabuse ingest`` then ``qabuse materialize``, as a user runs them, around far-dated records.

Before the accepted time range existed, one record dated 2025 made ``materialize`` plan
every hour from it to the newest record (thousands of partitions, no progress in minutes),
and one from year 9999 or year 1 crashed it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.records import record, record_dict

from qabuse_dagster import settings
from qabuse_dagster.ingest.partitions import read_raw, records_to_table, stage_landing

pytestmark = pytest.mark.fuzz  # a hostile-input suite: `make fuzz` runs it

#: Two spans of in-range hours, eight months apart: materialised span by span.
SPANS = (datetime(2026, 3, 1, 10, tzinfo=UTC), datetime(2026, 11, 2, 10, tzinfo=UTC))
FAR = (
    datetime(2025, 6, 1, tzinfo=UTC),
    datetime(2099, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, tzinfo=UTC),
    datetime(1, 1, 1, tzinfo=UTC),
)


def _qabuse(home: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, settings.HOME_ENV: str(home), "DAGSTER_HOME": str(home / "dagster")}
    return subprocess.run(
        [sys.executable, "-m", "qabuse_dagster.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.integration
def test_far_dated_records_are_quarantined_and_the_rest_materialise_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    valid = [
        record_dict(f"{start:%m}-{i}", start + timedelta(minutes=i % 120), api_key_id=f"{k:064x}")
        for start in SPANS
        for k in range(3)
        for i in range(k * 100, k * 100 + 100)
    ]
    far = [record_dict(f"far-{i}", at) for i, at in enumerate(FAR)]
    source = tmp_path / "telemetry.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in [*valid[:300], *far, *valid[300:]]))

    ingested = _qabuse(home, "ingest", str(source), timeout=120)
    # A record landed before the doors checked the range (an older qabuse): skipped later.
    stage_landing(
        records_to_table([record("legacy", FAR[0])]), settings.Paths(home).landing, tenant="t"
    )
    materialised = _qabuse(home, "materialize", "--no-train", timeout=300)

    assert ingested.returncode == 1, ingested.stderr  # rejections exit 1
    assert f"{len(valid)} accepted, 0 duplicates, 4 rejected (4 outside the time range)" in (
        ingested.stdout
    )
    quarantine = next((home / "quarantine").glob("*.jsonl")).read_text().splitlines()
    assert sorted(json.loads(json.loads(q)["raw"])["job_id"] for q in quarantine) == [
        f"far-{i}" for i in range(4)
    ]
    assert materialised.returncode == 0, materialised.stderr[-3000:]
    assert "2 run(s) of consecutive hours" in materialised.stdout
    assert "skipped landed hour 2025-06-01T00:00:00+00:00" in materialised.stderr
    raw = read_raw(settings.Paths(home).raw_telemetry)
    identities = list(zip(raw["job_id"].to_pylist(), raw["status"].to_pylist(), strict=True))
    assert sorted(identities) == sorted((r["job_id"], r["status"]) for r in valid)

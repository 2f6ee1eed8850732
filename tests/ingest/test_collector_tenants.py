"""Tenants at the collector: each token is one tenant's; no tenant shadows or feeds another's.

Before tenants, duplicates were judged on (job_id, status) across every token: a tenant
that sent a guessed job_id first had the real record answered as a duplicate and never
stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from support.records import record_dict

from qabuse_dagster.ingest.collector import create_app
from qabuse_dagster.ingest.partitions import compact_hour, landing_hours
from qabuse_dagster.ingest.spool import compact
from qabuse_dagster.settings import Paths

pytestmark = pytest.mark.fuzz  # a hostile-input suite: `make fuzz` runs it

H0 = datetime(2026, 3, 2, 13, tzinfo=UTC)
KEY_A, KEY_M = "a" * 64, "e" * 64
TOKENS = {"tok-a": "lab-a", "tok-m": "mallory", "tok-g": "gateway"}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def rec(job: str, key: str, **extra: Any) -> dict[str, Any]:
    return record_dict(job, H0, api_key_id=key, **extra)


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path / "home")


@pytest.fixture
def client(paths: Paths) -> Iterator[TestClient]:
    app = create_app(paths, TOKENS, rate_per_s=1000, burst=1000, trusted_tenants=["gateway"])
    with TestClient(app) as test_client:
        yield test_client


def landed(paths: Paths) -> list[tuple[str, str, str]]:
    compact(paths)
    for hour in landing_hours(paths.landing):
        compact_hour(hour, paths.landing, paths.raw_telemetry)
    table = pq.read_table(next(paths.raw_telemetry.rglob("part-0.parquet")))
    columns = [table[name].to_pylist() for name in ("tenant", "job_id", "backend")]
    return sorted(zip(*columns, strict=True))


def test_a_guessed_job_id_sent_first_by_another_tenant_shadows_nothing(
    client: TestClient, paths: Paths
) -> None:
    guessed = client.post("/v1/telemetry", json=[rec("job-1", KEY_M)], headers=auth("tok-m"))
    real = client.post("/v1/telemetry", json=[rec("job-1", KEY_A)], headers=auth("tok-a"))
    again = client.post("/v1/telemetry", json=[rec("job-1", KEY_A)], headers=auth("tok-a"))

    assert guessed.json()["accepted"] == 1
    assert (real.json()["accepted"], real.json()["duplicates"]) == (1, 0)
    assert (again.json()["accepted"], again.json()["duplicates"]) == (0, 1)
    assert landed(paths) == [("lab-a", "job-1", "ibm_torino"), ("mallory", "job-1", "ibm_torino")]


def test_a_tenant_may_not_report_a_key_another_tenant_reports(
    client: TestClient, paths: Paths
) -> None:
    client.post("/v1/telemetry", json=[rec("a-1", KEY_A)], headers=auth("tok-a"))
    forged = [rec("m-1", KEY_M), rec("m-2", KEY_A, backend="forged")]

    answer = client.post("/v1/telemetry", json=forged, headers=auth("tok-m")).json()

    assert (answer["accepted"], answer["rejected_total"]) == (1, 1)
    ((field, why),) = answer["rejected"][0]["errors"]
    assert answer["rejected"][0]["index"] == 1
    assert field == "api_key_id" and "'lab-a'" in why and "'mallory'" in why
    assert ("mallory", "m-2", "forged") not in landed(paths)


def test_a_trusted_tenant_reports_any_key_and_claims_none(client: TestClient, paths: Paths) -> None:
    gateway = client.post(
        "/v1/telemetry", json=[rec("g-1", KEY_A), rec("g-2", KEY_M)], headers=auth("tok-g")
    ).json()
    lab = client.post("/v1/telemetry", json=[rec("a-1", KEY_A)], headers=auth("tok-a")).json()

    assert (gateway["accepted"], gateway["rejected_total"]) == (2, 0)
    assert (lab["accepted"], lab["rejected_total"]) == (1, 0)  # the gateway claimed KEY_A not
    assert [tenant for tenant, _, _ in landed(paths)] == ["gateway", "gateway", "lab-a"]


def test_a_trusted_tenant_must_hold_a_token(paths: Paths) -> None:
    with pytest.raises(ValueError, match="hold no token"):
        create_app(paths, TOKENS, trusted_tenants=["nobody"])

"""The gateway as deployed: a real uvicorn process following a real ledger, taking appeals."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from support.gateway_apps import GatewayServer

from qabuse_dagster import settings
from qabuse_dagster.response.auth import add_token
from qabuse_dagster.response.gateway import API_KEY_HEADER
from qabuse_dagster.response.ledger import open_ledger
from qabuse_dagster.response.records import LedgerEntry
from qabuse_dagster.telemetry.hashing import KeyedHasher

HASH_KEY = "test-hash-key-for-the-gateway-ledger-0123"
SIGNING_KEY = "s" * 40
RAW = "qk_live_gateway_owner"
KEY = KeyedHasher(HASH_KEY.encode()).hash(RAW, domain="api_key")


@pytest.mark.integration
def test_the_gateway_enforces_what_the_ledger_says_and_files_appeals(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    gateway = add_token("envoy", ["gateway"], path=tokens)
    owner = add_token("tenant-7", ["owner"], api_keys=[KEY], path=tokens)
    home = tmp_path / "home"
    env = {
        settings.HOME_ENV: str(home),
        settings.TOKENS_FILE_ENV: str(tokens),
        settings.SIGNING_KEY_ENV: SIGNING_KEY,
        settings.HASH_KEY_ENV: HASH_KEY,
        settings.ENFORCE_ENV: "enforce",
    }
    url = f"sqlite:///{home / 'ledger' / 'decisions.db'}"
    server = GatewayServer("qabuse_dagster.response.gateway:app", env, tmp_path / "gw.log")
    try:
        with (
            httpx.Client(base_url=server.url, timeout=10) as client,
            open_ledger(url, key=SIGNING_KEY.encode()) as ledger,
        ):
            as_gateway = {"authorization": f"Bearer {gateway}", API_KEY_HEADER: KEY}
            assert client.post("/v1/authorize", headers=as_gateway).status_code == 200
            now = int(time.time() * 1000)
            ledger.append(LedgerEntry(now, KEY, "challenge", "system", "score 0.97 over 0.95"))
            deadline = time.monotonic() + 5
            status = 200
            while status == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
                status = client.post("/v1/authorize", headers=as_gateway).status_code
            assert status == 403  # the follower applied the ledger's new entry

            body = {"api_key": RAW, "reason": "our nightly benchmark"}
            path = f"/v1/appeals/{KEY}"
            assert client.post(path, json=body).status_code == 401
            wrong_role = client.post(
                path, json=body, headers={"authorization": f"Bearer {gateway}"}
            )
            assert wrong_role.status_code == 403
            as_owner = {"authorization": f"Bearer {owner}"}
            bad_proof = client.post(path, json={**body, "api_key": "guess"}, headers=as_owner)
            assert bad_proof.status_code == 403 and "does not hash" in bad_proof.json()["reason"]
            filed = client.post(path, json=body, headers=as_owner)
            assert filed.status_code == 202, filed.text
            entry = ledger.get(filed.json()["appeal_seq"])
            assert entry is not None and entry.entry.action == "appeal"
            assert entry.entry.actor == "tenant-7" and entry.entry.refers_to == 1
            assert ledger.verify().ok
    finally:
        server.stop()

"""Principals, roles and bearer tokens: hashes on disk, 401 for strangers, 403 for wrong roles."""

from __future__ import annotations

import json
import stat
import threading
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from support.decision_records import KEY, OTHER_KEY

from qabuse_dagster import settings
from qabuse_dagster.response.auth import (
    Principal,
    TokenEntry,
    TokenStore,
    add_token,
    hash_token,
    require_role,
)


def _principal(tokens: TokenStore, token: str) -> Principal:
    principal = tokens.authenticate(token)
    assert principal is not None, "the token should authenticate"
    return principal


def test_add_token_stores_only_the_hash_and_returns_the_plaintext_once(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "tokens.json"
    token = add_token("alice", ["analyst"], path=path)
    text = path.read_text()
    assert token not in text and hash_token(token) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    principal = TokenStore.load(path).authenticate(token)
    assert principal == Principal("alice", frozenset({"analyst"}))


def test_tokens_accumulate_and_each_finds_its_principal(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    gateway = add_token("envoy", ["gateway"], path=path)
    owner = add_token("owner-1", ["owner"], api_keys=[KEY], path=path)
    both = add_token("carol", ["analyst", "approver"], path=path)
    tokens = TokenStore.load(path)
    assert len(tokens) == 3
    assert _principal(tokens, gateway).name == "envoy"
    found = _principal(tokens, owner)
    assert found.owns(KEY) and not found.owns(OTHER_KEY)
    assert _principal(tokens, both).roles == {"analyst", "approver"}
    assert tokens.authenticate("not-a-token") is None
    assert tokens.authenticate("") is None and tokens.authenticate(None) is None


def test_concurrent_add_token_calls_all_land(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    made: list[str] = []
    threads = [
        threading.Thread(target=lambda i=i: made.append(add_token(f"p{i}", ["analyst"], path=path)))
        for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tokens = TokenStore.load(path)
    assert sorted(_principal(tokens, t).name for t in made) == [f"p{i}" for i in range(8)]


def test_an_owner_only_owns_keys_as_an_owner() -> None:
    assert not Principal("bob", frozenset({"analyst"}), frozenset({KEY})).owns(KEY)


def test_the_file_may_name_one_role(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    entry = {"principal": "envoy", "role": "gateway", "token_sha256": hash_token("t" * 40)}
    path.write_text(json.dumps([entry]))
    assert _principal(TokenStore.load(path), "t" * 40).roles == {"gateway"}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"principal": "x", "roles": ["root"], "token_sha256": "0" * 64}, "must be some of"),
        ({"principal": "x", "roles": ["analyst"], "token_sha256": "abc"}, "64 lowercase hex"),
        ({"principal": "x", "roles": "analyst", "token_sha256": "0" * 64}, "'roles'"),
        ({"roles": ["analyst"], "token_sha256": "0" * 64}, "'principal'"),
        ({"principal": "system", "roles": ["approver"], "token_sha256": "0" * 64}, "system"),
        (
            {"principal": "o", "roles": ["owner"], "token_sha256": "0" * 64, "api_keys": ["K"]},
            "hex key ids",
        ),
    ],
)
def test_a_bad_entry_is_refused_with_its_reason(
    tmp_path: Path, entry: dict[str, object], message: str
) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match=message):
        TokenStore.load(path)


def test_a_file_that_is_not_a_list_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="JSON list"):
        TokenStore.load(path)
    path.write_text("[")
    with pytest.raises(ValueError, match="not JSON"):
        TokenStore.load(path)


def test_a_token_listed_twice_is_refused() -> None:
    entry = TokenEntry(Principal("a", frozenset({"analyst"})), hash_token("t"))
    with pytest.raises(ValueError, match="twice"):
        TokenStore([entry, entry])


def test_a_missing_file_is_an_empty_store_from_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(settings.TOKENS_FILE_ENV, str(tmp_path / "none.json"))
    assert len(TokenStore.load()) == 0
    token = add_token("alice", ["analyst"])
    assert (tmp_path / "none.json").exists()
    assert TokenStore.load().authenticate(token) is not None


def test_an_unknown_role_cannot_be_required() -> None:
    with pytest.raises(ValueError, match="unknown role"):
        require_role(TokenStore(), "root")  # type: ignore[arg-type]  # the mistake under test


TOKENS = {
    "analyst-token-" + "a" * 20: Principal("alice", frozenset({"analyst"})),
    "owner-token-" + "o" * 20: Principal("olga", frozenset({"owner"}), frozenset({KEY})),
}


@pytest.fixture
def client() -> TestClient:
    store = TokenStore.from_plaintext(TOKENS)
    as_analyst = require_role(store, "analyst")

    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({"principal": as_analyst(request).name})

    return TestClient(Starlette(routes=[Route("/queue", endpoint)]))


def test_a_request_without_a_token_is_401_with_a_bearer_challenge(client: TestClient) -> None:
    answer = client.get("/queue")
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "header", ["Bearer nope", "Basic " + "a" * 20, "Bearer", "analyst-token-" + "a" * 20]
)
def test_an_unknown_or_malformed_token_is_401(client: TestClient, header: str) -> None:
    assert client.get("/queue", headers={"Authorization": header}).status_code == 401


def test_the_wrong_role_is_403_and_the_right_one_passes(client: TestClient) -> None:
    owner = client.get("/queue", headers={"Authorization": "Bearer owner-token-" + "o" * 20})
    assert owner.status_code == 403
    analyst = client.get("/queue", headers={"Authorization": "bearer analyst-token-" + "a" * 20})
    assert (analyst.status_code, analyst.json()) == (200, {"principal": "alice"})

"""The scoring endpoint as a real ``bentoml serve`` subprocess on 127.0.0.1."""

from __future__ import annotations

import json

import httpx
import pytest
from support.records import key_users

from models.registry import families, get_family
from qabuse_dagster import model_registry, settings
from qabuse_dagster.serving.client import ScoringError
from qabuse_dagster.serving.schemas import MAX_BATCH_KEYS, ScoreResponse
from qabuse_dagster.serving.server import scoring_server

pytestmark = pytest.mark.integration

JSON = "application/json"


@pytest.fixture(scope="module")
def client(pipeline_run):
    with pytest.MonkeyPatch.context() as patch:
        # Ask the registry about @champion every second, so promotion is testable.
        patch.setenv(settings.MODEL_REFRESH_ENV, "1")
        with scoring_server() as client:
            yield client


def test_incident_key_scores_above_every_benign_key(pipeline_run, client) -> None:
    sim = pipeline_run.simulation
    (incident_key,) = sim.incident_api_key_ids
    incident = client.score(incident_key)
    benign = [client.score(key) for key in sim.api_keys if key != incident_key]
    assert incident.anomalous
    assert incident.score > max(b.score for b in benign)
    assert sum(b.anomalous for b in benign) <= 2


def test_response_names_the_champion_every_family_and_what_drove_the_score(
    pipeline_run, client
) -> None:
    (incident_key,) = pipeline_run.simulation.incident_api_key_ids
    champion = model_registry.resolve_alias(settings.CHAMPION_ALIAS)
    response = client.score(incident_key)
    assert response.model_name == champion.name
    assert response.model_version == champion.version
    assert response.threshold == pytest.approx(champion.threshold)
    # Each family's own score and version, and the ensemble's combination of them.
    assert response.family_versions == dict(champion.members)
    assert set(response.family_scores) == set(families()) == set(response.family_standardised)
    top = max(response.family_standardised, key=response.family_standardised.__getitem__)
    assert response.top_family == top
    assert response.score <= response.family_standardised[top] + 1e-9
    # The top family's own attribution names its inputs, largest first.
    names = [c.feature for c in response.top_features]
    assert names and set(names) <= set(get_family(top).feature_names)
    contributions = [c.contribution for c in response.top_features]
    assert contributions == sorted(contributions, reverse=True)
    services = {get_family(name).feature_service for name in families()}
    assert set(response.feature_service.split(",")) == services


def test_unknown_key_is_404_with_a_reason(client) -> None:
    with pytest.raises(ScoringError) as caught:
        client.score("ab" * 32)
    assert caught.value.status == 404
    assert "no online features" in str(caught.value)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"api_key_id": "not-a-hash"}', "application/json"),
        (b'{"api_key_id": 12345678901234567890}', "application/json"),
        (b"{}", "application/json"),
        (b'{"api_key_id": ', "application/json"),
        (b"[]", "application/json"),
        (b"\xff\xfe\x00garbage", "application/json"),
        (b'{"api_key_id": "' + b"a" * 100_000 + b'"}', "application/json"),
        (b"[" * 50_000, "application/json"),
    ],
    ids=["bad-pattern", "number", "missing", "truncated", "array", "not-utf8", "huge", "deep"],
)
def test_malformed_requests_get_a_4xx_never_a_500(client, body: bytes, content_type: str) -> None:
    response = httpx.post(
        f"{client.url}/score", content=body, headers={"content-type": content_type}, timeout=30
    )
    assert 400 <= response.status_code < 500, response.text[:300]
    assert response.text  # says what is wrong


def test_server_still_scores_after_hostile_requests(pipeline_run, client) -> None:
    (incident_key,) = pipeline_run.simulation.incident_api_key_ids
    assert client.score(incident_key).anomalous


def _scored(answer: ScoreResponse) -> dict:
    """An answer less the fields that depend on the instant it was given."""
    return answer.model_dump(exclude={"feature_age_s", "batch_feature_age_s"})


def test_batch_answers_each_key_as_score_does(pipeline_run, client) -> None:
    (incident_key,) = pipeline_run.simulation.incident_api_key_ids
    unknown = "ab" * 32
    users = key_users(pipeline_run.simulation.telemetry_path)
    asked = [(key, None) for key in pipeline_run.simulation.api_keys]
    # A key with its user (the user-level family scores the user's rows), an unknown key,
    # and a key asked for twice.
    asked += [(incident_key, users[incident_key]), (unknown, None), (incident_key, None)]
    batch = client.score_batch(asked)
    known = [(key, user) for key, user in asked if key != unknown]
    assert [a.api_key_id for a in batch.answers] == [key for key, _ in known]
    assert batch.not_online == [unknown]
    for (key, user), answer in zip(known, batch.answers, strict=True):
        single = httpx.post(
            f"{client.url}/score", json={"api_key_id": key, "user": user}, timeout=30
        )
        assert _scored(answer) == _scored(ScoreResponse.model_validate(single.json())), key
    with_user = batch.answers[-2]
    assert with_user.family_scores != batch.answers[-1].family_scores  # the user's rows count


@pytest.mark.parametrize(
    ("body", "content_type", "says"),
    [
        ({"keys": [{"api_key_id": "ab" * 32}] * (MAX_BATCH_KEYS + 1)}, JSON, "at most"),
        ({"keys": []}, JSON, "at least"),
        ({"keys": [{"api_key_id": "not-a-hash"}]}, JSON, "pattern"),
        ({"keys": ["ab" * 32]}, JSON, "keys"),
        ({"api_key_id": "ab" * 32}, JSON, "keys"),
        ({"keys": [{"api_key_id": "ab" * 32}]}, "application/xml", "application/json"),
    ],
    ids=["too-many", "none", "bad-pattern", "bare-strings", "single-shape", "xml"],
)
def test_a_malformed_batch_gets_a_4xx_that_says_why(
    client, body: dict, content_type: str, says: str
) -> None:
    response = httpx.post(
        f"{client.url}/score/batch",
        content=json.dumps(body).encode(),
        headers={"content-type": content_type},
        timeout=30,
    )
    assert 400 <= response.status_code < 500, response.text[:300]
    assert says in response.text, response.text[:300]


def test_a_promotion_reaches_the_running_endpoint(pipeline_run, client) -> None:
    import time

    (incident_key,) = pipeline_run.simulation.incident_api_key_ids
    before = model_registry.resolve_alias(settings.CHAMPION_ALIAS)
    loaded = model_registry.load_champion(settings.CHAMPION_ALIAS)
    promoted, _ = model_registry.log_detector(
        loaded.ensemble,
        family=model_registry.ENSEMBLE_FAMILY,
        params={"purpose": "promotion test"},
        metrics={},
        run_name="promotion-test",
        members={name: member.ref for name, member in loaded.members.items()},
    )
    model_registry.set_alias(promoted, settings.CHAMPION_ALIAS)
    try:
        deadline = time.monotonic() + 30
        while client.score(incident_key).model_version != promoted.version:
            assert time.monotonic() < deadline, "endpoint still serves the old @champion"
            time.sleep(0.5)
    finally:
        model_registry.set_alias(before, settings.CHAMPION_ALIAS)


def test_stale_features_are_scored_and_flagged(pipeline_run, client) -> None:
    """The twin's hours lie in the past, so every pipeline vector is older than the bound."""
    from qabuse_dagster.features.store import online_vectors, open_store

    (incident_key,) = pipeline_run.simulation.incident_api_key_ids
    response = client.score(incident_key)
    (vector,) = online_vectors(open_store(), [incident_key])
    assert vector.stale and vector.age_s is not None
    # Fails open: scored as usual, flagged, with the age the store gives.
    assert response.anomalous
    assert response.stale is True
    assert response.feature_age_s is not None
    assert response.feature_age_s > settings.online_max_age_seconds()
    assert response.feature_age_s == pytest.approx(vector.age_s, abs=60)


def test_fresh_features_are_not_flagged(pipeline_run, client) -> None:
    """A key pushed online just now is fresh; its score is what its values give."""
    from datetime import UTC, datetime

    import pandas as pd

    from qabuse_dagster.features.store import open_store

    (incident_key,) = pipeline_run.simulation.incident_api_key_ids
    fresh_key = "fe" * 32
    store = open_store()
    # The key's whole api-key vector (every view: windows, sequences, campaign), copied
    # to a new key with a fresh time.
    views = [v for v in store.list_feature_views() if "api_key" in v.entities]
    refs = [f"{v.name}:{f.name}" for v in views for f in v.features]
    row = store.get_online_features(features=refs, entity_rows=[{"api_key_id": incident_key}])
    values = {name: column[0] for name, column in row.to_dict().items()}
    written = pd.DataFrame(
        [{**values, "api_key_id": fresh_key, "event_timestamp": datetime.now(UTC)}]
    )
    for view in views:
        name = view.name
        columns = ["api_key_id", "event_timestamp", *(f.name for f in view.features)]
        store.write_to_online_store(name, written[columns])
    fresh, stale = client.score(fresh_key), client.score(incident_key)
    assert fresh.stale is False
    assert fresh.feature_age_s is not None and 0 <= fresh.feature_age_s < 60
    assert fresh.features == stale.features
    assert fresh.score == pytest.approx(stale.score)
    assert stale.stale is True

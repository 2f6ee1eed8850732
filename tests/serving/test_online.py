"""The scorer's direct online read gives what Feast's ``get_online_features`` gives."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from feast.online_response import TIMESTAMP_POSTFIX

from qabuse_dagster import model_registry, settings
from qabuse_dagster.features.store import open_store
from qabuse_dagster.serving.online import OnlineInputs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def online(pipeline_run):
    store = open_store()
    champion = model_registry.load_champion(settings.CHAMPION_ALIAS)
    return store, OnlineInputs.resolve(store, champion)


def _generic(store, refs: list[str], entity: dict[str, str]) -> tuple[dict, list[int]]:
    """Values and (non-zero) event seconds through ``FeatureStore.get_online_features``."""
    response = store.get_online_features(features=refs, entity_rows=[entity]).to_dict(
        include_event_timestamps=True
    )
    names = [ref.split(":", 1)[1] for ref in refs]
    values = {name: response[name][0] for name in names}
    seconds = [
        response[f"{name}{TIMESTAMP_POSTFIX}"][0]
        for name in names
        if values[name] is not None and response[f"{name}{TIMESTAMP_POSTFIX}"][0] > 0
    ]
    return values, seconds


def test_every_key_and_user_reads_the_same_values_as_feast(pipeline_run, online) -> None:
    store, inputs = online
    sim = pipeline_run.simulation
    pairs = {}
    with sim.telemetry_path.open() as lines:
        for line in lines:
            record = json.loads(line)
            pairs.setdefault(record["api_key_id"], record["user"])
    assert inputs.user_views and inputs.key_views
    known = 0
    for key, user in pairs.items():
        read = inputs.read(store, key, user, max_age=timedelta(days=365))
        values, seconds = _generic(store, inputs.key_refs, {"api_key_id": key})
        assert read.values == values, key
        user_values, _ = _generic(store, inputs.user_refs, {"user": user})
        assert read.user_values == user_values, user
        if seconds:
            known += 1
            oldest = datetime.fromtimestamp(min(seconds), UTC)
            expected = (datetime.now(UTC) - oldest).total_seconds()
            # Feast's seconds are whole; the direct read keeps the fraction.
            assert read.age_s is not None and expected - 2 <= read.age_s <= expected + 1
        else:
            assert read.age_s is None and read.stale
    # Array features (the sequence view) and the campaign view are among those compared.
    assert known >= len(pairs) // 2
    names = {name for _, names in inputs.key_views for name in names}
    assert any(name.endswith("_last_60_min") for name in names)


def test_an_unknown_key_reads_nothing(online) -> None:
    store, inputs = online
    read = inputs.read(store, "f" * 64, "e" * 64, max_age=timedelta(minutes=5))
    assert not read.known and read.age_s is None and read.stale
    assert read.user_values is not None and set(read.user_values.values()) == {None}

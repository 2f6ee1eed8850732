"""The scorer's direct online read gives what Feast's ``get_online_features`` gives."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from feast.online_response import TIMESTAMP_POSTFIX
from support.records import key_users

from qabuse_dagster import model_registry, settings
from qabuse_dagster.features.store import open_store
from qabuse_dagster.serving.online import OnlineInputs, SqliteRows, StoreRows

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


def _refs_by_feed(inputs: OnlineInputs) -> tuple[list[str], list[str]]:
    """The key references of the views the stream worker feeds, and of the others."""
    streamed, batch = [], []
    for view, names in inputs.key_views:
        refs = streamed if view.stream_source is not None else batch
        refs.extend(f"{view.name}:{name}" for name in names)
    return streamed, batch


def _age(seconds: list[int]) -> float:
    return (datetime.now(UTC) - datetime.fromtimestamp(min(seconds), UTC)).total_seconds()


def _close(read_age: float, feast_age: float) -> bool:
    return feast_age - 2 <= read_age <= feast_age + 1


def test_every_key_and_user_reads_the_same_values_as_feast(pipeline_run, online) -> None:
    store, inputs = online
    sim = pipeline_run.simulation
    pairs = {}
    with sim.telemetry_path.open() as lines:
        for line in lines:
            record = json.loads(line)
            pairs.setdefault(record["api_key_id"], record["user"])
    assert inputs.user_views and inputs.key_views
    streamed, batch = _refs_by_feed(inputs)
    assert streamed and batch  # the windows and sequences; the campaign graph
    known = 0
    for key, user in pairs.items():
        read = inputs.read(store, key, user, max_age=timedelta(days=365))
        values, _ = _generic(store, inputs.key_refs, {"api_key_id": key})
        assert read.values == values, key
        user_values, _ = _generic(store, inputs.user_refs, {"user": user})
        assert read.user_values == user_values, user
        _, seconds = _generic(store, streamed, {"api_key_id": key})
        _, batch_seconds = _generic(store, batch, {"api_key_id": key})
        if seconds:
            known += 1
            # Feast's seconds are whole; the direct read keeps the fraction.
            assert read.age_s is not None and _close(read.age_s, _age(seconds))
        else:
            assert read.stale
        if batch_seconds:
            assert read.batch_age_s is not None and _close(read.batch_age_s, _age(batch_seconds))
    # Array features (the sequence view) and the campaign view are among those compared.
    assert known >= len(pairs) // 2
    names = {name for _, names in inputs.key_views for name in names}
    assert any(name.endswith("_last_60_min") for name in names)


def test_an_unknown_key_reads_nothing(online) -> None:
    store, inputs = online
    read = inputs.read(store, "f" * 64, "e" * 64, max_age=timedelta(minutes=5))
    assert not read.known and read.age_s is None and read.stale
    assert read.user_values is not None and set(read.user_values.values()) == {None}


def test_a_key_the_stream_keeps_current_is_fresh_however_old_its_campaign_row(online) -> None:
    """The stream worker pushes window rows as they close; only the batch job writes the
    campaign graph. A live key's features are fresh, and the graph's age is told apart."""
    import pandas as pd
    import pyarrow as pa

    from models.campaign import CAMPAIGN_FEATURES
    from qabuse_dagster.features.push import push_online

    store, inputs = online
    key = "c" * 64  # a key of this test alone
    now = datetime.now(UTC)
    window = pd.read_parquet(settings.paths().api_key_windows).tail(1)
    window["api_key_id"] = key
    window["event_timestamp"] = pd.Timestamp(now - timedelta(seconds=30))
    assert push_online(store, pa.Table.from_pandas(window, preserve_index=False)) == 1
    view, names = next((v, n) for v, n in inputs.key_views if v.stream_source is None)
    assert set(names) <= set(CAMPAIGN_FEATURES)
    graph = {name: [0.0] for name in names}
    graph.update(api_key_id=[key], event_timestamp=[pd.Timestamp(now - timedelta(days=2))])
    store.write_to_online_store(view.name, pd.DataFrame(graph))

    read = inputs.read(store, key, None, max_age=timedelta(minutes=5))
    assert read.known and not read.stale
    assert read.age_s is not None and 25 <= read.age_s <= 120
    assert read.batch_age_s is not None and read.batch_age_s >= timedelta(days=2).total_seconds()


def test_the_direct_sqlite_read_equals_feasts_own_online_read(pipeline_run, online) -> None:
    """The default store is SQLite: `SqliteRows` reads it, and gives what Feast's
    ``online_read`` of every view gives, values and event times, key by key."""
    from feast.infra.online_stores.helpers import get_online_store_from_config

    store, inputs = online
    assert isinstance(inputs.key_rows, SqliteRows) and isinstance(inputs.user_rows, SqliteRows)
    feast_store = get_online_store_from_config(store.config.online_store)
    users = sorted(set(key_users(pipeline_run.simulation.telemetry_path).values()))
    keys = [*pipeline_run.simulation.api_keys, "f" * 64]
    for rows, views, join_key, values in (
        (inputs.key_rows, inputs.key_views, "api_key_id", keys),
        (inputs.user_rows, inputs.user_views, "user", [*users, "e" * 64]),
    ):
        feast = StoreRows(views, join_key, feast_store).read(store, values)
        direct = rows.read(store, values)
        assert [v for v, _ in direct] == [v for v, _ in feast]
        assert [_named(s) for _, s in direct] == [_named(s) for _, s in feast]
        # One key at a time, and a key asked for twice, read the same.
        assert rows.read(store, values[:1] * 2) == [direct[0], direct[0]]


def test_read_many_reads_each_key_as_read_does(pipeline_run, online) -> None:
    store, inputs = online
    users = key_users(pipeline_run.simulation.telemetry_path)
    keys = list(pipeline_run.simulation.api_keys)[:6]
    # With and without a user, a key twice, an unknown key with an unknown user.
    pairs = [(key, users[key]) for key in keys] + [(key, None) for key in keys[:3]]
    pairs += [("f" * 64, "e" * 64)]
    many = inputs.read_many(store, pairs, max_age=timedelta(days=365))
    for (key, user), read in zip(pairs, many, strict=True):
        one = inputs.read(store, key, user, max_age=timedelta(days=365))
        assert read.values == one.values and read.user_values == one.user_values
        assert read.stale == one.stale
        for age, again in ((read.age_s, one.age_s), (read.batch_age_s, one.batch_age_s)):
            assert (age is None) == (again is None)
            assert age is None or again is None or abs(age - again) < 5


def _named(stamps: list) -> list:
    return [(view.name, at) for view, at in stamps]

"""The applied repository, and online reads with their event time.

The rows are materialised into the embedded SQLite online store with chosen event times;
``now`` is passed explicitly, so every age is exact. A stale vector is reported stale,
never as fresh.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest

from qabuse_dagster import settings
from qabuse_dagster.features.definitions import (
    DETECTOR_FEATURES,
    FEATURE_NAMES,
    FEATURES_BY_NAME,
    FEATURES_BY_WINDOW,
    SEQUENCE_COLUMNS,
    SEQUENCE_MINUTES,
)
from qabuse_dagster.features.store import (
    FEATURE_SERVICE,
    SEQUENCE_FEATURE_SERVICE,
    USER_FEATURE_SERVICE,
    entity_views,
    historical_features,
    online_features,
    online_vectors,
)

pytestmark = pytest.mark.integration


def test_fresh_and_stale_keys_at_write_time(seeded_sqlite) -> None:
    fresh, stale = online_vectors(
        seeded_sqlite.store,
        [seeded_sqlite.fresh_key, seeded_sqlite.stale_key],
        max_age=timedelta(minutes=5),
        now=seeded_sqlite.written_at,
    )
    assert fresh.values == seeded_sqlite.detector_values(seeded_sqlite.fresh_key)
    assert fresh.event_timestamp == seeded_sqlite.event_times[seeded_sqlite.fresh_key]
    assert (fresh.age_s, fresh.stale) == (30.0, False)
    assert stale.values == seeded_sqlite.detector_values(seeded_sqlite.stale_key)
    assert stale.event_timestamp == seeded_sqlite.event_times[seeded_sqlite.stale_key]
    assert (stale.age_s, stale.stale) == (3600.0, True)


def test_a_fresh_vector_turns_stale_as_time_passes(seeded_sqlite) -> None:
    later = seeded_sqlite.written_at + timedelta(minutes=10)
    (vector,) = online_vectors(
        seeded_sqlite.store, [seeded_sqlite.fresh_key], max_age=timedelta(minutes=5), now=later
    )
    assert vector.age_s == 630.0 and vector.stale
    # Same values: staleness is reported beside them, it does not hide them.
    assert vector.values == seeded_sqlite.detector_values(seeded_sqlite.fresh_key)


@pytest.mark.parametrize(("max_age_s", "stale"), [(29, True), (30, False), (31, False)])
def test_the_bound_is_inclusive(seeded_sqlite, max_age_s: int, stale: bool) -> None:
    (vector,) = online_vectors(
        seeded_sqlite.store,
        [seeded_sqlite.fresh_key],
        max_age=timedelta(seconds=max_age_s),
        now=seeded_sqlite.written_at,
    )
    assert vector.stale is stale


def test_default_bound_comes_from_settings(seeded_sqlite, monkeypatch: pytest.MonkeyPatch) -> None:
    now = seeded_sqlite.written_at
    monkeypatch.delenv(settings.ONLINE_MAX_AGE_ENV, raising=False)
    assert settings.online_max_age_seconds() == 300
    (vector,) = online_vectors(seeded_sqlite.store, [seeded_sqlite.fresh_key], now=now)
    assert not vector.stale
    monkeypatch.setenv(settings.ONLINE_MAX_AGE_ENV, "10")
    (vector,) = online_vectors(seeded_sqlite.store, [seeded_sqlite.fresh_key], now=now)
    assert vector.stale


def test_unknown_key_has_no_time_and_is_never_fresh(seeded_sqlite) -> None:
    now = seeded_sqlite.written_at
    (vector,) = online_vectors(
        seeded_sqlite.store, [seeded_sqlite.unknown_key], max_age=timedelta(days=365), now=now
    )
    assert set(vector.values.values()) == {None}
    assert vector.event_timestamp is None and vector.age_s is None and vector.stale


def test_vectors_agree_with_the_plain_online_read(seeded_sqlite) -> None:
    keys = [seeded_sqlite.fresh_key, seeded_sqlite.stale_key, seeded_sqlite.unknown_key]
    plain = online_features(seeded_sqlite.store, keys)
    timed = online_vectors(seeded_sqlite.store, keys)
    for key, row, vector in zip(keys, plain, timed, strict=True):
        assert {k: v for k, v in row.items() if k != "api_key_id"} == vector.values
        assert vector.key == key


def test_apply_registers_this_homes_paths(seeded_sqlite) -> None:
    """Each apply imports the repo modules afresh, so an earlier home never leaks in."""
    source = seeded_sqlite.store.get_data_source("api_key_windows_source")
    assert Path(source.path).is_relative_to(seeded_sqlite.home)


def _service_features(store, name: str) -> list[str]:  # type: ignore[no-untyped-def]
    service = store.get_feature_service(name)
    return [f.name for p in service.feature_view_projections for f in p.features]


def test_the_registry_holds_a_view_per_entity_and_window(seeded_sqlite) -> None:
    from feast.types import Array, Float64, Int64

    store = seeded_sqlite.store
    views = {view.name: view for view in store.list_feature_views()}
    assert set(views) == {
        f"{entity}_{window}" for entity in ("api_key", "user") for window in ("1m", "5m", "1h")
    } | {"api_key_sequence", "api_key_campaign"}
    assert entity_views(store, "user") == ["user_1h", "user_1m", "user_5m"]
    assert entity_views(store, "api_key") == ["api_key_1h", "api_key_1m", "api_key_5m"]
    assert "api_key_sequence" in entity_views(store, "api_key", sequences=True)
    sequence_view = views.pop("api_key_sequence")
    assert [f.name for f in sequence_view.features] == list(SEQUENCE_COLUMNS.values())
    assert {f.dtype for f in sequence_view.features} == {Array(Int64)}
    assert sequence_view.batch_source.name == "api_key_sequence_source"
    campaign_view = views.pop("api_key_campaign")
    assert campaign_view.tags["kind"] == "campaign"
    assert campaign_view.batch_source.name == "api_key_campaign_source"
    for name, view in views.items():
        entity, window = name.rsplit("_", 1)
        assert view.entities == [entity]
        assert [f.name for f in view.features] == list(FEATURES_BY_WINDOW[window])
        for field in view.features:
            spec = FEATURES_BY_NAME[field.name]
            assert field.dtype == (Int64 if spec.integer else Float64), field.name
            assert field.description == f"{spec.description} Unit: {spec.unit}."
        assert view.batch_source.name == f"{entity}_windows_source"
    assert store.get_entity("user").join_key == "user"
    assert store.get_entity("api_key").join_key == "api_key_id"


def test_each_service_reads_exactly_its_models_features(seeded_sqlite) -> None:
    store = seeded_sqlite.store
    from models.registry import families

    # One service per detector family (exactly its inputs), besides the older ones.
    assert {s.name for s in store.list_feature_services()} == {
        "api_key_detector_v1",
        "api_key_features_v2",
        "user_features_v1",
        *(family.feature_service for family in families().values()),
    }
    for family in families().values():
        if family.input_kind == "rows":
            served = _service_features(store, family.feature_service)
            assert sorted(served) == sorted(family.feature_names), family.name
    # The deployed detector's inputs, in its order, whatever the views hold besides.
    assert tuple(_service_features(store, FEATURE_SERVICE)) == DETECTOR_FEATURES
    assert tuple(_service_features(store, "api_key_features_v2")) == FEATURE_NAMES
    assert tuple(_service_features(store, USER_FEATURE_SERVICE)) == FEATURE_NAMES
    user_views = {
        p.name for p in store.get_feature_service(USER_FEATURE_SERVICE).feature_view_projections
    }
    assert user_views == {"user_1m", "user_5m", "user_1h"}


def test_a_users_row_round_trips_offline_to_online(seeded_sqlite) -> None:
    user = seeded_sqlite.user
    written = seeded_sqlite.values[user]
    at = seeded_sqlite.event_times[user]
    offline = historical_features(
        seeded_sqlite.store,
        pd.DataFrame({"user": [user], "event_timestamp": [at]}),
        USER_FEATURE_SERVICE,
    )
    assert {name: offline.loc[0, name] for name in FEATURE_NAMES} == written
    (online,) = online_features(
        seeded_sqlite.store, [user], USER_FEATURE_SERVICE, entity_column="user"
    )
    assert online == {"user": user, **written}
    (vector, unknown) = online_vectors(
        seeded_sqlite.store,
        [user, seeded_sqlite.fresh_key],
        USER_FEATURE_SERVICE,
        entity_column="user",
        max_age=timedelta(minutes=5),
        now=seeded_sqlite.written_at,
    )
    assert vector.values == written and vector.event_timestamp == at
    assert (vector.age_s, vector.stale) == (45.0, False)
    # An api key is no user: the user views have nothing for it.
    assert unknown.event_timestamp is None and set(unknown.values.values()) == {None}


def test_sequences_round_trip_offline_to_online_as_arrays(seeded_sqlite) -> None:
    store, key = seeded_sqlite.store, seeded_sqlite.fresh_key
    written = seeded_sqlite.sequences[key]
    assert tuple(_service_features(store, SEQUENCE_FEATURE_SERVICE)) == tuple(
        SEQUENCE_COLUMNS.values()
    )
    fresh, unknown = online_features(
        store, [key, seeded_sqlite.unknown_key], SEQUENCE_FEATURE_SERVICE
    )
    assert fresh == {"api_key_id": key, **written}
    assert all(len(v) == SEQUENCE_MINUTES for v in written.values())
    assert set(unknown.values()) - {seeded_sqlite.unknown_key} == {None}
    offline = historical_features(
        store,
        pd.DataFrame({"api_key_id": [key], "event_timestamp": [seeded_sqlite.event_times[key]]}),
        SEQUENCE_FEATURE_SERVICE,
    )
    assert {c: list(offline.loc[0, c]) for c in SEQUENCE_COLUMNS.values()} == written


def test_materialising_never_writes_an_older_row_over_a_pushed_one(
    seeded_sqlite, assert_materialise_keeps_newer_online_rows
) -> None:
    assert_materialise_keeps_newer_online_rows(seeded_sqlite)

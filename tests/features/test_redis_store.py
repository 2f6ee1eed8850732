"""The Redis online store against a real ``redis-server`` on 127.0.0.1.

Skipped where ``redis-server`` is missing, except under CI (``CI`` set), which installs
it (``.ci/run``) and fails the test without it.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from qabuse_dagster import settings
from qabuse_dagster.features.store import feature_store_yaml, online_features, online_vectors

pytestmark = pytest.mark.integration


def test_the_store_really_is_redis(seeded_redis) -> None:
    import redis

    assert seeded_redis.store.config.online_store.type == "redis"
    assert seeded_redis.store.config.online_store.connection_string == seeded_redis.redis
    assert not (seeded_redis.home / "feast" / "online_store.db").exists()
    host, port = (seeded_redis.redis or "").rsplit(":", 1)
    with redis.Redis(host=host, port=int(port)) as client:
        # One hash per seeded entity key (two api keys, one user), holding its three views.
        assert client.dbsize() == 3


def test_materialised_rows_read_back_exactly(seeded_redis) -> None:
    rows = online_features(
        seeded_redis.store,
        [seeded_redis.fresh_key, seeded_redis.stale_key, seeded_redis.unknown_key],
    )
    for row, key in zip(rows, [seeded_redis.fresh_key, seeded_redis.stale_key], strict=False):
        assert row["api_key_id"] == key
        assert {k: v for k, v in row.items() if k != "api_key_id"} == seeded_redis.detector_values(
            key
        )
    assert all(v is None for k, v in rows[2].items() if k != "api_key_id")


def test_vectors_carry_their_event_time_and_staleness(seeded_redis) -> None:
    fresh, stale, unknown = online_vectors(
        seeded_redis.store,
        [seeded_redis.fresh_key, seeded_redis.stale_key, seeded_redis.unknown_key],
        max_age=timedelta(minutes=5),
        now=seeded_redis.written_at,
    )
    assert fresh.values == seeded_redis.detector_values(seeded_redis.fresh_key)
    assert fresh.event_timestamp == seeded_redis.event_times[seeded_redis.fresh_key]
    assert fresh.age_s == 30.0 and not fresh.stale
    assert stale.values == seeded_redis.detector_values(seeded_redis.stale_key)
    assert stale.age_s == 3600.0 and stale.stale
    assert unknown.event_timestamp is None and unknown.age_s is None and unknown.stale


def test_a_users_row_reads_back_from_redis(seeded_redis) -> None:
    from qabuse_dagster.features.store import USER_FEATURE_SERVICE

    (row,) = online_features(
        seeded_redis.store, [seeded_redis.user], USER_FEATURE_SERVICE, entity_column="user"
    )
    assert row == {"user": seeded_redis.user, **seeded_redis.values[seeded_redis.user]}


def test_open_store_follows_the_online_store_setting(
    seeded_redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qabuse_dagster.features.store import open_store

    monkeypatch.setenv(settings.HOME_ENV, str(seeded_redis.home))
    monkeypatch.setenv(settings.ONLINE_STORE_ENV, "redis")
    monkeypatch.setenv(settings.REDIS_ENV, seeded_redis.redis or "")
    store = open_store()
    assert store.config.online_store.type == "redis"
    (row,) = online_features(store, [seeded_redis.fresh_key])
    assert row["submissions_1m"] == seeded_redis.values[seeded_redis.fresh_key]["submissions_1m"]


def test_the_default_stays_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(settings.ONLINE_STORE_ENV, raising=False)
    repo = settings.feature_repo_dir()
    assert feature_store_yaml(repo) == repo / "feature_store.yaml"
    assert feature_store_yaml(repo, "redis") == repo / "feature_store.redis.yaml"
    monkeypatch.setenv(settings.ONLINE_STORE_ENV, "cassandra")
    with pytest.raises(ValueError, match=settings.ONLINE_STORE_ENV):
        feature_store_yaml(repo)


def test_the_scorers_direct_read_matches_feast_on_redis(seeded_redis) -> None:
    from types import SimpleNamespace

    from models.registry import families
    from qabuse_dagster.serving.online import OnlineInputs

    store = seeded_redis.store
    inputs = OnlineInputs.resolve(store, SimpleNamespace(members=list(families())))
    keys = [seeded_redis.fresh_key, seeded_redis.stale_key, seeded_redis.unknown_key]
    for key in keys:
        read = inputs.read(store, key, seeded_redis.user, max_age=timedelta(minutes=5))
        generic = store.get_online_features(
            features=inputs.key_refs, entity_rows=[{"api_key_id": key}]
        ).to_dict()
        assert read.values == {
            ref.split(":", 1)[1]: generic[ref.split(":", 1)[1]][0] for ref in inputs.key_refs
        }
        user = store.get_online_features(
            features=inputs.user_refs, entity_rows=[{"user": seeded_redis.user}]
        ).to_dict()
        assert read.user_values == {
            ref.split(":", 1)[1]: user[ref.split(":", 1)[1]][0] for ref in inputs.user_refs
        }
    fresh = inputs.read(store, keys[0], None, max_age=timedelta(minutes=5))
    assert fresh.known and fresh.values[next(iter(seeded_redis.sequences[keys[0]]))] == list(
        next(iter(seeded_redis.sequences[keys[0]].values()))
    )
    assert not inputs.read(store, keys[2], None, max_age=timedelta(minutes=5)).known


def test_materialising_never_writes_an_older_row_over_a_pushed_one(
    seeded_redis, assert_materialise_keeps_newer_online_rows
) -> None:
    assert_materialise_keeps_newer_online_rows(seeded_redis)

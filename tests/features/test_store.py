"""Online reads with their event time: a stale vector is reported stale, never as fresh.

The rows are materialised into the embedded SQLite online store with chosen event times;
``now`` is passed explicitly, so every age is exact.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from qabuse_dagster import settings
from qabuse_dagster.features.store import online_features, online_vectors

pytestmark = pytest.mark.integration


def test_fresh_and_stale_keys_at_write_time(seeded_sqlite) -> None:
    fresh, stale = online_vectors(
        seeded_sqlite.store,
        [seeded_sqlite.fresh_key, seeded_sqlite.stale_key],
        max_age=timedelta(minutes=5),
        now=seeded_sqlite.written_at,
    )
    assert fresh.values == seeded_sqlite.values[seeded_sqlite.fresh_key]
    assert fresh.event_timestamp == seeded_sqlite.event_times[seeded_sqlite.fresh_key]
    assert (fresh.age_s, fresh.stale) == (30.0, False)
    assert stale.values == seeded_sqlite.values[seeded_sqlite.stale_key]
    assert stale.event_timestamp == seeded_sqlite.event_times[seeded_sqlite.stale_key]
    assert (stale.age_s, stale.stale) == (3600.0, True)


def test_a_fresh_vector_turns_stale_as_time_passes(seeded_sqlite) -> None:
    later = seeded_sqlite.written_at + timedelta(minutes=10)
    (vector,) = online_vectors(
        seeded_sqlite.store, [seeded_sqlite.fresh_key], max_age=timedelta(minutes=5), now=later
    )
    assert vector.age_s == 630.0 and vector.stale
    # Same values: staleness is reported beside them, it does not hide them.
    assert vector.values == seeded_sqlite.values[seeded_sqlite.fresh_key]


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
    for row, vector in zip(plain, timed, strict=True):
        assert {k: v for k, v in row.items() if k != "api_key_id"} == vector.values


def test_apply_registers_this_homes_paths(seeded_sqlite) -> None:
    """Each apply imports the repo modules afresh, so an earlier home never leaks in."""
    source = seeded_sqlite.store.get_data_source("api_key_windows_source")
    assert Path(source.path).is_relative_to(seeded_sqlite.home)

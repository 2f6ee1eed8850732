"""Campaign detector: group features from telemetry, the score's ordering, the contract."""

from __future__ import annotations

import hashlib
import inspect
import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.base import BaseDetector
from models.campaign import (
    CAMPAIGN_FEATURES,
    CampaignDetector,
    campaign_features,
    load_campaign,
    save_campaign,
)
from models.registry import get_family

T0 = pd.Timestamp("2026-03-02", tz="UTC")
HISTORY = timedelta(days=4)  # longer than the default new_key_age, so new keys are known new
START = T0 + HISTORY
END = START + timedelta(hours=3)


def _hex(tag: str, i: int) -> str:
    return hashlib.sha256(f"{tag}/{i}".encode()).hexdigest()


def _jobs(
    key: str, user: str, network: str | None, times: pd.DatetimeIndex, code: str
) -> pd.DataFrame:
    n = len(times)
    return pd.DataFrame(
        {
            "job_id": [f"{key[:8]}-{i}" for i in range(n)],
            "api_key_id": key,
            "user": user,
            "timestamp": times,
            "status": "submitted",
            "code_hash": code,
            "source_ip_hash": network,
            "client_agent": "qabuse-qiskit/0.1 qiskit/2.6.1",
            "backend": "ibm_torino",
            "shots": 1024,
        }
    )


def _background(rng: np.random.Generator, n_keys: int = 12) -> list[pd.DataFrame]:
    """Established independent keys: random submissions from the start of the history."""
    frames = []
    span = (END - T0).total_seconds()
    for i in range(n_keys):
        seconds = np.sort(rng.uniform(0, span, size=int(span / 60 * rng.uniform(0.3, 1.0))))
        frames.append(
            _jobs(
                _hex("bg", i),
                _hex("bgu", i),
                _hex("bgn", i),
                pd.DatetimeIndex(T0 + pd.to_timedelta(seconds, unit="s")),
                _hex("bgc", i),
            )
        )
    return frames


def _botnet(rng: np.random.Generator, n_bots: int = 20) -> list[pd.DataFrame]:
    """Fresh keys, each on its own network, firing together every 5 minutes (2 s jitter)."""
    waves = START - timedelta(hours=1) + pd.to_timedelta(np.arange(0, 4 * 3600, 300), unit="s")
    return [
        _jobs(
            _hex("bot", b),
            _hex("botu", b),
            _hex("botn", b),
            pd.DatetimeIndex(waves + pd.to_timedelta(rng.uniform(0, 2, len(waves)), unit="s")),
            _hex("botc", 0),
        )
        for b in range(n_bots)
    ]


def _classroom(rng: np.random.Generator, n_students: int = 30) -> list[pd.DataFrame]:
    """New student keys, one campus network, one notebook, independent in one 2 h lesson."""
    lesson = START + timedelta(minutes=20)
    frames = []
    for s in range(n_students):
        join = rng.uniform(0, 600)
        seconds = np.sort(rng.uniform(join, 7200, size=int(rng.uniform(0.3, 1.2) * 120)))
        frames.append(
            _jobs(
                _hex("stu", s),
                _hex("stuu", s),
                _hex("campus", 0),
                pd.DatetimeIndex(lesson + pd.to_timedelta(seconds, unit="s")),
                _hex("notebook", 0),
            )
        )
    return frames


def _farm(rng: np.random.Generator, n_accounts: int = 10) -> list[pd.DataFrame]:
    """New accounts from their own networks, each ~190 jobs a day spread over the clock."""
    born = START - timedelta(hours=20)
    frames = []
    for a in range(n_accounts):
        seconds = np.sort(rng.uniform(0, 24 * 3600, size=190))
        frames.append(
            _jobs(
                _hex("farm", a),
                _hex("farmu", a),
                _hex("farmn", a),
                pd.DatetimeIndex(born + pd.to_timedelta(seconds, unit="s")),
                _hex("farmc", a),
            )
        )
    return frames


def _records(*parts: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for part in parts for f in part]
    return pd.concat(frames, ignore_index=True).sort_values("timestamp", ignore_index=True)


@pytest.fixture(scope="module")
def scenario() -> dict[str, object]:
    rng = np.random.default_rng(7)
    bots, students, farm, background = _botnet(rng), _classroom(rng), _farm(rng), _background(rng)
    records = _records(bots, students, farm, background)
    features = campaign_features(records, START, END)
    kinds = {
        **{f["api_key_id"].iat[0]: "botnet" for f in bots},
        **{f["api_key_id"].iat[0]: "classroom" for f in students},
        **{f["api_key_id"].iat[0]: "farm" for f in farm},
        **{f["api_key_id"].iat[0]: "background" for f in background},
    }
    features["kind"] = features["api_key_id"].map(kinds)
    return {"records": records, "features": features}


def _x(features: pd.DataFrame) -> np.ndarray:
    return features[list(CAMPAIGN_FEATURES)].to_numpy(dtype=float)


def test_feature_frame_shape(scenario: dict[str, object]) -> None:
    features = scenario["features"]
    assert isinstance(features, pd.DataFrame)
    assert list(features.columns[:2]) == ["api_key_id", "event_timestamp"]
    assert tuple(features.columns[2:-1]) == CAMPAIGN_FEATURES
    assert features["event_timestamp"].min() >= START
    assert features["event_timestamp"].max() < END
    assert np.isfinite(_x(features)).all()
    assert features["kind"].notna().all()


def test_lockstep_fresh_keys_form_one_group(scenario: dict[str, object]) -> None:
    features = scenario["features"]
    assert isinstance(features, pd.DataFrame)
    bots = features[features["kind"] == "botnet"]
    assert (bots["group_keys_1h"] >= 18).mean() >= 0.9
    assert (bots["sync_lift_1h"] >= 4.0).mean() >= 0.9
    assert (bots["group_networks_1h"] >= 18).mean() >= 0.9
    assert (bots["group_new_share_1h"] == 1.0).mean() >= 0.9


def test_isolated_keys_have_zero_features(scenario: dict[str, object]) -> None:
    features = scenario["features"]
    assert isinstance(features, pd.DataFrame)
    background = features[features["kind"] == "background"]
    assert len(background) > 0
    assert (_x(background) == 0.0).all(axis=1).mean() >= 0.95


def test_classroom_is_not_lockstep(scenario: dict[str, object]) -> None:
    features = scenario["features"]
    assert isinstance(features, pd.DataFrame)
    students = features[features["kind"] == "classroom"]
    assert len(students) > 0
    assert (students["sync_lift_1h"] >= 4.0).mean() <= 0.05


def test_farm_cohort_grouped_in_long_view(scenario: dict[str, object]) -> None:
    features = scenario["features"]
    assert isinstance(features, pd.DataFrame)
    farm = features[features["kind"] == "farm"]
    assert (farm["group_keys_24h"] >= 8).mean() >= 0.9
    assert (farm["volume_similarity_24h"] >= 0.8).mean() >= 0.9
    assert (farm["group_networks_24h"] >= 8).mean() >= 0.9
    # Independently timed: no lockstep.
    assert (farm["sync_lift_1h"] >= 4.0).mean() <= 0.05


def test_scores_rank_coordination_above_benign(scenario: dict[str, object]) -> None:
    features = scenario["features"]
    assert isinstance(features, pd.DataFrame)
    detector = CampaignDetector().fit(_x(features))
    features = features.assign(score=detector.decision_function(_x(features)))
    best = features.groupby("kind")["score"].quantile(0.9)
    benign = max(best["classroom"], best["background"])
    assert best["botnet"] > 2 * benign
    assert best["farm"] > 2 * benign
    assert features.loc[features["kind"] == "botnet", "score"].median() > benign


def test_job_log_gives_the_same_groups(scenario: dict[str, object]) -> None:
    records = scenario["records"]
    assert isinstance(records, pd.DataFrame)
    stream = pd.concat(
        [
            records,
            records.assign(
                status="completed", timestamp=records["timestamp"] + pd.Timedelta(seconds=90)
            ),
        ],
        ignore_index=True,
    ).sample(frac=1.0, random_state=0)
    from_stream = campaign_features(stream, START, END)
    from_log = campaign_features(records.assign(status="completed"), START, END)
    pd.testing.assert_frame_equal(from_stream, from_log)


def test_history_only_feeds_newness() -> None:
    rng = np.random.default_rng(3)
    records = _records(_botnet(rng))
    # Without history before the bots' first job, they cannot be told new.
    features = campaign_features(records, START, END)
    assert (features["group_keys_1h"] >= 18).mean() >= 0.9
    assert (features["group_new_share_1h"] == 0.0).all()


def test_sklearn_contract_and_explain(scenario: dict[str, object]) -> None:
    features = scenario["features"]
    assert isinstance(features, pd.DataFrame)
    params = {
        "chance_lift": 1.5,
        "full_lift": 5.0,
        "similarity_floor": 0.4,
        "similarity_full": 0.95,
        "origin_floor": 0.1,
        "newness_floor": 0.5,
        "reference_quantile": 0.9,
        "threshold_strategy": None,
    }
    detector = CampaignDetector(**params)
    assert isinstance(detector, BaseDetector)
    assert detector.get_params() == params
    assert set(inspect.signature(CampaignDetector).parameters) == set(params)
    X = _x(features)
    assert detector.fit(X) is detector
    assert detector.n_features_in_ == len(CAMPAIGN_FEATURES)
    assert np.isfinite(detector.threshold_)
    assert set(np.unique(detector.predict(X))) <= {0, 1}

    rows = X[np.argsort(detector.decision_function(X))[-5:]]
    contributions = detector.explain(rows)
    assert contributions.shape == rows.shape
    np.testing.assert_allclose(contributions.sum(axis=1), detector.decision_function(rows))
    # Group size and synchrony or similarity drive a campaign's score.
    top = np.argmax(contributions, axis=1)
    assert all(CAMPAIGN_FEATURES[i].startswith(("group_keys", "sync", "volume")) for i in top)
    with pytest.raises(ValueError, match="campaign features"):
        CampaignDetector().fit(X[:, :3])


def test_save_load_roundtrip_without_pickle(scenario: dict[str, object], tmp_path: Path) -> None:
    features = scenario["features"]
    assert isinstance(features, pd.DataFrame)
    X = _x(features)
    detector = CampaignDetector(full_lift=6.0).fit(X)
    family = get_family("campaign")
    assert family.detector is CampaignDetector
    assert family.feature_names == CAMPAIGN_FEATURES
    family.save(detector, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"detector.json"}
    json.loads((tmp_path / "detector.json").read_text())
    loaded = family.load(tmp_path)
    np.testing.assert_array_equal(loaded.decision_function(X), detector.decision_function(X))
    assert loaded.threshold_ == detector.threshold_
    assert loaded.get_params() == detector.get_params()
    save_campaign(detector, tmp_path / "again")
    assert load_campaign(tmp_path / "again").threshold_ == detector.threshold_


def test_malformed_input_names_the_column(scenario: dict[str, object]) -> None:
    records = scenario["records"]
    assert isinstance(records, pd.DataFrame)
    with pytest.raises(ValueError, match="source_ip_hash"):
        campaign_features(records.drop(columns=["source_ip_hash"]), START, END)
    naive = records.assign(timestamp=records["timestamp"].dt.tz_localize(None))
    with pytest.raises(ValueError, match="timestamp"):
        campaign_features(naive, START, END)
    with pytest.raises(ValueError, match="start"):
        campaign_features(records, START.tz_localize(None), END)
    with pytest.raises(ValueError, match="api_key_id"):
        campaign_features(records.assign(api_key_id=None), START, END)


def test_empty_window_gives_no_rows(scenario: dict[str, object]) -> None:
    records = scenario["records"]
    assert isinstance(records, pd.DataFrame)
    later = END + timedelta(days=30)
    features = campaign_features(records, later, later + timedelta(hours=1))
    assert features.empty
    assert tuple(features.columns[2:]) == CAMPAIGN_FEATURES


# --- the births view: a botnet's first wave, before any lockstep can repeat -------------

BURST = START + timedelta(minutes=30, seconds=10)


def _newborns(
    tag: str, n: int, first: np.ndarray, networks: int, rng: np.random.Generator
) -> list[pd.DataFrame]:
    """``n`` never-seen keys, first submitting at ``first`` (s after BURST), then every few
    minutes; ``networks`` distinct source networks between them."""
    frames = []
    for i in range(n):
        later = first[i] + np.cumsum(rng.uniform(120, 400, size=5))
        seconds = np.concatenate([[first[i]], later])
        frames.append(
            _jobs(
                _hex(tag, i),
                _hex(f"{tag}u", i),
                _hex(f"{tag}n", i % networks),
                pd.DatetimeIndex(BURST + pd.to_timedelta(seconds, unit="s")),
                _hex(f"{tag}c", 0),
            )
        )
    return frames


@pytest.fixture(scope="module")
def births() -> dict[str, object]:
    rng = np.random.default_rng(11)
    wave = _newborns("wave", 25, rng.uniform(0, 2, 25), networks=25, rng=rng)
    # Classes signing up one after another over ten minutes, a quarter of an hour
    # later: on campus, and remote (each student on a home network).
    signups = 900 + np.sort(rng.uniform(0, 600, 30))
    campus = _newborns("campus", 30, signups, networks=1, rng=rng)
    remote = _newborns("remote", 30, signups + 1800, networks=30, rng=rng)
    records = _records(wave, campus, remote, _background(rng))
    features = campaign_features(records, START, END)
    kinds = {
        **{f["api_key_id"].iat[0]: "wave" for f in wave},
        **{f["api_key_id"].iat[0]: "campus" for f in campus},
        **{f["api_key_id"].iat[0]: "remote" for f in remote},
    }
    features["kind"] = features["api_key_id"].map(kinds).fillna("background")
    return {"records": records, "features": features}


def test_a_burst_of_births_is_grouped_at_the_next_minute(births: dict[str, object]) -> None:
    features = births["features"]
    assert isinstance(features, pd.DataFrame)
    wave = features[features["kind"] == "wave"]
    next_minute = BURST.ceil("min")
    first = wave[wave["event_timestamp"] == next_minute]
    # Every key of the wave has a row at the first instant after its first job ...
    assert first["api_key_id"].nunique() == 25
    assert (first["group_keys_births"] == 25).all()
    assert (first["sync_share_births"] == 1.0).all()
    assert (first["group_networks_births"] == 25).all()
    assert (first["group_new_share_births"] == 1.0).all()
    # ... far more births within seconds than the birth rate puts there,
    assert (first["sync_lift_births"] > 100).all()
    # ... while lockstep, which needs repeated co-activity, cannot see one wave yet.
    assert (first["sync_lift_1h"] == 0.0).all()
    # The view holds the group for an hour after the births, then lets go.
    late = wave[wave["event_timestamp"] >= BURST + timedelta(hours=1, minutes=1)]
    assert (late["group_keys_births"] == 0).all()


def test_sign_ups_spread_over_minutes_are_not_a_burst(births: dict[str, object]) -> None:
    features = births["features"]
    assert isinstance(features, pd.DataFrame)
    for kind in ("campus", "remote"):
        rows = features[features["kind"] == kind]
        assert len(rows) > 0
        # The class's own sign-up pace explains its chains of births.
        assert (rows["group_keys_births"] == 0).all(), kind
    background = features[features["kind"] == "background"]
    assert (background["group_keys_births"] == 0).all()  # established keys are not born


def test_a_burst_of_births_outscores_a_class_signing_up(births: dict[str, object]) -> None:
    features = births["features"]
    assert isinstance(features, pd.DataFrame)
    X = _x(features)
    detector = CampaignDetector().fit(X)
    features = features.assign(score=detector.decision_function(X))
    top = features.groupby("kind")["score"].max()
    assert top["wave"] >= 1.0 > max(top["campus"], top["remote"], top["background"])
    assert detector.predict(_x(features[features["kind"] != "wave"])).sum() == 0
    wave = features[
        (features["kind"] == "wave") & (features["event_timestamp"] < START + timedelta(hours=1))
    ]
    contributions = detector.explain(_x(wave.head(3)))
    named = {CAMPAIGN_FEATURES[i] for i in np.argmax(contributions, axis=1)}
    assert all(name.endswith("_births") for name in named)


def test_keys_first_seen_early_in_the_history_are_not_born() -> None:
    rng = np.random.default_rng(5)
    # The history starts with the wave: nothing says these keys are new.
    early = START - timedelta(days=3, hours=23)
    wave = [
        f.assign(timestamp=f["timestamp"] - (BURST - early))
        for f in _newborns("early", 20, rng.uniform(0, 2, 20), networks=20, rng=rng)
    ]
    records = _records(wave, _background(rng))
    features = campaign_features(records, early, early + timedelta(hours=2))
    assert len(features) > 0
    assert (features["group_keys_births"] == 0).all()

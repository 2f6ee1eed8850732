"""The reference tutorial's baseline: its pipeline, and the detector contract it shares."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models import BaseDetector, TutorialBaselineDetector
from models.baseline import BASELINE_FEATURES

T0 = pd.Timestamp("2026-03-02", tz="UTC")


def _telemetry(seed: int = 0, hours: int = 10, users: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frames = []
    for u in range(users):
        seconds = np.sort(rng.uniform(0, hours * 3600, size=hours * 60 * (u + 1)))
        frames.append(
            pd.DataFrame(
                {
                    "user": f"{u:016x}",
                    "timestamp": T0 + pd.to_timedelta(seconds, unit="s"),
                    "status": rng.choice(["submitted", "completed"], size=len(seconds)),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _burst(user: str, at: pd.Timestamp, n: int = 200) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user": user,
            "timestamp": at + pd.to_timedelta(np.arange(n) * 60 / n, unit="s"),
            "status": "submitted",
        }
    )


def test_tutorial_parameters_and_base_contract() -> None:
    det = TutorialBaselineDetector()
    assert isinstance(det, BaseDetector)
    assert (det.n_estimators, det.contamination) == (100, 0.01)
    fitted = det.fit_frame(_telemetry())
    assert fitted is det
    assert det.n_features_in_ == len(BASELINE_FEATURES)
    assert det.estimator_.n_estimators == 100
    assert np.isfinite(det.threshold_)


def test_threshold_is_99th_percentile_of_training_scores() -> None:
    history = _telemetry()
    det = TutorialBaselineDetector(random_state=1).fit_frame(history)
    train_scores = det.score_frame(history)["score"]
    assert det.threshold_ == pytest.approx(float(np.quantile(train_scores, 0.99)))
    assert 0.0 < (train_scores > det.threshold_).mean() <= 0.02


def test_burst_scores_higher_and_alerts() -> None:
    history = _telemetry()
    det = TutorialBaselineDetector(random_state=0).fit_frame(history)
    later = T0 + pd.Timedelta(hours=11)
    quiet = history[history["user"] == f"{0:016x}"].assign(
        timestamp=lambda f: f["timestamp"] + pd.Timedelta(hours=11)
    )
    scored = det.score_frame(pd.concat([quiet, _burst(f"{0:016x}", later)]))
    at_burst = scored[scored["event_timestamp"] == later + pd.Timedelta(minutes=1)]
    assert at_burst["alert"].all()
    assert at_burst["score"].max() > scored["score"].median()


def test_score_frame_shape_and_bin_end_stamp() -> None:
    det = TutorialBaselineDetector().fit_frame(_telemetry())
    scored = det.score_frame(_burst("aa" * 8, T0 + pd.Timedelta(hours=20, seconds=5), n=3))
    assert list(scored.columns) == ["user", "event_timestamp", "score", "alert"]
    # A bin's row is stamped when the bin closes: 20:00 bin -> 20:01.
    assert scored["event_timestamp"].tolist() == [T0 + pd.Timedelta(hours=20, minutes=1)]
    assert scored["alert"].dtype == bool


def test_deterministic_per_seed() -> None:
    history = _telemetry(seed=3)
    a = TutorialBaselineDetector(random_state=7).fit_frame(history).score_frame(history)
    b = TutorialBaselineDetector(random_state=7).fit_frame(history).score_frame(history)
    pd.testing.assert_frame_equal(a, b)


def test_unfitted_and_empty_inputs() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        TutorialBaselineDetector().score_frame(_telemetry())
    no_submissions = _telemetry().assign(status="completed")
    with pytest.raises(ValueError, match="no submissions"):
        TutorialBaselineDetector().fit_frame(no_submissions)
    det = TutorialBaselineDetector().fit_frame(_telemetry())
    assert det.score_frame(no_submissions).empty


def test_a_job_log_counts_each_job_once_like_the_event_stream() -> None:
    t0 = pd.Timestamp("2026-03-02T00:00:00Z")
    submitted = t0 + pd.to_timedelta(np.arange(120) * 7, unit="s")
    jobs = [f"job-{i}" for i in range(120)]
    stream = pd.DataFrame(
        {
            "user": "u1",
            "job_id": jobs * 2,
            "status": ["submitted"] * 120 + ["completed"] * 120,
            "timestamp": list(submitted) + list(submitted + pd.Timedelta(seconds=3)),
        }
    )
    # One record per job, its terminal one, at the instant it was submitted.
    job_log = stream[stream["status"] == "completed"].assign(timestamp=list(submitted))
    counted = TutorialBaselineDetector._minute_counts(stream)
    assert counted["submissions"].sum() == 120  # each job once, not twice
    pd.testing.assert_frame_equal(counted, TutorialBaselineDetector._minute_counts(job_log))
    # Without job ids the tutorial's rule: submission records only.
    assert TutorialBaselineDetector._minute_counts(job_log.drop(columns="job_id")).empty

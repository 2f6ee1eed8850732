"""The GRU autoencoder family: contract, determinism, planted anomalies, persistence."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from models.sequence import FAMILY, SequenceAutoencoderDetector, load, save
from models.thresholds import KeyDayBudget

MINUTES = 60
SUBMISSIONS, FAILURES, AUTH_FAILURES, SHOTS, HASHES = range(5)
SMALL = {"hidden_size": 16, "latent_size": 6, "epochs": 6, "batch_size": 128, "random_state": 0}


def normal_sequences(n: int, rng: np.random.Generator) -> np.ndarray:
    """Bursty, idle-prone per-minute counts: a rate per key, a slow cycle, idle minutes."""
    rate = rng.lognormal(0.0, 1.0, size=(n, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1))
    period = rng.uniform(30, 120, size=(n, 1))
    cycle = 1 + 0.8 * np.sin(2 * np.pi * np.arange(MINUTES)[None, :] / period + phase)
    active = rng.random((n, MINUTES)) < rng.uniform(0.1, 0.7, size=(n, 1))
    submissions = rng.poisson(rate * cycle) * active
    failures = rng.binomial(submissions, 0.08)
    auth_failures = rng.binomial(1, 0.01, size=(n, MINUTES))
    shots = submissions * rng.choice([100, 1000, 4000], size=(n, 1))
    hashes = np.minimum(submissions, rng.poisson(1.0, size=(n, MINUTES)) + (submissions > 0))
    channels = [submissions, failures, auth_failures, shots, hashes]
    return np.stack(channels, axis=2).astype(np.int64)


def job_bursts(n: int, rng: np.random.Generator) -> np.ndarray:
    """Ten minutes of 50 jobs a minute, one circuit, inside an otherwise normal hour."""
    sequences = normal_sequences(n, rng)
    for row, start in enumerate(rng.integers(0, MINUTES - 10, size=n)):
        burst = slice(start, start + 10)
        sequences[row, burst, SUBMISSIONS] = 50
        sequences[row, burst, FAILURES] = rng.binomial(50, 0.08, size=10)
        sequences[row, burst, SHOTS] = 50 * 1000
        sequences[row, burst, HASHES] = 1
    return sequences


def auth_bursts(n: int, rng: np.random.Generator) -> np.ndarray:
    """Ten minutes of 50 auth failures a minute (credential stuffing) in a normal hour."""
    sequences = normal_sequences(n, rng)
    for row, start in enumerate(rng.integers(0, MINUTES - 10, size=n)):
        sequences[row, start : start + 10, AUTH_FAILURES] = 50
    return sequences


def never_idle(n: int, rng: np.random.Generator) -> np.ndarray:
    """One job every minute of the hour, same circuit, same shots: a runaway loop."""
    sequences = np.zeros((n, MINUTES, 5), dtype=np.int64)
    sequences[:, :, SUBMISSIONS] = 1
    sequences[:, :, SHOTS] = rng.choice([100, 1000, 4000], size=(n, 1))
    sequences[:, :, HASHES] = 1
    return sequences


@pytest.fixture(scope="module")
def training() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    sequences = normal_sequences(3000, rng)
    groups = np.repeat(np.arange(300), 10)  # ten sequences per key-day
    return sequences, groups


@pytest.fixture(scope="module")
def fitted(training: tuple[np.ndarray, np.ndarray]) -> SequenceAutoencoderDetector:
    sequences, groups = training
    detector = SequenceAutoencoderDetector(**SMALL, threshold_strategy=KeyDayBudget(0.02))
    return detector.fit(sequences, groups=groups)


def test_importing_the_family_does_not_import_torch() -> None:
    code = "import sys, models.sequence; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_get_params_returns_the_init_arguments_and_clone_works() -> None:
    strategy = KeyDayBudget(0.05)
    detector = SequenceAutoencoderDetector(
        **SMALL, max_train_sequences=123, threshold_strategy=strategy
    )
    params = detector.get_params()
    assert params == {
        **SMALL,
        "max_train_sequences": 123,
        "patch_minutes": 5,
        "learning_rate": 3e-3,
        "threshold_strategy": strategy,
    }
    assert clone(detector).get_params() == params


def test_fit_sets_scores_and_a_key_day_threshold(
    fitted: SequenceAutoencoderDetector, training: tuple[np.ndarray, np.ndarray]
) -> None:
    sequences, groups = training
    assert fitted.decision_scores_.shape == (len(sequences),)
    assert fitted.n_features_in_ == 5
    assert fitted.threshold_ == KeyDayBudget(0.02).threshold(fitted.decision_scores_, groups)
    np.testing.assert_allclose(fitted.decision_function(sequences), fitted.decision_scores_)


def test_two_fits_give_identical_scores(training: tuple[np.ndarray, np.ndarray]) -> None:
    sequences = training[0][:600]
    params = {**SMALL, "epochs": 2}
    first = SequenceAutoencoderDetector(**params).fit(sequences)
    second = SequenceAutoencoderDetector(**params).fit(sequences)
    np.testing.assert_array_equal(first.decision_scores_, second.decision_scores_)


def test_more_rows_than_the_training_limit_are_subsampled_but_all_scored() -> None:
    sequences = normal_sequences(500, np.random.default_rng(1))
    detector = SequenceAutoencoderDetector(**{**SMALL, "epochs": 1}, max_train_sequences=100)
    assert detector.fit(sequences).decision_scores_.shape == (500,)


@pytest.mark.parametrize("anomalies", [job_bursts, auth_bursts, never_idle])
def test_planted_anomalies_score_above_normal_hours(
    fitted: SequenceAutoencoderDetector, anomalies: object
) -> None:
    rng = np.random.default_rng(2)
    normal = fitted.decision_function(normal_sequences(1000, rng))
    planted = fitted.decision_function(anomalies(200, rng))  # type: ignore[operator]
    labels = np.r_[np.zeros(len(normal)), np.ones(len(planted))]
    assert roc_auc_score(labels, np.r_[normal, planted]) >= 0.95
    assert np.mean(planted > fitted.threshold_) >= 0.5


def test_explain_blames_the_channel_carrying_the_anomaly(
    fitted: SequenceAutoencoderDetector,
) -> None:
    sequences = auth_bursts(50, np.random.default_rng(3))
    contributions = fitted.explain(sequences)
    assert contributions.shape == (50, 5)
    assert np.mean(contributions.argmax(axis=1) == AUTH_FAILURES) >= 0.9
    np.testing.assert_allclose(contributions.sum(axis=1), fitted.decision_function(sequences))


def test_one_sequence_scored_then_explained_agrees_with_the_batch(
    fitted: SequenceAutoencoderDetector,
) -> None:
    # /score scores one key, then explains it: the second call reuses the first's pass.
    sequences = np.concatenate(
        [normal_sequences(2, np.random.default_rng(5)), job_bursts(2, np.random.default_rng(6))]
    )
    scores, terms = fitted.decision_function(sequences), fitted.explain(sequences)
    for i in range(len(sequences)):
        row = sequences[i : i + 1]
        assert fitted.decision_function(row)[0] == pytest.approx(scores[i], rel=1e-5)
        explained = fitted.explain(row)
        np.testing.assert_allclose(explained[0], terms[i], rtol=1e-5)
        explained[0, :] = -1.0  # a caller's edit does not reach the next answer
        np.testing.assert_allclose(fitted.explain(row)[0], terms[i], rtol=1e-5)
    # Scored one after the other, a normal hour and a burst are told apart, not mixed up.
    assert fitted.decision_function(sequences[3:4])[0] > fitted.decision_function(sequences[:1])[0]


def test_chunk_iterator_scores_like_the_array(fitted: SequenceAutoencoderDetector) -> None:
    sequences = normal_sequences(300, np.random.default_rng(4))
    chunks = (sequences[i : i + 70] for i in range(0, 300, 70))
    np.testing.assert_allclose(
        fitted.decision_function(chunks), fitted.decision_function(sequences), rtol=1e-6
    )


def test_save_and_load_round_trip_without_pickle(
    fitted: SequenceAutoencoderDetector, tmp_path: Path
) -> None:
    save(fitted, tmp_path)
    names = {path.name for path in tmp_path.iterdir()}
    assert names == {"detector.json", "weights.safetensors"}
    again = load(tmp_path)
    sequences = normal_sequences(200, np.random.default_rng(5))
    np.testing.assert_array_equal(
        again.decision_function(sequences), fitted.decision_function(sequences)
    )
    assert again.threshold_ == fitted.threshold_
    assert again.get_params() == fitted.get_params()


def test_load_refuses_metadata_naming_another_class(
    fitted: SequenceAutoencoderDetector, tmp_path: Path
) -> None:
    save(fitted, tmp_path)
    metadata = json.loads((tmp_path / "detector.json").read_text())
    metadata["class"] = "models.isolation_forest.IsolationForestDetector"
    (tmp_path / "detector.json").write_text(json.dumps(metadata))
    with pytest.raises(
        ValueError, match=re.escape("not a models.sequence.SequenceAutoencoderDetector")
    ):
        load(tmp_path)


def test_bad_inputs_raise_clear_errors(fitted: SequenceAutoencoderDetector) -> None:
    good = normal_sequences(4, np.random.default_rng(6))
    with pytest.raises(ValueError, match="3-D array"):
        fitted.decision_function(good[:, :, 0])
    with pytest.raises(ValueError, match="expected 5 features"):
        fitted.decision_function(good[:, :, :4])
    with pytest.raises(ValueError, match="60 minutes"):
        fitted.decision_function(good[:, :30])
    with pytest.raises(ValueError, match="at least one row"):
        fitted.decision_function(good[:0])
    with_nan = good.astype(float)
    with_nan[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fitted.decision_function(with_nan)
    with pytest.raises(ValueError, match="NaN"):
        SequenceAutoencoderDetector(**SMALL).fit(with_nan)
    with pytest.raises(ValueError, match="patches of 7 minutes"):
        SequenceAutoencoderDetector(**SMALL, patch_minutes=7).fit(good)


def test_unfitted_detector_refuses_to_score() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        SequenceAutoencoderDetector().decision_function(np.zeros((1, 60, 5)))


def test_lightning_system_runs_a_fast_dev_run_on_cpu() -> None:
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from models.sequence import SequenceReconstruction
    from models.sequence_net import SequenceAutoencoder

    network = SequenceAutoencoder(5, 60, 5, hidden_size=8, latent_size=4)
    system = SequenceReconstruction(network, learning_rate=1e-3)
    data = DataLoader(TensorDataset(torch.rand(16, 60, 5)), batch_size=8)
    trainer = pl.Trainer(
        accelerator="cpu",
        fast_dev_run=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(system, train_dataloaders=data)
    assert trainer.state.finished


def test_the_family_builds_a_detector_for_the_sequence_channels() -> None:
    assert FAMILY.name == "gru_autoencoder"
    assert FAMILY.input_kind == "sequences"
    assert len(FAMILY.feature_names) == 5
    detector = FAMILY.build(threshold_strategy=KeyDayBudget(0.01))
    assert isinstance(detector, SequenceAutoencoderDetector)
    assert detector.get_params()["threshold_strategy"] == KeyDayBudget(0.01)

"""The sequence family: a GRU autoencoder over each api key's last hour of per-minute counts.

A row is one api key at one minute: the key's previous minutes (oldest first) x channels
(submissions, failures, auth failures, shots, distinct code hashes, ...), integer counts.
The autoencoder (`models.sequence_net.SequenceAutoencoder`) learns to reconstruct normal
hours; `SequenceReconstruction` is its Lightning training system (MSE of the
reconstruction, Adam), trained on CPU by a ``pytorch_lightning.Trainer``.

The score is a *calibrated* reconstruction error. A plain reconstruction error flags
bursts, but an autoencoder reconstructs a perfectly regular never-idle pattern (one job
every minute, a runaway CI loop) better than any real, bursty hour: regularity is easy to
compress. So, per channel, the log of the sequence's mean squared reconstruction error is
compared with that of training sequences of the same activity level (the channel's mean,
in quantile bins): the robust z-score (median, MAD) of the error within its bin. A burst
errs far above its level's typical error, a machine-regular hour far below it; the score is
the mean over channels of the squared z-scores, so both directions count. ``explain``
returns each channel's share of that mean (rows x channels, summing to the score).

torch and pytorch_lightning are imported inside the functions that need them: the
registry imports every family module and importing torch costs seconds.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
from numpy.typing import ArrayLike, NDArray

from models.base import BaseDetector, signed_log
from models.persistence import read_metadata, write_metadata
from models.registry import DetectorFamily, register_family
from models.thresholds import ThresholdStrategy
from qabuse_dagster.features.definitions import SEQUENCE_CHANNELS, SEQUENCE_MINUTES

if TYPE_CHECKING:
    from models.sequence_net import SequenceAutoencoder

# SequenceReconstruction is public too, built on first access (module __getattr__).
__all__ = ["FAMILY", "SequenceAutoencoderDetector", "load", "save"]

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
#: Sequences per forward pass when scoring: 4096 x 60 x 5 float32 is 5 MB, and larger
#: batches run no faster through a GRU on CPU.
SCORE_CHUNK = 4096
#: Batches up to this many rows run on one torch thread: intra-op threads gain nothing on
#: them, and on a busy CPU waiting for a second thread puts one sequence's p99 near 5 ms.
SINGLE_THREAD_ROWS = 256
#: Activity-level bins per channel for the error calibration (quantiles of the training set).
LEVEL_BINS = 10
#: A bin with fewer training sequences uses the channel's overall median and spread.
MIN_BIN_SEQUENCES = 30
#: Added to the mean squared error (scaled units) before the log, so an exactly
#: reconstructed channel (all zeros) has a finite log error.
ERROR_FLOOR = 1e-2
#: Smallest spread (log units) of a bin: a bin whose errors all agree would otherwise
#: turn a tiny deviation into a huge z-score.
SPREAD_FLOOR = 0.25
#: The per-channel scale is this quantile of the channel's signed-log values (at least 1).
SCALE_QUANTILE = 0.99


@functools.cache
def _reconstruction_system_class() -> type[Any]:
    import pytorch_lightning as pl
    import torch

    class SequenceReconstruction(pl.LightningModule):
        """The training system of the autoencoder: MSE of the reconstruction, Adam.

        Args:
            network: the `models.sequence_net.SequenceAutoencoder` to train.
            learning_rate: Adam's learning rate.
        """

        def __init__(self, network: SequenceAutoencoder, learning_rate: float) -> None:
            super().__init__()
            self.network = network
            self.learning_rate = learning_rate

        def forward(self, sequences: torch.Tensor) -> torch.Tensor:
            return self.network(sequences)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            (sequences,) = batch
            loss = torch.nn.functional.mse_loss(self.network(sequences), sequences)
            self.log("train_mse", loss, on_step=False, on_epoch=True, batch_size=len(sequences))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.network.parameters(), lr=self.learning_rate)

    return SequenceReconstruction


def __getattr__(name: str) -> Any:
    # SequenceReconstruction subclasses LightningModule, so it is built on first use only.
    if name == "SequenceReconstruction":
        return _reconstruction_system_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class SequenceAutoencoderDetector(BaseDetector):
    """A GRU autoencoder over per-minute sequences; the score is a calibrated reconstruction error.

    Inputs are rows x minutes x channels of per-minute counts. Each value becomes
    ``sign(x) log1p(|x|)`` divided by a per-channel scale learned in ``fit`` (the 99th
    percentile of the channel's values, at least 1), so counts of very different sizes
    (shots against auth failures) weigh alike.

    ``fit`` trains on at most ``max_train_sequences`` rows: a subsample drawn with
    ``random_state`` when more are given, so training time does not grow with history.
    Every given row is still scored (in chunks) for ``decision_scores_`` and the threshold.
    Two fits with the same ``random_state`` on the same rows give identical scores.

    Args:
        hidden_size: width of the encoder's and decoder's GRU state.
        latent_size: width of the bottleneck.
        patch_minutes: consecutive minutes one recurrent step reads (the sequence length
            must be a multiple); fewer steps make scoring one sequence cheaper.
        epochs: passes over the training subsample.
        batch_size: sequences per optimiser step.
        learning_rate: Adam's learning rate.
        max_train_sequences: rows trained on at most (a seeded subsample beyond).
        random_state: seed of the subsample, the initial weights and the batch order.
        threshold_strategy: how ``fit`` sets ``threshold_`` (default: 1% contamination).

    Attributes:
        scale_: per-channel divisor of the signed-log values.
        n_minutes_: minutes per sequence seen by ``fit``.
        level_edges_: per channel, the activity-level bin edges (channels x bins - 1).
        error_center_: per channel and bin, the median log reconstruction error.
        error_spread_: per channel and bin, its robust spread (1.4826 MAD, floored).
        network_: the trained `models.sequence_net.SequenceAutoencoder`.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> normal = rng.poisson(1.0, size=(500, 60, 2)) * rng.integers(0, 2, (500, 60, 1))
        >>> det = SequenceAutoencoderDetector(hidden_size=8, latent_size=4, epochs=2)
        >>> det = det.fit(normal)
        >>> burst = normal[:1].copy()
        >>> burst[0, 20:40, 0] = 50
        >>> bool(det.decision_function(burst)[0] > det.threshold_)
        True
    """

    input_ndim = 3

    def __init__(
        self,
        hidden_size: int = 32,
        latent_size: int = 8,
        patch_minutes: int = 5,
        epochs: int = 4,
        batch_size: int = 256,
        learning_rate: float = 3e-3,
        max_train_sequences: int = 30_000,
        random_state: int | None = 0,
        threshold_strategy: ThresholdStrategy | None = None,
    ) -> None:
        super().__init__(threshold_strategy)
        self.hidden_size = hidden_size
        self.latent_size = latent_size
        self.patch_minutes = patch_minutes
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.max_train_sequences = max_train_sequences
        self.random_state = random_state

    def fit(
        self, X: ArrayLike, y: ArrayLike | None = None, groups: ArrayLike | None = None
    ) -> Self:
        """Train on a subsample of ``X``, score every row of it and set ``threshold_``.

        The same steps as `BaseDetector.fit`, chunk by chunk: the base class converts the
        whole input to float64 at once, 3.6 GB for 1.5 million hour-long sequences.

        Args:
            X: rows x minutes x channels of per-minute counts.
            y: ignored (unsupervised).
            groups: one group id per row, for a key-day budget strategy.
        """
        sequences = np.asarray(X)
        if sequences.ndim != 3 or len(sequences) == 0:
            self._check_array(sequences, fitting=True)
        for chunk in _chunks(sequences):
            self._check_array(chunk, fitting=True)
        self._fit(sequences)
        self.decision_scores_ = self._score_rows(sequences)
        strategy = self.threshold_strategy or _default_strategy()
        self.threshold_ = float(strategy.threshold(self.decision_scores_, groups))
        return self

    def decision_function(self, X: ArrayLike | Iterator[ArrayLike]) -> NDArray[np.float64]:
        """Anomaly score of each sequence: higher means more anomalous.

        Args:
            X: rows x minutes x channels, or an iterator of such chunks (e.g. read batch by
                batch from Parquet), scored one chunk at a time; scores come back in order.
        """
        self._check_fitted()
        if isinstance(X, Iterator):
            parts = [self._score_rows(np.asarray(chunk)) for chunk in X]
            if not parts:
                raise ValueError("expected at least one row, got none")
            return np.concatenate(parts)
        return self._score_rows(np.asarray(X))

    def _score_rows(self, sequences: NDArray[Any]) -> NDArray[np.float64]:
        # Chunks keep the float64 copy _check_array makes small.
        if sequences.ndim != 3 or len(sequences) == 0:
            self._check_array(sequences, fitting=False)
        return np.concatenate(
            [self._score(self._check_array(chunk, fitting=False)) for chunk in _chunks(sequences)]
        )

    def _fit(self, X: NDArray[Any]) -> None:
        import torch

        n_rows, n_minutes, n_channels = X.shape
        if n_minutes % self.patch_minutes:
            raise ValueError(
                f"sequences of {n_minutes} minutes do not split into patches of "
                f"{self.patch_minutes} minutes (patch_minutes)"
            )
        rng = np.random.default_rng(self.random_state)
        if n_rows > self.max_train_sequences:
            rows = np.sort(rng.choice(n_rows, size=self.max_train_sequences, replace=False))
            X = X[rows]
        logs = signed_log(np.asarray(X, dtype=np.float64))
        quantile = np.quantile(np.abs(logs).reshape(-1, n_channels), SCALE_QUANTILE, axis=0)
        self.scale_ = np.maximum(quantile, 1.0)
        self.n_minutes_ = int(n_minutes)
        train = torch.from_numpy((logs / self.scale_).astype(np.float32))
        seed = int(rng.integers(2**31))
        started = time.perf_counter()
        self.network_ = _train(
            train,
            seed=seed,
            hidden_size=self.hidden_size,
            latent_size=self.latent_size,
            patch_minutes=self.patch_minutes,
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
        )
        logger.info(
            "trained the sequence autoencoder on %d sequences in %.1f s",
            len(train),
            time.perf_counter() - started,
        )
        self._calibrate(train)

    def _calibrate(self, train: Any) -> None:
        """Per channel and activity level, the median and spread of the log reconstruction error."""
        level, log_error = _errors(self.network_, train)
        n_channels = level.shape[1]
        probabilities = np.linspace(0.0, 1.0, LEVEL_BINS + 1)[1:-1]
        self.level_edges_ = np.quantile(level, probabilities, axis=0).T
        bins = _level_bins(level, self.level_edges_)
        self.error_center_ = np.empty((n_channels, LEVEL_BINS))
        self.error_spread_ = np.empty((n_channels, LEVEL_BINS))
        for channel in range(n_channels):
            overall = _median_spread(log_error[:, channel])
            for b in range(LEVEL_BINS):
                values = log_error[bins[:, channel] == b, channel]
                center, spread = (
                    _median_spread(values) if len(values) >= MIN_BIN_SEQUENCES else overall
                )
                self.error_center_[channel, b] = center
                self.error_spread_[channel, b] = spread

    def _channel_terms(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        """Each channel's share of the score: its squared error z-score over the channel count."""
        import torch

        if X.shape[1] != self.n_minutes_:
            raise ValueError(
                f"expected sequences of {self.n_minutes_} minutes as in fit, got {X.shape[1]}"
            )
        scaled = torch.from_numpy((signed_log(X) / self.scale_).astype(np.float32))
        level, log_error = _errors(self.network_, scaled)
        bins = _level_bins(level, self.level_edges_)
        channels = np.arange(level.shape[1])
        z = (log_error - self.error_center_[channels, bins]) / self.error_spread_[channels, bins]
        return np.asarray(z**2 / level.shape[1], dtype=np.float64)

    def _score(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        return self._one_row_terms(X).sum(axis=1)

    def _explain(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        return self._one_row_terms(X)

    def _one_row_terms(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        """`_channel_terms`, remembered for the last single sequence.

        A /score request scores a key and then explains the family that scored highest:
        for this family both are the same forward pass, run once.
        """
        if len(X) != 1:
            return self._channel_terms(X)
        key = X.tobytes()
        last = getattr(self, "_last_row", None)  # one tuple: atomic under threads
        if last is not None and last[0] == key:
            return np.array(last[1])
        terms = self._channel_terms(X)
        self._last_row = (key, terms.copy())
        return terms


def _default_strategy() -> ThresholdStrategy:
    from models.thresholds import Contamination

    return Contamination()


def _chunks(sequences: NDArray[Any]) -> Iterator[NDArray[Any]]:
    for start in range(0, len(sequences), SCORE_CHUNK):
        yield sequences[start : start + SCORE_CHUNK]


def _median_spread(values: NDArray[np.float64]) -> tuple[float, float]:
    if len(values) == 0:
        return 0.0, 1.0
    center = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - center)))
    return center, max(spread, SPREAD_FLOOR)


def _level_bins(level: NDArray[np.float64], edges: NDArray[np.float64]) -> NDArray[np.intp]:
    """Bin index (0 .. LEVEL_BINS - 1) of each row's level, per channel (rows x channels)."""
    # Ties at an edge go up, so an edge repeated by ties leaves its lower bins empty.
    return (level[:, :, None] >= edges[None, :, :]).sum(axis=2)


def _errors(network: Any, scaled: Any) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per row and channel: mean scaled level, log of mean squared reconstruction error."""
    import torch

    levels, errors = [], []
    network.eval()
    threads = torch.get_num_threads()
    # A few rows (a /score request) gain nothing from intra-op threads; switching costs
    # a little, so it happens only when needed.
    switch = len(scaled) <= SINGLE_THREAD_ROWS and threads != 1
    if switch:
        torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for start in range(0, len(scaled), SCORE_CHUNK):
                batch = scaled[start : start + SCORE_CHUNK]
                errors.append(((network(batch) - batch) ** 2).mean(dim=1).numpy())
                levels.append(batch.mean(dim=1).numpy())
    finally:
        if switch:
            torch.set_num_threads(threads)
    level = np.concatenate(levels).astype(np.float64)
    log_error = np.log(np.concatenate(errors).astype(np.float64) + ERROR_FLOOR)
    return level, log_error


def _new_network(
    n_channels: int, n_minutes: int, patch_minutes: int, hidden_size: int, latent_size: int
) -> SequenceAutoencoder:
    from models.sequence_net import SequenceAutoencoder

    return SequenceAutoencoder(n_channels, n_minutes, patch_minutes, hidden_size, latent_size)


def _train(
    train: Any,
    *,
    seed: int,
    hidden_size: int,
    latent_size: int,
    patch_minutes: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
) -> SequenceAutoencoder:
    """Train a new network on ``train`` (a float32 tensor) with a CPU Lightning Trainer."""
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

    _, n_minutes, n_channels = train.shape
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    # fork_rng: the seed drives the initial weights here without moving the caller's RNG.
    with torch.random.fork_rng(), warnings.catch_warnings():
        torch.manual_seed(seed)
        network = _new_network(n_channels, n_minutes, patch_minutes, hidden_size, latent_size)
        system = _reconstruction_system_class()(network, learning_rate)
        order = RandomSampler(train, generator=torch.Generator().manual_seed(seed))
        # Whole batches by one indexing of the tensor, not one __getitem__ per sequence.
        loader = DataLoader(
            TensorDataset(train),
            sampler=BatchSampler(order, batch_size=batch_size, drop_last=False),
            batch_size=None,
        )
        # Worker processes cost more than they save on in-memory tensors.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # pytorch-lightning 2.6's own use of a torch pytree API that torch 2.13 deprecates.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=epochs,
            deterministic=True,
            enable_checkpointing=False,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        try:
            trainer.fit(system, train_dataloaders=loader)
        finally:
            # deterministic=True switches torch's global flag on; give the process its own back.
            torch.use_deterministic_algorithms(was_deterministic)
    network.eval()
    return network


def save(detector: BaseDetector, directory: Path) -> None:
    """Write a fitted detector: ``detector.json`` and the weights as safetensors (no pickle).

    Args:
        detector: a fitted `SequenceAutoencoderDetector`.
        directory: created if missing.
    """
    from safetensors.torch import save_file

    if not isinstance(detector, SequenceAutoencoderDetector):
        raise TypeError(f"expected a SequenceAutoencoderDetector, got {type(detector).__name__}")
    detector._check_fitted()
    write_metadata(
        detector,
        directory,
        state=("scale_", "n_minutes_", "level_edges_", "error_center_", "error_spread_"),
        extra={"weights": WEIGHTS_FILE},
    )
    state = {name: tensor.contiguous() for name, tensor in detector.network_.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))


def load(directory: Path) -> SequenceAutoencoderDetector:
    """Read what `save` wrote; refuses a directory holding another detector class.

    Example:
        >>> import tempfile
        >>> rng = np.random.default_rng(0)
        >>> X = rng.poisson(1.0, size=(200, 10, 2))
        >>> det = SequenceAutoencoderDetector(hidden_size=4, latent_size=2, epochs=1).fit(X)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save(det, Path(tmp))
        ...     again = load(Path(tmp))
        >>> bool(np.array_equal(again.decision_function(X), det.decision_function(X)))
        True
    """
    from safetensors.torch import load_file

    detector, _ = read_metadata(directory, SequenceAutoencoderDetector)
    detector.n_minutes_ = int(detector.n_minutes_)
    network = _new_network(
        int(detector.n_features_in_),
        detector.n_minutes_,
        detector.patch_minutes,
        detector.hidden_size,
        detector.latent_size,
    )
    network.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    detector.network_ = network.eval()
    return detector


#: The family as registered (the registry's entry for ``gru_autoencoder``).
FAMILY = register_family(
    DetectorFamily(
        name="gru_autoencoder",
        input_kind="sequences",
        entity="api_key",
        feature_service="api_key_sequence_v1",
        feature_names=tuple(SEQUENCE_CHANNELS),
        detector=SequenceAutoencoderDetector,
        save=save,
        load=load,
        description=(
            f"GRU autoencoder over an api key's last {SEQUENCE_MINUTES} minutes of per-minute "
            "counts; flags hours reconstructed far worse (bursts) or far better (machine-regular) "
            "than normal hours of the same activity"
        ),
        params={
            "hidden_size": 32,
            "latent_size": 8,
            "patch_minutes": 5,
            "epochs": 4,
            "batch_size": 256,
            "learning_rate": 3e-3,
            "max_train_sequences": 30_000,
            "random_state": 0,
        },
        # The detector draws its own training subsample (max_train_sequences) and scores
        # every given row in chunks, so the threshold sees all candidate sequences.
        train_row_limit=None,
    )
)

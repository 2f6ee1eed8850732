"""Input drift: how far the rows a detector sees now have moved from the rows it learnt on.

Two statistics per feature, on the same bins:

* the Population Stability Index, ``sum((c - r) * ln(c / r))`` over bins with reference
  shares ``r`` and current shares ``c``: the credit-risk industry's drift measure, read
  against its customary bands (under 0.1 stable, 0.1 to 0.25 a shift worth a look, over
  0.25 a shift worth retraining for);
* the Jensen-Shannon distance (base 2, in [0, 1]): symmetric and bounded, so one empty
  bin cannot make it explode as it makes PSI; a second opinion for heavy-tailed
  features, whose mass moves between a few bins.

Rows are weighted so that every api key weighs the same (`entity_weights`): drift is a
change in how the keys behave, not in how many rows one busy key writes. The bins are the
reference's weighted deciles (`reference_bins`), so each holds about a tenth of the
training keys' weight; a feature with few distinct values (counts, flags) gets fewer bins,
as its deciles collapse onto its ties. The reference is small and JSON:
it is stored with the model version it describes, and the drift of any later rows is
computed against it (`feature_drift`).

Example:
    >>> import numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> before = pd.DataFrame({"x": rng.normal(size=5000)})
    >>> reference = reference_bins(before, ["x"])
    >>> same = feature_drift(reference, pd.DataFrame({"x": rng.normal(size=5000)}))
    >>> moved = feature_drift(reference, pd.DataFrame({"x": rng.normal(1.0, size=5000)}))
    >>> bool(same.loc["x", "psi"] < PSI_WARN < PSI_ERROR < moved.loc["x", "psi"])
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy.spatial.distance import jensenshannon

__all__ = [
    "PSI_ERROR",
    "PSI_WARN",
    "SCORE_FEATURE",
    "DriftReference",
    "drift_level",
    "entity_weights",
    "feature_drift",
    "model_reference",
    "newest_row_time",
    "population_stability_index",
    "recent_rows",
    "reference_bins",
]

#: PSI at which a feature's shift is worth a look (WARN), and worth retraining (ERROR).
PSI_WARN = 0.1
PSI_ERROR = 0.25
#: Share given to an empty bin, so PSI stays finite (a bin's share is at least this).
EMPTY_SHARE = 1e-4
#: Deciles by default.
DEFAULT_BINS = 10
#: The reference entry of the model's own score, beside its input features.
SCORE_FEATURE = "model_score"

#: A feature's reference: its inner bin edges and the training share of each bin.
DriftReference = dict[str, dict[str, list[float]]]


def entity_weights(rows: pd.DataFrame, entity: str = "api_key_id") -> NDArray[np.float64]:
    """Each row's weight so that every entity weighs the same: 1 / its number of rows.

    A population is its keys, not its rows: a key submitting every minute has 1,440 rows
    a day and a research group's key a few dozen, so by rows one runaway script would be
    a fifth of a small deployment's day, and its attack would read as the population's
    drift. By key, it is one key among all.
    """
    counts = rows.groupby(entity)[entity].transform("size").to_numpy(dtype=np.float64)
    return 1.0 / counts


def reference_bins(
    rows: pd.DataFrame,
    features: Iterable[str],
    n_bins: int = DEFAULT_BINS,
    weights: Sequence[float] | NDArray[np.float64] | None = None,
) -> DriftReference:
    """Each feature's quantile bins over ``rows`` and the share of the rows in each.

    Args:
        rows: the training rows (one column per feature; NaN values are left out).
        features: the columns to describe.
        n_bins: quantile bins per feature (fewer when its values tie).
        weights: each row's weight (`entity_weights`); equal weights when None.

    Returns:
        ``{feature: {"edges": inner edges, "shares": one share per bin}}``, JSON-ready.

    Raises:
        ValueError: a feature is not a column of ``rows``, holds no finite value, or
            ``n_bins`` is under 2.
    """
    if n_bins < 2:
        raise ValueError(f"n_bins must be at least 2, got {n_bins}")
    out: DriftReference = {}
    for name in features:
        values, weight = _finite(rows, name, weights)
        if not len(values):
            raise ValueError(f"feature {name!r} has no finite value in the reference rows")
        quantiles = np.quantile(
            values, np.linspace(0, 1, n_bins + 1)[1:-1], weights=weight, method="inverted_cdf"
        )
        edges = np.unique(quantiles)
        out[name] = {
            "edges": edges.tolist(),
            "shares": _shares(values, edges, weight).tolist(),
        }
    return out


def model_reference(
    rows: pd.DataFrame,
    features: Iterable[str],
    scores: Sequence[float] | NDArray[np.float64],
    n_bins: int = DEFAULT_BINS,
) -> DriftReference:
    """A model version's reference: its input features' bins over ``rows`` and the bins of
    its own ``scores`` of them (under `SCORE_FEATURE`), so both can drift; every api key
    weighs the same (`entity_weights`)."""
    present = [name for name in features if name in rows.columns]
    weights = entity_weights(rows)
    reference = reference_bins(rows, present, n_bins, weights)
    score_rows = pd.DataFrame({SCORE_FEATURE: np.asarray(scores, dtype=np.float64)})
    reference.update(reference_bins(score_rows, [SCORE_FEATURE], n_bins, weights))
    return reference


def population_stability_index(
    reference: Sequence[float] | NDArray[np.float64], current: Sequence[float] | NDArray[np.float64]
) -> float:
    """PSI of two share vectors over the same bins (each floored at `EMPTY_SHARE`)."""
    r = np.maximum(np.asarray(reference, dtype=np.float64), EMPTY_SHARE)
    c = np.maximum(np.asarray(current, dtype=np.float64), EMPTY_SHARE)
    if r.shape != c.shape:
        raise ValueError(f"shares over different bins: {r.shape} and {c.shape}")
    return float(np.sum((c - r) * np.log(c / r)))


def feature_drift(
    reference: Mapping[str, Mapping[str, Any]],
    rows: pd.DataFrame,
    warn: float = PSI_WARN,
    error: float = PSI_ERROR,
    weights: Sequence[float] | NDArray[np.float64] | None = None,
) -> pd.DataFrame:
    """PSI and Jensen-Shannon distance of each reference feature over ``rows``.

    Args:
        reference: what `reference_bins` returned (possibly read back from JSON).
        rows: the current rows; a feature missing from them is an error, NaN values are
            left out.
        warn: the PSI from which a feature's level is ``warn`` (`drift_level`).
        error: the PSI from which it is ``error``.
        weights: each row's weight, as the reference was weighted; equal when None.

    Returns:
        One row per feature (the index), with columns ``psi``, ``js_distance``,
        ``level`` (``ok``, ``warn`` or ``error``, from PSI), ``rows`` (finite values
        compared) and ``reference_shares`` / ``current_shares`` (lists, for plots).
        A feature with no finite current value has NaN statistics and level ``ok``.

    Raises:
        ValueError: a reference feature is not a column of ``rows``, or ``warn`` exceeds
            ``error``.
    """
    drift_level(0.0, warn, error)  # refuse bad levels before any work
    records = []
    for name, bins in reference.items():
        edges = np.asarray(bins["edges"], dtype=np.float64)
        ref = np.asarray(bins["shares"], dtype=np.float64)
        values, weight = _finite(rows, name, weights)
        if len(values):
            cur = _shares(values, edges, weight)
            psi = population_stability_index(ref, cur)
            js = float(jensenshannon(ref, cur, base=2))
        else:
            cur, psi, js = np.full(len(ref), np.nan), float("nan"), float("nan")
        records.append(
            {
                "feature": name,
                "psi": psi,
                "js_distance": js,
                "level": drift_level(psi, warn, error),
                "rows": len(values),
                "reference_shares": ref.tolist(),
                "current_shares": cur.tolist(),
            }
        )
    columns = ["psi", "js_distance", "level", "rows", "reference_shares", "current_shares"]
    if not records:
        return pd.DataFrame(columns=columns, index=pd.Index([], name="feature"))
    return pd.DataFrame.from_records(records, index="feature")[columns]


def drift_level(psi: float, warn: float = PSI_WARN, error: float = PSI_ERROR) -> str:
    """``ok``, ``warn`` or ``error`` for a PSI (NaN: ``ok``, nothing to compare)."""
    if not warn <= error:
        raise ValueError(f"the warn level {warn} must not exceed the error level {error}")
    if not np.isfinite(psi) or psi < warn:
        return "ok"
    return "warn" if psi < error else "error"


def newest_row_time(folder: Path, timestamp: str = "event_timestamp") -> datetime | None:
    """The instant of the newest window row in ``folder`` (None when it holds none).

    Sensors ask it every tick: only the timestamp column of the newest hourly files is
    read (the last one may be empty when its hour emptied)."""
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    for path in reversed(files[-2:]):
        stamps = pd.read_parquet(path, columns=[timestamp])[timestamp]
        if len(stamps):
            return pd.to_datetime(stamps, utc=True).max().to_pydatetime()
    return None


def recent_rows(folder: Path, span: timedelta, timestamp: str = "event_timestamp") -> pd.DataFrame:
    """The window rows of the last ``span`` before the newest one in ``folder``.

    ``folder`` holds one Parquet file per hour, named so that names sort by hour (the
    offline feature folders); only the newest files that can hold the span are read.
    An empty or missing folder gives an empty frame.
    """
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    hours = int(span / timedelta(hours=1)) + 2  # the span, and the partial hours at its ends
    if not files:
        return pd.DataFrame(columns=[timestamp])
    rows = pd.concat([pd.read_parquet(f) for f in files[-hours:]], ignore_index=True)
    if rows.empty:
        return rows
    stamps = pd.to_datetime(rows[timestamp], utc=True)
    return rows[stamps > stamps.max() - pd.Timedelta(span)].reset_index(drop=True)


def _finite(
    rows: pd.DataFrame, name: str, weights: Sequence[float] | NDArray[np.float64] | None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The finite values of a column, and their weights (ones when None)."""
    if name not in rows.columns:
        raise ValueError(f"feature {name!r} is not a column of the rows")
    values = pd.to_numeric(rows[name], errors="coerce").to_numpy(dtype=np.float64)
    weight = np.ones(len(values)) if weights is None else np.asarray(weights, dtype=np.float64)
    if weight.shape != values.shape:
        raise ValueError(f"{len(weight)} weights for {len(values)} rows")
    finite = np.isfinite(values)
    return values[finite], weight[finite]


def _shares(
    values: NDArray[np.float64], edges: NDArray[np.float64], weights: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Weighted share of ``values`` in each bin; a value on an edge belongs to the bin above."""
    bins = np.searchsorted(edges, values, side="right")
    totals = np.bincount(bins, weights=weights, minlength=len(edges) + 1)
    return totals / max(float(weights.sum()), 1e-300)

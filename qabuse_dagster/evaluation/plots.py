"""Figures a person reads after a run: score timelines against the alert threshold."""

from __future__ import annotations

import base64
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pandas as pd


def score_timeline_png(
    scored: pd.DataFrame,
    threshold: float,
    incident_keys: Collection[str],
    path: Path,
    *,
    benign_keys_shown: int = 5,
) -> Path:
    """Plot incident keys' and the top benign keys' scores over time to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    benign = scored[~scored["api_key_id"].isin(incident_keys)]
    top_benign = (
        benign.groupby("api_key_id")["score"].max().nlargest(benign_keys_shown).index.tolist()
    )
    for key in top_benign:
        rows = benign[benign["api_key_id"] == key].sort_values("event_timestamp")
        ax.plot(
            rows["event_timestamp"], rows["score"], lw=0.8, alpha=0.6, label=f"benign {key[:8]}"
        )
    for key in incident_keys:
        rows = scored[scored["api_key_id"] == key].sort_values("event_timestamp")
        if not rows.empty:
            ax.plot(
                rows["event_timestamp"],
                rows["score"],
                lw=1.6,
                color="crimson",
                label=f"incident {key[:8]}",
            )
    ax.axhline(threshold, color="black", ls="--", lw=1, label="alert threshold")
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("anomaly score (higher = more anomalous)")
    ax.set_title("Detector scores per api key, evaluation window")
    ax.legend(loc="upper left", fontsize=7, ncol=2)
    fig.autofmt_xdate()
    return _saved(fig, path)


def png_markdown(path: Path, alt: str) -> str:
    """Markdown that embeds a PNG inline (how Dagster's UI shows a plot in metadata)."""
    encoded = base64.b64encode(path.read_bytes()).decode()
    return f"![{alt}](data:image/png;base64,{encoded})"


def drift_png(drift: pd.DataFrame, path: Path, *, shown: int = 6) -> Path:
    """Reference against current bin shares of the ``shown`` most drifted features."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    top = drift.sort_values("psi", ascending=False, na_position="last").head(shown)
    cols = 3
    rows = max(1, -(-len(top) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.0 * rows), dpi=100, squeeze=False)
    for ax in axes.ravel()[len(top) :]:
        ax.set_visible(False)
    for ax, (name, row) in zip(axes.ravel(), top.iterrows(), strict=False):
        bins = np.arange(len(row["reference_shares"]))
        ax.bar(bins - 0.2, row["reference_shares"], width=0.4, label="reference (training)")
        ax.bar(bins + 0.2, row["current_shares"], width=0.4, label="current", color="crimson")
        ax.set_title(f"{name}\nPSI {row['psi']:.3f} ({row['level']})", fontsize=8)
        ax.set_xlabel("bin (reference quantiles)", fontsize=7)
        ax.set_ylabel("share of rows", fontsize=7)
        ax.tick_params(labelsize=6)
    if len(top):
        axes.ravel()[0].legend(fontsize=7)
    fig.suptitle("Input drift: the most shifted features", fontsize=10)
    return _saved(fig, path)


def series_png(
    series: dict[str, list[tuple[int, float]]], path: Path, *, title: str, shown: int = 168
) -> Path:
    """Each figure's last ``shown`` points over time (``(epoch ms, value)`` pairs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.2), dpi=100)
    for name, points in series.items():
        points = points[-shown:]
        if not points:
            continue
        at = pd.to_datetime([ms for ms, _ in points], unit="ms", utc=True)
        ax.plot(at, [value for _, value in points], marker="o", markersize=3, label=name)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("share of keys", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7, loc="best")
    fig.autofmt_xdate()
    return _saved(fig, path)


def _saved(fig: Any, path: Path) -> Path:
    """Lay out, write and close a figure; the PNG's path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

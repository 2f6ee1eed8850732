"""Champion and challenger: a new version replaces the champion only if it is not worse.

Both versions are judged on the same rows (the window after the challenger's training
cutoff) against the same labels, by the same code (`qabuse_dagster.evaluation.report`).
The challenger passes when, on each gated figure, it is at least as good as the
champion within a tolerance:

* recall (higher is better; no tolerance by default: a retrained detector that misses an
  incident the champion caught is worse, whatever else it does better);
* precision@k (higher is better; 0.05 by default: one place in twenty of the analysts'
  top of the list);
* the benign key-day alert rate (lower is better; 0.005 by default: half a key-day in a
  hundred, the resolution of a few days of a small deployment).

A figure the window cannot measure (no labelled incident: recall and precision@k are
undefined) is shown and not gated. The median time to detect is shown beside them, not
gated: it is measured on the incidents both detected only when both detect them all.

Example:
    >>> from qabuse_dagster.evaluation.gate import GateTolerance, champion_gate
    >>> verdict = champion_gate(
    ...     {"recall": 1.0, "precision_at_k": 0.9, "benign_key_day_alert_rate": 0.01},
    ...     {"recall": 1.0, "precision_at_k": 1.0, "benign_key_day_alert_rate": 0.0},
    ... )
    >>> verdict.passed, verdict.worse
    (False, ['precision_at_k', 'benign_key_day_alert_rate'])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pandas as pd

__all__ = ["GATED_METRICS", "SHOWN_METRICS", "GateTolerance", "GateVerdict", "champion_gate"]

#: Gated figures and whether higher is better.
GATED_METRICS: dict[str, bool] = {
    "recall": True,
    "precision_at_k": True,
    "benign_key_day_alert_rate": False,
}
#: Shown beside the gated figures, not gated.
SHOWN_METRICS = ("median_time_to_detect_s", "pr_auc")


@dataclass(frozen=True)
class GateTolerance:
    """How much worse than the champion a challenger may be on each gated figure."""

    recall: float = 0.0
    precision_at_k: float = 0.05
    benign_key_day_alert_rate: float = 0.005

    def __post_init__(self) -> None:
        for name in GATED_METRICS:
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"the {name} tolerance must not be negative")


@dataclass(frozen=True)
class GateVerdict:
    """The challenger against the champion, figure by figure."""

    passed: bool
    worse: list[str]
    table: pd.DataFrame = field(repr=False, compare=False)

    def markdown(self) -> str:
        """The side-by-side table, for asset metadata and notes."""
        return self.table.to_markdown()


def champion_gate(
    challenger: Mapping[str, float | None],
    champion: Mapping[str, float | None] | None,
    tolerance: GateTolerance | None = None,
) -> GateVerdict:
    """Whether ``challenger`` is not worse than ``champion`` on each gated figure.

    Args:
        challenger: The new version's figures on the window (`KindMetrics` as a dict).
        champion: The current champion's on the same window and labels; None when there
            is no champion yet (the challenger passes: there is nothing to be worse than).
        tolerance: Allowed slack per gated figure.

    Returns:
        The verdict, the figures it is worse on and a table with one row per figure:
        challenger, champion, tolerance and the outcome.
    """
    tolerance = tolerance or GateTolerance()
    rows = []
    worse: list[str] = []
    for name, higher_is_better in GATED_METRICS.items():
        new, old = challenger.get(name), None if champion is None else champion.get(name)
        slack = getattr(tolerance, name)
        if new is None or old is None:
            outcome = "no champion" if champion is None else "not measured on this window"
        else:
            margin = (new - old) if higher_is_better else (old - new)
            ok = margin >= -slack - 1e-12
            outcome = "not worse" if ok else "worse"
            if not ok:
                worse.append(name)
        rows.append((name, new, old, slack, outcome))
    for name in SHOWN_METRICS:
        new, old = challenger.get(name), None if champion is None else champion.get(name)
        rows.append((name, new, old, None, "shown, not gated"))
    table = pd.DataFrame(
        rows, columns=["figure", "challenger", "champion", "tolerance", "outcome"]
    ).set_index("figure")
    return GateVerdict(passed=not worse, worse=worse, table=table)

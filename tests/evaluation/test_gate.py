"""The champion/challenger gate: not worse on each gated figure, within its tolerance."""

from __future__ import annotations

import pytest

from qabuse_dagster.evaluation.gate import GATED_METRICS, GateTolerance, champion_gate

CHAMPION = {
    "recall": 1.0,
    "precision_at_k": 0.9,
    "benign_key_day_alert_rate": 0.01,
    "median_time_to_detect_s": 60.0,
    "pr_auc": 0.8,
}


def test_the_first_version_passes_with_nothing_to_compare() -> None:
    verdict = champion_gate(CHAMPION, None)
    assert verdict.passed and verdict.worse == []
    assert set(verdict.table.loc[list(GATED_METRICS), "outcome"]) == {"no champion"}


def test_equal_or_better_passes_and_the_table_shows_both_sides() -> None:
    better = {**CHAMPION, "benign_key_day_alert_rate": 0.0, "precision_at_k": 1.0}
    verdict = champion_gate(better, CHAMPION)
    assert verdict.passed
    assert champion_gate(CHAMPION, CHAMPION).passed
    table = verdict.table
    assert table.loc["benign_key_day_alert_rate", "challenger"] == 0.0
    assert table.loc["benign_key_day_alert_rate", "champion"] == 0.01
    assert table.loc["median_time_to_detect_s", "outcome"] == "shown, not gated"
    assert "| recall" in verdict.markdown()


@pytest.mark.parametrize(
    ("figure", "value"),
    [
        ("recall", 6 / 7),  # one incident the champion caught, missed
        ("precision_at_k", 0.8),  # beyond the 0.05 slack
        ("benign_key_day_alert_rate", 0.02),  # beyond the 0.005 slack
    ],
)
def test_worse_on_any_gated_figure_fails_naming_it(figure: str, value: float) -> None:
    verdict = champion_gate({**CHAMPION, figure: value}, CHAMPION)
    assert not verdict.passed
    assert verdict.worse == [figure]
    assert verdict.table.loc[figure, "outcome"] == "worse"


def test_within_the_tolerance_is_not_worse_and_the_tolerance_is_a_knob() -> None:
    slightly = {**CHAMPION, "precision_at_k": 0.86, "benign_key_day_alert_rate": 0.014}
    assert champion_gate(slightly, CHAMPION).passed
    strict = GateTolerance(precision_at_k=0.0, benign_key_day_alert_rate=0.0)
    assert champion_gate(slightly, CHAMPION, strict).worse == [
        "precision_at_k",
        "benign_key_day_alert_rate",
    ]
    # Worse timing alone is shown, never gated.
    assert champion_gate({**CHAMPION, "median_time_to_detect_s": 600.0}, CHAMPION).passed
    with pytest.raises(ValueError, match="recall tolerance"):
        GateTolerance(recall=-0.1)


def test_a_figure_the_window_cannot_measure_is_shown_not_gated() -> None:
    # No labelled incident after the cutoff: recall and precision@k are undefined.
    unmeasured = {**CHAMPION, "recall": None, "precision_at_k": None}
    verdict = champion_gate(unmeasured, {**CHAMPION, "benign_key_day_alert_rate": 0.0})
    assert verdict.worse == ["benign_key_day_alert_rate"]
    assert verdict.table.loc["recall", "outcome"] == "not measured on this window"

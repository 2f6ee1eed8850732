"""What an alert says drove the score, for two seeded abuses, with the session's @champion.

An alert explains the ensemble's top family with Shapley values (`models.explain`). Each
test takes an incident key's feature rows inside its labelled window, scores them with
the session champion (`score_key` with the rows overlaid on the online values, as the
stream worker scores a minute still open), builds the alert of the strongest one and
checks its explanation names the abuse: a submission-rate feature for the twin's runaway
CI, a shots or cost feature for a credit drain.

A row is the key's window features, its per-minute sequences at the same instant and its
user's row at that instant. The campaign features stay what the online store holds (the
offline campaign view keeps only each key's latest row); a key the store never saw has
none, and the campaign family reads zeros.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from models.explain import attribute
from models.registry import get_family
from qabuse_dagster import settings
from qabuse_dagster.features.definitions import (
    DEMAND_FEATURES,
    ENTITY_COLUMNS,
    FEATURE_NAMES,
    SEQUENCE_COLUMNS,
    TIMESTAMP_COLUMN,
)
from qabuse_dagster.features.store import open_store
from qabuse_dagster.features.windows import sequence_table, window_features
from qabuse_dagster.ingest.partitions import read_raw
from qabuse_dagster.response.alerts import Alert
from qabuse_dagster.serving.alerting import AlertSnapshot, build_alert
from qabuse_dagster.serving.schemas import ScoreResponse
from qabuse_dagster.serving.scoring import Champion, score_key

pytestmark = [pytest.mark.integration]

_KEY, _USER = ENTITY_COLUMNS["api_key"], ENTITY_COLUMNS["user"]
#: How fast a key submits: counts and rates of submissions over a window, their change
#: and their level against the key's own history (not burstiness, which is a shape).
SUBMISSION_RATE_FEATURES = frozenset(
    {
        "submissions_1m",
        "submissions_per_min_5m",
        "submissions_per_min_1h",
        "submissions_per_min_p95_1h",
        "submissions_1m_zscore",
        "submission_rate_change_1m",
        "submission_rate_change_5m",
        "submission_rate_change_1h",
        "submissions_24h",
        "submissions_1h_vs_24h",
    }
)
#: What the jobs ask for and cost: shots per job, estimated cost and its change.
SHOTS_OR_COST_FEATURES = frozenset(
    name for name in FEATURE_NAMES if "shots" in name or "cost" in name
)
#: Every this many rows of the runaway CI's labelled window is scored (a day of minutes).
RUNAWAY_ROW_STRIDE = 10
#: The shot-inflation twin: small, and only the credit drain among the benign tenants.
SHOT_TWIN_HOURS = 36
SHOT_TWIN_SEED = 5
SHOT_SCENARIO = "credit_drain"
_MAX_AGE = timedelta(days=30)

Row = dict[str, Any]


@pytest.fixture(scope="module")
def champion(pipeline_run: Any) -> tuple[Any, Any, Any]:
    return Champion(refresh_s=3600, store=open_store()).get()


def test_feature_sets_name_real_features() -> None:
    assert set(FEATURE_NAMES) >= SUBMISSION_RATE_FEATURES
    assert {"max_shots_1h", "mean_shots_5m", "estimated_cost_1h"} <= SHOTS_OR_COST_FEATURES


@pytest.fixture(scope="module")
def runaway(pipeline_run: Any) -> tuple[str, str, list[Row], dict[datetime, Row]]:
    """The session twin's runaway CI key, its user, every tenth of its labelled window's
    offline rows (with sequences) and its user's rows by instant."""
    (label,) = [i for i in pipeline_run.simulation.incidents if i.kind == "runaway_ci"]
    (key,) = label.api_key_ids
    paths = settings.Paths(pipeline_run.home)
    telemetry = read_raw(paths.raw_telemetry, label.start - timedelta(hours=2), label.end)
    own = telemetry.filter(pc.equal(telemetry[_KEY], key))
    (user,) = pc.unique(own[_USER]).to_pylist()
    key_rows = _window_rows(paths.api_key_windows, _KEY, key, label.start, label.end)
    key_rows = key_rows.take(pa.array(range(0, key_rows.num_rows, RUNAWAY_ROW_STRIDE)))
    user_rows = _window_rows(paths.user_windows, _USER, user, label.start, label.end)
    return key, user, _with_sequences(key_rows, own), _by_instant(user_rows)


def test_the_runaway_ci_alert_is_explained_by_its_submission_rate(
    pipeline_run: Any, champion: tuple[Any, Any, Any], runaway: tuple[Any, ...]
) -> None:
    """The session twin's runaway CI, on its own offline rows (every tenth of its window)."""
    key, user, candidates, user_rows = runaway
    paths = settings.Paths(pipeline_run.home)
    row, user_row, response = _strongest(champion, key, user, candidates, user_rows)
    alert = _alert(champion[0], key, user, row, user_row, response, paths.api_key_windows)

    _assert_explained_by(alert, champion[0], row, user_row, SUBMISSION_RATE_FEATURES)


def test_a_row_without_demand_is_never_anomalous(
    champion: tuple[Any, Any, Any], runaway: tuple[Any, ...]
) -> None:
    """The runaway CI's strongest row, then the same row as if its hour held no submission."""
    key, user, candidates, user_rows = runaway
    row, user_row, response = _strongest(champion, key, user, candidates, user_rows)
    assert response.demand and response.anomalous

    drained = {**row, **dict.fromkeys(DEMAND_FEATURES, 0)}
    loaded, store, inputs = champion
    quiet = score_key(
        loaded, store, inputs, key, user, max_age=_MAX_AGE, overlay=(drained, user_row)
    )
    assert not quiet.demand
    assert not quiet.anomalous
    assert quiet.family_scores  # still scored, and answered: only the verdict differs


def test_the_shot_inflation_alert_is_explained_by_shots_or_cost(
    champion: tuple[Any, Any, Any], pipeline_run: Any, tmp_path: Path
) -> None:
    """A small twin of its own (only a credit drain), its rows computed in batch.

    The key is new to the session's store and windows. Should the champion's top family
    for its strongest row not be a row family (the sequence or campaign family explains
    itself), the row is explained with the Isolation Forest member's SHAP values instead.
    """
    from qabuse_dagster.evaluation.report import read_telemetry_jsonl
    from qabuse_dagster.simulation import simulate
    from qabuse_dagster.telemetry.hashing import KeyedHasher

    twin = simulate(
        hours=SHOT_TWIN_HOURS,
        seed=SHOT_TWIN_SEED,
        out=tmp_path,
        hasher=KeyedHasher.demo(),
        scenarios=[SHOT_SCENARIO],
    )
    (label,) = twin.incidents
    assert label.api_key_ids is not None
    (key,) = label.api_key_ids
    telemetry = read_telemetry_jsonl(twin.telemetry_path)
    own = telemetry.filter(pc.equal(telemetry[_KEY], key))
    (user,) = pc.unique(own[_USER]).to_pylist()

    key_rows = window_features(telemetry, label.start, label.end, _KEY)
    key_rows = key_rows.filter(pc.equal(key_rows[_KEY], key))
    user_rows = window_features(telemetry, label.start, label.end, _USER)
    user_rows = user_rows.filter(pc.equal(user_rows[_USER], user))
    candidates = _with_sequences(key_rows, own)
    assert candidates, "the credit drain has no rows in its window"

    row, user_row, response = _strongest(champion, key, user, candidates, _by_instant(user_rows))
    windows = settings.Paths(pipeline_run.home).api_key_windows
    alert = _alert(champion[0], key, user, row, user_row, response, windows)

    _assert_explained_by(alert, champion[0], row, user_row, SHOTS_OR_COST_FEATURES)


def _window_rows(
    folder: Path, column: str, entity: str, start: datetime, end: datetime
) -> pa.Table:
    """The entity's offline rows with ``start <= event_timestamp < end``, by time."""
    rows = ds.dataset(folder, format="parquet").to_table(
        filter=(pc.field(column) == entity)
        & (pc.field(TIMESTAMP_COLUMN) >= start)
        & (pc.field(TIMESTAMP_COLUMN) < end)
    )
    assert rows.num_rows, f"no rows of {entity} in {folder}"
    return rows.sort_by(TIMESTAMP_COLUMN)


def _with_sequences(key_rows: pa.Table, telemetry: pa.Table) -> list[Row]:
    """Each key row with its per-minute sequences at the same instant."""
    sequences = sequence_table(telemetry, key_rows.select([_KEY, TIMESTAMP_COLUMN]))
    return [
        {**row, **{column: seq[column] for column in SEQUENCE_COLUMNS.values()}}
        for row, seq in zip(key_rows.to_pylist(), sequences.to_pylist(), strict=True)
    ]


def _by_instant(rows: pa.Table) -> dict[datetime, Row]:
    return {row[TIMESTAMP_COLUMN]: row for row in rows.to_pylist()}


def _strongest(
    champion: tuple[Any, Any, Any],
    key: str,
    user: str,
    candidates: Sequence[Row],
    user_rows: Mapping[datetime, Row],
) -> tuple[Row, Row | None, ScoreResponse]:
    """The candidate row the champion scores highest, its user's row and the answer."""
    loaded, store, inputs = champion
    scored = []
    for row in candidates:
        user_row = user_rows.get(row[TIMESTAMP_COLUMN])
        response = score_key(
            loaded, store, inputs, key, user, max_age=_MAX_AGE, overlay=(row, user_row)
        )
        scored.append((response.score, row, user_row, response))
    _, row, user_row, response = max(scored, key=lambda item: item[0])
    return row, user_row, response


def _alert(
    loaded: Any,
    key: str,
    user: str,
    row: Row,
    user_row: Row | None,
    response: ScoreResponse,
    windows: Path,
) -> Alert:
    decided: datetime = row[TIMESTAMP_COLUMN]
    snapshot = AlertSnapshot(
        api_key_id=key,
        user=user,
        action="throttle",
        mode="shadow",
        reason="score above threshold",
        decided_at_ms=int(decided.astimezone(UTC).timestamp() * 1000),
        requires_approval=False,
        response=response,
        minutes=[],
        recent_jobs=[],
        cluster=[],
        ledger_seqs=[],
    )
    return build_alert(snapshot, loaded, windows=windows, user_values=user_row, urls={})


def _assert_explained_by(
    alert: Alert, loaded: Any, key_row: Row, user_row: Row | None, wanted: frozenset[str]
) -> None:
    """The alert's explanation is consistent, and its SHAP attribution tops on ``wanted``.

    A row family (Isolation Forest, LOF, One-Class SVM over the key's row; the user-level
    Isolation Forest over its user's) is explained with SHAP in the alert itself; any
    other family (sequence, campaign) attributes to other inputs, so the row is then
    explained with the Isolation Forest member's SHAP values directly.
    """
    found = _described(alert)
    assert alert.top_family is not None and alert.top_features, found
    contributions = [c.contribution for c in alert.top_features]
    assert contributions == sorted(contributions, reverse=True), found
    family = get_family(alert.top_family)
    if family.input_kind == "rows":
        row = user_row if family.entity == "user" else key_row
        assert row is not None, found
        for item in alert.top_features:
            assert item.value == float(row[item.feature]), (item.feature, found)
        assert alert.top_features[0].feature in wanted, found
    if family.input_kind == "rows":
        assert alert.explainer.startswith("shap."), found
        return
    forest = get_family("isolation_forest")
    names = list(forest.feature_names)
    explainer, values = attribute(
        loaded.members[forest.name].detector, np.array([[float(key_row[n]) for n in names]])
    )
    top = names[int(np.argmax(values[0]))]
    assert explainer == "shap.TreeExplainer", found
    assert top in wanted, (top, found)


def _described(alert: Alert) -> str:
    """What an assertion message shows: the family scores and the explanation."""
    scores = ", ".join(f"{f.family}={f.standardised:.2f}" for f in alert.family_scores)
    features = ", ".join(
        f"{c.feature}={c.value} ({c.contribution:+.3f})" for c in alert.top_features
    )
    return f"top {alert.top_family} by {alert.explainer} [{scores}]: {features}"

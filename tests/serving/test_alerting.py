"""What the stream worker keeps for alerts: last jobs, the last hour, the code-hash cluster."""

from __future__ import annotations

from qabuse_dagster.serving.alerting import RECENT_JOBS, KeyActivity

KEY, OTHER, THIRD = "aa" * 8, "bb" * 8, "cc" * 8
USER, OTHER_USER = "11" * 8, "22" * 8
MINUTE = 60_000
DAY = 24 * 60 * MINUTE


def _record(key: str, job: str, status: str, **extra: object) -> dict:
    return {"api_key_id": key, "job_id": job, "status": status, "user": USER, **extra}


def test_the_last_jobs_are_kept_newest_first_at_their_latest_status() -> None:
    activity = KeyActivity()
    for i in range(RECENT_JOBS + 5):
        activity.note(_record(KEY, f"j{i}", "submitted", shots=100 + i, backend="b"), i * 1000)
    activity.note(_record(KEY, f"j{RECENT_JOBS + 4}", "failed"), 99_000)
    jobs = activity.recent_jobs(KEY)
    assert [j.job_id for j in jobs] == [f"j{i}" for i in range(RECENT_JOBS + 4, 4, -1)]
    assert jobs[0].status == "failed" and jobs[0].shots == 100 + RECENT_JOBS + 4
    assert jobs[1].status == "submitted" and jobs[1].backend == "b"
    assert activity.recent_jobs(OTHER) == []


def test_the_last_hour_comes_from_the_newest_rows_sequences() -> None:
    activity = KeyActivity()
    subs, fails = list(range(60)), [0] * 59 + [4]
    activity.note_row(
        KEY, {"submissions_last_60_min": subs, "failures_last_60_min": fails}, 120 * MINUTE
    )
    # An older row (a late replay) does not replace a newer one.
    activity.note_row(
        KEY, {"submissions_last_60_min": [9] * 60, "failures_last_60_min": [9] * 60}, 60 * MINUTE
    )
    minutes = activity.last_hour(KEY)
    assert [m.submissions for m in minutes] == subs
    assert minutes[-1].failures == 4
    assert minutes[0].minute.timestamp() * 1000 == 60 * MINUTE
    assert minutes[-1].minute.timestamp() * 1000 == 119 * MINUTE
    assert activity.last_hour(OTHER) == []


def test_the_cluster_names_other_keys_and_users_of_the_same_code_within_a_day() -> None:
    activity = KeyActivity()
    shared, mine = "c1" * 16, "c2" * 16
    activity.note(_record(KEY, "a", "submitted", code_hash=shared), 10 * MINUTE)
    activity.note(_record(KEY, "b", "submitted", code_hash=mine), 10 * MINUTE)
    activity.note({**_record(OTHER, "c", "submitted", code_hash=shared), "user": OTHER_USER}, DAY)
    activity.note({**_record(THIRD, "d", "submitted", code_hash=shared), "user": USER}, 0)
    now = DAY + 5 * MINUTE
    cluster = activity.cluster(KEY, now)
    assert [c.code_hash for c in cluster] == [shared, mine]
    # THIRD ran it more than a day before now: out of the window.
    assert cluster[0].other_keys == 1 and cluster[0].key_ids == [OTHER]
    assert cluster[0].other_users == 1 and cluster[0].user_ids == [OTHER_USER]
    assert cluster[1].other_keys == 0
    activity.prune(now)
    assert THIRD not in activity.by_hash[shared]
    activity.prune(now + DAY)
    assert activity.by_hash == {} and activity.hashes == {}


def test_usual_values_are_the_keys_hourly_medians_over_the_last_day(tmp_path) -> None:
    from datetime import UTC, datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    from qabuse_dagster.serving.alerting import UsualValues

    def hour_file(stamp: str, rows: list[tuple[str, float]]) -> None:
        table = pa.table(
            {"api_key_id": [k for k, _ in rows], "submissions_1m": [v for _, v in rows]}
        )
        pq.write_table(table, tmp_path / f"{stamp}.parquet")

    hour_file("2026-03-01T10", [(KEY, 1.0), (KEY, 3.0), (OTHER, 100.0)])  # median 2
    hour_file("2026-03-01T11", [(KEY, 10.0)])
    hour_file("2026-03-01T12", [(KEY, 4.0)])
    hour_file("2026-02-27T12", [(KEY, 1000.0)])  # older than a day before the alert
    hour_file("2026-03-01T13", [(KEY, 9999.0)])  # the alert's own hour: not usual
    (tmp_path / "notes.parquet").write_bytes(b"not an hourly file")
    usual = UsualValues(tmp_path)
    before = datetime(2026, 3, 1, 13, 0, tzinfo=UTC)
    assert usual(KEY, ["submissions_1m", "added_later"], before) == {"submissions_1m": 4.0}
    assert usual(OTHER, ["submissions_1m"], before) == {"submissions_1m": 100.0}
    assert usual(THIRD, ["submissions_1m"], before) == {}
    # Each hour in the day was read once per feature set (two here), whatever the number
    # of alerts.
    assert len(usual._medians) == 3 * 2


def test_an_alert_names_each_campaign_view_that_groups_the_key() -> None:
    from types import SimpleNamespace

    from qabuse_dagster.serving.alerting import _campaign

    features = {
        "group_keys_1h": 0.0,
        "group_keys_births": 25.0,
        "group_users_births": 25.0,
        "group_networks_births": 25.0,
        "sync_share_births": 1.0,
    }
    response = SimpleNamespace(
        features=features,
        family_scores={"campaign": 4.6},
        family_standardised={"campaign": 9.0},
    )
    group = _campaign(response)  # type: ignore[arg-type]
    assert group is not None
    assert set(group) == {"births", "score", "standardised"}
    assert group["births"] == {
        "group_keys": 25.0,
        "group_users": 25.0,
        "group_networks": 25.0,
        "sync_share": 1.0,
    }
    quiet = SimpleNamespace(
        features={"group_keys_1h": 0.0}, family_scores={}, family_standardised={}
    )
    assert _campaign(quiet) is None  # type: ignore[arg-type]

"""The window features each row family reads (names from `qabuse_dagster.features.definitions`).

Chosen for signals an abuse engineer recognises, not for any one scenario: volume and
its change against the entity's own past, timing regularity, activity around the
clock, cost, failures and auth failures (spread across one network's keys), and key
sharing (networks, client agents).
"""

from __future__ import annotations

from qabuse_dagster.features.definitions import FEATURES_BY_NAME

#: Volume, change against its own past, and timing.
VOLUME = (
    "submissions_1m",
    "submissions_per_min_5m",
    "submissions_per_min_1h",
    "submissions_1m_zscore",
    "submissions_per_min_p95_1h",
    "burstiness_1h",
)
#: What the jobs cost and how they end.
INTENSITY = (
    "mean_shots_5m",
    "max_shots_1h",
    "estimated_cost_5m",
    "estimated_cost_1h",
    "fail_rate_5m",
    "fail_rate_1h",
    "rejected_5m",
    "auth_failures_5m",
    "auth_failures_1h",
)
#: Who submits and what: key sharing. Not the key's age (within a day's lookback a new
#: key and one back after a quiet day look the same, and keys come back after a day all
#: the time) and not code-hash sharing (a class running one notebook shares it too):
#: coordination and newness are the campaign family's, which reads them from the graph
#: and from days of history.
IDENTITY = (
    "distinct_code_hashes_5m",
    "distinct_networks_1h",
    "distinct_client_agents_1h",
)
#: Long-horizon signals: regularity, activity around the clock, change against the day.
HISTORY = (
    "interarrival_regularity_1h",
    "interarrival_regularity_24h",
    "active_hours_24h",
    "submissions_1h_vs_24h",
    "cost_1h_vs_24h",
    "submissions_24h",
    "network_auth_failure_entities_1h",
)


def _available(*groups: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(name for group in groups for name in group if name in FEATURES_BY_NAME)


#: The inputs of the tree and kernel families (every signal above).
ROW_FEATURES: tuple[str, ...] = _available(VOLUME, INTENSITY, IDENTITY, HISTORY)
#: A compact set for the distance-based family (LOF), where many dimensions blur distances.
COMPACT_FEATURES: tuple[str, ...] = _available(
    (
        "submissions_per_min_5m",
        "submissions_per_min_1h",
        "submissions_1m_zscore",
        "mean_shots_5m",
        "estimated_cost_1h",
        "fail_rate_1h",
        "auth_failures_1h",
        "distinct_networks_1h",
        "interarrival_regularity_1h",
        "active_hours_24h",
        "submissions_1h_vs_24h",
    ),
)

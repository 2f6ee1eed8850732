"""The window features: one definition, read by the batch and the streaming engines.

A feature row describes one *entity* (an api key or a user) at one instant ``t``, a
minute boundary, from the records strictly before it. A window of ``W`` minutes holds the
entity's minutes ``t - W .. t - 1``; the windows are 1 minute, 5 minutes and 1 hour, and
the *previous* window of the same length holds minutes ``t - 2W .. t - W - 1``. An entity
gets a row at every minute boundary whose 5-minute window holds one of its records, so the
latest row of an entity is also its current state once it falls silent.

The definition has two halves, shared by both engines so their numbers agree:

1. *Aggregates* (`AGGREGATES`): sums, maxima, distinct counts, medians and a few instants
   over the window's records. `qabuse_dagster.features.windows` computes them with
   vectorised numpy over a whole table, `qabuse_dagster.features.streaming` incrementally,
   record by record. Both follow these conventions:

   * a *submission* is the earliest record of each job (``job_id``, per entity), at that
     record's timestamp, whatever its status: an event stream (``submitted``, then a
     terminal record) and a job log (one terminal record per job) count a job once. A
     record is its job's earliest when no record of the same job lies in the
     `JOB_MEMORY_MINUTES` before it (ties at one instant go by `SUBMISSION_PRECEDENCE`,
     ``submitted`` first), so a record arriving a day after the last one of its job counts
     again; a record without a ``job_id`` is a submission when it is ``submitted`` or
     ``rejected``. Records are unique by identity (``job_id``, ``status``), as ingest
     keeps them. Shots, code hashes, networks, client agents, backends and the cost are
     read from that earliest record only (a field null there counts as absent even if a
     later record of the job carries it);
   * an *outcome* is a ``completed``, ``failed``, ``cancelled`` or ``rejected`` record,
     and a *failure* a ``failed`` or ``rejected`` one;
   * an *auth failure* is any record with ``error_code`` ``auth_failed``;
   * a *runtime* is the ``runtime_s`` of a ``completed`` record;
   * the *estimated cost* of a submission that is not ``rejected`` is ``shots x
     num_circuits x depth x backend weight`` in QPU shot-layers (`backend_cost_weight`;
     an analytic job counts one shot, an unknown circuit count 1, an unknown or zero
     depth 1);
   * the *backend load* of a submission is the number of submissions (by every entity) to
     its backend in its minute; the *code-hash sharing* of a submission is the number of
     other entities that submitted its code hash in the hour ending with its minute; the
     *network auth failures* of a record with a ``source_ip_hash`` are the number of other
     entities with an auth failure from that network in the hour ending with its minute;
   * the *inter-arrival gaps* of a window are the differences, in whole milliseconds,
     between its consecutive submission instants (floored to the millisecond);
   * *per-minute sequences* (`SEQUENCE_CHANNELS`) hold, per channel, the integer sums of
     the entity's minutes ``t - 60 .. t - 1``, oldest first, zeros for silent minutes.

2. *Features* (`FEATURES`): `derive` turns aggregate columns into feature columns with
   numpy, the same code for both engines. Ratios over an empty denominator are 0, so the
   models never see NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

TIMESTAMP_COLUMN = "event_timestamp"
#: Feast entity name -> the telemetry column (and feature-row join key) it is read from.
ENTITY_COLUMNS: dict[str, str] = {"api_key": "api_key_id", "user": "user"}
#: Window suffix -> length in minutes.
WINDOWS: dict[str, int] = {"1m": 1, "5m": 5, "1h": 60}
#: How far back a row's entity-age and gap features look, in minutes.
ACTIVITY_LOOKBACK_MINUTES = 24 * 60
#: A record is its job's submission unless a record of the same job lies this many
#: minutes before it: how long the engines remember job ids (an entity's state lives a day).
JOB_MEMORY_MINUTES = ACTIVITY_LOOKBACK_MINUTES
#: Order of the records of one job at one instant: the first is the job's submission.
SUBMISSION_PRECEDENCE: dict[str, int] = {
    status: rank
    for rank, status in enumerate(
        ("submitted", "queued", "running", "rejected", "completed", "failed", "cancelled")
    )
}
#: Length of the day-long windows (submissions, cost and active hours over 24 h).
DAY_MINUTES = 24 * 60
#: Per-minute channels of the sequences a sequence model reads, in channel order: per
#: minute, submissions, failed or rejected outcomes, auth failures, shots of the
#: submissions and distinct code hashes submitted.
SEQUENCE_CHANNELS: tuple[str, ...] = (
    "submissions",
    "failures",
    "auth_failures",
    "shots_sum",
    "distinct_code_hashes",
)
#: Minutes per sequence: ``t - 60 .. t - 1``, oldest first.
SEQUENCE_MINUTES = 60
#: Sequence channel -> its feature column (a list of `SEQUENCE_MINUTES` int64 values).
SEQUENCE_COLUMNS: dict[str, str] = {c: f"{c}_last_60_min" for c in SEQUENCE_CHANNELS}
#: How far back a row's window aggregates look (the previous hour-long window).
WINDOW_LOOKBACK_MINUTES = 2 * 60
#: Sharing of a code hash counts the other entities that used it in this many minutes.
SHARING_MINUTES = 60
ZSCORE_STD_FLOOR = 1.0
#: The inter-arrival CV range the regularity feature reads (a clock, and far burstier
#: than any arrival process a key shows in an hour).
REGULARITY_CV_FLOOR = 0.001
REGULARITY_CV_CEILING = 100.0
#: Gaps a regularity needs (fewer: 0, no evidence). A few jobs of one loop are evenly
#: spaced by construction, and a person's by chance: of random (Poisson) arrivals, about 1
#: window in 1,000 reads as steady as a poller (cv <= 0.2) over 6 gaps, 1 in 70,000 over
#: 10, and every key is looked at every minute.
REGULARITY_MIN_GAPS = 10
#: Nearest-rank percentile of per-minute submissions over the last hour.
RATE_PERCENTILE = 95
#: 0-based rank of that percentile among the hour's 60 per-minute counts.
RATE_PERCENTILE_RANK = -(-RATE_PERCENTILE * 60 // 100) - 1

_SIMULATOR_MARKERS = ("simulator", "sim", "qubit", "sv1", "dm1", "tn1", "aer", "qsim", "local")


def backend_cost_weight(backend: str | None) -> int:
    """Cost of one shot of one circuit layer on ``backend``, in hundredths of a QPU shot-layer.

    Quantum hardware costs 100; a managed or local simulator (recognised by its name:
    ``aer_simulator``, ``sv1``, ``default.qubit``, ``cirq.simulator`` ...) costs 1, since
    it burns no QPU credit but still uses shared compute. Integer weights keep window
    sums of costs exact in any order (below 2**53), so both engines agree to the bit.
    """
    name = (backend or "").lower()
    return 1 if any(marker in name for marker in _SIMULATOR_MARKERS) else COST_SCALE


#: Cost weights are in 1/COST_SCALE of a QPU shot-layer; `derive` divides by it.
COST_SCALE = 100


@dataclass(frozen=True)
class FeatureSpec:
    """One feature column: its name, unit and meaning (shown in Feast and the UI)."""

    name: str
    unit: str
    description: str
    #: The feature view it belongs to: ``1m``, ``5m`` or ``1h``.
    window: str
    integer: bool = False
    #: Lower and upper bounds every value satisfies (None: unbounded), for the asset checks.
    low: float | None = 0.0
    high: float | None = None


def _window_specs(suffix: str, minutes: int) -> list[FeatureSpec]:
    span = {"1m": "the last minute", "5m": "the last 5 minutes", "1h": "the last hour"}[suffix]
    prev = {"1m": "the minute before", "5m": "the 5 minutes before", "1h": "the hour before"}[
        suffix
    ]
    specs = [
        FeatureSpec(
            "submissions_1m",
            "jobs",
            "Submissions (jobs, counted at their earliest record) in the last minute.",
            suffix,
            integer=True,
        )
        if minutes == 1
        else FeatureSpec(
            f"submissions_per_min_{suffix}",
            "jobs/min",
            f"Mean submissions per minute over {span}.",
            suffix,
        ),
        FeatureSpec(
            f"submission_rate_change_{suffix}",
            "jobs/min",
            f"Submissions per minute in {span} minus those in {prev}.",
            suffix,
            low=None,
        ),
        FeatureSpec(f"mean_shots_{suffix}", "shots", f"Mean shots per submission, {span}.", suffix),
        FeatureSpec(
            f"max_shots_{suffix}",
            "shots",
            f"Largest shots of one submission, {span}.",
            suffix,
            integer=True,
        ),
        FeatureSpec(
            f"median_runtime_s_{suffix}",
            "s",
            f"Median runtime of the jobs that completed in {span} (0 when none did).",
            suffix,
        ),
        FeatureSpec(
            f"fail_rate_{suffix}",
            "ratio",
            f"Failed or rejected outcomes over all outcomes, {span}.",
            suffix,
            high=1.0,
        ),
        FeatureSpec(
            f"fail_rate_change_{suffix}",
            "ratio",
            f"Fail rate in {span} minus the fail rate in {prev}.",
            suffix,
            low=-1.0,
            high=1.0,
        ),
        FeatureSpec(
            f"rejected_{suffix}",
            "jobs",
            f"Submissions the API refused, {span}.",
            suffix,
            integer=True,
        ),
        FeatureSpec(
            f"auth_failures_{suffix}",
            "records",
            f"Records with error code auth_failed, {span}.",
            suffix,
            integer=True,
        ),
        FeatureSpec(
            f"distinct_code_hashes_{suffix}",
            "count",
            f"Distinct code hashes submitted, {span}.",
            suffix,
            integer=True,
        ),
        FeatureSpec(
            f"circuit_reuse_fraction_{suffix}",
            "ratio",
            f"Share of submissions in {span} that reuse a code hash (circuit structure) "
            "submitted earlier in the window: high for variational loops, which change only "
            "parameters.",
            suffix,
            high=1.0,
        ),
        FeatureSpec(
            f"distinct_networks_{suffix}",
            "count",
            f"Distinct source networks (/24 or /48) submitting, {span}: key sharing.",
            suffix,
            integer=True,
        ),
        FeatureSpec(
            f"distinct_client_agents_{suffix}",
            "count",
            f"Distinct client agents submitting, {span}: key sharing.",
            suffix,
            integer=True,
        ),
        FeatureSpec(
            f"estimated_cost_{suffix}",
            "QPU shot-layers",
            f"Sum of shots x circuits x depth x backend weight of the jobs submitted in {span}.",
            suffix,
        ),
        FeatureSpec(
            f"backend_load_at_submit_{suffix}",
            "jobs/min",
            f"Mean submissions (by everyone) to the same backend in the minute of each "
            f"submission, {span}: queue pressure.",
            suffix,
        ),
        FeatureSpec(
            f"code_hash_sharing_{suffix}",
            "entities",
            f"Largest number of other entities that submitted, in the hour up to it, the code "
            f"hash of a submission in {span}: campaigns.",
            suffix,
            integer=True,
        ),
    ]
    if minutes > 1:
        specs.append(
            FeatureSpec(
                f"burstiness_{suffix}",
                "ratio",
                f"Busiest minute's submissions over the mean per minute, {span} "
                f"(1 = even, {minutes} = all in one minute; 0 when idle).",
                suffix,
                high=float(minutes),
            )
        )
    return specs


FEATURES: tuple[FeatureSpec, ...] = (
    *(spec for suffix, minutes in WINDOWS.items() for spec in _window_specs(suffix, minutes)),
    FeatureSpec(
        "submissions_1m_zscore",
        "std devs",
        "Last minute's submissions against the entity's previous 59 minutes (std floored at 1).",
        "1h",
        low=None,
    ),
    FeatureSpec(
        "failures_1m_zscore",
        "std devs",
        "Last minute's failed or rejected outcomes against the previous 59 minutes "
        "(std floored at 1).",
        "1h",
        low=None,
    ),
    FeatureSpec(
        "submissions_per_min_p95_1h",
        "jobs/min",
        "95th percentile (nearest rank) of per-minute submissions over the last hour, "
        "idle minutes included.",
        "1h",
        integer=True,
    ),
    FeatureSpec(
        "hours_since_first_seen_24h",
        "h",
        "Hours since the entity's first record, looking back 24 h (24: seen a day ago; "
        "small: new, or back after a day's silence).",
        "1h",
        high=24.0,
    ),
    FeatureSpec(
        "gap_before_latest_activity_min",
        "min",
        "Minutes between the entity's latest active minute and the active minute before it "
        "(1440 when there was none in the last 24 h).",
        "1h",
        integer=True,
        high=float(ACTIVITY_LOOKBACK_MINUTES),
    ),
    FeatureSpec(
        "interarrival_cv_1h",
        "ratio",
        "Coefficient of variation (std / mean) of the gaps between consecutive submissions "
        "in the last hour, at millisecond resolution: near 0 for a regular bot, above 1 for "
        "bursty people (1, the value of random arrivals, with fewer than 3 submissions or "
        "no gap: no evidence either way).",
        "1h",
    ),
    FeatureSpec(
        "interarrival_regularity_1h",
        "decades",
        "How regular the last hour's submissions are, in decades: -log10 of "
        "interarrival_cv_1h (floored at 0.001), so 0 for random arrivals, 1 for gaps ten "
        "times steadier, up to 3 for a clock; negative for bursts; 0 with fewer than "
        f"{REGULARITY_MIN_GAPS} gaps. The log scale keeps the gap between a steady poller "
        "(cv 0.1) and a steady person (cv 0.5) as wide as the one between a person and a "
        "burst.",
        "1h",
        low=-math.log10(REGULARITY_CV_CEILING),
        high=-math.log10(REGULARITY_CV_FLOOR),
    ),
    FeatureSpec(
        "interarrival_regularity_24h",
        "decades",
        "interarrival_regularity_1h over the last 24 hours: -log10 of the coefficient of "
        "variation of the gaps of at most an hour between consecutive submissions (longer "
        "gaps are breaks between sessions and left out); 0 with fewer than "
        f"{REGULARITY_MIN_GAPS} such gaps. A poller steady all day stays high; a person, "
        "a test suite or an optimiser loop, bursty between breaks, does not.",
        "1h",
        low=-math.log10(REGULARITY_CV_CEILING),
        high=-math.log10(REGULARITY_CV_FLOOR),
    ),
    FeatureSpec(
        "active_hours_24h",
        "hours",
        "Distinct hours of the day (UTC) with a submission in the last 24 hours: 24 for a "
        "key that never sleeps.",
        "1h",
        integer=True,
        high=24.0,
    ),
    FeatureSpec(
        "submissions_24h",
        "jobs",
        "Submissions in the last 24 hours.",
        "1h",
        integer=True,
    ),
    FeatureSpec(
        "estimated_cost_24h",
        "QPU shot-layers",
        "Estimated cost (as estimated_cost_1h) of the jobs submitted in the last 24 hours.",
        "1h",
    ),
    FeatureSpec(
        "submissions_1h_vs_24h",
        "ratio",
        "Submissions in the last hour over the mean hourly submissions of the last 24 hours "
        "(1: as usual; 24: the whole day in the last hour; 0 without submissions).",
        "1h",
        high=24.0,
    ),
    FeatureSpec(
        "cost_1h_vs_24h",
        "ratio",
        "Estimated cost in the last hour over the mean hourly estimated cost of the last 24 "
        "hours (0 without cost).",
        "1h",
        high=24.0,
    ),
    FeatureSpec(
        "network_auth_failure_entities_1h",
        "entities",
        "Largest number of other entities with an auth failure, in the hour up to it, from "
        "a network this entity sent a record from in the last hour: credential stuffing "
        "spread over keys.",
        "1h",
        integer=True,
    ),
)
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
FEATURES_BY_NAME: dict[str, FeatureSpec] = {f.name: f for f in FEATURES}
#: Feature names per view suffix (``1m``, ``5m``, ``1h``).
FEATURES_BY_WINDOW: dict[str, tuple[str, ...]] = {
    suffix: tuple(f.name for f in FEATURES if f.window == suffix) for suffix in WINDOWS
}
#: The inputs of the api-key detector (feature service ``api_key_detector_v1``), in order.
DETECTOR_FEATURES: tuple[str, ...] = (
    "submissions_1m",
    "mean_shots_1m",
    "fail_rate_1m",
    "distinct_code_hashes_1m",
    "submissions_per_min_5m",
    "mean_shots_5m",
    "fail_rate_5m",
    "distinct_code_hashes_5m",
    "submissions_1m_zscore",
)


#: The features that say an entity asked for service in its last hour: it submitted (a
#: refused submission counts) or failed to authenticate.
DEMAND_FEATURES: tuple[str, ...] = ("submissions_per_min_1h", "auth_failures_1h")


def has_demand(values: Mapping[str, Any]) -> np.ndarray:
    """Whether each row shows demand in its last hour: a `DEMAND_FEATURES` value above 0.

    A row without demand only reports the outcomes of jobs submitted over an hour before
    (a long queue draining): there is nothing to mitigate, so detectors neither learn
    from such rows nor alert on them. ``values`` maps feature names to arrays or scalars
    (a DataFrame, a row's dict); a row whose demand features are all missing counts as
    demanding (nothing to judge by).

    Example:
        >>> has_demand({"submissions_per_min_1h": [0.0, 0.5], "auth_failures_1h": [0, 0]})
        array([False,  True])
    """
    present = [
        np.asarray(values[name], dtype=np.float64) > 0 for name in DEMAND_FEATURES if name in values
    ]
    if not present:
        return np.asarray(True)
    return np.asarray(np.logical_or.reduce(present))


def feature_schema(
    entity_column: str = "api_key_id", names: Iterable[str] = FEATURE_NAMES
) -> pa.Schema:
    """Columns and types of the feature rows of one entity (its Feast offline source)."""
    return pa.schema(
        [
            (entity_column, pa.string()),
            (TIMESTAMP_COLUMN, pa.timestamp("us", tz="UTC")),
            *((n, pa.int64() if FEATURES_BY_NAME[n].integer else pa.float64()) for n in names),
        ]
    )


def sequence_schema(entity_column: str = "api_key_id") -> pa.Schema:
    """Columns and types of the per-minute sequence rows of one entity (`SEQUENCE_COLUMNS`)."""
    return pa.schema(
        [
            (entity_column, pa.string()),
            (TIMESTAMP_COLUMN, pa.timestamp("us", tz="UTC")),
            *((column, pa.list_(pa.int64())) for column in SEQUENCE_COLUMNS.values()),
        ]
    )


# Aggregates per window length W (suffix `_W`, W in minutes), then per row.
WINDOW_INT_AGGREGATES = (
    "subs",  # submissions
    "shots_sum",  # shots of the submissions that have shots
    "shots_n",  # submissions that have shots
    "outcomes",
    "failures",
    "rejected",
    "auth",  # auth failures
    "load",  # backend load summed over the submissions
    "prev_subs",  # previous window's submissions, outcomes, failures
    "prev_outcomes",
    "prev_failures",
    "shots_max",  # largest shots of a submission (0 when none)
    "peak_subs",  # largest submissions of one minute
    "share_max",  # largest code-hash sharing of a submission
    "codes",  # distinct code hashes, networks, client agents of the submissions
    "networks",
    "agents",
)
WINDOW_FLOAT_AGGREGATES = ("cost", "median_runtime")
ROW_INT_AGGREGATES = (
    "hist_subs",  # sum over minutes t - 60 .. t - 2 of per-minute submissions
    "hist_subs_sq",  # ... of their squares
    "hist_failures",
    "hist_failures_sq",
    "p95_subs",  # RATE_PERCENTILE of per-minute submissions over t - 60 .. t - 1
    "first_seen_min",  # t minus the first active minute in the last 24 h
    "gap_min",  # latest active minute minus the one before (1440 when none)
    "iat_span_ms",  # last minus first submission instant of t - 60 .. t - 1, in ms
    "iat_sq_ms",  # sum of the squared gaps between consecutive ones, in ms^2
    "subs_day",  # submissions in t - 1440 .. t - 1
    "active_hours_day",  # distinct hours of the day of those submissions' minutes
    "net_auth_max",  # largest network auth failures of a record in t - 60 .. t - 1
    # Gaps of at most SHARING_MINUTES between consecutive submissions of t - 1440 .. t - 1
    # (the first one's, reaching back before, left out): their number, sum and squares.
    "iat_day_gaps",
    "iat_day_sum_ms",
    "iat_day_sq_ms",
)
ROW_FLOAT_AGGREGATES = ("cost_day",)  # cost of the submissions in t - 1440 .. t - 1
AGGREGATES: tuple[str, ...] = (
    *(f"{name}_{w}" for w in WINDOWS.values() for name in WINDOW_INT_AGGREGATES),
    *(f"{name}_{w}" for w in WINDOWS.values() for name in WINDOW_FLOAT_AGGREGATES),
    *ROW_INT_AGGREGATES,
    *ROW_FLOAT_AGGREGATES,
)


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator`` as float64, 0 where the denominator is 0."""
    out = np.zeros(len(numerator), dtype=np.float64)
    nonzero = denominator != 0
    out[nonzero] = np.asarray(numerator)[nonzero].astype(np.float64) / denominator[nonzero]
    return out


def _zscore(last: np.ndarray, hist_sum: np.ndarray, hist_sq: np.ndarray) -> np.ndarray:
    mean = hist_sum / 59.0
    meansq = hist_sq / 59.0
    std = np.maximum(np.sqrt(np.maximum(meansq - mean**2, 0.0)), ZSCORE_STD_FLOOR)
    return (last - mean) / std


def _interarrival_cv(n: np.ndarray, span: np.ndarray, sq: np.ndarray) -> np.ndarray:
    """std / mean of the ``n - 1`` gaps between ``n`` submissions spanning ``span``."""
    return _gap_cv(np.asarray(n) - 1, span, sq, 2)


def _gap_cv(gaps: np.ndarray, total: np.ndarray, sq: np.ndarray, least: int) -> np.ndarray:
    """std / mean of ``gaps`` gaps summing to ``total`` with squares summing to ``sq``.

    ``std / mean = sqrt(gaps * sq - total**2) / total``; 1 where that is undefined (fewer
    than ``least`` gaps, or all of length 0).
    """
    g, total, sq = (np.asarray(x, dtype=np.float64) for x in (gaps, total, sq))
    # Undefined: 1, as for random arrivals, so "no evidence" never reads as "perfectly
    # regular" (0).
    out = np.ones(len(g), dtype=np.float64)
    some = (g >= least) & (total > 0)
    spread = g[some] * sq[some] - total[some] * total[some]
    out[some] = np.sqrt(np.maximum(spread, 0.0)) / total[some]
    return out


def _regularity(cv: np.ndarray) -> np.ndarray:
    """``-log10(cv)``, with ``cv`` clipped to [`REGULARITY_CV_FLOOR`, `REGULARITY_CV_CEILING`]."""
    return -np.log10(np.clip(cv, REGULARITY_CV_FLOOR, REGULARITY_CV_CEILING))


#: Reads one aggregate column by its `AGGREGATES` name.
Getter = Callable[[str], np.ndarray]


def _window_formulas(suffix: str, w: int) -> dict[str, Callable[[Getter], np.ndarray]]:
    def a(get: Getter, name: str) -> np.ndarray:
        return np.asarray(get(f"{name}_{w}"))

    def fail_rate(get: Getter) -> np.ndarray:
        return ratio(a(get, "failures"), a(get, "outcomes"))

    formulas: dict[str, Callable[[Getter], np.ndarray]] = {
        f"submissions_per_min_{suffix}": lambda get: a(get, "subs") / float(w),
        f"submission_rate_change_{suffix}": (
            lambda get: (a(get, "subs") - a(get, "prev_subs")) / float(w)
        ),
        f"mean_shots_{suffix}": lambda get: ratio(a(get, "shots_sum"), a(get, "shots_n")),
        f"max_shots_{suffix}": lambda get: a(get, "shots_max"),
        f"median_runtime_s_{suffix}": lambda get: a(get, "median_runtime"),
        f"fail_rate_{suffix}": fail_rate,
        f"fail_rate_change_{suffix}": (
            lambda get: fail_rate(get) - ratio(a(get, "prev_failures"), a(get, "prev_outcomes"))
        ),
        f"rejected_{suffix}": lambda get: a(get, "rejected"),
        f"auth_failures_{suffix}": lambda get: a(get, "auth"),
        f"distinct_code_hashes_{suffix}": lambda get: a(get, "codes"),
        f"circuit_reuse_fraction_{suffix}": (
            lambda get: ratio(np.maximum(a(get, "subs") - a(get, "codes"), 0), a(get, "subs"))
        ),
        f"distinct_networks_{suffix}": lambda get: a(get, "networks"),
        f"distinct_client_agents_{suffix}": lambda get: a(get, "agents"),
        f"estimated_cost_{suffix}": lambda get: a(get, "cost") / float(COST_SCALE),
        f"backend_load_at_submit_{suffix}": lambda get: ratio(a(get, "load"), a(get, "subs")),
        f"code_hash_sharing_{suffix}": lambda get: a(get, "share_max"),
        f"burstiness_{suffix}": lambda get: ratio(a(get, "peak_subs") * w, a(get, "subs")),
    }
    if w == 1:  # a count, not a rate; and one minute cannot be bursty
        del formulas[f"submissions_per_min_{suffix}"], formulas[f"burstiness_{suffix}"]
        formulas["submissions_1m"] = lambda get: a(get, "subs")
    return formulas


_FORMULAS: dict[str, Callable[[Getter], np.ndarray]] = {
    **{
        name: formula
        for suffix, w in WINDOWS.items()
        for name, formula in _window_formulas(suffix, w).items()
    },
    "submissions_1m_zscore": lambda get: _zscore(
        np.asarray(get("subs_1")), np.asarray(get("hist_subs")), np.asarray(get("hist_subs_sq"))
    ),
    "failures_1m_zscore": lambda get: _zscore(
        np.asarray(get("failures_1")),
        np.asarray(get("hist_failures")),
        np.asarray(get("hist_failures_sq")),
    ),
    "submissions_per_min_p95_1h": lambda get: np.asarray(get("p95_subs")),
    "hours_since_first_seen_24h": lambda get: np.asarray(get("first_seen_min")) / 60.0,
    "gap_before_latest_activity_min": lambda get: np.asarray(get("gap_min")),
    "interarrival_cv_1h": lambda get: _interarrival_cv(
        np.asarray(get("subs_60")), np.asarray(get("iat_span_ms")), np.asarray(get("iat_sq_ms"))
    ),
    "interarrival_regularity_1h": lambda get: _regularity(
        _gap_cv(
            np.asarray(get("subs_60")) - 1,
            np.asarray(get("iat_span_ms")),
            np.asarray(get("iat_sq_ms")),
            REGULARITY_MIN_GAPS,
        )
    ),
    "interarrival_regularity_24h": lambda get: _regularity(
        _gap_cv(
            np.asarray(get("iat_day_gaps")),
            np.asarray(get("iat_day_sum_ms")),
            np.asarray(get("iat_day_sq_ms")),
            REGULARITY_MIN_GAPS,
        )
    ),
    "active_hours_24h": lambda get: np.asarray(get("active_hours_day")),
    "submissions_24h": lambda get: np.asarray(get("subs_day")),
    "estimated_cost_24h": lambda get: np.asarray(get("cost_day")) / float(COST_SCALE),
    "submissions_1h_vs_24h": lambda get: ratio(
        np.asarray(get("subs_60")) * (DAY_MINUTES // 60), np.asarray(get("subs_day"))
    ),
    "cost_1h_vs_24h": lambda get: ratio(
        np.asarray(get("cost_60")) * float(DAY_MINUTES // 60), np.asarray(get("cost_day"))
    ),
    "network_auth_failure_entities_1h": lambda get: np.asarray(get("net_auth_max")),
}
assert set(_FORMULAS) == set(FEATURE_NAMES), set(_FORMULAS) ^ set(FEATURE_NAMES)


def _reads(formula: Callable[[Getter], np.ndarray]) -> frozenset[str]:
    read: set[str] = set()

    def record(name: str) -> np.ndarray:
        read.add(name)
        return np.ones(1)

    formula(record)
    return frozenset(read)


#: Feature -> the aggregates its formula reads (so a subset of features computes less).
FEATURE_AGGREGATES: dict[str, frozenset[str]] = {
    name: _reads(formula) for name, formula in _FORMULAS.items()
}


def aggregates_for(names: Iterable[str]) -> frozenset[str]:
    """The aggregates the features ``names`` read."""
    return frozenset().union(*(FEATURE_AGGREGATES[name] for name in names))


def derive(
    agg: Mapping[str, np.ndarray], names: Iterable[str] = FEATURE_NAMES
) -> dict[str, np.ndarray]:
    """Feature columns (numpy arrays) from aggregate columns (`AGGREGATES`).

    Args:
        agg: Aggregate columns; only those the features ``names`` read are looked up
            (`aggregates_for`).
        names: The features wanted (default every feature), in output order.
    """
    return {
        name: np.asarray(_FORMULAS[name](agg.__getitem__)).astype(
            np.int64 if FEATURES_BY_NAME[name].integer else np.float64, copy=False
        )
        for name in names
    }

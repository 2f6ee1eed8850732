"""Campaign detection: groups of api keys acting together, in the spirit of SynchroTrap.

Coordination that no single key shows: dozens of quiet keys submitting in lockstep, or a
cohort of new accounts each behaving near-identically just under a per-key quota. Two
parts:

* `campaign_features` turns telemetry into per-key rows of group evidence. At each
  instant ``t`` it builds, over the keys active in ``[t - window, t)``, a similarity graph
  and takes its connected components (``scipy.sparse.csgraph``) as groups. Two kinds of
  edge, each a signal a fraud or bot-detection engineer would recognise:

  - *lockstep*: two keys act in the same 15-second buckets (give or take one bucket)
    repeatedly and far more often than their activity in the same 5-minute blocks
    predicts (a chance-corrected lift, so a class whose students all work through the
    same lesson, independently, is not lockstep; a botnet firing in waves is);
  - *cohort* (long view only): two keys both new, first seen close together, with
    near-identical job rates and hour-by-hour profiles (accounts created together and
    driven by one script).

  Each member of a group of at least ``min_group_keys`` gets its group's size,
  synchrony, breadth of origin (distinct networks and users), newness and volume
  similarity; a key in no group gets zeros. The features come in three views: a short
  one (1 hour, every 5 minutes: waves and bursts), a long one (24 hours, every hour:
  slow campaigns such as quota farms, whose members share nothing but their birth and
  their behaviour) and a births view (every minute: keys first seen in the last hour,
  grouped when their first submissions fall within one bucket of each other, the
  mass-account-creation signal of fraud teams). Lockstep needs repeated co-activity, so
  a botnet's first wave shows only in the births view: dozens of never-seen keys acting
  within seconds, far more than the population's birth rate puts in a few seconds.
  A row is emitted at each instant of the short view for the keys active in its window
  and at each minute for the keys in a birth group; every row carries each view as of
  that view's latest instant at or before it.

* `CampaignDetector` scores those rows with a transparent function: group breadth x
  coordination (synchrony or near-identical volume) x origin diversity x newness, per
  view, normalised by a per-view reference learned from the training rows, the larger
  view wins. Shared code hashes and client agents are deliberately not evidence: a
  classroom shares one notebook and one campus network, a farm shares nothing.

Example:
    >>> import numpy as np
    >>> det = CampaignDetector().fit(np.zeros((10, len(CAMPAIGN_FEATURES))))
    >>> row = dict.fromkeys(CAMPAIGN_FEATURES, 0.0)
    >>> row.update(group_keys_1h=30, sync_lift_1h=8, sync_share_1h=1, group_networks_1h=30,
    ...            group_users_1h=30, group_new_share_1h=1, volume_similarity_1h=0.9)
    >>> bool(det.decision_function([list(row.values())])[0] > det.threshold_)
    True
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.special import gammainc

from models.base import BaseDetector
from models.persistence import read_metadata, write_metadata
from models.registry import DetectorFamily, register_family
from models.thresholds import ThresholdStrategy
from qabuse_dagster.features.definitions import JOB_MEMORY_MINUTES, SUBMISSION_PRECEDENCE

__all__ = [
    "CAMPAIGN_FEATURES",
    "CAMPAIGN_VIEWS",
    "REQUIRED_COLUMNS",
    "CampaignDetector",
    "campaign_features",
    "load_campaign",
    "save_campaign",
]

logger = logging.getLogger(__name__)

#: Per-view group evidence, in column order within a view.
_VIEW_FEATURES = (
    "group_keys",  # keys in its group (0: in no group)
    "sync_lift",  # its co-activity with group members / what their 5-minute activity predicts
    "sync_share",  # share of its active 15 s buckets another group member also acted in
    "group_networks",  # distinct source networks across the group's submissions
    "group_users",  # distinct users across the group's submissions
    "group_new_share",  # share of the group's keys first seen within `new_key_age`
    "volume_similarity",  # 1 - coefficient of variation of the members' job rates, in [0, 1]
)
_F = {name: i for i, name in enumerate(_VIEW_FEATURES)}
#: View suffixes: the short (lockstep), the long (cohort and lockstep) and the births view.
_VIEWS = ("1h", "24h", "births")
_COHORT_VIEW = "24h"
#: The views, by the suffix of their features.
CAMPAIGN_VIEWS: tuple[str, ...] = _VIEWS
#: The campaign features, in column order: the 1-hour view's, the 24-hour view's, then the
#: births view's.
CAMPAIGN_FEATURES: tuple[str, ...] = tuple(f"{f}_{v}" for v in _VIEWS for f in _VIEW_FEATURES)
#: The telemetry columns `campaign_features` reads.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "job_id",
    "api_key_id",
    "user",
    "timestamp",
    "status",
    "source_ip_hash",
)
_MS = 1_000
_MINUTE_MS = 60 * _MS
_HOUR_MS = 60 * _MINUTE_MS
_JOB_MEMORY_MS = JOB_MEMORY_MINUTES * _MINUTE_MS
_SUBMISSION_STATUSES = ("submitted", "rejected")


@dataclass(frozen=True)
class _Submissions:
    """Each job once, at its earliest record, sorted by instant; ids as integer codes."""

    time_ms: NDArray[np.int64]
    key: NDArray[np.int64]
    user: NDArray[np.int64]
    network: NDArray[np.int64]  # -1: no network recorded
    keys: NDArray[np.object_]  # key code -> api_key_id
    birth_ms: NDArray[np.int64]  # key code -> its first submission
    history_start_ms: int


@dataclass(frozen=True)
class _ViewSpec:
    window_ms: int
    bucket_ms: int
    block_ms: int
    profile_ms: int
    cohort: bool


def campaign_features(
    records: pd.DataFrame,
    start: datetime,
    end: datetime,
    *,
    every: timedelta = timedelta(minutes=5),
    window: timedelta = timedelta(hours=1),
    long_every: timedelta = timedelta(hours=1),
    long_window: timedelta = timedelta(hours=24),
    bucket: timedelta = timedelta(seconds=15),
    block: timedelta = timedelta(minutes=5),
    new_key_age: timedelta = timedelta(days=3),
    min_group_keys: int = 3,
    min_shared_buckets: int = 3,
    min_shared_blocks: int = 3,
    min_lift: float = 3.0,
    max_edge_p_value: float = 1e-4,
    cohort_birth_gap: timedelta = timedelta(hours=2),
    cohort_rate_tolerance: float = 0.25,
    cohort_min_profile_cosine: float = 0.7,
    cohort_min_jobs: int = 10,
    birth_every: timedelta = timedelta(minutes=1),
    birth_window: timedelta = timedelta(hours=1),
    min_birth_group: int = 5,
    birth_pace_window: timedelta = timedelta(minutes=10),
) -> pd.DataFrame:
    """Per-key group evidence at each instant ``start, start + every, ... < end``.

    A row describes one api key at instant ``t`` from the records strictly before ``t``;
    a key gets a row at ``t`` when it submitted in ``[t - window, t)``. Records before
    ``start`` are history: they feed the long view's window and each key's first-seen
    instant. A key is *new* at ``t`` when first seen within ``new_key_age`` before ``t``,
    and at least ``new_key_age`` after the earliest record passed (before that, a key
    may simply predate the history).

    Args:
        records: telemetry with `REQUIRED_COLUMNS` (``timestamp`` tz-aware); an event
            stream or a job log: each job counts once, at its earliest record.
        start: first instant (tz-aware).
        end: instants lie before it (tz-aware).
        every: cadence of the short view's instants.
        window: the short view's window.
        long_every: cadence of the long view, whose features each row takes from the
            latest long instant at or before its own (``start + k * long_every``).
        long_window: the long view's window.
        bucket: width of a co-activity bucket; keys acting within one bucket of each
            other act together.
        block: the span over which chance co-activity is estimated (activity is assumed
            uniform within a block for the expected count).
        new_key_age: how long after its first submission a key counts as new.
        min_group_keys: smallest group that gets features.
        min_shared_buckets: fewest shared buckets for a lockstep edge.
        min_shared_blocks: fewest distinct blocks those buckets must span: lockstep
            repeats, one shared burst is not lockstep.
        min_lift: least ratio of shared to expected buckets for a lockstep edge.
        max_edge_p_value: largest chance of so many shared buckets (Poisson, given the
            expected count) for a lockstep edge; a window tests every pair of its keys.
        cohort_birth_gap: most time between the first submissions of two cohort keys.
        cohort_rate_tolerance: most relative difference of two cohort keys' job rates.
        cohort_min_profile_cosine: least cosine similarity of their hourly job counts.
        cohort_min_jobs: fewest jobs in the long window for a key to join a cohort.
        birth_every: cadence of the births view's instants.
        birth_window: how long after its first submission a new key stays in the births
            view. The population's birth rate is taken over the ``long_window`` before it.
        min_birth_group: fewest keys in a birth group: births chained within one bucket
            of each other, and more than the birth rate explains (Poisson tail at most
            ``max_edge_p_value``). A class signing up over minutes chains a few at a time.
        birth_pace_window: span before a birth group whose sign-up pace, when above the
            long window's birth rate, is the chance its births are judged against.

    Returns:
        Columns ``api_key_id``, ``event_timestamp`` (UTC) and `CAMPAIGN_FEATURES`,
        sorted by instant then key.

    Raises:
        ValueError: a required column is missing, ``timestamp`` is not tz-aware, or
            ``start``/``end`` are naive.
    """
    start_ms, end_ms = _instant_ms(start, "start"), _instant_ms(end, "end")
    subs = _submissions(records)
    every_ms, long_every_ms = _positive_ms(every, "every"), _positive_ms(long_every, "long_every")
    short = _ViewSpec(
        window_ms=_positive_ms(window, "window"),
        bucket_ms=_positive_ms(bucket, "bucket"),
        block_ms=_positive_ms(block, "block"),
        profile_ms=_positive_ms(block, "block"),
        cohort=False,
    )
    long = _ViewSpec(
        window_ms=_positive_ms(long_window, "long_window"),
        bucket_ms=short.bucket_ms,
        block_ms=short.block_ms,
        profile_ms=_HOUR_MS,
        cohort=True,
    )
    params = _GroupParams(
        new_key_age_ms=_positive_ms(new_key_age, "new_key_age"),
        min_group_keys=min_group_keys,
        min_shared_buckets=min_shared_buckets,
        min_shared_blocks=min_shared_blocks,
        min_lift=min_lift,
        max_edge_p_value=max_edge_p_value,
        cohort_birth_gap_ms=_positive_ms(cohort_birth_gap, "cohort_birth_gap"),
        cohort_rate_tolerance=cohort_rate_tolerance,
        cohort_min_profile_cosine=cohort_min_profile_cosine,
        cohort_min_jobs=cohort_min_jobs,
    )
    instants = np.arange(start_ms, end_ms, every_ms, dtype=np.int64)
    short_rows = _view_rows(subs, instants, short, params)
    long_instants = np.arange(start_ms, end_ms, long_every_ms, dtype=np.int64)
    long_rows = _view_rows(subs, long_instants, long, params)
    birth_instants = np.arange(
        start_ms, end_ms, _positive_ms(birth_every, "birth_every"), dtype=np.int64
    )
    birth_rows = _birth_rows(
        subs,
        birth_instants,
        window_ms=_positive_ms(birth_window, "birth_window"),
        rate_window_ms=long.window_ms,
        bucket_ms=short.bucket_ms,
        pace_window_ms=_positive_ms(birth_pace_window, "birth_pace_window"),
        min_group=min_birth_group,
        params=params,
    )

    # Rows: each short instant's active keys and each minute's birth-group members.
    time_ms = np.concatenate([short_rows.time_ms, birth_rows.time_ms])
    key = np.concatenate([short_rows.key, birth_rows.key])
    pairs = np.unique(np.stack([time_ms, key], axis=1), axis=0)  # by instant, then key
    time_ms, key = pairs[:, 0], pairs[:, 1]
    width = len(_VIEW_FEATURES)
    features = np.zeros((len(key), len(CAMPAIGN_FEATURES)))
    for v, (rows, view_instants) in enumerate(
        ((short_rows, instants), (long_rows, long_instants), (birth_rows, birth_instants))
    ):
        features[:, v * width : (v + 1) * width] = _as_of_view(rows, view_instants, time_ms, key)
    frame = pd.DataFrame(features, columns=list(CAMPAIGN_FEATURES))
    frame.insert(0, "api_key_id", subs.keys[key].astype(str))
    frame.insert(1, "event_timestamp", pd.to_datetime(time_ms, unit="ms", utc=True))
    return frame


def _as_of_view(
    rows: _ViewRows,
    view_instants: NDArray[np.int64],
    time_ms: NDArray[np.int64],
    key: NDArray[np.int64],
) -> NDArray[np.float64]:
    """Each (instant, key)'s features in one view, from the view's latest instant <= it."""
    out = np.zeros((len(key), len(_VIEW_FEATURES)))
    if not len(rows.key) or not len(key):
        return out
    which = np.searchsorted(view_instants, time_ms, side="right") - 1
    lookup = pd.Series(
        np.arange(len(rows.key)), index=pd.MultiIndex.from_arrays([rows.time_ms, rows.key])
    )
    at = lookup.reindex(pd.MultiIndex.from_arrays([view_instants[which.clip(0)], key]))
    hit = at.notna().to_numpy() & (which >= 0)
    out[hit] = rows.values[at.to_numpy()[hit].astype(np.int64)]
    return out


def _birth_rows(
    subs: _Submissions,
    instants: NDArray[np.int64],
    *,
    window_ms: int,
    rate_window_ms: int,
    bucket_ms: int,
    pace_window_ms: int,
    min_group: int,
    params: _GroupParams,
) -> _ViewRows:
    """The births view: keys first seen in ``[t - window, t)`` grouped by birth instant.

    Only keys known to be new are born (first seen at least ``new_key_age`` after the
    history starts: before that, a first record may be a key older than the history).
    Births within one bucket of each other chain into a group; it counts when it has at
    least ``min_group`` keys and chance makes so many births in its span (plus a bucket)
    unlikely (Poisson tail at most ``max_edge_p_value``). Chance is the larger of two
    birth rates: that of the ``rate_window`` before the window (at least one birth in
    it), and the sign-up pace of the ``pace_window`` before the group's first birth, so
    a class whose students sign up one after another over minutes explains its own
    chains. Per member: the group's size; its synchrony, the births within one bucket of
    its own over what chance puts there, and their share of the rest of its group; the
    distinct networks and users of the members' first submissions; new share 1; and the
    similarity of the members' job counts since their births.
    """
    width = len(_VIEW_FEATURES)
    empty = _ViewRows(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, width)))
    born_keys, first = np.unique(subs.key, return_index=True)
    birth = subs.time_ms[first]
    known_new = birth >= subs.history_start_ms + params.new_key_age_ms
    order = np.flatnonzero(known_new)[np.argsort(birth[known_new], kind="stable")]
    born_keys, first, birth = born_keys[order], first[order], birth[order]
    if len(birth) < min_group:
        return empty
    lo = np.searchsorted(birth, instants - window_ms, side="left")
    hi = np.searchsorted(birth, instants, side="left")
    prior = lo - np.searchsorted(birth, instants - window_ms - rate_window_ms, side="left")
    sub_lo = np.searchsorted(subs.time_ms, instants - window_ms, side="left")
    sub_hi = np.searchsorted(subs.time_ms, instants, side="left")
    times: list[NDArray[np.int64]] = []
    keys: list[NDArray[np.int64]] = []
    values: list[NDArray[np.float64]] = []
    for i in np.flatnonzero(hi - lo >= min_group).tolist():
        a, b = int(lo[i]), int(hi[i])
        born = birth[a:b]
        group = np.concatenate([[0], np.cumsum(np.diff(born) > bucket_ms)])
        size = np.bincount(group)
        head = born[np.searchsorted(group, np.arange(len(size)))]  # each group's first birth
        span = np.zeros(len(size))  # each group's first to last birth
        np.maximum.at(span, group, born - head[group])
        pace = a + np.searchsorted(born, head) - np.searchsorted(birth, head - pace_window_ms)
        rate = np.maximum(max(int(prior[i]), 1) / rate_window_ms, pace / pace_window_ms)
        unlikely = gammainc(size, rate * (span + bucket_ms)) <= params.max_edge_p_value
        member = (size >= min_group)[group] & unlikely[group]
        if not member.any():
            continue
        near = (
            np.searchsorted(born, born + bucket_ms, side="right")
            - np.searchsorted(born, born - bucket_ms, side="left")
            - 1
        ).astype(np.float64)
        expected = rate[group] * (2 * bucket_ms)
        firsts = first[a:b]
        n_groups = len(size)
        networks = _distinct_per_group(group, subs.network[firsts], n_groups)
        users = _distinct_per_group(group, subs.user[firsts], n_groups)
        window = slice(int(sub_lo[i]), int(sub_hi[i]))
        jobs = np.bincount(subs.key[window], minlength=len(subs.keys))[born_keys[a:b]]
        jobs = jobs.astype(np.float64)
        mean_jobs = np.bincount(group, weights=jobs) / size
        var_jobs = np.bincount(group, weights=jobs**2) / size - mean_jobs**2
        cv = np.sqrt(np.clip(var_jobs, 0.0, None)) / np.maximum(mean_jobs, 1e-300)

        feats = np.zeros((len(born), width))
        feats[:, _F["group_keys"]] = size[group]
        feats[:, _F["sync_lift"]] = near / expected
        feats[:, _F["sync_share"]] = near / np.maximum(size[group] - 1, 1)
        feats[:, _F["group_networks"]] = networks[group]
        feats[:, _F["group_users"]] = users[group]
        feats[:, _F["group_new_share"]] = 1.0
        feats[:, _F["volume_similarity"]] = np.clip(1.0 - cv, 0.0, 1.0)[group]
        times.append(np.full(int(member.sum()), instants[i], dtype=np.int64))
        keys.append(born_keys[a:b][member])
        values.append(feats[member])
    if not times:
        return empty
    return _ViewRows(np.concatenate(times), np.concatenate(keys), np.vstack(values))


@dataclass(frozen=True)
class _GroupParams:
    new_key_age_ms: int
    min_group_keys: int
    min_shared_buckets: int
    min_shared_blocks: int
    min_lift: float
    max_edge_p_value: float
    cohort_birth_gap_ms: int
    cohort_rate_tolerance: float
    cohort_min_profile_cosine: float
    cohort_min_jobs: int


@dataclass(frozen=True)
class _ViewRows:
    time_ms: NDArray[np.int64]
    key: NDArray[np.int64]
    values: NDArray[np.float64]


def _view_rows(
    subs: _Submissions, instants: NDArray[np.int64], spec: _ViewSpec, params: _GroupParams
) -> _ViewRows:
    """One view's features at every instant: a loop over instants, vectorised inside."""
    lo = np.searchsorted(subs.time_ms, instants - spec.window_ms, side="left")
    hi = np.searchsorted(subs.time_ms, instants, side="left")
    times: list[NDArray[np.int64]] = []
    keys: list[NDArray[np.int64]] = []
    values: list[NDArray[np.float64]] = []
    for t, a, b in zip(instants.tolist(), lo.tolist(), hi.tolist(), strict=True):
        if a == b:
            continue
        key_codes, feats = _window_groups(subs, slice(a, b), t, spec, params)
        times.append(np.full(len(key_codes), t, dtype=np.int64))
        keys.append(key_codes)
        values.append(feats)
    if not times:
        return _ViewRows(
            np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, len(_VIEW_FEATURES)))
        )
    return _ViewRows(np.concatenate(times), np.concatenate(keys), np.vstack(values))


def _window_groups(
    subs: _Submissions, part: slice, t: int, spec: _ViewSpec, params: _GroupParams
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Groups among the keys active in one window, and each key's group features."""
    start = t - spec.window_ms
    key_codes, k_of = np.unique(subs.key[part], return_inverse=True)
    k = len(key_codes)
    feats = np.zeros((k, len(_VIEW_FEATURES)))
    offset = subs.time_ms[part] - start
    n_buckets = -(-spec.window_ms // spec.bucket_ms)
    per_block = max(1, spec.block_ms // spec.bucket_ms)
    n_blocks = -(-n_buckets // per_block)
    bucket = offset // spec.bucket_ms

    # Acted (F) and acted within one bucket (D), keys x buckets, 0/1.
    acted = _binary(k_of, bucket, (k, n_buckets))
    near = _binary(
        np.tile(k_of, 3),
        np.concatenate([bucket - 1, bucket, bucket + 1]).clip(0, n_buckets - 1),
        (k, n_buckets),
    )
    # Shared buckets per (key, key, block): rows are (key, block of the bucket), so one
    # sparse product counts each pair's shared buckets block by block.
    block_of = np.arange(n_buckets) // per_block
    per_pair_block = _by_block(acted, block_of, n_blocks) @ _by_block(near, block_of, n_blocks).T
    triples = per_pair_block.tocoo()
    a, c = triples.row // n_blocks, triples.col // n_blocks
    off_diagonal = a != c
    a, c, v = a[off_diagonal], c[off_diagonal], triples.data[off_diagonal]
    # Symmetrise: a's buckets with c nearby and c's with a nearby, averaged.
    shared = sparse.csr_matrix(
        (np.concatenate([v, v]) * 0.5, (np.concatenate([a, c]), np.concatenate([c, a]))),
        shape=(k, k),
    )
    blocks_together = _distinct_pair_blocks(a, c, k)
    # Expected shared buckets if each key's buckets fell anywhere in its 5-minute blocks.
    to_block = sparse.csr_matrix(
        (np.ones(n_buckets), (np.arange(n_buckets), block_of)), shape=(n_buckets, n_blocks)
    )
    m = (acted @ to_block).toarray()
    d = (near @ to_block).toarray()
    expected = (m @ d.T + d @ m.T) / (2.0 * per_block)
    np.fill_diagonal(expected, 0.0)

    # Both matrices hold exactly the pairs that shared a bucket: their canonical CSR
    # forms list those pairs in the same order.
    shared.sum_duplicates()
    blocks_together.sum_duplicates()
    rows = np.repeat(np.arange(k), np.diff(shared.indptr))
    cols, counts, repeated = shared.indices, shared.data, blocks_together.data
    chance = expected[rows, cols]
    lockstep = (
        (counts >= params.min_shared_buckets)
        & (repeated >= params.min_shared_blocks)
        & (counts >= params.min_lift * chance)
        # Poisson tail P(X >= shared | expected): many pairs are tested per window.
        & (gammainc(np.floor(counts), np.maximum(chance, 1e-12)) <= params.max_edge_p_value)
    )
    edge_rows, edge_cols = [rows[lockstep]], [cols[lockstep]]

    jobs = np.bincount(k_of, minlength=k).astype(np.float64)
    birth = subs.birth_ms[key_codes]
    exposure = np.maximum(t - np.maximum(birth, start), spec.bucket_ms).astype(np.float64)
    rate = jobs / exposure
    is_new = (birth >= t - params.new_key_age_ms) & (
        birth >= subs.history_start_ms + params.new_key_age_ms
    )
    if spec.cohort:
        cr, cc = _cohort_edges(
            offset // spec.profile_ms, k_of, k, jobs, rate, birth, is_new, params
        )
        edge_rows.append(cr)
        edge_cols.append(cc)
    er, ec = np.concatenate(edge_rows), np.concatenate(edge_cols)
    graph = sparse.csr_matrix((np.ones(len(er)), (er, ec)), shape=(k, k))
    _, label = connected_components(graph, directed=False)
    size = np.bincount(label)
    grouped = size[label] >= params.min_group_keys
    if not grouped.any():
        return key_codes, feats
    # Renumber the groups that count; every other key goes to a dummy group, dropped below.
    kept, g_of = np.unique(np.where(grouped, label, -1), return_inverse=True)
    n_groups = len(kept)
    member = sparse.csr_matrix((np.ones(k), (np.arange(k), g_of)), shape=(k, n_groups))

    with_group = np.asarray((shared @ member)[np.arange(k), g_of]).ravel()
    expected_group = (expected @ member.toarray())[np.arange(k), g_of]
    lift = np.divide(with_group, expected_group, out=np.zeros(k), where=expected_group > 0)
    # Buckets where at least one other member acted within a bucket of this key's own.
    members_near = (member.T @ near).tocsr()
    a_rows, a_cols = acted.nonzero()
    others = np.asarray(members_near[g_of[a_rows], a_cols]).ravel() - 1.0
    share = np.bincount(a_rows, weights=(others > 0), minlength=k) / np.maximum(
        np.bincount(a_rows, minlength=k), 1
    )
    networks = _distinct_per_group(g_of[k_of], subs.network[part], n_groups)
    users = _distinct_per_group(g_of[k_of], subs.user[part], n_groups)
    group_size = np.bincount(g_of, minlength=n_groups).astype(np.float64)
    new_share = np.bincount(g_of, weights=is_new, minlength=n_groups) / group_size
    mean_rate = np.bincount(g_of, weights=rate, minlength=n_groups) / group_size
    var_rate = np.bincount(g_of, weights=rate**2, minlength=n_groups) / group_size - mean_rate**2
    cv = np.sqrt(np.clip(var_rate, 0.0, None)) / np.maximum(mean_rate, 1e-300)
    similarity = np.clip(1.0 - cv, 0.0, 1.0)

    feats[:, 0] = group_size[g_of]
    feats[:, 1] = lift
    feats[:, 2] = share
    feats[:, 3] = networks[g_of]
    feats[:, 4] = users[g_of]
    feats[:, 5] = new_share[g_of]
    feats[:, 6] = similarity[g_of]
    feats[~grouped] = 0.0
    return key_codes, feats


def _cohort_edges(
    profile_bin: NDArray[np.int64],
    k_of: NDArray[np.intp],
    k: int,
    jobs: NDArray[np.float64],
    rate: NDArray[np.float64],
    birth: NDArray[np.int64],
    is_new: NDArray[np.bool_],
    params: _GroupParams,
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Pairs of new keys born close together whose rates and hourly profiles match."""
    candidates = np.flatnonzero(is_new & (jobs >= params.cohort_min_jobs))
    if len(candidates) < 2:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    n_bins = int(profile_bin.max()) + 1
    profile = sparse.csr_matrix((np.ones(len(k_of)), (k_of, profile_bin)), shape=(k, n_bins))[
        candidates
    ]
    norm = np.sqrt(np.asarray(profile.multiply(profile).sum(axis=1)).ravel())
    cosine = (profile @ profile.T).toarray() / np.outer(norm, norm)
    log_rate = np.log(rate[candidates])
    born = birth[candidates]
    close = (
        (np.abs(born[:, None] - born[None, :]) <= params.cohort_birth_gap_ms)
        & (np.abs(log_rate[:, None] - log_rate[None, :]) <= np.log1p(params.cohort_rate_tolerance))
        & (cosine >= params.cohort_min_profile_cosine)
    )
    np.fill_diagonal(close, False)
    i, j = np.nonzero(close)
    return candidates[i], candidates[j]


def _by_block(
    matrix: sparse.csr_matrix, block_of: NDArray[np.int64], n_blocks: int
) -> sparse.csr_matrix:
    """Split each key's row into one row per block: row ``key * n_blocks + block``."""
    coo = matrix.tocoo()
    return sparse.csr_matrix(
        (coo.data, (coo.row * n_blocks + block_of[coo.col], coo.col)),
        shape=(matrix.shape[0] * n_blocks, matrix.shape[1]),
    )


def _distinct_pair_blocks(a: NDArray[np.int64], c: NDArray[np.int64], k: int) -> sparse.csr_matrix:
    """Per key pair, the number of blocks in which they shared a bucket.

    Each (a, c, block) occurs once in the block-split product, so counting occurrences
    counts blocks; the larger of the two directions is the pair's count.
    """
    directed = sparse.csr_matrix((np.ones(len(a)), (a, c)), shape=(k, k))
    return directed.maximum(directed.T).tocsr()


def _binary(
    rows: NDArray[np.intp], cols: NDArray[np.int64], shape: tuple[int, int]
) -> sparse.csr_matrix:
    matrix = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=shape)
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def _distinct_per_group(
    group: NDArray[np.intp], value: NDArray[np.int64], n_groups: int
) -> NDArray[np.float64]:
    """Distinct non-missing values (codes >= 0) per group."""
    present = value >= 0
    incidence = sparse.csr_matrix(
        (np.ones(int(present.sum())), (group[present], value[present])),
        shape=(n_groups, int(value.max()) + 1 if present.any() else 1),
    )
    incidence.sum_duplicates()
    return np.diff(incidence.indptr).astype(np.float64)


def _submissions(records: pd.DataFrame) -> _Submissions:
    """Each job once, at its earliest record (the feature definitions' convention)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in records.columns]
    if missing:
        raise ValueError(f"telemetry records lack required column(s): {', '.join(missing)}")
    stamps = records["timestamp"]
    if not isinstance(stamps.dtype, pd.DatetimeTZDtype):
        raise ValueError(
            f"column 'timestamp' must hold tz-aware datetimes (UTC), got dtype {stamps.dtype}"
        )
    for column in ("api_key_id", "user", "status"):
        if records[column].isna().any():
            raise ValueError(f"column {column!r} holds nulls; every record needs one")
    time_ms = (
        stamps.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy(dtype="datetime64[ms]")
    ).astype(np.int64)
    key_codes, keys = pd.factorize(records["api_key_id"], sort=True)
    job_codes, _ = pd.factorize(records["job_id"])
    status = records["status"].astype(str).to_numpy()
    precedence = pd.Series(status).map(SUBMISSION_PRECEDENCE).fillna(len(SUBMISSION_PRECEDENCE))
    order = np.lexsort((precedence.to_numpy(), time_ms, job_codes, key_codes))
    e, j, t = key_codes[order], job_codes[order], time_ms[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (e[1:] != e[:-1]) | (j[1:] != j[:-1]) | (t[1:] - t[:-1] > _JOB_MEMORY_MS)
    earliest = np.empty(len(order), dtype=bool)
    earliest[order] = first
    submission = np.where(job_codes >= 0, earliest, np.isin(status, _SUBMISSION_STATUSES))

    by_time = np.flatnonzero(submission)
    by_time = by_time[np.argsort(time_ms[by_time], kind="stable")]
    user_codes, _ = pd.factorize(records["user"])
    network_codes, _ = pd.factorize(records["source_ip_hash"])  # NaN -> -1
    key = key_codes[by_time].astype(np.int64)
    sub_time = time_ms[by_time]
    birth = np.full(len(keys), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(birth, key, sub_time)
    return _Submissions(
        time_ms=sub_time,
        key=key,
        user=user_codes[by_time].astype(np.int64),
        network=network_codes[by_time].astype(np.int64),
        keys=np.asarray(keys, dtype=object),
        birth_ms=birth,
        history_start_ms=int(sub_time[0]) if len(sub_time) else 0,
    )


def _instant_ms(instant: datetime, name: str) -> int:
    stamp = pd.Timestamp(instant)
    if stamp.tzinfo is None:
        raise ValueError(f"{name} must be tz-aware (UTC), got naive {instant!r}")
    return int(stamp.tz_convert("UTC").value // 1_000_000)


def _positive_ms(span: timedelta, name: str) -> int:
    ms = int(pd.Timedelta(span) / pd.Timedelta(milliseconds=1))
    if ms <= 0:
        raise ValueError(f"{name} must be positive, got {span!r}")
    return ms


# --- The detector ---------------------------------------------------------------------


class CampaignDetector(BaseDetector):
    """Scores campaign feature rows: large, synchronised or identical, multi-network, new.

    Per view, ``breadth x coordination x origin x newness`` where

    * breadth is ``log2`` of the group's size (0 for a key in no group);
    * coordination is synchrony, ``log(sync_lift / chance_lift)`` over
      ``log(full_lift / chance_lift)`` times ``sync_share`` (in the births view, of the
      members' first submissions: a burst of births within seconds, not a class whose
      students sign up one after another over minutes); in the long view, the larger
      of that and volume similarity (rescaled so ``similarity_floor`` gives 0 and
      ``similarity_full`` 1) times the group's new share: identical volumes are evidence
      of a cohort of new accounts, not of established keys that happen to match;
    * origin is ``origin_floor`` for a group on one network, rising to 1 when every key
      has its own ((networks - 1) / (keys - 1));
    * newness is ``newness_floor`` for a group of established keys, 1 for all-new ones.

    Each factor is clipped to [0, 1] (breadth excepted), so no one signal carries a row.
    ``fit`` learns each view's reference: the ``reference_quantile`` of the view's
    non-zero training scores, at least 1 (it never inflates a view). The score is the
    larger view score over its reference. ``explain`` gives integrated-gradient
    contributions from the all-zero row (score 0), rescaled to sum to the score.

    Args:
        chance_lift: co-activity up to this many times chance counts as no synchrony
            (a key caught in a big group's bursts shares some buckets by chance).
        full_lift: synchrony counts in full at this many times the chance co-activity.
        similarity_floor: volume similarity that counts as no evidence.
        similarity_full: volume similarity that counts in full.
        origin_floor: weight of a group on a single network.
        newness_floor: weight of a group of established keys.
        reference_quantile: quantile of the non-zero training scores used as reference.
        threshold_strategy: how ``fit`` sets ``threshold_``.
    """

    def __init__(
        self,
        chance_lift: float = 2.0,
        full_lift: float = 8.0,
        similarity_floor: float = 0.75,
        similarity_full: float = 0.95,
        origin_floor: float = 0.25,
        newness_floor: float = 0.4,
        reference_quantile: float = 0.99,
        threshold_strategy: ThresholdStrategy | None = None,
    ) -> None:
        super().__init__(threshold_strategy=threshold_strategy)
        self.chance_lift = chance_lift
        self.full_lift = full_lift
        self.similarity_floor = similarity_floor
        self.similarity_full = similarity_full
        self.origin_floor = origin_floor
        self.newness_floor = newness_floor
        self.reference_quantile = reference_quantile

    def _fit(self, X: NDArray[np.float64]) -> None:
        if X.shape[1] != len(CAMPAIGN_FEATURES):
            raise ValueError(
                f"expected {len(CAMPAIGN_FEATURES)} campaign features, got {X.shape[1]}"
            )
        if not 0.0 < self.reference_quantile <= 1.0:
            raise ValueError(
                f"reference_quantile must lie in (0, 1], got {self.reference_quantile}"
            )
        if not self.similarity_floor < self.similarity_full:
            raise ValueError("similarity_floor must lie below similarity_full")
        views = self._view_scores(X)
        reference = np.ones(len(_VIEWS))
        for v in range(len(_VIEWS)):
            positive = views[:, v][views[:, v] > 0]
            if len(positive):
                reference[v] = max(1.0, float(np.quantile(positive, self.reference_quantile)))
        self.view_reference_ = reference

    def _score(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.asarray((self._view_scores(X) / self.view_reference_).max(axis=1))

    def _view_scores(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        width = len(_VIEW_FEATURES)
        out = np.zeros((len(X), len(_VIEWS)))
        for v in range(len(_VIEWS)):
            f = X[:, v * width : (v + 1) * width]
            keys = f[:, _F["group_keys"]]
            breadth = np.log2(np.maximum(keys, 1.0))
            lift = np.maximum(f[:, _F["sync_lift"]], 1e-12)
            sync = np.clip(
                np.log(lift / self.chance_lift) / np.log(self.full_lift / self.chance_lift), 0, 1
            ) * np.clip(f[:, _F["sync_share"]], 0, 1)
            coordination = sync
            if _VIEWS[v] == _COHORT_VIEW:
                # Identical volumes are evidence only among new keys: cohort groups.
                similar = np.clip(
                    (f[:, _F["volume_similarity"]] - self.similarity_floor)
                    / (self.similarity_full - self.similarity_floor),
                    0,
                    1,
                ) * np.clip(f[:, _F["group_new_share"]], 0, 1)
                coordination = np.maximum(sync, similar)
            spread = np.clip((f[:, _F["group_networks"]] - 1.0) / np.maximum(keys - 1.0, 1.0), 0, 1)
            origin = self.origin_floor + (1.0 - self.origin_floor) * spread
            newness = self.newness_floor + (1.0 - self.newness_floor) * np.clip(
                f[:, _F["group_new_share"]], 0, 1
            )
            out[:, v] = breadth * coordination * origin * newness
        return out

    def _explain(self, X: NDArray[np.float64], steps: int = 32) -> NDArray[np.float64]:
        # Integrated gradients from the all-zero row (a key in no group, score 0), with
        # central differences along the straight path; rescaled so a row's contributions
        # add up to its score (the path integral is approximate at the clips). Every
        # perturbed point of a block of rows is scored in one call.
        alphas = (np.arange(steps) + 0.5) / steps
        n, f = X.shape
        grads = np.zeros_like(X)
        eye = np.eye(f)
        block = max(1, 4096 // (2 * steps * f))
        for lo in range(0, n, block):
            rows = X[lo : lo + block]
            scale = np.maximum(np.abs(rows), 1.0) * 1e-4  # (b, f)
            # points[b, s, j, :] = alpha_s * row_b, then +/- scale_bj on feature j.
            base = alphas[None, :, None, None] * rows[:, None, None, :]
            step = scale[:, None, :, None] * eye[None, None, :, :]
            up = (base + step).reshape(-1, f)
            down = (base - step).reshape(-1, f)
            diff = (self._score(up) - self._score(down)).reshape(len(rows), steps, f)
            grads[lo : lo + block] = diff.sum(axis=1) / (2 * scale)
        contributions = X * grads / steps
        score = self._score(X)
        total = contributions.sum(axis=1)
        ratio = np.divide(score, total, out=np.zeros_like(score), where=np.abs(total) > 1e-12)
        return np.asarray(contributions * ratio[:, None])


def save_campaign(detector: BaseDetector, directory: Path) -> None:
    """Write a fitted `CampaignDetector` as JSON (it holds no estimator)."""
    write_metadata(detector, directory, state=("view_reference_",))


def load_campaign(directory: Path) -> CampaignDetector:
    """Read back what `save_campaign` wrote."""
    detector, _ = read_metadata(directory, CampaignDetector)
    detector.view_reference_ = np.asarray(detector.view_reference_, dtype=np.float64)
    return detector


register_family(
    DetectorFamily(
        name="campaign",
        input_kind="graph",
        entity="api_key",
        feature_service="api_key_campaign_v2",
        feature_names=CAMPAIGN_FEATURES,
        detector=CampaignDetector,
        save=save_campaign,
        load=load_campaign,
        description=(
            "Groups of api keys acting together: lockstep co-activity, bursts of new keys "
            "born within seconds, or new cohorts of near-identical keys, scored by size, "
            "synchrony, network spread and newness."
        ),
        params={},
    )
)

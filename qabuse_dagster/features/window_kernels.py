"""Compiled loops of `qabuse_dagster.features.windows`: searches, range queries, reorders.

Each kernel replaces a vectorised numpy step whose temporaries (a mask, a ``where``, a
fancy index per level) cost more than the arithmetic: a loop compiled by numba does the
same work in one pass, allocating only its output. The results are the numpy steps'
exactly: integer arithmetic, comparisons and copies only.

numba is imported with this module, so `windows` imports it on first use (it costs half
a second); kernels are compiled once (seconds) and cached on disk beside this file, or
where the package folder is read-only in ``NUMBA_CACHE_DIR`` or a per-user cache folder;
with none writable, each process compiles them again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np


def _compiled(function: Callable[..., Any]) -> Any:
    """``function`` compiled by numba, its machine code cached on disk where possible."""
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # numba found no writable cache folder
        return numba.njit(nogil=True)(function)


@_compiled
def _bisect(haystack: np.ndarray, needle: int, right: bool) -> int:
    """``np.searchsorted(haystack, needle, "right" if right else "left")``."""
    lo, hi = 0, len(haystack)
    while lo < hi:
        mid = (lo + hi) // 2
        if haystack[mid] < needle or (right and haystack[mid] == needle):
            lo = mid + 1
        else:
            hi = mid
    return lo


@_compiled
def sorted_search(haystack: np.ndarray, needles: np.ndarray, shift: int, right: bool) -> np.ndarray:
    """``np.searchsorted(haystack, needles - shift, side)`` for ascending ``needles``.

    A binary search for the first needle, then one forward walk over both: O(log n + the
    needles + the haystack they span).
    """
    out = np.empty(len(needles), dtype=np.int64)
    n = len(haystack)
    at = _bisect(haystack, needles[0] - shift, right) if len(needles) else 0
    for i in range(len(needles)):
        needle = needles[i] - shift
        if right:
            while at < n and haystack[at] <= needle:
                at += 1
        else:
            while at < n and haystack[at] < needle:
                at += 1
        out[i] = at
    return out


@_compiled
def wavelet_kth(
    zeros: np.ndarray,
    bits: np.ndarray,
    first: np.ndarray,
    last: np.ndarray,
    k: np.ndarray,
) -> np.ndarray:
    """Per query, the ``k``-th smallest of ``first:last`` in a wavelet matrix.

    ``zeros[level]`` counts the values with a 0 at bit ``bits[level]`` before each
    position of that level (length n + 1); levels go from the highest bit down.
    """
    out = np.zeros(len(first), dtype=np.int64)
    n = zeros.shape[1] - 1
    for i in range(len(first)):
        a, b, kk = first[i], last[i], k[i]
        value = 0
        for level in range(zeros.shape[0]):
            row = zeros[level]
            za, zb = row[a], row[b]
            in_zeros = zb - za
            if kk >= in_zeros:
                kk -= in_zeros
                value |= 1 << bits[level]
                n_zeros = row[n]
                a, b = n_zeros + a - za, n_zeros + b - zb
            else:
                a, b = za, zb
        out[i] = value
    return out


@_compiled
def time_major_positions(rows: np.ndarray, n_minutes: int) -> np.ndarray:
    """Per row ``entity * n_minutes + minute`` (ascending), its position ordered by minute.

    A stable counting sort: rows of one minute keep their (entity) order.
    """
    counts = np.zeros(n_minutes + 1, dtype=np.int64)
    for i in range(len(rows)):
        counts[rows[i] % n_minutes + 1] += 1
    for m in range(n_minutes):
        counts[m + 1] += counts[m]
    out = np.empty(len(rows), dtype=np.int64)
    for i in range(len(rows)):
        minute = rows[i] % n_minutes
        out[i] = counts[minute]
        counts[minute] += 1
    return out


@_compiled
def window_distinct(
    cells: np.ndarray, values: np.ndarray, n_values: int, rows: np.ndarray, window: int
) -> np.ndarray:
    """Per ascending row cell ``r``, the distinct ``values`` whose cells lie in ``r - window
    .. r - 1``.

    ``cells`` ascending; a value is a number below ``n_values``. The window slides with
    the rows: each occurrence is counted in once and out once, O(rows + occurrences).
    """
    out = np.zeros(len(rows), dtype=np.int64)
    if len(rows) == 0:
        return out
    count = np.zeros(n_values, dtype=np.int64)
    distinct = 0
    n = len(cells)
    lo = hi = _bisect(cells, rows[0] - window, False)
    for i in range(len(rows)):
        new_lo, new_hi = lo, hi
        while new_lo < n and cells[new_lo] < rows[i] - window:
            new_lo += 1
        while new_hi < n and cells[new_hi] < rows[i]:
            new_hi += 1
        for j in range(lo, min(new_lo, hi)):  # out of the window
            count[values[j]] -= 1
            if count[values[j]] == 0:
                distinct -= 1
        for j in range(max(hi, new_lo), new_hi):  # into the window
            if count[values[j]] == 0:
                distinct += 1
            count[values[j]] += 1
        lo, hi = new_lo, max(new_hi, new_lo)
        out[i] = distinct
    return out


@_compiled
def _fenwick_add(tree: np.ndarray, base: int, size: int, i: int, delta: int) -> None:
    """Adds ``delta`` at 0-based position ``i`` of the tree ``tree[base : base + size]``."""
    i += 1
    while i <= size:
        tree[base + i - 1] += delta
        i += i & -i


@_compiled
def _fenwick_kth(tree: np.ndarray, base: int, size: int, k: int) -> int:
    """The 0-based position of the ``k``-th (0-based) counted item of a tree."""
    at = 0
    step = 1
    while step * 2 <= size:
        step *= 2
    while step > 0:
        if at + step <= size and tree[base + at + step - 1] <= k:
            at += step
            k -= tree[base + at - 1]
        step //= 2
    return at


@_compiled
def window_medians(
    cells: np.ndarray,
    rank: np.ndarray,
    group_start: np.ndarray,
    group_size: np.ndarray,
    by_rank: np.ndarray,
    rows: np.ndarray,
    window: int,
    tree: np.ndarray,
) -> np.ndarray:
    """Per ascending row cell ``r``, the median of the values whose cells lie in ``r -
    window .. r - 1`` (0.0 when none).

    Values come as their ``rank`` within their group (an entity: windows never span two),
    whose values, ascending, are ``by_rank[group_start : group_start + group_size]``; a
    Fenwick tree per group counts the window's ranks, so the window slides with the rows
    and each median is two k-th-smallest searches, O(log group size). ``tree`` (int64,
    one per value) is all zeros, and left so.
    """
    out = np.zeros(len(rows), dtype=np.float64)
    if len(rows) == 0:
        return out
    n = len(cells)
    lo = hi = _bisect(cells, rows[0] - window, False)
    for i in range(len(rows)):
        new_lo, new_hi = lo, hi
        while new_lo < n and cells[new_lo] < rows[i] - window:
            new_lo += 1
        while new_hi < n and cells[new_hi] < rows[i]:
            new_hi += 1
        for j in range(lo, min(new_lo, hi)):
            _fenwick_add(tree, group_start[j], group_size[j], rank[j], -1)
        for j in range(max(hi, new_lo), new_hi):
            _fenwick_add(tree, group_start[j], group_size[j], rank[j], 1)
        lo, hi = new_lo, max(new_hi, new_lo)
        m = hi - lo
        if m > 0:
            base, size = group_start[lo], group_size[lo]
            lower = by_rank[base + _fenwick_kth(tree, base, size, (m - 1) // 2)]
            upper = lower if m % 2 else by_rank[base + _fenwick_kth(tree, base, size, m // 2)]
            out[i] = (lower + upper) / 2
    for j in range(lo, hi):
        _fenwick_add(tree, group_start[j], group_size[j], rank[j], -1)
    return out


@_compiled
def window_max(cells: np.ndarray, values: np.ndarray, rows: np.ndarray, window: int) -> np.ndarray:
    """Per ascending row cell ``r``, the max of the ``values`` whose ``cells`` (ascending)
    lie in ``r - window .. r - 1`` (0 when none).

    A monotonic queue of the window's indices, values decreasing from its head: the window
    slides with the rows, each index queued and dropped once, O(rows + cells).
    """
    out = np.zeros(len(rows), dtype=values.dtype)
    if len(rows) == 0:
        return out
    n = len(cells)
    queue = np.empty(n, dtype=np.int64)
    head = tail = 0  # queue[head:tail]
    lo = hi = _bisect(cells, rows[0] - window, False)
    for i in range(len(rows)):
        while lo < n and cells[lo] < rows[i] - window:
            lo += 1
        hi = max(hi, lo)
        while hi < n and cells[hi] < rows[i]:
            while tail > head and values[queue[tail - 1]] <= values[hi]:
                tail -= 1
            queue[tail] = hi
            tail += 1
            hi += 1
        while head < tail and queue[head] < lo:
            head += 1
        if head < tail:
            out[i] = values[queue[head]]
    return out


@_compiled
def window_sums(prefix: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Per quantity ``j`` and row ``i``, ``prefix[last[i], j] - prefix[first[i], j]``.

    ``prefix`` holds the prefix sums of every quantity side by side (one row per cell),
    so a row's sums read two short runs of memory.
    """
    out = np.empty((prefix.shape[1], len(first)), dtype=prefix.dtype)
    for i in range(len(first)):
        a, b = first[i], last[i]
        for j in range(prefix.shape[1]):
            out[j, i] = prefix[b, j] - prefix[a, j]
    return out

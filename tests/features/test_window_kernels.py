"""The compiled window kernels against brute force on small random inputs, exactly."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qabuse_dagster.features.window_kernels import (
    sorted_search,
    time_major_positions,
    window_distinct,
    window_max,
    window_medians,
)

#: Minutes per entity in the cell numbering; cells keep this many minutes clear at each
#: end, as `windows` pads them, so no window reaches another entity's cells.
N_MINUTES = 200
PAD = 70


@st.composite
def _cells_and_rows(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Ascending cells (with repeats: several records a cell), a value per cell, ascending
    distinct row cells, and a window length."""
    minute = st.integers(PAD, N_MINUTES - PAD)
    cells = draw(
        st.lists(st.builds(lambda e, m: e * N_MINUTES + m, st.integers(0, 3), minute), max_size=60)
    )
    rows = draw(
        st.lists(
            st.builds(lambda e, m: e * N_MINUTES + m, st.integers(0, 3), minute),
            min_size=1,
            max_size=40,
            unique=True,
        )
    )
    values = draw(st.lists(st.integers(0, 5), min_size=len(cells), max_size=len(cells)))
    order = np.argsort(cells, kind="stable")
    window = draw(st.sampled_from([1, 5, 60]))
    return (
        np.array(cells, dtype=np.int64)[order],
        np.array(values, dtype=np.int64)[order],
        np.sort(np.array(rows, dtype=np.int64)),
        window,
    )


def _in_window(cells: np.ndarray, row: int, window: int) -> np.ndarray:
    return (cells >= row - window) & (cells < row)


@settings(max_examples=100, deadline=None)
@given(case=_cells_and_rows(), shift=st.integers(0, 70), right=st.booleans())
def test_sorted_search_is_searchsorted(
    case: tuple[np.ndarray, np.ndarray, np.ndarray, int], shift: int, right: bool
) -> None:
    cells, _, rows, _ = case

    got = sorted_search(cells, rows, shift, right)

    assert (
        got.tolist() == np.searchsorted(cells, rows - shift, "right" if right else "left").tolist()
    )


@settings(max_examples=100, deadline=None)
@given(case=_cells_and_rows())
def test_window_max_is_the_max_of_the_window(
    case: tuple[np.ndarray, np.ndarray, np.ndarray, int],
) -> None:
    cells, values, rows, window = case

    got = window_max(cells, values * 1000, rows, window)

    expected = [int((values * 1000)[_in_window(cells, r, window)].max(initial=0)) for r in rows]
    assert got.tolist() == expected


@settings(max_examples=100, deadline=None)
@given(case=_cells_and_rows())
def test_window_distinct_counts_the_distinct_values_of_the_window(
    case: tuple[np.ndarray, np.ndarray, np.ndarray, int],
) -> None:
    cells, values, rows, window = case

    got = window_distinct(cells, values, 6, rows, window)

    expected = [len(set(values[_in_window(cells, r, window)].tolist())) for r in rows]
    assert got.tolist() == expected


@settings(max_examples=100, deadline=None)
@given(case=_cells_and_rows(), runtimes=st.lists(st.floats(0.0, 1e4), min_size=60, max_size=60))
def test_window_medians_is_the_median_of_the_window(
    case: tuple[np.ndarray, np.ndarray, np.ndarray, int], runtimes: list[float]
) -> None:
    cells, _, rows, window = case
    values = np.array(runtimes[: len(cells)])
    entity = cells // N_MINUTES
    starts = np.searchsorted(entity, entity, side="left")
    sizes = np.searchsorted(entity, entity, side="right") - starts
    by_value = np.lexsort((values, entity))
    position = np.empty(len(cells), dtype=np.int64)
    position[by_value] = np.arange(len(cells))
    tree = np.zeros(len(cells), dtype=np.int64)

    got = window_medians(
        cells, position - starts, starts, sizes, values[by_value], rows, window, tree
    )

    expected = [
        float(np.median(values[_in_window(cells, r, window)]))
        if _in_window(cells, r, window).any()
        else 0.0
        for r in rows
    ]
    assert got.tolist() == expected
    assert not tree.any()  # left all zeros, for the next call


@settings(max_examples=100, deadline=None)
@given(case=_cells_and_rows())
def test_time_major_positions_order_rows_by_minute_then_entity(
    case: tuple[np.ndarray, np.ndarray, np.ndarray, int],
) -> None:
    _, _, rows, _ = case

    position = time_major_positions(rows, N_MINUTES)

    ordered = np.empty(len(rows), dtype=np.int64)
    ordered[position] = rows
    expected = rows[np.lexsort((rows // N_MINUTES, rows % N_MINUTES))]
    assert ordered.tolist() == expected.tolist()

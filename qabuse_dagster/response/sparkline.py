"""A key's last hour at a glance: submissions and failures per minute as a tiny chart.

Two renderings of one series (an alert's ``minutes``): :func:`sparkline_svg`, inline SVG
for the triage page (no image request, nothing for a Content-Security-Policy to allow),
and :func:`sparkline_png`, a small PNG for chat sinks that show images, not SVG.

Both draw submissions and failures on one scale, so the gap between the lines is the
share of failed jobs; an empty or all-zero hour is a flat line along the bottom.

Example:
    >>> svg = sparkline_svg([{"submissions": 2, "failures": 0}, {"submissions": 9, "failures": 3}])
    >>> svg.startswith("<svg") and svg.count("<polyline") == 2
    True
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from xml.sax.saxutils import escape, quoteattr

__all__ = ["FAILURES_COLOUR", "SUBMISSIONS_COLOUR", "sparkline_png", "sparkline_svg"]

SUBMISSIONS_COLOUR = "#2563eb"
FAILURES_COLOUR = "#dc2626"
#: Room at the edges so a line at zero or at the peak is not cut in half by the frame.
_PAD = 2.0


class _Minute(Protocol):
    submissions: int
    failures: int


MinuteLike = _Minute | Mapping[str, Any]
"""A minute of counts: an alert's ``MinuteCounts`` or a mapping with the same fields."""


def _counts(minutes: Sequence[MinuteLike]) -> tuple[list[int], list[int]]:
    submissions, failures = [], []
    for minute in minutes:
        if isinstance(minute, Mapping):
            submissions.append(int(minute["submissions"]))
            failures.append(int(minute["failures"]))
        else:
            submissions.append(int(minute.submissions))
            failures.append(int(minute.failures))
    if any(v < 0 for v in (*submissions, *failures)):
        raise ValueError("minute counts cannot be negative")
    return submissions, failures


def _flat_if_short(values: list[int]) -> list[int]:
    """A line needs two points: no minute is a flat line at zero, one minute a flat line."""
    return values if len(values) >= 2 else (values or [0]) * 2


def _points(values: Sequence[int], peak: int, width: float, height: float) -> str:
    """``x,y`` pairs for a polyline: evenly spaced, zero at the bottom, ``peak`` at the top."""
    span_x, span_y = width - 2 * _PAD, height - 2 * _PAD
    step = span_x / (len(values) - 1)
    return " ".join(
        f"{_PAD + i * step:.1f},{height - _PAD - (value / peak) * span_y:.1f}"
        for i, value in enumerate(values)
    )


def sparkline_svg(
    minutes: Sequence[MinuteLike],
    width: int = 240,
    height: int = 48,
    *,
    element_id: str | None = None,
) -> str:
    """The series as an inline ``<svg>``: one polyline of submissions, one of failures.

    Args:
        minutes: The minutes, oldest first (an alert's ``minutes``).
        width: Width in CSS pixels.
        height: Height in CSS pixels.
        element_id: The ``id`` attribute of the ``<svg>`` element, if any.

    Returns:
        SVG markup (an XML fragment) with a ``<title>`` giving the totals. Each polyline
        has a point per minute; fewer than two minutes draw a flat line of two points.
    """
    if width <= 2 * _PAD or height <= 2 * _PAD:
        raise ValueError(f"a sparkline needs more than {2 * _PAD:g} px each way")
    submissions, failures = _counts(minutes)
    peak = max([*submissions, *failures, 1])  # 1: an all-zero hour divides by something
    title = (
        f"last {len(minutes)} min: {sum(submissions)} submissions, {sum(failures)} failed"
        f" (peak {max([*submissions, 0])}/min)"
    )
    submissions, failures = _flat_if_short(submissions), _flat_if_short(failures)
    ident = f" id={quoteattr(element_id)}" if element_id is not None else ""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg"{ident} class="sparkline" role="img"'
        f' width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
        f" aria-label={quoteattr(title)}>"
        f"<title>{escape(title)}</title>"
        f'<polyline class="submissions" fill="none" stroke="{SUBMISSIONS_COLOUR}"'
        f' stroke-width="1.5" points="{_points(submissions, peak, width, height)}"/>'
        f'<polyline class="failures" fill="none" stroke="{FAILURES_COLOUR}"'
        f' stroke-width="1.5" points="{_points(failures, peak, width, height)}"/>'
        "</svg>"
    )


def sparkline_png(minutes: Sequence[MinuteLike], width: int = 240, height: int = 48) -> bytes:
    """The series as a small PNG (``width`` x ``height`` pixels), for chat messages."""
    # Imported here: matplotlib takes a while to load, and the gateway that serves the
    # triage page answers authorize calls that should not wait for it at startup.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    submissions, failures = _counts(minutes)
    submissions, failures = _flat_if_short(submissions), _flat_if_short(failures)
    peak = max([*submissions, *failures, 1])
    dpi = 100
    # Figure, not pyplot: no global state, so concurrent requests cannot mix figures.
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    xs = range(len(submissions))
    axes.plot(xs, submissions, color=SUBMISSIONS_COLOUR, linewidth=1.2)
    axes.plot(xs, failures, color=FAILURES_COLOUR, linewidth=1.2)
    axes.set_ylim(-0.05 * peak, 1.1 * peak)
    axes.set_axis_off()
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=dpi)
    return out.getvalue()

"""The alert's last hour as a sparkline: SVG that parses, PNG for chat, empty hours too."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest

from qabuse_dagster.response.alerts import Alert, example_alert
from qabuse_dagster.response.sparkline import sparkline_png, sparkline_svg

SVG = "{http://www.w3.org/2000/svg}"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _lines(svg: str) -> dict[str, list[tuple[float, float]]]:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return {
        str(line.get("class")): [
            (float(x), float(y))
            for x, y in (point.split(",") for point in str(line.get("points")).split())
        ]
        for line in root.findall(f"{SVG}polyline")
    }


def test_the_svg_has_a_line_of_submissions_and_one_of_failures() -> None:
    alert = Alert.model_validate(example_alert())
    svg = sparkline_svg(alert.minutes, width=240, height=48)
    lines = _lines(svg)
    assert set(lines) == {"submissions", "failures"}
    assert all(len(points) == len(alert.minutes) == 60 for points in lines.values())
    for points in lines.values():
        assert all(0 <= x <= 240 and 0 <= y <= 48 for x, y in points)
        assert [x for x, _ in points] == sorted(x for x, _ in points)
    # Higher counts draw higher (smaller y); both lines share one scale.
    submissions, failures = lines["submissions"], lines["failures"]
    assert submissions[-1][1] < submissions[0][1]
    assert failures[-1][1] > submissions[-1][1]
    title = ET.fromstring(svg).find(f"{SVG}title")
    assert title is not None and title.text is not None
    assert f"{alert.submissions_last_hour} submissions" in title.text
    assert f"{alert.failures_last_hour} failed" in title.text


@pytest.mark.parametrize(
    ("minutes", "points"),
    [
        ([], 2),
        ([{"submissions": 0, "failures": 0}], 2),
        ([{"submissions": 0, "failures": 0}] * 60, 60),
    ],
)
def test_an_empty_or_quiet_hour_is_a_flat_line(minutes: list[dict[str, Any]], points: int) -> None:
    lines = _lines(sparkline_svg(minutes))
    for line in lines.values():
        assert len(line) == points
        assert len({y for _, y in line}) == 1


def test_the_element_id_is_escaped_into_its_attribute() -> None:
    hostile = '"><script>alert(1)</script>'
    root = ET.fromstring(sparkline_svg([], element_id=hostile))
    assert root.get("id") == hostile
    assert ET.fromstring(sparkline_svg([], element_id="sparkline")).get("id") == "sparkline"


def test_negative_counts_and_no_room_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        sparkline_svg([{"submissions": -1, "failures": 0}])
    with pytest.raises(ValueError, match="px"):
        sparkline_svg([], width=4)


@pytest.mark.parametrize("n", [0, 1, 60])
def test_the_png_is_a_png(n: int) -> None:
    minutes = Alert.model_validate(example_alert()).minutes[:n]
    png = sparkline_png(minutes)
    assert png.startswith(PNG_MAGIC)
    assert len(png) < 20_000  # small enough for a chat message

"""Telemetry contract test cases: the schema oracle, valid records, and edge values.

Shared by the contract's own tests and by the collector's wire fast path, which must
agree with the contract on every one of them.
"""

from __future__ import annotations

import calendar
import json
import math
from datetime import datetime, timedelta
from importlib.resources import files
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from jsonschema import Draft202012Validator

SCHEMA_DIR = files("qabuse_dagster.telemetry") / "schemas"
SCHEMA: dict[str, Any] = json.loads(
    (SCHEMA_DIR / "telemetry-record.v1.schema.json").read_text(encoding="utf-8")
)
PROPERTIES: dict[str, dict[str, Any]] = SCHEMA["properties"]
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)

# derandomize: the same examples on every run ("seed everything").
FAST = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

HEX16 = "0123456789abcdef"
VALID_RECORD: dict[str, Any] = {
    "schema_version": 1,
    "job_id": "job-1",
    "timestamp": "2026-01-01T12:00:00Z",
    "user": HEX16,
    "api_key_id": HEX16 * 2,
    "provider": "ibm_quantum",
    "backend": "ibm_torino",
    "sdk": "qiskit",
    "num_circuits": 2,
    "shots": 1024,
    "status": "completed",
    "client_agent": "qabuse-qiskit/0.1 qiskit/2.6.1",
    "code_hash": HEX16 * 4,
}


def _types(subschema: dict[str, Any]) -> list[str]:
    declared = subschema.get("type", [])
    return [declared] if isinstance(declared, str) else list(declared)


PATTERN_FIELDS = tuple(name for name, sub in PROPERTIES.items() if "pattern" in sub)
NUMBER_FIELDS = tuple(name for name, sub in PROPERTIES.items() if "number" in _types(sub))


def _utc_out_of_range(text: str) -> bool:
    """Whether a valid RFC 3339 date-time's UTC instant lies outside years 1-9999."""
    local = datetime.strptime(text[:19].upper(), "%Y-%m-%dT%H:%M:%S")
    offset = timedelta(0)
    if text[-1] not in "Zz":
        offset = timedelta(hours=int(text[-5:-3]), minutes=int(text[-2:]))
        offset = -offset if text[-6] == "-" else offset
    try:
        local - offset
    except OverflowError:
        return True
    return False


def _is_finite_double(value: object) -> bool:
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except OverflowError:
        return False


def documented_divergence(obj: dict[str, Any]) -> str | None:
    """Name the documented divergence a schema-valid record hits, if any."""
    for name in (*PATTERN_FIELDS, "timestamp"):
        value = obj.get(name)
        if isinstance(value, str) and value.endswith("\n"):
            return "ECMA-262 '$': trailing newline"
    for name in NUMBER_FIELDS:
        value = obj.get(name)
        if isinstance(value, int | float) and not _is_finite_double(value):
            return "number not a finite double"
    timestamp = obj.get("timestamp")
    if isinstance(timestamp, str) and _utc_out_of_range(timestamp):
        return "instant outside years 1-9999 UTC"
    return None


def expected_verdict(obj: object) -> bool:
    """jsonschema's verdict, adjusted for the contract's documented divergences."""
    if not VALIDATOR.is_valid(obj):
        return False
    assert isinstance(obj, dict)
    return documented_divergence(obj) is None


# ---- strategies -------------------------------------------------------------------------


@st.composite
def rfc3339_date_times(draw: st.DrawFn) -> str:
    """Valid RFC 3339 date-times: any calendar day, either case of T and Z, any offset."""
    year = draw(st.integers(1, 9999))
    month = draw(st.integers(1, 12))
    day = draw(st.integers(1, calendar.monthrange(year, month)[1]))
    clock = draw(st.tuples(st.integers(0, 23), st.integers(0, 59), st.integers(0, 59)))
    fraction = draw(st.sampled_from(["", ".5", ".000001", ".123456789"]) | st.just(""))
    separator = draw(st.sampled_from("Tt"))
    offset = draw(
        st.sampled_from(["Z", "z", "+00:00", "-00:00"])
        | st.builds(
            "{}{:02d}:{:02d}".format, st.sampled_from("+-"), st.integers(0, 23), st.integers(0, 59)
        )
    )
    hour, minute, second = clock
    return (
        f"{year:04d}-{month:02d}-{day:02d}{separator}"
        f"{hour:02d}:{minute:02d}:{second:02d}{fraction}{offset}"
    )


def _value_strategy(subschema: dict[str, Any]) -> st.SearchStrategy[Any]:
    # hypothesis-jsonschema 0.23.1 fails on object schemas with current Hypothesis
    # ('many' object has no attribute 'more'), so objects are assembled here from
    # from_schema strategies for their values.
    types = _types(subschema)
    if "object" in types:
        objects = st.dictionaries(
            st.text(max_size=12),
            from_schema(subschema["additionalProperties"]),
            max_size=subschema.get("maxProperties", 8),
        )
        return objects | st.none() if "null" in types else objects
    if subschema.get("format") == "date-time":
        return rfc3339_date_times()
    return from_schema(subschema)


def schema_objects(schema: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the schema's properties: required ones always, optional ones sometimes."""
    properties = schema["properties"]
    return st.fixed_dictionaries(
        {name: _value_strategy(properties[name]) for name in schema["required"]},
        optional={
            name: _value_strategy(sub)
            for name, sub in properties.items()
            if name not in schema["required"]
        },
    )


VALID_RECORDS = schema_objects(SCHEMA).filter(
    lambda obj: VALIDATOR.is_valid(obj) and documented_divergence(obj) is None
)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)

BAD_TIMESTAMPS = [
    "2026-01-01T00:00:00",  # no offset
    "2026-13-01T00:00:00Z",
    "2026-02-30T00:00:00Z",
    "2023-02-29T00:00:00Z",
    "0000-01-01T00:00:00Z",
    "2026-01-01 00:00:00Z",
    "2026-01-01T24:00:00Z",
    "2026-01-01T23:60:00Z",
    "2026-01-01T23:59:60Z",  # leap seconds are not supported by the format checker
    "2026-01-01T00:00:00+24:00",
    "2026-01-01T00:00:00+05:60",
    "2026-01-01T00:00:00+0500",
    "2026-01-01T00:00:00.Z",
    "2026-1-01T00:00:00Z",
    "26-01-01T00:00:00Z",
    "2026-01-01",
    "\uff12026-01-01T00:00:00Z",  # a fullwidth digit
    " 2026-01-01T00:00:00Z",
    "2026-01-01T00:00:00ZZ",
    "",
    1767225600,
    None,
]
GOOD_TIMESTAMPS = [
    "2026-01-01T00:00:00Z",
    "2026-01-01t00:00:00z",
    "2026-01-01T00:00:00.123456789+05:30",
    "2024-02-29T23:59:59-00:00",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999Z",
    "2026-01-01T00:00:00.000001z",  # canonical but for the case of z
    "2026-01-01T00:00:00.000001+00:00",
]


def _edge_values(name: str, sub: dict[str, Any]) -> list[Any]:
    """Values on and around each constraint of one property, plus wrong types."""
    types = _types(sub)
    wrong_types: list[Any] = [None, True, False, 0, 3.5, "3", "", [], {}, [1], {"a": 1}]
    if name == "schema_version":
        return [1, 1.0, 0, 2, 1.5, True, "1", None, -1]
    if "enum" in sub:
        return [*sub["enum"], sub["enum"][0].upper(), " " + sub["enum"][0], *wrong_types]
    if sub.get("format") == "date-time":
        return GOOD_TIMESTAMPS + BAD_TIMESTAMPS
    if "integer" in types:
        values = [0, 3, 3.0, -0.0, -1, -1.0, 3.5, 1e-9, 2**70, 1e300, *wrong_types]
        if "maximum" in sub:
            top = sub["maximum"]
            values += [top, top + 1, float(top), top + 0.5, top - 0.5]
        return values
    if "number" in types:
        return [0, 0.0, -0.0, 7, 2.5, 1e-300, -1e-300, -1, 1e308, 2**70, *wrong_types]
    if sub.get("pattern") == "^[A-Z]{2}$":
        return ["US", "GB", "us", "USA", "U", "U1", "\u00dcS", " US", *wrong_types]
    if "pattern" in sub:
        return [
            HEX16,
            "f" * 64,
            "0" * 15,
            "0" * 65,
            HEX16.upper(),
            " " + HEX16,
            HEX16[:-1] + "g",
            HEX16 + "\n" + HEX16,
            *wrong_types,
        ]
    if "object" in types:
        value_type = _types(sub["additionalProperties"])
        if "integer" in value_type:  # gate_counts
            entries = [0, 7, 3.0, -1, 1.5, True, "3", None, 2**70]
            return [{}, *({"cx": v} for v in entries), {"": 1, "h": 2}, [], "cx", 3, None]
        width = sub["additionalProperties"]["maxLength"]  # tags
        return [
            {},
            {f"k{i}": "v" for i in range(16)},
            {f"k{i}": "v" for i in range(17)},
            {"k": "x" * width},
            {"k": "x" * (width + 1)},
            {"k": "\U0001f600" * width},
            {"k": 1},
            {"k": None},
            {"k": True},
            [],
            "k",
            None,
        ]
    # Plain strings: lengths in code points, around both bounds.
    low, high = sub.get("minLength", 0), sub.get("maxLength", 200)
    return [
        "x" * low,
        "x" * max(low - 1, 0),
        "x" * high,
        "x" * (high + 1),
        "\U0001f600" * high,
        "\U0001f600" * (high + 1),
        "a\nb",
        *wrong_types,
    ]


EDGE_CASES = [
    (name, value) for name, sub in PROPERTIES.items() for value in _edge_values(name, sub)
]


@st.composite
def mutated_records(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A valid record with one field dropped, added, or set to an edge or arbitrary value."""
    record = dict(draw(VALID_RECORDS))
    mutation = draw(st.sampled_from(["drop", "extra", "edge", "arbitrary"]))
    if mutation == "drop":
        field = draw(st.sampled_from(sorted(record)))
        del record[field]
    elif mutation == "extra":
        field = draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in PROPERTIES))
        record[field] = draw(JSON_VALUES)
    elif mutation == "edge":
        field, record[field] = draw(st.sampled_from(EDGE_CASES))
    else:
        field = draw(st.sampled_from(list(PROPERTIES)))
        record[field] = draw(JSON_VALUES)
    return field, record

"""The telemetry contract model accepts exactly what the v1 JSON Schema accepts.

The oracle is ``jsonschema.Draft202012Validator`` with ``format`` asserted, adjusted only
for the divergences documented in `qabuse_dagster.telemetry.contract` (see
`documented_divergence`); `test_documented_divergences` pins each of them.
"""

from __future__ import annotations

import ast
import calendar
import doctest
import json
import math
import os
import pickle
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from qabuse_dagster.telemetry import contract
from qabuse_dagster.telemetry.contract import (
    CONTRACT_COLUMNS,
    IDENTITY,
    ContractViolation,
    TelemetryRecord,
    record_to_json,
    validate_record,
)

SCHEMA_DIR = files("qabuse_dagster.telemetry") / "schemas"
SCHEMA: dict[str, Any] = json.loads(
    (SCHEMA_DIR / "telemetry-record.v1.schema.json").read_text(encoding="utf-8")
)
PROPERTIES: dict[str, dict[str, Any]] = SCHEMA["properties"]
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)
# The shared contracts folder lies beside the repository root in the workspace.
SHARED_CONTRACTS = Path(__file__).resolve().parents[2].parent / "shared" / "contracts"

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


def verdict(obj: object) -> tuple[bool, list[tuple[str, str]]]:
    try:
        validate_record(obj)
    except ContractViolation as exc:
        assert exc.errors, "a violation must list at least one error"
        return False, exc.errors
    return True, []


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


# ---- the contract files ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shipped", "shared"),
    [
        ("telemetry-record.v1.schema.json", "telemetry-record.schema.json"),
        ("incident-labels.v1.schema.json", "incident-labels.schema.json"),
    ],
)
def test_shipped_schema_is_a_byte_identical_copy(shipped: str, shared: str) -> None:
    if not SHARED_CONTRACTS.is_dir():
        # CI always has shared/ beside the clone, so there the comparison must run.
        assert not os.environ.get("CI"), f"CI without shared contracts at {SHARED_CONTRACTS}"
        pytest.skip(f"no shared contracts folder at {SHARED_CONTRACTS}")
    assert (SCHEMA_DIR / shipped).read_bytes() == (SHARED_CONTRACTS / shared).read_bytes()


def test_model_fields_follow_the_schema() -> None:
    assert tuple(PROPERTIES) == CONTRACT_COLUMNS
    required = {name for name, field in TelemetryRecord.model_fields.items() if field.is_required()}
    assert required == set(SCHEMA["required"])
    optional = [name for name in CONTRACT_COLUMNS if name not in required]
    defaults = {name: TelemetryRecord.model_fields[name].default for name in optional}
    assert defaults == {name: PROPERTIES[name].get("default") for name in optional}
    assert IDENTITY == ("job_id", "status")
    assert set(IDENTITY) <= set(SCHEMA["required"])


# ---- accept exactly what the schema accepts -----------------------------------------------


@FAST
@given(VALID_RECORDS)
def test_valid_records_are_accepted_and_round_trip(obj: dict[str, Any]) -> None:
    record = validate_record(obj)
    assert record.timestamp.tzinfo is UTC
    out = record_to_json(record)
    assert tuple(out) == CONTRACT_COLUMNS
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", out["timestamp"])
    assert VALIDATOR.is_valid(out)
    assert validate_record(json.loads(json.dumps(out, allow_nan=False))) == record
    assert validate_record(out) == record


@FAST
@given(mutated_records())
def test_verdict_equals_the_schema_on_mutated_records(case: tuple[str, dict[str, Any]]) -> None:
    field, obj = case
    accepted, errors = verdict(obj)
    assert accepted == expected_verdict(obj), errors
    if not accepted:
        # Only the mutated field changed, so the errors are about it and nothing else.
        assert {path.split(".")[0] for path, _ in errors} == {field}
        assert not any("Input should" in message for _, message in errors)


@pytest.mark.parametrize(("field", "value"), EDGE_CASES)
def test_verdict_equals_the_schema_on_edge_values(field: str, value: Any) -> None:
    obj = {**VALID_RECORD, field: value}
    accepted, errors = verdict(obj)
    assert accepted == expected_verdict(obj), errors
    assert all(path.split(".")[0] == field for path, _ in errors)


@pytest.mark.parametrize(
    ("field", "value", "valid"),
    [
        # "integer": integral numbers, never booleans or strings
        ("shots", 3.0, True),
        ("shots", 3.5, False),
        ("shots", "3", False),
        ("shots", True, False),
        ("shots", None, True),  # required, but the type lists "null"
        ("num_circuits", None, False),
        ("retry_count", None, False),
        ("num_qubits", 100_000.0, True),
        ("num_qubits", 100_001, False),
        ("depth", 10**30, True),  # no maximum in the schema
        ("gate_counts", {"cx": 2.0}, True),
        ("gate_counts", {"cx": False}, False),
        ("gate_counts", {"cx": -1}, False),
        # "number": ints and floats, never booleans or strings
        ("runtime_s", 7, True),
        ("runtime_s", 0.25, True),
        ("runtime_s", False, False),
        ("runtime_s", "0.25", False),
        ("runtime_s", -0.001, False),
        # const 1
        ("schema_version", 1.0, True),
        ("schema_version", True, False),
        ("schema_version", "1", False),
        # strings: never coerced; length in code points
        ("job_id", 7, False),
        ("backend", "\U0001f600" * 128, True),
        ("backend", "\U0001f600" * 129, False),
        ("provider", "", False),
        ("region", "", True),
        # patterns
        ("user", "0123456789ABCDEF", False),
        ("country", "us", False),
        ("source_ip_hash", None, True),
        ("code_hash", None, False),
        # tags
        ("tags", {f"k{i}": "v" for i in range(16)}, True),
        ("tags", {f"k{i}": "v" for i in range(17)}, False),
        ("tags", {"k": "x" * 129}, False),
        # date-time
        ("timestamp", "2026-01-01t00:00:00z", True),
        ("timestamp", "2026-01-01T00:00:00.5+05:30", True),
        ("timestamp", "2026-01-01T00:00:00", False),
        ("timestamp", "2026-13-01T00:00:00Z", False),
    ],
)
def test_json_schema_semantics(field: str, value: Any, valid: bool) -> None:
    obj = {**VALID_RECORD, field: value}
    assert VALIDATOR.is_valid(obj) is valid
    assert verdict(obj)[0] is valid


def test_unknown_and_missing_fields_are_rejected() -> None:
    assert verdict({**VALID_RECORD, "circuit_source": "OPENQASM 3;"})[1] == [
        ("circuit_source", 'unexpected field, not in the contract (got "OPENQASM 3;")')
    ]
    for name in SCHEMA["required"]:
        obj = {key: value for key, value in VALID_RECORD.items() if key != name}
        assert verdict(obj) == (False, [(name, "missing required field")])
    optional = {key: value for key, value in VALID_RECORD.items()}
    assert validate_record(optional).retry_count == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        # ECMA-262 '$' is end of string; Python's re.search lets a final "\n" through.
        ("user", HEX16 + "\n"),
        ("code_hash", HEX16 + "\n"),
        ("source_ip_hash", HEX16 + "\n"),
        ("country", "US\n"),
        ("timestamp", "2026-01-01T00:00:00Z\n"),
        # Not finite doubles: NaN and Infinity are not JSON; 10**400 overflows a double.
        ("runtime_s", float("nan")),
        ("queue_time_s", float("inf")),
        ("submit_latency_s", 10**400),
        # Valid RFC 3339, but the UTC instant is outside what datetime can hold.
        ("timestamp", "0001-01-01T00:30:00+01:00"),
        ("timestamp", "9999-12-31T23:59:59-00:01"),
    ],
)
def test_documented_divergences(field: str, value: Any) -> None:
    obj = {**VALID_RECORD, field: value}
    assert VALIDATOR.is_valid(obj), "jsonschema accepts this record"
    assert documented_divergence(obj) is not None
    accepted, errors = verdict(obj)
    assert not accepted
    assert [path for path, _ in errors] == [field]


# ---- values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "instant"),
    [
        ("2026-03-01T01:30:00+02:00", datetime(2026, 2, 28, 23, 30, tzinfo=UTC)),
        ("2026-01-01t00:00:00.123456789z", datetime(2026, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)),
        ("2024-02-29T23:59:59.5-00:30", datetime(2024, 3, 1, 0, 29, 59, 500000, tzinfo=UTC)),
        ("0001-01-01T00:00:00-00:00", datetime(1, 1, 1, tzinfo=UTC)),
    ],
)
def test_timestamps_are_normalised_to_utc(text: str, instant: datetime) -> None:
    record = validate_record({**VALID_RECORD, "timestamp": text})
    assert record.timestamp == instant
    assert record.timestamp.tzinfo is UTC


def test_integral_numbers_become_ints_and_numbers_floats() -> None:
    record = validate_record(
        {**VALID_RECORD, "shots": 1024.0, "gate_counts": {"cx": 3.0}, "runtime_s": 2}
    )
    assert type(record.shots) is int
    assert type(record.gate_counts["cx"]) is int  # type: ignore[index]
    assert type(record.runtime_s) is float
    assert type(validate_record({**VALID_RECORD, "schema_version": 1.0}).schema_version) is int


def test_record_to_json_keeps_nulls_and_copies_mappings() -> None:
    record = validate_record({**VALID_RECORD, "tags": {"ci": "true"}, "shots": None})
    out = record_to_json(record)
    assert out["shots"] is None
    assert out["region"] is None
    assert out["timestamp"] == "2026-01-01T12:00:00.000000Z"
    out["tags"]["ci"] = "false"
    assert record.tags == {"ci": "true"}


def test_python_construction_takes_aware_datetimes_only() -> None:
    fields = {
        **VALID_RECORD,
        "timestamp": datetime(2026, 1, 1, 13, 0, tzinfo=timezone(timedelta(hours=1))),
    }
    record = TelemetryRecord(**fields)
    assert record == validate_record(VALID_RECORD)
    assert TelemetryRecord(**record.model_dump()) == record
    with pytest.raises(ValidationError, match="timezone-aware"):
        TelemetryRecord(**{**fields, "timestamp": datetime(2026, 1, 1)})
    # Decoded JSON never holds a datetime, so validate_record refuses one.
    with pytest.raises(ContractViolation, match="timestamp: expected a string, got datetime"):
        validate_record(fields)


def test_records_are_frozen() -> None:
    record = validate_record(VALID_RECORD)
    with pytest.raises(ValidationError):
        record.shots = 1  # type: ignore[misc]


# ---- messages ----------------------------------------------------------------------------


def test_messages_name_the_field_and_show_the_value() -> None:
    obj = {key: value for key, value in VALID_RECORD.items() if key != "user"}
    with pytest.raises(ContractViolation) as caught:
        validate_record({**obj, "shots": -1})
    assert str(caught.value) == "user: missing required field; shots: must be >= 0 (got -1)"
    assert caught.value.errors == [
        ("user", "missing required field"),
        ("shots", "must be >= 0 (got -1)"),
    ]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("gate_counts", {"cx": -1}, "gate_counts.cx: must be >= 0 (got -1)"),
        ("gate_counts", {"h": True}, "gate_counts.h: expected an integer, got boolean (true)"),
        ("num_circuits", 3.5, "num_circuits: expected an integer, got number (3.5)"),
        ("shots", "3", 'shots: expected an integer or null, got string ("3")'),
        ("job_id", None, "job_id: expected a string, got null"),
        ("schema_version", 2, "schema_version: must be 1 (got 2)"),
        ("sdk", "Qiskit", 'sdk: must be one of qiskit, cirq, pennylane, other (got "Qiskit")'),
        ("country", "usa", 'country: must match ^[A-Z]{2}$ (got "usa")'),
        ("tags", {f"k{i}": "v" for i in range(17)}, "tags: must have at most 16 entries (got 17)"),
        ("runtime_s", float("nan"), "runtime_s: must be a finite number (got NaN)"),
        ("timestamp", "2026-01-01T00:00:00", "timestamp: must be an RFC 3339 date-time"),
        ("timestamp", "2026-02-30T00:00:00Z", "day is out of range for month"),
        ("provider", "", "provider: must not be empty"),
    ],
)
def test_message_for_each_kind_of_violation(field: str, value: Any, message: str) -> None:
    with pytest.raises(ContractViolation) as caught:
        validate_record({**VALID_RECORD, field: value})
    assert message in str(caught.value)


def test_long_values_are_truncated_to_80_characters() -> None:
    with pytest.raises(ContractViolation) as caught:
        validate_record({**VALID_RECORD, "job_id": "x" * 5000})
    (path, message), *_ = caught.value.errors
    assert path == "job_id"
    assert message.startswith("must be at most 128 characters (got 5000: ")
    shown = message.split(": ", 1)[1].rstrip(")")
    assert len(shown) == 80
    assert shown.endswith("...")


@pytest.mark.parametrize(
    ("obj", "kind"), [([VALID_RECORD], "array"), ("{}", "string"), (None, "null"), (3, "integer")]
)
def test_non_objects_are_rejected_as_a_whole(obj: object, kind: str) -> None:
    with pytest.raises(ContractViolation) as caught:
        validate_record(obj)
    assert caught.value.errors == [("<record>", f"expected a JSON object, got {kind}")]


def test_contract_violation_is_a_value_error_and_pickles() -> None:
    violation = ContractViolation([("shots", "must be >= 0 (got -1)")])
    assert isinstance(violation, ValueError)
    restored = pickle.loads(pickle.dumps(violation))
    assert restored.errors == violation.errors
    assert str(restored) == "shots: must be >= 0 (got -1)"


# ---- the module --------------------------------------------------------------------------


def test_docstring_examples_run() -> None:
    assert doctest.testmod(contract).failed == 0


def test_contract_imports_only_the_standard_library_and_pydantic() -> None:
    tree = ast.parse(Path(contract.__file__).read_text(encoding="utf-8"))
    imported = {
        (alias.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported - set(sys.stdlib_module_names) == {"pydantic"}
    # The package imports on the way must not pull in server-side dependencies either.
    heavy = ["dagster", "feast", "mlflow", "bentoml", "torch", "pyarrow", "pandas", "jsonschema"]
    probe = (
        "import sys, qabuse_dagster.telemetry.contract; "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"

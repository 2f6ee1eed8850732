"""The telemetry contract model accepts exactly what the v1 JSON Schema accepts.

The oracle is ``jsonschema.Draft202012Validator`` with ``format`` asserted, adjusted only
for the divergences documented in `qabuse_dagster.telemetry.contract` (see
`documented_divergence`); `test_documented_divergences` pins each of them.
"""

from __future__ import annotations

import ast
import doctest
import json
import os
import pickle
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from pydantic import ValidationError
from support.contract_cases import (
    EDGE_CASES,
    FAST,
    HEX16,
    PROPERTIES,
    SCHEMA,
    SCHEMA_DIR,
    VALID_RECORD,
    VALID_RECORDS,
    VALIDATOR,
    documented_divergence,
    expected_verdict,
    mutated_records,
)

from qabuse_dagster.telemetry import contract
from qabuse_dagster.telemetry.contract import (
    CONTRACT_COLUMNS,
    IDENTITY,
    ContractViolation,
    TelemetryRecord,
    record_to_json,
    validate_record,
)

# The shared contracts folder lies beside the repository root in the workspace.
SHARED_CONTRACTS = Path(__file__).resolve().parents[2].parent / "shared" / "contracts"


def verdict(obj: object) -> tuple[bool, list[tuple[str, str]]]:
    try:
        validate_record(obj)
    except ContractViolation as exc:
        assert exc.errors, "a violation must list at least one error"
        return False, exc.errors
    return True, []


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

"""Incident labels: the model matches the v1 JSON Schema; JSONL reading and writing."""

from __future__ import annotations

import ast
import calendar
import json
import os
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from jsonschema import Draft202012Validator
from pydantic import ValidationError
from support.contract_cases import FAST

from qabuse_dagster.telemetry import labels as labels_module
from qabuse_dagster.telemetry.contract import JSON_INPUT_CONTEXT, errors_from_validation
from qabuse_dagster.telemetry.labels import (
    IncidentLabel,
    LabelsError,
    label_to_json,
    read_labels,
    write_labels,
)

SCHEMA: dict[str, Any] = json.loads(
    (files("qabuse_dagster.telemetry") / "schemas" / "incident-labels.v1.schema.json").read_text(
        encoding="utf-8"
    )
)
PROPERTIES: dict[str, dict[str, Any]] = SCHEMA["properties"]
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)

HEX16 = "0123456789abcdef"
VALID_LABEL: dict[str, Any] = {
    "incident_id": "inc-1",
    "kind": "credential_stuffing",
    "start": "2026-01-01T00:00:00Z",
    "end": "2026-01-02T00:00:00Z",
    "api_key_ids": [HEX16],
}


def _utc(text: str) -> datetime | None:
    """The UTC instant of a valid RFC 3339 date-time; None outside years 1-9999."""
    local = datetime.strptime(text[:19].upper(), "%Y-%m-%dT%H:%M:%S")
    fraction = text[19:].rstrip("Zz").split("+")[0].split("-")[0]
    micro = int(fraction[1:7].ljust(6, "0")) if fraction.startswith(".") else 0
    offset = timedelta(0)
    if text[-1] not in "Zz":
        offset = timedelta(hours=int(text[-5:-3]), minutes=int(text[-2:]))
        offset = -offset if text[-6] == "-" else offset
    try:
        return (local - offset + timedelta(microseconds=micro)).replace(tzinfo=UTC)
    except OverflowError:
        return None


def expected_verdict(obj: object) -> bool:
    """jsonschema's verdict, with the telemetry contract's documented divergences, plus
    the one stricter rule: end after start."""
    if not VALIDATOR.is_valid(obj):
        return False
    assert isinstance(obj, dict)
    ids = [*obj.get("api_key_ids", []), *obj.get("users", [])]
    if any(value.endswith("\n") for value in [*ids, obj["start"], obj["end"]]):
        return False  # ECMA-262 '$' and RFC 3339: no trailing newline
    start, end = _utc(obj["start"]), _utc(obj["end"])
    return start is not None and end is not None and end > start


def verdict(obj: dict[str, Any]) -> tuple[bool, list[tuple[str, str]]]:
    try:
        IncidentLabel.model_validate(obj, context=JSON_INPUT_CONTEXT)
    except ValidationError as exc:
        return False, errors_from_validation(exc)
    return True, []


@st.composite
def rfc3339_date_times(draw: st.DrawFn) -> str:
    """Valid RFC 3339 date-times, clustered in one year so that end > start is common."""
    year = draw(st.sampled_from([2026, 1, 9999]) | st.integers(1, 9999))
    month = draw(st.integers(1, 12))
    day = draw(st.integers(1, calendar.monthrange(year, month)[1]))
    hour, minute = draw(st.integers(0, 23)), draw(st.integers(0, 59))
    fraction = draw(st.sampled_from(["", ".25", ".1234567"]))
    offset = draw(st.sampled_from(["Z", "z", "+05:30", "-08:00", "-00:00"]))
    separator = draw(st.sampled_from("Tt"))
    return (
        f"{year:04d}-{month:02d}-{day:02d}{separator}{hour:02d}:{minute:02d}:00{fraction}{offset}"
    )


# The items' pattern ^[0-9a-f]{16,64}$, drawn as bytes: from_schema's regex strategy
# draws each character separately and made this file too slow (the telemetry tests
# exercise from_schema on the same pattern).
HEX_HASHES = st.tuples(st.binary(min_size=8, max_size=32), st.booleans()).map(
    lambda drawn: drawn[0].hex()[: -1 if drawn[1] and len(drawn[0]) > 8 else None]
)
assert (
    PROPERTIES["api_key_ids"]["items"]
    == PROPERTIES["users"]["items"]
    == {
        "type": "string",
        "pattern": "^[0-9a-f]{16,64}$",
    }
)

# Built once: from_schema canonicalises its schema on every call.
VALUE_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "incident_id": from_schema(PROPERTIES["incident_id"]),
    "kind": from_schema(PROPERTIES["kind"]),
    "notes": from_schema(PROPERTIES["notes"]),
    **{
        name: st.lists(HEX_HASHES, min_size=PROPERTIES[name]["minItems"], max_size=3)
        for name in ("api_key_ids", "users")
    },
}


@st.composite
def label_objects(draw: st.DrawFn) -> dict[str, Any]:
    """Label objects built to be valid mostly: start before end, keys or users or both.

    hypothesis-jsonschema 0.23.1 fails on object schemas with current Hypothesis
    ('many' object has no attribute 'more'), so the object is assembled here from
    from_schema strategies for its properties' values.
    """
    obj = {name: draw(VALUE_STRATEGIES[name]) for name in ("incident_id", "kind")}
    start, end = draw(rfc3339_date_times()), draw(rfc3339_date_times())
    start_utc, end_utc = _utc(start), _utc(end)
    if start_utc is not None and end_utc is not None and end_utc < start_utc:
        start, end = end, start
    obj.update(start=start, end=end)
    targets = draw(st.sampled_from([["api_key_ids"], ["users"], ["api_key_ids", "users"]]))
    for name in targets:
        obj[name] = draw(VALUE_STRATEGIES[name])
    if draw(st.booleans()):
        obj["notes"] = draw(VALUE_STRATEGIES["notes"])
    return obj


VALID_LABELS = label_objects().filter(expected_verdict)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=9),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=5,
)
EDGE_VALUES: dict[str, list[Any]] = {
    "incident_id": ["", "x", "x" * 128, "x" * 129, 1, None],
    "kind": ["", "key_leak", "x" * 64, "x" * 65, None, ["key_leak"]],
    "start": ["2025-12-31T23:59:59Z", "2026-01-01T00:00:00", "2026-02-30T00:00:00Z", 0, None],
    "end": ["2026-01-01T00:00:00Z", "2026-01-01T00:00:00+01:00", "2026-01-01T05:00:00+05:00"],
    "api_key_ids": [[], [HEX16], [HEX16, HEX16], [HEX16.upper()], [HEX16 + "\n"], HEX16, None],
    "users": [[], ["f" * 64], ["f" * 65], [1], None, {}],
    "notes": [None, "", "x" * 2000, "x" * 2001, 5, False],
}


@st.composite
def mutated_labels(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A valid label with one field dropped, added, or replaced."""
    label = dict(draw(VALID_LABELS))
    mutation = draw(st.sampled_from(["drop", "extra", "edge", "arbitrary"]))
    if mutation == "drop":
        field = draw(st.sampled_from(sorted(label)))
        del label[field]
    elif mutation == "extra":
        field = draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in PROPERTIES))
        label[field] = draw(JSON_VALUES)
    else:
        field = draw(st.sampled_from(sorted(PROPERTIES)))
        values = st.sampled_from(EDGE_VALUES[field]) if mutation == "edge" else JSON_VALUES
        label[field] = draw(values)
    return field, label


# ---- the model ---------------------------------------------------------------------------


@FAST
@given(VALID_LABELS)
def test_valid_labels_are_accepted_and_round_trip(obj: dict[str, Any]) -> None:
    label = IncidentLabel.model_validate(obj, context=JSON_INPUT_CONTEXT)
    assert label.start.tzinfo is UTC
    assert label.end.tzinfo is UTC
    out = label_to_json(label)
    assert VALIDATOR.is_valid(out)
    assert IncidentLabel.model_validate(out, context=JSON_INPUT_CONTEXT) == label


@FAST
@given(mutated_labels())
def test_verdict_equals_the_schema_on_mutated_labels(case: tuple[str, dict[str, Any]]) -> None:
    field, obj = case
    accepted, errors = verdict(obj)
    assert accepted == expected_verdict(obj), errors
    for path, message in errors:
        # A dropped api_key_ids/users or a moved start/end is a whole-record error.
        assert path.split(".")[0] in (field, "<record>")
        assert "Input should" not in message


@pytest.mark.parametrize(
    ("field", "value"),
    [(field, value) for field, values in EDGE_VALUES.items() for value in values],
)
def test_verdict_equals_the_schema_on_edge_values(field: str, value: Any) -> None:
    obj = {**VALID_LABEL, field: value}
    accepted, errors = verdict(obj)
    assert accepted == expected_verdict(obj), errors
    assert all(path.split(".")[0] in (field, "<record>") for path, _ in errors)


@pytest.mark.parametrize(
    ("changes", "valid"),
    [
        ({"users": [HEX16]}, True),
        ({"api_key_ids": None}, False),  # not nullable
        ({"api_key_ids": []}, False),
        ({"notes": None}, True),
        ({"start": "2026-01-01t00:00:00z", "end": "2026-01-01T00:00:00.000001+00:00"}, True),
    ],
)
def test_json_schema_semantics(changes: dict[str, Any], valid: bool) -> None:
    obj = {**VALID_LABEL, **changes}
    assert VALIDATOR.is_valid(obj) is valid
    assert verdict(obj)[0] is valid


def test_api_key_ids_or_users_is_required() -> None:
    obj = {key: value for key, value in VALID_LABEL.items() if key != "api_key_ids"}
    assert not VALIDATOR.is_valid(obj)
    assert verdict(obj) == (False, [("<record>", "needs api_key_ids or users (or both)")])
    assert IncidentLabel.model_validate({**obj, "users": [HEX16]}).api_key_ids is None


def test_bad_items_are_named_by_index() -> None:
    accepted, errors = verdict({**VALID_LABEL, "api_key_ids": [HEX16, "nope"]})
    assert not accepted
    assert errors == [("api_key_ids.1", 'must match ^[0-9a-f]{16,64}$ (got "nope")')]


@pytest.mark.parametrize("end", ["2026-01-01T00:00:00Z", "2026-01-01T00:00:00+01:00"])
def test_end_must_follow_start_which_is_stricter_than_the_schema(end: str) -> None:
    obj = {**VALID_LABEL, "end": end}
    assert VALIDATOR.is_valid(obj)
    accepted, errors = verdict(obj)
    assert not accepted
    assert errors[0][0] == "<record>"
    assert errors[0][1].startswith("end must be after start (got start 2026-01-01T00:00:00.0")


def test_label_to_json_leaves_out_absent_keys() -> None:
    label = IncidentLabel.model_validate({**VALID_LABEL, "start": "2026-01-01T01:00:00+01:00"})
    assert label_to_json(label) == {
        "incident_id": "inc-1",
        "kind": "credential_stuffing",
        "start": "2026-01-01T00:00:00.000000Z",
        "end": "2026-01-02T00:00:00.000000Z",
        "api_key_ids": [HEX16],
    }
    assert label.api_key_ids == (HEX16,)
    assert IncidentLabel(**label.model_dump()) == label


# ---- reading -----------------------------------------------------------------------------


def _line(**changes: Any) -> str:
    return json.dumps({**VALID_LABEL, **changes})


def test_read_skips_blank_lines_and_accepts_crlf(tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    text = f"\n{_line()}\r\n  \n{_line(incident_id='inc-2', users=[HEX16])}"
    path.write_bytes(text.encode())
    labels = read_labels(path)
    assert [label.incident_id for label in labels] == ["inc-1", "inc-2"]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_an_empty_file_holds_no_incidents(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_bytes(content)
    assert read_labels(path) == []


@pytest.mark.parametrize(
    ("bad_line", "detail"),
    [
        ('{"incident_id": "inc-9", ', "malformed JSON: "),
        ('{"incident_id": NaN}', "malformed JSON: NaN is not valid JSON"),
        ("[1, 2]", "expected a JSON object, got array"),
        (_line(incident_id="inc-9", start="2026-01-01"), "start: must be an RFC 3339 date-time"),
        (_line(incident_id="inc-9", extra=1), "extra: unexpected field"),
        (_line(incident_id="inc-1"), 'duplicate incident_id "inc-1" (first on line 1)'),
    ],
)
def test_read_errors_name_the_file_and_line(tmp_path: Path, bad_line: str, detail: str) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text(f"{_line()}\n\n{bad_line}\n{_line(incident_id='inc-3')}\n", encoding="utf-8")
    with pytest.raises(LabelsError) as caught:
        read_labels(path)
    assert str(caught.value).startswith(f"{path}:3: {detail}")
    assert (caught.value.path, caught.value.line) == (path, 3)


def test_read_rejects_invalid_utf8_by_line(tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_bytes(_line().encode() + b"\n" + b'{"kind": "\xff"}\n')
    with pytest.raises(LabelsError, match=r":2: not valid UTF-8"):
        read_labels(path)


def test_line_separators_inside_strings_do_not_split_lines(tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps({**VALID_LABEL, "notes": "a\u2028b\x85c"}, ensure_ascii=False))
    assert read_labels(path)[0].notes == "a\u2028b\x85c"


# ---- writing -----------------------------------------------------------------------------


@FAST
@given(st.lists(VALID_LABELS, max_size=4, unique_by=lambda obj: obj["incident_id"]))
def test_write_then_read_round_trips(objs: list[dict[str, Any]]) -> None:
    labels = [IncidentLabel.model_validate(obj) for obj in objs]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "labels.jsonl"
        write_labels(labels, path)
        assert read_labels(path) == labels
        assert os.listdir(folder) == ["labels.jsonl"]
        for line in path.read_text(encoding="utf-8").split("\n")[:-1]:
            assert VALIDATOR.is_valid(json.loads(line))


def test_write_replaces_the_file_and_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    write_labels([IncidentLabel.model_validate(VALID_LABEL)], path)
    assert path.stat().st_mode & 0o777 == 0o644
    path.chmod(0o600)
    write_labels([], path)
    assert path.read_bytes() == b""
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text("old\n", encoding="utf-8")

    def refuse(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_labels([IncidentLabel.model_validate(VALID_LABEL)], path)
    assert path.read_text(encoding="utf-8") == "old\n"
    assert os.listdir(tmp_path) == ["labels.jsonl"]


def test_write_refuses_duplicate_ids(tmp_path: Path) -> None:
    label = IncidentLabel.model_validate(VALID_LABEL)
    path = tmp_path / "labels.jsonl"
    with pytest.raises(LabelsError, match=r'duplicate incident_id "inc-1" \(labels 1 and 2\)'):
        write_labels([label, label], path)
    assert not path.exists()


# ---- the module --------------------------------------------------------------------------


def test_labels_imports_only_the_standard_library_pydantic_and_the_contract() -> None:
    tree = ast.parse(Path(labels_module.__file__).read_text(encoding="utf-8"))
    imported = {
        alias.name if isinstance(node, ast.Import) else node.module or ""
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    outside = {name for name in imported if name.split(".")[0] not in sys.stdlib_module_names}
    assert outside == {"pydantic", "qabuse_dagster.telemetry.contract"}


def test_add_labels_adds_each_incident_once_and_keeps_what_is_there(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "labels" / "analyst.jsonl"

    def label(n: int, kind: str = "false_positive") -> labels_module.IncidentLabel:
        return labels_module.IncidentLabel.model_validate(
            {
                "incident_id": f"analyst-{n}",
                "kind": kind,
                "start": "2026-03-01T10:00:00Z",
                "end": "2026-03-01T11:00:00Z",
                "api_key_ids": ["ab" * 8],
            }
        )

    assert labels_module.add_labels([label(1)], path) == [label(1)]
    # The same incident again (a retried form) adds nothing; a new one is appended.
    assert labels_module.add_labels([label(1, "runaway_ci"), label(2)], path) == [label(2)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: labels_module.add_labels([label(n)], path), range(3, 11)))
    read = labels_module.read_labels(path)
    assert [x.incident_id for x in read[:2]] == ["analyst-1", "analyst-2"]
    assert read[0].kind == "false_positive"
    assert sorted(x.incident_id for x in read) == sorted(f"analyst-{n}" for n in range(1, 11))
    path.write_text("not json\n")
    with pytest.raises(labels_module.LabelsError):
        labels_module.add_labels([label(11)], path)
    assert path.read_text() == "not json\n"  # nothing accepted is lost or overwritten

"""The telemetry record contract, version 1, as a pydantic model.

`TelemetryRecord` accepts exactly the JSON values that
``shared/contracts/telemetry-record.schema.json`` (shipped here as
``schemas/telemetry-record.v1.schema.json``) accepts under a Draft 2020-12 validator
that asserts ``format: date-time``. Every field is checked by a JSON-Schema-exact
``BeforeValidator`` rather than by pydantic's own coercions, which differ from JSON
Schema: ``"integer"`` accepts ``3.0`` but never ``true`` or ``"3"``, ``"number"`` never
accepts booleans, strings are never coerced from numbers, ``const: 1`` accepts ``1.0``.

Where Python's ``jsonschema`` package departs from the JSON Schema specification, this
module follows the specification. These are the only verdicts that differ from
``jsonschema.Draft202012Validator``:

* ``pattern`` is an ECMA-262 regular expression, in which ``$`` matches only at the end of
  the string. ``jsonschema`` uses Python's ``re.search``, whose ``$`` also matches before a
  final ``"\\n"``, so it accepts ``"0123456789abcdef\\n"`` as a hex hash; we reject it. The
  same holds for ``date-time`` strings: RFC 3339 has no trailing newline.
* ``"number"`` fields must be finite IEEE-754 doubles. ``jsonschema`` accepts ``NaN`` and
  ``Infinity`` (which only Python's lenient ``json.loads`` produces; they are not JSON) and
  integers too large for a double: neither fits a float64 column, and NaN breaks equality.
* Strings (and object keys) must be Unicode text. JSON lets a string hold a lone
  surrogate escape such as ``"\\ud800"``, which ``jsonschema`` accepts, but no UTF-8 file,
  Parquet column or database can store it; we reject it.
* A ``date-time`` whose UTC instant falls outside years 1 to 9999, e.g.
  ``0001-01-01T00:30:00+01:00``, is valid RFC 3339 but cannot be held as a ``datetime``;
  we reject it.

The field validators here (`json_integer`, `json_number`, `json_string`, `json_enum`,
`json_object`, `json_array`, `rfc3339_utc`) are shared with the incident-labels model.

Example:
    >>> rec = validate_record({
    ...     "schema_version": 1, "job_id": "j1", "timestamp": "2026-01-01T12:00:00+01:00",
    ...     "user": "0123456789abcdef", "api_key_id": "0123456789abcdef",
    ...     "provider": "ibm_quantum", "backend": "ibm_torino", "sdk": "qiskit",
    ...     "num_circuits": 1, "shots": 1024.0, "status": "submitted",
    ...     "client_agent": "qabuse-qiskit/0.1 qiskit/2.6.1", "code_hash": "0123456789abcdef",
    ... })
    >>> rec.timestamp.isoformat(), rec.shots
    ('2026-01-01T11:00:00+00:00', 1024)
    >>> record_to_json(rec)["timestamp"]
    '2026-01-01T11:00:00.000000Z'
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationError,
    ValidationInfo,
)

__all__ = [
    "CONTRACT_COLUMNS",
    "IDENTITY",
    "ContractViolation",
    "TelemetryRecord",
    "record_to_json",
    "validate_record",
]

# Validation context flag: the input is decoded JSON, so Python-only values that the
# model otherwise accepts for convenience (datetime objects, tuples) are type errors.
JSON_INPUT_CONTEXT: dict[str, bool] = {"json_input": True}

# Bad values are quoted in messages, cut to this many characters.
_MAX_SHOWN = 80

HEX_HASH_PATTERN = "^[0-9a-f]{16,64}$"
COUNTRY_PATTERN = "^[A-Z]{2}$"

Sdk = Literal["qiskit", "cirq", "pennylane", "other"]
Status = Literal["submitted", "queued", "running", "completed", "failed", "cancelled", "rejected"]
SDKS: tuple[str, ...] = get_args(Sdk)
STATUSES: tuple[str, ...] = get_args(Status)

Validator = Callable[[Any], Any]


def show_value(value: object) -> str:
    """Render a bad value for an error message: JSON text, at most 80 characters.

    Args:
        value: Any value, usually a decoded JSON value.

    Returns:
        The value as compact JSON (``repr`` for non-JSON values), truncated with ``...``.
    """
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        try:
            text = repr(value)
        except ValueError:  # an int too long to print (sys.int_info.default_max_str_digits)
            text = f"<{type(value).__name__}>"
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def json_type_name(value: object) -> str:
    """Name a value's JSON type, as JSON Schema does (``true`` is a boolean, not a number).

    Args:
        value: A decoded JSON value (other Python values are named by their class).

    Returns:
        One of ``null``, ``boolean``, ``integer``, ``number``, ``string``, ``array``,
        ``object``, or the Python class name.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _type_error(expected: str, value: object, nullable: bool) -> ValueError:
    or_null = " or null" if nullable else ""
    got = json_type_name(value)
    if value is not None:
        got += f" ({show_value(value)})"
    return ValueError(f"expected {expected}{or_null}, got {got}")


def _is_json_input(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("json_input"))


def _check_range(value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise ValueError(f"must be >= {minimum} (got {show_value(value)})")
    if maximum is not None and value > maximum:
        raise ValueError(f"must be <= {maximum} (got {show_value(value)})")


def json_integer(
    *, minimum: int | None = None, maximum: int | None = None, nullable: bool = False
) -> Validator:
    """Build a validator for JSON Schema ``"type": "integer"`` with optional bounds.

    An integer is any number with a zero fractional part (``3`` and ``3.0``, returned as
    ``3``), never a boolean or a string.

    Args:
        minimum: Inclusive lower bound, if any.
        maximum: Inclusive upper bound, if any.
        nullable: Whether ``null`` is allowed (the schema's type lists ``"null"``).

    Returns:
        A function for ``BeforeValidator`` that returns an ``int`` (or ``None``).
    """

    def check(value: object) -> int | None:
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error("an integer", value, nullable)
        if isinstance(value, float):
            if not value.is_integer():  # also false for NaN and infinities
                raise _type_error("an integer", value, nullable)
            value = int(value)
        _check_range(value, minimum, maximum)
        return int(value)

    return check


def json_number(
    *, minimum: float | None = None, maximum: float | None = None, nullable: bool = False
) -> Validator:
    """Build a validator for JSON Schema ``"type": "number"`` with optional bounds.

    Integers and floats are numbers (returned as ``float``); booleans and strings are not.
    Stricter than ``jsonschema``: the number must be a finite double (see module docs).

    Args:
        minimum: Inclusive lower bound, if any.
        maximum: Inclusive upper bound, if any.
        nullable: Whether ``null`` is allowed.

    Returns:
        A function for ``BeforeValidator`` that returns a ``float`` (or ``None``).
    """

    def check(value: object) -> float | None:
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error("a number", value, nullable)
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ValueError(f"must be a finite number (got {show_value(value)})")
        _check_range(number, minimum, maximum)
        return number

    return check


def _check_unicode(value: str) -> None:
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"holds a lone surrogate at character {exc.start} (\\u{ord(value[exc.start]):04x}):"
                " not Unicode text"
            ) from None


def json_string(
    *,
    min_length: int = 0,
    max_length: int | None = None,
    pattern: str | None = None,
    nullable: bool = False,
) -> Validator:
    """Build a validator for JSON Schema ``"type": "string"``.

    Lengths count Unicode code points, as JSON Schema does. ``pattern`` must be anchored
    (``^...$``); it is applied with ``fullmatch`` so that ``$`` means end of string as in
    ECMA-262, where Python's ``re.search`` would also let a trailing ``"\\n"`` through.

    Args:
        min_length: Minimum length in code points.
        max_length: Maximum length in code points, if any.
        pattern: The schema's anchored regular expression, if any.
        nullable: Whether ``null`` is allowed.

    Returns:
        A function for ``BeforeValidator`` that returns a ``str`` (or ``None``).
    """
    compiled = re.compile(pattern) if pattern is not None else None

    def check(value: object) -> str | None:
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            raise _type_error("a string", value, nullable)
        _check_unicode(value)
        if len(value) < min_length:
            if min_length == 1:
                raise ValueError("must not be empty")
            raise ValueError(f"must be at least {min_length} characters (got {show_value(value)})")
        if max_length is not None and len(value) > max_length:
            raise ValueError(
                f"must be at most {max_length} characters (got {len(value)}: {show_value(value)})"
            )
        if compiled is not None and compiled.fullmatch(value) is None:
            raise ValueError(f"must match {pattern} (got {show_value(value)})")
        return str(value)

    return check


def json_enum(choices: Collection[str]) -> Validator:
    """Build a validator for a JSON Schema ``enum`` of strings.

    Args:
        choices: The allowed strings.

    Returns:
        A function for ``BeforeValidator`` that returns the matching string.
    """

    def check(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)} (got {show_value(value)})")
        return str(value)

    return check


def json_object(*, max_properties: int | None = None, nullable: bool = False) -> Validator:
    """Build a validator for JSON Schema ``"type": "object"``; the model checks the values.

    Args:
        max_properties: Maximum number of keys, if any.
        nullable: Whether ``null`` is allowed.

    Returns:
        A function for ``BeforeValidator`` that returns the ``dict`` (or ``None``).
    """

    def check(value: object) -> dict[Any, Any] | None:
        if value is None and nullable:
            return None
        if not isinstance(value, dict):
            raise _type_error("an object", value, nullable)
        if max_properties is not None and len(value) > max_properties:
            raise ValueError(f"must have at most {max_properties} entries (got {len(value)})")
        for key in value:
            _check_unicode(key)
        return value

    return check


def json_array(
    *, min_items: int = 0, optional: bool = False
) -> Callable[[Any, ValidationInfo], Any]:
    """Build a validator for JSON Schema ``"type": "array"``; the model checks the items.

    Outside JSON input (see `JSON_INPUT_CONTEXT`) a tuple is accepted too, and so is
    ``None`` for an ``optional`` array, so a model can be rebuilt from another model's
    fields. In JSON an optional, non-nullable array is left out, never ``null``.

    Args:
        min_items: Minimum number of items.
        optional: Whether the model field defaults to ``None`` for a missing key.

    Returns:
        A function for ``BeforeValidator`` that returns the items as a ``tuple``.
    """

    def check(value: object, info: ValidationInfo) -> tuple[Any, ...] | None:
        if value is None and optional and not _is_json_input(info):
            return None
        if not isinstance(value, list) and not (
            isinstance(value, tuple) and not _is_json_input(info)
        ):
            raise _type_error("an array", value, False)
        if len(value) < min_items:
            raise ValueError(f"must have at least {min_items} item(s) (got {len(value)})")
        return tuple(value)

    return check


def json_const(const: int) -> Validator:
    """Build a validator for a numeric JSON Schema ``const`` (``1.0`` equals ``1``, ``true`` not).

    Args:
        const: The required integer.

    Returns:
        A function for ``BeforeValidator`` that returns ``const``.
    """

    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != const:
            raise ValueError(f"must be {const} (got {show_value(value)})")
        return const

    return check


# RFC 3339 section 5.6 date-time; 't' and 'z' are allowed in either case (section 5.6 NOTE).
# re.ASCII: \d must not match other scripts' digits.
_RFC3339_DATE_TIME = re.compile(
    r"(?P<year>\d{4})-(?P<month>\d{2})-(?P<day>\d{2})[Tt]"
    r"(?P<hour>\d{2}):(?P<minute>\d{2}):(?P<second>\d{2})(?:\.(?P<fraction>\d+))?"
    r"(?:[Zz]|(?P<sign>[+-])(?P<off_hour>\d{2}):(?P<off_minute>\d{2}))",
    re.ASCII,
)
_DATE_TIME_HINT = "an RFC 3339 date-time with offset, e.g. 2026-01-01T12:00:00Z"


def _parse_rfc3339(text: str) -> datetime:
    match = _RFC3339_DATE_TIME.fullmatch(text)
    if match is None:
        raise ValueError(f"must be {_DATE_TIME_HINT} (got {show_value(text)})")
    parts = match.groupdict()
    off_hour, off_minute = int(parts["off_hour"] or 0), int(parts["off_minute"] or 0)
    # Leap seconds (:60) are not supported, as in the date-time format checker.
    if int(parts["year"]) == 0 or off_hour > 23 or off_minute > 59:
        raise ValueError(f"must be {_DATE_TIME_HINT} (got {show_value(text)})")
    offset = timedelta(hours=off_hour, minutes=off_minute)
    # Digits beyond microseconds are truncated, never rounded (rounding could carry over).
    microsecond = int((parts["fraction"] or "").ljust(6, "0")[:6])
    try:
        local = datetime(
            int(parts["year"]),
            int(parts["month"]),
            int(parts["day"]),
            int(parts["hour"]),
            int(parts["minute"]),
            int(parts["second"]),
            microsecond,
            tzinfo=timezone(-offset if parts["sign"] == "-" else offset),
        )
    except ValueError as exc:  # month 13, February 30, hour 24, second 60, ...
        raise ValueError(f"must be {_DATE_TIME_HINT} ({exc}; got {show_value(text)})") from None
    return _to_utc(local, text)


def _to_utc(moment: datetime, shown: object) -> datetime:
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError(
            f"instant is outside years 1-9999 in UTC (got {show_value(shown)})"
        ) from None


def rfc3339_utc(value: object, info: ValidationInfo) -> datetime:
    """Validate a ``format: date-time`` string and return the instant as an aware UTC datetime.

    Outside JSON input (see `JSON_INPUT_CONTEXT`) a timezone-aware ``datetime`` is
    accepted too and converted to UTC; a naive one is refused.

    Args:
        value: The field's raw value.
        info: Pydantic's validation info (carries the JSON-input flag).

    Returns:
        The instant, ``tzinfo=UTC``, truncated to microseconds.

    Raises:
        ValueError: ``value`` is not an RFC 3339 date-time with offset.
    """
    if isinstance(value, datetime) and not _is_json_input(info):
        if value.utcoffset() is None:
            raise ValueError(f"must be a timezone-aware datetime (got {value.isoformat()})")
        return _to_utc(value, value.isoformat())
    if not isinstance(value, str):
        raise _type_error("a string", value, False)
    return _parse_rfc3339(value)


def format_rfc3339_utc(moment: datetime) -> str:
    """Format an aware datetime as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC.

    Args:
        moment: A timezone-aware datetime.

    Returns:
        The RFC 3339 text, always with six fractional digits and a ``Z``.
    """
    # isoformat, unlike strftime("%Y"), zero-pads years before 1000.
    naive_utc = moment.astimezone(UTC).replace(tzinfo=None)
    return naive_utc.isoformat(timespec="microseconds") + "Z"


def errors_from_validation(exc: ValidationError) -> list[tuple[str, str]]:
    """Turn a pydantic ``ValidationError`` into ``(field path, message)`` pairs.

    Args:
        exc: The error raised by a contract model.

    Returns:
        One pair per error, in field order. The path joins the location with dots
        (``gate_counts.cx``) and is ``<record>`` for whole-record errors.
    """
    pairs: list[tuple[str, str]] = []
    for error in exc.errors(include_url=False):
        path = ".".join(str(part) for part in error["loc"]) or "<record>"
        if error["type"] == "missing":
            message = "missing required field"
        elif error["type"] == "extra_forbidden":
            message = f"unexpected field, not in the contract (got {show_value(error['input'])})"
        elif error["type"] in ("value_error", "assertion_error") and "error" in error.get(
            "ctx", {}
        ):
            message = str(error["ctx"]["error"])
        else:  # only reachable with non-JSON input, e.g. a dict key that is not a string
            message = f"{error['msg']} (got {show_value(error['input'])})"
        pairs.append((path, message))
    return pairs


class ContractViolation(ValueError):
    """A record that the telemetry contract rejects, with one entry per problem.

    Attributes:
        errors: ``(field path, message)`` pairs, e.g. ``("shots", "must be >= 0 (got -1)")``.
    """

    def __init__(self, errors: Iterable[tuple[str, str]]) -> None:
        self.errors: list[tuple[str, str]] = list(errors)
        super().__init__(self.errors)

    def __str__(self) -> str:
        return "; ".join(f"{path}: {message}" for path, message in self.errors)


HexHash = Annotated[str, BeforeValidator(json_string(pattern=HEX_HASH_PATTERN))]
NonNegativeInteger = Annotated[int, BeforeValidator(json_integer(minimum=0))]
TagValue = Annotated[str, BeforeValidator(json_string(max_length=128))]
Rfc3339Utc = Annotated[datetime, BeforeValidator(rfc3339_utc)]


class TelemetryRecord(BaseModel):
    """One job-lifecycle event (telemetry contract v1); see the schema for field meanings.

    Fields are in schema order. ``timestamp`` is an aware UTC datetime. Optional fields
    default to ``None`` (``retry_count`` to 0); ``shots`` is required but may be ``None``
    (analytic execution). Build one from decoded JSON with `validate_record`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    schema_version: Annotated[Literal[1], BeforeValidator(json_const(1))]
    job_id: Annotated[str, BeforeValidator(json_string(min_length=1, max_length=128))]
    timestamp: Rfc3339Utc
    user: HexHash
    api_key_id: HexHash
    provider: Annotated[str, BeforeValidator(json_string(min_length=1, max_length=64))]
    region: Annotated[str | None, BeforeValidator(json_string(max_length=64, nullable=True))] = None
    backend: Annotated[str, BeforeValidator(json_string(min_length=1, max_length=128))]
    sdk: Annotated[Sdk, BeforeValidator(json_enum(SDKS))]
    sdk_version: Annotated[
        str | None, BeforeValidator(json_string(max_length=32, nullable=True))
    ] = None
    num_circuits: Annotated[int, BeforeValidator(json_integer(minimum=0, maximum=1_000_000))]
    shots: Annotated[
        int | None, BeforeValidator(json_integer(minimum=0, maximum=100_000_000, nullable=True))
    ]
    num_qubits: Annotated[
        int | None, BeforeValidator(json_integer(minimum=0, maximum=100_000, nullable=True))
    ] = None
    depth: Annotated[int | None, BeforeValidator(json_integer(minimum=0, nullable=True))] = None
    gate_counts: Annotated[
        dict[str, NonNegativeInteger] | None, BeforeValidator(json_object(nullable=True))
    ] = None
    two_qubit_gates: Annotated[
        int | None, BeforeValidator(json_integer(minimum=0, nullable=True))
    ] = None
    submit_latency_s: Annotated[
        float | None, BeforeValidator(json_number(minimum=0, nullable=True))
    ] = None
    queue_time_s: Annotated[
        float | None, BeforeValidator(json_number(minimum=0, nullable=True))
    ] = None
    runtime_s: Annotated[float | None, BeforeValidator(json_number(minimum=0, nullable=True))] = (
        None
    )
    status: Annotated[Status, BeforeValidator(json_enum(STATUSES))]
    error_code: Annotated[
        str | None, BeforeValidator(json_string(max_length=64, nullable=True))
    ] = None
    retry_count: Annotated[int, BeforeValidator(json_integer(minimum=0))] = 0
    client_agent: Annotated[str, BeforeValidator(json_string(min_length=1, max_length=128))]
    code_hash: HexHash
    source_ip_hash: Annotated[
        str | None, BeforeValidator(json_string(pattern=HEX_HASH_PATTERN, nullable=True))
    ] = None
    country: Annotated[
        str | None, BeforeValidator(json_string(pattern=COUNTRY_PATTERN, nullable=True))
    ] = None
    tags: Annotated[
        dict[str, TagValue] | None,
        BeforeValidator(json_object(max_properties=16, nullable=True)),
    ] = None


CONTRACT_COLUMNS: tuple[str, ...] = tuple(TelemetryRecord.model_fields)
"""The record's field names in schema order: the columns of stored telemetry."""

IDENTITY: tuple[str, str] = ("job_id", "status")
"""A record's identity: a second record with the same pair is a duplicate."""


def validate_record(obj: object) -> TelemetryRecord:
    """Validate one decoded JSON value against the telemetry contract.

    Args:
        obj: The record as ``json.loads`` returns it.

    Returns:
        The record, with ``timestamp`` normalised to UTC and integral floats as ints.

    Raises:
        ContractViolation: ``obj`` is not a valid record; lists every problem found.

    Example:
        >>> try:
        ...     validate_record({"schema_version": 1, "shots": -1})
        ... except ContractViolation as exc:
        ...     exc.errors[:2]
        [('job_id', 'missing required field'), ('timestamp', 'missing required field')]
    """
    if not isinstance(obj, dict):
        raise ContractViolation(
            [("<record>", f"expected a JSON object, got {json_type_name(obj)}")]
        )
    try:
        return TelemetryRecord.model_validate(obj, context=JSON_INPUT_CONTEXT)
    except ValidationError as exc:
        raise ContractViolation(errors_from_validation(exc)) from None


def record_to_json(rec: TelemetryRecord) -> dict[str, Any]:
    """Convert a record to a JSON-ready dict that `validate_record` turns back into ``rec``.

    Args:
        rec: A validated record.

    Returns:
        Every contract field (``None`` included) in schema order; ``timestamp`` as
        ``YYYY-MM-DDTHH:MM:SS.ffffffZ``; fresh copies of ``gate_counts`` and ``tags``.
    """
    out: dict[str, Any] = {}
    for name in CONTRACT_COLUMNS:
        value = getattr(rec, name)
        out[name] = dict(value) if isinstance(value, Mapping) else value
    out["timestamp"] = format_rfc3339_utc(rec.timestamp)
    return out

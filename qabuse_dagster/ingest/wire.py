"""The fast path for contract records on the wire: decode and check a batch in C (msgspec).

`TelemetryRecord` (pydantic, one Python validator per field) is exact but costs about
75 µs a record; the collector's goal of 50,000 records a second leaves under 20. Here a
`msgspec.Struct` with the contract's fields and constraints decodes and checks a record
in about 2 µs. It is deliberately *stricter* than the contract: it accepts only the plain
form of a valid record (integers written as integers, ``schema_version`` as ``1``,
patterns anchored with ``\\Z``, every integer within int64, no lone surrogates). Anything
it refuses goes to the slow path, `validate_record`, which accepts the other valid forms
(``shots: 1024.0``) and words the rejection. So for every input the outcome is the slow
path's, only faster for the common case; ``tests/ingest/test_wire.py`` checks that
equivalence on generated records, valid and broken.

What both paths produce is a `SpoolRow`: the record's identity and its canonical JSON
(every field in schema order, ``null`` included, the timestamp as
``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC), which is what the collector's spool stores and
compaction reads back.

The slow path decodes JSON with `load_json` (and NDJSON lines with `decode_json_line`):
``json.loads``, except that an integer literal too long for Python (over 4,300 digits)
stays one value the contract refuses in its own words, so it costs its record alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import date, datetime
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
import pyarrow as pa

from qabuse_dagster.ingest.partitions import TELEMETRY_SCHEMA
from qabuse_dagster.telemetry.contract import (
    CONTRACT_COLUMNS,
    COUNTRY_PATTERN,
    HEX_HASH_PATTERN,
    ContractViolation,
    Sdk,
    Status,
    TelemetryRecord,
    _parse_rfc3339,
    format_rfc3339_utc,
    record_to_json,
)

#: Storage columns are int64: larger integers go to the slow path, which refuses them.
_INT64_MAX = 2**63 - 1


_HEX = b"0123456789abcdef"
assert HEX_HASH_PATTERN == "^[0-9a-f]{16,64}$" and COUNTRY_PATTERN == "^[A-Z]{2}$"


def _int(minimum: int = 0, maximum: int = _INT64_MAX) -> msgspec.Meta:
    return msgspec.Meta(ge=minimum, le=maximum)


def _text(min_length: int = 0, max_length: int | None = None) -> msgspec.Meta:
    return msgspec.Meta(min_length=min_length, max_length=max_length)


# Hex hashes: lengths here, the alphabet in `_plain_hashes` (str.strip is 10x faster than
# the pattern msgspec would apply with re.search).
_Hash = Annotated[str, _text(16, 64)]
_Count = Annotated[int, _int()]
_Seconds = Annotated[float, msgspec.Meta(ge=0)]


class WireRecord(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, gc=False):
    """A contract record in its plain form, fields in schema order.

    ``timestamp`` stays text here: `to_spool_row` checks and normalises it with the
    contract's own RFC 3339 parser. ``gc=False``: decoded JSON holds no reference cycle,
    so a batch of a thousand records adds nothing for the cycle collector to walk.
    """

    schema_version: Literal[1]
    job_id: Annotated[str, _text(1, 128)]
    timestamp: str
    user: _Hash
    api_key_id: _Hash
    provider: Annotated[str, _text(1, 64)]
    region: Annotated[str, _text(0, 64)] | None = None
    backend: Annotated[str, _text(1, 128)]
    sdk: Sdk
    sdk_version: Annotated[str, _text(0, 32)] | None = None
    num_circuits: Annotated[int, _int(0, 1_000_000)]
    shots: Annotated[int, _int(0, 100_000_000)] | None
    num_qubits: Annotated[int, _int(0, 100_000)] | None = None
    depth: _Count | None = None
    gate_counts: dict[str, _Count] | None = None
    two_qubit_gates: _Count | None = None
    submit_latency_s: _Seconds | None = None
    queue_time_s: _Seconds | None = None
    runtime_s: _Seconds | None = None
    status: Status
    error_code: Annotated[str, _text(0, 64)] | None = None
    retry_count: _Count = 0
    client_agent: Annotated[str, _text(1, 128)]
    code_hash: _Hash
    source_ip_hash: _Hash | None = None
    country: Annotated[str, _text(2, 2)] | None = None
    tags: (
        Annotated[dict[str, Annotated[str, _text(0, 128)]], msgspec.Meta(max_length=16)] | None
    ) = None


assert WireRecord.__struct_fields__ == CONTRACT_COLUMNS, "wire record drifted from the contract"


class SpoolRow(NamedTuple):
    """One accepted record as stored: its identity and its canonical JSON.

    ``timestamp`` is the canonical ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` text, fixed width with a
    four-digit year, so comparing two of them as strings compares the instants.
    """

    job_id: str
    status: str
    timestamp: str
    api_key_id: str
    text: str


_decode_one = msgspec.json.Decoder(WireRecord).decode
_decode_many = msgspec.json.Decoder(list[WireRecord]).decode
_split = msgspec.json.Decoder(list[msgspec.Raw]).decode
_json = msgspec.json.Encoder()


def _canonical_timestamp(text: str) -> str:
    """``text`` as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``; ValueError if the contract refuses it."""
    if text[-1:] == "Z":
        # Already canonical, as instrumentors send it? The round trip proves it, digit for
        # digit; fromisoformat checks the calendar (no February 30, no year 0).
        local = text[:-1]
        if datetime.fromisoformat(local).isoformat(timespec="microseconds") == local:
            return text
    return format_rfc3339_utc(_parse_rfc3339(text))


def _plain_patterns(record: WireRecord) -> bool:
    """The contract's patterns, on fields whose lengths msgspec has checked."""
    hashes = record.user + record.api_key_id + record.code_hash + (record.source_ip_hash or "")
    if not hashes.isascii() or hashes.encode("ascii").translate(None, _HEX):
        return False  # some character is not a lower-case hex digit
    country = record.country
    return country is None or (country.isascii() and country.isalpha() and country.isupper())


def split_array(body: bytes) -> list[msgspec.Raw] | None:
    """The elements of a JSON array body, undecoded; ``None`` if msgspec cannot split it.

    ``None`` covers everything the slow path should judge and word: not UTF-8, not JSON,
    not an array, ``NaN`` literals, nesting beyond msgspec's limit.
    """
    try:
        return _split(body)
    except (msgspec.DecodeError, ValueError, RecursionError):  # ValueError: bad UTF-8
        return None


def to_spool_row(raw: bytes | msgspec.Raw) -> SpoolRow | None:
    """The record in ``raw`` as a spool row, or ``None`` if it is not in plain valid form.

    ``None`` never means invalid: the caller runs the slow path, which decides.
    """
    try:
        return _finish(_decode_one(raw))
    except (msgspec.DecodeError, ValueError, RecursionError):  # ValueError: bad UTF-8
        return None


def array_to_spool_rows(body: bytes) -> list[SpoolRow] | None:
    """Every record of a JSON array body as spool rows; ``None`` unless all are in plain
    valid form with canonical timestamps (then the caller goes record by record).

    The whole batch is decoded, checked and encoded in a handful of C calls: the checks
    msgspec cannot make run once over the batch's timestamps and hashes joined.
    """
    try:
        records = _decode_many(body)
    except (msgspec.DecodeError, ValueError, RecursionError):  # ValueError: bad UTF-8
        return None
    if not records:
        return []
    if not (_canonical_timestamps(records) and _plain_batch_patterns(records)):
        return None
    # encode_lines ends every record with a newline; canonical JSON holds no raw newline.
    texts = _json.encode_lines(records).decode("utf-8").split("\n")[:-1]
    return [
        SpoolRow(r.job_id, r.status, r.timestamp, r.api_key_id, t)
        for r, t in zip(records, texts, strict=True)
    ]


_CANONICAL_TIMESTAMPS = re.compile(
    r"(?:\d{4}-\d{2}-\d{2}T(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d\.\d{6}Z\n)*", re.ASCII
)


def _canonical_timestamps(records: Sequence[WireRecord]) -> bool:
    """Every timestamp in the canonical form, on a real calendar day (year 1 or later)."""
    stamps = [r.timestamp for r in records]
    if _CANONICAL_TIMESTAMPS.fullmatch("\n".join(stamps) + "\n") is None:
        return False
    try:
        for day in {stamp[:10] for stamp in stamps}:
            date.fromisoformat(day)  # no February 30, no year 0
    except ValueError:
        return False
    return True


def _plain_batch_patterns(records: Sequence[WireRecord]) -> bool:
    """`_plain_patterns` over a whole batch at once."""
    hashes = "".join(
        [r.user + r.api_key_id + r.code_hash + (r.source_ip_hash or "") for r in records]
    )
    if not hashes.isascii() or hashes.encode("ascii").translate(None, _HEX):
        return False
    countries = {r.country for r in records if r.country is not None}
    return all(c.isascii() and c.isalpha() and c.isupper() for c in countries)


def _finish(record: WireRecord) -> SpoolRow | None:
    """The checks msgspec cannot make, then the canonical text."""
    try:
        record.timestamp = _canonical_timestamp(record.timestamp)
    except ValueError:
        return None
    if not _plain_patterns(record):
        return None
    # Every field, null included, in schema order: the same text as the slow path's.
    text = _json.encode(record).decode("utf-8")
    return SpoolRow(record.job_id, record.status, record.timestamp, record.api_key_id, text)


def spool_row_of(record: TelemetryRecord) -> SpoolRow:
    """The spool row of a record the slow path accepted."""
    stored = record_to_json(record)
    text = _json.encode(stored).decode("utf-8")
    return SpoolRow(record.job_id, record.status, stored["timestamp"], record.api_key_id, text)


def spool_rows_to_table(texts: Sequence[str]) -> pa.Table | None:
    """Canonical record texts (from the spool) as an Arrow table with ``TELEMETRY_SCHEMA``.

    One C decode of the whole batch; ``None`` if any text is not canonical, for the caller
    to fall back on validating each.
    """
    try:
        records = _decode_many(("[" + ",".join(texts) + "]").encode("utf-8"))
    except (msgspec.DecodeError, ValueError):
        return None
    rows = [msgspec.structs.astuple(r) for r in records]
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(CONTRACT_COLUMNS)
    arrays = []
    for field, values in zip(TELEMETRY_SCHEMA, columns, strict=True):
        if field.name == "timestamp":
            # Canonical "...ffffffZ" text: Arrow parses ISO 8601 with a zone designator.
            arrays.append(pa.array(values, pa.string()).cast(field.type))
        elif isinstance(field.type, pa.MapType):
            arrays.append(
                pa.array([None if v is None else list(v.items()) for v in values], field.type)
            )
        else:
            arrays.append(pa.array(values, field.type))
    return pa.Table.from_arrays(arrays, schema=TELEMETRY_SCHEMA)


class LongInteger(int):
    """An integer literal too long for Python's ``int(text)``, as `load_json` returns it.

    Python refuses to convert more than ``sys.get_int_max_str_digits()`` digits (4,300 by
    default). Such a literal is at least 10**4300 in size, beyond every bound of the
    contract and of the storage columns, so it stands here as ±10**4300: the contract
    refuses it where it is, with its own words ("must be <= ...", "exceeds the largest
    storable integer ...", "expected a string, got integer"), and its repr shows the
    literal's first digits and length.
    """

    digits: str  # the literal's sign and first digits
    length: int  # its number of digits

    def __repr__(self) -> str:
        return f"{self.digits}... ({self.length} digits)"

    __str__ = __repr__


_LONG_MAGNITUDE = 10**4300


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # longer than sys.get_int_max_str_digits()
        negative = text.startswith("-")
        value = LongInteger(-_LONG_MAGNITUDE if negative else _LONG_MAGNITUDE)
        value.digits = text[: 21 if negative else 20]
        value.length = len(text) - negative
        return value


def load_json(text: str) -> Any:
    """``json.loads``, except that an integer literal too long for Python is a `LongInteger`.

    Raises:
        json.JSONDecodeError: ``text`` is not JSON.
        RecursionError: it is nested too deeply for the parser.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError:  # an integer literal beyond sys.get_int_max_str_digits()
        # Only now a Python call per integer: the common case keeps the C parser's speed.
        return json.loads(text, parse_int=_parse_int)


def decode_json_line(raw: bytes, max_bytes: int) -> Any:
    """One line of NDJSON telemetry, decoded (not yet validated).

    Raises:
        ContractViolation: the line is longer than ``max_bytes``, not UTF-8 (as the
            contract's wire format requires: ``json.loads`` would guess UTF-16 too), not
            JSON, or nested too deeply; the field is ``<line>``.
    """
    if len(raw) > max_bytes:
        raise ContractViolation([("<line>", f"longer than {max_bytes} bytes")])
    try:
        return load_json(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ContractViolation(
            [("<line>", f"not UTF-8 ({exc.reason} at byte {exc.start})")]
        ) from None
    except json.JSONDecodeError as exc:
        raise ContractViolation(
            [("<line>", f"not JSON: {exc.msg} at column {exc.colno}")]
        ) from None
    except RecursionError:
        raise ContractViolation([("<line>", "JSON nested too deeply")]) from None

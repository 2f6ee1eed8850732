"""Client-side telemetry: the record contract, keyed hashing and SDK instrumentors.

``from qabuse_dagster.telemetry import instrument, JsonlSink, HttpSink`` is the public
instrumentation API (see `qabuse_dagster.telemetry.instrument`); ``HttpSink`` loads on first
use and the rest are light, so importing the package imports no SDK and no HTTP machinery.
"""

from __future__ import annotations

import importlib
from typing import Any

from qabuse_dagster.telemetry.contract import ContractViolation, TelemetryRecord, validate_record

# Bound here, after the submodule of the same name is imported, so the package attribute
# is the function, not the module.
from qabuse_dagster.telemetry.instrument import instrument
from qabuse_dagster.telemetry.sinks import JsonlSink, MemorySink

__all__ = [
    "ContractViolation",
    "HttpSink",
    "JsonlSink",
    "MemorySink",
    "TelemetryRecord",
    "instrument",
    "validate_record",
]

_LAZY = {"HttpSink": "qabuse_dagster.telemetry.http_sink"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

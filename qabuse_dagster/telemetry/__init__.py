"""Client-side telemetry: the record contract, keyed hashing and SDK instrumentors."""

from qabuse_dagster.telemetry.contract import ContractViolation, TelemetryRecord, validate_record

__all__ = ["ContractViolation", "TelemetryRecord", "validate_record"]

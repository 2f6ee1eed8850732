"""Workload twin: simulated tenants and abuse scenarios that write telemetry and labels."""

from qabuse_dagster.simulation.twin import SimulationResult, simulate

__all__ = ["SimulationResult", "simulate"]

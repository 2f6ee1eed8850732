"""Workload twin: simulated tenants and abuse scenarios that write telemetry and labels."""

from qabuse_dagster.simulation.scenarios import SCENARIOS, AbuseScenario, register_scenario
from qabuse_dagster.simulation.twin import SimulationResult, simulate

__all__ = ["SCENARIOS", "AbuseScenario", "SimulationResult", "register_scenario", "simulate"]

"""One instrumentor per SDK, each imported only by `qabuse_dagster.telemetry.instrument`."""

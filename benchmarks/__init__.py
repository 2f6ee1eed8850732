"""Performance harness: qabuse against the baseline each benchmark names, in one run.

``python -m benchmarks`` (``make bench``) runs every benchmark, prints one table per
benchmark with ours, the baseline and their ratio side by side, and writes each result
as JSON to ``benchmarks/results/<name>.json``. Nothing here asserts on time: the tests
only check that the harness runs and that its correctness cross-checks pass.
"""

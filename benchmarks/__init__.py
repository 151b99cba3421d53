"""Benchmark scripts that print measured tables (also reachable as `mebt bench ...`).

Not installed with the package: they run from a source checkout (mebt/bench.py finds this folder next to mebt/).
"""

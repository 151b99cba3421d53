"""Benchmark scripts that print measured tables (also reachable as `mebt bench ...`)."""

"""Benchmarks run by hand or in CI; results land in ``benchmarks/results/``."""

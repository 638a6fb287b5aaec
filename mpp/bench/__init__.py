"""Benchmarks: the timed cases, their statistics and result files (scripts/bench_*.py, the GPU check)."""

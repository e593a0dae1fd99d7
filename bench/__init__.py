"""Benchmarks: each script prints one JSON line of figures; see bench/README.md."""

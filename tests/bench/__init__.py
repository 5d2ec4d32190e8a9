"""Throughput and quality benchmarks; `python -m tests.bench` runs every `bench_*.py` here."""

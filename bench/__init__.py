"""Benchmarks: ``python -m bench`` runs every ``bench/bench_*.py``. Timings are reported as ratios."""

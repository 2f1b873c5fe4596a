"""Benchmarks: speed and memory measured as ratios against a reference run in the same process.

Each ``bench_*.py`` module defines ``run(quick: bool) -> list[dict]``; every dict is one table row
(``name`` plus any measured columns). ``python -m benchmarks [--quick] [NAME ...]`` runs them and
prints one table per module, with the device it ran on.
"""

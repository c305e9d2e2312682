"""Benchmarks for the ``ewc`` package; run them all with ``python benchmarks/run.py``."""

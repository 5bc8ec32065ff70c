"""Benchmark suites (a package so that ``benchmarks/conftest.py`` imports as
``benchmarks.conftest`` and never shadows ``tests/conftest.py``, which the tests import by name)."""

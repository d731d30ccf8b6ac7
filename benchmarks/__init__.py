"""Benchmarks of circus-wsgi against other WSGI servers (not part of the test suite).

Run ``make bench`` (or ``python benchmarks/run.py --quick``); see docs/benchmarks.rst.
"""

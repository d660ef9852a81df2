"""Fixtures of the end-to-end tests."""

from tests.bench.test_clusters import procs  # noqa: F401 - started processes, stopped and checked gone

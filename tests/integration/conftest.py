"""Fixtures of several integration test modules, at session scope: one trained, featurized and
promoted model version serves the API and the web page tests (tests/integration/serving_fixtures.py)."""

from serving_fixtures import api, served

__all__ = ["api", "served"]  # fixtures, found by name

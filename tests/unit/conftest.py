"""Unit tests see only the defaults: no ORCHARD_* variable of the caller's shell leaks in."""

from __future__ import annotations

import os

import pytest

KEEP = {"ORCHARD_CACHE_DIR"}  # where make deps installed the tools some unit tests inspect


@pytest.fixture(autouse=True)
def isolated_orchard_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("ORCHARD_") and name not in KEEP:
            monkeypatch.delenv(name)

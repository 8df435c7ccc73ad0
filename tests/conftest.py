"""Shared fixtures: the real native stack, started once per test session."""

from __future__ import annotations

import logging

import pytest

from orchard.core.settings import Settings, load_settings


@pytest.fixture(scope="session")
def settings() -> Settings:
    """Settings from the environment (ORCHARD_*), as the CLI builds them."""
    return load_settings()


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Settings:
    """The native stack, healthy (started if needed; tests/run.sh stops it afterwards).

    Returns settings re-read after `up`, so the generated credentials are in them.
    """
    from orchard.stack import launcher

    logging.getLogger(__name__).info("ensuring the native stack is up under %s", settings.home)
    launcher.up(settings)
    return load_settings()

"""Fixtures of the serving tests."""

from __future__ import annotations

import pytest

from .proxy_stubs import Fleet


@pytest.fixture
def fleet():
    """The scripted instances and proxies of one test (proxy_stubs.py), stopped after it."""
    fleet = Fleet()
    try:
        yield fleet
    finally:
        fleet.close()

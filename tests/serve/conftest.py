"""Fixtures of the serve tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_utc_day(monkeypatch):
    """The daily quota counts against today's UTC day, taken once: a test that spends a quota and then expects a
    refusal must not see the quota restart because the UTC day changed between its requests (a run crossing
    midnight). Pins the day of the in-process limits (MemoryLimits) and of the store's usage."""
    from domaintune.serve import limits, store

    day = limits.utc_day()
    monkeypatch.setattr(limits, "utc_day", lambda now=None: day)
    monkeypatch.setattr(store, "utc_day", lambda when=None: day)
    return day

"""Fixtures shared by the unit tests; the fakes themselves are in fakes.py (tests/e2e has a conftest module of its own)."""
from __future__ import annotations

import pytest

from fakes import FakeClock


@pytest.fixture
def fake_clock() -> FakeClock:
    """A clock that moves only when the test advances it."""
    return FakeClock()

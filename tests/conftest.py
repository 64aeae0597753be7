"""Shared fixtures. Keep this small: one fixture per shared resource."""

from __future__ import annotations

import pytest

from hdrlog.lab import Lab


@pytest.fixture
def lab():
    """A network-namespace lab (hdrlog.lab.Lab), torn down after the test even on failure."""
    with Lab() as lab:
        yield lab

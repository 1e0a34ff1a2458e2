"""Fixtures shared by the unit tests: the golden fixture model and its media, loaded once per session."""
from __future__ import annotations

import pytest

from support.golden import load_golden_media, load_golden_model


@pytest.fixture(scope="session")
def golden_model():
    return load_golden_model()


@pytest.fixture(scope="session")
def golden_media():
    return load_golden_media()

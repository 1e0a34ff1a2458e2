"""Suite-wide: `tests/unit/` (no server, seconds) and `tests/e2e/` (real tritonserver processes) are marked
`unit` and `e2e` by folder, so `pytest -m unit` / `pytest -m e2e` select them. The e2e fixtures are in
tests/e2e/conftest.py; shared helpers in tests/support/."""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unit: no server; fast")
    config.addinivalue_line("markers", "e2e: starts real tritonserver (and other) processes")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(str(item.fspath)).resolve().relative_to(HERE).parts[0]
        if folder in ("unit", "e2e"):
            item.add_marker(getattr(pytest.mark, folder))

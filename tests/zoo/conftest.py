"""Everything under tests/zoo is marked `zoo` (cross-library model pairs)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/zoo/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.zoo)

"""Shared by the reader tests: modules whose classes can be made to vanish, and a marker for page-level tests."""

from __future__ import annotations

import importlib
import shutil
import sys
from types import ModuleType

import pytest


def _pagemap_readable() -> bool:
    try:
        with open("/proc/self/pagemap", "rb") as f:
            return len(f.read(8)) == 8
    except OSError:
        return False


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.pagemap` tests need `/proc/self/pagemap` and `madvise` (Linux); elsewhere they are skipped."""
    if _pagemap_readable():
        return
    skip = pytest.mark.skip(reason="needs a readable /proc/self/pagemap (Linux)")
    for item in items:
        if "pagemap" in item.keywords:
            item.add_marker(skip)


class Throwaway:
    """Imports Python source as a module of its own folder, then makes it vanish, as a class deleted or renamed
    after a whole model was pickled with it."""

    def __init__(self, tmp_path) -> None:
        self._folder = tmp_path / "throwaway_src"
        self._suffix = tmp_path.name.replace("-", "_")
        self._names: list[str] = []

    def load(self, prefix: str, source: str) -> ModuleType:
        name = f"{prefix}_{self._suffix}"  # unique per test: nothing cached from another test is found
        self._folder.mkdir(exist_ok=True)
        (self._folder / f"{name}.py").write_text(source)
        if str(self._folder) not in sys.path:
            sys.path.insert(0, str(self._folder))
        self._names.append(name)
        return importlib.import_module(name)

    def forget(self) -> None:
        """Make every module loaded here unimportable: its file, its folder on sys.path and sys.modules entry go."""
        if str(self._folder) in sys.path:
            sys.path.remove(str(self._folder))
        for name in self._names:
            sys.modules.pop(name, None)
        shutil.rmtree(self._folder, ignore_errors=True)
        importlib.invalidate_caches()


@pytest.fixture
def throwaway(tmp_path):
    modules = Throwaway(tmp_path)
    yield modules
    modules.forget()

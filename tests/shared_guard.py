"""Tests that need ../shared (real models and data beside the checkout) carry
``@pytest.mark.shared(*paths)`` and skip where a path is absent. CI sets ``FASTMT_REQUIRE_SHARED=1``:
where ../shared is present, such a test that skips, for whatever reason, fails instead.

Hooks for tests/conftest.py, kept apart (and free of torch) so that tests/test_shared_guard.py can run them
in a small pytest of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REQUIRE_SHARED = "FASTMT_REQUIRE_SHARED"


def pytest_configure(config):
    config.addinivalue_line("markers", "shared(*paths): needs these paths under ../shared; skipped where one is "
                                       f"absent (a failure with {REQUIRE_SHARED}=1 when ../shared is there)")


def shared_required() -> bool:
    return os.environ.get(REQUIRE_SHARED) == "1" and SHARED.is_dir()


def pytest_collection_modifyitems(config, items):
    for item in items:
        mark = item.get_closest_marker("shared")
        missing = [p for p in mark.args if not (SHARED / p).exists()] if mark is not None else []
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"needs ../shared/{', ../shared/'.join(missing)}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With ../shared present and FASTMT_REQUIRE_SHARED=1, a skipped ``shared`` test fails, whatever
    skipped it: a missing model or data set, or the test's own ``pytest.skip``."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and not hasattr(rep, "wasxfail") and item.get_closest_marker("shared") is not None and shared_required():
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped, but ../shared ({SHARED}) is present and {REQUIRE_SHARED}=1: {reason}"

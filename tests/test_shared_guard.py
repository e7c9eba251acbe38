"""CI's guard on tests that need ../shared (tests/shared_guard.py): where ../shared is present and
FASTMT_REQUIRE_SHARED=1, such a test that skips fails; elsewhere it skips, with its reason listed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import REPO

CASES = '''
import pytest

@pytest.mark.shared("models/here")
def test_uses_what_is_there():
    pass

@pytest.mark.shared("models/missing")
def test_needs_a_missing_model():
    pass

@pytest.mark.shared("models/here")
def test_skips_itself():
    pytest.skip("gave up")

def test_unrelated_skip():
    pytest.skip("not about shared")
'''


def _run(tmp_path, shared: bool, require: bool):
    """pytest -rs on CASES in a checkout laid out as REPO is, with or without a ../shared beside it."""
    root = tmp_path / ("with" if shared else "without")
    tests = root / "repo" / "tests"
    tests.mkdir(parents=True)
    shutil.copy(REPO / "tests" / "shared_guard.py", tests / "shared_guard.py")
    (tests / "conftest.py").write_text("from shared_guard import pytest_collection_modifyitems, pytest_configure, "
                                       "pytest_runtest_makereport  # noqa: F401\n")  # as tests/conftest.py does
    (tests / "test_cases.py").write_text(CASES)
    if shared:
        (root / "shared" / "models" / "here").mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tests))
    env.pop("FASTMT_REQUIRE_SHARED", None)
    if require:
        env["FASTMT_REQUIRE_SHARED"] = "1"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests"],
                       cwd=root / "repo", capture_output=True, text=True, env=env, timeout=300)
    return r.returncode, r.stdout


def test_a_skip_of_a_shared_test_fails_when_shared_is_present_and_required(tmp_path):
    code, out = _run(tmp_path, shared=True, require=True)
    assert code == 1, out
    assert "1 failed, 1 passed, 1 skipped, 1 error" in out, out
    assert "ERROR at setup of test_needs_a_missing_model" in out, out  # its skip comes while setting up
    assert " test_skips_itself " in out.split("FAILURES")[1], out
    assert "present and FASTMT_REQUIRE_SHARED=1: Skipped: needs ../shared/models/missing" in out, out
    assert "present and FASTMT_REQUIRE_SHARED=1: Skipped: gave up" in out, out
    assert "SKIPPED [1] tests/test_cases.py" in out and "not about shared" in out, out


def test_shared_tests_skip_with_their_reason_otherwise(tmp_path):
    code, out = _run(tmp_path, shared=True, require=False)  # a developer's run: the README's command
    assert code == 0 and "1 passed, 3 skipped" in out, out
    assert "needs ../shared/models/missing" in out and "gave up" in out, out
    code, out = _run(tmp_path, shared=False, require=True)  # CI on a machine without ../shared
    assert code == 0 and "4 skipped" in out, out

"""CI's guard: with BPFRING_REQUIRE_BPF=1, a skipped test fails the run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


SKIP_IN_BODY = "import pytest\n\ndef test_needs_something():\n    pytest.skip('no BPF here')\n"

# The way real tests skip: conftest's `bpf` fixture calls require_bpf() in set-up, before the body
# runs. The reason is faked (this machine may well have BPF); the fixture and the hook are the real ones.
SKIP_IN_FIXTURE = """\
import conftest

conftest.bpf_unavailable_reason = lambda: "no BPF here (faked)"

def test_needs_bpf(bpf):
    raise AssertionError("the body ran: the fixture did not skip")
"""


def run_pytest(tmp_path: Path, strict: bool, source: str = SKIP_IN_BODY) -> subprocess.CompletedProcess:
    shutil.copy(Path(__file__).parent / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_skips.py").write_text(source)
    env = dict(os.environ, BPFRING_REQUIRE_BPF="1" if strict else "0")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )


def test_a_skip_fails_in_strict_mode(tmp_path):
    done = run_pytest(tmp_path, strict=True)
    assert done.returncode == 1, done.stdout
    assert "BPFRING_REQUIRE_BPF=1 and this test skipped: no BPF here" in done.stdout


def test_a_skip_is_a_skip_otherwise(tmp_path):
    done = run_pytest(tmp_path, strict=False)
    assert done.returncode == 0, done.stdout
    assert "1 skipped" in done.stdout


def test_a_skip_in_fixture_set_up_fails_in_strict_mode(tmp_path):
    done = run_pytest(tmp_path, strict=True, source=SKIP_IN_FIXTURE)
    assert done.returncode == 1, done.stdout
    assert "BPFRING_REQUIRE_BPF=1 and this test skipped: no BPF here (faked)" in done.stdout
    assert "the body ran" not in done.stdout
    assert "1 error" in done.stdout or "1 failed" in done.stdout, done.stdout


def test_a_skip_in_fixture_set_up_is_a_skip_otherwise(tmp_path):
    done = run_pytest(tmp_path, strict=False, source=SKIP_IN_FIXTURE)
    assert done.returncode == 0, done.stdout
    assert "1 skipped" in done.stdout


XFAIL = """\
import pytest

@pytest.mark.xfail(strict=True, reason="a known bug")
def test_known_bug():
    assert False
"""


def test_a_strict_xfail_stays_an_xfail_in_strict_mode(tmp_path):
    """A known bug marked xfail(strict=True) is reported as such, not as a skip turned failure."""
    done = run_pytest(tmp_path, strict=True, source=XFAIL)
    assert done.returncode == 0, done.stdout
    assert "1 xfailed" in done.stdout


def test_a_strict_xfail_that_passes_fails_in_strict_mode(tmp_path):
    done = run_pytest(tmp_path, strict=True, source=XFAIL.replace("assert False", "assert True"))
    assert done.returncode == 1, done.stdout
    assert "XPASS(strict)" in done.stdout


STRICT_CASES = '''
import errno
import pytest
from conftest import require_feature
from bpfring import features

GONE = features.Feature("a feature from the future", (99, 1), lambda: False)
HERE = features.Feature("a feature from the past", (2, 6), lambda: True)


def test_needs_a_missing_feature():
    require_feature(GONE)


def test_runs_into_the_library_error():
    features.require(GONE)


def test_needs_a_present_feature():
    require_feature(HERE)


def test_only_says_a_feature_is_missing():
    pytest.skip("kernel feature missing: " + features.missing_reason(HERE))
'''


def test_strict_mode_lets_through_only_skips_for_a_feature_the_kernel_lacks(tmp_path):
    """BPFRING_REQUIRE_BPF=1 still fails any other skip, even one worded like a feature skip."""
    shutil.copy(Path(__file__).parent / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_strict.py").write_text(STRICT_CASES)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True, text=True, env=dict(os.environ, BPFRING_REQUIRE_BPF="1"), cwd=tmp_path,
    )
    assert "1 failed, 1 passed, 2 skipped" in done.stdout, done.stdout
    assert "FAILED test_strict.py::test_only_says_a_feature_is_missing" in done.stdout
    gone = f"a feature from the future needs Linux 99.1 or later; this kernel is {os.uname().release}"
    assert done.stdout.count(f"kernel feature missing: {gone}") == 2, done.stdout

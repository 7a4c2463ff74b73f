"""A wheel's bundled libbpf is the one bpfring loads, and ``bpfring doctor`` says so (issue 16).

A wheel installs ``bpfring/`` and, beside it, ``bpfring.libs/libbpf-HASH.so.1`` (scripts/wheel).
Here that layout is made in a temporary directory from the installed package and a copy of the
libbpf this machine has, and a fresh interpreter imports bpfring from it, with the system's libbpf
also present: the bundled copy must win unless ``BPFRING_LIBBPF`` names another. The wheel itself,
installed where nothing but Python is, is tested by scripts/wheel-test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bpfring
from bpfring._sys import libbpf

REPORT = """
import json
import bpfring
from bpfring._sys import libbpf
from bpfring.tools import doctor

check = doctor.check_libbpf()
print(json.dumps({"package": bpfring.__file__, "bundled_dir": str(libbpf.BUNDLED_DIR), "status": check.status,
                  "detail": check.detail, **check.facts}))
"""


@pytest.fixture(scope="module")
def wheel_layout(tmp_path_factory) -> Path:
    """site/bpfring (the installed package) and site/bpfring.libs/libbpf-0123abcd.so.1, as a wheel lays them out."""
    site = tmp_path_factory.mktemp("site")
    shutil.copytree(Path(bpfring.__file__).parent, site / "bpfring", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "bpfring.libs").mkdir()
    shutil.copy2(system_libbpf(), site / "bpfring.libs" / "libbpf-0123abcd.so.1")
    return site


def system_libbpf() -> str:
    env = {k: v for k, v in os.environ.items() if k != libbpf.ENV_LIBRARY}
    code = "from bpfring._sys import libbpf; print(libbpf.path())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, f"this machine's libbpf (scripts/setup installs it) did not load: {done.stderr}"
    return done.stdout.strip()


def report(site: Path, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != libbpf.ENV_LIBRARY}
    environ.update(env, PYTHONPATH=str(site))
    done = subprocess.run([sys.executable, "-c", REPORT], capture_output=True, text=True, timeout=60, env=environ, cwd=site)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_bundled_libbpf_is_loaded_before_the_systems(wheel_layout):
    got = report(wheel_layout)
    assert got["package"] == str(wheel_layout / "bpfring" / "__init__.py")  # the copy, not the installed package
    assert got["bundled_dir"] == str(wheel_layout / "bpfring.libs")
    assert got["status"] == "ok", got["detail"]
    assert got["origin"] == "bundled"
    assert got["path"] == str(wheel_layout / "bpfring.libs" / "libbpf-0123abcd.so.1")
    assert f"({got['origin']}) at {got['path']}" in got["detail"]


def test_BPFRING_LIBBPF_overrides_the_bundled_copy(wheel_layout):
    chosen = system_libbpf()
    got = report(wheel_layout, BPFRING_LIBBPF=chosen)
    assert got["status"] == "ok", got["detail"]
    assert got["origin"] == "$BPFRING_LIBBPF"
    assert got["path"] == chosen

"""Shared fixtures: BPF availability, the test producer programs, strict mode for CI.

Tests that need BPF ask for a fixture that calls :func:`require_bpf`. Without BPF they skip
with the reason; with ``BPFRING_REQUIRE_BPF=1`` (set by .ci/run on a machine where BPF
works) every skip is turned into a failure, so CI can never pass by skipping.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

STRICT = os.environ.get("BPFRING_REQUIRE_BPF") == "1"
TESTS_BPF = Path(__file__).parent / "bpf"


@functools.lru_cache(maxsize=None)
def bpf_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "BPF tests need root"
    try:
        import bpfring

        with bpfring.Map.create(bpfring.MapType.RINGBUF, 4096):
            pass
    except Exception as exc:  # any failure means the kernel can't run these tests
        return f"this kernel refused a BPF ring buffer map: {exc}"
    return None


def require_bpf() -> None:
    reason = bpf_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"BPFRING_REQUIRE_BPF=1 and this test skipped: {reason}"


@pytest.fixture(scope="session")
def test_objects(tmp_path_factory) -> Path:
    """tests/bpf/*.bpf.c compiled for the running kernel; the directory of the .bpf.o files."""
    require_bpf()
    from bpfring import _build

    out = tmp_path_factory.mktemp("bpf")
    _build.build_dir(TESTS_BPF, out, out)
    return out


@pytest.fixture
def producer(test_objects):
    """A loaded producer.bpf.o with its default 64 KiB ring (see tests/producer.py)."""
    from producer import Producer

    with Producer(test_objects / "producer.bpf.o") as p:
        yield p


@pytest.fixture
def make_producer(test_objects):
    """Build producers with another ring size: ``make_producer(ring_size=...)``."""
    from producer import Producer

    made = []

    def make(**kwargs):
        p = Producer(test_objects / "producer.bpf.o", **kwargs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def bpf():
    """For tests that need BPF but no program."""
    require_bpf()


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}

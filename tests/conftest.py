"""Shared fixtures: BPF availability, the test producer programs, strict mode for CI.

Tests that need BPF ask for a fixture that calls :func:`require_bpf`. Without BPF they skip
with the reason; with ``BPFRING_REQUIRE_BPF=1`` (set by .ci/run on a machine where BPF
works) every skip is turned into a failure, so CI can never pass by skipping.

The one exception is a kernel feature the running kernel was found to lack (an older kernel of
the matrix, scripts/kernels): :func:`require_feature` skips, and so does a test that runs into
``bpfring.features.FeatureError``, with the library's reason; strict mode lets exactly those
through. This machine's kernel has every feature, so here nothing skips.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import sys
import time
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

STRICT = os.environ.get("BPFRING_REQUIRE_BPF") == "1"
TESTS_BPF = Path(__file__).parent / "bpf"
PKG_BPF = Path(__file__).parent.parent / "src" / "bpfring" / "bpf"  # kernel_types.h, execsnoop.bpf.c


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


# Skips require_feature() issued, each for a feature the kernel was found to lack: the only skips
# strict mode lets through (an older kernel of the matrix may lack them; this machine's never does).
FEATURE_SKIPS: set[str] = set()


def require_feature(*needed) -> None:
    """Skip unless the running kernel has each ``bpfring.features`` feature (probed, not guessed)."""
    require_bpf()
    from bpfring import features

    for feature in needed:
        if not features.has(feature):
            reason = f"kernel feature missing: {features.missing_reason(feature)}"
            FEATURE_SKIPS.add(reason)
            pytest.skip(reason)


def ring_producer() -> str:
    """The ring producer this kernel loads: producer (5.19+), else its twin producer_compat (5.10+)."""
    from bpfring import features

    return "producer" if features.has(features.BPF_LOOP) and features.has(features.RINGBUF_DYNPTR) else "producer_compat"


def _object_features(name: str) -> tuple:
    """What each test program needs beyond BPF ring buffers (docs/kernels.md)."""
    from bpfring import features

    return {
        "producer": (features.BPF_LOOP, features.RINGBUF_DYNPTR),
        "user_drain": (features.USER_RINGBUF,),
        "globals": (features.BPF_LOOP,),  # a SEC("syscall") program (5.14), which BPF_LOOP's probe stands for
    }.get(name, ())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and report.failed:
        from bpfring.features import FeatureError

        if call.excinfo.errisinstance(FeatureError):  # raised only where the kernel lacks the feature
            reason = f"kernel feature missing: {call.excinfo.value.strerror}"
            FEATURE_SKIPS.add(reason)
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {reason}")
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):  # an xfail is a known bug, not a skip
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if reason in FEATURE_SKIPS:
            return
        report.outcome = "failed"
        report.longrepr = f"BPFRING_REQUIRE_BPF=1 and this test skipped: {reason}"


@pytest.fixture(scope="session")
def bpf_object(tmp_path_factory):
    """``bpf_object("producer")``: tests/bpf/producer.bpf.c compiled once a session.

    Like the package's programs, the tests' include kernel_types.h (CO-RE), not a vmlinux.h of the
    running kernel: the same objects load on every kernel of the matrix (docs/kernels.md). The few
    written as users write theirs (#include "vmlinux.h") go through bpfring.compile().
    """
    require_bpf()
    from bpfring import _build

    out = tmp_path_factory.mktemp("bpf")
    built: dict[str, Path] = {}

    def build(name: str) -> Path:
        require_feature(*_object_features(name))
        if name not in built:
            source = TESTS_BPF / f"{name}.bpf.c"
            if '#include "vmlinux.h"' in source.read_text():
                # Written as a user's program is (globals, attach targets): built the way users
                # build theirs, by bpfring.compile() against this kernel's vmlinux.h.
                import bpfring

                built[name] = bpfring.compile(source, out / f"{name}.bpf.o", include_dirs=[TESTS_BPF])
            else:
                built[name] = _build.compile_bpf(source, out / f"{name}.bpf.o", [TESTS_BPF, PKG_BPF])
        return built[name]

    return build


@pytest.fixture(scope="session")
def execsnoop_object(bpf_object, tmp_path_factory) -> Path:
    """The package's own execsnoop.bpf.c, compiled from the source tree."""
    require_bpf()
    from bpfring import _build

    out = tmp_path_factory.mktemp("pkg-bpf")
    return _build.compile_bpf(PKG_BPF / "execsnoop.bpf.c", out / "execsnoop.bpf.o", [PKG_BPF])


@pytest.fixture
def producer(bpf_object):
    """A loaded producer.bpf.o with its default 64 KiB ring (see tests/producer.py)."""
    from producer import Producer

    with Producer(bpf_object(ring_producer())) as p:
        yield p


@pytest.fixture
def make_producer(bpf_object):
    """Build producers with another ring size: ``make_producer(ring_size=...)``."""
    from producer import Producer

    made = []

    def make(**kwargs):
        p = Producer(bpf_object(ring_producer()), **kwargs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def perf_producer(bpf_object):
    """A loaded perf_producer.bpf.o; its array `pb` has a slot per possible CPU (tests/perf_producer.py)."""
    from perf_producer import PerfProducer

    with PerfProducer(bpf_object("perf_producer")) as p:
        yield p


@pytest.fixture
def walk() -> str:
    """The record walk's name in reports: there is one, in C (bpfring._fastring)."""
    return "C"


@pytest.fixture
def bpf():
    """For tests that need BPF but no program."""
    require_bpf()


def fork_and(child_action) -> int:
    """Fork; in the child run child_action() and exit 0 (1 on an unexpected error); returns the
    child's exit status. The child is killed, and the test fails, if it hangs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads, on 3.12+
        pid = os.fork()
    if pid == 0:
        code = 0
        try:
            child_action()
        except BaseException as exc:  # report, never run the parent's test code on
            os.write(2, f"child: {type(exc).__name__}: {exc}\n".encode())
            code = 1
        os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the fork() child hung")


def fork_call(func) -> str:
    """Run ``func()`` in a forked child; return what it printed as ``Type: message`` or its result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            said = f"ok: {func()}"
        except BaseException as exc:
            said = f"{type(exc).__name__}: {exc}"
        os.write(w, said.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        said = f.read()
    os.waitpid(pid, 0)
    return said


PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def as_nobody(func):
    """``func`` wrapped to run as a process started as uid/gid 65534 would (for fork_call).

    A process that drops privileges with setuid() is no longer dumpable, which makes its own
    /proc/self/fdinfo root's; one started unprivileged is, so it is made dumpable again."""

    def run():
        os.setgid(65534)
        os.setuid(65534)
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")
        return func()

    return run


@contextlib.contextmanager
def without_collector():
    """Run the block with the cyclic garbage collector off (as an agent may run): what is released
    in it went by its reference count, not by a collection."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}

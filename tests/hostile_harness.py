"""Where a consumer facing a hostile ring runs: a forked process whose crash or hang is a test
failure, a perf ring followed by an inaccessible page, and the checks of what it delivers.

- :func:`isolated` runs a scenario in a forked child. A signal (SIGSEGV from a read past a
  mapping, SIGABRT from a sanitizer) fails the test with the signal's name; a child that outlives
  its time gets SIGABRT (faulthandler prints where every thread was) and fails the test as hung.
  Assertions in the child come back as the test's failure, with the child's traceback.
- :func:`bounded` runs one consumer call and fails if it takes a second or more: a call that
  spins (an empty batch forever, a loop that makes no progress) shows up here, not as a hang.
- :func:`guarded_perf_buffer` builds a one-CPU PerfBuffer whose mapping is directly followed by a
  PROT_NONE page, so reading one byte past the ring is a SIGSEGV the test sees.
"""

from __future__ import annotations

import ctypes
import faulthandler
import mmap
import os
import pickle
import select
import signal
import time
import traceback
from typing import Any, Callable, Iterable

import numpy as np
import pytest
from perf_producer import padded_size
from producer import FIXED_SIZE, expected_fixed, expected_record, parse

import bpfring

PAGE = mmap.PAGESIZE
# Seconds: every consumer call returns within this, whatever is in the ring (a spin or a wait would
# not). scripts/kernels raises it in its guests, where TCG runs everything tens of times slower.
CALL_LIMIT = float(os.environ.get("BPFRING_HOSTILE_CALL_LIMIT") or 1.0)
# A scenario that has not finished after this long is hung (sanitizers slow everything down).
SCENARIO_LIMIT = float(os.environ.get("BPFRING_HOSTILE_TIMEOUT") or 60)
FIXED = np.dtype([("seq", "<u8"), ("producer", "<u4"), ("size", "<u4"), ("payload", "u1", (FIXED_SIZE - 16,))])


def hostile_seconds() -> float:
    """How long the random writers run: BPFRING_HOSTILE_SECONDS, else 3."""
    return float(os.environ.get("BPFRING_HOSTILE_SECONDS") or 3)


# -- isolation ------------------------------------------------------------------------------------


def isolated(scenario: Callable[[], Any], timeout: float = SCENARIO_LIMIT) -> Any:
    """Run ``scenario()`` in a forked child and return its (picklable) result."""
    __tracebackhide__ = True
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 0
        try:
            os.close(r)
            faulthandler.enable(all_threads=True)  # a crash or our SIGABRT prints every thread's stack
            try:
                said = ("ok", scenario())
            except BaseException as exc:
                said = ("raised", f"{type(exc).__name__}: {exc}", traceback.format_exc())
            data = pickle.dumps(said)
            while data:
                data = data[os.write(w, data) :]
        except BaseException:
            status = 3
        finally:
            os._exit(status)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    hung = False
    with os.fdopen(r, "rb") as pipe:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pipe], [], [], left)[0]:
                hung = True
                break
            chunk = os.read(pipe.fileno(), 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    if hung:
        os.kill(pid, signal.SIGABRT)  # faulthandler dumps the stacks to the captured stderr
        for _ in range(50):
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        pytest.fail(f"the consumer process hung: no end after {timeout:.0f} s (its stacks are in the captured stderr)")
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        pytest.fail(f"the consumer process died of {sig} (a read outside a mapping?); its stack is in the captured stderr")
    if not chunks:
        pytest.fail(f"the consumer process exited with status {os.WEXITSTATUS(status)} and said nothing")
    said = pickle.loads(b"".join(chunks))
    if said[0] == "raised":
        pytest.fail(f"in the consumer process: {said[1]}\n{said[2]}", pytrace=False)
    return said[1]


def bounded(what: str, call: Callable[[], Any], limit: float = CALL_LIMIT) -> Any:
    """``call()``, failing if it takes ``limit`` seconds or more (it raises what call raises)."""
    __tracebackhide__ = True
    start = time.monotonic()
    try:
        return call()
    finally:
        took = time.monotonic() - start
        assert took < limit, f"{what} took {took:.2f} s (the bound is {limit} s): it spins or waits"


# -- a perf ring followed by an inaccessible page -------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FIXED_NOREPLACE = 0x100000
PROT_NONE = 0
MAP_FAILED = ctypes.c_void_p(-1).value


def _mappings() -> list[tuple[int, int, str, str]]:
    """/proc/self/maps as (start, end, perms, name)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end, fields[1], fields[5].strip() if len(fields) > 5 else ""))
    return out


def _perf_mappings(length: int) -> set[int]:
    return {start for start, end, _, name in _mappings() if "perf_event" in name and end - start == length}


def _anon(addr: int | None, length: int, flags: int = 0) -> int:
    got = _libc.mmap(addr, length, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags, -1, 0)
    if got in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {length} bytes at {addr and hex(addr)}: {os.strerror(err)}")
    return got


class GuardedPerf:
    """A one-CPU PerfBuffer whose ring mapping ends where a PROT_NONE page begins."""

    def __init__(self, array: bpfring.Map, cpu: int, page_cnt: int, **kwargs: Any) -> None:
        length = PAGE + page_cnt * PAGE
        placeholders: list[int] = []  # holes the mapping went to instead: kept busy while retrying
        try:
            for _ in range(20):
                # A hole of exactly the ring's length with the guard page above it: mmap places a
                # new mapping at the highest hole that fits, which is this one unless a higher
                # one fits too (then that one is filled and this tried again).
                hole = _anon(None, length + PAGE)
                _libc.munmap(hole, length)
                guard = hole + length
                before = _perf_mappings(length)
                pb = bpfring.PerfBuffer(array, page_cnt, cpus=[cpu], **kwargs)
                new = _perf_mappings(length) - before
                if new == {hole}:
                    self.pb, self.start, self.guard, self.length = pb, hole, guard, length
                    break
                pb.close()
                _libc.munmap(guard, PAGE)
                placeholders += [_anon(start, length, MAP_FIXED_NOREPLACE) for start in new]
            else:
                pytest.fail(f"could not place the perf ring of cpu {cpu} right below an inaccessible page in 20 tries")
        finally:
            for start in placeholders:
                _libc.munmap(start, length)
        after = [(s, e, perms) for s, e, perms, _ in _mappings() if s <= self.guard < e]
        if after != [(self.guard, self.guard + PAGE, "---p")]:
            self.pb.close()
            pytest.fail(f"the page after the perf ring at {self.guard:#x} is not our inaccessible page: {after}")

    def close(self) -> None:
        self.pb.close()
        _libc.munmap(self.guard, PAGE)


# -- what a consumer may deliver ------------------------------------------------------------------


def as_records(result: Any) -> list[bytes]:
    """A consumer call's result as a list of records: bytes as they are, arrays row by row."""
    if isinstance(result, (int, type(None))):
        return []
    if isinstance(result, tuple):  # (cpus, records) of with_cpus=True
        result = result[1]
    if isinstance(result, np.ndarray):
        raw = result.view(np.dtype((np.void, result.dtype.itemsize)))
        return [row.tobytes() for row in raw]
    return [bytes(r[1]) if isinstance(r, tuple) else bytes(r) for r in result]


class Ledger:
    """Every record delivered, checked byte for byte and for exactly-once.

    Ring records are producer.py's (``fixed``: the 64-byte reserve/submit ones, else variable
    size); perf samples are its records with the CPU as producer, padded by the kernel.
    """

    def __init__(self, fixed: bool = True, perf: bool = False) -> None:
        self.fixed = fixed
        self.perf = perf
        self.seen: set[tuple[int, int]] = set()

    def check(self, records: Iterable[bytes], what: str) -> list[tuple[int, int]]:
        """(producer, seq) of each record, in order; fails on garbage or a record seen before."""
        keys = []
        for rec in records:
            assert len(rec) >= 16, f"{what} delivered a {len(rec)}-byte record: garbage {rec[:32].hex()}"
            seq, producer, size = parse(rec)
            if self.perf:
                want = expected_record(seq, producer, size)
                ok = len(rec) in (FIXED_SIZE, padded_size(size)) and rec[:size] == want
            elif self.fixed:
                ok = rec == expected_fixed(seq, producer)
            else:
                ok = rec == expected_record(seq, producer, size)
            assert ok, f"{what} delivered garbage: {len(rec)} bytes {rec[:32].hex()}..."
            key = (producer, seq)
            assert key not in self.seen, f"{what} delivered record {seq} of producer {producer} a second time"
            self.seen.add(key)
            keys.append(key)
        return keys

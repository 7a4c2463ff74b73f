"""A hostile second process that shares a ring with the consumer under test and writes garbage.

A ring buffer's consumer page and a perf ring's control page are writable shared memory: anyone
holding the map or event (a buggy second consumer, a debugging tool, an attacker) can store any
value in ``consumer_pos`` or ``data_tail``. (The data pages are read-only to user space in both:
a write faults, SIGBUS for perf. A bad record is planted through the BPF producer instead.) This module is that process:

- ``python hostile_writer.py ring MAP_ID`` opens the ringbuf map by id (as an unrelated process
  would, with the raw bpf() syscall) and maps its consumer page read-write and its producer page
  read-only, as ringbuf.py does.
- ``python hostile_writer.py perf PID FD SIZE`` takes perf event fd ``FD`` out of process ``PID``
  with pidfd_getfd(2) (root) and maps it with the consumer's size (perf shares one ring per event).

It then obeys one JSON command a line on stdin and answers one JSON line on stdout (see
:class:`HostileWriter`, the test side), and exits at end of input or when its parent dies.

The garbage it writes at random is garbage the consumer can recognize whatever the producer does
meanwhile: values the producer cannot make consistent again (see ``_random_value``). A position
that is aligned and inside the window of the ring, in the middle of a record, is indistinguishable
from a real one and is out of scope.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PAGE = mmap.PAGESIZE
U64 = 1 << 64
PERF_DATA_HEAD = 1024  # struct perf_event_mmap_page: data_head, data_tail
PERF_DATA_TAIL = 1032
NR_PIDFD_GETFD = 438  # the same number on every architecture (the unified syscall table)
NR_BPF = {"x86_64": 321, "aarch64": 280}
BPF_MAP_GET_FD_BY_ID = 14
PR_SET_PDEATHSIG = 1
# The largest ring buffer record the test producers write, header and padding included: garbage
# "past the producer" by more than this stays past it (the kernel refuses to produce into it).
MAX_RECORD_SPAN = 8192 + 16

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def pidfd_getfd(pid: int, fd: int) -> int:
    """A duplicate of process ``pid``'s fd ``fd`` in this process (pidfd_getfd(2), needs ptrace rights)."""
    pidfd = os.pidfd_open(pid)
    try:
        ret = _libc.syscall(NR_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(fd), ctypes.c_uint(0))
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd(pid {pid}, fd {fd}): {os.strerror(err)}")
        return ret
    finally:
        os.close(pidfd)


class _Target:
    """The word under attack (consumer_pos or data_tail), the producer's word next to it, and the
    ring size; ``window`` is how far the consumer may legitimately trail the producer."""

    size: int

    def get(self) -> int:
        raise NotImplementedError

    def set(self, value: int) -> None:
        raise NotImplementedError

    def producer(self) -> int:
        raise NotImplementedError



def map_fd_by_id(map_id: int) -> int:
    """bpf(BPF_MAP_GET_FD_BY_ID) with the raw syscall: no bpfring here, whose import was most of
    this process's start (seconds a test case in a TCG guest), and which is the code under test."""
    attr = ctypes.create_string_buffer(map_id.to_bytes(4, sys.byteorder), 16)  # map_id, next_id, open_flags
    fd = _libc.syscall(NR_BPF[os.uname().machine], BPF_MAP_GET_FD_BY_ID, attr, ctypes.c_uint(len(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_MAP_GET_FD_BY_ID {map_id}: {os.strerror(err)}")
    return fd


class _RingTarget(_Target):
    def __init__(self, map_id: int) -> None:
        fd = map_fd_by_id(map_id)
        try:
            with open(f"/proc/self/fdinfo/{fd}") as info:
                self.size = int(next(line for line in info if line.startswith("max_entries:")).split()[1])
            self._consumer = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._producer = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ, offset=PAGE)
        finally:
            os.close(fd)  # the mappings keep the map alive
        self._cons = memoryview(self._consumer).cast("Q")
        self._prod = memoryview(self._producer).cast("Q")

    def get(self) -> int:
        return self._cons[0]

    def set(self, value: int) -> None:
        self._cons[0] = value  # one aligned 8-byte store, as the consumer's

    def producer(self) -> int:
        return self._prod[0]


class _PerfTarget(_Target):
    def __init__(self, pid: int, fd: int, size: int) -> None:
        own = pidfd_getfd(pid, fd)
        try:
            # The same length as the consumer's mapping: perf refuses a second mapping of another size.
            self._mm = mmap.mmap(own, PAGE + size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(own)
        self.size = size
        self._words = memoryview(self._mm).cast("Q")

    def get(self) -> int:
        return self._words[PERF_DATA_TAIL // 8]

    def set(self, value: int) -> None:
        self._words[PERF_DATA_TAIL // 8] = value

    def producer(self) -> int:
        return self._words[PERF_DATA_HEAD // 8]

    def set_producer(self, value: int) -> None:
        """data_head sits on the same writable page (the kernel rewrites it at its next output)."""
        self._words[PERF_DATA_HEAD // 8] = value


def _random_value(rng: random.Random, target: _Target, kind: str) -> int:
    """Garbage of ``kind`` that stays recognizable while the producer goes on.

    Unaligned: always. Back by more than the ring: the producer only moves forward. Past the
    producer by more than its largest record: the kernel refuses to produce past a consumer
    position it would overrun (ringbuf: producer_pos - consumer_pos > mask; perf: no space left).
    """
    size = target.size
    prod = target.producer()
    cons = target.get()
    if kind == "unaligned":
        return (((cons + rng.randrange(-size, size)) & ~7) | rng.randint(1, 7)) % U64
    if kind == "back":
        if prod < size + 8:
            return (prod + size + MAX_RECORD_SPAN + 8 * rng.randint(1, 1 << 20)) % U64  # not yet lapped: past instead
        return max(0, prod - size - 8 * rng.randint(1, (prod - size) // 8))
    if kind == "laps":
        laps = rng.randint(1, max(1, prod // size))
        return prod - laps * size - 8 if prod >= laps * size + 8 else (prod + size + MAX_RECORD_SPAN) % U64
    if kind == "past":
        return (prod + MAX_RECORD_SPAN + size + 8 * rng.randrange(1 << 30)) % U64
    if kind == "huge":
        return U64 - 8 * rng.randint(1, 1 << 16)
    if kind == "zero":
        return 0 if prod > size + MAX_RECORD_SPAN else (prod + size + MAX_RECORD_SPAN) % U64
    # any 64 bits, unless they happen to be a plausible position (once in 2**40 draws or so)
    while True:
        value = rng.getrandbits(64)
        if value & 7 or not (prod - size - MAX_RECORD_SPAN <= value <= prod + size + MAX_RECORD_SPAN):
            return value


KINDS = ("unaligned", "back", "laps", "past", "huge", "zero", "random")


def _run_random(target: _Target, seconds: float, seed: int, max_pause_us: int) -> dict[str, Any]:
    """Store garbage for ``seconds``, pausing up to ``max_pause_us`` between stores (so the consumer
    sees healthy stretches too). Leaves the last garbage in place."""
    rng = random.Random(seed)
    writes = dict.fromkeys(KINDS, 0)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        kind = rng.choice(KINDS)
        target.set(_random_value(rng, target, kind))
        writes[kind] += 1
        time.sleep(rng.randrange(max_pause_us) / 1e6)
    return {"writes": writes, "pos": target.get(), "prod": target.producer()}


def main(argv: list[str]) -> int:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # never outlive the consumer under test
    kind = argv[0]
    target: _Target = _RingTarget(int(argv[1])) if kind == "ring" else _PerfTarget(*map(int, argv[1:4]))
    print(json.dumps({"ready": True, "size": target.size}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "get":
                reply: dict[str, Any] = {"pos": target.get(), "prod": target.producer()}
            elif op == "set":
                old = target.get()
                target.set(cmd["value"] % U64)
                reply = {"old": old, "pos": target.get(), "prod": target.producer()}
            elif op == "set_head":
                target.set_producer(cmd["value"] % U64)  # type: ignore[attr-defined]
                reply = {"pos": target.get(), "prod": target.producer()}
            elif op == "random":
                reply = _run_random(target, cmd["seconds"], cmd["seed"], cmd.get("max_pause_us", 2000))
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as exc:  # reported to the test, which fails with it
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    return 0


class HostileWriter:
    """The test's handle on a hostile writer process (see the module docstring)."""

    def __init__(self, *args: int | str) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        hello = self._proc.stdout.readline()  # type: ignore[union-attr]
        if not hello:
            code = self._proc.wait()
            raise RuntimeError(f"the hostile writer ({' '.join(map(str, args))}) exited with {code} before it was ready")
        self.size: int = json.loads(hello)["size"]

    @classmethod
    def ring(cls, map_id: int) -> HostileWriter:
        return cls("ring", map_id)

    @classmethod
    def perf(cls, fd: int, size: int) -> HostileWriter:
        """Attack perf event fd ``fd`` of this process (the writer takes it with pidfd_getfd)."""
        return cls("perf", os.getpid(), fd, size)

    def _ask(self, **cmd: Any) -> dict[str, Any]:
        self._proc.stdin.write(json.dumps(cmd) + "\n")  # type: ignore[union-attr]
        self._proc.stdin.flush()  # type: ignore[union-attr]
        line = self._proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"the hostile writer died (exit {self._proc.wait()}) on {cmd}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the hostile writer failed {cmd}: {reply['error']}")
        return reply

    def set(self, value: int) -> int:
        """Store ``value`` (mod 2**64) in the attacked word; returns what the writer reads back."""
        return self._ask(op="set", value=value)["pos"]

    def set_head(self, value: int) -> int:
        """Store ``value`` in a perf ring's data_head; returns what the writer reads back."""
        return self._ask(op="set_head", value=value)["prod"]

    def get(self) -> tuple[int, int]:
        """(the attacked word, the producer's word) as the writer sees them."""
        reply = self._ask(op="get")
        return reply["pos"], reply["prod"]

    def random(self, seconds: float, seed: int, max_pause_us: int = 2000) -> dict[str, Any]:
        """Garbage for ``seconds``; blocks until done and returns what was written, by kind."""
        return self._ask(op="random", seconds=seconds, seed=seed, max_pause_us=max_pause_us)

    def start_random(self, seconds: float, seed: int, max_pause_us: int = 2000) -> None:
        """As :meth:`random`, without waiting: :meth:`finish_random` collects the answer."""
        self._proc.stdin.write(  # type: ignore[union-attr]
            json.dumps({"op": "random", "seconds": seconds, "seed": seed, "max_pause_us": max_pause_us}) + "\n"
        )
        self._proc.stdin.flush()  # type: ignore[union-attr]

    def finish_random(self) -> dict[str, Any]:
        line = self._proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"the hostile writer died (exit {self._proc.wait()}) during its random run")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the hostile writer's random run failed: {reply['error']}")
        return reply

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()  # type: ignore[union-attr]
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc.stdout.close()  # type: ignore[union-attr]

    def __enter__(self) -> HostileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main(sys.argv[1:]))


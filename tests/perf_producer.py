"""The Python side of tests/bpf/perf_producer.bpf.c: run it on a CPU, and recompute what it outputs.

Samples are producer.py's records (its header, with the CPU as ``producer``), so the same
``expected_record``/``record_size``/``parse`` check them.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from producer import PATTERN

import bpfring

MAX_CPUS = 64
MAX_PER_RUN = 256  # perf_producer.h: samples one run of the program outputs at most


class PerfArgs(ctypes.Structure):
    """struct perf_args of perf_producer.h."""

    _fields_ = [
        ("seq", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("size_min", ctypes.c_uint32),
        ("size_max", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class PerfResult(ctypes.Structure):
    """struct perf_result of perf_producer.h."""

    _fields_ = [("produced", ctypes.c_uint64), ("failed", ctypes.c_uint64), ("last_err", ctypes.c_int64)]


@dataclass
class Output:
    cpu: int
    first_seq: int
    count: int
    produced: int  # bpf_perf_event_output succeeded
    failed: int  # it returned an error
    last_err: int  # the last error it returned, as a negative errno (0: none)


def padded_size(size: int) -> int:
    """The raw_size the kernel reports for a sample of ``size`` bytes (size + 4 rounded to 8, minus 4)."""
    return (size + 4 + 7) // 8 * 8 - 4


def record_bytes(size: int) -> int:
    """Bytes a sample of ``size`` occupies in a perf ring: header, raw_size, padded raw data."""
    return 8 + 4 + padded_size(size)


class PerfProducer:
    """perf_producer.bpf.o, loaded; ``output()`` runs it on a CPU and reports what happened."""

    def __init__(self, path: os.PathLike[str] | str, max_entries: int | None = None) -> None:
        self.obj = bpfring.Object(path)
        try:
            if max_entries is not None:
                self.obj.set_max_entries("pb", max_entries)
            self.obj.load()
            self.obj.map("pattern").update(b"\0\0\0\0", PATTERN)
        except BaseException:
            self.obj.close()
            raise
        self.array = self.obj.map("pb")
        self._results = self.obj.map("results")
        self._next_seq: dict[int, int] = {}

    def output(self, count: int, size: int | tuple[int, int] = 16, *, cpu: int) -> Output:
        """Output ``count`` samples on ``cpu`` with consecutive sequence numbers (per CPU)."""
        size_min, size_max = (size, size) if isinstance(size, int) else size
        seq = self._next_seq.get(cpu, 0)
        key = cpu.to_bytes(4, "little")
        produced = failed = last_err = 0
        for first in range(0, count, MAX_PER_RUN):  # one run outputs MAX_PER_RUN samples at most
            n = min(MAX_PER_RUN, count - first)
            args = PerfArgs(seq=seq + first, count=n, size_min=size_min, size_max=size_max)
            run = self.obj.program("produce").test_run(ctx=bytes(args), cpu=cpu)
            if run.retval != n:  # the samples it tried, or -1 (no result slot for this CPU)
                raise RuntimeError(f"perf_producer ran {ctypes.c_int32(run.retval).value} of {n} iterations")
            res = PerfResult.from_buffer_copy(self._results.lookup(key))
            produced, failed = produced + res.produced, failed + res.failed
            last_err = res.last_err or last_err
        self._next_seq[cpu] = seq + count
        return Output(cpu, seq, count, produced, failed, last_err)

    def close(self) -> None:
        self.obj.close()

    def __enter__(self) -> PerfProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

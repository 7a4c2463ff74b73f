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
        args = PerfArgs(seq=seq, count=count, size_min=size_min, size_max=size_max)
        run = self.obj.program("produce").test_run(ctx=bytes(args), cpu=cpu)
        if run.retval != count:  # bpf_loop's result: the iterations run, or an error
            raise RuntimeError(f"perf_producer ran {ctypes.c_int32(run.retval).value} of {count} iterations")
        key = cpu.to_bytes(4, "little")
        res = PerfResult.from_buffer_copy(self._results.lookup(key))
        self._next_seq[cpu] = seq + count
        return Output(cpu, seq, count, res.produced, res.failed, res.last_err)

    def close(self) -> None:
        self.obj.close()

    def __enter__(self) -> PerfProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

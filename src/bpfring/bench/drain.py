"""The pre-produced drain: consumer throughput, side by side, on the same kernel-produced records.

Each round produces N records of 8 or 64 bytes into a BPF ring buffer (bench.bpf.c, run with
BPF_PROG_TEST_RUN, BPF_RB_NO_WAKEUP), then times one consumer draining them all. Consumers:

  (a) bpfring per-event callback (the C walk)
  (b) bpfring batch with a numpy dtype: consume_batch() copying into a new array (copy) or into
      an array reused across calls (into, out=), and batch() (a zero-copy view)
  (c) libbpf ring_buffer__consume() with a ctypes Python callback, as Python tools do today
  (d) libbpf ring_buffer__consume() with a native C callback that counts (the baseline)

Every consumer is set up before its clock starts (mapping a ring costs about 0.1 ms per MiB);
set-up is reported on its own line. Rounds interleave the consumers so machine noise hits all
alike; the figure per consumer is the median of its rounds.

Each round is checked apart from what the consumer says it took: the ring's own positions show
that the program wrote N records and that the consumer left the ring empty, N records further.
"""

from __future__ import annotations

import ctypes
import statistics
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np


from .. import features
from .._sys import libbpf
from ..objects import Object, bundled_object
from ..ringbuf import BPF_RB_NO_WAKEUP, Ring, RingBuffer
from .runner import INTERRUPTED

# struct bench_args of bench.bpf.c: u32 count, u32 flags, u64 seq, u64 dropped
BENCH_ARGS = struct.Struct("<IIQQ")
RECORD_DTYPES = {
    8: np.dtype([("seq", "<u8")]),
    64: np.dtype([("seq", "<u8"), ("ts", "<u8"), ("payload", "u1", (48,))]),
}
BASELINE = "libbpf-c"


def _empty(data: bytes) -> None:
    """The per-event callback under test: Python's cheapest possible handler."""


@dataclass
class Result:
    consumer: str
    size: int
    rates: list[float] = field(default_factory=list)  # records/s per round
    setup_s: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0


class Bench:
    """One loaded bench.bpf.o with a ring big enough for ``count`` records of ``size`` bytes."""

    def __init__(self, size: int, count: int) -> None:
        features.require(features.BPF_LOOP)  # its programs: SEC("syscall") calling bpf_loop()
        self.size = size
        self.count = count
        stride = (size + 8 + 7) & ~7
        ring = 1 << max(16, (stride * count - 1).bit_length())
        self.obj = Object(bundled_object("bench"))
        try:
            for prog in self.obj.programs:
                prog.autoload = prog.name == f"produce{size}"
            self.obj.set_max_entries("rb", ring)
            self.obj.load()
        except BaseException:
            self.obj.close()
            raise
        self.map = self.obj.map("rb")
        self.prog = self.obj.program(f"produce{size}")
        self.seq = 0
        self.stride = stride
        try:
            self.watch = Ring(self.map, _never, shared=True)  # positions only: never consumes
        except BaseException:
            self.obj.close()
            raise

    def produce(self) -> None:
        args = BENCH_ARGS.pack(self.count, BPF_RB_NO_WAKEUP, self.seq, 0)
        dropped = BENCH_ARGS.unpack(self.prog.test_run(ctx=args).ctx_out)[3]
        if dropped:
            raise RuntimeError(f"the ring dropped {dropped} of {self.count} records: it should hold them all")
        self.seq += self.count

    def check_produced(self) -> int:
        """The consumer position the drain must reach: N records past the current one."""
        start = self.watch.consumer_pos
        written = self.watch.producer_pos - start
        if written != self.count * self.stride:
            raise RuntimeError(
                f"the ring holds {written} bytes; {self.count} records of {self.size} bytes take {self.count * self.stride}"
            )
        return start + written

    def check_drained(self, name: str, end: int, got: int) -> None:
        """The ring is empty at ``end`` and the consumer counted what the program wrote."""
        left, at = self.watch.avail_data_size, self.watch.consumer_pos
        if left or at != end:
            raise RuntimeError(f"{name} left {left} bytes in the ring (consumer_pos {at}, expected {end})")
        if got != self.count:
            raise RuntimeError(f"{name} counted {got} records, the ring says {self.count} were taken")

    def close(self) -> None:
        self.watch.close()
        self.obj.close()


def _never(data: bytes) -> None:
    raise AssertionError("the watching ring never consumes")


# -- consumers: each returns (set up, drain, tear down) --------------------------------------


def bpfring_callback(bench: Bench):
    rb = RingBuffer(bench.map, _empty)
    return rb.consume, rb.close


def bpfring_batch_copy(bench: Bench):
    rb = RingBuffer(bench.map, _empty)
    dtype = RECORD_DTYPES[bench.size]
    return (lambda: len(rb.consume_batch(dtype))), rb.close


def bpfring_batch_into(bench: Bench):
    rb = RingBuffer(bench.map, _empty)
    out = np.ones(bench.count, dtype=RECORD_DTYPES[bench.size])  # allocated and written in set-up (zeros would map lazily)
    return (lambda: len(rb.consume_batch(out.dtype, out=out))), rb.close


def bpfring_batch_view(bench: Bench):
    rb = RingBuffer(bench.map, _empty)
    dtype = RECORD_DTYPES[bench.size]

    def drain() -> int:
        with rb.batch(dtype) as records:
            return len(records)

    return drain, rb.close


def libbpf_ctypes(bench: Bench):
    def sample(ctx: int, data: int, size: int) -> int:
        _empty(ctypes.string_at(data, size))
        return 0

    callback = libbpf.RING_BUFFER_SAMPLE_FN(sample)
    return _libbpf_ring(bench, ctypes.cast(callback, ctypes.c_void_p), None, keep=callback)


def libbpf_native(bench: Bench, helper: ctypes.CDLL):
    counter = ctypes.c_ulonglong(0)
    fn = ctypes.cast(helper.bpfring_bench_count, ctypes.c_void_p)
    return _libbpf_ring(bench, fn, ctypes.byref(counter), keep=counter)


def _libbpf_ring(bench: Bench, fn: ctypes.c_void_p, ctx: object, keep: object):
    alive = [keep]  # the callback (or counter) must outlive the libbpf ring buffer
    rb = libbpf.lib.ring_buffer__new(bench.map.fd, fn, ctx, None)
    if not rb:
        raise OSError(ctypes.get_errno(), "ring_buffer__new failed")

    def drain() -> int:
        n = libbpf.lib.ring_buffer__consume(rb)
        if n < 0:
            raise OSError(-n, "ring_buffer__consume failed")
        return n

    def close() -> None:
        libbpf.lib.ring_buffer__free(rb)
        alive.clear()

    return drain, close


# -- the run ----------------------------------------------------------------------------------


def consumers(helper: ctypes.CDLL) -> dict[str, Callable]:
    found = {
        "bpfring-callback": bpfring_callback,
        "bpfring-batch-copy": bpfring_batch_copy,
        "bpfring-batch-into": bpfring_batch_into,
        "bpfring-batch-view": bpfring_batch_view,
        "libbpf-ctypes": libbpf_ctypes,
        BASELINE: lambda b: libbpf_native(b, helper),
    }
    return found


def run(
    sizes: Sequence[int],
    count: int,
    rounds: int,
    helper: ctypes.CDLL,
    progress: Callable[[str], None],
    results: dict | None = None,
    forms: dict[str, Callable] | None = None,
) -> list[Result]:
    """Fill ``results`` as rounds complete, so an interrupted run still has what was measured.
    ``forms``: the consumers to run (default: every one, see consumers())."""
    results = {} if results is None else results
    forms = consumers(helper) if forms is None else forms
    for size in sizes:
        bench = Bench(size, count)
        try:
            for r in range(rounds):
                for name, make in forms.items():
                    if INTERRUPTED.is_set():  # Ctrl-C inside a ctypes callback is only printed
                        raise KeyboardInterrupt
                    progress(f"{size}-byte records, round {r + 1}/{rounds}: {name}")
                    res = results.setdefault((name, size), Result(name, size))
                    t0 = time.perf_counter()
                    drain, close = make(bench)
                    res.setup_s.append(time.perf_counter() - t0)
                    try:
                        bench.produce()
                        end = bench.check_produced()
                        t0 = time.perf_counter()
                        got = 0
                        while got < count:
                            n = drain()
                            if n <= 0:
                                raise RuntimeError(f"{name} stopped after {got} of {count} records")
                            got += n
                        rate = count / (time.perf_counter() - t0)
                        bench.check_drained(name, end, got)
                        res.rates.append(rate)
                    finally:
                        close()
        finally:
            bench.close()
    return list(results.values())


def report(results: list[Result], count: int, out=None) -> None:
    out = out or sys.stdout
    base = {r.size: r.rate for r in results if r.consumer == BASELINE}
    out.write(f"\npre-produced drain: {count} records per round, drained by each consumer (median of rounds)\n\n")
    out.write(f"{'consumer':<22} {'size':>5} {'M records/s':>12} {'x libbpf-c':>11} {'set-up ms':>10}\n")
    for r in sorted(results, key=lambda r: (r.size, -r.rate)):
        ratio = r.rate / base[r.size] if base.get(r.size) else float("nan")
        setup = statistics.median(r.setup_s) * 1000 if r.setup_s else float("nan")
        out.write(f"{r.consumer:<22} {r.size:>5} {r.rate / 1e6:>12.2f} {ratio:>11.2f} {setup:>10.2f}\n")
    for size in sorted(base):
        by = {r.consumer: r.rate for r in results if r.size == size}
        if "bpfring-callback" in by and by.get("libbpf-ctypes"):
            out.write(
                f"\n{size}-byte records: bpfring callback is {by['bpfring-callback'] / by['libbpf-ctypes']:.1f}x "
                f"the libbpf ctypes callback"
            )
    out.write("\n")

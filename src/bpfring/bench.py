"""``bpfring bench``: consumer throughput, side by side, on the same kernel-produced records.

Each round produces N records of 8 or 64 bytes into a BPF ring buffer (bench.bpf.c, run with
BPF_PROG_TEST_RUN, BPF_RB_NO_WAKEUP), then times one consumer draining them all. Consumers:

  (a) bpfring per-event callback (the C walk; and the pure-Python fallback, for reference)
  (b) bpfring batch with a numpy dtype: consume_batch() copying into a new array (copy) or into
      an array reused across calls (into, out=), and batch() (a zero-copy view)
  (c) libbpf ring_buffer__consume() with a ctypes Python callback, as Python tools do today
  (d) libbpf ring_buffer__consume() with a native C callback that counts (the baseline)

Every consumer is set up before its clock starts (mapping a ring costs about 0.1 ms per MiB);
set-up is reported on its own line. Rounds interleave the consumers so machine noise hits all
alike; the figure per consumer is the median of its rounds. Ctrl-C stops and prints what was
measured so far.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import ringbuf
from ._sys import libbpf
from .objects import Object, bundled_object
from .ringbuf import BPF_RB_NO_WAKEUP, RingBuffer

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

    def produce(self) -> None:
        args = BENCH_ARGS.pack(self.count, BPF_RB_NO_WAKEUP, self.seq, 0)
        dropped = BENCH_ARGS.unpack(self.prog.test_run(ctx=args).ctx_out)[3]
        if dropped:
            raise RuntimeError(f"the ring dropped {dropped} of {self.count} records: it should hold them all")
        self.seq += self.count

    def close(self) -> None:
        self.obj.close()


# -- consumers: each returns (set up, drain, tear down) --------------------------------------


def bpfring_callback(bench: Bench, native: bool = True):
    saved = ringbuf._native
    if not native:
        ringbuf._native = None
    rb = RingBuffer(bench.map, _empty)

    def drain() -> int:
        return rb.consume()

    def close() -> None:
        rb.close()
        ringbuf._native = saved

    return drain, close


def bpfring_batch_copy(bench: Bench):
    rb = RingBuffer(bench.map, _empty)
    dtype = RECORD_DTYPES[bench.size]
    return (lambda: len(rb.consume_batch(dtype))), rb.close


def bpfring_batch_into(bench: Bench):
    rb = RingBuffer(bench.map, _empty)
    out = np.zeros(bench.count, dtype=RECORD_DTYPES[bench.size])  # allocated and touched in set-up
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


def compile_native_helper(workdir: str) -> ctypes.CDLL:
    """Build bench_callback.c into a shared object with the system's C compiler."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("the native baseline needs a C compiler (cc, gcc or clang)")
    src = os.path.join(os.path.dirname(__file__), "bench_callback.c")
    out = os.path.join(workdir, "bench_callback.so")
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", out, src], check=True)
    return ctypes.CDLL(out)


# -- the run ----------------------------------------------------------------------------------


def consumers(helper: ctypes.CDLL) -> dict[str, Callable]:
    found = {
        "bpfring-callback": bpfring_callback,
        "bpfring-callback-py": lambda b: bpfring_callback(b, native=False),
        "bpfring-batch-copy": bpfring_batch_copy,
        "bpfring-batch-into": bpfring_batch_into,
        "bpfring-batch-view": bpfring_batch_view,
        "libbpf-ctypes": libbpf_ctypes,
        BASELINE: lambda b: libbpf_native(b, helper),
    }
    if ringbuf._native is None:
        del found["bpfring-callback"]  # only the fallback exists in this install
    return found


def run(sizes: Sequence[int], count: int, rounds: int, progress: Callable[[str], None]) -> list[Result]:
    results: dict[tuple[str, int], Result] = {}
    with tempfile.TemporaryDirectory(prefix="bpfring-bench-") as work:
        forms = consumers(compile_native_helper(work))
        for size in sizes:
            bench = Bench(size, count)
            try:
                for r in range(rounds):
                    for name, make in forms.items():
                        progress(f"{size}-byte records, round {r + 1}/{rounds}: {name}")
                        res = results.setdefault((name, size), Result(name, size))
                        t0 = time.perf_counter()
                        drain, close = make(bench)
                        res.setup_s.append(time.perf_counter() - t0)
                        try:
                            bench.produce()
                            t0 = time.perf_counter()
                            got = 0
                            while got < count:
                                n = drain()
                                if n <= 0:
                                    raise RuntimeError(f"{name} stopped after {got} of {count} records")
                                got += n
                            res.rates.append(count / (time.perf_counter() - t0))
                        finally:
                            close()
            finally:
                bench.close()
    return list(results.values())


# -- end to end: a producer on one CPU, the consumer on the other ----------------------------------

E2E_RING = 4 << 20
E2E_CHUNK = 4096  # records per BPF_PROG_TEST_RUN call of the producer


@dataclass
class EndToEnd:
    consumer: str
    size: int
    seconds: float
    produced: int
    dropped: int
    consumed: int

    @property
    def producer_rate(self) -> float:
        return (self.produced + self.dropped) / self.seconds

    @property
    def consumer_rate(self) -> float:
        return self.consumed / self.seconds


def end_to_end(size: int, seconds: float, consumer: str) -> EndToEnd:
    """Run the producer flat out on CPU 0 (a child process) while ``consumer`` drains on CPU 1."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise RuntimeError("the end-to-end run needs two CPUs")
    obj = Object(bundled_object("bench"))
    try:
        for prog in obj.programs:
            prog.autoload = prog.name == f"produce{size}"
        obj.set_max_entries("rb", E2E_RING)
        obj.load()
        prog = obj.program(f"produce{size}")
        dtype = RECORD_DTYPES[size]
        consumed = 0

        def count(data: bytes) -> None:
            nonlocal consumed
            consumed += 1

        with RingBuffer(obj.map("rb"), count) as rb:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the producer
                code = 1
                try:
                    os.close(r)
                    os.sched_setaffinity(0, {cpus[0]})
                    produced = dropped = seq = 0
                    stop = time.monotonic() + seconds
                    while time.monotonic() < stop:
                        args = BENCH_ARGS.pack(E2E_CHUNK, 0, seq, 0)
                        lost = BENCH_ARGS.unpack(prog.test_run(ctx=args).ctx_out)[3]
                        produced += E2E_CHUNK - lost
                        dropped += lost
                        seq += E2E_CHUNK
                    os.write(w, struct.pack("<QQ", produced, dropped))
                    code = 0
                finally:
                    os._exit(code)
            os.close(w)
            saved = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {cpus[1]})
            try:
                t0 = time.perf_counter()
                while os.waitpid(pid, os.WNOHANG) == (0, 0):
                    if consumer == "bpfring-batch-view":
                        with rb.batch(dtype) as view:
                            consumed += len(view)
                    elif consumer == "bpfring-batch-copy":
                        consumed += len(rb.consume_batch(dtype))
                    else:
                        rb.poll(10)
                elapsed = time.perf_counter() - t0
                with os.fdopen(r, "rb") as f:
                    produced, dropped = struct.unpack("<QQ", f.read())
                rest = rb.consume()  # whatever was still in the ring at the end
                if consumer != "bpfring-callback":
                    consumed += rest
            finally:
                os.sched_setaffinity(0, saved)
        return EndToEnd(consumer, size, elapsed, produced, dropped, consumed)
    finally:
        obj.close()


def report_end_to_end(runs: list[EndToEnd], out=sys.stdout) -> None:
    out.write(f"\nend to end: producer flat out on one CPU, consumer on the other, {E2E_RING >> 20} MiB ring\n\n")
    out.write(f"{'consumer':<22} {'size':>5} {'produced M/s':>13} {'consumed M/s':>13} {'dropped':>10}\n")
    for e in runs:
        out.write(
            f"{e.consumer:<22} {e.size:>5} {e.producer_rate / 1e6:>13.2f} {e.consumer_rate / 1e6:>13.2f} {e.dropped:>10}\n"
        )


def report(results: list[Result], count: int, out=sys.stdout) -> None:
    base = {r.size: r.rate for r in results if r.consumer == BASELINE}
    out.write(f"\n{count} pre-produced records per round, drained by each consumer (median of rounds)\n\n")
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


def machine() -> dict:
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "libbpf": "%d.%d" % libbpf.VERSION,
        "bpfring_native_walk": ringbuf._native is not None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bpfring bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  bpfring bench --quick\n  bpfring bench --records 2000000 --rounds 7 --json out.json\n",
    )
    parser.add_argument("--quick", action="store_true", help="fewer records and rounds (well under a minute)")
    parser.add_argument("--records", type=int, help="records per round (default 1000000; --quick 200000)")
    parser.add_argument("--rounds", type=int, help="rounds per consumer (default 5; --quick 3)")
    parser.add_argument("--sizes", default="8,64", help="record sizes, from 8 and 64 (default both)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure and the machine's description")
    parser.add_argument(
        "--e2e-seconds", type=float, help="seconds of each end-to-end run (default 3; --quick 1; 0 skips them)"
    )
    args = parser.parse_args(argv)
    count = args.records or (200_000 if args.quick else 1_000_000)
    rounds = args.rounds or (3 if args.quick else 5)
    sizes = [int(s) for s in args.sizes.split(",")]
    if bad := [s for s in sizes if s not in RECORD_DTYPES]:
        parser.error(f"--sizes takes 8 and/or 64, got {bad}")

    def progress(text: str) -> None:
        if sys.stderr.isatty():
            sys.stderr.write(f"\r\033[K{text}")
            sys.stderr.flush()

    e2e_seconds = args.e2e_seconds if args.e2e_seconds is not None else (1.0 if args.quick else 3.0)
    results: list[Result] = []
    runs: list[EndToEnd] = []
    status = 0
    try:
        results = run(sizes, count, rounds, progress)
        if e2e_seconds > 0:
            for size in sizes:
                for consumer in ("bpfring-batch-view", "bpfring-batch-copy", "bpfring-callback"):
                    progress(f"end to end, {size}-byte records: {consumer}")
                    runs.append(end_to_end(size, e2e_seconds, consumer))
    except KeyboardInterrupt:
        status = 130
        sys.stderr.write("\ninterrupted: reporting what was measured\n")
    finally:
        progress("")
    if results:
        report(results, count)
    if runs:
        report_end_to_end(runs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine(),
                    "records_per_round": count,
                    "rounds": rounds,
                    "results": [r.__dict__ | {"median_rate": r.rate} for r in results],
                    "end_to_end": [e.__dict__ for e in runs],
                },
                f,
                indent=2,
            )
    return status


if __name__ == "__main__":
    sys.exit(main())

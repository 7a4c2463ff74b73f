"""The stress harness: producers pinned on every CPU, checkers that account for every record.

Ring buffer producers are tests/bpf/producer.bpf.c run with BPF_PROG_TEST_RUN from threads pinned
with ``os.sched_setaffinity(0, {cpu})`` (the ctypes call releases the GIL, so threads produce in
parallel); perf producers are tests/bpf/perf_producer.bpf.c test-run on their CPU. Each thread is
one producer id with its own sequence numbers, and the BPF side reports exactly how many records
it committed, discarded and dropped, so a run accounts for every record it attempted.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
from perf_producer import PerfProducer, padded_size
from producer import FIXED_SIZE, MODE_OUTPUT, MODE_RESERVE, Producer, expected_record, parse, record_size

MIN_LAPS = 1000  # every stress run laps its ring at least this many times
# Beyond its target, a run that has not finished is declared hung (BPFRING_HANG_SECONDS overrides).
HANG_SECONDS = float(os.environ.get("BPFRING_HANG_SECONDS") or 180)
SIZES = (16, 1000)  # record sizes: random over this span (16: room for the seq header)
FIXED = np.dtype([("seq", "<u8"), ("producer", "<u4"), ("size", "<u4"), ("payload", "u1", (FIXED_SIZE - 16,))])


def env_stress_seconds() -> float:
    """BPFRING_STRESS_SECONDS, 0 when unset (the bounded CI mode)."""
    return float(os.environ.get("BPFRING_STRESS_SECONDS") or 0)


def long_mode() -> bool:
    return env_stress_seconds() > 0


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def report(name: str, **figures: Any) -> None:
    """Print a run's figures; with BPFRING_STRESS_REPORT=path, also append them there as JSON."""
    line = {"test": name, **figures}
    print(json.dumps(line))
    path = os.environ.get("BPFRING_STRESS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


class Deadline:
    """A generous guard against hangs (not a timing assertion): fails only a run that never ends.

    With ``progress`` (a count that grows while the run moves, such as the records delivered),
    only HANG_SECONDS without progress fail it: a slow machine takes longer, a stuck run does not
    end. (5.10's producer makes one record per program run: under TCG, a run's thousand laps took
    more than HANG_SECONDS past its target and were still moving.)
    """

    def __init__(
        self, seconds: float, what: str, state: Callable[[], object] = lambda: "",
        progress: Callable[[], int] | None = None,
    ) -> None:
        self.end = time.monotonic() + seconds + HANG_SECONDS
        self.what = what
        self.state = state
        self.progress = progress
        self.last = progress() if progress is not None else 0

    def check(self) -> None:
        now = time.monotonic()
        if self.progress is None:
            assert now < self.end, f"{self.what}: no end in sight after {HANG_SECONDS:.0f} s past its target {self.state()}"
            return
        if (moved := self.progress()) != self.last:
            self.last, self.end = moved, max(self.end, now + HANG_SECONDS)
        assert now < self.end, f"{self.what}: no progress for {HANG_SECONDS:.0f} s past its target {self.state()}"


def producer_thread_setup(cpu: int) -> None:
    """Pin the calling thread to ``cpu`` and keep SIGINT away from it (the main thread handles it)."""
    os.sched_setaffinity(0, {cpu})
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


class _Threads:
    """Producer threads that loop until stop(); an exception in one is re-raised by stop()."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []

    def _spawn(self, cpu: int, step: Callable[[], None], pause: float) -> None:
        """A thread on ``cpu`` calling ``step()``, resting up to ``pause`` seconds between calls
        (random), so the consumer shares the CPUs and the ring is sometimes full, sometimes not."""
        rng = random.Random(len(self._threads))

        def run() -> None:
            producer_thread_setup(cpu)
            try:
                while not self._stop.is_set():
                    step()
                    if pause:
                        time.sleep(rng.uniform(0, pause))
            except BaseException as exc:  # reported by stop()
                self._errors.append(exc)

        t = threading.Thread(target=run, name=f"producer-{len(self._threads)}-cpu{cpu}", daemon=True)
        self._threads.append(t)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
            assert not t.is_alive(), "a producer thread did not stop"
        if self._errors:
            raise self._errors[0]

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class RingTally:
    """What one producer id attempted, and what the BPF side says became of it."""

    mode: int
    discard_every: int
    attempted: int = 0
    produced: int = 0
    discarded: int = 0
    dropped: int = 0


class RingProducers(_Threads):
    """Two producers per CPU into one ring, one with bpf_ringbuf_output(), one with reserve/submit
    and discards (``fixed``: both with the seed's fixed-size reserve/submit, for numpy dtypes).
    With ``others``, the same into each of their rings too (producer ids go on counting)."""

    def __init__(
        self,
        producer: Producer,
        *others: Producer,
        fixed: bool = False,
        batch: int = 32,
        discard_every: int = 5,
        pause: float = 0.001,
    ) -> None:
        super().__init__()
        self.producer = producer
        self.tallies: dict[int, RingTally] = {}
        for ring in (producer, *others):
            for cpu in cpus():
                for mode in (MODE_OUTPUT, MODE_RESERVE):
                    pid = len(self.tallies)
                    d = discard_every if (fixed or mode == MODE_RESERVE) else 0
                    self.tallies[pid] = RingTally(mode, d)
                    self._spawn(cpu, self._step(ring, pid, fixed, batch), pause)

    def _step(self, producer: Producer, pid: int, fixed: bool, batch: int) -> Callable[[], None]:
        tally = self.tallies[pid]

        def step() -> None:
            r = producer.produce(
                batch, SIZES, mode=tally.mode, discard_every=tally.discard_every, producer=pid, fixed=fixed
            )
            tally.attempted += r.count
            tally.produced += r.produced
            tally.discarded += r.discarded
            tally.dropped += r.dropped

        return step

    def total(self, name: str) -> int:
        return sum(getattr(t, name) for t in self.tallies.values())

    def check_accounting(self) -> None:
        for pid, t in self.tallies.items():
            assert t.produced + t.discarded + t.dropped == t.attempted, f"producer {pid}: the BPF side lost count"


class RingChecker:
    """Every delivered record: intact, never twice, in its producer's order, never a discarded one."""

    def __init__(self, producers: RingProducers) -> None:
        self.producers = producers
        self.last: dict[int, int] = defaultdict(lambda: -1)
        self.count: dict[int, int] = defaultdict(int)

    @property
    def delivered(self) -> int:
        return sum(self.count.values())

    def _seq(self, pid: int, seq: int) -> None:
        assert pid in self.producers.tallies, f"record from unknown producer {pid}"
        assert seq > self.last[pid], f"producer {pid}: seq {seq} after {self.last[pid]} (repeated or out of order)"
        d = self.producers.tallies[pid].discard_every
        assert not (d and seq % d == 0), f"producer {pid}: discarded record {seq} was delivered"
        self.last[pid] = seq
        self.count[pid] += 1

    def records(self, records: Iterable[bytes]) -> None:
        for record in records:
            assert len(record) >= 16, f"a {len(record)}-byte record: corrupt"
            seq, pid, size = parse(record)
            assert size == len(record) == record_size(seq, *SIZES), f"producer {pid} record {seq}: wrong size"
            assert record == expected_record(seq, pid, size), f"producer {pid} record {seq} corrupt"
            self._seq(pid, seq)

    def fixed(self, arr: Any) -> None:
        """A numpy array (or zero-copy view) of FIXED records."""
        if not len(arr):
            return
        seq = np.asarray(arr["seq"]).astype(np.int64)
        pid = np.asarray(arr["producer"])
        assert (arr["size"] == FIXED_SIZE).all(), "a fixed record with the wrong size field"
        want = (seq[:, None] + np.arange(FIXED_SIZE - 16, dtype=np.int64)) & 0xFF
        assert (arr["payload"] == want).all(), "a fixed record's payload is corrupt"
        for p in np.unique(pid):
            s = seq[pid == p]
            p = int(p)
            assert p in self.producers.tallies, f"record from unknown producer {p}"
            assert s[0] > self.last[p] and (np.diff(s) > 0).all(), f"producer {p}: repeated or out of order"
            d = self.producers.tallies[p].discard_every
            assert not (d and (s % d == 0).any()), f"producer {p}: a discarded record was delivered"
            self.last[p] = int(s[-1])
            self.count[p] += len(s)

    def check_totals(self) -> None:
        """After the final drain: delivered == committed, per producer; attempted all accounted for."""
        self.producers.check_accounting()
        for pid, t in self.producers.tallies.items():
            assert self.count[pid] == t.produced, f"producer {pid}: {self.count[pid]} delivered, {t.produced} committed"


@dataclass
class PerfTally:
    attempted: int = 0
    produced: int = 0
    failed: int = 0


class PerfProducers(_Threads):
    """One producer per CPU, each writing into its CPU's perf ring."""

    def __init__(
        self, perf_producer: PerfProducer, *, batch: int = 16, sizes: tuple[int, int] = SIZES, pause: float = 0.001
    ) -> None:
        super().__init__()
        self.perf_producer = perf_producer
        self.sizes = sizes
        self.tallies: dict[int, PerfTally] = {}
        for cpu in cpus():
            self.tallies[cpu] = PerfTally()
            self._spawn(cpu, self._step(cpu, batch), pause)

    def _step(self, cpu: int, batch: int) -> Callable[[], None]:
        tally = self.tallies[cpu]

        def step() -> None:
            out = self.perf_producer.output(batch, self.sizes, cpu=cpu)
            tally.attempted += out.count
            tally.produced += out.produced
            tally.failed += out.failed

        return step

    def flush(self) -> None:
        """One more sample per CPU: the kernel writes a pending lost count before the next sample
        that fits, so after a drain this makes every lost sample reported."""
        for cpu, tally in self.tallies.items():
            out = self.perf_producer.output(1, self.sizes, cpu=cpu)
            assert out.produced == 1, f"cpu {cpu}: the flush sample did not fit in a drained ring"
            tally.attempted += 1
            tally.produced += 1

    def total(self, name: str) -> int:
        return sum(getattr(t, name) for t in self.tallies.values())


@dataclass
class PerfChecker:
    """Every delivered sample: intact, never twice, in its CPU's order; lost counts per CPU."""

    producers: PerfProducers
    last: dict[int, int] = field(default_factory=lambda: defaultdict(lambda: -1))
    count: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    lost: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def delivered(self) -> int:
        return sum(self.count.values())

    def sample(self, cpu: int, data: bytes) -> None:
        seq, producer, size = parse(data)
        assert producer == cpu, f"a sample of cpu {producer} arrived in the ring of cpu {cpu}"
        want = record_size(seq, *self.producers.sizes)
        assert size == want and len(data) == padded_size(want), f"cpu {cpu} sample {seq}: wrong size"
        assert data[:want] == expected_record(seq, cpu, want), f"cpu {cpu} sample {seq} corrupt"
        assert seq > self.last[cpu], f"cpu {cpu}: seq {seq} after {self.last[cpu]} (repeated or out of order)"
        self.last[cpu] = seq
        self.count[cpu] += 1

    def samples(self, pairs: Iterable[tuple[int, bytes]]) -> None:
        for cpu, data in pairs:
            self.sample(cpu, data)

    def lose(self, cpu: int, lost: int) -> None:
        self.lost[cpu] += lost

    def check_totals(self) -> None:
        """After flush() and the final drain: delivered == produced and lost == failed, per CPU."""
        for cpu, t in self.producers.tallies.items():
            assert t.produced + t.failed == t.attempted, f"cpu {cpu}: the BPF side lost count"
            assert self.count[cpu] == t.produced, f"cpu {cpu}: {self.count[cpu]} delivered, {t.produced} produced"
            assert self.lost[cpu] == t.failed, f"cpu {cpu}: {self.lost[cpu]} reported lost, {t.failed} failed"

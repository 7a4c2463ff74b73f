"""The kernel benchmark's workload: producer processes calling getpgid(), a BPF program writing
batch_cnt 8-byte records per call (bench_workload.bpf.c), one scenario per channel and mode.

tools/testing/selftests/bpf/benchs/bench_ringbufs.c runs producer threads in C; Python threads
would share the GIL with the consumer, so producers here are forked processes, each pinned to a
CPU, looping on os.getpgid() (the per-call Python overhead is some 100 ns against ~40 us of
records). The program only writes for tgids in its `producers` map.
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import time
from dataclasses import dataclass
from typing import Any

from .. import features
from ..objects import Object, bundled_object

# struct bench_settings of bench_workload.bpf.c: batch_cnt, use_output, wakeup_data_size, ts_every, pad
SETTINGS = struct.Struct("<IIQII")
COUNTERS = struct.Struct("<Q120xQ120x")  # struct bench_counters: produced, dropped on their own lines
RECORD_SIZE = 8
RECORD_STRIDE = 16  # the kernel bench: "record data + header take 16 bytes"

PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h

# The kernel bench's defaults.
BATCH_CNT = 500
RINGBUF_SZ = 512 * 1024
PERFBUF_PAGES = 128
SAMPLE_RATE = 500  # records per wakeup in the sampled modes


@dataclass(frozen=True)
class Scenario:
    """A channel and notification mode, and how hard the producers push."""

    name: str
    channel: str  # "ringbuf" or "perfbuf"
    mode: str  # what the table shows
    use_output: bool = False
    wakeup_data_size: int = 0  # ringbuf sampled: bytes waiting before BPF_RB_FORCE_WAKEUP
    wakeup_events: int = 1  # perfbuf
    batch_cnt: int = BATCH_CNT
    calls_per_s: float = 0.0  # per producer; 0: flat out, as the kernel bench
    ringbuf_sz: int = RINGBUF_SZ
    perfbuf_pages: int = PERFBUF_PAGES

    @property
    def paced(self) -> bool:
        return self.calls_per_s > 0

    def describe(self) -> dict:
        return self.__dict__ | {"paced": self.paced}


def scenarios(
    batch_cnt: int = BATCH_CNT,
    sample_rate: int = SAMPLE_RATE,
    ringbuf_sz: int = RINGBUF_SZ,
    perfbuf_pages: int = PERFBUF_PAGES,
    paced_calls: float = 1000.0,
    paced_batch: int = 10,
) -> list[Scenario]:
    """Flat out (the kernel bench's workload) in every mode, then a paced load for latency."""
    common = dict(ringbuf_sz=ringbuf_sz, perfbuf_pages=perfbuf_pages)
    sampled = sample_rate * RECORD_STRIDE
    flat = [
        Scenario("rb-reserve", "ringbuf", "reserve/submit, adaptive", batch_cnt=batch_cnt, **common),
        Scenario("rb-output", "ringbuf", "output, adaptive", use_output=True, batch_cnt=batch_cnt, **common),
        Scenario(
            "rb-sampled",
            "ringbuf",
            f"reserve/submit, sampled {sampled} B",
            wakeup_data_size=sampled,
            batch_cnt=batch_cnt,
            **common,
        ),
        Scenario("pb-1", "perfbuf", "wakeup_events=1", batch_cnt=batch_cnt, **common),
        Scenario(
            f"pb-{sample_rate}",
            "perfbuf",
            f"wakeup_events={sample_rate}",
            wakeup_events=sample_rate,
            batch_cnt=batch_cnt,
            **common,
        ),
    ]
    paced = dict(batch_cnt=paced_batch, calls_per_s=paced_calls, **common)
    slow = [
        Scenario("paced-rb-reserve", "ringbuf", "reserve/submit, adaptive", **paced),
        Scenario(
            "paced-rb-sampled", "ringbuf", f"reserve/submit, sampled {sampled} B", wakeup_data_size=sampled, **paced
        ),
        Scenario("paced-pb-1", "perfbuf", "wakeup_events=1", **paced),
        Scenario(
            f"paced-pb-{sample_rate}", "perfbuf", f"wakeup_events={sample_rate}", wakeup_events=sample_rate, **paced
        ),
    ]
    return flat + slow


def _section_map(obj: Object, section: str) -> str:
    """libbpf names global-data maps after a truncated object name: find ``*.rodata``/``*.bss``."""
    names = [n for n in obj.map_names if n.endswith(section)]
    if len(names) != 1:
        raise RuntimeError(f"bench_workload.bpf.o: expected one {section} map, found {names}")
    return names[0]


class Workload:
    """bench_workload.bpf.o loaded and attached for one scenario; shared by its consumer runs."""

    def __init__(self, scenario: Scenario) -> None:
        features.require(features.BPF_LOOP)  # each batch runs under bpf_loop()
        self.scenario = scenario
        self.obj = Object(bundled_object("bench_workload"))
        try:
            prog = "bench_ringbuf" if scenario.channel == "ringbuf" else "bench_perfbuf"
            for p in self.obj.programs:
                p.autoload = p.name in (prog, "wake_consumer")
            rodata = _section_map(self.obj, ".rodata")
            if len(self.obj.initial_value(rodata)) != SETTINGS.size:
                raise RuntimeError("bench_workload.bpf.o's .rodata is not struct bench_settings: rebuild bpfring")
            settings = SETTINGS.pack(scenario.batch_cnt, int(scenario.use_output), scenario.wakeup_data_size, 64, 0)
            self.obj.set_initial_value(rodata, settings)
            # The ring exists in both channels (one object); a perfbuf run keeps it small.
            self.obj.set_max_entries("ringbuf", scenario.ringbuf_sz if scenario.channel == "ringbuf" else 4096)
            self.obj.load()
            self.obj.program(prog).attach()
            self.bss = self.obj.map(".bss")
            self.producers = self.obj.map("producers")
        except BaseException:
            self.obj.close()
            raise

    @property
    def map(self):
        return self.obj.map(self.scenario.channel)

    def counters(self) -> tuple[int, int]:
        """(produced, dropped) since the last reset."""
        return COUNTERS.unpack(self.bss.lookup(bytes(4))[: COUNTERS.size])

    def reset(self) -> None:
        self.bss.update(bytes(4), bytes(len(self.bss.lookup(bytes(4)))))

    def wake(self) -> None:
        """Force a wakeup with a discarded record: the sampled mode leaves the run's tail without one."""
        if self.scenario.channel == "ringbuf":
            self.obj.program("wake_consumer").test_run()

    def close(self) -> None:
        self.obj.close()


def _produce(cpu: int, calls_per_s: float, go: int) -> None:
    """A producer process: pinned, waits for the start, then calls getpgid() until killed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the benchmark's to handle
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # never outlive the benchmark
    os.sched_setaffinity(0, {cpu})
    if os.read(go, 1) != b"g" or os.getppid() == 1:
        return
    getpgid = os.getpgid
    if calls_per_s <= 0:
        while True:
            getpgid(0)
    interval = 1.0 / calls_per_s
    monotonic, sleep = time.monotonic, time.sleep
    due = monotonic()
    while True:
        getpgid(0)
        due += interval
        wait = due - monotonic()
        if wait > 0:
            sleep(wait)


class Producers:
    """``count`` producer processes, producer i pinned to CPU i (modulo the CPUs we may use).

    Forked and registered in the program's ``producers`` map before the clock starts; ``go()``
    releases them, ``stop()`` kills them (SIGKILL: nothing of theirs needs cleaning up).
    """

    def __init__(self, workload: Workload, count: int, cpus: list[int], registry: Any = None) -> None:
        self.pids: list[int] = []
        self._workload = workload
        self._registry = registry if registry is not None else workload.producers  # the program's tgid map
        r, self._go = os.pipe()
        try:
            for i in range(count):
                pid = os.fork()
                if pid == 0:
                    try:
                        os.close(self._go)
                        _produce(cpus[i % len(cpus)], workload.scenario.calls_per_s, r)
                    finally:
                        os._exit(1)
                self.pids.append(pid)
                self._registry.update(struct.pack("<I", pid), b"\1")
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(r)

    def go(self) -> None:
        os.write(self._go, b"g" * len(self.pids))

    def stop(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in self.pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            try:
                self._registry.delete(struct.pack("<I", pid))
            except OSError:
                pass
        self.pids.clear()
        if self._go >= 0:
            os.close(self._go)
            self._go = -1

    def __enter__(self) -> Producers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

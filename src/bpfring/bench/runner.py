"""One consumer on one scenario: set up, start the producers, run to the deadline, stop them,
drain, and check that every record produced was counted and the ring is empty.

The consumer's clock runs from the producers' start to the end of its drain: its rate and CPU %
cover every record it counted, those it drained after the producers stopped included. The
producers' rates (attempted, dropped) are over their own run, start to stop.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..ringbuf import Ring
from .consumers import Consumer, now_ns
from .workload import Producers, Scenario, Workload


@dataclass
class Outcome:
    """The raw figures of one run (status "ok"), or why it did not run ("skipped: ...", "n/a: ...")."""

    scenario: str
    consumer: str
    producers: int
    status: str = "ok"
    seconds: float = 0.0  # the producers' run: start to stop
    consumer_seconds: float = 0.0  # the consumer's: the producers' start to the end of its drain
    produced: int = 0  # records the BPF program wrote
    dropped: int = 0  # records it had no room for
    consumed: int = 0  # records the consumer counted
    cpu_s: float = 0.0  # the consumer's user + system time over consumer_seconds
    latency_us: dict = field(default_factory=dict)  # p50, p90, p99, max, n (sampled records)
    ratio: Optional[float] = None  # consumer rate / libbpf-c's, same scenario and producers

    @property
    def ran(self) -> bool:
        return self.status == "ok"

    @property
    def producer_rate(self) -> float:
        """Records the producers attempted per second (written or dropped)."""
        return (self.produced + self.dropped) / self.seconds if self.seconds else 0.0

    @property
    def consumer_rate(self) -> float:
        """Records counted per second of the consumer's clock (which covers its drain)."""
        return self.consumed / self.consumer_seconds if self.consumer_seconds else 0.0

    @property
    def drop_rate(self) -> float:
        return self.dropped / self.seconds if self.seconds else 0.0

    @property
    def cpu_share(self) -> float:
        """The consumer's CPU time over its wall time, drain included (1.0: one CPU busy)."""
        return self.cpu_s / self.consumer_seconds if self.consumer_seconds else 0.0

    def as_json(self) -> dict:
        return self.__dict__ | {
            "producer_rate": self.producer_rate,
            "consumer_rate": self.consumer_rate,
            "drop_rate": self.drop_rate,
            "cpu_share": self.cpu_share,
        }


def latency_summary(lat_ns: np.ndarray) -> dict:
    if not len(lat_ns):
        return {"n": 0}
    p50, p90, p99 = np.percentile(lat_ns, [50, 90, 99]) / 1000
    return {
        "n": int(len(lat_ns)),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(lat_ns.max()) / 1000,
    }


def placement(producers: int, cpus: list[int]) -> tuple[list[int], Optional[set[int]]]:
    """Producer i on CPU i; the consumer on the CPUs left, or unpinned when there are none left
    (the kernel bench's layout; on 2 CPUs, 2 producers share a CPU with the consumer)."""
    if producers < len(cpus):
        return cpus[:producers], set(cpus[producers:])
    return cpus, None


INTERRUPTED = threading.Event()
_active: list[Callable[[], None]] = []  # the stop() of the run in progress


def interrupt(signum: int, frame: object) -> None:
    """SIGINT: stop the run in progress (its consumer then returns), else raise KeyboardInterrupt.

    A KeyboardInterrupt raised inside a ctypes callback would be printed and ignored, and one
    raised inside a consumer could leave records uncounted; stopping the producers ends every
    consumer cleanly, and the run is then discarded.
    """
    INTERRUPTED.set()
    if _active:
        threading.Thread(target=_active[0], daemon=True).start()
    else:
        raise KeyboardInterrupt


def _thread_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_THREAD)
    return ru.ru_utime + ru.ru_stime


def measure(wl: Workload, consumer: Consumer, producers: int, seconds: float, cpus: list[int]) -> Outcome:
    s: Scenario = wl.scenario
    wl.reset()
    producer_cpus, consumer_cpus = placement(producers, cpus)
    saved = os.sched_getaffinity(0)
    if consumer_cpus:
        os.sched_setaffinity(0, consumer_cpus)
    try:
        session = consumer.open(wl)  # before the clock: mapping and set-up are not measured
        watch = None
        try:
            if s.channel == "ringbuf" and session.owns_workload_ring:
                watch = Ring(wl.map, _never, shared=True)  # never consumes: is the ring empty once the consumer is done?
            registry = session.producers_map or wl.producers
            with Producers(wl, producers, producer_cpus, registry) as prod:
                ended: list[float] = []
                stopped = threading.Event()
                once = threading.Lock()

                def stop() -> None:
                    with once:
                        if stopped.is_set():
                            return
                        prod.stop()
                        ended.append(time.perf_counter())
                        wl.wake()
                        stopped.set()

                # Another thread stops the producers: a consumer behind does not return from its
                # poll while records keep coming. Ctrl-C stops them too (see interrupt()).
                timer = threading.Timer(seconds, stop)
                timer.daemon = True
                cpu0 = _thread_cpu()
                t0 = time.perf_counter()
                session.deadline_ns = now_ns() + int(seconds * 1e9)
                prod.go()
                timer.start()
                _active.append(stop)
                try:
                    session.run(stopped)  # returns once it has drained what the producers left
                    done = time.perf_counter()
                    cpu = _thread_cpu() - cpu0
                finally:
                    _active.clear()
                    timer.cancel()
                    timer.join()
                if INTERRUPTED.is_set():
                    raise KeyboardInterrupt
            count, lat = session.result()
            if session.cpu_s is not None:
                cpu = session.cpu_s
            left = watch.avail_data_size if watch is not None else 0
            counters = session.counters()
        finally:
            if watch is not None:
                watch.close()
            session.close()
    finally:
        os.sched_setaffinity(0, saved)
    produced, dropped = counters if counters is not None else wl.counters()
    out = Outcome(
        s.name,
        consumer.name,
        producers,
        seconds=ended[0] - t0,
        consumer_seconds=done - t0,
        produced=produced,
        dropped=dropped,
        consumed=count,
        cpu_s=cpu,
        latency_us=latency_summary(lat),
    )
    if count != produced:
        out.status = f"failed: counted {count} records, the program wrote {produced}"
    elif left:
        out.status = f"failed: {left} bytes were left in the ring after the drain"
    return out


def _never(data: bytes) -> None:
    raise AssertionError("the watching ring never consumes")


def run_scenario(
    scenario: Scenario,
    consumers: list[Consumer],
    producer_counts: list[int],
    seconds: float,
    cpus: list[int],
    outcomes: list[Outcome],
    progress: Callable[[str], None],
) -> None:
    """Every consumer, for each producer count, on one loaded program; appends to ``outcomes``."""
    wl = Workload(scenario)
    try:
        for producers in producer_counts:
            for consumer in consumers:
                progress(f"{scenario.name}, {producers} producer{'s' if producers > 1 else ''}: {consumer.name}")
                reason = consumer.unsupported(scenario)
                if reason:
                    outcomes.append(Outcome(scenario.name, consumer.name, producers, status=reason))
                    continue
                try:
                    outcomes.append(measure(wl, consumer, producers, seconds, cpus))
                except Exception as exc:  # one consumer failing does not end the benchmark
                    if INTERRUPTED.is_set():  # Ctrl-C made it fail (libbpf's poll: EINTR): discard the run
                        raise KeyboardInterrupt from exc
                    outcomes.append(Outcome(scenario.name, consumer.name, producers, status=f"failed: {exc}"))
        fill_ratios(outcomes)
    finally:
        wl.close()


BASELINE = "libbpf-c"


def fill_ratios(outcomes: list[Outcome]) -> None:
    base = {(o.scenario, o.producers): o.consumer_rate for o in outcomes if o.consumer == BASELINE and o.ran}
    for o in outcomes:
        b = base.get((o.scenario, o.producers))
        o.ratio = o.consumer_rate / b if o.ran and b else None

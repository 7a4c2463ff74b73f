"""Stress: a producer on every CPU against every kind of PerfBuffer consumer, each CPU's ring lapped
at least MIN_LAPS times. Per run and per CPU, delivered == produced and reported lost == failed
outputs; no sample twice, none corrupt, each CPU's samples in order."""

from __future__ import annotations

import asyncio
import select
import time
from typing import Callable

from perf_producer import padded_size, record_bytes
from producer import parse

from bpfring import PerfBuffer
from stress.harness import MIN_LAPS, Deadline, PerfChecker, PerfProducers, report

PAGE_CNT = 1  # one 4 KiB page per CPU: samples of 16..1000 bytes, about 8 a lap


class Laps:
    """Bytes of ring each CPU's delivered samples took, from the samples themselves (public API)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.bytes: dict[int, int] = {}

    def add(self, cpu: int, data: bytes) -> None:
        self.bytes[cpu] = self.bytes.get(cpu, 0) + record_bytes(parse(data)[2])

    def fewest(self, cpus: list[int]) -> int:
        return min(self.bytes.get(cpu, 0) for cpu in cpus) // self.size


def run_perf(
    name: str,
    pb: PerfBuffer,
    producers: PerfProducers,
    checker: PerfChecker,
    laps: Laps,
    step: Callable[[], None],
    seconds: float,
) -> None:
    """Consume while the producers run (MIN_LAPS laps of every CPU's ring and ``seconds``), stop
    them, drain, flush the pending lost counts, drain again, and check the accounting."""
    cpus = list(producers.tallies)
    start = time.monotonic()
    deadline = Deadline(
        seconds, name, lambda: f"(delivered {checker.delivered} of {producers.total('produced')} produced, "
        f"{laps.fewest(cpus)} laps)", progress=lambda: checker.delivered,
    )
    with producers:
        while laps.fewest(cpus) < MIN_LAPS or time.monotonic() - start < seconds:
            deadline.check()
            step()
    for _ in range(2):  # before and after the flush samples
        while checker.delivered < producers.total("produced"):
            deadline.check()
            step()
        if _ == 0:
            producers.flush()
    step()  # nothing more comes: check_totals below fails on a sample delivered past the produced ones
    checker.check_totals()
    report(
        name,
        records=checker.delivered,
        laps=laps.fewest(cpus),
        lost=sum(checker.lost.values()),
        attempted=producers.total("attempted"),
        cpus=len(cpus),
        seconds=round(time.monotonic() - start, 1),
    )


def test_sample_callbacks_get_every_sample_once_and_lost_counts_add_up(perf_producer, stress_seconds):
    producers = PerfProducers(perf_producer)
    checker = PerfChecker(producers)
    laps = Laps(PAGE_CNT * 4096)

    def sample(cpu: int, data: bytes) -> None:
        checker.sample(cpu, data)
        laps.add(cpu, data)

    with PerfBuffer(perf_producer.array, PAGE_CNT, sample, checker.lose) as pb:
        run_perf("perfbuf callback", pb, producers, checker, laps, lambda: pb.poll(100), stress_seconds)


def test_consume_batch_gets_every_sample_once_and_lost_counts_add_up(perf_producer, stress_seconds):
    producers = PerfProducers(perf_producer)
    checker = PerfChecker(producers)
    laps = Laps(PAGE_CNT * 4096)

    def step() -> None:
        select.select([pb.fileno()], [], [], 0.1)
        cpus, samples = pb.consume_batch(with_cpus=True)
        assert len(cpus) == len(samples)
        for cpu, data in zip(cpus, samples):
            checker.sample(cpu, data)
            laps.add(cpu, data)

    with PerfBuffer(perf_producer.array, PAGE_CNT, None, checker.lose) as pb:
        run_perf("perfbuf consume_batch()", pb, producers, checker, laps, step, stress_seconds)


def test_consume_batch_with_a_dtype_gets_every_sample_once_and_lost_counts_add_up(perf_producer, stress_seconds):
    size = 40  # the kernel pads it to 44 bytes; a dtype batch drops the padding
    producers = PerfProducers(perf_producer, sizes=(size, size))
    checker = PerfChecker(producers)
    laps = Laps(PAGE_CNT * 4096)
    padding = bytes(padded_size(size) - size)

    def step() -> None:
        select.select([pb.fileno()], [], [], 0.1)
        cpus, records = pb.consume_batch(f"V{size}", with_cpus=True)
        assert len(cpus) == len(records) and records.dtype.itemsize == size
        for cpu, record in zip(cpus.tolist(), records):
            data = record.tobytes() + padding
            checker.sample(cpu, data)
            laps.add(cpu, data)

    with PerfBuffer(perf_producer.array, PAGE_CNT, None, checker.lose) as pb:
        run_perf("perfbuf consume_batch(dtype)", pb, producers, checker, laps, step, stress_seconds)


def test_async_for_gets_every_sample_once_and_lost_counts_add_up(perf_producer, stress_seconds):
    producers = PerfProducers(perf_producer)
    checker = PerfChecker(producers)
    laps = Laps(PAGE_CNT * 4096)

    def never(cpu: int, data: bytes) -> None:
        raise AssertionError("async iteration does not call sample_cb")

    async def chunk() -> None:
        n = 0
        async for cpu, data in pb.records(interval=0.05):
            checker.sample(cpu, data)
            laps.add(cpu, data)
            n += 1
            if n >= 100:
                break

    async def until_quiet() -> None:
        try:
            await asyncio.wait_for(chunk(), 0.5)  # cancelled mid-wait: loses nothing
        except asyncio.TimeoutError:
            pass

    with PerfBuffer(perf_producer.array, PAGE_CNT, never, checker.lose) as pb:
        loop = asyncio.new_event_loop()
        try:
            run_perf(
                "perfbuf async for",
                pb,
                producers,
                checker,
                laps,
                lambda: loop.run_until_complete(until_quiet()),
                stress_seconds,
            )
        finally:
            loop.close()

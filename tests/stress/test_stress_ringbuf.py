"""Stress: producers on every CPU against every kind of RingBuffer consumer, the ring lapped at least
MIN_LAPS times. Per run, committed == delivered and committed + discarded + dropped == attempted,
per producer; no record twice, none corrupt, each producer's records in order."""

from __future__ import annotations

import asyncio
import random
import select
import time
from typing import Callable

import pytest

from bpfring import RingBuffer
from stress.harness import FIXED, MIN_LAPS, Deadline, RingChecker, RingProducers, report

VARIABLE_RING = 16 * 1024  # records of 16..1000 bytes: about 30 a lap
FIXED_RING = 8 * 1024  # 72-byte slots: about 110 a lap


def never(data: bytes) -> None:
    raise AssertionError("this consumer does not use the callback")


def wait_readable(rb: RingBuffer, timeout: float = 0.1) -> None:
    """What an event loop does with fileno() before a callback-less consume_batch()."""
    select.select([rb.fileno()], [], [], timeout)


def run_ring(
    name: str,
    rb: RingBuffer,
    producers: RingProducers,
    checker: RingChecker,
    step: Callable[[], None],
    seconds: float,
) -> None:
    """Consume with ``step`` while the producers run, until MIN_LAPS laps and ``seconds`` have
    passed; then stop them, drain with ``step`` until every committed record is delivered, and check
    the accounting."""
    ring = rb.rings[0]
    start = time.monotonic()
    deadline = Deadline(
        seconds, name, lambda: f"(delivered {checker.delivered} of {producers.total('produced')} produced, "
        f"{ring.consumer_pos // ring.size} laps)", progress=lambda: checker.delivered,
    )
    with producers:
        while ring.consumer_pos < MIN_LAPS * ring.size or time.monotonic() - start < seconds:
            deadline.check()
            step()
    while checker.delivered < producers.total("produced"):
        deadline.check()
        step()
    step()  # nothing more comes
    assert ring.avail_data_size == 0
    checker.check_totals()
    report(
        name,
        records=checker.delivered,
        laps=ring.consumer_pos // ring.size,
        dropped=producers.total("dropped"),
        discarded=producers.total("discarded"),
        attempted=producers.total("attempted"),
        seconds=round(time.monotonic() - start, 1),
    )


def test_callback_consumer_delivers_every_committed_record_once_in_order(make_producer, stress_seconds):
    producer = make_producer(ring_size=VARIABLE_RING)
    producers = RingProducers(producer)
    checker = RingChecker(producers)
    got: list[bytes] = []

    def step() -> None:
        rb.poll(100)
        checker.records(got)
        got.clear()

    with RingBuffer(producer.ring, got.append) as rb:
        run_ring("ringbuf callback", rb, producers, checker, step, stress_seconds)


def test_consume_batch_of_bytes_delivers_every_committed_record_once_in_order(make_producer, stress_seconds):
    producer = make_producer(ring_size=VARIABLE_RING)
    producers = RingProducers(producer)
    checker = RingChecker(producers)
    rng = random.Random(1)

    def step() -> None:
        wait_readable(rb)
        checker.records(rb.consume_batch(max_records=rng.choice([None, 1, 7, 100])))

    with RingBuffer(producer.ring, never) as rb:
        run_ring("ringbuf consume_batch()", rb, producers, checker, step, stress_seconds)


def test_consume_batch_with_a_dtype_delivers_every_committed_record_once_in_order(make_producer, stress_seconds):
    import numpy as np

    producer = make_producer(ring_size=FIXED_RING)
    producers = RingProducers(producer, fixed=True)
    checker = RingChecker(producers)
    rng = random.Random(2)
    out = np.empty(50, dtype=FIXED)

    def step() -> None:
        wait_readable(rb)
        if rng.random() < 0.5:
            checker.fixed(rb.consume_batch(FIXED, max_records=rng.choice([None, 1, 13])))
        else:  # into a reused array
            checker.fixed(rb.consume_batch(FIXED, out=out).copy())

    with RingBuffer(producer.ring, never) as rb:
        run_ring("ringbuf consume_batch(dtype)", rb, producers, checker, step, stress_seconds)


def test_zero_copy_batches_see_every_committed_record_once_intact(make_producer, stress_seconds):
    producer = make_producer(ring_size=FIXED_RING)
    # a view cannot skip a discarded record, so each batch ends at one: fewer of them here
    producers = RingProducers(producer, fixed=True, discard_every=50)
    checker = RingChecker(producers)
    rng = random.Random(3)

    def step() -> None:
        wait_readable(rb)
        # checked inside the block: the records are reserved, producers can't overwrite them
        with rb.batch(FIXED, max_records=rng.choice([None, 1, 10])) as view:
            checker.fixed(view)

    with RingBuffer(producer.ring, never) as rb:
        run_ring("ringbuf batch() zero-copy", rb, producers, checker, step, stress_seconds)


def test_async_records_deliver_every_committed_record_once_in_order(make_producer, stress_seconds):
    producer = make_producer(ring_size=VARIABLE_RING)
    producers = RingProducers(producer)
    checker = RingChecker(producers)

    async def step_async(rb: RingBuffer) -> None:
        # one iteration for a while, then leave it: records taken but not yielded wait for the next
        n = 0
        async for record in rb.records(interval=0.05):
            checker.records([record])
            n += 1
            if n >= 200:
                break
        else:
            pytest.fail("records() ended although the RingBuffer is open")

    with RingBuffer(producer.ring, never) as rb:
        loop = asyncio.new_event_loop()
        try:

            def step() -> None:
                loop.run_until_complete(_until_quiet(step_async(rb)))

            run_ring("ringbuf async for", rb, producers, checker, step, stress_seconds)
        finally:
            loop.close()


async def _until_quiet(coro) -> None:
    """Run one iteration chunk, but give up waiting once no record has come for a moment: the
    drain phase has nothing left to wait for."""
    try:
        await asyncio.wait_for(coro, 0.5)
    except asyncio.TimeoutError:
        pass


def test_async_batches_deliver_every_committed_record_once_in_order(make_producer, stress_seconds):
    producer = make_producer(ring_size=FIXED_RING)
    producers = RingProducers(producer, fixed=True)
    checker = RingChecker(producers)

    async def step_async(rb: RingBuffer) -> None:
        n = 0
        async for records in rb.batches(FIXED, interval=0.05):
            checker.fixed(records)
            n += 1
            if n >= 20:
                break

    with RingBuffer(producer.ring, never) as rb:
        loop = asyncio.new_event_loop()
        try:

            def step() -> None:
                loop.run_until_complete(_until_quiet(step_async(rb)))

            run_ring("ringbuf async batches(dtype)", rb, producers, checker, step, stress_seconds)
        finally:
            loop.close()

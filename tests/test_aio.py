"""asyncio: async iteration over RingBuffer and PerfBuffer, and cancellation that loses nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from producer import expected_fixed, expected_record, parse

import bpfring
from bpfring import BPF_RB_NO_WAKEUP, PerfBuffer, RingBuffer

FIXED = np.dtype([("seq", "<u8"), ("producer", "<u4"), ("size", "<u4"), ("payload", "u1", (48,))])


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def never(data: bytes) -> None:
    raise AssertionError("async iteration does not call the callback")


def test_async_for_delivers_records_produced_while_it_waits(producer):
    async def main() -> list[bytes]:
        got: list[bytes] = []
        loop = asyncio.get_running_loop()
        with RingBuffer(producer.ring, never) as rb:
            loop.call_later(0.1, producer.produce, 30, 40)  # the iteration is already waiting
            async for record in rb:
                got.append(record)
                if len(got) == 30:
                    break
        return got

    got = run(main())
    assert got == [expected_record(i, 0, 40) for i in range(30)]


def test_async_for_bytes_stay_intact_after_their_ring_space_is_overwritten(producer):
    async def main() -> list[bytes]:
        got: list[bytes] = []
        with RingBuffer(producer.ring, never) as rb:
            ring = rb.rings[0]
            producer.produce(100, 40)
            start = ring.consumer_pos
            async for record in rb:
                got.append(record)
                if len(got) == 100:
                    break
            while ring.consumer_pos < start + 2 * ring.size:  # the ring lapped twice over their space
                producer.produce(100, 40, producer=7)
                assert len(rb.consume_batch()) == 100
        return got

    got = run(main())
    assert all(type(g) is bytes for g in got)
    assert got == [expected_record(i, 0, 40) for i in range(100)]


def test_cancelling_mid_stream_loses_and_repeats_nothing(producer):
    async def main() -> list[bytes]:
        got: list[bytes] = []
        with RingBuffer(producer.ring, never) as rb:
            producer.produce(100, 24)

            async def reader() -> None:
                async for record in rb:
                    got.append(record)
                    await asyncio.sleep(0)  # a point where cancellation can land

            task = asyncio.create_task(reader())
            while len(got) < 30:
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert len(got) < 100 and rb.rings[0].avail_data_size == 0  # the rest was taken, not yielded
            producer.produce(10, 24)
            async for record in rb.records():  # a new iteration picks up where the last stopped
                got.append(record)
                if len(got) == 110:
                    break
        return got

    got = run(main())
    assert [parse(g)[0] for g in got] == list(range(110))
    assert got == [expected_record(i, 0, 24) for i in range(110)]


def test_async_batches_with_a_dtype(producer):
    async def main() -> np.ndarray:
        parts = []
        with RingBuffer(producer.ring, never) as rb:
            asyncio.get_running_loop().call_later(0.05, lambda: producer.produce(50, fixed=True))
            async for batch in rb.batches(FIXED):
                parts.append(batch)
                if sum(map(len, parts)) == 50:
                    break
        return np.concatenate(parts)

    records = run(main())
    assert records.tobytes() == b"".join(expected_fixed(i, 0) for i in range(50))


def test_two_tasks_waiting_on_one_buffer_are_both_woken(producer):
    """Each waiting iteration must be woken by new data, not only the one that waited last."""

    async def main() -> tuple[list[bytes], list[bytes]]:
        firsts: list[bytes] = []
        seconds: list[bytes] = []
        with RingBuffer(producer.ring, never) as rb:

            async def take(into: list[bytes]) -> None:
                async for batch in rb.batches():
                    into.extend(batch)
                    return  # one batch each

            a = asyncio.create_task(take(firsts))
            b = asyncio.create_task(take(seconds))
            await asyncio.sleep(0.1)  # both waiting on the event loop
            producer.produce(5, 24)  # one of them takes these...
            done, pending = await asyncio.wait({a, b}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
            assert done, "neither waiting iteration was woken by new data"
            producer.produce(5, 24)  # ...and the other, still waiting, these
            done, pending = await asyncio.wait(pending, timeout=5)
            for task in pending:
                task.cancel()
            assert not pending, "the other waiting iteration was not woken by new data"
        return firsts, seconds

    firsts, seconds = run(main())
    assert sorted(firsts + seconds) == sorted(expected_record(i, 0, 24) for i in range(10))


def test_interval_drains_no_wakeup_records(producer):
    """Records committed with BPF_RB_NO_WAKEUP while the iteration already waits: with
    ``interval`` they arrive; without it, none arrives in the same time (no wakeup ever comes)."""

    async def take(interval: float | None) -> list[bytes]:
        got: list[bytes] = []
        loop = asyncio.get_running_loop()
        with RingBuffer(producer.ring, never) as rb:
            rb.poll(0)

            async def read() -> None:
                async for record in rb.records(interval=interval):
                    got.append(record)
                    if len(got) == 5:
                        return

            # Produced once the iteration has looked at the ring and is waiting.
            loop.call_later(0.2, lambda: producer.produce(5, 16, flags=BPF_RB_NO_WAKEUP))
            try:
                await asyncio.wait_for(read(), 2.0)
            except asyncio.TimeoutError:
                pass
            assert rb.rings[0].avail_data_size == (5 - len(got)) * 24  # 16 bytes + header each: the rest is still there
        return got

    with_interval = run(take(0.05))
    assert with_interval == [expected_record(i, 0, 16) for i in range(5)]
    assert run(take(None)) == [], "records committed with BPF_RB_NO_WAKEUP woke the iteration"


def test_close_ends_the_iteration(producer):
    async def main() -> str:
        rb = RingBuffer(producer.ring, never)

        async def reader() -> str:
            async for _ in rb:
                pass
            return "ended"

        task = asyncio.create_task(reader())
        await asyncio.sleep(0.1)
        rb.close()
        return await task

    assert run(main()) == "ended"


def test_perf_buffer_async_for_with_cancellation(perf_producer):
    async def main() -> list[tuple[int, bytes]]:
        got: list[tuple[int, bytes]] = []
        with PerfBuffer(perf_producer.array, 8, cpus=[0]) as pb:
            perf_producer.output(60, 20, cpu=0)

            async def reader() -> None:
                async for sample in pb:
                    got.append(sample)
                    await asyncio.sleep(0)

            task = asyncio.create_task(reader())
            while len(got) < 20:
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            async for sample in pb.records():
                got.append(sample)
                if len(got) == 60:
                    break
        return got

    got = run(main())
    assert [cpu for cpu, _ in got] == [0] * 60
    assert [parse(data)[0] for _, data in got] == list(range(60))


def test_perf_buffer_async_batches_with_cpus(perf_producer):
    dtype = np.dtype([("seq", "<u8"), ("producer", "<u4"), ("size", "<u4"), ("tail", "u1", (4,))])

    async def main() -> tuple[list[int], np.ndarray]:
        cpus: list[int] = []
        parts = []
        with PerfBuffer(perf_producer.array, 8, cpus=[0]) as pb:
            asyncio.get_running_loop().call_later(0.05, lambda: perf_producer.output(25, 20, cpu=0))
            async for got_cpus, records in pb.batches(dtype, with_cpus=True, interval=0.05):
                cpus.extend(got_cpus.tolist())
                parts.append(records)
                if len(cpus) == 25:
                    break
        return cpus, np.concatenate(parts)

    cpus, records = run(main())
    assert cpus == [0] * 25
    assert records["seq"].tolist() == list(range(25))


# -- one holder for what was taken: iterations and batch calls hand over to each other ----------


@pytest.mark.parametrize("dtype", [None, FIXED], ids=["bytes", "dtype"])
def test_records_an_iteration_took_but_did_not_yield_come_first_from_the_next_batch_call(producer, dtype):
    """An iteration left after 30 records has taken all 100 from the ring: the other 70 are the
    next batch call's, in order, once; then the ring's new records follow."""

    async def main() -> tuple[list[bytes], Any, Any]:
        got: list[bytes] = []
        with RingBuffer(producer.ring, never) as rb:
            producer.produce(100, fixed=True)
            async for record in rb:
                got.append(record)
                if len(got) == 30:
                    break
            assert rb.rings[0].avail_data_size == 0  # the other 70 left the ring with the first 30
            rest = rb.consume_batch(dtype)
            producer.produce(10, fixed=True, producer=1)
            return got, rest, rb.consume_batch(dtype)

    got, rest, new = run(main())
    assert got == [expected_fixed(i, 0) for i in range(30)]
    as_bytes = (lambda r: list(r)) if dtype is None else (lambda r: [row.tobytes() for row in r])
    assert as_bytes(rest) == [expected_fixed(i, 0) for i in range(30, 100)]
    assert as_bytes(new) == [expected_fixed(i, 1) for i in range(10)]


def test_samples_an_iteration_took_but_did_not_yield_come_first_from_the_next_batch_call(perf_producer):
    async def main() -> tuple[list[tuple[int, bytes]], Any]:
        got: list[tuple[int, bytes]] = []
        with PerfBuffer(perf_producer.array, 8, cpus=[0]) as pb:
            perf_producer.output(60, 20, cpu=0)
            async for sample in pb:
                got.append(sample)
                if len(got) == 20:
                    break
            return got, pb.consume_batch(with_cpus=True)

    got, (cpus, rest) = run(main())
    assert [parse(data)[0] for _, data in got] == list(range(20))
    assert cpus == [0] * 40 and [parse(data)[0] for data in rest] == list(range(20, 60))


def test_records_a_raising_batch_call_kept_are_the_next_iterations_first(make_producer):
    """A batch over two rings, one corrupt, raises after taking the healthy ring's records: an
    async iteration that comes next yields them (it does not wait for new ones, or lose them)."""
    from test_ringbuf import write_consumer_pos

    bad, good = make_producer(ring_size=4096), make_producer(ring_size=4096)

    async def main() -> list[bytes]:
        got: list[bytes] = []
        with RingBuffer() as rb:
            rb.add(bad.ring)
            rb.add(good.ring)
            write_consumer_pos(rb.rings[0], 1 << 40)
            good.produce(3, 40)
            with pytest.raises(bpfring.RingCorruptError):
                rb.consume_batch()
            async for record in rb:
                got.append(record)
                if len(got) == 3:
                    break
        return got

    assert run(main()) == [expected_record(i, 0, 40) for i in range(3)]


def test_resync_keeps_the_records_already_taken(producer):
    """Records taken from the ring before a resync() (here by an iteration that stopped early)
    are healthy: the next batch call returns them, then the records produced after the resync."""
    from test_ringbuf import write_consumer_pos

    async def main() -> tuple[list[bytes], list[bytes], list[bytes]]:
        got: list[bytes] = []
        with RingBuffer(producer.ring, never) as rb:
            producer.produce(20, 40)
            async for record in rb:
                got.append(record)
                if len(got) == 5:
                    break
            producer.produce(3, 40, producer=1)  # skipped by the resync below
            write_consumer_pos(rb.rings[0], 3)
            with pytest.raises(bpfring.RingCorruptError):
                rb.rings[0].avail_data_size  # (a consumer call would hand over the 15 kept records first)
            assert rb.rings[0].resync() == 3 * 48  # from where this consumer left it
            kept = rb.consume_batch()
            producer.produce(2, 40, producer=2)
            return got, kept, rb.consume_batch()

    got, kept, new = run(main())
    assert got + kept == [expected_record(i, 0, 40) for i in range(20)]
    assert new == [expected_record(i, 2, 40) for i in range(2)]


def test_cancelling_an_iteration_as_its_wakeup_arrives_always_cancels_it(producer):
    """The task is cancelled a few turns of the loop after data arrived, while the wake-up is on
    its way to it: it must end cancelled every time, never swallow the cancellation and go on
    iterating (asyncio.wait_for in Python 3.11 returns the inner result instead)."""

    async def main() -> list[bool]:
        cancelled: list[bool] = []
        with RingBuffer(producer.ring, never) as rb:
            for turns in range(10):

                async def reader() -> None:
                    async for _ in rb.records(interval=60):
                        pass

                task = asyncio.create_task(reader())
                await asyncio.sleep(0.05)  # it waits: nothing to read
                producer.produce(1, 24)
                for _ in range(turns):
                    await asyncio.sleep(0)
                task.cancel()
                _, pending = await asyncio.wait({task}, timeout=5)
                if pending:  # it went on and waits again: the cancellation was lost
                    task.cancel()
                    await asyncio.wait({task})
                cancelled.append(not pending and task.cancelled())
                rb.consume_batch()  # what the iteration took and did not yield, out of the way
        return cancelled

    assert run(main()) == [True] * 10

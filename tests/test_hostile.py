"""A second process writes garbage into the shared words of a ring: the consumer raises
RingCorruptError, never crashes, hangs or delivers garbage, and resync() recovers.

The hostile writer (hostile_writer.py) is a separate process holding the map or perf event fd.
Each scenario runs in a forked consumer process (hostile_harness.isolated): a crash is the test
failing with its signal, a hang is the test failing with the stacks. Perf rings are followed by
an inaccessible page, so a read one byte past the ring is a SIGSEGV. Every record delivered is
checked byte for byte against what the BPF producer wrote, and for exactly-once.

Garbage positions are recognizable ones: unaligned, or outside the window the producer allows
(past the producer, more than a ring behind it). An aligned position inside the window but in
the middle of a record reads like a record and is out of scope (see docs/guarantees.md).
"""

from __future__ import annotations

import asyncio
import errno
import random
import re
import struct
import time
from typing import Any, Callable

import numpy as np
import pytest
from conftest import ring_producer
from hostile_harness import (
    FIXED,
    GuardedPerf,
    Ledger,
    as_records,
    bounded,
    hostile_seconds,
    isolated,
)
from hostile_writer import HostileWriter
from perf_producer import PerfProducer, record_bytes
from producer import PATTERN, Producer

import bpfring
from bpfring import PerfBuffer, RingBuffer

RING_SIZE = 16 * 1024
PERF_PAGES = 4
U64 = 1 << 64


class Consumer:
    """What the API table needs: the buffer, its first ring, the callback's sink and an out= array."""

    def __init__(self, buf: Any, sink: list[bytes], apis: dict[str, Callable[[Consumer], Any]]) -> None:
        self.buf = buf
        self.sink = sink
        self.apis = apis
        self.out = np.zeros(4096, FIXED)

    @property
    def ring(self) -> Any:
        return self.buf.rings[0]


def zero_copy(owner: Any) -> list[bytes]:
    with owner.batch(FIXED) as view:
        return as_records(view.copy())


def take_async(c: Consumer, make: Callable[[], Any], batches: bool = False) -> list[bytes]:
    """Iterate an async iterator of ``c.buf`` for at most half a second: records() until it idles
    for 50 ms, batches() for one batch (or 100 ms). Records go to ``c.sink`` as they are yielded,
    so those yielded before an exception still count. The iterators run without ``interval``:
    with one, Python 3.11's asyncio.wait_for inside them can swallow this function's timeout
    (a cancellation that lands as their own timeout fires), and the iteration never ends."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        agen = make()
        end = loop.time() + 0.5
        try:
            while loop.time() < end:
                try:
                    item = await asyncio.wait_for(agen.__anext__(), 0.1 if batches else 0.05)
                except (asyncio.TimeoutError, StopAsyncIteration):
                    return
                c.sink.extend(as_records(item) if batches else as_records([item]))
                if batches:
                    return
        finally:
            await agen.aclose()

    asyncio.run(run())
    return []


# Every consuming call of a RingBuffer and of its Ring; each returns the records it handed back
# (callback records land in the sink).
RING_APIS: dict[str, Callable[[Consumer], Any]] = {
    "consume": lambda c: c.buf.consume(),
    "poll(0)": lambda c: c.buf.poll(0),
    "consume_batch()": lambda c: c.buf.consume_batch(),
    "consume_batch(dtype)": lambda c: c.buf.consume_batch(FIXED),
    "consume_batch(dtype, out=)": lambda c: c.buf.consume_batch(FIXED, out=c.out),
    "batch(dtype)": lambda c: zero_copy(c.buf),
    "Ring.consume": lambda c: c.ring.consume(),
    "Ring.consume_batch()": lambda c: c.ring.consume_batch(),
    "Ring.consume_batch(dtype)": lambda c: c.ring.consume_batch(FIXED, max_records=1000),
    "Ring.batch(dtype)": lambda c: zero_copy(c.ring),
    "records()": lambda c: take_async(c, lambda: c.buf.records()),
    "batches()": lambda c: take_async(c, lambda: c.buf.batches(), batches=True),
    "batches(dtype)": lambda c: take_async(c, lambda: c.buf.batches(FIXED), batches=True),
}
# The calls that take records of any size.
BYTES_APIS = ("consume", "poll(0)", "consume_batch()", "Ring.consume", "Ring.consume_batch()", "records()", "batches()")

PERF_APIS: dict[str, Callable[[Consumer], Any]] = {
    "consume": lambda c: c.buf.consume(),
    "poll(0)": lambda c: c.buf.poll(0),
    "consume_buffer(0)": lambda c: c.buf.consume_buffer(0),
    "consume_batch()": lambda c: c.buf.consume_batch(),
    "consume_batch(dtype)": lambda c: c.buf.consume_batch(FIXED),
    "consume_batch(dtype, out=)": lambda c: c.buf.consume_batch(FIXED, out=c.out),
    "consume_batch(dtype, with_cpus)": lambda c: c.buf.consume_batch(FIXED, with_cpus=True),
    "records()": lambda c: take_async(c, lambda: c.buf.records()),
    "batches(dtype)": lambda c: take_async(c, lambda: c.buf.batches(FIXED), batches=True),
}


def deliver(c: Consumer, api: Callable[[Consumer], Any], what: str) -> list[bytes]:
    """One bounded call: the records it delivered (callback or returned), or its exception with
    the records delivered before it in ``exc.delivered``."""
    try:
        result = bounded(what, lambda: api(c))
    except BaseException as exc:
        exc.delivered = list(c.sink)  # type: ignore[attr-defined]
        c.sink.clear()
        raise
    got = c.sink + as_records(result)
    c.sink.clear()
    return got


def expect_corrupt(c: Consumer, api: Callable[[Consumer], Any], what: str) -> Any:
    """The call raises RingCorruptError (nothing else); returns it."""
    try:
        got = deliver(c, api, what)
    except bpfring.RingCorruptError as exc:
        return exc
    except Exception as exc:
        raise AssertionError(f"{what} raised {type(exc).__name__}: {exc}, not RingCorruptError") from exc
    raise AssertionError(f"{what} returned {len(got)} records and no error over a corrupt ring")


def check_error(exc: Any, m: bpfring.Map, *, ring: int | None = None, cpu: int | None = None, found: int | None = None) -> None:
    """RingCorruptError's promises: an OSError with EBADMSG naming the map, the ring or CPU and the values."""
    assert isinstance(exc, bpfring.BPFError) and isinstance(exc, OSError)
    assert exc.errno == errno.EBADMSG
    assert (exc.map_name, exc.map_id) == (m.name, m.id)
    assert (exc.ring, exc.cpu) == (ring, cpu)
    assert isinstance(exc.values, dict) and exc.values, exc.values
    msg = str(exc)
    assert m.name in msg and str(m.id) in msg, msg
    if ring is not None:
        assert re.search(rf"\bring\W{{0,2}}{ring}\b", msg), msg
    if cpu is not None:
        assert re.search(rf"\bcpu\W{{0,2}}{cpu}\b", msg, re.I), msg
    if found is not None:  # the planted value is among those reported (the message may put it as a difference)
        assert found in exc.values.values(), f"{found} not in {exc.values}"


# -- the ring buffer's consumer_pos -----------------------------------------------------------------------


def lap(producer: Producer, rb: RingBuffer, laps: int = 3) -> None:
    """Produce and consume until the ring has gone round ``laps`` times: positions can go back."""
    while rb.rings[0].producer_pos < laps * rb.rings[0].size:
        producer.produce(100, fixed=True)
        rb.consume()


RING_GARBAGE: dict[str, Callable[[int, int, int], int]] = {
    "past-the-producer": lambda cons, prod, size: prod + 8,
    "far-past-the-producer": lambda cons, prod, size: prod + (1 << 40),
    "huge": lambda cons, prod, size: U64 - 8,
    "unaligned-by-3": lambda cons, prod, size: cons + 3,
    "unaligned-by-4": lambda cons, prod, size: cons + 4,
    "back-one-lap": lambda cons, prod, size: cons - size,
    "back-three-laps": lambda cons, prod, size: cons - 3 * size,
    "zero": lambda cons, prod, size: 0,
}


def refused_twice(c: Consumer, api: Callable[[Consumer], Any], api_name: str, check: Callable[[Any], None]) -> None:
    """The call raises RingCorruptError having delivered nothing, and so does the next one: the
    ring is refused, not skipped. poll() is the exception by design: it stops waking for a corrupt
    ring (a poll() loop that logs the error would spin) until resync(), so its second call
    returns nothing at once, and consume() still raises."""
    for attempt in ("first", "second"):
        if attempt == "second" and api_name == "poll(0)":
            assert deliver(c, api, "poll(0) (second call)") == []
            api, api_name = c.apis["consume"], "consume after poll(0)"
        exc = expect_corrupt(c, api, f"{api_name} ({attempt} call)")
        assert exc.delivered == [], f"{api_name} delivered {len(exc.delivered)} records from a corrupt ring"
        check(exc)


def ring_garbage_scenario(path: str, garbage: str, api_name: str, shared: bool) -> None:
    api = RING_APIS[api_name]
    producer = Producer(path, ring_size=RING_SIZE)
    sink: list[bytes] = []
    with RingBuffer(producer.ring, sink.append, shared=shared) as rb, HostileWriter.ring(producer.ring.id) as writer:
        c = Consumer(rb, sink, RING_APIS)
        ring = rb.rings[0]
        lap(producer, rb)
        sink.clear()
        producer.produce(20, fixed=True)  # pending when the garbage lands
        cons, prod = ring.consumer_pos, ring.producer_pos
        planted = writer.set(RING_GARBAGE[garbage](cons, prod, ring.size) % U64)
        assert ring.consumer_pos == planted

        def check(exc: Any) -> None:
            check_error(exc, producer.ring, ring=0, found=planted)
            assert ring.consumer_pos == planted and writer.get() == (planted, prod), "the ring was not left as found"

        refused_twice(c, api, api_name, check)
        skipped = bounded("resync", ring.resync)
        assert isinstance(skipped, int) and skipped >= 0, skipped
        assert ring.consumer_pos == ring.producer_pos == prod
        first = producer.produce(30, fixed=True).first_seq
        got = Ledger().check(deliver(c, api, api_name), api_name)
        assert got == [(0, seq) for seq in range(first, first + 30)], got
        assert deliver(c, api, api_name) == []


# Every API on the ring of its own (the default); with shared=True (another consumer may move
# consumer_pos too, so only the positions' values are checked), the walk's entry points.
SHARED_APIS = ("consume", "consume_batch(dtype)", "batch(dtype)", "records()")


@pytest.mark.parametrize(
    "shared, api", [(False, api) for api in RING_APIS] + [(True, api) for api in SHARED_APIS],
    ids=[api for api in RING_APIS] + [f"shared-{api}" for api in SHARED_APIS],
)
@pytest.mark.parametrize("garbage", list(RING_GARBAGE))
def test_garbage_consumer_pos_raises_delivers_nothing_and_resync_recovers(bpf_object, garbage, shared, api):
    path = str(bpf_object(ring_producer()))
    isolated(lambda: ring_garbage_scenario(path, garbage, api, shared))


def planted_header_scenario(path: str, api_name: str, length: int) -> None:
    """On a shared ring (no check that consumer_pos is where this consumer left it), consumer_pos
    moved onto a record's payload that holds a header claiming ``length`` bytes."""
    api = RING_APIS[api_name]
    producer = Producer(path, ring_size=RING_SIZE)
    sink: list[bytes] = []
    with RingBuffer(producer.ring, sink.append, shared=True) as rb, HostileWriter.ring(producer.ring.id) as writer:
        c = Consumer(rb, sink, RING_APIS)
        ring = rb.rings[0]
        lap(producer, rb)
        sink.clear()
        pattern = bytearray(PATTERN)
        pattern[0:8] = struct.pack("<II", length, 0)
        producer.obj.map("pattern").update(b"\0\0\0\0", bytes(pattern))
        producer._next_seq[0] = (producer._next_seq.get(0, 0) + 255) // 256 * 256  # copies from offset 0
        at = ring.producer_pos
        producer.produce(1, 200)  # header (8), seq/producer/size (16), then the pattern
        producer.obj.map("pattern").update(b"\0\0\0\0", PATTERN)
        prod = ring.producer_pos
        planted = writer.set(at + 24)

        def check(exc: Any) -> None:
            check_error(exc, producer.ring, ring=0, found=planted)
            assert ring.consumer_pos == planted and writer.get() == (planted, prod), "the ring was not left as found"

        refused_twice(c, api, api_name, check)
        bounded("resync", ring.resync)
        first = producer.produce(30, fixed=True).first_seq
        got = Ledger().check(deliver(c, api, api_name), api_name)
        assert got == [(0, seq) for seq in range(first, first + 30)], got


@pytest.mark.parametrize("length", [0x3FF00000, 200, 0x3FFFFFF0], ids=["far-past", "just-past", "largest"])
@pytest.mark.parametrize("api", SHARED_APIS)
def test_a_header_past_the_producer_on_a_shared_ring_raises_and_resync_recovers(bpf_object, api, length):
    path = str(bpf_object(ring_producer()))
    isolated(lambda: planted_header_scenario(path, api, length))


def test_resync_skips_the_pending_bytes_and_says_how_many(bpf_object):
    path = str(bpf_object(ring_producer()))

    def scenario() -> None:
        producer = Producer(path, ring_size=RING_SIZE)
        got: list[bytes] = []
        with RingBuffer(producer.ring, got.append) as rb:
            ring = rb.rings[0]
            lap(producer, rb)
            got.clear()
            producer.produce(20, fixed=True)
            assert ring.resync() == 20 * 72 and ring.avail_data_size == 0
            assert rb.consume() == 0 and got == []
            first = producer.produce(5, fixed=True).first_seq
            assert rb.consume() == 5 and Ledger().check(got, "consume") == [(0, s) for s in range(first, first + 5)]
            assert ring.resync() == 0

    isolated(scenario)


@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
def test_a_consumer_pos_exactly_one_ring_behind_is_corrupt_not_a_full_ring(bpf_object, shared):
    """The kernel never lets producer_pos get a whole ring ahead (it refuses a record once
    producer_pos - consumer_pos would pass the mask): a ring's size of pending bytes means
    consumer_pos went back a lap. With records that tile the ring (56 bytes: 64 in the ring), it
    lands on the header of a record consumed a lap ago, and walking from there hands out a ring
    of stale records as new (and the kernel, seeing a full ring, drops everything meanwhile)."""
    path = str(bpf_object(ring_producer()))

    def scenario() -> None:
        producer = Producer(path, ring_size=RING_SIZE)
        got: list[bytes] = []
        with RingBuffer(producer.ring, got.append, shared=shared) as rb, HostileWriter.ring(producer.ring.id) as writer:
            ring = rb.rings[0]
            while ring.producer_pos < 3 * RING_SIZE:
                producer.produce(100, 56)
                rb.consume()
            got.clear()
            prod = ring.producer_pos
            assert prod % 64 == 0
            planted = writer.set(prod - RING_SIZE)
            exc = expect_corrupt(Consumer(rb, got, RING_APIS), RING_APIS["consume"], "consume")
            assert exc.delivered == [], f"{len(exc.delivered)} stale records delivered as new"
            check_error(exc, producer.ring, ring=0, found=planted)

    isolated(scenario)


def ring_random_scenario(path: str, fixed: bool, seconds: float, seed: int, shared: bool = False) -> dict[str, Any]:
    """Garbage at random for ``seconds`` while every API runs in turn; records are produced between
    the calls (the kernel side never races a walk, so only the writer can spoil what it reads)."""
    apis = {name: RING_APIS[name] for name in (RING_APIS if fixed else BYTES_APIS)}
    producer = Producer(path, ring_size=RING_SIZE)
    sink: list[bytes] = []
    ledger = Ledger(fixed=fixed)
    rng = random.Random(seed)
    stats = {name: {"calls": 0, "records": 0, "corrupt": 0} for name in apis}
    error = bpfring.RingCorruptError

    def produce(n: int) -> int:
        out = producer.produce(n, fixed=True) if fixed else producer.produce(n, (16, 1000))
        return out.first_seq

    with RingBuffer(producer.ring, sink.append, shared=shared) as rb, HostileWriter.ring(producer.ring.id) as writer:
        c = Consumer(rb, sink, RING_APIS)
        ring = rb.rings[0]
        writer.start_random(seconds, seed, max_pause_us=20000)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            n = rng.randint(0, 60)
            if n:
                produce(n)
            name = rng.choice(list(apis))
            stats[name]["calls"] += 1
            try:
                got = deliver(c, apis[name], name)
            except error as exc:
                stats[name]["corrupt"] += 1
                got = exc.delivered  # records before the bad position are real ones
                assert exc.errno == errno.EBADMSG and (exc.map_id, exc.ring) == (producer.ring.id, 0)
                assert bounded("resync", ring.resync) >= 0
            stats[name]["records"] += len(ledger.check(got, name))
        writes = writer.finish_random()["writes"]
        bounded("resync", ring.resync)  # the writer's last garbage is still there
        n = 30 if fixed else 10  # (10 records of up to 1000 bytes fit the ring)
        for name, api in apis.items():  # each call goes on exactly once from there
            first = produce(n)
            got = [key for key in ledger.check(deliver(c, api, name), name) if key[1] >= first]
            assert got == [(0, s) for s in range(first, first + n)], f"{name} after resync: {got}"
            assert deliver(c, api, name) == []
    return {"stats": stats, "writes": writes}


@pytest.mark.parametrize(
    "fixed, shared",
    [(True, False), (False, False), (True, True)],
    ids=["fixed-size-every-api", "any-size-bytes-apis", "shared-fixed-size-every-api"],
)
def test_random_consumer_pos_for_seconds_under_every_api(bpf_object, fixed, shared):
    path = str(bpf_object(ring_producer()))
    seconds = hostile_seconds()
    result = isolated(lambda: ring_random_scenario(path, fixed, seconds, seed=12 + fixed + 2 * shared, shared=shared))
    stats, writes = result["stats"], result["writes"]
    print({"writes": writes, "stats": stats})
    assert sum(writes.values()) > 100, writes
    assert all(s["calls"] for s in stats.values()), stats
    assert sum(s["corrupt"] for s in stats.values()) > 0 and sum(s["records"] for s in stats.values()) > 0, stats


# -- several rings, one of them corrupt ----------------------------------------------------------------------

MULTI_APIS = (
    "consume",
    "poll(0)",
    "consume_batch()",
    "consume_batch(dtype)",
    "consume_batch(dtype, out=)",
    "records()",
    "batches(dtype)",
)


def multi_ring_scenario(path: str, api_name: str, garbage: str, resync_at_once: bool) -> None:
    api = RING_APIS[api_name]
    producers = [Producer(path, ring_size=RING_SIZE) for _ in range(3)]
    sink: list[bytes] = []
    error = bpfring.RingCorruptError
    with RingBuffer() as rb:
        for p in producers:
            rb.add(p.ring, sink.append)
        bad = rb.rings[1]
        for i, p in enumerate(producers):  # each ring lapped, so its positions can go back
            while rb.rings[i].producer_pos < 2 * RING_SIZE:
                p.produce(100, fixed=True, producer=i)
                rb.consume()
        sink.clear()
        healthy = set()
        for i, p in enumerate(producers):
            first = p.produce(50, fixed=True, producer=i).first_seq
            if i != 1:
                healthy |= {(i, s) for s in range(first, first + 50)}
        c = Consumer(rb, sink, RING_APIS)
        ledger = Ledger()
        with HostileWriter.ring(producers[1].ring.id) as writer:
            planted = writer.set(RING_GARBAGE[garbage](bad.consumer_pos, bad.producer_pos, RING_SIZE) % U64)
            raised = 0
            for attempt in range(3):  # the healthy rings' records come with the error, or by the next call
                try:
                    got = deliver(c, api, api_name)
                except error as exc:
                    raised += 1
                    got = exc.delivered
                    check_error(exc, producers[1].ring, ring=1, found=planted)
                    if resync_at_once and raised == 1:  # before the healthy records kept for the next call come
                        bounded("resync", bad.resync)
                keys = ledger.check(got, api_name)
                assert all(key[0] != 1 for key in keys), f"{api_name} delivered records of the corrupt ring"
                if ledger.seen >= healthy:
                    break
            assert raised, f"{api_name} never reported the corrupt ring"
            assert ledger.seen == healthy, f"{api_name}: {len(healthy - ledger.seen)} records of the healthy rings not delivered"
            if not resync_at_once:
                assert bad.consumer_pos == planted
                bounded("resync", bad.resync)
        expected = set()
        for i, p in enumerate(producers):
            first = p.produce(10, fixed=True, producer=i).first_seq
            expected |= {(i, s) for s in range(first, first + 10)}
        got = set(ledger.check(deliver(c, api, api_name), api_name))
        assert got == expected, f"after resync {api_name} delivered {sorted(got ^ expected)[:10]} unexpectedly"
    for p in producers:
        p.close()


@pytest.mark.parametrize(
    "garbage, resync_at_once",
    [("unaligned-by-4", False), ("back-one-lap", False), ("past-the-producer", False), ("unaligned-by-4", True)],
    ids=["unaligned-by-4", "back-one-lap", "past-the-producer", "unaligned-by-4-resync-at-once"],
)
@pytest.mark.parametrize("api", MULTI_APIS)
def test_one_corrupt_ring_does_not_stop_the_others(bpf_object, api, garbage, resync_at_once):
    path = str(bpf_object(ring_producer()))
    isolated(lambda: multi_ring_scenario(path, api, garbage, resync_at_once))


# -- a perf ring's data_tail and records ---------------------------------------------------------------------

SAMPLE = 64  # bytes a sample carries (record_bytes(64) == 80 in the ring)
PERF_REC = record_bytes(SAMPLE)


def perf_lap(pp: PerfProducer, pb: PerfBuffer, cpu: int, laps: int = 3) -> None:
    ring_bytes = PERF_PAGES * 4096
    done = 0
    while done < laps * ring_bytes:
        pp.output(50, SAMPLE, cpu=cpu)
        pb.consume()
        done += 50 * PERF_REC


def perf_tail_value(garbage: str, tail: int, head: int, size: int) -> int:
    if garbage == "last-4-bytes-of-the-area":  # an 8-byte header read here runs 4 bytes past the ring
        value = head // size * size - 4
        assert head - size < value < head, (head, size)
        return value
    return {
        "past-the-head": head + 8,
        "far-past-the-head": head + (1 << 40),
        "huge": U64 - 8,
        "unaligned-by-3": tail + 3,
        "unaligned-by-4": tail + 4,
        "back-one-lap": tail - size,
        "back-three-laps": tail - 3 * size,
        "zero": 0,
    }[garbage]


PERF_TAIL_GARBAGE = (
    "last-4-bytes-of-the-area",
    "past-the-head",
    "far-past-the-head",
    "huge",
    "unaligned-by-3",
    "unaligned-by-4",
    "back-one-lap",
    "back-three-laps",
    "zero",
)


PERF_RECORD_SAMPLE = 9  # include/uapi/linux/perf_event.h, enum perf_event_type
PERF_RECORD_LOST = 2
# Fake perf records the reader meets at its own data_tail: (type, size) of the perf_event_header
# and the u32 after it (a sample's raw_size). The data pages of a perf ring are read-only to user
# space (a write faults), so the fake is planted as the BPF producer would write it, in a sample's
# payload, and reached through a hostile data_head (see plant_perf_record).
PERF_RECORD_GARBAGE: dict[str, tuple[int, int, int]] = {
    "record-size-0": (PERF_RECORD_SAMPLE, 0, 16),
    "record-size-4": (PERF_RECORD_SAMPLE, 4, 16),
    "record-size-past-the-head": (PERF_RECORD_SAMPLE, 192, 16),
    "record-size-past-the-ring": (PERF_RECORD_SAMPLE, 0xFFF8, 16),
    "raw-size-past-the-record": (PERF_RECORD_SAMPLE, 24, 100),
    "raw-size-huge": (PERF_RECORD_SAMPLE, 24, 0xFFFFFFFF),
    "lost-record-of-8-bytes": (PERF_RECORD_LOST, 8, 0),
}
PLANT_SIZE = 200  # the carrier sample: 216 bytes in the ring, the fake at its offset 32


def plant_perf_record(pp: PerfProducer, pb: PerfBuffer, writer: HostileWriter, cpu: int, garbage: str) -> int:
    """Make the reader meet a fake record (PERF_RECORD_GARBAGE[garbage]) at its own data_tail:
    a sample whose payload holds the fake is output a lap before, the ring is filled and read up
    to where the fake now lies (the reader's tail, as it stored it), and data_head, on the same
    writable page as data_tail, is moved past it. Returns data_head as planted.

    The carrier sample: perf header (8 bytes), raw_size (4), then producer.py's record: seq (8),
    producer (4), size (4) and the pattern from offset seq % 256; so its offset 32 holds pattern
    bytes 4 on."""
    size = PERF_PAGES * 4096
    kind, rec_size, raw = PERF_RECORD_GARBAGE[garbage]
    pattern = bytearray(PATTERN)
    pattern[4:16] = struct.pack("<IHHI", kind, 0, rec_size, raw)
    pp.obj.map("pattern").update(b"\0\0\0\0", bytes(pattern))
    pp._next_seq[cpu] = (pp._next_seq.get(cpu, 0) + 255) // 256 * 256  # a seq that copies from offset 0
    tail, head = writer.get()
    assert tail == head, "the ring should be drained before planting"
    pp.output(1, PLANT_SIZE, cpu=cpu)
    pp.obj.map("pattern").update(b"\0\0\0\0", PATTERN)  # later samples are the usual ones
    fake = head + 32
    # Fill and read a lap, up to the fake: 16, 24 and 80-byte records (samples of 1, 8, 64 bytes).
    left = fake + size - (head + record_bytes(PLANT_SIZE))
    fill = [(1, record_bytes(1)), (8, record_bytes(8))] if left % PERF_REC else []
    for sample, nbytes in fill:
        pp.output(1, sample, cpu=cpu)
        left -= nbytes
    assert left % PERF_REC == 0, left
    while left:
        n = min(50, left // PERF_REC)
        pp.output(n, SAMPLE, cpu=cpu)
        left -= n * PERF_REC
        pb.consume()
    pb.consume()
    assert writer.get() == (fake + size, fake + size), (writer.get(), fake + size)
    return writer.set_head(fake + size + 184)  # the rest of the carrier: the fake claims lie in it


# A hostile data_head (it shares the writable control page; the kernel rewrites it at its next
# output): values the reader can tell are wrong. data_tail == data_head when it lands.
PERF_HEAD_GARBAGE: dict[str, Callable[[int, int], int]] = {
    "head-unaligned": lambda tail, size: tail + 3,
    "head-behind-the-tail": lambda tail, size: tail - 80,
    "head-far-ahead": lambda tail, size: tail + (1 << 40),
    "head-more-than-a-ring-ahead": lambda tail, size: tail + size + 80,
}


def perf_garbage_scenario(path: str, garbage: str, api_name: str, shared: bool) -> None:
    api = PERF_APIS[api_name]
    cpu = 0
    pp = PerfProducer(path)
    sink: list[bytes] = []
    lost: list[int] = []
    guarded = GuardedPerf(
        pp.array,
        cpu,
        PERF_PAGES,
        sample_cb=lambda cpu, data: sink.append(data),
        lost_cb=lambda cpu, n: lost.append(n),
        shared=shared,
    )
    pb = guarded.pb
    size = PERF_PAGES * 4096
    try:
        with HostileWriter.perf(pb.buffer_fd(0), size) as writer:
            c = Consumer(pb, sink, PERF_APIS)
            perf_lap(pp, pb, cpu)
            sink.clear()
            tail, head = writer.get()
            if garbage in PERF_RECORD_GARBAGE:
                planted = plant_perf_record(pp, pb, writer, cpu, garbage)
                sink.clear()  # the lap that brought the fake round
            elif garbage in PERF_HEAD_GARBAGE:
                writer.set_head(PERF_HEAD_GARBAGE[garbage](tail, size) % U64)
                planted = None
            else:
                pp.output(20, SAMPLE, cpu=cpu)  # pending when the garbage lands
                tail, head = writer.get()
                assert head - tail == 20 * PERF_REC
                planted = writer.set(perf_tail_value(garbage, tail, head, size) % U64)
            found = writer.get()

            def check(exc: Any) -> None:
                assert lost == [], f"{api_name} reported lost counts {lost} read from a corrupt ring"
                check_error(exc, pp.array, cpu=cpu, found=planted)
                assert writer.get() == found, "the ring was not left as found"

            refused_twice(c, api, api_name, check)
            ring = pb.rings[0]
            assert (ring.cpu, ring.size) == (cpu, size)
            if garbage in PERF_HEAD_GARBAGE or garbage in PERF_RECORD_GARBAGE:
                # data_head is not ours to repair: the kernel rewrites it with its next output,
                # which resync() then skips to.
                pp.output(1, SAMPLE, cpu=cpu)
                head = writer.get()[1]
            skipped = bounded("resync", ring.resync)
            assert isinstance(skipped, int) and skipped >= 0, skipped
            assert writer.get() == (head, head) and (ring.data_tail, ring.data_head) == (head, head)
            first = pp.output(30, SAMPLE, cpu=cpu).first_seq
            got = Ledger(perf=True).check(deliver(c, api, api_name), api_name)
            assert got == [(cpu, s) for s in range(first, first + 30)], got
            assert deliver(c, api, api_name) == []
    finally:
        guarded.close()
        pp.close()


PERF_SHARED_APIS = ("consume", "consume_batch(dtype)", "records()")


@pytest.mark.parametrize(
    "shared, api",
    [(False, api) for api in PERF_APIS] + [(True, api) for api in PERF_SHARED_APIS],
    ids=[api for api in PERF_APIS] + [f"shared-{api}" for api in PERF_SHARED_APIS],
)
@pytest.mark.parametrize("garbage", PERF_TAIL_GARBAGE + tuple(PERF_RECORD_GARBAGE) + tuple(PERF_HEAD_GARBAGE))
def test_garbage_in_a_perf_ring_raises_delivers_nothing_and_resync_recovers(bpf_object, garbage, shared, api):
    path = str(bpf_object("perf_producer"))
    isolated(lambda: perf_garbage_scenario(path, garbage, api, shared))


@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
def test_a_data_tail_exactly_one_ring_behind_is_corrupt_not_a_full_ring(bpf_object, shared):
    """perf never fills its ring to the last byte (it keeps data_head - data_tail below the size),
    so a data_tail a whole ring behind went back a lap. With samples that tile the ring (52 bytes:
    64 in the ring) it lands on a sample read a lap ago: a ring of stale samples."""
    path = str(bpf_object("perf_producer"))

    def scenario() -> None:
        pp = PerfProducer(path)
        got: list[bytes] = []
        size = PERF_PAGES * 4096
        with PerfBuffer(pp.array, PERF_PAGES, lambda cpu, data: got.append(data), cpus=[0], shared=shared) as pb:
            with HostileWriter.perf(pb.buffer_fd(0), size) as writer:
                assert record_bytes(52) == 64
                while writer.get()[1] < 3 * size:
                    pp.output(100, 52, cpu=0)
                    pb.consume()
                got.clear()
                tail, head = writer.get()
                planted = writer.set(head - size)
                exc = expect_corrupt(Consumer(pb, got, PERF_APIS), PERF_APIS["consume"], "consume")
                assert exc.delivered == [], f"{len(exc.delivered)} stale samples delivered as new"
                check_error(exc, pp.array, cpu=0, found=planted)
        pp.close()

    isolated(scenario)


def test_a_data_head_exactly_one_ring_ahead_is_corrupt_not_a_full_ring(bpf_object):
    """data_head shares data_tail's writable page. A data_head a whole ring ahead of data_tail is
    one the kernel never publishes; with samples that tile the ring, the walk from data_tail would
    read a ring of samples consumed a lap ago as new ones."""
    path = str(bpf_object("perf_producer"))

    def scenario() -> None:
        pp = PerfProducer(path)
        got: list[bytes] = []
        size = PERF_PAGES * 4096
        with PerfBuffer(pp.array, PERF_PAGES, lambda cpu, data: got.append(data), cpus=[0]) as pb:
            with HostileWriter.perf(pb.buffer_fd(0), size) as writer:
                while writer.get()[1] < 3 * size:
                    pp.output(100, 52, cpu=0)
                    pb.consume()
                got.clear()
                tail, head = writer.get()
                writer.set_head(tail + size)
                exc = expect_corrupt(Consumer(pb, got, PERF_APIS), PERF_APIS["consume"], "consume")
                assert exc.delivered == [], f"{len(exc.delivered)} stale samples delivered as new"
                check_error(exc, pp.array, cpu=0, found=tail + size)
        pp.close()

    isolated(scenario)


def perf_random_scenario(path: str, seconds: float, seed: int) -> dict[str, Any]:
    cpu = 0
    pp = PerfProducer(path)
    sink: list[bytes] = []
    guarded = GuardedPerf(pp.array, cpu, PERF_PAGES, sample_cb=lambda cpu, data: sink.append(data))
    pb = guarded.pb
    ledger = Ledger(perf=True)
    rng = random.Random(seed)
    stats = {name: {"calls": 0, "records": 0, "corrupt": 0} for name in PERF_APIS}
    error = bpfring.RingCorruptError
    try:
        with HostileWriter.perf(pb.buffer_fd(0), PERF_PAGES * 4096) as writer:
            c = Consumer(pb, sink, PERF_APIS)
            writer.start_random(seconds, seed, max_pause_us=20000)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                n = rng.randint(0, 60)
                if n:
                    pp.output(n, SAMPLE, cpu=cpu)
                name = rng.choice(list(PERF_APIS))
                stats[name]["calls"] += 1
                try:
                    got = deliver(c, PERF_APIS[name], name)
                except error as exc:
                    stats[name]["corrupt"] += 1
                    got = exc.delivered
                    assert exc.errno == errno.EBADMSG and (exc.map_id, exc.cpu) == (pp.array.id, cpu)
                    assert bounded("resync", pb.rings[0].resync) >= 0
                stats[name]["records"] += len(ledger.check(got, name))
            writes = writer.finish_random()["writes"]
            bounded("resync", pb.rings[0].resync)
            for name, api in PERF_APIS.items():
                first = pp.output(30, SAMPLE, cpu=cpu).first_seq
                got = [key for key in ledger.check(deliver(c, api, name), name) if key[1] >= first]
                assert got == [(cpu, s) for s in range(first, first + 30)], f"{name} after resync: {got}"
                assert deliver(c, api, name) == []
    finally:
        guarded.close()
        pp.close()
    return {"stats": stats, "writes": writes}


def test_random_data_tail_for_seconds_under_every_api(bpf_object):
    path = str(bpf_object("perf_producer"))
    result = isolated(lambda: perf_random_scenario(path, hostile_seconds(), seed=7))
    stats, writes = result["stats"], result["writes"]
    print({"writes": writes, "stats": stats})
    assert sum(writes.values()) > 100, writes
    assert all(s["calls"] for s in stats.values()), stats
    assert sum(s["corrupt"] for s in stats.values()) > 0 and sum(s["records"] for s in stats.values()) > 0, stats


def multi_perf_scenario(path: str, api_name: str, bad_cpu: int, resync_at_once: bool) -> None:
    api = PERF_APIS[api_name]
    good_cpu = 1 - bad_cpu
    pp = PerfProducer(path)
    sink: list[bytes] = []
    error = bpfring.RingCorruptError
    with PerfBuffer(pp.array, PERF_PAGES, lambda cpu, data: sink.append(data), cpus=[0, 1]) as pb:
        bad = pb.rings[pb.cpus.index(bad_cpu)]
        for cpu in (0, 1):
            perf_lap(pp, pb, cpu, laps=2)
        sink.clear()
        first = pp.output(40, SAMPLE, cpu=good_cpu).first_seq
        healthy = {(good_cpu, s) for s in range(first, first + 40)}
        pp.output(40, SAMPLE, cpu=bad_cpu)
        c = Consumer(pb, sink, PERF_APIS)
        ledger = Ledger(perf=True)
        with HostileWriter.perf(bad.fd, PERF_PAGES * 4096) as writer:
            tail, head = writer.get()
            planted = writer.set(tail + 4)
            raised = 0
            for attempt in range(3):  # the healthy ring's samples come with the error, or by the next call
                try:
                    got = deliver(c, api, api_name)
                except error as exc:
                    raised += 1
                    got = exc.delivered
                    check_error(exc, pp.array, cpu=bad_cpu, found=planted)
                    if resync_at_once and raised == 1:  # before the samples kept for the next call come
                        bounded("resync", bad.resync)
                keys = ledger.check(got, api_name)
                assert all(key[0] != bad_cpu for key in keys), f"{api_name} delivered samples of the corrupt CPU"
                if ledger.seen >= healthy:
                    break
            assert raised, f"{api_name} never reported the corrupt ring"
            assert ledger.seen == healthy, f"{api_name}: {len(healthy - ledger.seen)} samples of cpu {good_cpu} not delivered"
            if not resync_at_once:
                assert writer.get() == (planted, head)
                bounded("resync", bad.resync)
        expected = set()
        for cpu in (0, 1):
            first = pp.output(10, SAMPLE, cpu=cpu).first_seq
            expected |= {(cpu, s) for s in range(first, first + 10)}
        got = set(ledger.check(deliver(c, api, api_name), api_name))
        assert got == expected, f"after resync {api_name} delivered {sorted(got ^ expected)[:10]} unexpectedly"
    pp.close()


@pytest.mark.parametrize(
    "bad_cpu, resync_at_once", [(1, False), (0, False), (0, True)], ids=["cpu1", "cpu0", "cpu0-resync-at-once"]
)
@pytest.mark.parametrize("api", [name for name in PERF_APIS if name != "consume_buffer(0)"])
def test_one_corrupt_cpu_does_not_stop_the_others(bpf_object, api, bad_cpu, resync_at_once):
    path = str(bpf_object("perf_producer"))
    isolated(lambda: multi_perf_scenario(path, api, bad_cpu, resync_at_once))

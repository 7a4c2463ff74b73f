"""RingBuffer against the real kernel, with records produced by tests/bpf/producer.bpf.c."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from conftest import open_fds
from producer import MODE_OUTPUT, MODE_RESERVE, expected_fixed, expected_record, parse, record_size

import bpfring
from bpfring import BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, RingBuffer


def check_records(
    got: list[bytes], first_seq: int, size: int | tuple[int, int], producer: int = 0, *, count: int
) -> None:
    """``count`` records, each the one the BPF program wrote for its sequence number, in order."""
    assert len(got) == count, f"{len(got)} records delivered, {count} expected"
    lo, hi = (size, size) if isinstance(size, int) else size
    for i, record in enumerate(got):
        seq = first_seq + i
        assert record == expected_record(seq, producer, record_size(seq, lo, hi)), f"record {seq} corrupt"


@pytest.mark.parametrize("mode", [MODE_OUTPUT, MODE_RESERVE], ids=["bpf_ringbuf_output", "reserve_submit"])
def test_records_of_1_byte_to_several_kib_arrive_intact_and_in_order(producer, mode):
    got: list[bytes] = []
    with RingBuffer(producer.ring, got.append) as rb:
        sizes = (1, 6000)  # most sizes are not multiples of 8
        r = producer.produce(15, sizes, mode=mode)  # at most 15 * 6008 bytes: fits in 64 KiB
        assert (r.produced, r.dropped) == (15, 0)
        assert rb.consume() == 15
    assert [len(g) for g in got] == [record_size(r.first_seq + i, *sizes) for i in range(15)]
    check_records(got, r.first_seq, sizes, count=15)


def test_every_size_from_1_to_64_bytes(producer):
    got: list[bytes] = []
    with RingBuffer(producer.ring, got.append) as rb:
        for size in range(1, 65):
            r = producer.produce(1, size)
            assert rb.consume() == 1
            assert got[-1] == expected_record(r.first_seq, 0, size)


def test_seed_reserve_submit_with_a_fixed_struct(producer):
    got: list[bytes] = []
    with RingBuffer(producer.ring, got.append) as rb:
        r = producer.produce(100, fixed=True)
        assert rb.consume() == 100 == r.produced
    assert got == [expected_fixed(r.first_seq + i, 0) for i in range(100)]


@pytest.mark.parametrize("fixed", [True, False], ids=["bpf_ringbuf_discard", "discard_dynptr"])
def test_discarded_records_are_skipped_and_space_is_reclaimed(producer, fixed):
    got: list[bytes] = []
    with RingBuffer(producer.ring, got.append) as rb:
        ring = rb.rings[0]
        r = producer.produce(300, 64, fixed=fixed, discard_every=3)
        assert r.discarded == 100 and r.produced == 200
        assert rb.consume() == 200
        assert ring.avail_data_size == 0  # the discarded records' space was given back too
        assert ring.consumer_pos == ring.producer_pos
    seqs = [parse(g)[0] for g in got]
    assert seqs == [s for s in range(r.first_seq, r.first_seq + 300) if s % 3]


def test_consume_on_an_empty_ring_returns_zero_at_once(producer):
    with RingBuffer(producer.ring, lambda d: pytest.fail("no record expected")) as rb:
        assert rb.consume() == 0
        assert rb.poll(0) == 0


def test_ring_accessors_follow_the_kernel_positions(producer):
    with RingBuffer(producer.ring, lambda d: None) as rb:
        ring = rb.rings[0]
        assert ring.size == 64 * 1024 == producer.ring.max_entries
        assert ring.map_fd != producer.ring.fd  # the ring owns a duplicate
        start = ring.producer_pos
        producer.produce(10, 13)  # 13 bytes + 8-byte header -> 24 bytes each
        assert ring.producer_pos - start == 10 * 24
        assert ring.avail_data_size == 240
        assert rb.consume() == 10
        assert ring.consumer_pos == ring.producer_pos and ring.avail_data_size == 0


def test_at_least_50_laps_of_the_ring_lose_and_repeat_nothing(make_producer):
    producer = make_producer(ring_size=16 * 1024)
    got: list[bytes] = []
    sizes = (1, 300)
    with RingBuffer(producer.ring, got.append) as rb:
        ring = rb.rings[0]
        first = None
        produced = 0
        while ring.consumer_pos < 55 * ring.size:
            r = producer.produce(40, sizes)  # at most 40 * 312 bytes: always fits
            assert r.dropped == 0
            first = r.first_seq if first is None else first
            produced += r.produced
            assert rb.poll(1000) == 40
        assert ring.consumer_pos // ring.size >= 50
    check_records(got, first, sizes, count=produced)


def test_a_full_ring_drops_and_delivered_plus_dropped_equals_produced(make_producer):
    producer = make_producer(ring_size=4096)
    got: list[bytes] = []
    with RingBuffer(producer.ring, got.append) as rb:
        r = producer.produce(200, 64)
        assert r.dropped > 0, "a 4 KiB ring cannot hold 200 records of 72 bytes"
        assert rb.consume() == len(got) == r.produced
        assert len(got) + r.dropped == 200
        # the space is back: the next batch fits again
        assert producer.produce(10, 64).dropped == 0
        assert rb.consume() == 10


def test_map_size_overridden_from_user_space(make_producer):
    producer = make_producer(ring_size=1 << 20)
    assert producer.ring.max_entries == 1 << 20
    with RingBuffer(producer.ring, lambda d: None) as rb:
        assert rb.rings[0].size == 1 << 20
        r = producer.produce(8000, 100)  # 8000 * 112 bytes: far more than the default 64 KiB
        assert r.dropped == 0
        assert rb.consume() == 8000


def test_two_producers_on_both_cpus_every_record_once_and_intact(make_producer):
    cpus = sorted(os.sched_getaffinity(0))[:2]
    producer = make_producer(ring_size=256 * 1024)
    results: dict[int, list] = {cpu: [] for cpu in cpus}
    sizes = (16, 200)

    def run(cpu: int) -> None:
        os.sched_setaffinity(0, {cpu})  # this thread only
        for _ in range(40):
            results[cpu].append(producer.produce(500, sizes, producer=cpu))

    got: list[bytes] = []
    with RingBuffer(producer.ring, got.append) as rb:
        threads = [threading.Thread(target=run, args=(cpu,)) for cpu in cpus]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rb.poll(50)
        for t in threads:
            t.join()
        rb.consume()
    by_producer: dict[int, list[int]] = {cpu: [] for cpu in cpus}
    for record in got:
        seq, pid, size = parse(record)
        assert record == expected_record(seq, pid, size), f"producer {pid} record {seq} corrupt"
        by_producer[pid].append(seq)
    for cpu in cpus:
        seqs = by_producer[cpu]
        assert seqs == sorted(set(seqs)), "a record delivered twice or out of order"
        produced = sum(r.produced for r in results[cpu])
        dropped = sum(r.dropped for r in results[cpu])
        assert len(seqs) == produced and produced + dropped == 40 * 500


def test_no_wakeup_leaves_the_consumer_asleep_and_force_wakeup_wakes_it(producer):
    got: list[bytes] = []
    with RingBuffer(producer.ring, got.append) as rb:
        # adaptive default: the consumer has caught up, so a commit wakes it
        producer.produce(1, 32)
        assert rb.poll(5000) == 1
        assert rb.poll(0) == 0  # level-triggered epoll: drop the ring from the ready list
        producer.produce(3, 32, flags=BPF_RB_NO_WAKEUP)
        assert rb.poll(200) == 0, "BPF_RB_NO_WAKEUP records woke the consumer"
        assert rb.rings[0].avail_data_size > 0
        # adaptive again, but the consumer is behind: no wakeup for this one either
        producer.produce(1, 32)
        assert rb.poll(200) == 0
        producer.produce(1, 32, flags=BPF_RB_FORCE_WAKEUP)
        assert rb.poll(5000) == 5
    assert len(got) == 6


def test_force_wakeup_through_bpf_ringbuf_output(producer):
    with RingBuffer(producer.ring, lambda d: None) as rb:
        rb.poll(0)
        producer.produce(2, 40, mode=MODE_OUTPUT, flags=BPF_RB_NO_WAKEUP)
        assert rb.poll(200) == 0
        producer.produce(1, 40, mode=MODE_OUTPUT, flags=BPF_RB_FORCE_WAKEUP)
        assert rb.poll(5000) == 3


def test_a_callback_that_raises_midway_then_the_rest_exactly_once(producer):
    got: list[bytes] = []

    def callback(data: bytes) -> None:
        got.append(data)
        if len(got) == 5:
            raise RuntimeError("boom")

    with RingBuffer(producer.ring, callback) as rb:
        r = producer.produce(20, 48)
        with pytest.raises(RuntimeError, match="boom"):
            rb.poll(1000)
        assert len(got) == 5
        assert rb.consume() == 15
        assert rb.consume() == 0
    check_records(got, r.first_seq, 48, count=20)


def test_a_negative_return_stops_and_is_returned(producer):
    got: list[bytes] = []

    def callback(data: bytes) -> int:
        got.append(data)
        return -42 if len(got) == 3 else 0

    with RingBuffer(producer.ring, callback) as rb:
        r = producer.produce(10, 24)
        assert rb.consume() == -42
        assert len(got) == 3
        assert rb.rings[0].avail_data_size == 7 * 32  # the third record counts as consumed
        assert rb.consume() == 7
    check_records(got, r.first_seq, 24, count=10)


def test_consume_max_records_stops_after_that_many(producer):
    with RingBuffer(producer.ring, lambda d: None) as rb:
        producer.produce(10, 8)
        assert rb.consume(max_records=4) == 4
        assert rb.consume(max_records=4) == 4
        assert rb.consume(max_records=4) == 2
        with pytest.raises(ValueError, match="max_records must be at least 1, got 0"):
            rb.consume(max_records=0)


def test_records_produced_while_a_callback_runs_are_not_left_behind(producer):
    got: list[bytes] = []

    def callback(data: bytes) -> None:
        got.append(data)
        if len(got) == 1:
            producer.produce(5, 16)  # committed while the consumer is behind: no wakeup for them

    with RingBuffer(producer.ring, callback) as rb:
        producer.produce(1, 16)
        delivered = rb.poll(10_000)
        if delivered < 6:  # the rest must not wait for a wakeup that never comes
            delivered += rb.poll(10_000)
        assert delivered == 6
    check_records(got, 0, 16, count=6)


def test_several_rings_on_one_epoll(make_producer):
    a, b = make_producer(), make_producer()
    got_a: list[bytes] = []
    got_b: list[bytes] = []
    with RingBuffer(a.ring, got_a.append) as rb:
        ring_b = rb.add(b.ring, got_b.append)
        assert rb.rings[1] is ring_b
        a.produce(3, 16)
        b.produce(4, 16)
        total = 0
        while total < 7:
            n = rb.poll(5000)
            assert n > 0
            total += n
    assert (len(got_a), len(got_b)) == (3, 4)


def test_ctrl_c_during_poll_loses_and_repeats_nothing(producer):
    got: list[bytes] = []

    def callback(data: bytes) -> None:
        got.append(data)
        if len(got) == 50:
            os.kill(os.getpid(), signal.SIGINT)

    with RingBuffer(producer.ring, callback) as rb:
        r = producer.produce(100, 32)
        with pytest.raises(KeyboardInterrupt):
            rb.poll(1000)
        assert len(got) == 50  # the record whose callback saw Ctrl-C counts as consumed
        assert rb.consume() == 50
        # a Ctrl-C while blocked in epoll, with nothing to read
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            rb.poll(10_000)
        waited = time.monotonic() - start
        timer.join()
        assert waited < 2, f"poll(10_000) returned {waited:.1f} s after the start, Ctrl-C came at 0.2 s"
        producer.produce(5, 32)
        assert rb.poll(1000) == 5
    assert len(got) == 105
    check_records(got, r.first_seq, 32, count=105)


CALLS_BACK = {
    "poll": lambda rb: rb.poll(0),
    "consume": lambda rb: rb.consume(),
    "consume_batch": lambda rb: rb.consume_batch(),
    "batch": lambda rb: rb.batch("V16").__enter__(),
    "ring.consume": lambda rb: rb.rings[0].consume(),
    "ring.consume_batch": lambda rb: rb.rings[0].consume_batch("V16"),
    "ring.batch": lambda rb: rb.rings[0].batch("V16").__enter__(),
}


@pytest.mark.parametrize("call", list(CALLS_BACK))
def test_consuming_from_a_callback_is_refused_not_a_deadlock(producer, call):
    """A nested walk would deliver what its caller is delivering (or, on a plain lock, hang)."""
    got: list[bytes] = []

    def record(data: bytes) -> None:
        got.append(data)
        if len(got) == 1:  # the first record's callback calls back into the buffer
            CALLS_BACK[call](rb)

    with RingBuffer(producer.ring, record) as rb:
        producer.produce(2, 16)
        with pytest.raises(RuntimeError, match="RingBuffer: this thread is already consuming"):
            rb.poll(5000)
        assert rb.consume() == 1  # the second record waited in the ring
    assert [parse(d)[0] for d in got] == [0, 1]


def test_close_from_a_callback_is_refused(producer):
    """close() would unmap the ring under the walk that called the callback."""
    got: list[bytes] = []

    def record(data: bytes) -> None:
        got.append(data)
        if len(got) == 1:
            rb.close()

    with RingBuffer(producer.ring, record) as rb:
        producer.produce(2, 16)
        with pytest.raises(RuntimeError, match="return a negative value to stop"):
            rb.poll(5000)
        assert not rb.closed
        assert rb.consume() == 1  # still open: the second record waited in the ring
    assert [parse(d)[0] for d in got] == [0, 1]
    assert rb.closed  # the with block closed it


def test_close_from_another_thread_wakes_a_blocked_poll(producer):
    rb = RingBuffer(producer.ring, lambda d: None)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(rb.poll(30_000)))
    t.start()
    time.sleep(0.2)
    closer = threading.Thread(target=rb.close)  # close() itself waits for poll(): watch from here
    closer.start()
    t.join(timeout=10)
    assert not t.is_alive(), "poll() did not return after close()"
    closer.join()
    assert result == [0]
    with pytest.raises(ValueError, match="closed"):
        rb.poll(0)


def test_fileno_is_pollable_by_selectors(producer):
    import selectors

    with RingBuffer(producer.ring, lambda d: None) as rb, selectors.DefaultSelector() as sel:
        sel.register(rb.fileno(), selectors.EVENT_READ)
        assert sel.select(0) == []
        producer.produce(1, 16)
        assert len(sel.select(5)) == 1
        assert rb.consume() == 1


def test_close_from_many_threads_at_once_closes_once(producer):
    rb = RingBuffer(producer.ring, lambda d: None)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def close() -> None:
        start.wait()
        try:
            rb.close()
        except BaseException as exc:  # noqa: BLE001 - any exception is the failure
            errors.append(exc)

    threads = [threading.Thread(target=close) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and rb.closed


def test_a_ring_kept_past_close_says_it_is_closed(producer):
    rb = RingBuffer(producer.ring, lambda d: None)
    ring = rb.rings[0]
    rb.close()
    for what in ("consumer_pos", "producer_pos", "avail_data_size"):
        with pytest.raises(ValueError, match="ring of map 'rb' is closed"):
            getattr(ring, what)
    for take in (ring.consume, ring.consume_batch, lambda: ring.consume_batch("<u8"), lambda: ring.batch("<u8").__enter__()):
        with pytest.raises(ValueError, match="ring of map 'rb' is closed"):
            take()


def map_mappings() -> list[str]:
    """This process's mappings of BPF maps (/proc/self/maps lines of anon_inode:bpf-map), sorted."""
    with open("/proc/self/maps") as f:
        return sorted(line for line in f if "bpf-map" in line)


def test_close_releases_every_fd_and_mapping(producer):
    before, mapped = open_fds(), map_mappings()
    other = bpfring.Map.create(bpfring.MapType.RINGBUF, 4096)
    rb = RingBuffer(producer.ring, lambda d: None)
    rb.add(other, lambda d: None)
    other.close()
    assert open_fds() - before  # epoll, eventfd, the rings' fds (and the dups Python's mmap keeps)
    assert len(map_mappings()) >= len(mapped) + 4  # each ring: consumer page, producer page and data
    rb.close()
    rb.close()  # idempotent
    assert open_fds() == before
    assert map_mappings() == mapped
    assert rb.closed


# -- errors ----------------------------------------------------------------------------------


def test_wrong_map_type_names_the_type_it_got(bpf):
    with bpfring.Map.create(bpfring.MapType.ARRAY, 1, 4, 4, name="not_a_ring") as m:
        before = open_fds()
        with pytest.raises(ValueError, match="BPF_MAP_TYPE_ARRAY, expected BPF_MAP_TYPE_RINGBUF"):
            RingBuffer(m, lambda d: None)
        assert open_fds() == before


def test_bad_fd_and_missing_pin_and_non_callable(bpf, tmp_path):
    before = open_fds()
    with pytest.raises(bpfring.BPFError, match="fd 987 is not an open file descriptor"):
        RingBuffer(987, lambda d: None)
    with open(tmp_path / "f", "w") as f:
        with pytest.raises(bpfring.BPFError, match="is not a BPF map"):
            RingBuffer(f.fileno(), lambda d: None)
    with pytest.raises(bpfring.BPFNotFoundError, match="/sys/fs/bpf/bpfring-no-such-pin"):
        RingBuffer("/sys/fs/bpf/bpfring-no-such-pin", lambda d: None)
    with bpfring.Map.create(bpfring.MapType.RINGBUF, 4096) as m:
        with pytest.raises(TypeError, match="callback must be callable"):
            RingBuffer(m, 42)  # type: ignore[arg-type]
    assert open_fds() == before


def test_a_ring_buffer_without_a_callback_serves_batches_and_refuses_poll_and_consume(producer):
    """Batch and async users need no callback; the callback calls say it is missing, and take nothing."""
    with RingBuffer(producer.ring) as rb:
        r = producer.produce(3)
        for call in (rb.consume, lambda: rb.poll(0), rb.rings[0].consume):
            with pytest.raises(TypeError, match="has no callback"):
                call()
        assert rb.rings[0].avail_data_size > 0
        got = rb.consume_batch()
        assert len(got) == 3
        check_records(got, r.first_seq, 16, count=3)


def test_a_pinned_ring_by_path(bpf, tmp_path):
    from bpfring._sys.mounts import BPFFS, ensure_bpffs

    ensure_bpffs()
    path = f"{BPFFS}/bpfring-test-{os.getpid()}"
    with bpfring.Map.create(bpfring.MapType.RINGBUF, 8192) as m:
        m.pin(path)
    try:
        with RingBuffer(path, lambda d: None) as rb:
            assert rb.rings[0].size == 8192
    finally:
        os.unlink(path)


# -- a ring another process writes into ------------------------------------------------------------


def write_consumer_pos(ring: bpfring.Ring, value: int) -> None:
    """What any process holding the map can do: map the consumer page read-write and store."""
    import mmap

    with mmap.mmap(ring.map_fd, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE) as page:
        page[:8] = value.to_bytes(8, "little")


def test_a_corrupt_ring_does_not_stop_the_healthy_ones_and_resync_resumes_it(make_producer):
    """One of two rings gets a consumer_pos past its producer: the other's records are delivered
    by the same calls, the error names the bad ring, poll() stops waking for it (no spin), and
    after resync() its new records arrive exactly once."""
    bad, good = make_producer(ring_size=4096), make_producer(ring_size=4096)
    got: dict[str, list[bytes]] = {"bad": [], "good": []}
    with RingBuffer() as rb:
        rb.add(bad.ring, got["bad"].append)
        rb.add(good.ring, got["good"].append)
        bad.produce(2)
        write_consumer_pos(rb.rings[0], 1 << 40)
        r = good.produce(3)
        with pytest.raises(bpfring.RingCorruptError, match="ring 0 of map 'rb'") as info:
            rb.consume()
        assert info.value.ring == 0 and info.value.map_id == rb.rings[0].map.id
        assert len(got["good"]) == 3 and got["bad"] == []
        check_records(got["good"], r.first_seq, 16, count=3)
        # Left out of the epoll: a poll() loop that logs the error and goes on waits, not spins.
        start = time.monotonic()
        assert rb.poll(200) == 0
        assert time.monotonic() - start >= 0.15
        assert rb.rings[0].consumer_pos == 1 << 40  # left as found
        # Batches: the healthy ring's records come with the next call, once.
        r = good.produce(2)
        with pytest.raises(bpfring.RingCorruptError):
            rb.consume_batch()
        batch = rb.consume_batch()
        assert len(batch) == 2
        for _ in range(2):  # still corrupt: each call says so again; the healthy ring is empty
            with pytest.raises(bpfring.RingCorruptError):
                rb.consume_batch()
        check_records(batch, r.first_seq, 16, count=2)
        assert rb.rings[0].resync() == 2 * 24  # two 16-byte records and their headers
        r = bad.produce(4)
        assert rb.poll(1000) == 4 and rb.consume() == 0
        assert len(got["bad"]) == 4
        check_records(got["bad"], r.first_seq, 16, count=4)

"""Batches: consume_batch() with and without a dtype, and the zero-copy batch() view."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import open_fds
from producer import expected_fixed, expected_record, parse

import bpfring
from bpfring import PerfBuffer, RecordSizeError, RingBuffer

# struct fixed_rec of tests/bpf/producer.h
FIXED = np.dtype([("seq", "<u8"), ("producer", "<u4"), ("size", "<u4"), ("payload", "u1", (48,))])


def expected_array(first_seq: int, count: int, producer: int = 0, skip=lambda seq: False) -> np.ndarray:
    rows = [expected_fixed(s, producer) for s in range(first_seq, first_seq + count) if not skip(s)]
    return np.frombuffer(b"".join(rows), dtype=FIXED)


def nothing(data: bytes) -> None:
    raise AssertionError("the callback is bypassed by batches")


def address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def over_the_ring(array: np.ndarray) -> bool:
    """Whether ``array``'s memory is a ring mapping (its chain of bases ends in a memoryview of one)."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview)


def test_consume_batch_with_a_dtype_copies_every_record(producer):
    with RingBuffer(producer.ring, nothing) as rb:
        ring = rb.rings[0]
        r = producer.produce(300, fixed=True)
        start = ring.consumer_pos
        records = rb.consume_batch(FIXED)
        assert ring.avail_data_size == 0
        while ring.consumer_pos < start + 2 * ring.size:  # producers overwrite that space, twice over
            producer.produce(100, fixed=True)
            assert len(rb.consume_batch(FIXED)) == 100
        producer.produce(3, fixed=True)
        with rb.batch(FIXED) as view:
            assert over_the_ring(view) and not view.flags.writeable  # what a view looks like
            assert not np.shares_memory(records, view)
    assert records.dtype == FIXED and len(records) == 300
    assert records.tobytes() == expected_array(r.first_seq, 300).tobytes()  # the copy did not change
    assert records.flags.writeable and not over_the_ring(records)  # a copy, not a view


def test_consume_batch_bytes_stay_intact_after_their_ring_space_is_overwritten(producer):
    """The list of bytes is copies: valid forever, whatever producers write into the ring later."""
    with RingBuffer(producer.ring, nothing) as rb:
        ring = rb.rings[0]
        r = producer.produce(100, 40)
        start = ring.consumer_pos
        kept = rb.consume_batch()
        while ring.consumer_pos < start + 2 * ring.size:  # the ring lapped twice over their space
            producer.produce(100, 40, producer=7)
            assert len(rb.consume_batch()) == 100
    assert all(type(k) is bytes for k in kept)
    assert kept == [expected_record(r.first_seq + i, 0, 40) for i in range(100)]


@pytest.mark.parametrize("size, count", [(8, 500), (16, 500), (24, 500), (40, 500), (16, 70000)])
def test_consume_batch_copies_records_of_every_size(make_producer, size, count):
    """Each way records are copied (small, any size, and a large batch of 16-byte multiples)."""
    producer = make_producer(ring_size=4 << 20)
    with RingBuffer(producer.ring, nothing) as rb:
        r = producer.produce(count, size)
        records = rb.consume_batch(f"V{size}")
    want = b"".join(expected_record(s, 0, size) for s in range(r.first_seq, r.first_seq + count))
    assert len(records) == count and records.tobytes() == want


def test_consume_batch_accepts_anything_numpy_accepts_as_a_dtype(producer):
    with RingBuffer(producer.ring, nothing) as rb:
        r = producer.produce(4, fixed=True)
        records = rb.consume_batch("<u8,<u4,<u4,48u1")
    assert records["f0"].tolist() == list(range(r.first_seq, r.first_seq + 4))


def test_discarded_records_are_skipped_by_batches(producer):
    with RingBuffer(producer.ring, nothing) as rb:
        r = producer.produce(90, fixed=True, discard_every=4)
        records = rb.consume_batch(FIXED)
        assert rb.rings[0].avail_data_size == 0
    skip = lambda seq: seq % 4 == 0  # noqa: E731
    assert records.tobytes() == expected_array(r.first_seq, 90, skip=skip).tobytes()


def test_discarded_records_of_other_sizes_do_not_end_a_batch(producer):
    with RingBuffer(producer.ring, nothing) as rb:
        first = producer.produce(3, fixed=True)
        producer.produce(2, 16, discard_every=1, producer=9)  # two 16-byte records, both discarded
        producer.produce(3, fixed=True)
        producer.produce(1, 200, discard_every=1, producer=9)
        records = rb.consume_batch(FIXED)  # every record available now, in one call
        assert rb.rings[0].avail_data_size == 0  # the trailing discard is released too
    assert records.tobytes() == expected_array(first.first_seq, 6).tobytes()


def test_large_batches_reuse_memory_only_once_no_array_is_on_it(make_producer):
    """A batch of 1 MiB or more is built on memory bpfring keeps for the next large batch once
    every array on it (views included) is gone, so batch after batch does not fault pages in."""
    producer = make_producer(ring_size=4 << 20)
    n = 20000  # 1.28 MB of records; three batches wrap the end of the 4 MiB ring
    bpfring.release_batch_memory()
    with RingBuffer(producer.ring, nothing) as rb:
        first = producer.produce(n, fixed=True).first_seq
        a = rb.consume_batch(FIXED)
        a_address = address(a)
        part = a[100:200]  # a view keeps the memory too
        del a
        producer.produce(n, fixed=True)
        b = rb.consume_batch(FIXED)
        assert not np.shares_memory(part, b)
        assert part.tobytes() == expected_array(first + 100, 100).tobytes()
        del part  # now the first batch's memory is kept...
        producer.produce(n, fixed=True)
        c = rb.consume_batch(FIXED)  # ...and this one is built on it
        assert not np.shares_memory(b, c) and c.flags.writeable
        assert address(c) == a_address
        assert bpfring.release_batch_memory() == 0  # c holds what was kept
        del b
        released = bpfring.release_batch_memory()  # b's block, kept once b was freed
        assert n * FIXED.itemsize <= released <= n * FIXED.itemsize + 4096, released
        assert bpfring.release_batch_memory() == 0
        producer.produce(n, fixed=True)
        d = rb.consume_batch(FIXED)
    assert c.tobytes() == expected_array(first + 2 * n, n).tobytes()
    assert d.tobytes() == expected_array(first + 3 * n, n).tobytes()


def test_a_large_batch_keeps_its_records_while_later_batches_reuse_memory(make_producer):
    producer = make_producer(ring_size=4 << 20)
    n = 20000
    with RingBuffer(producer.ring, nothing) as rb:
        first = producer.produce(n, fixed=True).first_seq
        kept = rb.consume_batch(FIXED)
        for _ in range(3):  # each of these is freed before the next: they reuse one block
            producer.produce(n, fixed=True)
            assert len(rb.consume_batch(FIXED)) == n
    assert kept.tobytes() == expected_array(first, n).tobytes()


def test_consume_batch_without_dtype_gives_bytes_like_the_callback(producer):
    with RingBuffer(producer.ring, nothing) as rb:
        r = producer.produce(50, (1, 500), discard_every=7)
        records = rb.consume_batch()
    from producer import record_size

    want = [
        expected_record(s, 0, record_size(s, 1, 500)) for s in range(r.first_seq, r.first_seq + 50) if s % 7
    ]
    assert records == want


def test_max_records(producer):
    with RingBuffer(producer.ring, nothing) as rb:
        producer.produce(10, fixed=True)
        assert len(rb.consume_batch(FIXED, max_records=4)) == 4
        assert [len(b) for b in rb.consume_batch(max_records=3)] == [64] * 3
        assert rb.consume_batch(FIXED)["seq"].tolist() == [7, 8, 9]
        assert len(rb.consume_batch(FIXED)) == 0


def test_a_record_of_another_size_raises_and_stays(producer):
    with RingBuffer(producer.ring, lambda d: None) as rb:
        first = producer.produce(3, fixed=True)
        producer.produce(2, 16, producer=9)
        records = rb.consume_batch(FIXED)  # the run of fitting records before it
        assert records["seq"].tolist() == list(range(first.first_seq, first.first_seq + 3))
        with pytest.raises(RecordSizeError, match="is 16 bytes, dtype .* expects 64; it stays in the ring"):
            rb.consume_batch(FIXED)
        with pytest.raises(RecordSizeError, match="is 16 bytes"):
            with rb.batch(FIXED):
                pass
        assert rb.consume() == 2  # still there, readable with the callback


def test_batches_across_at_least_50_laps_of_the_ring(make_producer):
    producer = make_producer(ring_size=16 * 1024)  # 16384 is not a multiple of the 72-byte stride
    got = []
    with RingBuffer(producer.ring, nothing) as rb:
        ring = rb.rings[0]
        first = None
        while ring.consumer_pos < 55 * ring.size:
            r = producer.produce(200, fixed=True)
            assert r.dropped == 0
            first = r.first_seq if first is None else first
            if len(got) % 2:
                got.append(rb.consume_batch(FIXED))
            else:
                with rb.batch(FIXED) as view:
                    got.append(view.copy())
    records = np.concatenate(got)
    assert records.tobytes() == expected_array(first, len(records)).tobytes()


def test_zero_copy_view_holds_the_records_until_the_block_exits(producer):
    with RingBuffer(producer.ring, nothing) as rb:
        ring = rb.rings[0]
        r = producer.produce(100, fixed=True)
        start = ring.consumer_pos
        with rb.batch(FIXED) as records:
            assert not records.flags.writeable and not records.flags.owndata  # a view into the ring
            assert ring.consumer_pos == start  # still reserved for us
            assert records.tobytes() == expected_array(r.first_seq, 100).tobytes()
            assert records["seq"].sum() == sum(range(r.first_seq, r.first_seq + 100))
        assert ring.consumer_pos == start + 100 * 72 == ring.producer_pos


def test_zero_copy_block_that_raises_leaves_the_records(producer):
    with RingBuffer(producer.ring, nothing) as rb:
        producer.produce(10, fixed=True)
        with pytest.raises(RuntimeError):
            with rb.batch(FIXED) as records:
                assert len(records) == 10
                raise RuntimeError("not now")
        assert len(rb.consume_batch(FIXED)) == 10


def test_zero_copy_stops_before_a_discard_and_the_next_batch_skips_it(producer):
    with RingBuffer(producer.ring, nothing) as rb:
        r = producer.produce(10, fixed=True, discard_every=5)  # seqs 0 and 5 are discarded
        runs = []
        while True:
            with rb.batch(FIXED) as view:
                if not len(view):
                    break
                runs.append(view["seq"].tolist())
    assert runs == [[1, 2, 3, 4], [6, 7, 8, 9]]
    assert r.discarded == 2


def test_closing_while_a_view_is_alive_does_not_crash(producer):
    before = open_fds()
    rb = RingBuffer(producer.ring, nothing)
    producer.produce(3, fixed=True)
    with rb.batch(FIXED) as view:
        kept = view
    rb.close()
    assert rb.closed
    assert len(kept) == 3 and kept["size"].tolist() == [64] * 3  # still mapped while referenced
    del kept, view
    assert open_fds() == before  # the mapping (and, before Python 3.13, mmap's dup of the fd) went with the view


def test_a_ring_closed_inside_its_zero_copy_block_is_left_alone(producer):
    rb = RingBuffer(producer.ring, nothing)
    producer.produce(3, fixed=True)
    ring = rb.rings[0]
    with ring.batch(FIXED) as view:
        assert len(view) == 3
        ring.close()
    assert ring.closed
    rb.close()


def test_batch_needs_one_ring_and_merges_many_for_consume_batch(make_producer):
    a, b = make_producer(), make_producer()
    with RingBuffer(a.ring, nothing) as rb:
        rb.add(b.ring, nothing)
        a.produce(3, fixed=True)
        b.produce(2, fixed=True, producer=1)
        with pytest.raises(ValueError, match="batch\\(\\) needs exactly one ring, this RingBuffer has 2"):
            with rb.batch(FIXED):
                pass
        records = rb.consume_batch(FIXED)
        assert records["producer"].tolist() == [0, 0, 0, 1, 1]
        a.produce(3, fixed=True, discard_every=3)  # seq 3 discarded
        b.produce(4, fixed=True, producer=1)
        out = np.zeros(10, dtype=FIXED)
        first = rb.consume_batch(FIXED, max_records=3, out=out)
        rest = rb.consume_batch(FIXED, out=out[3:])
        assert rb.consume_batch(FIXED).size == 0
    assert np.shares_memory(first, out) and np.shares_memory(rest, out)
    assert list(zip(out["producer"][:6].tolist(), out["seq"][:6].tolist())) == [(0, 4), (0, 5), (1, 2), (1, 3), (1, 4), (1, 5)]
    assert out[6:].tobytes() == bytes(4 * FIXED.itemsize)


# -- PerfBuffer.consume_batch ------------------------------------------------------------------

# a 20-byte sample of tests/perf_producer.py: struct rec_hdr, then 4 pattern bytes
PERF20 = np.dtype([("seq", "<u8"), ("producer", "<u4"), ("size", "<u4"), ("tail", "u1", (4,))])


def test_perf_consume_batch_with_a_dtype_and_the_cpus(perf_producer):
    cpus = sorted(os.sched_getaffinity(0))[:2]
    with PerfBuffer(perf_producer.array, 8, nothing, cpus=cpus) as pb:
        for cpu in cpus:
            perf_producer.output(40, 20, cpu=cpu)
        got_cpus, records = pb.consume_batch(PERF20, with_cpus=True)
        assert pb.consume_batch(PERF20).size == 0
    assert len(records) == 40 * len(cpus)
    for cpu in cpus:
        mine = records[got_cpus == cpu]
        assert mine["seq"].tolist() == list(range(40))
        assert (mine["size"] == 20).all()
    assert records.tobytes()[:16] == expected_record(0, records[0]["producer"], 20)[:16]


def test_perf_consume_batch_pads_and_mismatches(perf_producer):
    with PerfBuffer(perf_producer.array, 8, nothing, cpus=[0]) as pb:
        perf_producer.output(5, 16, cpu=0)  # the kernel pads 16-byte samples to 20
        perf_producer.output(3, 40, cpu=0)  # padded to 44
        records = pb.consume_batch(np.dtype([("seq", "<u8"), ("producer", "<u4"), ("size", "<u4")]))
        assert records["seq"].tolist() == [0, 1, 2, 3, 4] and (records["size"] == 16).all()
        with pytest.raises(RecordSizeError, match="is 44 bytes, the dtype expects 16"):
            pb.consume_batch(np.dtype([("seq", "<u8"), ("producer", "<u4"), ("size", "<u4")]))
        assert [len(b) for b in pb.consume_batch()] == [44, 44, 44]  # still there; padded too


# struct rec_hdr of a 64-byte perf sample (the kernel reports 68 bytes: 4 of padding, dropped)
PERF64 = np.dtype([("seq", "<u8"), ("producer", "<u4"), ("size", "<u4"), ("tail", "u1", (48,))])


def test_perf_consume_batch_with_a_dtype_reports_lost_samples_and_wraps_the_ring(perf_producer):
    lost: list[tuple[int, int]] = []
    with PerfBuffer(perf_producer.array, 1, nothing, lambda cpu, n: lost.append((cpu, n)), cpus=[0]) as pb:
        got = []
        for _ in range(3):  # one page: each round overfills it, and the samples wrap its end
            out = perf_producer.output(100, 64, cpu=0)
            assert out.failed > 0
            got.append(pb.consume_batch(PERF64))
            assert len(got[-1]) == out.produced
        records = np.concatenate(got)
    # each loss is reported with the next sample that fits: the first two here, once each
    assert [n for cpu, n in lost] == [100 - len(got[0]), 100 - len(got[1])] and {cpu for cpu, _ in lost} == {0}
    seqs = [seq for r in range(3) for seq in range(100 * r, 100 * r + len(got[r]))]
    assert records["seq"].tolist() == seqs
    assert records.tobytes() == b"".join(expected_record(seq, 0, 64) for seq in seqs)


def test_a_lost_cb_that_raises_during_a_perf_batch_loses_no_sample(perf_producer):
    def lose(cpu: int, n: int) -> None:
        raise RuntimeError("lost!")

    with PerfBuffer(perf_producer.array, 1, nothing, lose, cpus=[0]) as pb:
        full = perf_producer.output(100, 64, cpu=0)
        assert len(pb.consume_batch(PERF64)) == full.produced
        perf_producer.output(3, 64, cpu=0)  # the loss is reported before these
        with pytest.raises(RuntimeError, match="lost!"):
            pb.consume_batch(PERF64)
        records = pb.consume_batch(PERF64)  # the samples that call took come now, once
        assert pb.consume_batch(PERF64).size == 0
    assert records["seq"].tolist() == [100, 101, 102]


def test_perf_consume_batch_max_records_and_out(perf_producer):
    cpus = sorted(os.sched_getaffinity(0))[:2]
    with PerfBuffer(perf_producer.array, 8, nothing, cpus=cpus) as pb:
        for cpu in cpus:
            perf_producer.output(5, 64, cpu=cpu)
        first = pb.consume_batch(PERF64, 3)  # CPU by CPU: the first three of the first CPU
        out = np.zeros(20, dtype=PERF64)
        got_cpus, rest = pb.consume_batch(PERF64, out=out, with_cpus=True)
        assert pb.consume_batch(PERF64).size == 0
        for cpu in cpus:
            perf_producer.output(3, 64, cpu=cpu)
        two = pb.consume_batch(max_records=2)
        others = pb.consume_batch()
        with pytest.raises(TypeError, match="out= needs a dtype"):
            pb.consume_batch(out=out)
        with pytest.raises(ValueError, match="max_records must be at least 1"):
            pb.consume_batch(PERF64, 0)
    assert first["producer"].tolist() == [cpus[0]] * 3 and first["seq"].tolist() == [0, 1, 2]
    assert np.shares_memory(rest, out) and len(rest) == 5 * len(cpus) - 3
    assert rest["seq"].tolist() == [3, 4] + [0, 1, 2, 3, 4] * (len(cpus) - 1)
    assert got_cpus.tolist() == [cpus[0]] * 2 + [c for c in cpus[1:] for _ in range(5)]
    assert [parse(d)[:2] for d in two] == [(5, cpus[0]), (6, cpus[0])]
    assert [parse(d)[:2] for d in others] == [(7, cpus[0])] + [(s, c) for c in cpus[1:] for s in (5, 6, 7)]

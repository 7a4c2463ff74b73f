"""PerfBuffer against the real kernel, with samples output by tests/bpf/perf_producer.bpf.c."""

from __future__ import annotations

import errno
import mmap
import os
import resource
import signal
import sys
import threading
import time

import pytest
from conftest import open_fds
from perf_producer import padded_size, record_bytes
from producer import expected_record, parse, record_size

import bpfring
from bpfring._sys.perf import ONLINE_CPUS, online_cpus
from bpfring.perfbuf import PerfBuffer


@pytest.fixture
def two_cpus():
    cpus = online_cpus()
    if len(cpus) < 2:
        pytest.skip("needs two online CPUs")
    return cpus[:2]


class Collector:
    """sample_cb and lost_cb that keep what they receive."""

    def __init__(self) -> None:
        self.samples: list[tuple[int, bytes]] = []
        self.lost: list[tuple[int, int]] = []

    def sample(self, cpu: int, data: bytes) -> None:
        self.samples.append((cpu, data))

    def lose(self, cpu: int, lost: int) -> None:
        self.lost.append((cpu, lost))

    def seqs(self, cpu: int) -> list[int]:
        return [parse(d)[0] for c, d in self.samples if c == cpu]


def poll_forever_returns(pb: PerfBuffer) -> int:
    """pb.poll(-1), which must return without a new wakeup: the data is already there."""
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(pb.poll(-1)))
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "poll() waited for a wakeup although samples were left to read"
    return result[0]


def check_sample(cpu: int, data: bytes, size: int | tuple[int, int]) -> int:
    """The sample is the one the program output on ``cpu`` for its sequence number; returns it."""
    seq, producer, got_size = parse(data)
    lo, hi = (size, size) if isinstance(size, int) else size
    want = record_size(seq, lo, hi)
    assert (producer, got_size) == (cpu, want), f"sample {seq} came from cpu {producer} with size {got_size}"
    assert len(data) == padded_size(want), f"sample {seq}: {len(data)} bytes for a {want}-byte sample"
    assert data[:want] == expected_record(seq, cpu, want), f"sample {seq} of cpu {cpu} corrupt"
    return seq


def test_samples_from_both_cpus_arrive_once_intact_and_in_order(perf_producer, two_cpus):
    got = Collector()
    sizes = (16, 200)
    outputs: dict[int, list] = {cpu: [] for cpu in two_cpus}

    def run(cpu: int) -> None:
        for _ in range(20):
            outputs[cpu].append(perf_producer.output(100, sizes, cpu=cpu))

    # 128 pages per CPU hold all 2000 samples of a CPU: nothing can be lost, whatever the timing.
    with PerfBuffer(perf_producer.array, 128, got.sample, got.lose) as pb:
        assert sorted(pb.cpus) == sorted(online_cpus()) and pb.buffer_cnt == len(pb.cpus)
        threads = [threading.Thread(target=run, args=(cpu,)) for cpu in two_cpus]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            pb.poll(50)
        for t in threads:
            t.join()
        pb.consume()
    assert got.lost == []
    for cpu in two_cpus:
        assert sum(o.produced for o in outputs[cpu]) == 2000
        for c, data in got.samples:
            if c == cpu:
                check_sample(cpu, data, sizes)
        assert got.seqs(cpu) == list(range(2000)), f"cpu {cpu}: a sample missing, repeated or out of order"
    assert {c for c, _ in got.samples} == set(two_cpus)


def test_every_size_from_1_to_64_bytes_with_the_kernels_padding(perf_producer):
    got = Collector()
    with PerfBuffer(perf_producer.array, 1, got.sample, cpus=[0]) as pb:
        for size in range(1, 65):
            out = perf_producer.output(1, size, cpu=0)
            assert pb.consume() == 1
            cpu, data = got.samples[-1]
            # the program's bytes, then padding up to the raw_size the kernel reports
            assert cpu == 0 and len(data) == padded_size(size) and len(data) % 8 == 4
            assert data[:size] == expected_record(out.first_seq, 0, size)


def test_an_overfilled_buffer_reports_lost_samples_and_delivered_plus_lost_equals_produced(perf_producer):
    got = Collector()
    with PerfBuffer(perf_producer.array, 1, got.sample, got.lose, cpus=[0]) as pb:
        first = perf_producer.output(200, 64, cpu=0)
        assert first.failed > 0, "one page cannot hold 200 samples of 80 bytes"
        assert first.last_err == -errno.ENOSPC
        assert pb.consume() == first.produced
        assert got.lost == []  # the kernel reports a loss with the next sample that fits
        second = perf_producer.output(1, 64, cpu=0)
        assert second.produced == 1
        assert pb.consume() == 1
    assert got.lost == [(0, first.failed)]
    assert len(got.samples) + first.failed == 201
    assert got.seqs(0) == list(range(first.produced)) + [200]
    for cpu, data in got.samples:
        check_sample(cpu, data, 64)


def test_at_least_50_laps_of_a_small_buffer_lose_and_repeat_nothing(perf_producer):
    got = Collector()
    sizes = (16, 300)  # record sizes of 28..316 bytes: most do not divide 4096
    with PerfBuffer(perf_producer.array, 1, got.sample, got.lose, cpus=[0]) as pb:
        ring = pb.buffer_size
        assert ring == 4096
        consumed = 0
        while consumed < 55 * ring:
            out = perf_producer.output(10, sizes, cpu=0)  # at most 3160 bytes: always fits
            assert out.failed == 0
            assert pb.poll(5000) == 10
            consumed += sum(12 + len(data) for _, data in got.samples[-10:])
    assert got.lost == []
    assert got.seqs(0) == list(range(len(got.samples)))
    pos, wrapped = 0, 0
    for cpu, data in got.samples:
        check_sample(cpu, data, sizes)
        size = record_bytes(parse(data)[2])
        wrapped += pos % ring + size > ring
        pos += size
    assert pos // ring >= 50
    assert wrapped >= 25, "samples that straddle the end of the buffer were not exercised"


def test_batch_and_async_bytes_stay_intact_after_their_ring_space_is_overwritten(perf_producer):
    """consume_batch() and async for hand out copies: valid after the 4 KiB ring lapped twice over them."""
    import asyncio

    def lap_twice(pb: PerfBuffer) -> None:
        for _ in range(2 * 4096 // (20 * record_bytes(40)) + 1):
            perf_producer.output(20, 40, cpu=0)
            assert len(pb.consume_batch()) == 20

    async def iterate(pb: PerfBuffer) -> list[bytes]:
        got: list[bytes] = []
        async for _cpu, data in pb.records():
            got.append(data)
            if len(got) == 20:
                break
        return got

    with PerfBuffer(perf_producer.array, 1, cpus=[0]) as pb:
        assert pb.buffer_size == 4096
        first = perf_producer.output(20, 40, cpu=0).first_seq
        batch = pb.consume_batch()
        lap_twice(pb)
        later = perf_producer.output(20, 40, cpu=0).first_seq
        iterated = asyncio.run(asyncio.wait_for(iterate(pb), 60))
        lap_twice(pb)
    for kept, seq0 in ((batch, first), (iterated, later)):
        assert len(kept) == 20 and all(type(k) is bytes for k in kept)
        assert [check_sample(0, data, 40) for data in kept] == list(range(seq0, seq0 + 20))


def test_wakeup_events_wakes_every_nth_sample_and_consume_drains_the_rest(perf_producer):
    got = Collector()
    with PerfBuffer(perf_producer.array, 4, got.sample, cpus=[0], wakeup_events=4) as pb:
        perf_producer.output(3, 32, cpu=0)
        assert pb.poll(300) == 0, "3 samples woke a reader that asked for a wakeup every 4"
        assert got.samples == []
        perf_producer.output(1, 32, cpu=0)
        assert pb.poll(10_000) == 4
        perf_producer.output(2, 32, cpu=0)
        assert pb.poll(300) == 0  # the timeout consumes nothing
        assert pb.consume() == 2
    assert got.seqs(0) == list(range(6))


def test_consume_buffer_and_buffer_fd_address_one_cpu(perf_producer, two_cpus):
    got = Collector()
    with PerfBuffer(perf_producer.array, 2, got.sample, cpus=two_cpus) as pb:
        assert pb.cpus == tuple(two_cpus)
        fds = [pb.buffer_fd(i) for i in range(pb.buffer_cnt)]
        assert all(os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[perf_event]" for fd in fds)
        perf_producer.output(5, 40, cpu=two_cpus[1])
        assert pb.consume_buffer(0) == 0
        assert pb.consume_buffer(1) == 5
        assert {c for c, _ in got.samples} == {two_cpus[1]}
        with pytest.raises(IndexError, match="buffer index 2 out of range: this PerfBuffer has 2 buffers"):
            pb.buffer_fd(2)
        with pytest.raises(IndexError, match="buffer index -1"):
            pb.consume_buffer(-1)


def test_fileno_is_pollable_by_selectors(perf_producer):
    import selectors

    with PerfBuffer(perf_producer.array, 1, lambda c, d: None, cpus=[0]) as pb, selectors.DefaultSelector() as sel:
        sel.register(pb.fileno(), selectors.EVENT_READ)
        assert sel.select(0) == []
        perf_producer.output(1, 16, cpu=0)
        assert len(sel.select(5)) == 1
        assert pb.consume() == 1  # the selector took the one-shot perf wakeup: consume, not poll


def test_close_releases_every_fd_and_clears_the_array_slots(perf_producer):
    cpus = online_cpus()
    before = open_fds()
    pb = PerfBuffer(perf_producer.array, 2, lambda c, d: None)
    assert open_fds() - before  # epoll, eventfd, the map's dup, the perf events (and mmap's dups)
    for cpu in cpus:
        assert perf_producer.output(2, 16, cpu=cpu).produced == 2  # the slots are set
    pb.close()
    pb.close()  # idempotent
    assert pb.closed
    assert open_fds() == before
    for cpu in cpus:
        out = perf_producer.output(2, 16, cpu=cpu)
        assert (out.produced, out.last_err) == (0, -errno.ENOENT), f"cpu {cpu}'s slot still holds an event"
    with pytest.raises(ValueError, match="PerfBuffer is closed"):
        pb.poll(0)


def test_close_from_another_thread_wakes_a_blocked_poll(perf_producer):
    pb = PerfBuffer(perf_producer.array, 1, lambda c, d: None)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(pb.poll(30_000)))
    t.start()
    time.sleep(0.2)
    # close() from a third thread: it must not merely wait for the 30 s poll to end by itself
    closer = threading.Thread(target=pb.close)
    closer.start()
    t.join(timeout=10)
    assert not t.is_alive(), "poll() did not return after close()"
    closer.join(timeout=10)
    assert not closer.is_alive() and pb.closed
    assert result == [0]


def test_a_pinned_array_by_path(perf_producer, tmp_path):
    from bpfring._sys.mounts import BPFFS, ensure_bpffs

    ensure_bpffs()
    path = f"{BPFFS}/bpfring-perf-test-{os.getpid()}"
    perf_producer.array.pin(path)
    got = Collector()
    try:
        before = open_fds()
        with PerfBuffer(path, 1, got.sample, cpus=[0]) as pb:
            perf_producer.output(3, 24, cpu=0)
            assert pb.poll(5000) == 3
        assert open_fds() == before
        assert perf_producer.output(1, 24, cpu=0).last_err == -errno.ENOENT
    finally:
        os.unlink(path)
    assert got.seqs(0) == [0, 1, 2]


# -- callbacks that raise or stop -----------------------------------------------------------------


def test_a_sample_cb_that_raises_midway_then_the_rest_exactly_once(perf_producer):
    got = Collector()

    def sample(cpu: int, data: bytes) -> None:
        got.sample(cpu, data)
        if len(got.samples) == 5:
            raise RuntimeError("boom")

    with PerfBuffer(perf_producer.array, 2, sample, cpus=[0]) as pb:
        perf_producer.output(20, 48, cpu=0)
        with pytest.raises(RuntimeError, match="boom"):
            pb.poll(5000)
        assert len(got.samples) == 5
        # epoll reports a perf wakeup once: the next poll still reads what the exception left
        assert poll_forever_returns(pb) == 15
        assert pb.consume() == 0
    assert got.seqs(0) == list(range(20))


def test_after_a_consume_cut_short_poll_reads_the_rest_without_a_new_wakeup(perf_producer):
    import selectors

    got = Collector()

    def sample(cpu: int, data: bytes) -> None:
        got.sample(cpu, data)
        if len(got.samples) == 3:
            raise RuntimeError("boom")

    with PerfBuffer(perf_producer.array, 1, sample, cpus=[0]) as pb, selectors.DefaultSelector() as sel:
        sel.register(pb.fileno(), selectors.EVENT_READ)
        perf_producer.output(10, 32, cpu=0)
        assert len(sel.select(5)) == 1  # takes the only wakeup these samples send
        with pytest.raises(RuntimeError, match="boom"):
            pb.consume()
        assert poll_forever_returns(pb) == 7
    assert got.seqs(0) == list(range(10))


def test_a_lost_cb_that_raises_then_the_samples_after_it(perf_producer):
    seen: list[str] = []

    def lose(cpu: int, lost: int) -> None:
        seen.append(f"lost {lost}")
        raise RuntimeError("lost!")

    with PerfBuffer(perf_producer.array, 1, lambda c, d: seen.append("sample"), lose, cpus=[0]) as pb:
        full = perf_producer.output(100, 64, cpu=0)
        assert pb.consume() == full.produced
        perf_producer.output(2, 64, cpu=0)
        with pytest.raises(RuntimeError, match="lost!"):
            pb.consume()
        assert pb.consume() == 2
    assert seen == ["sample"] * full.produced + [f"lost {full.failed}", "sample", "sample"]


def test_a_negative_return_stops_and_is_returned(perf_producer):
    got = Collector()

    def sample(cpu: int, data: bytes) -> int:
        got.sample(cpu, data)
        return -42 if len(got.samples) == 3 else 0

    with PerfBuffer(perf_producer.array, 1, sample, cpus=[0]) as pb:
        perf_producer.output(10, 24, cpu=0)
        assert pb.poll(5000) == -42
        assert len(got.samples) == 3  # the third sample counts as consumed
        assert pb.consume() == 7
    assert got.seqs(0) == list(range(10))


def test_ctrl_c_in_a_callback_loses_and_repeats_nothing(perf_producer):
    got = Collector()

    def sample(cpu: int, data: bytes) -> None:
        got.sample(cpu, data)
        if len(got.samples) == 50:
            os.kill(os.getpid(), signal.SIGINT)

    with PerfBuffer(perf_producer.array, 4, sample, cpus=[0]) as pb:
        perf_producer.output(100, 32, cpu=0)
        with pytest.raises(KeyboardInterrupt):
            pb.poll(5000)
        assert len(got.samples) == 50
        assert pb.consume() == 50
    assert got.seqs(0) == list(range(100))


def test_close_from_a_callback_is_refused(perf_producer):
    holder: list[PerfBuffer] = []
    with PerfBuffer(perf_producer.array, 1, lambda c, d: holder[0].close(), cpus=[0]) as pb:
        holder.append(pb)
        perf_producer.output(1, 16, cpu=0)
        with pytest.raises(RuntimeError, match="return a negative value to stop"):
            pb.poll(5000)


@pytest.mark.parametrize("call", ["poll", "consume", "consume_batch"])
def test_consuming_from_a_callback_is_refused_not_a_deadlock(perf_producer, call):
    got: list[bytes] = []

    def sample(cpu: int, data: bytes) -> None:
        got.append(data)
        if len(got) == 1:  # the first sample's callback calls back into the buffer
            getattr(pb, call)(*([0] if call == "poll" else []))

    with PerfBuffer(perf_producer.array, 1, sample, cpus=[0]) as pb:
        perf_producer.output(2, 16, cpu=0)
        with pytest.raises(RuntimeError, match="PerfBuffer: this thread is already consuming"):
            pb.poll(5000)
        assert pb.consume() == 1  # the second sample waited in the ring
    assert [parse(d)[0] for d in got] == [0, 1]


# -- errors ----------------------------------------------------------------------------------------


def test_wrong_map_type_names_the_type_it_got(bpf):
    with bpfring.Map.create(bpfring.MapType.RINGBUF, 4096, name="not_perf") as m:
        before = open_fds()
        with pytest.raises(ValueError, match="BPF_MAP_TYPE_RINGBUF, expected BPF_MAP_TYPE_PERF_EVENT_ARRAY"):
            PerfBuffer(m, 8, lambda c, d: None)
        assert open_fds() == before


@pytest.mark.parametrize("page_cnt", [3, 6, 12, 1000])
def test_page_cnt_must_be_a_power_of_two(bpf, page_cnt):
    with bpfring.Map.create(bpfring.MapType.PERF_EVENT_ARRAY, 64, 4, 4) as m:
        before = open_fds()
        with pytest.raises(ValueError, match=f"page_cnt must be a power of two, got {page_cnt}"):
            PerfBuffer(m, page_cnt, lambda c, d: None)
        assert open_fds() == before


def test_bad_arguments_are_named(bpf):
    with bpfring.Map.create(bpfring.MapType.PERF_EVENT_ARRAY, 64, 4, 4) as m:
        before = open_fds()
        with pytest.raises(ValueError, match="page_cnt must be at least 1, got 0"):
            PerfBuffer(m, 0)
        with pytest.raises(ValueError, match="wakeup_events must be at least 1, got 0"):
            PerfBuffer(m, 1, wakeup_events=0)
        with pytest.raises(TypeError, match="sample_cb must be callable, got int"):
            PerfBuffer(m, 1, 42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="lost_cb must be callable, got str"):
            PerfBuffer(m, 1, None, "x")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="cpus is empty"):
            PerfBuffer(m, 1, cpus=[])
        with pytest.raises(ValueError, match=r"cpus \[0, 0\] names a CPU more than once"):
            PerfBuffer(m, 1, cpus=[0, 0])
        assert open_fds() == before


@pytest.mark.parametrize("cpu", [-1, 4096])
def test_a_cpu_that_is_not_online_is_refused(bpf, cpu):
    with open(ONLINE_CPUS) as f:
        online = f.read().strip()  # the kernel's own cpulist, e.g. "0-1"
    with bpfring.Map.create(bpfring.MapType.PERF_EVENT_ARRAY, 64, 4, 4) as m:
        before = open_fds()
        with pytest.raises(ValueError) as exc:
            PerfBuffer(m, 1, cpus=[0, cpu])
        assert str(exc.value) == f"cpu {cpu} is not online (online CPUs: {online})"
        assert open_fds() == before


def test_an_array_smaller_than_the_highest_cpu_is_refused(bpf, two_cpus):
    high = max(online_cpus())
    with bpfring.Map.create(bpfring.MapType.PERF_EVENT_ARRAY, high, 4, 4, name="small") as m:
        before = open_fds()
        want = f"'small' has max_entries={high}, too small for cpu {high}: it needs at least {high + 1}"
        with pytest.raises(ValueError, match=want):
            PerfBuffer(m, 1, lambda c, d: None)
        assert open_fds() == before
        with PerfBuffer(m, 1, lambda c, d: None, cpus=range(high)) as pb:  # the CPUs it can hold
            assert pb.cpus == tuple(range(high))


def test_a_failure_at_any_step_of_construction_leaves_nothing_open(perf_producer):
    """Run out of file descriptors at each step in turn: every attempt cleans up after itself."""
    cpus = online_cpus()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = open_fds()
    limit = min(set(range(max(before) + 2)) - before)  # every fd below this one is taken
    failures = []
    while True:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            pb = PerfBuffer(perf_producer.array, 1, lambda c, d: None)
        except OSError as exc:
            failures.append(exc)
        else:
            break
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert open_fds() == before, f"attempt with {limit} fds left some open after {failures[-1]!r}"
        for cpu in cpus:
            assert perf_producer.output(1, 16, cpu=cpu).last_err == -errno.ENOENT, f"cpu {cpu}'s slot left set"
        limit += 1
    pb.close()
    assert open_fds() == before
    # the map's dup, the epoll, the eventfd, then per CPU its event fd (and mmap's dup of it
    # before Python 3.13)
    per_cpu = 1 if sys.version_info >= (3, 13) else 2
    assert len(failures) >= 3 + per_cpu * (len(cpus) - 1)
    assert all(exc.errno == errno.EMFILE for exc in failures)


# -- a ring someone else writes into ---------------------------------------------------------------


def test_a_tail_past_the_head_is_refused_until_resync_then_reading_goes_on(perf_producer):
    """data_tail is writable by every process that maps the event: a bogus one must neither hang
    the walk nor read as caught up (the kernel would drop every sample). It raises RingCorruptError
    naming the CPU; resync() skips to data_head and the samples after it arrive once."""
    got: list[int] = []
    with PerfBuffer(perf_producer.array, 1, lambda cpu, data: got.append(parse(data)[0]), cpus=[0]) as pb:
        ring = pb.rings[0]
        perf_producer.output(3, 16, cpu=0)
        with mmap.mmap(ring.fd, mmap.PAGESIZE + ring.size, prot=mmap.PROT_READ | mmap.PROT_WRITE) as page:
            page[1032:1040] = (1 << 40).to_bytes(8, "little")  # another process wrote data_tail
        for call in (pb.consume, lambda: pb.poll(0), lambda: pb.consume_batch(), lambda: pb.consume_batch("V16")):
            with pytest.raises(bpfring.RingCorruptError, match="perf ring of cpu 0 .* data_tail is 1099511627776, this reader left it at 0: another process wrote it") as info:
                call()
            assert info.value.cpu == 0 and info.value.values["data_tail"] == 1 << 40
        assert got == [] and ring.data_tail == 1 << 40  # left as found
        assert ring.resync() == 3 * 32
        perf_producer.output(2, 16, cpu=0)
        assert pb.consume() == 2
    assert got == [3, 4]


def test_a_read_stopped_at_its_limit_leaves_the_rest_for_the_next(perf_producer):
    got: list[int] = []
    with PerfBuffer(perf_producer.array, 1, lambda cpu, data: got.append(parse(data)[0]), cpus=[0]) as pb:
        perf_producer.output(10, 16, cpu=0)
        assert pb._consume(pb._buffers[0], limit=3) == 3
        assert pb._buffers[0] in pb._unfinished  # poll() reads it next without waiting for a wakeup
        assert pb.poll(0) == 7
    assert got == list(range(10))


def test_a_perf_buffer_without_sample_cb_serves_batches_and_refuses_poll_and_consume(perf_producer):
    """Batch and async users need no callback; the callback calls say it is missing and drop nothing."""
    with PerfBuffer(perf_producer.array, 1, cpus=[0]) as pb:
        perf_producer.output(3, 16, cpu=0)
        for call in (pb.consume, lambda: pb.poll(0), lambda: pb.consume_buffer(0)):
            with pytest.raises(TypeError, match="has no sample_cb"):
                call()
        assert [parse(data)[0] for data in pb.consume_batch()] == [0, 1, 2]

"""UserRingBuffer against the real kernel: records go user space -> BPF (tests/bpf/user_drain.bpf.c,
bpf_user_ringbuf_drain) -> back through a BPF ring buffer, read with RingBuffer."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import pickle
import selectors
import threading
import time

import pytest
from conftest import open_fds
from user_drain import UserDrain, payload, record_size

import bpfring
from bpfring.errors import RingFullError
from bpfring.userbuf import DYNPTR_MAX_SIZE, Sample, UserRingBuffer


@pytest.fixture
def make_user_drain(bpf_object):
    """Load user_drain.bpf.o with other ring sizes: ``make_user_drain(urb_size=..., echo_size=...)``."""
    made = []

    def make(**kwargs) -> UserDrain:
        d = UserDrain(bpf_object("user_drain"), **kwargs)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture
def user_drain(make_user_drain):
    """user_drain.bpf.o with its default 16 KiB user ring and 256 KiB echo ring."""
    return make_user_drain()


def send(urb: UserRingBuffer, seq: int, size: int) -> bytes:
    data = payload(seq, size)
    with urb.reserve(size) as buf:
        buf[:] = data
    return data


# -- the round trip ----------------------------------------------------------------------------


def test_mixed_sizes_round_trip_exactly_once_in_order_over_many_laps(user_drain):
    sizes = (1, 5000)  # most are not multiples of 8
    sent: list[bytes] = []
    got: list[bytes] = []
    with UserRingBuffer(user_drain.urb) as urb:
        seq = 0
        while urb.consumer_pos < 30 * urb.size:
            batch = 0
            while True:  # fill the ring as far as it goes, then let the kernel drain it
                size = record_size(seq, *sizes)
                try:
                    sample = urb.reserve(size)
                except RingFullError:
                    break
                sample.buf[:] = data = payload(seq, size)
                urb.submit(sample)
                sent.append(data)
                seq += 1
                batch += 1
            assert batch > 0
            r = user_drain.drain()
            assert (r.ret, r.drained, r.dropped) == (batch, batch, 0)
            got.extend(r.records)
            assert urb.consumer_pos == urb.producer_pos  # every byte given back
        assert urb.consumer_pos // urb.size >= 30
    assert len(got) == len(sent) == seq
    for i, (g, s) in enumerate(zip(got, sent)):
        assert g == s, f"record {i} of {len(s)} bytes came back different"


def test_every_size_from_1_to_64_bytes(user_drain):
    with UserRingBuffer(user_drain.urb) as urb:
        for size in range(1, 65):
            data = send(urb, size, size)
            assert user_drain.drain().records == [data]


def test_a_sample_that_wraps_the_end_of_the_ring_arrives_intact(make_user_drain):
    d = make_user_drain(urb_size=4096)
    with UserRingBuffer(d.urb) as urb:
        send(urb, 0, 4096 - 16 - 8)  # with its header, it ends 16 bytes before the end of the data area
        assert d.drain().ret == 1
        assert urb.producer_pos % urb.size == 4096 - 16
        sample = urb.reserve(1000)  # its header fits, its bytes run past the end
        assert (sample.pos + 8) % urb.size + len(sample) > urb.size
        data = payload(1, 1000)
        sample.buf[:] = data
        sample.submit()
        assert d.drain().records == [data]


def test_reserve_hands_out_exactly_size_writable_bytes(user_drain):
    with UserRingBuffer(user_drain.urb) as urb:
        sample = urb.reserve(13)
        assert isinstance(sample, Sample)
        assert len(sample) == len(sample.buf) == sample.size == 13
        assert not sample.buf.readonly and sample.buf.format == "B"
        assert urb.producer_pos == 24  # 13 bytes + 8-byte header, rounded up to 8
        assert urb.avail_space == urb.size - 24
        sample.discard()


def test_the_largest_sample_the_kernel_takes(make_user_drain):
    d = make_user_drain(urb_size=4096)
    with UserRingBuffer(d.urb) as urb:
        assert urb.max_sample_size == 4096 - 8
        data = send(urb, 7, 4088)  # with its header it fills the whole ring
        assert urb.avail_space == 0
        assert d.drain().records == [data]


def test_the_dynptr_limit_caps_samples_in_big_rings(make_user_drain):
    d = make_user_drain(urb_size=32 << 20)
    with UserRingBuffer(d.urb) as urb:
        assert urb.max_sample_size == DYNPTR_MAX_SIZE == (1 << 24) - 1
        with pytest.raises(ValueError, match=f"1 to {DYNPTR_MAX_SIZE} bytes .*, got {1 << 24} .*dynptr"):
            urb.reserve(1 << 24)
        with urb.reserve(DYNPTR_MAX_SIZE) as buf:
            buf[-3:] = b"end"
        r = d.drain()  # the kernel takes it (too big for the test's echo, so only counted)
        assert (r.ret, r.drained, r.oversize) == (1, 1, 1)


# -- discard, order, context manager -----------------------------------------------------------


def test_discarded_samples_never_reach_the_bpf_program_and_their_space_is_reclaimed(user_drain):
    with UserRingBuffer(user_drain.urb) as urb:
        kept = []
        for seq in range(30):
            sample = urb.reserve(40 + seq)
            sample.buf[:] = data = payload(seq, 40 + seq)
            if seq % 3 == 0:
                urb.discard(sample)
            else:
                urb.submit(sample)
                kept.append(data)
        r = user_drain.drain()
        assert r.drained == r.ret == 20
        assert r.records == kept
        assert urb.consumer_pos == urb.producer_pos
        assert urb.avail_space == urb.size


def test_a_later_submit_does_not_publish_an_earlier_sample_still_reserved(user_drain):
    with UserRingBuffer(user_drain.urb) as urb:
        first, second = urb.reserve(10), urb.reserve(20)
        second.buf[:] = b"2" * 20
        second.submit()
        r = user_drain.drain()
        assert (r.ret, r.records) == (0, [])  # the kernel stops at the first, still BUSY
        assert urb.consumer_pos == 0
        first.buf[:] = b"1" * 10
        first.submit()
        assert user_drain.drain().records == [b"1" * 10, b"2" * 20]


def test_a_discard_out_of_order_releases_the_records_behind_it(user_drain):
    with UserRingBuffer(user_drain.urb) as urb:
        first, second = urb.reserve(8), urb.reserve(8)
        second.buf[:] = b"kept...."
        second.submit()
        first.discard()
        r = user_drain.drain()
        assert (r.ret, r.records) == (1, [b"kept...."])


def test_the_context_manager_submits_on_success_and_discards_on_an_exception(user_drain):
    with UserRingBuffer(user_drain.urb) as urb:
        with urb.reserve(5) as buf:
            buf[:] = b"hello"
        with pytest.raises(RuntimeError, match="boom"):
            with urb.reserve(5) as buf:
                buf[:] = b"wrong"
                raise RuntimeError("boom")
        sample = urb.reserve(3)
        with sample as buf:
            buf[:] = b"bye"
        assert sample.submitted and not sample.discarded
        r = user_drain.drain()
        assert r.records == [b"hello", b"bye"]
        assert r.drained == 2 and urb.avail_space == urb.size  # the discarded one was skipped


def test_an_explicit_discard_inside_the_with_block_wins(user_drain):
    with UserRingBuffer(user_drain.urb) as urb:
        sample = urb.reserve(4)
        with sample as buf:
            buf[:] = b"nope"
            sample.discard()
        assert sample.discarded
        assert user_drain.drain().records == []


def test_a_drain_limited_to_some_records_leaves_the_rest(user_drain):
    with UserRingBuffer(user_drain.urb) as urb:
        sent = [send(urb, seq, 100) for seq in range(10)]
        assert user_drain.drain(max_records=4).records == sent[:4]
        assert urb.avail_space == urb.size - 6 * 112
        assert user_drain.drain().records == sent[4:]


# -- a full ring -------------------------------------------------------------------------------


def fill(urb: UserRingBuffer) -> int:
    """Fill the ring with 1000-byte records; returns how many."""
    n = 0
    while urb.avail_space >= 1008:
        send(urb, n, 1000)
        n += 1
    return n


def test_reserve_on_a_full_ring_raises_ring_full(make_user_drain):
    d = make_user_drain(urb_size=4096)
    with UserRingBuffer(d.urb) as urb:
        assert fill(urb) == 4
        assert urb.avail_space == 64
        with pytest.raises(RingFullError, match="sample of 57 bytes .*: 64 of 4096 bytes free") as info:
            urb.reserve(57)  # 57 + 8 rounds up to 72
        assert info.value.errno == 28  # ENOSPC
        assert isinstance(info.value, OSError)
        urb.reserve(56).discard()  # 64 bytes: just fits


def test_reserve_blocking_times_out_on_a_full_ring(make_user_drain):
    d = make_user_drain(urb_size=4096)
    with UserRingBuffer(d.urb) as urb:
        fill(urb)
        with pytest.raises(RingFullError, match="timed out after 200 ms .* 1000 bytes"):
            urb.reserve_blocking(1000, timeout_ms=200)
        with pytest.raises(RingFullError, match="timed out after 0 ms"):
            urb.reserve_blocking(1000, timeout_ms=0)
        assert d.drain().ret == 4  # nothing was lost while waiting


# System calls a waiter sleeps in (x86-64 numbers, arch/x86/entry/syscalls/syscall_64.tbl): epoll and
# friends, and futex for the waiters that sleep on a condition while another one is in epoll.
WAIT_SYSCALLS = {
    7: "poll",
    23: "select",
    202: "futex",
    232: "epoll_wait",
    270: "pselect6",
    271: "ppoll",
    281: "epoll_pwait",
    441: "epoll_pwait2",
}


def wait_until_blocked(thread: threading.Thread, timeout: float = 10.0) -> str:
    """Return once ``thread`` has slept in a wait system call (its /proc/self/task/TID/syscall) at
    five looks in a row, 5 ms apart, with this thread sleeping in between (so it is not merely
    waiting for the GIL); returns the call's name."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while thread.is_alive() and time.monotonic() < deadline:
        try:
            with open(f"/proc/self/task/{thread.native_id}/syscall") as f:
                call = f.read().split()[0]
        except FileNotFoundError:
            break
        seen = seen + [WAIT_SYSCALLS[int(call)]] if call.isdigit() and int(call) in WAIT_SYSCALLS else []
        if len(seen) >= 5 and len(set(seen[-5:])) == 1:
            return seen[-1]
        time.sleep(0.005)
    raise AssertionError(f"thread {thread.name} never blocked in a wait (alive: {thread.is_alive()})")


class Attempts:
    """``urb.reserve`` wrapped to record each attempt's outcome, per thread: "ok" or "full"."""

    def __init__(self, urb: UserRingBuffer) -> None:
        self.by_thread: dict[str, list[str]] = {}
        reserve = urb.reserve

        def recording(size: int) -> Sample:
            said = self.by_thread.setdefault(threading.current_thread().name, [])
            try:
                sample = reserve(size)
            except RingFullError:
                said.append("full")
                raise
            said.append("ok")
            return sample

        urb.reserve = recording  # type: ignore[method-assign]

    def failed_only(self, name: str) -> bool:
        """The thread has tried, and every attempt so far found the ring full."""
        said = self.by_thread.get(name, [])
        return bool(said) and set(said) == {"full"}

    def waited(self, name: str) -> bool:
        """The thread's first attempt found the ring full and its last one succeeded."""
        said = self.by_thread.get(name, [])
        return len(said) >= 2 and said[0] == "full" and said[-1] == "ok"


def test_reserve_blocking_returns_once_the_bpf_side_drains(make_user_drain):
    d = make_user_drain(urb_size=4096)
    with UserRingBuffer(d.urb) as urb:
        n = fill(urb)
        attempts = Attempts(urb)
        got: list[Sample] = []
        waiter = threading.Thread(target=lambda: got.append(urb.reserve_blocking(2000, timeout_ms=30_000)), name="W")
        waiter.start()
        try:
            wait_until_blocked(waiter)  # the waiter sleeps: only the drain can wake it
            assert not got and attempts.failed_only("W"), attempts.by_thread
            assert d.drain().ret == n
        finally:
            waiter.join(timeout=20)
        assert not waiter.is_alive() and len(got) == 1, "reserve_blocking did not return after the drain"
        assert attempts.waited("W"), attempts.by_thread
        sample = got[0]
        sample.buf[:] = data = payload(99, 2000)
        sample.submit()
        assert d.drain().records == [data]


def test_one_drain_wakes_every_thread_blocked_in_reserve_blocking(make_user_drain):
    """A drain wakes the map fd once (one EPOLLOUT edge); every waiter that now fits gets its room."""
    d = make_user_drain(urb_size=4096)
    with UserRingBuffer(d.urb) as urb:
        n = fill(urb)
        attempts = Attempts(urb)
        got: list[Sample] = []
        errors: list[BaseException] = []

        def wait(i: int) -> None:
            try:
                got.append(urb.reserve_blocking(1000))  # forever; 3 x 1008 bytes fit once drained
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=wait, args=(i,), name=f"W{i}") for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            wait_until_blocked(t)  # all three asleep (today: one in epoll, two on its condition) before the drain
        assert not got and all(attempts.failed_only(t.name) for t in threads), attempts.by_thread
        assert d.drain().ret == n
        for t in threads:
            t.join(timeout=20)
        stuck = sum(t.is_alive() for t in threads)
        if stuck:
            urb.close()  # ends their wait, so the test can fail instead of hanging
        assert stuck == 0, f"{stuck} of 3 waiters still blocked after the drain freed room for all"
        assert not errors and len(got) == 3
        assert all(attempts.waited(t.name) for t in threads), attempts.by_thread
        for i, sample in enumerate(got):
            sample.buf[:] = payload(i, 1000)
            sample.submit()
        assert sorted(d.drain().records) == sorted(payload(i, 1000) for i in range(3))


def test_a_drain_taken_by_one_waiter_between_anothers_reserve_and_wait_wakes_both(make_user_drain):
    """Waiter B sleeps in epoll; waiter A's reserve fails and A is preempted before it waits; a
    drain frees room for both and B takes its wakeup. A must still see it (not sleep forever)."""
    d = make_user_drain(urb_size=4096)
    with UserRingBuffer(d.urb) as urb:
        n = fill(urb)
        attempts = Attempts(urb)
        reserve = urb.reserve
        a_failed = threading.Event()
        b_done = threading.Event()

        def slow_to_wait(size: int) -> Sample:  # A's reserve: fails, then A is "preempted"
            try:
                return reserve(size)
            except RingFullError:
                if threading.current_thread().name == "A" and not a_failed.is_set():
                    a_failed.set()
                    b_done.wait(10)  # the drain and B's wakeup happen meanwhile
                raise

        urb.reserve = slow_to_wait  # type: ignore[method-assign]
        got: dict[str, Sample] = {}

        def wait(name: str) -> None:
            got[name] = urb.reserve_blocking(1000)  # forever: a missed wakeup hangs it
            if name == "B":
                b_done.set()

        b = threading.Thread(target=wait, args=("B",), name="B")
        b.start()
        wait_until_blocked(b)  # B sleeps, waiting for a drain
        a = threading.Thread(target=wait, args=("A",), name="A")
        a.start()
        assert a_failed.wait(10)  # A's reserve has failed; A is held before its wait
        assert not got
        assert d.drain().ret == n  # room for both
        b.join(timeout=10)
        a.join(timeout=10)
        stuck = [t.name for t in (a, b) if t.is_alive()]
        if stuck:
            urb.close()  # ends their wait, so the test fails instead of hanging
            a.join(timeout=10)
            b.join(timeout=10)
    assert not stuck, f"waiter(s) {stuck} still blocked after the drain made room for both"
    assert sorted(got) == ["A", "B"]
    assert attempts.waited("A") and attempts.waited("B"), attempts.by_thread


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_reserve_async_waits_on_the_event_loop_for_a_drain(make_user_drain):
    d = make_user_drain(urb_size=4096)
    with UserRingBuffer(d.urb) as urb:
        n = fill(urb)
        attempts = 0
        reserve = urb.reserve

        def counting(size: int) -> Sample:
            nonlocal attempts
            attempts += 1
            return reserve(size)

        urb.reserve = counting  # type: ignore[method-assign]

        async def main() -> tuple[Sample, list[int]]:
            ticks: list[int] = []
            drained: list[int] = []

            async def tick() -> None:  # the loop keeps running while the reserve waits
                for i in range(5):
                    ticks.append(i)
                    await asyncio.sleep(0.05)

            ticker = asyncio.create_task(tick())
            asyncio.get_running_loop().call_later(0.4, lambda: drained.append(d.drain().ret))
            sample = await urb.reserve_async(2000)
            await ticker
            assert drained == [n]
            return sample, ticks

        sample, ticks = run(main())
        assert ticks == [0, 1, 2, 3, 4]
        # 64 bytes stay free while it waits (EPOLLOUT is true): an edge-triggered wait does not
        # spin on that; it tries once, once more for the wakeup of its own registration, and
        # once after the drain.
        assert attempts <= 4, f"{attempts} reserve attempts while waiting: the wait spins"
        sample.buf[:] = data = payload(7, 2000)
        sample.submit()
        assert d.drain().records == [data]


def test_reserve_async_times_out_and_close_ends_it(make_user_drain):
    d = make_user_drain(urb_size=4096)
    before = open_fds()
    urb = UserRingBuffer(d.urb)
    fill(urb)

    async def main() -> None:
        with pytest.raises(RingFullError, match="timed out after 0.2 s .* 1000 bytes"):
            await urb.reserve_async(1000, timeout=0.2)
        waiting = [asyncio.create_task(urb.reserve_async(1000)) for _ in range(2)]
        await asyncio.sleep(0.1)
        urb.close()
        for task in waiting:
            with pytest.raises(ValueError, match="closed"):
                await asyncio.wait_for(task, 10)

    run(main())
    assert urb.closed and open_fds() == before  # reserve_async's epoll and eventfd too


def test_reserve_async_wakes_every_waiting_task(make_user_drain):
    d = make_user_drain(urb_size=4096)
    with UserRingBuffer(d.urb) as urb:
        n = fill(urb)

        async def main() -> list[Sample]:
            tasks = [asyncio.create_task(urb.reserve_async(1000, timeout=20)) for _ in range(3)]
            await asyncio.sleep(0.2)
            assert d.drain().ret == n  # room for all three
            return list(await asyncio.gather(*tasks))

        samples = run(main())
        for i, sample in enumerate(samples):
            sample.buf[:] = payload(i, 1000)
            sample.submit()
        assert sorted(d.drain().records) == sorted(payload(i, 1000) for i in range(3))


def test_reserve_blocking_takes_free_space_at_once(user_drain):
    with UserRingBuffer(user_drain.urb) as urb:
        with urb.reserve_blocking(100, timeout_ms=0) as buf:
            buf[:] = b"x" * 100
        with urb.reserve_blocking(100) as buf:  # no timeout: there is room, so no wait
            buf[:] = b"y" * 100
        assert user_drain.drain().records == [b"x" * 100, b"y" * 100]


@pytest.mark.parametrize("waiters", [1, 3])
def test_a_waiting_reserve_blocking_ends_when_another_thread_closes(make_user_drain, waiters):
    d = make_user_drain(urb_size=4096)
    urb = UserRingBuffer(d.urb)
    fill(urb)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            urb.reserve_blocking(1000, timeout_ms=30_000)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wait) for _ in range(waiters)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    urb.close()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "reserve_blocking() did not return after close()"
    assert len(errors) == waiters
    assert all(isinstance(e, ValueError) and "closed" in str(e) for e in errors)


def test_fileno_polls_writable_only_while_there_is_room(make_user_drain):
    d = make_user_drain(urb_size=4096)
    with UserRingBuffer(d.urb) as urb, selectors.DefaultSelector() as sel:
        sel.register(urb.fileno(), selectors.EVENT_WRITE)
        assert len(sel.select(0)) == 1
        urb.reserve(4088).submit()
        assert sel.select(0) == []
        d.drain()
        assert len(sel.select(5)) == 1


# -- errors ------------------------------------------------------------------------------------


def test_a_map_of_another_type_is_refused_by_name(bpf):
    with bpfring.Map.create(bpfring.MapType.RINGBUF, 4096, name="kernel_rb") as m:
        before = open_fds()
        with pytest.raises(ValueError, match="BPF_MAP_TYPE_RINGBUF, expected BPF_MAP_TYPE_USER_RINGBUF"):
            UserRingBuffer(m)
        assert open_fds() == before


def test_sizes_out_of_range_name_the_value_and_the_limit(bpf):
    with bpfring.Map.create(bpfring.MapType.USER_RINGBUF, 8192) as m, UserRingBuffer(m) as urb:
        for size in (0, -1):
            with pytest.raises(ValueError, match=f"sample size must be 1 to 8184 bytes in this 8192-byte ring, got {size}$"):
                urb.reserve(size)
        with pytest.raises(ValueError, match="1 to 8184 bytes .*, got 8185 .*8-byte header must fit"):
            urb.reserve(8185)
        with pytest.raises(ValueError, match="got 8185"):
            urb.reserve_blocking(8185, timeout_ms=10_000)  # refused at once, not after a wait
        with pytest.raises(ValueError, match="timeout_ms must be -1 .* got -5"):
            urb.reserve_blocking(8, timeout_ms=-5)
        with pytest.raises(TypeError, match="sample size must be an int, got float"):
            urb.reserve(8.0)  # type: ignore[arg-type]
        assert urb.producer_pos == 0  # nothing was reserved by the failures


def test_a_sample_cannot_be_submitted_twice_nor_used_after(user_drain):
    with UserRingBuffer(user_drain.urb) as urb:
        sample = urb.reserve(8)
        buf = sample.buf
        buf[:] = b"once...."
        urb.submit(sample)
        with pytest.raises(ValueError, match="sample of 8 bytes already submitted"):
            urb.submit(sample)
        with pytest.raises(ValueError, match="already submitted"):
            sample.discard()
        with pytest.raises(ValueError, match="already submitted"):
            sample.buf
        with pytest.raises(ValueError, match="released"):
            buf[0] = 1  # the memoryview handed out no longer reaches the ring
        other = urb.reserve(8)
        other.discard()
        with pytest.raises(ValueError, match="already discarded"):
            other.submit()
        assert user_drain.drain().records == [b"once...."]


def test_submit_takes_only_samples_of_this_buffer(user_drain, bpf):
    with bpfring.Map.create(bpfring.MapType.USER_RINGBUF, 4096) as m:
        with UserRingBuffer(user_drain.urb) as urb, UserRingBuffer(m) as other:
            stranger = other.reserve(8)
            with pytest.raises(ValueError, match="reserved in another UserRingBuffer"):
                urb.submit(stranger)
            with pytest.raises(TypeError, match="expected a Sample from reserve\\(\\), got memoryview"):
                urb.submit(urb.reserve(8).buf)  # type: ignore[arg-type]
            stranger.submit()


def test_an_exported_buffer_keeps_the_sample_reserved(user_drain):
    with UserRingBuffer(user_drain.urb) as urb:
        sample = urb.reserve(4)
        sample.buf[:] = b"late"
        export = pickle.PickleBuffer(sample.buf)  # a consumer holding the buffer (Py_buffer) open
        with pytest.raises(BufferError, match="still exported"):
            sample.submit()
        assert not sample.submitted
        assert user_drain.drain().records == []  # not published
        export.release()
        sample.submit()
        assert user_drain.drain().records == [b"late"]


def test_a_closed_buffer_refuses_everything(user_drain):
    urb = UserRingBuffer(user_drain.urb)
    sample = urb.reserve(8)
    urb.close()
    urb.close()  # idempotent
    assert urb.closed
    with pytest.raises(ValueError, match="closed"):
        urb.reserve(8)
    with pytest.raises(ValueError, match="closed"):
        urb.reserve_blocking(8, 0)
    with pytest.raises(ValueError, match="closed"):
        urb.avail_space
    with pytest.raises(ValueError, match="already discarded"):
        sample.submit()


def test_close_discards_samples_left_reserved_so_the_ring_does_not_stall(user_drain):
    with UserRingBuffer(user_drain.urb) as urb:
        urb.reserve(16)  # never submitted
        send(urb, 0, 16)
        assert user_drain.drain().records == []  # stuck behind the reserved one
    with UserRingBuffer(user_drain.urb) as urb:
        data = send(urb, 1, 16)
        assert user_drain.drain().records == [payload(0, 16), data]


def test_close_releases_every_fd_and_mapping(user_drain):
    before = open_fds()
    urb = UserRingBuffer(user_drain.urb)
    assert urb.fileno() != user_drain.urb.fd  # it owns a duplicate
    urb.reserve(100)
    assert open_fds() - before  # map dup, epoll, eventfd (and the dups Python's mmap keeps)
    urb.close()
    assert open_fds() == before
    assert not user_drain.urb.closed  # the caller's Map is untouched


def test_a_buffer_never_closed_releases_its_fds_when_collected(user_drain):
    gc.collect()  # garbage of earlier tests would close its fds during the collection below
    before = open_fds()
    urb = UserRingBuffer(user_drain.urb)
    urb.reserve(8)  # the sample and the buffer refer to each other: a cycle for the collector
    del urb
    gc.collect()
    assert open_fds() == before


def test_a_pinned_user_ring_by_path(bpf):
    from bpfring._sys.mounts import BPFFS, ensure_bpffs

    ensure_bpffs()
    path = f"{BPFFS}/bpfring-urb-test-{os.getpid()}"
    with bpfring.Map.create(bpfring.MapType.USER_RINGBUF, 8192) as m:
        m.pin(path)
    try:
        with UserRingBuffer(path) as urb:
            assert urb.size == 8192 and urb.avail_space == 8192
        with bpfring.Map.from_pinned(path) as m, UserRingBuffer(m.fd) as by_fd:  # a plain fd works too
            assert by_fd.size == 8192
    finally:
        os.unlink(path)


# -- one producer per user ring ------------------------------------------------------------------


PRODUCER = """
import sys, time, bpfring
urb = bpfring.UserRingBuffer(bpfring.Map.from_id(int(sys.argv[1])))
print("producing", flush=True)
time.sleep(60)
"""


def test_a_second_producer_of_a_user_ring_is_refused_naming_the_first_until_it_goes(user_drain):
    """Two producers would reserve the same space (each keeps producer_pos for itself): the
    second, in this process or another, gets EBUSY naming the first, until it closes or dies."""
    import subprocess
    import sys

    with UserRingBuffer(user_drain.urb) as first:
        with pytest.raises(bpfring.BPFError, match="already has a producer, a UserRingBuffer in this process") as info:
            UserRingBuffer(user_drain.urb)
        assert info.value.errno == errno.EBUSY
        sent = send(first, 0, 24)  # the first goes on working
        assert user_drain.drain().records == [sent]
    holder = subprocess.Popen([sys.executable, "-c", PRODUCER, str(user_drain.urb.id)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "producing"
        with pytest.raises(bpfring.BPFError, match=rf"already has a producer, pid {holder.pid} \(python"):
            UserRingBuffer(user_drain.urb)
    finally:
        holder.kill()
        holder.wait()
    with UserRingBuffer(user_drain.urb) as urb:  # the kernel released the dead holder's claim
        sent = send(urb, 1, 24)
        assert user_drain.drain().records == [sent]

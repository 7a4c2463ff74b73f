"""Lifecycles as a production user meets them: threads, fork(), garbage collection, two
consumers of one ring, close() racing everything."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest
from conftest import fork_and, open_fds, without_collector
from producer import parse

import bpfring
from bpfring import PerfBuffer, RingBuffer, UserRingBuffer

# -- waiting never blocks consuming ---------------------------------------------------------------------


# A call that waited behind poll(-1) would never return, so any bound shows it; this one is generous
# because a slow machine (a TCG guest of scripts/kernels took over 1 s for a first batch) is no hang.
HANG_S = 10


def in_thread(target) -> threading.Thread:
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def returns_within(seconds: float, call):
    """call() in a thread; its result, or a failure if it is still running after ``seconds``."""
    out: list = []
    t = in_thread(lambda: out.append(call()))
    t.join(seconds)
    assert not t.is_alive(), f"{call} still waiting after {seconds} s"
    return out[0]


def test_consume_and_batches_never_wait_behind_a_poll_blocked_in_another_thread(producer):
    """The README promises consume() never waits: a poll(-1) elsewhere holds no lock."""
    with RingBuffer(producer.ring, lambda d: None) as rb:
        assert len(rb.consume_batch("V16")) == 0  # numpy's import first: over 10 s in a busy TCG guest
        poller = in_thread(lambda: rb.poll(-1))
        time.sleep(0.2)  # let it block in epoll (nothing is in the ring)
        assert poller.is_alive()
        assert returns_within(HANG_S, rb.consume) == 0
        assert returns_within(HANG_S, rb.consume_batch) == []
        assert returns_within(HANG_S, lambda: len(rb.consume_batch("V16"))) == 0
        assert returns_within(HANG_S, rb.rings[0].consume) == 0
        assert returns_within(HANG_S, lambda: rb.rings[0].avail_data_size) == 0
    poller.join(HANG_S)
    assert not poller.is_alive(), "close() did not end the blocked poll()"


def test_async_iteration_does_not_freeze_its_loop_behind_a_blocked_poll(producer):
    """While another thread sits in poll(-1), an async for keeps its event loop turning."""
    with RingBuffer(producer.ring, lambda d: None) as rb:
        poller = in_thread(lambda: rb.poll(-1))
        time.sleep(0.2)

        async def main() -> int:
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            async def first_batch():
                async for batch in rb.batches(interval=0.05):
                    return batch

            task = asyncio.create_task(ticker())
            try:
                await asyncio.wait_for(first_batch(), 0.5)
            except asyncio.TimeoutError:
                pass
            task.cancel()
            return ticks

        assert returns_within(HANG_S, lambda: asyncio.run(main())) >= 10
    poller.join(HANG_S)


def test_perf_consume_never_waits_behind_a_blocked_poll(perf_producer):
    with PerfBuffer(perf_producer.array, 1, lambda cpu, data: None, cpus=[0]) as pb:
        poller = in_thread(lambda: pb.poll(-1))
        time.sleep(0.2)
        assert poller.is_alive()
        assert returns_within(HANG_S, pb.consume) == 0
        assert returns_within(HANG_S, lambda: pb.consume_buffer(0)) == 0
        assert returns_within(HANG_S, pb.consume_batch) == []
    poller.join(HANG_S)
    assert not poller.is_alive()


# -- close() from another thread --------------------------------------------------------------------------


def test_close_from_another_thread_ends_async_iteration_cleanly(producer):
    """The iteration simply ends: no ValueError from a closed ring."""
    for iterate in (lambda rb: rb.records(interval=0.05), lambda rb: rb.batches(interval=0.01)):
        rb = RingBuffer(producer.ring)
        closer = threading.Timer(0.2, rb.close)

        async def run(rb=rb, iterate=iterate, closer=closer):
            closer.start()
            return [item async for item in iterate(rb)]

        assert asyncio.run(asyncio.wait_for(run(), 5)) == []
        closer.join(5)  # the iteration ends as close() begins; the claim goes when it is done
        assert rb.closed


def test_consume_buffer_racing_close_says_closed(perf_producer):
    for _ in range(20):
        pb = PerfBuffer(perf_producer.array, 1, lambda cpu, data: None, cpus=[0])
        errors: list[BaseException] = []

        def spin():
            while True:
                try:
                    pb.consume_buffer(0)
                except ValueError as exc:
                    errors.append(exc)
                    return

        t = in_thread(spin)
        time.sleep(0.01)
        pb.close()
        t.join(2)
        assert not t.is_alive()
        assert "closed" in str(errors[0]) and "memoryview" not in str(errors[0])


# -- fork() -----------------------------------------------------------------------------------------------


def test_a_fork_child_refuses_to_consume_and_its_close_harms_nothing(producer):
    got: list[bytes] = []
    with RingBuffer(producer.ring, got.append) as rb:

        def child():
            with pytest.raises(RuntimeError, match=r"fork\(\) child.*Open a new RingBuffer in the child"):
                rb.consume()
            with pytest.raises(RuntimeError, match=r"fork\(\) child"):
                rb.rings[0].consume_batch()
            with pytest.raises(RuntimeError, match=r"fork\(\) child"):
                rb.add(bpfring.Map.create(bpfring.MapType.RINGBUF, 4096))
            rb.close()

        assert fork_and(child) == 0
        # The parent's wake-up eventfd was not written: poll() still waits for data...
        start = time.monotonic()
        assert rb.poll(300) == 0
        assert time.monotonic() - start >= 0.25
        # ...its epoll still has the ring, and consumer_pos is the parent's alone.
        producer.produce(5)
        assert rb.poll(1000) == 5 and len(got) == 5


def test_a_fork_child_can_open_its_own_consumer_once_the_parent_lets_go(producer):
    """The child holds none of the parent's claims: it is refused while the parent consumes (the
    error names the parent) and gets the ring once the parent closes."""
    rb = RingBuffer(producer.ring)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(w)
            try:
                RingBuffer(producer.ring)
                os._exit(3)
            except bpfring.BPFError as exc:
                if f"pid {os.getppid()}" not in str(exc):
                    os._exit(4)
            os.read(r, 1)  # the parent has closed
            producer_pages = RingBuffer(producer.ring)
            producer_pages.close()
            os._exit(0)
        except BaseException:
            os._exit(5)
    os.close(r)
    time.sleep(0.3)
    rb.close()
    os.write(w, b"x")
    os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_fork_while_another_thread_polls_leaves_the_child_free_to_close(producer):
    """A lock held by a thread at the fork is held forever in the child: close() there takes none."""
    with RingBuffer(producer.ring, lambda d: None) as rb:
        poller = in_thread(lambda: rb.poll(-1))
        consumer = in_thread(lambda: [rb.consume() for _ in range(2000)])
        time.sleep(0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads, on 3.12+
            assert fork_and(rb.close) == 0
        consumer.join(10)
        producer.produce(2)
        deadline = time.monotonic() + 5
        while poller.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not poller.is_alive(), "the parent's poll() did not see the records"


def test_a_fork_childs_perf_close_leaves_the_events_and_slots_to_the_parent(perf_producer):
    seen: list[int] = []
    with PerfBuffer(perf_producer.array, 1, lambda cpu, data: seen.append(parse(data)[0]), cpus=[0]) as pb:
        assert fork_and(pb.close) == 0
        out = perf_producer.output(4, 16, cpu=0)  # ENOENT if the child had cleared the slot
        assert out.failed == 0 and pb.consume() == 4
    assert seen == [0, 1, 2, 3]


# -- one consumer per ring ---------------------------------------------------------------------------------


def test_a_second_consumer_of_a_ring_in_this_process_is_refused_until_the_first_closes(producer):
    before = open_fds()
    with RingBuffer(producer.ring) as first:
        with pytest.raises(bpfring.BPFError, match="already consumed by a RingBuffer in this process") as info:
            RingBuffer(producer.ring, lambda d: None)
        assert info.value.errno == 16  # EBUSY
        with pytest.raises(bpfring.BPFError, match="already consumed"):
            RingBuffer().add(producer.ring)
        with RingBuffer(producer.ring, shared=True) as second:  # opting out
            producer.produce(2)
            assert len(first.consume_batch()) + len(second.consume_batch()) == 2
    with RingBuffer(producer.ring):
        pass
    assert open_fds() == before


CONSUMER = textwrap.dedent(
    """
    import sys, time, bpfring
    rb = bpfring.RingBuffer(bpfring.Map.from_id(int(sys.argv[1])), lambda d: None)
    print("consuming", flush=True)
    time.sleep(60)
    """
)


def test_a_ring_consumed_by_another_process_is_refused_with_its_pid_until_it_dies(producer):
    holder = subprocess.Popen([sys.executable, "-c", CONSUMER, str(producer.ring.id)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "consuming"
        with pytest.raises(bpfring.BPFError, match=rf"already consumed by pid {holder.pid} \(python"):
            RingBuffer(producer.ring)
    finally:
        holder.kill()
        holder.wait()
    with RingBuffer(producer.ring):  # the kernel released the dead holder's claim
        pass


def test_two_perf_buffers_on_one_array(perf_producer):
    """The second is refused; with shared=True it takes over, and closing the first then leaves
    the second's slot alone."""
    seen: list[int] = []
    first = PerfBuffer(perf_producer.array, 1, lambda cpu, data: None, cpus=[0])
    with pytest.raises(bpfring.BPFError, match="already consumed by a PerfBuffer in this process"):
        PerfBuffer(perf_producer.array, 1, cpus=[0])
    with PerfBuffer(perf_producer.array, 1, lambda cpu, data: seen.append(parse(data)[0]), cpus=[0], shared=True) as second:
        first.close()
        perf_producer.output(3, 16, cpu=0)
        assert second.consume() == 3
    assert seen == [0, 1, 2]


# -- garbage collection -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["RingBuffer", "PerfBuffer", "UserRingBuffer"])
def test_objects_dropped_without_close_release_everything_with_a_resource_warning(producer, perf_producer, bpf_object, kind):
    from user_drain import UserDrain

    drain = UserDrain(bpf_object("user_drain")) if kind == "UserRingBuffer" else None
    try:
        before = open_fds()
        if kind == "RingBuffer":
            obj = RingBuffer(producer.ring, lambda d: None)
        elif kind == "PerfBuffer":
            obj = PerfBuffer(perf_producer.array, 1, lambda cpu, data: None)
        else:
            obj = UserRingBuffer(drain.urb)
        assert open_fds() - before
        with without_collector(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del obj
        assert open_fds() == before
        assert [w for w in caught if issubclass(w.category, ResourceWarning) and kind in str(w.message)]
        if kind == "PerfBuffer":  # the slots were cleared: the program's output finds none
            out = perf_producer.output(1, 16, cpu=0)
            assert out.failed == 1 and out.last_err == -errno.ENOENT
        if kind == "RingBuffer":  # the claim went with it
            RingBuffer(producer.ring).close()
    finally:
        if drain is not None:
            drain.close()


def test_a_refused_perf_buffer_leaves_no_descriptor(perf_producer):
    before = open_fds()
    for page_cnt in (2**62, 2**40):
        with pytest.raises((ValueError, OverflowError, bpfring.BPFError)):
            PerfBuffer(perf_producer.array, page_cnt, cpus=[0])
    assert open_fds() == before


def test_a_fork_childs_user_ring_buffer_refuses_to_produce_and_its_close_discards_nothing(bpf_object):
    from user_drain import UserDrain

    drain = UserDrain(bpf_object("user_drain"))
    try:
        with UserRingBuffer(drain.urb) as urb:
            sample = urb.reserve(16)  # the parent's, still being written

            def child():
                with pytest.raises(RuntimeError, match=r"fork\(\) child"):
                    urb.reserve(8)
                urb.close()  # must not discard the parent's sample nor write the parent's eventfd

            assert fork_and(child) == 0
            sample.buf[:] = b"written by parent"[:16]
            sample.submit()
            assert drain.drain().records == [b"written by paren"]
    finally:
        drain.close()


def test_two_bpfring_tails_on_one_pinned_ring_the_second_is_refused_unless_shared(producer, tmp_path):
    """Two terminals tailing one pinned ring: the second says who holds it, in one line, exit 1;
    with --shared it reads along."""
    from bpfring._sys.mounts import BPFFS, ensure_bpffs

    ensure_bpffs()
    path = f"{BPFFS}/bpfring-test-tail-{os.getpid()}"
    producer.ring.pin(path)
    cmd = [sys.executable, "-m", "bpfring", "tail", path]
    first = subprocess.Popen([*cmd, "--duration", "600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "tailing ring" in first.stderr.readline()
        second = subprocess.run([*cmd, "--count", "1"], capture_output=True, text=True, timeout=300)
        assert second.returncode == 1 and second.stdout == ""
        assert second.stderr.count("\n") == 1, second.stderr
        assert f"already consumed by pid {first.pid} (" in second.stderr
        shared = subprocess.run([*cmd, "--shared", "--duration", "0.3"], capture_output=True, text=True, timeout=300)
        assert shared.returncode == 0, shared.stderr
    finally:
        first.terminate()
        first.wait(10)
        os.unlink(path)


@pytest.mark.parametrize("kind", ["Map", "Object"])
def test_maps_and_objects_dropped_without_close_release_their_fds_with_a_resource_warning(bpf_object, kind):
    before = open_fds()
    if kind == "Map":
        obj = bpfring.Map.create(bpfring.MapType.RINGBUF, 4096)
    else:
        obj = bpfring.Object(bpf_object("producer"))
        obj.load()
        obj.map("rb")
    assert open_fds() - before
    with without_collector(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del obj
    assert open_fds() == before
    assert [w for w in caught if issubclass(w.category, ResourceWarning) and kind in str(w.message)]


def test_a_claim_leaves_no_lock_file_behind(producer, tmp_path, monkeypatch):
    """A claim's lock file goes with the claim: a long-running agent that opens consumers of ever
    new maps does not fill the lock directory with a file per map id it ever claimed."""
    monkeypatch.setenv("BPFRING_LOCK_DIR", str(tmp_path))
    path = tmp_path / f"map-{producer.ring.id}.lock"
    with RingBuffer(producer.ring):
        assert path.exists()
    assert not path.exists()
    with RingBuffer(producer.ring):  # and the next claim makes it anew
        with pytest.raises(bpfring.BPFError, match="already consumed"):
            RingBuffer(producer.ring)
    assert list(tmp_path.iterdir()) == []


CLAIMER = textwrap.dedent(
    """
    import os, sys, bpfring
    from bpfring._claim import Claim
    m = bpfring.Map.from_id(int(sys.argv[1]))
    inside = sys.argv[2]
    held = refused = 0
    for _ in range(int(sys.argv[3])):
        try:
            claim = Claim(m, "RingBuffer")
        except bpfring.BPFError:
            refused += 1
            continue
        fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if another holder is inside
        os.close(fd)
        os.unlink(inside)
        claim.release()
        held += 1
    print(held, refused)
    """
)


def test_claims_racing_with_releases_that_unlink_their_files_are_never_held_twice(producer, tmp_path, monkeypatch):
    """Three processes claim and release one map as fast as they can; each, while it holds the
    claim, makes a file that only one process at a time can make. A claim taken on a lock file its
    holder was unlinking would let two in at once: the second's O_EXCL fails."""
    monkeypatch.setenv("BPFRING_LOCK_DIR", str(tmp_path / "locks"))
    (tmp_path / "locks").mkdir()
    inside = tmp_path / "inside"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, str(producer.ring.id), str(inside), "3000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    held = [int(out.split()[0]) for out, _ in results]
    assert sum(held) > 0 and all(h > 0 for h in held), held
    assert list((tmp_path / "locks").iterdir()) == []

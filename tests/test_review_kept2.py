"""A second adversarial review of Kept (merge 90eddb7: each kept part tagged with its ring, kept
records delivered to callbacks first, a deque lent to async iterations): each test reproduces one
finding against the real kernel and its producers, and compares what was delivered with the
sequence numbers the producer wrote. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import tracemalloc
import warnings
from typing import Any

import pytest
from conftest import fork_call
from producer import parse
from test_review_kept import FIXED, interrupted_after_take, seqs_of, two_rings

from bpfring import PerfBuffer, RecordSizeError, Ring, RingBuffer


def step(iteration: Any) -> Any:
    """One step of ``async for`` over ``iteration``, driven without an event loop: what it
    yielded, or None where it would have waited (or StopAsyncIteration: it ended)."""
    try:
        iteration.__anext__().send(None)
    except StopIteration as yielded:
        return yielded.value
    except RuntimeError as exc:
        assert "no running event loop" in str(exc)
        return None
    raise AssertionError("an iteration step neither yielded nor waited")


def by_ring(records: list[bytes]) -> dict[int, list[int]]:
    """Sequence numbers of each producer id (ring), in the order delivered."""
    out: dict[int, list[int]] = {}
    for r in records:
        seq, producer, _ = parse(r)
        out.setdefault(producer, []).append(seq)
    return out


# -- a Ring on its own: its callback consuming from it ----------------------------------------------


@pytest.mark.parametrize("nested", ["consume_batch", "dtype", "consume", "batch", "resync"])
@pytest.mark.parametrize("kept", [False, True], ids=["from-the-ring", "kept"])
def test_a_callback_consuming_from_its_own_ring_on_its_own_is_refused_not_a_repeat(producer, nested, kept):
    """A Ring on its own has its own lock, an RLock: a callback calling back into its ring was let
    in. Inside the C walk the nested call moved consumer_pos, and the walk went on from where it
    was: every record the nested call took was delivered again (and consumer_pos written back).
    Inside Kept.deliver the nested batch copied the kept part the delivery was walking: the same.
    Refused now, as for a RingBuffer's ring; the record whose callback called counts as delivered."""
    got: list[int] = []
    ring: Ring

    def callback(data: bytes) -> None:
        got.append(parse(data)[0])
        if len(got) == 1:  # the first record's callback calls back into its ring
            if nested == "consume_batch":
                got.extend(parse(r)[0] for r in ring.consume_batch())
            elif nested == "dtype":
                got.extend(ring.consume_batch(FIXED)["seq"].tolist())
            elif nested == "consume":
                ring.consume()
            elif nested == "batch":
                with ring.batch(FIXED) as view:
                    got.extend(view["seq"].tolist())
            else:
                ring.resync()

    ring = Ring(producer.ring, callback)
    try:
        producer.produce(4, fixed=True)
        if kept:  # the records left the ring and wait in Kept, for the callback
            interrupted_after_take(lambda: ring.consume_batch(), "consume")
            assert ring.avail_data_size == 0
        with pytest.raises(RuntimeError, match="Ring: this thread is already consuming"):
            ring.consume()
        producer.produce(1, fixed=True)
        assert ring.consume() == 4
    finally:
        ring.close()
    assert got == [0, 1, 2, 3, 4], "records repeated or lost"


# -- two iterations, a batch put back in front of the lent deque ------------------------------------


def test_a_second_iteration_after_a_put_back_does_not_leave_the_first_ones_deque_to_be_copied(make_producer):
    """Iteration I holds ring a's kept records (the lent deque); a Ctrl-C puts ring b's records
    back in front of it; iteration J then lent b's part instead, so a's deque was no longer "the
    lent one": a batch call copied its rows without taking them, and I yielded them again."""
    with RingBuffer() as rb:
        a, b = two_rings(make_producer, rb, [None, None])
        a.produce(4, fixed=True, producer=0)
        b.produce(4, fixed=True, producer=1)
        first, second = rb.records(), rb.records()
        got = [step(first)]  # a's 0; a's 1-3 lent to it
        interrupted_after_take(lambda: rb.rings[1].consume_batch(None, 2), "__exit__")  # b's 0, 1 put back
        got.append(step(second))
        got += rb.consume_batch()
        got += [r for r in (step(first), step(second)) if r is not None]
        got += rb.consume_batch()
    assert by_ring(got) == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}


def test_a_deque_an_iteration_emptied_and_still_holds_takes_no_new_records(make_producer):
    """Iteration I emptied ring a's lent deque and holds it; iteration J lent ring b's put-back
    part instead; the emptied deque, last in line, was then filled by ring a's next walk, and I
    yielded those records a second time (the batch call that walked had returned them)."""
    with RingBuffer() as rb:
        a, b = two_rings(make_producer, rb, [None, None])
        a.produce(4, fixed=True, producer=0)
        b.produce(2, fixed=True, producer=1)
        first, second = rb.records(), rb.records()
        got = [step(first)]  # a's 0 (b's 0, 1 taken too: the rings are read in turn)
        interrupted_after_take(lambda: rb.rings[1].consume_batch(None, 2), "__exit__")  # put back first
        got += [step(first) for _ in range(3)]  # a's 1-3: its deque is empty, and it holds it
        got.append(step(second))  # lent b's part
        a.produce(2, fixed=True, producer=0)
        got += rb.rings[0].consume_batch()  # a's 4, 5
        got += [r for r in (step(first), step(second)) if r is not None]
        got += rb.consume_batch()
    assert by_ring(got) == {0: [0, 1, 2, 3, 4, 5], 1: [0, 1]}


# -- close() with an iteration paused on its lent deque -----------------------------------------------


def test_an_iteration_paused_at_close_yields_none_of_the_records_close_said_it_drops(producer, perf_producer):
    """close() warns that the records kept "go with it: no consumer will see them", yet an
    iteration paused on its lent deque went on yielding them after close()."""

    def after_close(buf: Any, what: str, kept: int, produce: Any) -> list[Any]:
        produce()
        iteration = buf.records()
        assert step(iteration) is not None
        with pytest.warns(RuntimeWarning, match=f"closing this {what} drops {kept} records"):
            buf.close()
        later = []
        with contextlib.suppress(StopAsyncIteration):
            for _ in range(kept + 1):
                later.append(step(iteration))
        return later

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        rb = RingBuffer(producer.ring)
        assert after_close(rb, "RingBuffer", 4, lambda: producer.produce(5, fixed=True)) == []
        pb = PerfBuffer(perf_producer.array, 1, cpus=[0])
        assert after_close(pb, "PerfBuffer", 4, lambda: perf_producer.output(5, 40, cpu=0)) == []


# -- callbacks and batch calls taking a few kept records in turn ---------------------------------------


def test_callbacks_and_batch_calls_taking_kept_records_in_turn_copy_no_chunk_each_time(make_producer):
    """consume(1) turned the rest of a kept part into a deque of up to 4096 rows; consume_batch(None,
    1) then copied that deque's rest into a list; the next consume(1) made a deque of it again:
    each call copied a chunk (300,000 kept records taken so took 15 s here, against 2 s with either
    call alone). Measured as what each call allocates at its peak (a chunk's copy is over 32 KiB),
    not as time; and every record arrives once, in order."""
    producer = make_producer(ring_size=1 << 20)
    got: list[bytes] = []
    with RingBuffer(producer.ring, got.append) as rb:
        produced = producer.produce(20_000, 16).produced
        assert produced == 20_000
        interrupted_after_take(lambda: rb.consume_batch(), "consume")  # all kept, as rows
        peaks = []
        for i in range(200):
            tracemalloc.start()
            try:
                if i % 2:
                    assert rb.consume(1) == 1
                else:
                    got.extend(rb.consume_batch(None, 1))
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
        while rb.consume(1000):
            pass
    assert max(peaks) < 16 * 1024, f"a call allocated {max(peaks)} bytes at its peak"
    assert seqs_of(got) == list(range(produced))


# -- a Ring of a RingBuffer closed on its own ------------------------------------------------------------


def test_a_ring_of_a_ring_buffer_closed_on_its_own_leaves_the_others_working(make_producer):
    """rb.rings[0].close() said nothing of the records kept of that ring, and they were still
    delivered after it was closed ("a closed Ring hands over nothing"); the RingBuffer kept the
    closed ring: consume() delivered the kept records and then raised ValueError "ring ... is
    closed", and so did every consume() and consume_batch() after, for the healthy ring too, and
    poll() once the closed ring's map had data (its epoll entry outlived the fd). The ring now
    leaves its RingBuffer, and what is kept of it goes with a warning."""
    got: list[bytes] = []
    with RingBuffer() as rb:
        a, b = two_rings(make_producer, rb, [got.append, got.append])
        a.produce(3, fixed=True, producer=0)
        b.produce(3, fixed=True, producer=1)
        first = step(rb.records())  # a's 0; a's 1, 2 and b's 0-2 kept
        assert parse(first)[:2] == (0, 0)
        with pytest.warns(RuntimeWarning, match="drops 2 records"):
            rb.rings[0].close()
        assert len(rb.rings) == 1
        a.produce(1, fixed=True, producer=0)  # into the closed ring's map: nobody's now
        b.produce(1, fixed=True, producer=1)
        assert rb.consume() == 4  # b's kept 0-2, then its 3
        b.produce(1, fixed=True, producer=1)
        assert seqs_of(rb.consume_batch()) == [4]
        started = time.monotonic()
        assert rb.poll(300) == 0  # waits: the closed ring's data wakes nothing (no spin)
        assert time.monotonic() - started >= 0.25, "poll() returned at once: woken by the closed ring"
    assert by_ring(got) == {1: [0, 1, 2, 3]}


# -- a batch call that fails after taking from the lent deque, an iteration in another thread -----------


def while_building(step_other: Any, call: Any) -> None:
    """``call()`` with ``step_other()`` run as its Kept._build is entered: another thread's turn
    (an iteration takes from its lent deque without the consumer lock), at the switch point of a
    Python function's entry."""

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_name == "_build":
            sys.setprofile(None)
            step_other()

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)


@pytest.mark.parametrize("kind", ["ring", "perf"])
def test_a_dtype_call_on_misfit_kept_rows_puts_nothing_back_behind_what_an_iteration_took_meanwhile(
    producer, perf_producer, kind
):
    """consume_batch(dtype) takes the lent deque's rows in place, then RecordSizeError (the records
    are 16 bytes; the 40-byte perf samples do not fit V16 either, up to 23 with the kernel's
    padding) puts them back in front: an iteration in another thread that took the next row
    meanwhile (it needs no lock) yielded it, then the older ones: records out of order. It must
    wait for the batch call instead (Kept.holding) and yield the rows put back first. A perf
    buffer's rows are (cpu, data), its dtype call goes through with_cpus."""
    if kind == "ring":
        buffer = RingBuffer(producer.ring)
        producer.produce(6, 16)
        misfit, seq = "V32", lambda r: parse(r)[0]
    else:
        buffer = PerfBuffer(perf_producer.array, 1, cpus=[0])
        perf_producer.output(6, 40, cpu=0)
        misfit, seq = "V16", lambda r: parse(r[1] if isinstance(r, tuple) else r)[0]
    with buffer:
        iteration = buffer.records()
        got = [step(iteration)]  # 0; 1-5 lent to it
        other = threading.Thread(target=lambda: got.append(step(iteration)))

        def start_other_and_give_it_a_second() -> None:  # (it finishes at once where it does not wait)
            other.start()
            other.join(1)

        with pytest.raises(RecordSizeError):
            while_building(start_other_and_give_it_a_second, lambda: buffer.consume_batch(misfit, 2))
        other.join(10)
        assert not other.is_alive(), "the iteration still waits after the batch call ended"
        got += [r for r in (step(iteration) for _ in range(5)) if r is not None]
        got += buffer.consume_batch()
    assert [seq(r) for r in got] == [0, 1, 2, 3, 4, 5]


# -- a fork() child stepping an iteration its parent paused ------------------------------------------


def test_a_fork_child_stepping_an_iteration_paused_on_its_lent_deque_is_refused(producer, perf_producer):
    """Every consumer call of a fork() child is refused (the records are the parent's), but an
    iteration paused on its lent deque took from it without a call that checks: the child yielded
    the parent's next record, and the parent yielded it too."""

    def child_step(iteration: Any) -> Any:
        return fork_call(lambda: iteration.__anext__().send(None))

    with RingBuffer(producer.ring) as rb:
        producer.produce(3, fixed=True)
        iteration = rb.records()
        got = [step(iteration)]  # 0; 1, 2 lent to it
        said = child_step(iteration)
        assert said.startswith("RuntimeError: this RingBuffer was opened in process"), said
        got += [step(iteration), step(iteration)]
        assert seqs_of(got) == [0, 1, 2]
    with PerfBuffer(perf_producer.array, 1, cpus=[0]) as pb:
        perf_producer.output(3, 40, cpu=0)
        iteration = pb.records()
        samples = [step(iteration)]
        said = child_step(iteration)
        assert said.startswith("RuntimeError: this PerfBuffer was opened in process"), said
        samples += [step(iteration), step(iteration)]
        assert [parse(data)[0] for _, data in samples] == [0, 1, 2]


# -- a PerfRing used directly, beside its PerfBuffer -------------------------------------------------


@pytest.mark.parametrize("call", ["consume", "resync"])
def test_a_perf_ring_used_from_a_callback_of_its_buffer_is_refused_not_a_repeat(perf_producer, call):
    """PerfRing.consume and resync took no lock: from a sample_cb, consume walked the samples after
    the one being delivered, then the outer walk went on from where it was and delivered them
    again; resync moved data_tail to data_head and the outer walk delivered what it skipped."""
    got: list[int] = []
    errors: list[str] = []
    with PerfBuffer(perf_producer.array, 1, lambda cpu, data: None, cpus=[0]) as pb:
        ring = pb.rings[0]

        def sample_cb(cpu: int, data: bytes) -> None:
            got.append(parse(data)[0])
            if len(got) == 1:
                try:
                    if call == "consume":
                        ring.consume(lambda cpu, data: got.append(parse(data)[0]), lambda cpu, lost: None)
                    else:
                        ring.resync()
                except RuntimeError as exc:
                    errors.append(str(exc))

        pb._sample_cb = sample_cb
        perf_producer.output(5, 40, cpu=0)
        assert pb.consume() == 5
    assert got == [0, 1, 2, 3, 4]
    assert errors == ["PerfBuffer: this thread is already consuming (in a callback or a batch() block); "
                      "poll, consume and batches do not nest"]


def test_a_perf_ring_consumed_from_another_thread_waits_for_its_buffers_walk(perf_producer):
    """From another thread while a sample_cb ran, PerfRing.consume walked from the data_tail the
    walk had stored and delivered the samples the walk then delivered again. It waits now."""
    entered, release = threading.Event(), threading.Event()
    got: list[tuple[str, int]] = []

    def sample_cb(cpu: int, data: bytes) -> None:
        got.append(("poll", parse(data)[0]))
        entered.set()
        release.wait(10)

    with PerfBuffer(perf_producer.array, 1, sample_cb, cpus=[0]) as pb:
        perf_producer.output(4, 40, cpu=0)
        other = threading.Thread(
            target=lambda: pb.rings[0].consume(lambda cpu, data: got.append(("other", parse(data)[0])),
                                               lambda cpu, lost: None)
        )
        walk = threading.Thread(target=pb.consume)
        walk.start()
        assert entered.wait(10)
        other.start()
        other.join(1)  # (where nothing stops it, it is done by now)
        release.set()
        walk.join(10)
        other.join(10)
        assert not walk.is_alive() and not other.is_alive()
        perf_producer.output(1, 40, cpu=0)
        pb.consume()
    assert sorted(seq for _, seq in got) == [0, 1, 2, 3, 4], got


def test_the_c_walk_refuses_a_second_walk_resync_or_commit_of_its_ring_whoever_calls(producer, perf_producer):
    """Below the consumer locks (every public path takes one), the C walk itself: it goes on from
    its own copy of the position, so a second walk, a resync or a commit of its ring meanwhile
    would deliver records twice or move the position back. Each is refused while it runs."""
    said: list[str] = []

    def attempt(call: Any) -> None:
        try:
            call()
        except RuntimeError as exc:
            said.append(str(exc))

    with RingBuffer(producer.ring, shared=True) as rb:
        state = rb.rings[0]._state
        producer.produce(4, fixed=True)
        nested = [lambda: state.consume(lambda data: None, 10), state.resync, lambda: state.commit(state.positions()[0]),
                  lambda: state.scan(16, 10, None)]
        got = []
        state.consume(lambda data: (got.append(parse(data)[0]), attempt(nested[len(got) - 1])), 4)
        assert got == [0, 1, 2, 3]
    assert said == ["the ring is being consumed (from its own callback, or another thread): one walk at a time"] * 4
    said.clear()
    with PerfBuffer(perf_producer.array, 1, lambda cpu, data: None, cpus=[0]) as pb:
        state = pb.rings[0]._state
        perf_producer.output(2, 40, cpu=0)
        nested = [lambda: state.consume(None, None, None, 0, 0, 10), state.resync]
        got = []
        state.consume(lambda cpu, data: (got.append(parse(data)[0]), attempt(nested[len(got) - 1])),
                      lambda cpu, lost: None, None, 0, 0, 10)
        assert got == [0, 1]
    assert said == ["the perf ring of cpu 0 is being consumed (from its own callback, or another thread): one "
                    "walk at a time"] * 2


# -- close() of a Ring from its own callback ----------------------------------------------------------


@pytest.mark.parametrize("owner", ["on-its-own", "on-its-own-kept", "ring-buffer"])
def test_a_ring_closed_from_its_own_callback_is_refused_and_stays_whole(producer, owner):
    """The C walk refused to unmap a ring it was walking, but close() went on and closed the map fd
    and gave up the claim: the ring said closed, yet consume() went on delivering from it, and a
    second consumer could claim the map meanwhile (two consumers, each record to one of them).
    Delivering kept records (no C walk), a Ring on its own closed, said it dropped them, and the
    delivery went on handing them to the callback."""
    got: list[int] = []

    def callback(data: bytes) -> None:
        got.append(parse(data)[0])
        if len(got) == 1:
            ring.close()

    with contextlib.ExitStack() as stack:
        if owner.startswith("on-its-own"):
            ring = Ring(producer.ring, callback)
            stack.callback(ring.close)
        else:
            ring = stack.enter_context(RingBuffer(producer.ring, callback)).rings[0]
        producer.produce(3, fixed=True)
        if owner == "on-its-own-kept":
            interrupted_after_take(lambda: ring.consume_batch(), "consume")
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with pytest.raises(RuntimeError, match="callback"):
                ring.consume()
        assert not ring.closed
        with pytest.raises(OSError, match="already consumed"):
            RingBuffer(producer.ring).close()  # still claimed: the ring has its consumer
        assert ring.consume() == 2
    assert got == [0, 1, 2]

"""Faults while producers run on every CPU: callbacks that raise, Ctrl-C, a consumer closed and
re-opened, producers that go away, a ring full for long, close() from another thread. Through all
of it, every committed record is delivered exactly once, in order, and the counts add up."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
import time
from typing import Any, Callable

import numpy as np
import pytest
from conftest import open_fds
from producer import expected_fixed, parse
from stress.harness import (
    FIXED,
    Deadline,
    PerfChecker,
    PerfProducers,
    RingChecker,
    RingProducers,
    env_stress_seconds,
    report,
)

import bpfring
from bpfring import PerfBuffer, RingBuffer, UserRingBuffer

LAPS = 200  # fault runs lap a 16 KiB ring at least this often (and last BPFRING_STRESS_SECONDS)
RING = 16 * 1024
BPFRING_DIR = os.path.dirname(os.path.abspath(bpfring.__file__)) + os.sep  # (the code under test)


def until(
    done: Callable[[], bool], step: Callable[[], Any], what: str, state: Callable[[], object] = lambda: ""
) -> None:
    """Run ``step`` until ``done()`` and, in long mode, BPFRING_STRESS_SECONDS have passed."""
    seconds = env_stress_seconds()
    start = time.monotonic()
    deadline = Deadline(seconds, what, state)
    while not done() or time.monotonic() - start < seconds:
        deadline.check()
        step()


def drain_ring(rb: RingBuffer, checker: RingChecker, got: list[bytes], consume: Callable[[], Any]) -> None:
    """After the producers stopped: consume until every committed record is delivered, then check."""
    deadline = Deadline(0, "drain")
    while True:
        checker.records(got)
        got.clear()
        if checker.delivered >= checker.producers.total("produced"):
            break
        deadline.check()
        consume()
    assert rb.consume() == 0 and rb.rings[0].avail_data_size == 0
    checker.check_totals()


def drain_perf(pb: PerfBuffer, producers: PerfProducers, checker: PerfChecker, consume: Callable[[], Any]) -> None:
    """After the producers stopped: drain, flush the pending lost counts, drain, check."""
    deadline = Deadline(0, "drain")
    for flushed in (False, True):
        while checker.delivered < producers.total("produced"):
            deadline.check()
            consume()
        if not flushed:
            producers.flush()
    consume()  # nothing more: check_totals fails on a sample delivered past the produced ones
    checker.check_totals()


def laps(rb: RingBuffer) -> int:
    return rb.rings[0].consumer_pos // rb.rings[0].size


# -- callbacks that raise -----------------------------------------------------------------------


def test_callbacks_raising_at_random_points_lose_and_repeat_nothing(make_producer, walk):
    producer = make_producer(ring_size=RING)
    producers = RingProducers(producer)
    checker = RingChecker(producers)
    got: list[bytes] = []
    rng = random.Random(4)
    raised = 0

    def callback(data: bytes) -> None:
        got.append(data)
        if rng.random() < 0.01:
            raise RuntimeError("callback failed")

    def step() -> None:
        nonlocal raised
        try:
            rb.poll(100) if rng.random() < 0.5 else rb.consume(max_records=rng.randint(1, 50))
        except RuntimeError:
            raised += 1
        checker.records(got)
        got.clear()

    with RingBuffer(producer.ring, callback) as rb:
        with producers:
            until(lambda: laps(rb) >= LAPS, step, "raising callbacks")
        drain_ring(rb, checker, got, step)
        assert raised > 0
        report(f"fault: raising callbacks ({walk} walk)", records=checker.delivered, raised=raised, laps=laps(rb))


def test_sample_and_lost_callbacks_raising_at_random_points_lose_and_repeat_nothing(perf_producer):
    producers = PerfProducers(perf_producer)
    checker = PerfChecker(producers)
    rng = random.Random(5)
    raised = {"sample": 0, "lost": 0}

    def sample(cpu: int, data: bytes) -> None:
        checker.sample(cpu, data)
        if rng.random() < 0.01:
            raise RuntimeError("sample")

    def lost(cpu: int, n: int) -> None:
        checker.lose(cpu, n)
        if rng.random() < 0.3:
            raise RuntimeError("lost")

    def step() -> None:
        try:
            pb.poll(100)
        except RuntimeError as exc:
            raised[str(exc)] += 1

    with PerfBuffer(perf_producer.array, 1, sample, lost) as pb:
        with producers:
            until(lambda: checker.delivered >= 20 * LAPS, step, "raising perf callbacks")
        drain_perf(pb, producers, checker, step)
    assert raised["sample"] > 0
    report("fault: raising perf callbacks", records=checker.delivered, lost=sum(checker.lost.values()), raised=raised)


# -- Ctrl-C -------------------------------------------------------------------------------------


class CtrlC:
    """SIGINT sent to the main thread every 0-5 ms by a timer thread, raised as KeyboardInterrupt
    only while a consumer call is running (armed) and in bpfring's own code, so every interrupt
    lands in bpfring: in epoll, in the walk, between callbacks. Never in the test's code: not in
    a callback, nor in the checker it calls (a 6.1 guest, slow enough to be interrupted there,
    then stopped the count of a record bpfring had delivered and waited for it forever), nor in
    the test's ``take()`` between a batch call's return and keeping its result."""

    def __init__(self) -> None:
        self._armed = False
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self.caught = 0
        self.sent = 0

    def _handler(self, signum: int, frame: Any) -> None:
        if self._armed and (frame is None or frame.f_code.co_filename.startswith(BPFRING_DIR)):
            self._armed = False  # one interrupt per call
            raise KeyboardInterrupt

    def _send(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        rng = random.Random(6)
        while not self._stop.wait(rng.uniform(0, 0.005)):
            signal.pthread_kill(self._main, signal.SIGINT)
            self.sent += 1

    def call(self, fn: Callable[[], Any]) -> Any:
        try:
            self._armed = True
            return fn()
        except KeyboardInterrupt:
            self.caught += 1
            return None
        finally:
            self._armed = False

    def __enter__(self) -> CtrlC:
        self._old = signal.signal(signal.SIGINT, self._handler)
        self._thread = threading.Thread(target=self._send, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        signal.signal(signal.SIGINT, self._old)


def test_repeated_ctrl_c_during_poll_loses_and_repeats_nothing(make_producer, walk):
    producer = make_producer(ring_size=RING)
    producers = RingProducers(producer)
    checker = RingChecker(producers)
    got: list[bytes] = []

    def callback(data: bytes) -> None:
        got.append(data)

    def step() -> None:
        ctrl_c.call(lambda: rb.poll(100))
        checker.records(got)  # not armed: the interrupts land in poll() only
        got.clear()

    with RingBuffer(producer.ring, callback) as rb, CtrlC() as ctrl_c:
        with producers:
            until(lambda: laps(rb) >= LAPS and ctrl_c.caught >= 100, step, "ctrl-c")
        drain_ring(rb, checker, got, lambda: ctrl_c.call(rb.consume))
        report(
            f"fault: ctrl-c during poll ({walk} walk)",
            records=checker.delivered,
            interrupts=ctrl_c.caught,
            laps=laps(rb),
        )
    assert ctrl_c.caught >= 100


def test_repeated_ctrl_c_during_perf_poll_loses_and_repeats_nothing(perf_producer):
    producers = PerfProducers(perf_producer)
    checker = PerfChecker(producers)

    def sample(cpu: int, data: bytes) -> None:
        checker.sample(cpu, data)

    def lost(cpu: int, n: int) -> None:
        checker.lose(cpu, n)

    with PerfBuffer(perf_producer.array, 1, sample, lost) as pb, CtrlC() as ctrl_c:
        with producers:
            until(
                lambda: checker.delivered >= 20 * LAPS and ctrl_c.caught >= 100,
                lambda: ctrl_c.call(lambda: pb.poll(100)),
                "perf ctrl-c",
                lambda: (checker.delivered, ctrl_c.caught, ctrl_c.sent, producers.total("produced"), producers._errors),
            )
        drain_perf(pb, producers, checker, lambda: ctrl_c.call(pb.poll))
    report("fault: ctrl-c during perf poll", records=checker.delivered, interrupts=ctrl_c.caught)


@pytest.mark.parametrize("fixed", [False, True], ids=["bytes", "dtype"])
def test_repeated_ctrl_c_during_perf_batch_calls_loses_and_repeats_nothing(perf_producer, walk, fixed):
    size = 40  # with a dtype: every sample 40 bytes (44 with the kernel's padding, which it drops)
    producers = PerfProducers(perf_producer, sizes=(size, size)) if fixed else PerfProducers(perf_producer)
    checker = PerfChecker(producers)
    losses: list[tuple[int, int]] = []

    def lost(cpu: int, n: int) -> None:
        losses.append((cpu, n))  # a built-in only: the interrupts never land in the test's own code

    batches: list[tuple[Any, Any]] = []

    def take() -> None:  # the test's own code: the interrupts land inside bpfring only
        batches.append(pb.consume_batch(f"V{size}" if fixed else None, with_cpus=True))

    def step() -> None:
        ctrl_c.call(take)
        for cpus, samples in batches:  # checked outside the armed call
            for cpu, data in zip(list(cpus), samples):
                checker.sample(int(cpu), data.tobytes() + bytes(4) if fixed else data)
        batches.clear()
        for cpu, n in losses:
            checker.lose(cpu, n)
        losses.clear()

    with PerfBuffer(perf_producer.array, 1, None, lost) as pb, CtrlC() as ctrl_c:
        with producers:
            until(lambda: checker.delivered >= 20 * LAPS and ctrl_c.caught >= 100, step, "perf ctrl-c in batches")
        drain_perf(pb, producers, checker, step)
    report("fault: ctrl-c during perf batch calls", records=checker.delivered, interrupts=ctrl_c.caught)


@pytest.mark.parametrize("rings", [1, 2], ids=["one-ring", "two-rings"])
@pytest.mark.parametrize("how", ["bytes", "dtype", "out"])
def test_repeated_ctrl_c_during_batch_calls_loses_and_repeats_nothing(make_producer, walk, how, rings):
    """A batch interrupted after it took records hands them to the next call: on one ring, and
    over two (where the first ring's records are taken before the second is read)."""
    fixed = how != "bytes"
    ring_producers = [make_producer(ring_size=RING) for _ in range(rings)]
    producers = RingProducers(*ring_producers, fixed=fixed)
    checker = RingChecker(producers)
    got: list[bytes] = []
    batches: list[Any] = []
    out = np.empty(RING // 8, dtype=FIXED)

    def take() -> None:  # the test's own code: the interrupts land inside bpfring only
        if how == "bytes":
            got.extend(rb.consume_batch())
        else:
            batches.append(rb.consume_batch(FIXED, out=out if how == "out" else None))

    def step() -> None:
        ctrl_c.call(take)
        for arr in batches:  # (checked before the next call may write into out)
            checker.fixed(arr)
        batches.clear()

    def laps_all() -> int:
        return min(ring.consumer_pos // ring.size for ring in rb.rings)

    with RingBuffer() as rb:
        for p in ring_producers:
            rb.add(p.ring)
        with CtrlC() as ctrl_c, producers:
            until(lambda: laps_all() >= LAPS and ctrl_c.caught >= 100, step, "ctrl-c in batches")
        deadline = Deadline(0, "drain")
        while True:
            step()
            checker.records(got)
            got.clear()
            if checker.delivered >= producers.total("produced"):
                break
            deadline.check()
    checker.check_totals()
    assert ctrl_c.caught >= 100
    report(f"fault: ctrl-c during batch calls ({walk} walk, {how}, {rings} rings)", records=checker.delivered)


class Interrupt:
    """A Ctrl-C at the k-th point of a call where Python can raise one: the entry of each Python
    function and the return of each C function it calls (sys.setprofile sees both), outside the
    tests' own code. Stepping k through every point of a call hits each of its windows in turn,
    deterministically, where random signals land in the wide ones."""

    def __init__(self) -> None:
        self.landed = 0  # calls interrupted
        self.most = 0  # the most points an uninterrupted call passed through

    def covered(self, tried: int) -> bool:
        """Each point k up to ``tried`` was tried: the calls had fewer, so every one was hit."""
        return self.landed >= 10 and self.most < tried

    def call(self, k: int, fn: Callable[[], Any]) -> Any:
        seen = 0

        def profile(frame: Any, event: str, arg: Any) -> None:
            nonlocal seen
            if event in ("call", "c_return") and not frame.f_code.co_filename.startswith(TESTS):
                seen += 1
                if seen == k:
                    raise KeyboardInterrupt  # (the profiler is switched off by it)

        sys.setprofile(profile)
        try:
            result = fn()
            self.most = max(self.most, seen)
            return result
        except KeyboardInterrupt:
            self.landed += 1
            return None
        finally:
            sys.setprofile(None)


TESTS = os.path.dirname(os.path.abspath(__file__)) + os.sep  # (their code is not the one under test)
POINTS = 400  # more than a batch call below passes through: the last calls run uninterrupted


def at_every_point(
    interrupt: Interrupt, produce: Callable[[], None], take: Callable[[], int], prepare: Callable[[], Any] = lambda: 0
) -> None:
    """For each point k: records in the rings, ``prepare()`` (nothing kept by default), a call
    interrupted at its k-th point, another at its k+1-th (handing over what the first kept, if
    it kept any; another point, lest the second undo what the first got wrong), then calls until
    nothing is left."""
    for k in range(1, POINTS):
        produce()
        prepare()
        interrupt.call(k, take)
        interrupt.call(k + 1, take)
        while take():
            pass


def ring_at_every_point(
    make_producer: Any,
    rings: int,
    take: Callable[[RingBuffer, list[bytes]], int],
    prepare: Callable[[RingBuffer, list[bytes]], Any] = lambda rb, got: 0,
    callbacks: bool = False,
) -> None:
    """at_every_point on a RingBuffer of ``rings`` rings, each fed fixed records by a producer id
    of its own (with ``callbacks``, each ring's callback appending to ``got``), ``take(rb, got)``
    consuming; then each ring's records all delivered, once, in order, intact, and each to its
    own ring's callback."""
    ring_producers = [make_producer(ring_size=4096) for _ in range(rings)]
    got: list[bytes] = []
    elsewhere: list[bytes] = []  # records a callback got of another ring
    interrupt = Interrupt()

    def callback(i: int) -> Callable[[bytes], None]:
        return lambda data: (got if parse(data)[1] == i else elsewhere).append(data)

    with RingBuffer() as rb:
        for i, p in enumerate(ring_producers):
            rb.add(p.ring, callback(i) if callbacks else None)

        def produce() -> None:
            for i, p in enumerate(ring_producers):
                assert p.produce(2, fixed=True, producer=i).produced == 2

        at_every_point(interrupt, produce, lambda: take(rb, got), lambda: prepare(rb, got))
    assert interrupt.covered(POINTS - 1), (interrupt.landed, interrupt.most)
    assert not elsewhere, f"{len(elsewhere)} records went to another ring's callback"
    for i in range(rings):
        mine = [r for r in got if parse(r)[1] == i]
        assert [parse(r)[0] for r in mine] == list(range(2 * (POINTS - 1))), f"ring {i}: lost, repeated or out of order"
        assert mine == [expected_fixed(seq, i) for seq in range(2 * (POINTS - 1))]


@pytest.mark.parametrize("limit", [None, 3], ids=["all", "max3"])
@pytest.mark.parametrize("how", ["bytes", "dtype", "out"])
@pytest.mark.parametrize("rings", [1, 2], ids=["one-ring", "two-rings"])
def test_a_ctrl_c_at_every_point_of_a_batch_call_loses_and_repeats_nothing(make_producer, rings, how, limit):
    out = np.empty(64, dtype=FIXED)

    def take(rb: RingBuffer, got: list[bytes]) -> int:
        if how == "bytes":
            records = rb.consume_batch(None, limit)
        else:
            records = [r.tobytes() for r in rb.consume_batch(FIXED, limit, out=out if how == "out" else None)]
        got.extend(records)
        return len(records)

    ring_at_every_point(make_producer, rings, take)


@pytest.mark.parametrize("limit", [None, 3], ids=["all", "max3"])
@pytest.mark.parametrize("how", ["bytes", "dtype", "out"])
def test_a_ctrl_c_at_every_point_of_a_perf_batch_call_loses_and_repeats_nothing(perf_producer, how, limit):
    size = 40  # 44 bytes with the kernel's padding, dropped with a dtype
    dtype = np.dtype([("seq", "<u8"), ("producer", "<u4"), ("size", "<u4"), ("tail", "u1", (size - 16,))])
    out = np.empty(64, dtype=dtype)
    got: list[tuple[int, bytes]] = []
    interrupt = Interrupt()
    cpus = sorted(os.sched_getaffinity(0))

    def take() -> int:
        if how == "bytes":
            on, samples = pb.consume_batch(None, limit, with_cpus=True)
        else:
            on, samples = pb.consume_batch(dtype, limit, out=out if how == "out" else None, with_cpus=True)
            samples = [r.tobytes() for r in samples]
        got.extend(zip([int(c) for c in on], [s[:size] for s in samples]))
        return len(samples)

    with PerfBuffer(perf_producer.array, 1, None, lambda cpu, n: pytest.fail(f"{n} samples lost on cpu {cpu}")) as pb:

        def produce() -> None:
            for cpu in cpus:
                assert perf_producer.output(2, size, cpu=cpu).produced == 2

        at_every_point(interrupt, produce, take)
    assert interrupt.covered(POINTS - 1), (interrupt.landed, interrupt.most)
    for cpu in cpus:
        seqs = [parse(data)[0] for on, data in got if on == cpu]
        assert seqs == list(range(2 * (POINTS - 1))), f"cpu {cpu}: lost, repeated or out of order"


def async_step(buf: RingBuffer | PerfBuffer, got: list[Any]) -> int:
    """One step of ``async for ... in buf``, driven without an event loop: its record to ``got``;
    none when it would have waited (that needs a running loop). The iteration is then closed."""
    iteration = buf.records()
    step = iteration.__anext__()
    try:
        step.send(None)
    except StopIteration as yielded:
        got.append(yielded.value)
    except RuntimeError as exc:
        assert "no running event loop" in str(exc)
        return 0
    else:
        raise AssertionError("an async iteration step neither yielded nor waited")
    with contextlib.suppress(StopIteration):
        iteration.aclose().send(None)
    return 1


# A Ctrl-C that lands while a dropped iteration is being finalized is printed and ignored there,
# as Python does in every finalizer: after its record was yielded, so nothing is lost.
ignore_finalizer_interrupts = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@ignore_finalizer_interrupts
@pytest.mark.parametrize("how", ["async", "async-after-async", "batch-after-async"])
@pytest.mark.parametrize("rings", [1, 2], ids=["one-ring", "two-rings"])
def test_a_ctrl_c_at_every_point_of_an_async_iteration_loses_and_repeats_nothing(make_producer, rings, how):
    """An iteration step interrupted (taking from the rings, or from what an earlier step took
    and lent it), and a batch call interrupted handing over what an iteration took: nothing
    lost, nothing twice."""

    def batch(rb: RingBuffer, got: list[bytes]) -> int:
        records = rb.consume_batch(None, 2)  # (fewer than an iteration takes from two rings)
        got.extend(records)
        return len(records)

    take = batch if how == "batch-after-async" else async_step
    prepare = (lambda rb, got: 0) if how == "async" else async_step
    ring_at_every_point(make_producer, rings, take, prepare)


@ignore_finalizer_interrupts
@pytest.mark.parametrize(
    "how", ["consume", "poll", "ring-consume", "ring-batch", "ring-dtype", "batch-then-consume", "batch-then-ring"]
)
@pytest.mark.parametrize("rings", [1, 2], ids=["one-ring", "two-rings"])
def test_a_ctrl_c_at_every_point_of_a_call_handing_over_kept_records_loses_and_repeats_nothing(
    make_producer, rings, how
):
    """After an iteration step left records kept: poll() and consume() delivering them to each
    ring's callback, and each Ring of the RingBuffer handing over its own (to its callback, or
    as a batch), interrupted at each point: nothing lost, nothing twice, each ring in order.
    ``batch-then-*``: a RingBuffer batch call over both rings' kept records, and each call after
    it one of those (a batch it puts back must keep each record's ring)."""
    calls = 0

    def take(rb: RingBuffer, got: list[bytes]) -> int:
        nonlocal calls
        calls += 1
        if how.startswith("batch-then-") and calls % 2:
            records = rb.consume_batch(None, 3)
            got.extend(records)
            return len(records)
        if how in ("consume", "batch-then-consume"):
            return rb.consume(3)
        if how == "poll":
            return rb.poll(0)
        n = 0
        for ring in rb.rings:
            if how == "ring-consume":
                n += ring.consume(3)
                continue
            records = ring.consume_batch(FIXED, 3) if how == "ring-dtype" else ring.consume_batch(None, 3)
            got.extend([r.tobytes() for r in records] if how == "ring-dtype" else records)
            n += len(records)
        return n

    ring_at_every_point(make_producer, rings, take, async_step, callbacks=True)


@ignore_finalizer_interrupts
@pytest.mark.parametrize("how", ["consume", "poll", "consume-buffer"])
def test_a_ctrl_c_at_every_point_of_a_perf_call_delivering_kept_samples_loses_and_repeats_nothing(perf_producer, how):
    """After an iteration step left samples kept: sample_cb gets them first from poll(),
    consume() and consume_buffer(i), each interrupted at each point."""
    got: list[tuple[int, bytes]] = []
    interrupt = Interrupt()
    cpus = sorted(os.sched_getaffinity(0))

    def take() -> int:
        if how == "consume":
            return pb.consume()
        if how == "poll":
            return pb.poll(0)
        return sum(pb.consume_buffer(i) for i in range(len(cpus)))

    def sample(cpu: int, data: bytes) -> None:
        got.append((cpu, data))

    lost = lambda cpu, n: pytest.fail(f"{n} samples lost on cpu {cpu}")  # noqa: E731
    with PerfBuffer(perf_producer.array, 1, sample, lost, cpus=cpus) as pb:

        def produce() -> None:
            for cpu in cpus:
                assert perf_producer.output(2, 40, cpu=cpu).produced == 2

        at_every_point(interrupt, produce, take, lambda: async_step(pb, got))
    assert interrupt.covered(POINTS - 1), (interrupt.landed, interrupt.most)
    for cpu in cpus:
        seqs = [parse(data)[0] for on, data in got if on == cpu]
        assert seqs == list(range(2 * (POINTS - 1))), f"cpu {cpu}: lost, repeated or out of order"


@ignore_finalizer_interrupts
def test_a_ctrl_c_at_every_point_of_an_async_perf_iteration_loses_and_repeats_nothing(perf_producer):
    got: list[tuple[int, bytes]] = []
    interrupt = Interrupt()
    cpus = sorted(os.sched_getaffinity(0))

    def take() -> int:
        return async_step(pb, got)

    with PerfBuffer(perf_producer.array, 1, None, lambda cpu, n: pytest.fail(f"{n} samples lost on cpu {cpu}")) as pb:

        def produce() -> None:
            for cpu in cpus:
                assert perf_producer.output(2, 40, cpu=cpu).produced == 2

        at_every_point(interrupt, produce, take)
    assert interrupt.covered(POINTS - 1), (interrupt.landed, interrupt.most)
    for cpu in cpus:
        seqs = [parse(data)[0] for on, data in got if on == cpu]
        assert seqs == list(range(2 * (POINTS - 1))), f"cpu {cpu}: lost, repeated or out of order"


# -- a consumer closed and re-opened; producers that go away -------------------------------------------


def test_a_consumer_reopened_on_a_pinned_ring_resumes_exactly_where_the_last_one_stopped(make_producer, walk):
    from bpfring._sys.mounts import BPFFS, ensure_bpffs

    ensure_bpffs()
    path = f"{BPFFS}/bpfring-faults-{os.getpid()}"
    producer = make_producer(ring_size=RING)
    producer.ring.pin(path)
    producers = RingProducers(producer)
    checker = RingChecker(producers)
    got: list[bytes] = []
    rng = random.Random(7)
    state = {"pos": 0, "opened": 0}

    def one_consumer() -> None:
        with RingBuffer(path, got.append) as rb:  # a new consumer, as another process would open it
            ring = rb.rings[0]
            assert ring.consumer_pos == state["pos"], "the new consumer does not resume where the last stopped"
            for _ in range(rng.randint(1, 4)):
                rb.poll(50) if rng.random() < 0.5 else rb.consume(max_records=rng.randint(1, 40))
            state["pos"] = ring.consumer_pos
        state["opened"] += 1
        checker.records(got)
        got.clear()
        if rng.random() < 0.1:
            time.sleep(0.01)  # producers go on alone for a while

    try:
        with producers:
            until(lambda: state["pos"] >= LAPS * RING and state["opened"] >= 100, one_consumer, "reopen")
        with RingBuffer(path, got.append) as rb:
            assert rb.rings[0].consumer_pos == state["pos"]
            drain_ring(rb, checker, got, rb.consume)
    finally:
        os.unlink(path)
    report(
        f"fault: consumer reopened on a pinned ring ({walk} walk)", records=checker.delivered, consumers=state["opened"]
    )


def test_producers_detached_mid_run_leave_every_committed_record_to_drain(make_producer, walk):
    a, b = make_producer(ring_size=RING), make_producer(ring_size=RING)
    producers_a, producers_b = RingProducers(a), RingProducers(b)
    checker_a, checker_b = RingChecker(producers_a), RingChecker(producers_b)
    got_a: list[bytes] = []
    got_b: list[bytes] = []

    def step() -> None:
        rb.poll(100)
        checker_a.records(got_a)
        checker_b.records(got_b)
        got_a.clear()
        got_b.clear()

    with RingBuffer(a.ring, got_a.append) as rb:
        ring_b = rb.add(b.ring, got_b.append)
        with producers_b:
            with producers_a:
                until(lambda: laps(rb) >= LAPS // 2, step, "before the detach")
            a.close()  # ring a's programs unloaded and its object's fds closed: the RingBuffer's own fd holds the ring
            until(lambda: ring_b.consumer_pos >= LAPS * RING, step, "after the detach")
        deadline = Deadline(0, "drain both rings")
        while checker_a.delivered < producers_a.total("produced") or checker_b.delivered < producers_b.total(
            "produced"
        ):
            deadline.check()
            step()
        assert rb.consume() == 0
        checker_a.check_totals()
        checker_b.check_totals()


def test_perf_producers_detached_mid_run_leave_every_sample_to_drain(bpf_object):
    from perf_producer import PerfProducer

    other = PerfProducer(bpf_object("perf_producer"))
    producers = PerfProducers(other)
    checker = PerfChecker(producers)
    pb = PerfBuffer(other.array, 1, checker.sample, checker.lose)
    try:
        with producers:
            until(lambda: checker.delivered >= 10 * LAPS, lambda: pb.poll(100), "perf before the detach")
        for cpu, tally in producers.tallies.items():  # a few more on every CPU: they wait unread
            out = other.output(4, producers.sizes, cpu=cpu)
            tally.attempted += out.count
            tally.produced += out.produced
            tally.failed += out.failed
        pending = producers.total("produced") - checker.delivered
        assert pending > 0, "nothing left unread at the detach"
        other.close()  # the program and the object's array fd go while samples wait; the buffer keeps its own
        deadline = Deadline(0, "drain after the detach")
        while checker.delivered < producers.total("produced"):
            deadline.check()
            pb.poll(100)
        assert pb.consume() == 0
        for cpu, t in producers.tallies.items():
            assert t.produced + t.failed == t.attempted, f"cpu {cpu}: the BPF side lost count"
            assert checker.count[cpu] == t.produced, f"cpu {cpu}: {checker.count[cpu]} delivered, {t.produced} produced"
            # A lost count is written before the next sample that fits; none follows the detach.
            assert checker.lost[cpu] <= t.failed, f"cpu {cpu}: {checker.lost[cpu]} reported lost, {t.failed} failed"
        report("fault: perf producer detached", pending=pending, records=checker.delivered)
    finally:
        pb.close()
        other.close()
    assert pb.closed


# -- a full ring, for long ---------------------------------------------------------------------------


def full_seconds() -> float:
    return min(max(env_stress_seconds(), 1.0), 60.0)


def test_a_ring_full_for_long_drops_then_drains_with_exact_accounting(make_producer, walk):
    producer = make_producer(ring_size=RING)
    producers = RingProducers(producer, pause=0)
    checker = RingChecker(producers)
    got: list[bytes] = []
    with RingBuffer(producer.ring, got.append) as rb:
        with producers:
            end = time.monotonic() + full_seconds()
            while time.monotonic() < end:  # nobody reads: the ring stays full
                time.sleep(0.05)
            ring = rb.rings[0]
            assert ring.size - ring.avail_data_size < 1008, "the ring is not full"  # no room for one more record
            until(lambda: laps(rb) >= 10, lambda: rb.poll(100), "draining while producing")
        drain_ring(rb, checker, got, rb.consume)
    assert producers.total("dropped") > 0
    report(
        f"fault: ring full for {full_seconds():.0f} s ({walk} walk)",
        records=checker.delivered,
        dropped=producers.total("dropped"),
    )


def test_a_perf_buffer_full_for_long_reports_every_lost_sample(perf_producer):
    producers = PerfProducers(perf_producer, pause=0)
    checker = PerfChecker(producers)
    with PerfBuffer(perf_producer.array, 1, checker.sample, checker.lose) as pb:
        with producers:
            time.sleep(full_seconds())
            until(lambda: checker.delivered >= 1000, lambda: pb.poll(100), "perf draining while producing")
        drain_perf(pb, producers, checker, pb.consume)
    assert sum(checker.lost.values()) > 0
    report(
        f"fault: perf buffer full for {full_seconds():.0f} s",
        records=checker.delivered,
        lost=sum(checker.lost.values()),
    )


# -- close() from another thread ------------------------------------------------------------------


def close_during(make: Callable[[], Any], wait: Callable[[Any], Any], rounds: int) -> list[Any]:
    """``rounds`` times: ``wait(consumer)`` in a thread, close() from this one at a random moment.
    The wait must end (a generous timeout proves it did not hang) with a result or "closed"; the
    fds close() freed are then taken by placeholders, which nothing may touch afterwards."""
    rng = random.Random(8)
    results: list[Any] = []
    before = open_fds()
    for _ in range(rounds):
        consumer = make()
        mine = open_fds() - before
        result: list[Any] = []

        def run(consumer: Any = consumer, result: list[Any] = result) -> None:
            try:
                result.append(wait(consumer))
            except ValueError as exc:  # close() came first
                result.append(exc)

        t = threading.Thread(target=run)
        t.start()
        time.sleep(rng.uniform(0, 0.01))
        consumer.close()
        placeholders = [os.open("/dev/null", os.O_RDONLY) for _ in mine]  # reuse the freed numbers
        t.join(timeout=30)
        assert not t.is_alive(), "the waiting call did not return after close()"
        assert len(result) == 1, "the waiting call raised something other than 'closed'"
        if isinstance(result[0], ValueError):
            assert "closed" in str(result[0])
        for fd in placeholders:  # a late close() or read on a freed number would show here
            assert os.readlink(f"/proc/self/fd/{fd}") == "/dev/null"
            os.close(fd)
        assert open_fds() == before
        results.append(result[0])
    return results


def test_close_from_another_thread_ends_a_busy_or_blocked_poll_without_touching_freed_fds(make_producer, walk):
    producer = make_producer(ring_size=RING)
    producers = RingProducers(producer)
    with producers:  # sometimes poll() is inside a callback when close() comes, sometimes in epoll
        results = close_during(lambda: RingBuffer(producer.ring, lambda d: None), lambda rb: rb.poll(-1), 100)
    assert any(isinstance(r, int) for r in results)


def test_close_from_another_thread_ends_a_perf_poll_without_touching_freed_fds(perf_producer):
    producers = PerfProducers(perf_producer)
    with producers:
        results = close_during(
            lambda: PerfBuffer(perf_producer.array, 1, lambda c, d: None), lambda pb: pb.poll(-1), 50
        )
    assert any(isinstance(r, int) for r in results)


def test_close_from_another_thread_ends_a_reserve_blocking_without_touching_freed_fds(bpf):
    with bpfring.Map.create(bpfring.MapType.USER_RINGBUF, 4096) as m:
        with UserRingBuffer(m) as urb:
            urb.reserve(4000).submit()  # full, and nothing drains it
        results = close_during(lambda: UserRingBuffer(m), lambda urb: urb.reserve_blocking(4000, -1), 50)
    assert all(isinstance(r, ValueError) for r in results)

"""The consumers under test, each reading the same workload: bpfring's callback, batch and
asyncio forms, and libbpf's ring_buffer/perf_buffer with a C callback and with a ctypes one.

Every consumer does the same work per record: count it, and for every 64th record read its
timestamp and the clock (the delivery latency). A session is set up before the clock starts,
consumes until the producers are stopped (a timer thread stops them at the deadline: under
overload a ring_buffer__poll() or RingBuffer.poll() does not return while records keep coming,
as the kernel bench's consumers), then drains what is left, so that it counts every record
produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import select
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from .._sys import libbpf
from .._sys import perf as sys_perf
from ..perfbuf import PerfBuffer
from ..ringbuf import RingBuffer
from .native import LATENCY_EVERY, new_tally
from .workload import Scenario, Workload

RECORD = np.dtype([("ts", "<u8")])  # the workload's 8-byte record: its bpf_ktime_get_ns()
POLL_MS = 10  # the longest a consumer waits before looking at the clock (libbpf-c's loop: 10 too)
_MASK = LATENCY_EVERY - 1
_clock = time.clock_gettime_ns
_MONO = time.CLOCK_MONOTONIC  # bpf_ktime_get_ns()'s clock


def now_ns() -> int:
    return _clock(_MONO)


class Session:
    """One consumer on one workload: set up in __init__, then run(), result(), close()."""

    cpu_s: Optional[float] = None  # set by consumers in another process; else the driver measures
    deadline_ns = 0  # when the producers will be stopped (CLOCK_MONOTONIC), set before run()
    # A consumer with a program of its own (bcc compiles its copy of the workload) has its own
    # map of producer tgids and its own counters, and reads another ring than the workload's.
    producers_map: Any = None  # where the producers register; None: the workload's
    owns_workload_ring = True  # it reads the workload's ring (the driver checks it is left empty)

    def counters(self) -> Optional[tuple[int, int]]:
        """(produced, dropped) by this consumer's own program; None: the workload's counters."""
        return None

    def run(self, stopped: threading.Event) -> None:
        """Consume until ``stopped`` is set (the producers are dead then), then drain the rest."""
        raise NotImplementedError

    def result(self) -> tuple[int, np.ndarray]:
        """(records delivered, latency samples in ns)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _until(stopped: threading.Event, step: Callable[[int], Any]) -> None:
    """Call step(timeout_ms) until the producers are stopped."""
    while not stopped.is_set():
        step(POLL_MS)


class PyTally:
    """The per-record work of the Python consumers, as closures (the cheapest callable)."""

    def __init__(self) -> None:
        count = 0
        lat: list[int] = []
        batches: list[np.ndarray] = []
        from_bytes = int.from_bytes

        def on_record(data: bytes) -> None:
            nonlocal count
            count += 1
            if not count & _MASK:
                lat.append(_clock(_MONO) - from_bytes(data[:8], "little"))

        def on_sample(cpu: int, data: bytes) -> None:
            nonlocal count
            count += 1
            if not count & _MASK:
                lat.append(_clock(_MONO) - from_bytes(data[:8], "little"))

        def on_batch(ts: np.ndarray) -> None:
            nonlocal count
            now = _clock(_MONO)
            first = (-(count + 1)) % LATENCY_EVERY  # the same records a per-record consumer samples
            count += len(ts)
            batches.append(now - ts[first::LATENCY_EVERY].astype(np.int64))

        def result() -> tuple[int, np.ndarray]:
            return count, np.concatenate([np.array(lat, dtype=np.int64)] + batches)

        self.on_record, self.on_sample, self.on_batch, self.result = on_record, on_sample, on_batch, result


# -- bpfring ----------------------------------------------------------------------------------


def _open_buffer(wl: Workload, tally: PyTally, samples: bool) -> RingBuffer | PerfBuffer:
    """The workload's ring buffer, or its perf buffer (sample_cb only where ``samples``)."""
    s = wl.scenario
    if s.channel == "ringbuf":
        return RingBuffer(wl.map, tally.on_record)
    return PerfBuffer(wl.map, s.perfbuf_pages, tally.on_sample if samples else None, wakeup_events=s.wakeup_events)


class BpfringCallback(Session):
    def __init__(self, wl: Workload) -> None:
        self.t = PyTally()
        self.buf: Any = _open_buffer(wl, self.t, samples=True)

    def run(self, stopped: threading.Event) -> None:
        _until(stopped, self.buf.poll)
        self.buf.consume()

    def result(self) -> tuple[int, np.ndarray]:
        return self.t.result()

    def close(self) -> None:
        self.buf.close()


class BpfringBatch(Session):
    """consume_batch(dtype) whenever the epoll fd says there is data (fileno() in select.epoll)."""

    def __init__(self, wl: Workload) -> None:
        self.t = PyTally()
        self.buf: Any = _open_buffer(wl, self.t, samples=False)
        self.ep = select.epoll()
        self.ep.register(self.buf.fileno(), select.EPOLLIN)

    def _take(self) -> int:
        records = self.buf.consume_batch(RECORD)
        if len(records):
            self.t.on_batch(records["ts"])
        return len(records)

    def run(self, stopped: threading.Event) -> None:
        def step(timeout_ms: int) -> None:
            if self.ep.poll(timeout_ms / 1000):
                self._take()

        _until(stopped, step)
        while self._take():
            pass

    def result(self) -> tuple[int, np.ndarray]:
        return self.t.result()

    def close(self) -> None:
        self.ep.close()
        self.buf.close()


class BpfringAsync(Session):
    """``async for`` over records() (or batches()) on an asyncio loop, cancelled at the deadline."""

    def __init__(self, wl: Workload, batches: bool) -> None:
        self.t = PyTally()
        self.batches = batches
        self.buf: Any = _open_buffer(wl, self.t, samples=True)

    async def _consume(self) -> None:
        if self.batches:
            async for records in self.buf.batches(RECORD):
                self.t.on_batch(records["ts"])
        elif isinstance(self.buf, RingBuffer):
            async for data in self.buf.records():
                self.t.on_record(data)
        else:
            async for _cpu, data in self.buf.records():
                self.t.on_record(data)

    async def _main(self, stopped: threading.Event) -> None:
        task = asyncio.create_task(self._consume())
        # Told at once (no polling step): the consumer's clock runs until its drain is done.
        await asyncio.get_running_loop().run_in_executor(None, stopped.wait)
        await asyncio.sleep(0.01)  # the last wakeup reaches the task
        task.cancel()  # it waits with nothing taken: the rest stays in the ring
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def run(self, stopped: threading.Event) -> None:
        asyncio.run(self._main(stopped))
        if self.batches:
            while len(records := self.buf.consume_batch(RECORD)):
                self.t.on_batch(records["ts"])
        else:
            self.buf.consume()

    def result(self) -> tuple[int, np.ndarray]:
        return self.t.result()

    def close(self) -> None:
        self.buf.close()


# -- libbpf -----------------------------------------------------------------------------------


def _perf_attr(wakeup_events: int) -> sys_perf.PerfEventAttr:
    """The attr perf_buffer__new_raw opens each CPU's event with: PerfBuffer's, wakeup_events=N."""
    attr = sys_perf.PerfEventAttr(
        type=sys_perf.PERF_TYPE_SOFTWARE,
        config=sys_perf.PERF_COUNT_SW_BPF_OUTPUT,
        sample_period=1,
        sample_type=sys_perf.PERF_SAMPLE_RAW,
        wakeup_events=wakeup_events,
    )
    attr.size = ctypes.sizeof(attr)
    return attr


class _Libbpf(Session):
    """libbpf's ring_buffer or perf_buffer (perf_buffer__new_raw, to choose wakeup_events)."""

    def __init__(self, wl: Workload, ring_fn: Any, perf_fn: Any, ctx: Any, keep: list) -> None:
        self._keep = keep  # callbacks and buffers libbpf points to
        s = wl.scenario
        self.ring = s.channel == "ringbuf"
        if self.ring:
            self.ptr = libbpf.lib.ring_buffer__new(wl.map.fd, ring_fn, ctx, None)
            what = "ring_buffer__new"
        else:
            self._attr = _perf_attr(s.wakeup_events)
            self.ptr = libbpf.lib.perf_buffer__new_raw(
                wl.map.fd, s.perfbuf_pages, ctypes.byref(self._attr), perf_fn, ctx, None
            )
            what = "perf_buffer__new_raw"
        if not self.ptr:
            raise OSError(ctypes.get_errno(), f"{what} failed")
        self.poll = libbpf.lib.ring_buffer__poll if self.ring else libbpf.lib.perf_buffer__poll
        self.consume = libbpf.lib.ring_buffer__consume if self.ring else libbpf.lib.perf_buffer__consume

    def _check(self, ret: int, what: str) -> None:
        if ret < 0:
            raise OSError(-ret, f"{what} failed")

    def drain(self) -> None:
        self._check(self.consume(self.ptr), "consume")

    def close(self) -> None:
        if self.ptr:
            (libbpf.lib.ring_buffer__free if self.ring else libbpf.lib.perf_buffer__free)(self.ptr)
            self.ptr = None
        self._keep.clear()


class LibbpfC(_Libbpf):
    """The baseline: C callbacks, and the kernel bench's poll loop in C."""

    def __init__(self, wl: Workload, helper: ctypes.CDLL) -> None:
        self.tally, self.lat = new_tally()
        self.helper = helper
        ring_fn = ctypes.cast(helper.bpfring_bench_ring_sample, ctypes.c_void_p)
        perf_fn = ctypes.cast(helper.bpfring_bench_perf_event, ctypes.c_void_p)
        super().__init__(wl, ring_fn, perf_fn, ctypes.byref(self.tally), [self.tally, self.lat])

    def run(self, stopped: threading.Event) -> None:
        poll = ctypes.cast(self.poll, ctypes.c_void_p)
        # The loop returns -EINTR on Ctrl-C, and Python raises KeyboardInterrupt right after.
        self._check(self.helper.bpfring_bench_poll_until(poll, self.ptr, self.deadline_ns, 10), "poll")
        stopped.wait()
        self.drain()

    def result(self) -> tuple[int, np.ndarray]:
        return self.tally.count, self.lat[: self.tally.lat_n].astype(np.int64)


class LibbpfCtypes(_Libbpf):
    """What Python tools do today: a ctypes callback per record, copying the bytes out."""

    def __init__(self, wl: Workload) -> None:
        self.t = PyTally()
        on_record = self.t.on_record
        string_at = ctypes.string_at
        u32 = ctypes.c_uint32.from_address

        def sample(ctx: int, data: int, size: int) -> int:
            on_record(string_at(data, size))
            return 0

        def event(ctx: int, cpu: int, header: int) -> int:
            if u32(header).value == 9:  # PERF_RECORD_SAMPLE: {header; u32 raw_size; raw}
                on_record(string_at(header + 12, u32(header + 8).value))
            return libbpf.LIBBPF_PERF_EVENT_CONT

        ring_cb = libbpf.RING_BUFFER_SAMPLE_FN(sample)
        perf_cb = libbpf.PERF_BUFFER_EVENT_FN(event)
        super().__init__(
            wl, ctypes.cast(ring_cb, ctypes.c_void_p), ctypes.cast(perf_cb, ctypes.c_void_p), None, [ring_cb, perf_cb]
        )

    def run(self, stopped: threading.Event) -> None:
        _until(stopped, lambda ms: self._check(self.poll(self.ptr, ms), "poll"))
        self.drain()

    def result(self) -> tuple[int, np.ndarray]:
        return self.t.result()


@dataclass
class Consumer:
    """A consumer the benchmark can run: ``open(workload)`` sets up a Session.

    ``unsupported(scenario)`` is None where the consumer runs, else the reason it cannot
    (reported as "skipped: ..." or "n/a: ...").
    """

    name: str
    what: str
    open: Callable[[Workload], Session]
    unsupported: Callable[[Scenario], Optional[str]] = lambda scenario: None
    release: Callable[[], None] = lambda: None  # after the workload: what the consumer kept (bcc's processes)


def bpfring_consumers() -> list[Consumer]:
    perf_batch = None if hasattr(PerfBuffer, "consume_batch") else "n/a: this PerfBuffer has no consume_batch()"
    return [
        Consumer("bpfring-callback", "bpfring poll() with a per-record Python callback", BpfringCallback),
        Consumer(
            "bpfring-batch",
            "bpfring consume_batch(dtype) on an epoll of fileno()",
            BpfringBatch,
            lambda s: perf_batch if s.channel == "perfbuf" else None,
        ),
        Consumer("bpfring-async", "bpfring async for over records()", lambda wl: BpfringAsync(wl, batches=False)),
        Consumer(
            "bpfring-async-batch", "bpfring async for over batches(dtype)", lambda wl: BpfringAsync(wl, batches=True)
        ),
    ]


def libbpf_consumers(helper: ctypes.CDLL) -> list[Consumer]:
    return [
        Consumer("libbpf-c", "libbpf ring_buffer/perf_buffer, C callback, C poll loop", lambda wl: LibbpfC(wl, helper)),
        Consumer("libbpf-ctypes", "libbpf ring_buffer/perf_buffer, ctypes Python callback", LibbpfCtypes),
    ]

"""The perf buffer (BPF_MAP_TYPE_PERF_EVENT_ARRAY), consumed natively over mmap.

A :class:`PerfBuffer` opens one BPF output perf event per CPU, maps its ring, stores its fd in
the array at that CPU's index (where ``bpf_perf_event_output(ctx, &pb, BPF_F_CURRENT_CPU, ...)``
finds it) and polls them all on one epoll, like libbpf's ``struct perf_buffer``. Protocol
references are to include/uapi/linux/perf_event.h and kernel/events/ring_buffer.c.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import warnings
from typing import Any, AsyncIterator, Callable, Iterable, Optional

from ._claim import Claim
from ._poller import Poller
from ._protocol import Corrupt, _fastring
from ._sys import perf as sys_perf
from ._sys.bpf import MapType
from .errors import BPFError, RingCorruptError
from .maps import PAGE_SIZE, Map, MapLike, map_shared, open_map
from ._batch import (
    ANY,
    ASYNC_REFILL,
    NO_LIMIT,
    DTypeLike,
    Kept,
    batch_dtype,
    check_positive_int,
    handed,
    kept_first,
    new_records,
)

SampleCallback = Callable[[int, bytes], Optional[int]]
LostCallback = Callable[[int, int], Optional[int]]


def _ignore(cpu: int, value: object) -> None:
    return None


class PerfRing:
    """One CPU's BPF output event: its fd, its mapping, and the reader's state (in C).

    Obtain them from :attr:`PerfBuffer.rings`; the PerfBuffer consumes them
    (:meth:`PerfBuffer.consume_buffer` reads one).
    """

    def __init__(self, m: Map, cpu: int, page_cnt: int, wakeup_events: int, consuming: Callable[[], Any]) -> None:
        self.cpu = cpu
        self._consuming = consuming  # the owning PerfBuffer's consumer lock (see Poller.consuming)
        self.size = page_cnt * PAGE_SIZE
        self.fd = sys_perf.open_bpf_output(cpu, wakeup_events)
        try:
            # Read-write: a read-only mapping would put the kernel in overwrite mode, where it
            # ignores data_tail (kernel/events/core.c perf_mmap, ring_buffer.c rb_alloc).
            self._mm = map_shared(self.fd, PAGE_SIZE + self.size, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(self.fd)
            raise BPFError(exc.errno, f"can't mmap the perf buffer of cpu {cpu} ({page_cnt} pages)") from None
        except BaseException:
            os.close(self.fd)
            raise
        try:
            self._state = _fastring.PerfRingState(self._mm, self.size, cpu, Corrupt(m, cpu=cpu))
        except BaseException:
            self._mm.close()
            os.close(self.fd)
            raise

    @property
    def data_head(self) -> int:
        """Where the kernel will write next (as the shared page says now)."""
        return self._state.positions()[0]

    @property
    def data_tail(self) -> int:
        """Where the reader will read next (as the shared page says now)."""
        return self._state.positions()[1]

    # The names of libbpf's perf_buffer code, kept for callers of earlier releases.
    head = data_head
    tail = data_tail

    def resync(self) -> int:
        """Move data_tail to data_head, skipping whatever is there; returns the bytes skipped.

        The way out of a :class:`RingCorruptError` on this CPU's ring. Takes the PerfBuffer's
        consumer lock: a poll() in another thread finishes first; from a callback, refused.
        """
        with self._consuming():
            return self._state.resync()

    def consume(
        self,
        sample_cb: SampleCallback,
        lost_cb: LostCallback,
        expect: range | None = None,
        into: Any = None,
        limit: int = NO_LIMIT,
    ) -> int:
        """Deliver every record available now; samples delivered, or a negative callback return.
        It takes the PerfBuffer's consumer lock, but not the samples it keeps (see
        :class:`PerfBuffer`): :meth:`PerfBuffer.consume_buffer` delivers those first.

        ``expect``: the sample sizes a batch accepts; another size raises RecordSizeError and
        that sample stays in the ring. ``into``: a list (or deque) that takes ``(cpu, data)``
        instead of ``sample_cb``: its append is a built-in, so a Ctrl-C cannot land between
        taking a sample and keeping it, as it can at the entry of a Python callback. ``limit``:
        stop after that many samples.
        """
        with self._consuming():
            return self._walk(sample_cb, lost_cb, expect, into, limit)

    def _walk(
        self, sample_cb: SampleCallback, lost_cb: LostCallback, expect: range | None = None, into: Any = None,
        limit: int = NO_LIMIT,
    ) -> int:
        """consume() under the lock the caller holds."""
        lo, hi = (expect.start, expect.stop - 1) if expect is not None else (0, 0)
        return self._state.consume(sample_cb, lost_cb, into, lo, hi, limit)

    def close(self) -> None:
        """Unmap and close (its PerfBuffer's close() does); idempotent: closing the fd number
        again would close whichever file of the process has it by then."""
        if self.fd < 0:
            return
        self._state.release()
        self._mm.close()
        fd, self.fd = self.fd, -1
        os.close(fd)

    def __repr__(self) -> str:
        if self.fd < 0:
            return f"<PerfRing cpu={self.cpu} size={self.size} closed>"
        head, tail = self._state.positions()
        return f"<PerfRing cpu={self.cpu} size={self.size} data_head={head} data_tail={tail}>"


class PerfBuffer:
    """libbpf's ``perf_buffer`` in Python: one perf ring per CPU for a BPF_MAP_TYPE_PERF_EVENT_ARRAY.

    ``map`` is a :class:`~bpfring.Map`, an fd or a pinned path. Each CPU (every online CPU, or
    ``cpus``) gets a ring of ``page_cnt`` pages (a power of two) whose event fd is stored in the
    array at that CPU's index, so ``bpf_perf_event_output(ctx, &pb, BPF_F_CURRENT_CPU, e, size)``
    writes to the ring of the CPU it runs on. The array needs a slot for the highest CPU used.

    ``sample_cb(cpu, data)`` receives each sample's bytes: the kernel's ``raw_size`` of them,
    which is the size the program passed rounded up so that size + 4 is a multiple of 8 (the
    padding is not zeroed: carry your own length if it matters), as libbpf delivers them.
    ``lost_cb(cpu, lost)`` receives the count of samples the kernel dropped because that ring was
    full; the kernel reports them with the next sample that fits. A negative return value from
    either callback stops consumption and is returned by :meth:`poll`/:meth:`consume` (that record
    counts as consumed). An exception propagates; its record counts as consumed and the rest stay
    for the next call, so no sample is delivered twice. Without ``sample_cb`` the buffer serves
    :meth:`consume_batch` and ``async for``; :meth:`poll` and :meth:`consume` then raise TypeError
    (rather than drop the samples).

    Samples taken and not handed over yet (an ``async for`` left early or cancelled, a batch call
    interrupted by Ctrl-C or raising on a corrupt ring) are kept, and every consumer call hands
    them over before it reads newer ones of their CPU: batch calls and iterations return them
    first; :meth:`poll`, :meth:`consume` and :meth:`consume_buffer` (that CPU's) deliver them to
    ``sample_cb`` first, without waiting. Each CPU's samples arrive in order, once.

    One reader per array: an array another PerfBuffer (in this process or any other) reads is
    refused with an error naming that process. ``shared=True`` opts out: this buffer then takes
    over the slots of the CPUs it opens (the other gets nothing more from them), and its close()
    clears only the slots it still holds in this process (another process cannot be asked).

    Notification is sampled: the kernel wakes the reader every ``wakeup_events`` samples, so with
    ``wakeup_events=N`` the last N-1 samples of a burst wait for the N-th. :meth:`poll` only
    consumes rings that woke it (as ``perf_buffer__poll``), and a timeout consumes nothing: call
    :meth:`consume` to drain them (before exiting, or on a timeout when latency matters).

    Example, as the seed's ``perf_buffer__new`` / ``perf_buffer__poll`` loop::

        with bpfring.PerfBuffer(obj.map("pb"), 8, handle_event) as pb:
            while True:
                pb.poll(timeout_ms=100)
    """

    def __init__(
        self,
        map: MapLike,
        page_cnt: int = 8,
        sample_cb: SampleCallback | None = None,
        lost_cb: LostCallback | None = None,
        *,
        wakeup_events: int = 1,
        cpus: Iterable[int] | None = None,
        shared: bool = False,
    ) -> None:
        check_positive_int("page_cnt", page_cnt)
        if page_cnt & (page_cnt - 1):
            raise ValueError(f"page_cnt must be a power of two, got {page_cnt}")
        check_positive_int("wakeup_events", wakeup_events)
        sys_perf.check_buffer_args(page_cnt, wakeup_events)  # before any perf event is opened
        for name, cb in (("sample_cb", sample_cb), ("lost_cb", lost_cb)):
            if cb is not None and not callable(cb):
                raise TypeError(f"{name} must be callable, got {type(cb).__name__}")
        self.page_cnt = page_cnt
        self.wakeup_events = wakeup_events
        self._has_sample_cb = sample_cb is not None
        self._sample_cb: SampleCallback = sample_cb or _ignore
        self._lost_cb: LostCallback = lost_cb or _ignore
        self._buffers: list[PerfRing] = []
        self._by_fd: dict[int, PerfRing] = {}
        self._slots: list[int] = []  # array indexes this object has set, cleared on close
        self._unfinished: set[PerfRing] = set()  # woken, not yet read to the end
        self._misfit: PerfRing | None = None  # its sample that fits no dtype stopped the last batch
        # What batch calls and async iterations took from the rings and have not returned or
        # yielded yet (Ctrl-C, a corrupt ring among healthy ones, a cancelled task): the next
        # batch call or iteration returns it first. A sample may carry the kernel's padding to 8.
        self._kept = Kept(per_cpu=True, slack=7)
        self._claim: Claim | None = None
        self._map: Map = open_map(map, MapType.PERF_EVENT_ARRAY)
        try:
            chosen = self._choose_cpus(cpus)
            if not shared:
                self._claim = Claim(self._map, "PerfBuffer")
            self._poller = Poller("PerfBuffer")
        except BaseException:
            if self._claim is not None:
                self._claim.release()
            self._map.close()
            raise
        try:
            for cpu in chosen:
                self._open_cpu(cpu)
        except BaseException:
            self._poller.close(self._release)
            raise

    def _choose_cpus(self, cpus: Iterable[int] | None) -> list[int]:
        online = sys_perf.online_cpus()
        if cpus is None:
            chosen = online
        else:
            chosen = list(cpus)
            if not chosen:
                raise ValueError("cpus is empty: give at least one CPU, or None for every online CPU")
            for cpu in chosen:
                if not isinstance(cpu, int) or isinstance(cpu, bool):
                    raise TypeError(f"a cpu must be an int, got {type(cpu).__name__}")
                if cpu not in online:
                    raise ValueError(f"cpu {cpu} is not online (online CPUs: {_cpu_list(online)})")
            if len(set(chosen)) != len(chosen):
                raise ValueError(f"cpus {chosen} names a CPU more than once")
        need = max(chosen) + 1
        if self._map.max_entries < need:
            raise ValueError(
                f"perf event array {self._map.name!r} has max_entries={self._map.max_entries}, "
                f"too small for cpu {need - 1}: it needs at least {need} (one slot per CPU index)"
            )
        return chosen

    def _open_cpu(self, cpu: int) -> None:
        buf = PerfRing(self._map, cpu, self.page_cnt, self.wakeup_events, self._poller.consuming)
        self._buffers.append(buf)
        self._by_fd[buf.fd] = buf
        # perf_poll reports a wakeup once (it clears rb->poll), so a ring is read to its end
        # whenever it is reported; see _unfinished for a read cut short.
        self._poller.register(buf.fd)
        # The array holds u32 keys and values in host byte order.
        self._map.update(cpu.to_bytes(4, sys.byteorder), buf.fd.to_bytes(4, sys.byteorder))
        self._slots.append(cpu)
        _slot_owner[(self._map.id, cpu)] = id(self)
        sys_perf.enable(buf.fd)

    # -- accessors ------------------------------------------------------------------------------

    @property
    def buffer_cnt(self) -> int:
        """Number of per-CPU rings (libbpf's ``perf_buffer__buffer_cnt``)."""
        return len(self._buffers)

    def buffer_fd(self, i: int) -> int:
        """The perf event fd of ring ``i`` (libbpf's ``perf_buffer__buffer_fd``), e.g. to poll it alone."""
        return self._buffer(i).fd

    @property
    def rings(self) -> tuple[PerfRing, ...]:
        """The per-CPU rings, in ring order (as :attr:`cpus`): positions and :meth:`PerfRing.resync`."""
        self._poller.check_open()
        return tuple(self._buffers)

    @property
    def cpus(self) -> tuple[int, ...]:
        """The CPU of each ring, in ring order."""
        return tuple(buf.cpu for buf in self._buffers)

    @property
    def buffer_size(self) -> int:
        """Bytes of data area per CPU: ``page_cnt`` pages."""
        return self.page_cnt * PAGE_SIZE

    @property
    def map(self) -> Map:
        return self._map

    def fileno(self) -> int:
        """The epoll fd: readable when a ring has woken the reader (for selectors and event loops).

        When it polls readable, call :meth:`consume`, not :meth:`poll`: the outer poll has taken
        the perf wakeup (perf_poll reports it once), so an inner epoll would find nothing.
        """
        return self._poller.fileno()

    def _buffer(self, i: int) -> PerfRing:
        self._poller.check_open()
        if not 0 <= i < len(self._buffers):
            raise IndexError(f"buffer index {i} out of range: this PerfBuffer has {len(self._buffers)} buffers")
        return self._buffers[i]

    # -- consuming ------------------------------------------------------------------------------

    def poll(self, timeout_ms: int = -1) -> int:
        """Wait up to ``timeout_ms`` (-1: forever) for a wakeup, then read the rings that woke.

        Returns samples delivered (0 on timeout) or a callback's negative return value. Samples
        kept from an earlier call (see the class), and rings whose reading a callback cut short,
        come first, without waiting.
        """
        self._poller.consuming()  # refused at once from a callback, rather than after the wait
        unfinished = self._unfinished
        try:
            # Holding no lock: consume() and batches in other threads go on meanwhile.
            ready = self._poller.wait(0 if unfinished or self._kept.waiting() else timeout_ms)
            # Reported once, so remembered until read to the end (see _consume).
            unfinished.update(self._by_fd.get(fd) for fd in ready)
            unfinished.discard(None)
        except BaseException:
            # Interrupted (Ctrl-C) after epoll may have taken wakeups it will not report again:
            # a full ring would never wake us. Read every ring next time instead.
            unfinished.update(self._buffers)
            raise
        with self._poller.consuming():
            if self._poller.closing or self._poller.closed:
                return 0  # closed from another thread while this one waited

            def walk(left: int) -> int:
                # At most a ring's worth of samples (16 bytes at least each) per poll: a producer
                # as fast as the callback cannot keep poll(), and a close() waiting for it, going.
                return self._each_ring(list(unfinished), lambda buf: buf.size // 16)

            return kept_first(self._deliver_kept(), NO_LIMIT, walk)

    def _deliver_kept(self, only: Any = ANY) -> int:
        """The kept samples (of CPU ``only``, unless ANY) to sample_cb (see Kept.deliver)."""
        self._settle()
        return self._kept.deliver(self._sample_callback, NO_LIMIT, only)

    def _sample_callback(self, cpu: int) -> SampleCallback:
        if not self._has_sample_cb:
            raise TypeError(
                f"PerfBuffer of map {self._map.name!r} has no sample_cb: pass one to PerfBuffer(), "
                "or use consume_batch() or async for"
            )
        return self._sample_cb

    def _each_ring(self, bufs: list[PerfRing], limit: Callable[[PerfRing], int], keep: Kept | None = None) -> int:
        """Read ``bufs`` in turn, to sample_cb or into ``keep`` (tagged with their CPU); a corrupt
        one does not stop the others: its RingCorruptError is raised once every healthy ring has
        delivered. A negative callback return stops at once."""
        total = 0
        error: RingCorruptError | None = None
        for buf in bufs:
            try:
                n = self._consume(buf, into=None if keep is None else keep.rows(buf.cpu), limit=limit(buf))
            except RingCorruptError as exc:
                self._unfinished.discard(buf)  # wait for its next wakeup: no poll() spins on it
                error = error or exc
                continue
            if n < 0:
                return n
            total += n
        if error is not None:
            raise error
        return total

    def consume(self) -> int:
        """Read every ring without waiting (libbpf's ``perf_buffer__consume``).

        Returns samples delivered or a callback's negative return value. This is how to drain
        samples that have not reached ``wakeup_events`` yet. Samples kept from an earlier call
        (see the class) come first.
        """
        self._poller.check_open()
        with self._poller.consuming():
            return kept_first(
                self._deliver_kept(), NO_LIMIT, lambda left: self._each_ring(self._buffers, lambda buf: NO_LIMIT)
            )

    def consume_buffer(self, i: int) -> int:
        """Read ring ``i`` only, without waiting (libbpf's ``perf_buffer__consume_buffer``); the
        samples of its CPU kept from an earlier call (see the class) first."""
        with self._poller.consuming():
            buf = self._buffer(i)  # checked under the lock: close() may race it
            return kept_first(self._deliver_kept(buf.cpu), NO_LIMIT, lambda left: self._consume(buf))

    def consume_batch(
        self, dtype: DTypeLike | None = None, max_records: int | None = None, *, out: Any = None, with_cpus: bool = False
    ) -> Any:
        """Every sample available now (up to ``max_records``, CPU by CPU), in one call, bypassing
        ``sample_cb``.

        Without ``dtype``: a list of ``bytes``. With ``dtype``: a numpy array, one element per
        sample, copied in one pass over each ring (in C); each sample must be ``dtype.itemsize``
        bytes (plus the kernel's padding, under 8 bytes, which is dropped), else
        :class:`RecordSizeError` is raised when it is reached and it stays in the ring.

        ``out``: a contiguous array of ``dtype`` to copy into, as for
        :meth:`RingBuffer.consume_batch`; if a Ctrl-C interrupts the call, the samples it took
        wait in ``out`` for the next call, so leave ``out`` alone until then. ``with_cpus=True``
        returns ``(cpus, records)``, the CPU of each sample in a parallel list (numpy array with a
        dtype). Lost counts still go to ``lost_cb``: with a dtype once per CPU and batch, added
        up, after the samples are copied (its return value is not a stop); without, as each is
        read.

        Samples an earlier call or an async iteration took but did not return (a Ctrl-C, a
        corrupt ring among healthy ones, a cancelled task) come first, and alone.
        """
        result = self._handed_batch(dtype, max_records, out)[0]
        return result if with_cpus else result[1]  # (no call: no signal check)

    def _handed_batch(
        self, dtype: DTypeLike | None, max_records: int | None, out: Any, hold: bool = False
    ) -> tuple[Any, Any]:
        """consume_batch as ``(cpus, records)``, with its runs (for a put_back); ``hold``: see handed()."""
        limit = NO_LIMIT if max_records is None else check_positive_int("max_records", max_records)
        if dtype is None:
            if out is not None:
                raise TypeError("out= needs a dtype")
            np = dt = None
        else:
            np, dt, limit = batch_dtype(dtype, limit, out)  # refused before anything is taken
        self._poller.check_open()
        return handed(self._poller.consuming(), self._kept, lambda: self._consume_batch(np, dt, limit, out), hold)

    def _consume_batch(self, np: Any, dt: Any, limit: int, out: Any) -> tuple[Any, Any]:
        """consume_batch as ``(cpus, records)``, with its runs (unused: a perf row names its CPU)."""
        self._settle()
        if self._kept:  # what an earlier call took (interrupted, or raising), alone
            return self._kept.hand_over(dt, limit, out, with_cpus=True)
        if dt is not None:
            return self._take_native(np, dt, limit, out), None
        return self._take_samples(limit)

    def _take_samples(self, limit: int) -> tuple[Any, Any]:
        """consume_batch without a dtype: each sample taken as ``bytes``, kept as it is taken."""
        have = 0
        error: RingCorruptError | None = None
        for buf in self._buffers:
            want = limit - have
            if want <= 0:
                break
            taken = self._kept.rows(buf.cpu)
            before = len(taken)
            self._unfinished.add(buf)
            try:
                n = buf._walk(_ignore, self._lost_cb, into=taken, limit=want)
            except RingCorruptError as exc:
                self._unfinished.discard(buf)
                error = error or exc
                continue
            finally:
                have += len(taken) - before
            if 0 <= n < want:
                self._unfinished.discard(buf)  # read to its head
        if error is not None:
            raise error  # what the healthy rings gave stays kept for the next call
        return self._kept.hand_over(None, limit, None, with_cpus=True)

    def _take_native(self, np: Any, dt: Any, limit: int, out: Any) -> tuple[Any, Any]:
        """consume_batch with a dtype in C: each ring's samples copied straight into one array."""
        slot = (12 + dt.itemsize + 7) & ~7  # the smallest record a fitting sample makes
        # At least one slot, so a ring holding only lost records is still read (and reported).
        room = min(limit, max(1, sum(_avail(buf) // slot for buf in self._buffers)))
        records = out[:room] if out is not None else new_records(np, dt, room)
        taken: list[tuple[int, int, int]] = []  # (cpu, samples, lost) per ring, as each is read
        # If Ctrl-C interrupts the call, what it took stays kept for the next call (perf_take
        # appends to taken and moves data_tail with no signal check in between). With out=,
        # those samples are in out until then.
        self._kept.filling(records, taken)
        at = 0
        error: RingCorruptError | None = None
        # A ring whose misfit stopped the last call is read first, so its RecordSizeError is
        # raised now; after an earlier ring's samples it would stop every call again, unraised,
        # and the rings after it would never be read.
        bufs, misfit, self._misfit = self._buffers, self._misfit, None
        if misfit in bufs:
            bufs = bufs[bufs.index(misfit) :] + bufs[: bufs.index(misfit)]
        for buf in bufs:
            self._unfinished.add(buf)
            try:
                n, stop = buf._state.take(dt.itemsize, records[at:], taken, at == 0)
            except RingCorruptError as exc:
                self._unfinished.discard(buf)
                error = error or exc
                continue
            at += n
            if stop == _fastring.PERF_TAKE_HEAD:
                self._unfinished.discard(buf)
            else:
                if at < len(records):  # not full: a misfit (or corruption after its samples)
                    self._misfit = buf
                break  # full (the rest waits), or a misfit: what came before it now, the next call raises
        self._report_lost(taken)
        if error is not None:
            raise error  # what the healthy rings gave stays kept for the next call
        cpus = np.repeat(np.array([cpu for cpu, _, _ in taken], dtype=np.int32), [n for _, n, _ in taken])
        self._kept.filled()  # no signal check from here to the return
        return cpus, records[:at]

    def _report_lost(self, taken: list[tuple[int, int, int]]) -> None:
        """lost_cb for each (cpu, samples, lost) with a count, marked reported as it is called
        (a Ctrl-C in lost_cb counts it as delivered, as for sample_cb)."""
        for i, (cpu, n, lost) in enumerate(taken):
            if lost:
                taken[i] = (cpu, n, 0)
                self._lost_cb(cpu, lost)

    def _settle(self) -> None:
        """What an interrupted _take_native took: its samples kept for the next call, its lost
        counts (those not reported yet) to lost_cb."""
        self._report_lost(self._kept.settle())
        self._kept.filled()

    def _consume(self, buf: PerfRing, into: Any = None, limit: int = NO_LIMIT) -> int:
        # Marked unfinished until it is read to the end: after an exception, a negative return or
        # a read stopped at ``limit``, the rest of the ring will not be reported by epoll again
        # (perf reports a wakeup once), so the next poll() reads it without waiting.
        if into is None:
            self._sample_callback(buf.cpu)  # TypeError without one
        self._unfinished.add(buf)
        n = buf._walk(self._sample_cb, self._lost_cb, into=into, limit=limit)
        if 0 <= n < limit:
            self._unfinished.discard(buf)
        return n

    # -- asyncio --------------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[tuple[int, bytes]]:
        return self.records()

    def records(self, interval: float | None = None) -> AsyncIterator[tuple[int, bytes]]:
        """Every sample as ``(cpu, data)``, waiting on the event loop (not ``sample_cb``).

        Cancelling the task that iterates (or leaving the loop) loses nothing: samples taken but
        not yet yielded come first from the next iteration or :meth:`consume_batch`. Lost counts still go to ``lost_cb``. ``interval``
        (seconds) also drains the rings that often, for samples short of ``wakeup_events``.
        The iteration ends when the PerfBuffer is closed.
        """
        def refill() -> None:
            self._settle()
            if not self._kept:
                self._each_ring(self._buffers, lambda buf: ASYNC_REFILL, self._kept)

        # The iteration is drain() itself: a generator around it would cost a fifth of each step.
        return self._poller.drain(self._kept, refill, interval)

    async def batches(
        self,
        dtype: DTypeLike | None = None,
        max_records: int | None = None,
        *,
        with_cpus: bool = False,
        interval: float | None = None,
    ) -> AsyncIterator[Any]:
        """:meth:`consume_batch` on the event loop: yields each non-empty batch as it arrives.

        Nothing is taken from the rings while the iteration waits, so cancelling it loses nothing.
        """
        async for batch in self._poller.batches(
            lambda: self._handed_batch(dtype, max_records, None, True),  # (with the CPUs, to put back)
            lambda batch: not len(batch[1]),
            interval,
            self._kept,
        ):
            yield batch if with_cpus else batch[1]  # (no call: no signal check)

    # -- lifetime -------------------------------------------------------------------------------

    def _release(self) -> None:
        try:
            for buf in self._buffers:
                if buf.fd >= 0:  # (a ring its user closed already)
                    sys_perf.disable(buf.fd)
            for cpu in self._slots:
                # Only slots this buffer still holds: a PerfBuffer opened later on the same array
                # (shared=True) took over the others.
                if _slot_owner.get((self._map.id, cpu)) != id(self):
                    continue
                del _slot_owner[(self._map.id, cpu)]
                try:
                    self._map.delete(cpu.to_bytes(4, sys.byteorder))
                except BPFError as exc:
                    if exc.errno != errno.ENOENT:  # already cleared (the map file was released)
                        raise
        finally:
            self._release_own()

    def _release_own(self) -> None:
        """Close this process's descriptors and mappings; what the kernel shares (the events'
        state, the array's slots) is left alone. All a fork() child may do."""
        self._kept.drop()  # (close() said how many)
        self._slots.clear()
        error: BaseException | None = None
        try:
            for buf in self._buffers:
                try:
                    buf.close()
                except BaseException as exc:  # the others are closed all the same
                    error = error or exc
            if error is not None:
                raise error
        finally:
            self._buffers.clear()
            self._by_fd.clear()
            self._unfinished.clear()
            if self._claim is not None:
                self._claim.release()
            self._map.close()

    def close(self) -> None:
        """Disable the events, clear the array slots this buffer still holds, unmap and close;
        idempotent. A poll() blocked in another thread returns first.

        In a fork() child it releases only the child's copies of the descriptors and mappings:
        the events stay enabled and the slots set, for the parent.

        Samples an async iteration or a batch call took and did not hand over go with it: a
        RuntimeWarning says how many."""
        if not (self._poller.closed or self._poller.forked):
            self._kept.warn_dropped("PerfBuffer")
        self._poller.close(self._release, self._release_own)

    def __del__(self) -> None:
        poller = self.__dict__.get("_poller")
        if poller is not None and not poller.closed:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)
            self.close()

    @property
    def closed(self) -> bool:
        return self._poller.closed

    def __enter__(self) -> PerfBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<PerfBuffer closed>"
        return f"<PerfBuffer map={self._map.name!r} cpus={list(self.cpus)} page_cnt={self.page_cnt}>"


# (array map id, cpu) -> id() of the PerfBuffer whose event fd that slot holds, in this process.
_slot_owner: dict[tuple[int, int], int] = {}


def _avail(buf: PerfRing) -> int:
    """Bytes waiting in ``buf``; 0 for a corrupt ring (its read raises)."""
    try:
        return buf._state.avail()
    except RingCorruptError:
        return 0


def _cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5', the kernel's cpulist format."""
    ranges: list[list[int]] = []
    for cpu in cpus:
        if ranges and ranges[-1][1] == cpu - 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)

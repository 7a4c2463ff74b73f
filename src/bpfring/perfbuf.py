"""The perf buffer (BPF_MAP_TYPE_PERF_EVENT_ARRAY), consumed natively over mmap.

A :class:`PerfBuffer` opens one BPF output perf event per CPU, maps its ring, stores its fd in
the array at that CPU's index (where ``bpf_perf_event_output(ctx, &pb, BPF_F_CURRENT_CPU, ...)``
finds it) and polls them all on one epoll, like libbpf's ``struct perf_buffer``. Protocol
references are to include/uapi/linux/perf_event.h and kernel/events/ring_buffer.c.
"""

from __future__ import annotations

import collections
import errno
import mmap
import os
import sys
from typing import Any, AsyncIterator, Callable, Iterable, Optional

from ._poller import Poller
from ._sys import perf as sys_perf
from ._sys.bpf import MapType
from .errors import BPFError, RecordSizeError
from .maps import PAGE_SIZE, Map, MapLike, map_shared, open_map
from .ringbuf import (
    _NO_LIMIT,
    ASYNC_REFILL,
    DTypeLike,
    _batch_dtype,
    _native,
    _new_records,
    _numpy,
    check_positive_int,
    require_tso,
)

# include/uapi/linux/perf_event.h, struct perf_event_mmap_page: the kernel advances data_head
# as it writes, the reader advances data_tail as it reads; both are free-running byte counters.
# The data area starts one page into the mapping (data_offset) and is page_cnt pages long.
PERF_DATA_HEAD_OFFSET = 1024
PERF_DATA_TAIL_OFFSET = 1032

# include/uapi/linux/perf_event.h, enum perf_event_type. Records start with
# struct perf_event_header {u32 type; u16 misc; u16 size}, size counting the header itself.
# A sample with sample_type = PERF_SAMPLE_RAW is {header; u32 raw_size; u8 raw[raw_size]};
# a lost record is {header; u64 id; u64 lost}.
PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9
PERF_HEADER_SIZE = 8

SampleCallback = Callable[[int, bytes], Optional[int]]
LostCallback = Callable[[int, int], Optional[int]]

# Word indexes into the mapping seen as u64s (and u32s for raw_size).
_HEAD = PERF_DATA_HEAD_OFFSET // 8
_TAIL = PERF_DATA_TAIL_OFFSET // 8
_DATA_W = PAGE_SIZE // 8
_DATA_I = PAGE_SIZE // 4


def _ignore(cpu: int, value: object) -> None:
    return None


class _CpuBuffer:
    """One CPU's BPF output event: its fd, its mapping, and the reader's walk over its records."""

    def __init__(self, cpu: int, page_cnt: int, wakeup_events: int) -> None:
        require_tso()
        self.cpu = cpu
        self.size = page_cnt * PAGE_SIZE
        self.fd = sys_perf.open_bpf_output(cpu, wakeup_events)
        try:
            # Read-write: a read-only mapping would put the kernel in overwrite mode, where it
            # ignores data_tail (kernel/events/core.c perf_mmap, ring_buffer.c rb_alloc).
            self._mm = map_shared(self.fd, PAGE_SIZE + self.size, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(self.fd)
            raise BPFError(exc.errno, f"can't mmap the perf buffer of cpu {cpu} ({page_cnt} pages)") from None
        # Aligned 8- and 4-byte loads and stores through native-format memoryviews are single
        # instructions; on x86-64 (TSO) they carry the ordering the kernel asks of the reader:
        # read data_head, then the records (smp_rmb), then store data_tail (smp_mb before it).
        self._words = memoryview(self._mm).cast("Q")
        self._u32 = memoryview(self._mm).cast("I")

    @property
    def head(self) -> int:
        """data_head: where the kernel will write next."""
        return self._words[_HEAD]

    @property
    def tail(self) -> int:
        """data_tail: where the reader will read next."""
        return self._words[_TAIL]

    def consume(
        self,
        sample_cb: SampleCallback,
        lost_cb: LostCallback,
        expect: range | None = None,
        into: Any = None,
        limit: int = _NO_LIMIT,
    ) -> int:
        """Deliver every record available now; samples delivered, or a negative callback return.

        ``expect``: the sample sizes a batch accepts; another size raises RecordSizeError and
        that sample stays in the ring. ``into``: a list (or deque) that takes ``(cpu, data)``
        instead of ``sample_cb``: its append is a built-in, so a Ctrl-C cannot land between
        taking a sample and keeping it, as it can at the entry of a Python callback. ``limit``:
        stop after that many samples.
        """
        if _native is not None:
            lo, hi = (expect.start, expect.stop - 1) if expect is not None else (0, 0)
            return _native.perf_consume(
                self._mm, PAGE_SIZE, self.size, self.cpu, sample_cb, lost_cb, into, lo, hi, limit
            )
        return self._consume_python(sample_cb, lost_cb, expect, into, limit)

    def _consume_python(
        self, sample_cb: SampleCallback, lost_cb: LostCallback, expect: range | None, into: Any, limit: int
    ) -> int:
        """The walk record by record (the fallback for _fastring.c's perf_consume)."""
        words = self._words
        u32 = self._u32
        mm = self._mm
        size = self.size
        mask = size - 1
        cpu = self.cpu
        base, base_w, base_i = PAGE_SIZE, _DATA_W, _DATA_I
        sample_type = PERF_RECORD_SAMPLE
        tail = words[_TAIL]
        count = 0
        while True:
            head = words[_HEAD]
            if tail >= head:  # a tail past the head (written by someone else) reads as caught up
                return count
            while tail < head:
                off = tail & mask
                # Record sizes are multiples of 8 (perf_prepare_header), so a header never
                # straddles the end of the data area, and neither does an aligned field.
                header = words[base_w + (off >> 3)]
                rec_size = header >> 48
                if rec_size < PERF_HEADER_SIZE or rec_size & 7 or rec_size > size or tail + rec_size > head:
                    raise BPFError(
                        errno.EBADMSG, f"perf buffer of cpu {cpu}: record at {tail} of {rec_size} bytes, head {head}"
                    )
                tail += rec_size
                if header & 0xFFFFFFFF == sample_type:
                    if off + rec_size <= size:  # the common case: the record is contiguous
                        raw_size = u32[base_i + ((off + 8) >> 2)]
                        start = base + off + 12
                        data = mm[start : start + raw_size]
                    else:  # wraps the end: the data area is mapped once, copy both pieces
                        raw_size = u32[base_i + (((off + 8) & mask) >> 2)]
                        start = (off + 12) & mask
                        if start + raw_size <= size:
                            data = mm[base + start : base + start + raw_size]
                        else:
                            data = mm[base + start : base + size] + mm[base : base + start + raw_size - size]
                    if raw_size + 12 > rec_size:
                        raise BPFError(
                            errno.EBADMSG, f"perf buffer of cpu {cpu}: sample of {rec_size} bytes claims {raw_size}"
                        )
                    if expect is not None and raw_size not in expect:
                        raise RecordSizeError(
                            f"sample at {tail - rec_size} of the perf buffer of cpu {cpu} is {raw_size} bytes, "
                            f"the dtype expects {expect.start} (up to {expect.stop - 1} with the kernel's padding); "
                            "it stays in the ring (read it with consume())"
                        )
                    # Give the space back before the callback runs: the sample counts as consumed
                    # once the callback is entered, so an exception or Ctrl-C never redelivers it.
                    words[_TAIL] = tail
                    count += 1
                    if into is not None:
                        into.append((cpu, data))
                        if count >= limit:
                            return count
                        continue
                    ret = sample_cb(cpu, data)
                elif header & 0xFFFFFFFF == PERF_RECORD_LOST:
                    lost = words[base_w + (((off + 16) & mask) >> 3)]
                    words[_TAIL] = tail
                    ret = lost_cb(cpu, lost)
                else:  # no other type is written for a BPF output event; skip what we don't know
                    words[_TAIL] = tail
                    continue
                if ret and ret < 0:
                    return ret
                if count >= limit:
                    return count
            # Caught up with the head read above: read it again, so records written meanwhile
            # are delivered by this call rather than waiting for a wakeup.

    def close(self) -> None:
        self._words.release()
        self._u32.release()
        self._mm.close()
        os.close(self.fd)


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
    for the next call, so no sample is delivered twice. Without ``sample_cb`` samples are dropped.

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
    ) -> None:
        check_positive_int("page_cnt", page_cnt)
        if page_cnt & (page_cnt - 1):
            raise ValueError(f"page_cnt must be a power of two, got {page_cnt}")
        check_positive_int("wakeup_events", wakeup_events)
        for name, cb in (("sample_cb", sample_cb), ("lost_cb", lost_cb)):
            if cb is not None and not callable(cb):
                raise TypeError(f"{name} must be callable, got {type(cb).__name__}")
        self.page_cnt = page_cnt
        self.wakeup_events = wakeup_events
        self._sample_cb: SampleCallback = sample_cb or _ignore
        self._lost_cb: LostCallback = lost_cb or _ignore
        self._buffers: list[_CpuBuffer] = []
        self._by_fd: dict[int, _CpuBuffer] = {}
        self._slots: list[int] = []  # array indexes this object has set, cleared on close
        self._unfinished: set[_CpuBuffer] = set()  # woken, not yet read to the end
        # What a consume_batch() interrupted by Ctrl-C had taken, for the next call: (cpu, data).
        self._taken: list[tuple[int, bytes]] = []
        # The same for one with a dtype in C: its array and (cpu, samples, lost) per ring read.
        self._partial: tuple[Any, list[tuple[int, int, int]]] | None = None
        # Samples an async iteration took but has not yielded yet (see records()).
        self._pending: collections.deque[tuple[int, bytes]] = collections.deque()
        self._map: Map = open_map(map, MapType.PERF_EVENT_ARRAY)
        try:
            chosen = self._choose_cpus(cpus)
            self._poller = Poller("PerfBuffer")
        except BaseException:
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
        buf = _CpuBuffer(cpu, self.page_cnt, self.wakeup_events)
        self._buffers.append(buf)
        self._by_fd[buf.fd] = buf
        # perf_poll reports a wakeup once (it clears rb->poll), so a ring is read to its end
        # whenever it is reported; see _unfinished for a read cut short.
        self._poller.register(buf.fd)
        # The array holds u32 keys and values in host byte order.
        self._map.update(cpu.to_bytes(4, sys.byteorder), buf.fd.to_bytes(4, sys.byteorder))
        self._slots.append(cpu)
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

    def _buffer(self, i: int) -> _CpuBuffer:
        self._poller.check_open()
        if not 0 <= i < len(self._buffers):
            raise IndexError(f"buffer index {i} out of range: this PerfBuffer has {len(self._buffers)} buffers")
        return self._buffers[i]

    # -- consuming ------------------------------------------------------------------------------

    def poll(self, timeout_ms: int = -1) -> int:
        """Wait up to ``timeout_ms`` (-1: forever) for a wakeup, then read the rings that woke.

        Returns samples delivered (0 on timeout) or a callback's negative return value. Rings
        whose reading a callback cut short are read first, without waiting.
        """
        with self._poller.consuming():
            unfinished = self._unfinished
            try:
                ready = self._poller.wait(0 if unfinished else timeout_ms)
                if self._poller.closing:
                    return 0
                # Reported once, so remembered until read to the end (see _consume).
                unfinished.update(self._by_fd[fd] for fd in ready)
            except BaseException:
                # Interrupted (Ctrl-C) after epoll may have taken wakeups it will not report again:
                # a full ring would never wake us. Read every ring next time instead.
                unfinished.update(self._buffers)
                raise
            total = 0
            for buf in list(unfinished):
                # At most a ring's worth of samples (16 bytes at least each) per poll: a producer
                # as fast as the callback cannot keep poll(), and a close() waiting for it, going.
                n = self._consume(buf, limit=buf.size // 16)
                if n < 0:
                    return n
                total += n
            return total

    def consume(self) -> int:
        """Read every ring without waiting (libbpf's ``perf_buffer__consume``).

        Returns samples delivered or a callback's negative return value. This is how to drain
        samples that have not reached ``wakeup_events`` yet.
        """
        self._poller.check_open()
        with self._poller.consuming():
            total = 0
            for buf in self._buffers:
                n = self._consume(buf)
                if n < 0:
                    return n
                total += n
            return total

    def consume_buffer(self, i: int) -> int:
        """Read ring ``i`` only, without waiting (libbpf's ``perf_buffer__consume_buffer``)."""
        buf = self._buffer(i)
        with self._poller.consuming():
            return self._consume(buf)

    def consume_batch(
        self, dtype: DTypeLike | None = None, max_records: int | None = None, *, out: Any = None, with_cpus: bool = False
    ) -> Any:
        """Every sample available now (up to ``max_records``, CPU by CPU), in one call, bypassing
        ``sample_cb``.

        Without ``dtype``: a list of ``bytes``. With ``dtype``: a numpy array, one element per
        sample, copied in one pass over each ring (in C; numpy decodes the samples in one step
        where the C helper is missing); each sample must be ``dtype.itemsize`` bytes (plus the
        kernel's padding, under 8 bytes, which is dropped), else :class:`RecordSizeError` is raised
        when it is reached and it stays in the ring.

        ``out``: a contiguous array of ``dtype`` to copy into, as for
        :meth:`RingBuffer.consume_batch`; if a Ctrl-C interrupts the call, the samples it took
        wait in ``out`` for the next call, so leave ``out`` alone until then. ``with_cpus=True``
        returns ``(cpus, records)``, the CPU of each sample in a parallel list (numpy array with a
        dtype). Lost counts still go to ``lost_cb``: with a dtype and the C helper, once per CPU
        and batch, added up, after the samples are copied (its return value is not a stop);
        otherwise as each is read.
        """
        limit = _NO_LIMIT if max_records is None else check_positive_int("max_records", max_records)
        if dtype is None:
            if out is not None:
                raise TypeError("out= needs a dtype")
            np = dt = None
        else:
            np, dt, limit = _batch_dtype(dtype, limit, out)  # refused before anything is taken
        self._poller.check_open()
        with self._poller.consuming():
            if self._partial is not None:
                self._settle_partial()
            if dt is not None and _native is not None and not self._taken:
                return self._take_native(np, dt, limit, out, with_cpus)
            return self._take_samples(np, dt, limit, out, with_cpus)

    def _take_samples(self, np: Any, dt: Any, limit: int, out: Any, with_cpus: bool) -> Any:
        """consume_batch sample by sample, each taken as ``bytes`` (without a dtype, without the C
        helper, or after an interrupted call)."""
        expect = None if dt is None else range(dt.itemsize, dt.itemsize + 8)
        # Samples land in a list kept on self as they are taken: if Ctrl-C interrupts the call,
        # they wait there and the next call returns them first.
        taken = self._taken
        for buf in self._buffers:
            want = limit - len(taken)
            if want <= 0:
                break
            self._unfinished.add(buf)
            try:
                n = buf.consume(_ignore, self._lost_cb, expect, into=taken, limit=want)
            except RecordSizeError:
                if not taken:
                    raise
                break  # deliver what came before it; the next call raises
            if 0 <= n < want:
                self._unfinished.discard(buf)  # read to its head
        handed = taken[:limit]
        cpus = [cpu for cpu, _ in handed]
        samples = [data for _, data in handed]
        if dt is None:
            result: Any = (cpus, samples) if with_cpus else samples
        else:
            fits = range(dt.itemsize, dt.itemsize + 8)
            misfit = next((len(sample) for sample in samples if len(sample) not in fits), None)
            if misfit is not None:  # kept from an interrupted call with another dtype
                raise RecordSizeError(
                    f"a sample an interrupted batch took is {misfit} bytes, dtype {dt} expects {dt.itemsize}: "
                    "read it with consume_batch() without a dtype"
                )
            if any(len(sample) != dt.itemsize for sample in samples):
                samples = [sample[: dt.itemsize] for sample in samples]  # drop the kernel's padding
            records = np.frombuffer(b"".join(samples), dtype=dt).copy() if samples else np.empty(0, dtype=dt)
            if out is not None:
                out[: len(records)] = records
                records = out[: len(records)]
            result = (np.array(cpus, dtype=np.int32), records) if with_cpus else records
        rest = taken[limit:]
        # No call between handing the samples over and the return: nothing can raise in between.
        self._taken = rest
        return result

    def _take_native(self, np: Any, dt: Any, limit: int, out: Any, with_cpus: bool) -> Any:
        """consume_batch with a dtype in C: each ring's samples copied straight into one array."""
        slot = (12 + dt.itemsize + 7) & ~7  # the smallest record a fitting sample makes
        # At least one slot, so a ring holding only lost records is still read (and reported).
        room = min(limit, max(1, sum(max(0, buf.head - buf.tail) // slot for buf in self._buffers)))
        records = out[:room] if out is not None else _new_records(np, dt, room)
        taken: list[tuple[int, int, int]] = []  # (cpu, samples, lost) per ring, as each is read
        # If Ctrl-C interrupts the call, what it took waits here for the next call (perf_take
        # appends to taken and moves data_tail with no signal check in between). With out=,
        # those samples are in out until then.
        self._partial = (records, taken)
        at = 0
        for buf in self._buffers:
            self._unfinished.add(buf)
            n, stop = _native.perf_take(buf._mm, PAGE_SIZE, buf.size, buf.cpu, dt.itemsize, records[at:], taken, at == 0)
            at += n
            if stop == _native.PERF_TAKE_HEAD:
                self._unfinished.discard(buf)
            else:
                break  # full (the rest waits), or a misfit: what came before it now, the next call raises
        self._report_lost(taken)
        records = records[:at]
        if with_cpus:
            cpus = np.repeat(np.array([cpu for cpu, _, _ in taken], dtype=np.int32), [n for _, n, _ in taken])
            records = (cpus, records)
        self._partial = None  # no signal check from here to the return
        return records

    def _report_lost(self, taken: list[tuple[int, int, int]]) -> None:
        """lost_cb for each (cpu, samples, lost) with a count, marked reported as it is called
        (a Ctrl-C in lost_cb counts it as delivered, as for sample_cb)."""
        for i, (cpu, n, lost) in enumerate(taken):
            if lost:
                taken[i] = (cpu, n, 0)
                self._lost_cb(cpu, lost)

    def _settle_partial(self) -> None:
        """What an interrupted _take_native took: its samples to self._taken, as ``bytes`` of the
        dtype's size (without the kernel's padding), for the next batch; its lost counts (those
        not reported yet) to lost_cb."""
        records, taken = self._partial
        np = _numpy()
        raw = records.view(np.dtype((np.void, records.dtype.itemsize)))
        samples = []
        at = 0
        for cpu, n, _ in taken:
            samples += [(cpu, row.tobytes()) for row in raw[at : at + n]]
            at += n
        unreported = [(cpu, 0, lost) for cpu, _, lost in taken if lost]
        # The samples change hands in one step (no signal check between the two stores).
        self._taken, self._partial = self._taken + samples, (records[:0], unreported)
        self._report_lost(unreported)
        self._partial = None

    def _consume(self, buf: _CpuBuffer, into: Any = None, limit: int = _NO_LIMIT) -> int:
        # Marked unfinished until it is read to the end: after an exception, a negative return or
        # a read stopped at ``limit``, the rest of the ring will not be reported by epoll again
        # (perf reports a wakeup once), so the next poll() reads it without waiting.
        self._unfinished.add(buf)
        n = buf.consume(self._sample_cb, self._lost_cb, into=into, limit=limit)
        if 0 <= n < limit:
            self._unfinished.discard(buf)
        return n

    # -- asyncio --------------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[tuple[int, bytes]]:
        return self.records()

    async def records(self, interval: float | None = None) -> AsyncIterator[tuple[int, bytes]]:
        """Every sample as ``(cpu, data)``, waiting on the event loop (not ``sample_cb``).

        Cancelling the task that iterates loses nothing: samples taken but not yet yielded are
        yielded first by the next iteration. Lost counts still go to ``lost_cb``. ``interval``
        (seconds) also drains the rings that often, for samples short of ``wakeup_events``.
        The iteration ends when the PerfBuffer is closed.
        """
        pending = self._pending

        def refill() -> None:
            for buf in self._buffers:
                self._consume(buf, into=pending, limit=ASYNC_REFILL)

        async for sample in self._poller.drain(pending, refill, interval):
            yield sample

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
            lambda: self.consume_batch(dtype, max_records, with_cpus=with_cpus),
            lambda batch: not len(batch[1] if with_cpus else batch),
            interval,
        ):
            yield batch

    # -- lifetime -------------------------------------------------------------------------------

    def _release(self) -> None:
        try:
            for buf in self._buffers:
                sys_perf.disable(buf.fd)
            for cpu in self._slots:
                try:
                    self._map.delete(cpu.to_bytes(4, sys.byteorder))
                except BPFError as exc:
                    if exc.errno != errno.ENOENT:  # already cleared (the map file was released)
                        raise
        finally:
            self._slots.clear()
            for buf in self._buffers:
                buf.close()
            self._buffers.clear()
            self._by_fd.clear()
            self._unfinished.clear()
            self._map.close()

    def close(self) -> None:
        """Disable the events, clear the array slots this buffer set, unmap and close; idempotent.

        A poll() blocked in another thread returns first.
        """
        self._poller.close(self._release)

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


def _cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5', the kernel's cpulist format."""
    ranges: list[list[int]] = []
    for cpu in cpus:
        if ranges and ranges[-1][1] == cpu - 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)

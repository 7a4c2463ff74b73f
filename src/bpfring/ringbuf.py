"""The BPF ring buffer (BPF_MAP_TYPE_RINGBUF), consumed natively over mmap.

A :class:`Ring` maps one ringbuf map and walks its records the way libbpf's
``ringbuf_process_ring()`` does; a :class:`RingBuffer` polls any number of rings on one epoll,
like libbpf's ``struct ring_buffer``. Protocol references are to kernel/bpf/ringbuf.c.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import sys
import threading
from typing import Callable, Optional

from ._sys.bpf import MapType
from .errors import BPFError
from .maps import PAGE_SIZE, Map, MapLike, check_ring_size, open_map

# include/uapi/linux/bpf.h: the record header is {u32 len; u32 pg_off}; two high bits of len
# are flags. BUSY: reserved, not committed yet. DISCARD: committed as discarded.
BPF_RINGBUF_BUSY_BIT = 1 << 31
BPF_RINGBUF_DISCARD_BIT = 1 << 30
BPF_RINGBUF_HDR_SZ = 8
_LEN_MASK = BPF_RINGBUF_DISCARD_BIT - 1

# Flags a BPF program passes to bpf_ringbuf_output/submit/discard (notification control).
BPF_RB_NO_WAKEUP = 1
BPF_RB_FORCE_WAKEUP = 2

Callback = Callable[[bytes], Optional[int]]

_NO_LIMIT = sys.maxsize


class Ring:
    """One mapped ringbuf map: positions, sizes and the consumer walk.

    Obtain rings from :meth:`RingBuffer.add` or :attr:`RingBuffer.rings`. The ring owns a
    duplicate of the map fd, so closing the caller's :class:`~bpfring.Map` does not affect it.
    """

    def __init__(self, source: MapLike, callback: Callback) -> None:
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        self._callback = callback
        self._map: Map = open_map(source, MapType.RINGBUF)
        self._consumer_mm: mmap.mmap | None = None
        self._producer_mm: mmap.mmap | None = None
        try:
            self.size: int = self._map.max_entries
            check_ring_size(self.size)
            self._mask = self.size - 1
            fd = self._map.fd
            # kernel/bpf/ringbuf.c ringbuf_map_mmap_kern: page 0 (consumer_pos) is writable; from page 1,
            # producer_pos then the data area mapped twice, read-only, so a wrapping record is contiguous.
            self._consumer_mm = _mmap(fd, PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE, 0, "consumer page", self._map)
            self._producer_mm = _mmap(
                fd, PAGE_SIZE + 2 * self.size, mmap.PROT_READ, PAGE_SIZE, "producer page and data", self._map
            )
        except BaseException:
            self._release()
            raise
        # Aligned 8- and 4-byte loads and stores through native-format memoryviews are single
        # instructions; on x86-64 (TSO) they carry the acquire/release ordering libbpf spells out.
        self._consumer_pos = memoryview(self._consumer_mm)[:8].cast("Q")
        self._producer_pos = memoryview(self._producer_mm)[:8].cast("Q")
        self._headers = memoryview(self._producer_mm)[PAGE_SIZE:].cast("I")

    # -- positions ------------------------------------------------------------------------------

    @property
    def map_fd(self) -> int:
        return self._map.fd

    @property
    def map(self) -> Map:
        return self._map

    @property
    def consumer_pos(self) -> int:
        return self._consumer_pos[0]

    @property
    def producer_pos(self) -> int:
        return self._producer_pos[0]

    @property
    def avail_data_size(self) -> int:
        """Bytes committed or reserved but not yet consumed (producer_pos - consumer_pos)."""
        return self._producer_pos[0] - self._consumer_pos[0]

    # -- consuming ------------------------------------------------------------------------------

    def consume(self, max_records: int | None = None) -> int:
        """Deliver every record available now (up to ``max_records``); never waits.

        Returns the number of records delivered, or the callback's negative return value.
        """
        return self._consume(_NO_LIMIT if max_records is None else _check_limit(max_records))

    def _consume(self, limit: int) -> int:
        if self._consumer_mm is None:
            raise ValueError(f"ring of map {self._map.name!r} is closed")
        callback = self._callback
        consumer_pos = self._consumer_pos
        producer_pos = self._producer_pos
        headers = self._headers
        data = self._producer_mm
        mask = self._mask
        base = PAGE_SIZE + BPF_RINGBUF_HDR_SZ
        cons_pos = consumer_pos[0]
        count = 0
        while True:
            prod_pos = producer_pos[0]
            if cons_pos >= prod_pos:
                return count
            while cons_pos < prod_pos:
                off = cons_pos & mask
                length = headers[off >> 2]
                if length & BPF_RINGBUF_BUSY_BIT:
                    return count  # not committed yet: a later commit wakes us
                discarded = length & BPF_RINGBUF_DISCARD_BIT
                length &= _LEN_MASK
                cons_pos += (length + BPF_RINGBUF_HDR_SZ + 7) & ~7
                if cons_pos > prod_pos:
                    raise BPFError(
                        errno.EBADMSG, f"ring of map {self._map.name!r}: record at {cons_pos} claims {length} bytes, past producer_pos"
                    )
                if discarded:
                    consumer_pos[0] = cons_pos
                    continue
                record = data[base + off : base + off + length]
                # Release the space before the callback runs: the record counts as consumed once
                # the callback is entered, so an exception (or Ctrl-C inside it) never redelivers it.
                consumer_pos[0] = cons_pos
                ret = callback(record)
                count += 1
                if ret and ret < 0:
                    return ret
                if count >= limit:
                    return count
            # Every record up to prod_pos is consumed and consumer_pos is stored: re-read
            # producer_pos, so a commit that saw the old consumer_pos (and skipped the wakeup) is
            # still delivered by this call.

    # -- lifetime -------------------------------------------------------------------------------

    def _release(self) -> None:
        for name in ("_headers", "_producer_pos", "_consumer_pos"):
            view = self.__dict__.pop(name, None)
            if view is not None:
                view.release()
        for name in ("_producer_mm", "_consumer_mm"):
            mm = getattr(self, name, None)
            if mm is not None:
                setattr(self, name, None)
                mm.close()
        self._map.close()

    def close(self) -> None:
        """Unmap the ring and close its fd; idempotent."""
        if not self._map.closed:
            self._release()

    @property
    def closed(self) -> bool:
        return self._map.closed

    def __repr__(self) -> str:
        if self.closed:
            return "<Ring closed>"
        return (
            f"<Ring map={self._map.name!r} size={self.size} consumer_pos={self.consumer_pos} "
            f"producer_pos={self.producer_pos}>"
        )


class RingBuffer:
    """libbpf's ``ring_buffer`` in Python: one or more ringbuf maps polled on one epoll.

    ``callback(data)`` receives each record's bytes, exactly ``len`` of them, and may keep them.
    A negative return value stops consumption and becomes the return value of
    :meth:`poll`/:meth:`consume` (that record counts as consumed). An exception raised by the
    callback propagates; its record counts as consumed and the records after it stay in the ring
    for the next call, so no record is delivered twice.

    Example, as the seed's ``ring_buffer__new`` / ``ring_buffer__poll`` loop::

        with bpfring.RingBuffer(obj.map("rb"), handle_event) as rb:
            while True:
                rb.poll(timeout_ms=100)
    """

    def __init__(self, map: MapLike | None = None, callback: Callback | None = None) -> None:
        self._rings: list[Ring] = []
        self._by_fd: dict[int, Ring] = {}
        self._epoll: select.epoll | None = select.epoll()
        self._lock = threading.Lock()
        self._consuming_thread: int | None = None
        self._closing = False
        # An eventfd on the epoll lets close() from another thread wake a blocked poll().
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self._epoll.register(self._wake_fd, select.EPOLLIN)
            if map is not None:
                if callback is None:
                    raise TypeError("RingBuffer(map, callback): a callback is needed with a map")
                self.add(map, callback)
        except BaseException:
            self.close()
            raise

    def add(self, map: MapLike, callback: Callback) -> Ring:
        """Add another ringbuf map with its own callback; returns its :class:`Ring`."""
        epoll = self._check_open()
        ring = Ring(map, callback)
        try:
            # Level-triggered: a ring that still holds data after a poll is reported again by the next.
            epoll.register(ring.map_fd, select.EPOLLIN)
        except BaseException:
            ring.close()
            raise
        self._rings.append(ring)
        self._by_fd[ring.map_fd] = ring
        return ring

    @property
    def rings(self) -> tuple[Ring, ...]:
        return tuple(self._rings)

    def fileno(self) -> int:
        """The epoll fd: readable when any ring has data (for selectors and event loops)."""
        return self._check_open().fileno()

    def poll(self, timeout_ms: int = -1) -> int:
        """Wait up to ``timeout_ms`` (-1: forever) for data, then consume the rings that have it.

        Returns records delivered (0 on timeout) or a callback's negative return value.
        """
        epoll = self._check_open()
        timeout = -1 if timeout_ms < 0 else timeout_ms / 1000
        with self._lock:
            self._consuming_thread = threading.get_ident()
            try:
                events = epoll.poll(timeout)
                total = 0
                for fd, _ in events:
                    ring = self._by_fd.get(fd)
                    if ring is None or self._closing:
                        continue  # the wake-up eventfd, or a close() in progress
                    n = ring._consume(_NO_LIMIT)
                    if n < 0:
                        return n
                    total += n
                return total
            finally:
                self._consuming_thread = None

    def consume(self, max_records: int | None = None) -> int:
        """Consume every ring without waiting, up to ``max_records`` in all (libbpf's consume_n)."""
        self._check_open()
        left = _NO_LIMIT if max_records is None else _check_limit(max_records)
        total = 0
        with self._lock:
            self._consuming_thread = threading.get_ident()
            try:
                for ring in self._rings:
                    if left <= 0:
                        break
                    n = ring._consume(left)
                    if n < 0:
                        return n
                    total += n
                    left -= n
            finally:
                self._consuming_thread = None
        return total

    def _check_open(self) -> select.epoll:
        if self._epoll is None or self._closing:
            raise ValueError("RingBuffer is closed")
        return self._epoll

    def close(self) -> None:
        """Unmap every ring and close every fd; a poll() blocked in another thread returns first."""
        if self._epoll is None or self._closing:
            return
        if self._consuming_thread == threading.get_ident():
            raise RuntimeError("RingBuffer.close() called from its own callback: return a negative value to stop")
        self._closing = True
        os.eventfd_write(self._wake_fd, 1)
        with self._lock:
            for ring in self._rings:
                ring.close()
            self._rings.clear()
            self._by_fd.clear()
            epoll, self._epoll = self._epoll, None
            epoll.close()
            os.close(self._wake_fd)

    @property
    def closed(self) -> bool:
        return self._epoll is None

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RingBuffer rings={len(self._rings)}{' closed' if self.closed else ''}>"


def _check_limit(max_records: int) -> int:
    if max_records < 1:
        raise ValueError(f"max_records must be at least 1, got {max_records}")
    return max_records


def _mmap(fd: int, length: int, prot: int, offset: int, what: str, owner: Map) -> mmap.mmap:
    try:
        return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=prot, offset=offset)
    except OSError as exc:
        raise BPFError(exc.errno, f"can't mmap the {what} of map {owner.name!r} (id {owner.id})") from None

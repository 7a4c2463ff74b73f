"""The BPF ring buffer (BPF_MAP_TYPE_RINGBUF), consumed natively over mmap.

A :class:`Ring` maps one ringbuf map and walks its records the way libbpf's
``ringbuf_process_ring()`` does; a :class:`RingBuffer` polls any number of rings on one epoll,
like libbpf's ``struct ring_buffer``. Protocol references are to kernel/bpf/ringbuf.c.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import mmap
import platform
import sys
from typing import Any, AsyncIterator, Callable, Iterator, Optional

from ._poller import Poller
from ._sys.bpf import MapType
from .errors import BPFError, RecordSizeError
from .maps import PAGE_SIZE, Map, MapLike, check_ring_size, open_map

# include/uapi/linux/bpf.h: the record header is {u32 len; u32 pg_off}; two high bits of len
# are flags. BUSY: reserved, not committed yet. DISCARD: committed as discarded.
BPF_RINGBUF_BUSY_BIT = 1 << 31
BPF_RINGBUF_DISCARD_BIT = 1 << 30
BPF_RINGBUF_HDR_SZ = 8
_LEN_MASK = BPF_RINGBUF_DISCARD_BIT - 1


def roundup_len(length: int) -> int:
    """Bytes a record of ``length`` occupies in the ring: the header, then the data, 8-aligned."""
    return (length + BPF_RINGBUF_HDR_SZ + 7) & ~7

# Flags a BPF program passes to bpf_ringbuf_output/submit/discard (notification control).
BPF_RB_NO_WAKEUP = 1
BPF_RB_FORCE_WAKEUP = 2

Callback = Callable[[bytes], Optional[int]]
DTypeLike = Any  # numpy.typing.DTypeLike, without importing numpy for everyone

try:
    from . import _fastring as _native  # the consumer walk in C, built by pip install
except ImportError:  # no compiler at install time: the pure-Python walk does the same
    _native = None


def _numpy() -> Any:
    import numpy

    return numpy


def _record_dtype(np: Any, dtype: DTypeLike) -> Any:
    """``dtype`` as a numpy dtype that raw ring bytes can be read as: no Python objects in it."""
    dt = np.dtype(dtype)
    if dt.hasobject:
        # Ring bytes copied into an object array would be taken for PyObject pointers.
        raise TypeError(f"dtype {dt} holds Python objects: ring records can only be read as plain data")
    return dt


@functools.lru_cache(maxsize=64)
def _slot_dtype(np: Any, dt: Any) -> Any:
    """One ring slot holding a record of ``dt``: the 8-byte header, the record, padding to 8."""
    stride = roundup_len(dt.itemsize)
    return np.dtype({"names": ["record"], "formats": [dt], "offsets": [BPF_RINGBUF_HDR_SZ], "itemsize": stride})

_NO_LIMIT = sys.maxsize


def _new_records(np: Any, dt: Any, n: int) -> Any:
    """An uninitialized array for ``n`` records of ``dt``; a large one on memory that is reused
    once its arrays are gone (fresh pages fault on first write, which costs as much as the copy)."""
    nbytes = n * dt.itemsize
    if _native is not None and nbytes >= _native.LARGE_BATCH_BYTES:
        return np.frombuffer(_native.batch_block(nbytes), dtype=dt, count=n)
    return np.empty(n, dtype=dt)


def _batch_dtype(dtype: DTypeLike, limit: int, out: Any) -> tuple[Any, Any, int]:
    """numpy, ``dtype`` as a numpy dtype and the record limit of a batch with a dtype: ``out``
    (when given) checked and bounding the limit."""
    np = _numpy()
    dt = _record_dtype(np, dtype)
    if out is not None:
        if out.dtype != dt or out.ndim != 1 or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"out must be a writable contiguous 1-d array of {dt}, got {out.dtype} {out.shape}")
        limit = min(limit, len(out))
    return np, dt, limit


def release_batch_memory() -> int:
    """Unmap the memory kept from the last large batch freed (see :meth:`Ring.consume_batch`);
    returns the bytes unmapped."""
    return _native.release_batch_memory() if _native is not None else 0

# Records an async iteration takes from a ring at a time: under sustained load its queue (and
# the delay of the records in it) stays bounded; the rest waits in the ring.
ASYNC_REFILL = 4096


def require_tso() -> None:
    """Refuse to map a ring where plain loads and stores are not acquire/release (not x86-64).

    The Python walks and UserRingBuffer publish positions and headers with plain aligned stores,
    which order as the protocol needs only under x86-64's total store order.
    """
    if platform.machine() not in ("x86_64", "AMD64"):
        raise BPFError(
            errno.ENOTSUP,
            f"bpfring's ring protocol relies on x86-64 memory ordering; {platform.machine()} is not supported yet",
        )


class _Taken:
    """Records a batch call took from a ring but has not returned yet, kept across a Ctrl-C.

    Python raises KeyboardInterrupt between calls; a batch that is interrupted after records
    left the ring would lose them. Collected here instead, they are handed to the next batch call.
    """

    def __init__(self) -> None:
        self.records: list[bytes] = []

    def __bool__(self) -> bool:
        return bool(self.records)

    def hand_over(self, dt: Any, limit: int, out: Any) -> Any:
        """Up to ``limit`` kept records (as ``dt`` if given), removed from here with no signal check
        between the removal and the return."""
        records, rest = self.records[:limit], self.records[limit:]
        if dt is not None:
            np = _numpy()
            if any(len(r) != dt.itemsize for r in records):
                size = next(len(r) for r in records if len(r) != dt.itemsize)
                raise RecordSizeError(
                    f"a record an interrupted batch took is {size} bytes, dtype {dt} expects {dt.itemsize}: "
                    "read it with consume_batch() without a dtype"
                )
            array = np.frombuffer(b"".join(records), dtype=dt).copy()  # writable, like every batch
            if out is not None:
                out[: len(array)] = array
                array = out[: len(array)]
            self.records = rest
            return array
        self.records = rest
        return records


class _MappedRing:
    """The two mappings of a ring map and the views the protocol reads through.

    kernel/bpf/ringbuf.c: page 0 holds consumer_pos; from page 1, producer_pos and then the data
    area mapped twice back to back, so a record that wraps the end is contiguous. The side that
    advances a position maps its page read-write: the consumer page for a BPF_MAP_TYPE_RINGBUF
    (ringbuf_map_mmap_kern), the producer page and data for a USER_RINGBUF (ringbuf_map_mmap_user).
    """

    _map: Map
    _consumer_mm: mmap.mmap | None = None
    _producer_mm: mmap.mmap | None = None
    # Aligned 8- and 4-byte loads and stores through native-format memoryviews are single
    # instructions; on x86-64 (TSO) they carry the acquire/release ordering the protocol needs.
    _consumer_pos: memoryview | None = None
    _producer_pos: memoryview | None = None
    _data: memoryview | None = None
    _headers: memoryview | None = None

    def _map_ring(self, user: bool) -> None:
        """Map ``self._map``; on failure nothing stays mapped (the caller closes the map)."""
        require_tso()
        self.size: int = self._map.max_entries
        check_ring_size(self.size)
        self._mask = self.size - 1
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        try:
            self._consumer_mm = self._map.mmap(PAGE_SIZE, mmap.PROT_READ if user else rw, 0, "consumer page")
            self._producer_mm = self._map.mmap(
                PAGE_SIZE + 2 * self.size, rw if user else mmap.PROT_READ, PAGE_SIZE, "producer page and data"
            )
        except BaseException:
            self._unmap_ring()
            raise
        self._consumer_pos = memoryview(self._consumer_mm)[:8].cast("Q")
        self._producer_pos = memoryview(self._producer_mm)[:8].cast("Q")
        self._data = memoryview(self._producer_mm)[PAGE_SIZE:]
        self._headers = self._data.cast("I")

    def _unmap_ring(self) -> None:
        for name in ("_headers", "_data", "_producer_pos", "_consumer_pos"):
            view = getattr(self, name)
            if view is not None:
                setattr(self, name, None)
                view.release()
        for name in ("_producer_mm", "_consumer_mm"):
            mm = getattr(self, name)
            if mm is not None:
                setattr(self, name, None)
                try:
                    mm.close()
                except BufferError:
                    pass  # a view handed out still points in: the mapping goes when it does


class Ring(_MappedRing):
    """One mapped ringbuf map: positions, sizes and the consumer walk.

    Obtain rings from :meth:`RingBuffer.add` or :attr:`RingBuffer.rings`. The ring owns a
    duplicate of the map fd, so closing the caller's :class:`~bpfring.Map` does not affect it.
    Its consumer calls hold its RingBuffer's consumer lock, as the RingBuffer's own do.
    """

    # The owning RingBuffer's Poller (set by RingBuffer.add): its lock serializes every consumer.
    _poller: Poller | None = None

    def __init__(self, source: MapLike, callback: Callback) -> None:
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        self._callback = callback
        self._taken = _Taken()
        self._map = open_map(source, MapType.RINGBUF)
        try:
            self._map_ring(user=False)
        except BaseException:
            self._map.close()
            raise

    # -- positions ------------------------------------------------------------------------------

    @property
    def map_fd(self) -> int:
        return self._map.fd

    @property
    def map(self) -> Map:
        return self._map

    @property
    def consumer_pos(self) -> int:
        return self._positions()[0]

    @property
    def producer_pos(self) -> int:
        return self._positions()[1]

    @property
    def avail_data_size(self) -> int:
        """Bytes committed or reserved but not yet consumed (producer_pos - consumer_pos)."""
        cons, prod = self._positions()
        return prod - cons

    def _positions(self) -> tuple[int, int]:
        self._check_open()
        return self._consumer_pos[0], self._producer_pos[0]

    def _check_open(self) -> None:
        if self._consumer_pos is None:
            raise ValueError(f"ring of map {self._map.name!r} is closed")

    # -- consuming ------------------------------------------------------------------------------

    def _consuming(self) -> contextlib.AbstractContextManager[Any]:
        """The owning RingBuffer's consumer lock, for ``with`` (nothing for a Ring on its own)."""
        return self._poller.consuming() if self._poller is not None else contextlib.nullcontext()

    def consume(self, max_records: int | None = None) -> int:
        """Deliver every record available now (up to ``max_records``); never waits.

        Returns the number of records delivered, or the callback's negative return value.
        """
        limit = _NO_LIMIT if max_records is None else _check_limit(max_records)
        with self._consuming():
            return self._consume(limit)

    def consume_batch(self, dtype: DTypeLike | None = None, max_records: int | None = None, out: Any = None) -> Any:
        """Take every record available now in one call, bypassing the callback.

        Without ``dtype``: a list of ``bytes``. With ``dtype`` (a numpy dtype, or anything numpy
        accepts): a numpy array, one element per record, copied out before ``consumer_pos`` moves.
        Fixed-size records are located and checked without a Python step per record. A record
        whose size is not ``dtype.itemsize`` raises :class:`RecordSizeError` when it is reached,
        and stays in the ring.

        ``out``: a contiguous array of ``dtype`` to copy into instead of a new array (no
        allocation, no page faults on fresh memory); at most ``len(out)`` records are taken and
        ``out[:n]`` is returned. Without ``out``, a batch of 1 MiB or more is built on memory that
        bpfring keeps when the batch's last array is freed, for the next large batch (one block
        per process, about the size of the last large batch; :func:`release_batch_memory` unmaps
        it).
        """
        with self._consuming():
            return self._consume_batch(dtype, max_records, out)

    def _consume_batch(self, dtype: DTypeLike | None, max_records: int | None, out: Any) -> Any:
        limit = _NO_LIMIT if max_records is None else _check_limit(max_records)
        if dtype is None:
            if out is not None:
                raise TypeError("out= needs a dtype")
            # Records land in self._taken as they are taken: if Ctrl-C interrupts the walk, they
            # wait there and this call's successor returns them first (see _Taken).
            taken = self._taken.records
            if len(taken) < limit:
                self._consume(limit - len(taken), taken.append)
            return self._taken.hand_over(None, limit, None)
        np, dt, limit = _batch_dtype(dtype, limit, out)
        if self._taken:
            return self._taken.hand_over(dt, limit, out)  # an interrupted call's records first
        self._check_open()
        if _native is None:
            return self._consume_batch_python(np, dt, limit, out)
        pos, fits = self._fixed_head(dt, self._consumer_pos[0])
        if not fits:
            self._consumer_pos[0] = pos  # past the discarded records, if any
            return np.empty(0, dtype=dt) if out is None else out[:0]
        # Room for every record up to producer_pos as read here (each fills a slot of stride
        # bytes). take_fixed reads producer_pos again but takes at most that many, fewer where
        # it meets a BUSY record or a committed one of another size.
        room = min(limit, (self._producer_pos[0] - pos) // roundup_len(dt.itemsize))
        records = out[:room] if out is not None else _new_records(np, dt, room)
        advance, n = _native.take_fixed(self._producer_mm, PAGE_SIZE, pos, self._mask, dt.itemsize, records)
        # A Ctrl-C is raised where Python checks for signals: after take_fixed returns, before
        # consumer_pos moves (the records stay in the ring), or after this returns. Nothing in
        # between checks (no call, no loop).
        records = records[:n]
        self._consumer_pos[0] = pos + advance
        return records

    def _consume_batch_python(self, np: Any, dt: Any, limit: int, out: Any) -> Any:
        """consume_batch with numpy alone (without _fastring): each run of fitting records between
        discarded ones of other sizes is checked and copied as one array."""
        stride = roundup_len(dt.itemsize)
        # Copied as opaque fixed-size items: numpy copies a void item with one memcpy, where
        # a structured dtype would be copied field by field.
        raw_dt = np.dtype((np.void, dt.itemsize))
        pos = self._consumer_pos[0]
        runs = []  # views into the ring: valid until consumer_pos moves, at the end
        taken = 0
        while taken < limit:
            try:
                pos, fits = self._fixed_head(dt, pos)
            except RecordSizeError:
                if runs:
                    break  # the next call raises it
                raise
            if not fits:
                break
            n, keep = self._fixed_run(dt, pos, limit - taken, allow_discards=True)
            run = self._records_view(np, raw_dt, pos, n)
            runs.append(run if keep is None else run[keep])
            taken += len(runs[-1])
            pos += n * stride
        records = np.empty(taken, dtype=dt) if out is None else out[:taken]
        at = 0
        for run in runs:
            np.copyto(records[at : at + len(run)].view(raw_dt), run)
            at += len(run)
        self._consumer_pos[0] = pos  # as in consume_batch: no signal check from here to the return
        return records

    @contextlib.contextmanager
    def batch(self, dtype: DTypeLike, max_records: int | None = None) -> Iterator[Any]:
        """Zero-copy: a read-only numpy view of the available records, straight into the ring.

        The records stay reserved (``consumer_pos`` does not move) until the block exits, then are
        released at once, so producers cannot overwrite them while the block runs. The view is
        valid only inside the block: after it, producers reuse that memory. A batch stops before a
        discarded record (a view cannot skip one); the next batch skips it. Records whose size is
        not ``dtype.itemsize`` raise :class:`RecordSizeError` and stay in the ring. An exception
        inside the block leaves the records unconsumed.
        """
        with self._consuming(), self._batch(dtype, max_records) as records:
            yield records

    @contextlib.contextmanager
    def _batch(self, dtype: DTypeLike, max_records: int | None) -> Iterator[Any]:
        limit = _NO_LIMIT if max_records is None else _check_limit(max_records)
        np = _numpy()
        dt = _record_dtype(np, dtype)
        self._check_open()
        pos, fits = self._fixed_head(dt, self._consumer_pos[0])
        self._consumer_pos[0] = pos  # past the discarded records, if any
        n = self._fixed_run(dt, pos, limit, allow_discards=False)[0] if fits else 0
        yield self._records_view(np, dt, pos, n)
        if n and self._consumer_pos is not None:  # (the block may have closed the ring)
            self._consumer_pos[0] = pos + n * roundup_len(dt.itemsize)

    def _consume(self, limit: int, callback: Callback | None = None) -> int:
        self._check_open()
        cb = callback or self._callback
        if _native is not None:
            return _native.consume(self._consumer_mm, self._producer_mm, PAGE_SIZE, self._mask, cb, limit)
        return self._consume_python(limit, cb)

    def _consume_python(self, limit: int, callback: Callback) -> int:
        """libbpf's ringbuf_process_ring(), record by record (the fallback for _fastring.c)."""
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
                    return count  # not committed yet: its commit wakes us
                discarded = length & BPF_RINGBUF_DISCARD_BIT
                length &= _LEN_MASK
                next_pos = cons_pos + roundup_len(length)
                # A record never extends past producer_pos nor exceeds the ring; anything else is a
                # corrupt header or consumer_pos (user space can write it), not memory to read.
                if next_pos > prod_pos or next_pos - cons_pos > self.size:
                    raise self._corrupt(cons_pos, length, prod_pos)
                cons_pos = next_pos
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

    def _corrupt(self, pos: int, length: int, prod_pos: int) -> BPFError:
        return BPFError(
            errno.EBADMSG,
            f"ring of map {self._map.name!r}: record at {pos} claims {length} bytes, "
            f"past producer_pos {prod_pos} or the {self.size}-byte ring",
        )

    # -- fixed-size records, vectorized ----------------------------------------------------------

    def _fixed_head(self, dt: Any, pos: int) -> tuple[int, bool]:
        """From ``pos``, past any discarded records (of any size): (position, fits), where fits
        says a committed record of ``dt.itemsize`` bytes is there. A committed record of another
        size raises RecordSizeError (it stays in the ring). Moves nothing."""
        headers = self._headers
        prod_pos = self._producer_pos[0]
        while pos < prod_pos:
            length = headers[(pos & self._mask) >> 2]
            if length & BPF_RINGBUF_BUSY_BIT:
                break
            if not length & BPF_RINGBUF_DISCARD_BIT:
                if length != dt.itemsize:
                    raise RecordSizeError(
                        f"record at consumer_pos {pos} of map {self._map.name!r} is {length} bytes, "
                        f"dtype {dt} expects {dt.itemsize}; it stays in the ring (read it with consume())"
                    )
                return pos, True
            next_pos = pos + roundup_len(length & _LEN_MASK)
            if next_pos > prod_pos or next_pos - pos > self.size:
                raise self._corrupt(pos, length & _LEN_MASK, prod_pos)
            pos = next_pos
        return pos, False

    def _fixed_run(self, dt: Any, pos: int, limit: int, allow_discards: bool) -> tuple[int, Any]:
        """How many slots of ``dt.itemsize``-byte records from ``pos`` (where one is committed) form
        one run, at most ``limit``: committed records and, with ``allow_discards``, discarded ones
        of that size. Returns (n, keep): keep is None when all n are committed, else a boolean
        mask of the committed ones."""
        if _native is not None and not allow_discards:
            return _native.scan_fixed(self._producer_mm, PAGE_SIZE, pos, self._mask, dt.itemsize, limit), None
        np = _numpy()
        itemsize = dt.itemsize
        n = min((self._producer_pos[0] - pos) // roundup_len(itemsize), limit)
        hdr = self._headers_view(np, pos, n, roundup_len(itemsize))
        if (hdr == itemsize).all():
            return n, None
        live = (hdr & ~np.uint32(BPF_RINGBUF_DISCARD_BIT)) == itemsize  # committed or discarded, right size
        if not allow_discards:
            live &= hdr == itemsize
        stops = np.flatnonzero(~live)
        if stops.size:
            n = int(stops[0])  # BUSY, another size, or (zero-copy) a discard: the run ends before it
            hdr = hdr[:n]
        keep = (hdr & np.uint32(BPF_RINGBUF_DISCARD_BIT)) == 0
        return n, (None if keep.all() else keep)

    def _headers_view(self, np: Any, pos: int, n: int, stride: int) -> Any:
        """The n headers from pos, copied in one pass: x86-64 keeps loads in order, so the
        records read after this are at least as new as the committed headers seen here."""
        raw = np.frombuffer(  # a memoryview export: the mapping cannot go away during the copy
            memoryview(self._producer_mm), dtype=np.uint8, count=(n - 1) * stride + 4, offset=PAGE_SIZE + (pos & self._mask)
        )
        return np.lib.stride_tricks.as_strided(raw[:4].view(np.uint32), shape=(n,), strides=(stride,)).copy()

    def _records_view(self, np: Any, dt: Any, pos: int, n: int) -> Any:
        """A view of n records of ``dt`` from ``pos``, one per stride, straight into the mapping.

        np.frombuffer keeps the memoryview as the view's base, and while that memoryview lives the
        mapping cannot be unmapped (mmap.close() refuses): a view kept past close() stays valid
        memory. The double mapping makes the run contiguous even where it wraps the end of the ring.
        """
        if not n:
            return np.empty(0, dtype=dt)
        slots = np.frombuffer(
            memoryview(self._producer_mm), dtype=_slot_dtype(np, dt), count=n, offset=PAGE_SIZE + (pos & self._mask)
        )
        return slots["record"]

    # -- lifetime -------------------------------------------------------------------------------

    def _release(self) -> None:
        self._unmap_ring()
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

    With asyncio, ``async for data in rb`` (see :meth:`records` and :meth:`batches`).
    """

    def __init__(self, map: MapLike | None = None, callback: Callback | None = None) -> None:
        self._rings: list[Ring] = []
        self._by_fd: dict[int, Ring] = {}
        self._poller = Poller("RingBuffer")
        # What a batch call interrupted by Ctrl-C had taken, for the next one (see _Taken).
        self._taken = _Taken()
        self._taken_parts: list[Any] = []
        # Records an async iteration took from the rings but has not yielded yet (see records()).
        self._pending: collections.deque[bytes] = collections.deque()
        try:
            if map is not None:
                if callback is None:
                    raise TypeError("RingBuffer(map, callback): a callback is needed with a map")
                self.add(map, callback)
        except BaseException:
            self.close()
            raise

    def add(self, map: MapLike, callback: Callback) -> Ring:
        """Add another ringbuf map with its own callback; returns its :class:`Ring`."""
        self._poller.check_open()
        ring = Ring(map, callback)
        ring._poller = self._poller
        try:
            self._poller.register(ring.map_fd)
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
        return self._poller.fileno()

    def poll(self, timeout_ms: int = -1) -> int:
        """Wait up to ``timeout_ms`` (-1: forever) for data, then consume the rings that have it.

        Returns records delivered (0 on timeout) or a callback's negative return value.
        """
        total = 0
        with self._poller.consuming():
            for fd in self._poller.wait(timeout_ms):
                # At most a ring's worth per poll: a producer as fast as the callback cannot keep
                # poll() (and a close() waiting for it) going; the level-triggered epoll reports
                # what is left at once.
                ring = self._by_fd[fd]
                n = ring._consume(ring.size // BPF_RINGBUF_HDR_SZ)
                if n < 0:
                    return n
                total += n
        return total

    def consume(self, max_records: int | None = None) -> int:
        """Consume every ring without waiting, up to ``max_records`` in all (libbpf's consume_n)."""
        self._poller.check_open()
        left = _NO_LIMIT if max_records is None else _check_limit(max_records)
        total = 0
        with self._poller.consuming():
            for ring in self._rings:
                if left <= 0:
                    break
                n = ring._consume(left)
                if n < 0:
                    return n
                total += n
                left -= n
        return total

    def consume_batch(self, dtype: DTypeLike | None = None, max_records: int | None = None, out: Any = None) -> Any:
        """Every record available now, from every ring, in one call: see :meth:`Ring.consume_batch`.

        A Ctrl-C that interrupts the call loses no record: what it had taken is returned first by
        the next call (with ``out=`` over several rings, it waits in ``out`` until then: leave
        ``out`` alone until that call).
        """
        self._poller.check_open()
        limit = _NO_LIMIT if max_records is None else _check_limit(max_records)
        with self._poller.consuming():
            if len(self._rings) == 1 and not self._taken_parts:
                return self._rings[0]._consume_batch(dtype, limit, out)
            if dtype is None:
                if out is not None:
                    raise TypeError("out= needs a dtype")
                taken = self._taken.records
                for ring in self._rings:
                    if len(taken) < limit:
                        taken.extend(ring._consume_batch(None, limit - len(taken), None))
                return self._taken.hand_over(None, limit, None)
            np, dt, limit = _batch_dtype(dtype, limit, out)
            # Each ring's part goes into self._taken_parts before anything can raise: a Ctrl-C
            # leaves them there for the next call.
            parts = self._taken_parts
            if not parts:
                # Every ring copies straight into one array, sized for all they hold now.
                room = min(limit, sum(ring.avail_data_size for ring in self._rings) // roundup_len(dt.itemsize))
                records = out[:room] if out is not None else _new_records(np, dt, room)
                have = 0
                for ring in self._rings:
                    if have >= room:
                        break
                    parts.append(ring._consume_batch(dt, room - have, records[have:room]))
                    have += len(parts[-1])
                records = records[:have]
                self._taken_parts = []
                return records
            have = sum(len(part) for part in parts)
            for ring in self._rings:
                if have >= limit:
                    break
                parts.append(ring._consume_batch(dt, limit - have, None))
                have += len(parts[-1])
            records = np.concatenate(parts).astype(dt, copy=False) if parts else np.empty(0, dt)
            rest = [records[limit:]] if len(records) > limit else []
            records = records[:limit]
            if out is not None:
                out[: len(records)] = records
                records = out[: len(records)]
            self._taken_parts = rest
            return records

    @contextlib.contextmanager
    def batch(self, dtype: DTypeLike, max_records: int | None = None) -> Iterator[Any]:
        """Zero-copy view of the available records of a single-ring RingBuffer: see :meth:`Ring.batch`."""
        self._poller.check_open()
        if len(self._rings) != 1:
            raise ValueError(f"batch() needs exactly one ring, this RingBuffer has {len(self._rings)}: use rings[i].batch()")
        with self._poller.consuming(), self._rings[0]._batch(dtype, max_records) as records:
            yield records

    # -- asyncio --------------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.records()

    async def records(self, interval: float | None = None) -> AsyncIterator[bytes]:
        """Every record of every ring as ``bytes``, waiting on the event loop (not the callback).

        Cancelling the task that iterates loses nothing: records taken from the rings but not
        yet yielded are kept and yielded first by the next iteration. ``interval`` (seconds)
        also drains the rings that often without a wakeup, for producers that pass
        ``BPF_RB_NO_WAKEUP``. The iteration ends when the RingBuffer is closed.
        """
        pending = self._pending

        def refill() -> None:
            for ring in self._rings:
                ring._consume(ASYNC_REFILL, pending.append)

        async for record in self._poller.drain(pending, refill, interval):
            yield record

    async def batches(
        self, dtype: DTypeLike | None = None, max_records: int | None = None, interval: float | None = None
    ) -> AsyncIterator[Any]:
        """:meth:`consume_batch` on the event loop: yields each non-empty batch as it arrives.

        Nothing is taken from the rings while the iteration waits, so cancelling it loses nothing.
        """
        async for batch in self._poller.batches(
            lambda: self.consume_batch(dtype, max_records), lambda batch: not len(batch), interval
        ):
            yield batch

    # -- lifetime -------------------------------------------------------------------------------

    def _release(self) -> None:
        for ring in self._rings:
            ring.close()
        self._rings.clear()
        self._by_fd.clear()

    def close(self) -> None:
        """Unmap every ring and close every fd; a poll() blocked in another thread returns first."""
        self._poller.close(self._release)

    @property
    def closed(self) -> bool:
        return self._poller.closed

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RingBuffer rings={len(self._rings)}{' closed' if self.closed else ''}>"


def check_positive_int(name: str, value: int) -> int:
    """``value`` if it is an int of at least 1; else a TypeError or ValueError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def _check_limit(max_records: int) -> int:
    return check_positive_int("max_records", max_records)

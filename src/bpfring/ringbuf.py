"""The BPF ring buffer (BPF_MAP_TYPE_RINGBUF), consumed natively over mmap.

A :class:`Ring` maps one ringbuf map and walks its records the way libbpf's
``ringbuf_process_ring()`` does (the walk itself is C: bpfring._fastring.RingState); a
:class:`RingBuffer` polls any number of rings on one epoll, like libbpf's ``struct ring_buffer``.
Protocol references are to kernel/bpf/ringbuf.c.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
import weakref
from typing import Any, AsyncIterator, Callable, Iterator, Optional

from ._claim import Claim
from ._poller import Poller, forked_error
from ._protocol import (
    BPF_RB_FORCE_WAKEUP,
    BPF_RB_NO_WAKEUP,
    BPF_RINGBUF_HDR_SZ,
    MappedRing,
    roundup_len,
)
from ._sys.bpf import MapType
from ._batch import (
    ASYNC_REFILL,
    NO_LIMIT,
    DTypeLike,
    Kept,
    batch_dtype,
    check_limit,
    handed,
    kept_first,
    new_records,
    numpy_module,
    record_dtype,
    release_batch_memory,
)
from .errors import RingCorruptError
from .maps import PAGE_SIZE, Map, MapLike, open_map

__all__ = ["BPF_RB_FORCE_WAKEUP", "BPF_RB_NO_WAKEUP", "Ring", "RingBuffer", "release_batch_memory"]

Callback = Callable[[bytes], Optional[int]]


@functools.lru_cache(maxsize=64)
def _slot_dtype(np: Any, dt: Any) -> Any:
    """One ring slot holding a record of ``dt``: the 8-byte header, the record, padding to 8."""
    stride = roundup_len(dt.itemsize)
    return np.dtype({"names": ["record"], "formats": [dt], "offsets": [BPF_RINGBUF_HDR_SZ], "itemsize": stride})


def _no_callback(what: str) -> TypeError:
    return TypeError(f"{what} has no callback: pass one to RingBuffer()/add(), or use consume_batch(), batch() or async for")


class Ring(MappedRing):
    """One mapped ringbuf map: positions, sizes and the consumer walk.

    Obtain rings from :meth:`RingBuffer.add` or :attr:`RingBuffer.rings`. The ring owns a
    duplicate of the map fd, so closing the caller's :class:`~bpfring.Map` does not affect it.
    Its consumer calls hold its RingBuffer's consumer lock, as the RingBuffer's own do, and
    share its RingBuffer's kept records (see :class:`RingBuffer`): each call hands over the ones
    of this ring first, to its callback with :meth:`consume`.
    """

    # The owning RingBuffer's Poller (set by RingBuffer.add): its lock serializes every consumer.
    _poller: Poller | None = None
    # Found corrupt by its RingBuffer: left out of the epoll (which would report it ready forever)
    # until resync().
    _quarantined = False
    # The owning RingBuffer (a weak reference, set by RingBuffer.add): a Ring closed on its own
    # leaves it (RingBuffer._forget).
    _owner: Callable[[], Any] | None = None

    def __init__(
        self, source: MapLike, callback: Callback | None = None, *, index: int | None = None, shared: bool = False
    ) -> None:
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        self._callback = callback
        self._lock = threading.RLock()  # a Ring on its own: one consumer call at a time
        # What this ring's calls took and have not handed over yet; a RingBuffer replaces it with
        # its own (add()), shared by all its rings, each part tagged with its ring.
        self._kept = Kept()
        self._claim: Claim | None = None
        self._map = open_map(source, MapType.RINGBUF)
        try:
            if not shared:
                self._claim = Claim(self._map, "RingBuffer")
            self._map_ring(user=False, shared=shared)
        except BaseException:
            self._release()
            raise
        self._corrupt.ring = index

    # -- positions ------------------------------------------------------------------------------

    @property
    def map_fd(self) -> int:
        return self._map.fd

    @property
    def map(self) -> Map:
        return self._map

    @property
    def consumer_pos(self) -> int:
        """consumer_pos as it is in the shared page now (anyone with the map may write it)."""
        return self._live_state().positions()[0]

    @property
    def producer_pos(self) -> int:
        return self._live_state().positions()[1]

    @property
    def avail_data_size(self) -> int:
        """Bytes committed or reserved but not yet consumed (producer_pos - consumer_pos).

        Raises :class:`RingCorruptError` when the positions cannot be right (see :meth:`resync`).
        """
        return self._live_state().avail()

    def resync(self) -> int:
        """Move the consumer to producer_pos, skipping whatever is there; returns the bytes skipped.

        The way out of a :class:`RingCorruptError`: consumption goes on, exactly once, with the
        records committed after this call.
        """
        with self._consuming():
            # (Records a batch took before and kept, after a Ctrl-C or this very corruption, are
            # healthy: the next batch still returns them.)
            skipped = self._live_state().resync()
            if self._quarantined and self._poller is not None:
                self._poller.register(self.map_fd)
                self._quarantined = False
            return skipped

    def _live_state(self) -> Any:
        if self._state is None:
            raise ValueError(f"ring of map {self._map.name!r} is closed")
        if self._pid != os.getpid():
            raise forked_error("Ring", self._pid)
        return self._state

    # -- consuming ------------------------------------------------------------------------------

    def _consuming(self) -> contextlib.AbstractContextManager[Any]:
        """The owning RingBuffer's consumer lock, for ``with``; a Ring on its own has its own (two
        threads' calls walked the ring and its kept records at once: records twice, and lost).
        Refused from the thread already inside one, as the RingBuffer's is: a callback's nested
        call moved the ring (or took the kept part) under the walk that called it, which then
        delivered those records again."""
        if self._poller is not None:
            return self._poller.consuming()
        if self._lock._is_owned():  # type: ignore[attr-defined]
            raise RuntimeError(
                "Ring: this thread is already consuming (in a callback or a batch() block); "
                "consume, batches and resync do not nest"
            )
        return self._lock

    def consume(self, max_records: int | None = None) -> int:
        """Deliver every record available now (up to ``max_records``); never waits.

        Records of this ring that an earlier call took and did not hand over (see
        :class:`RingBuffer`) come first. Returns the number of records delivered, or the
        callback's negative return value.
        """
        limit = NO_LIMIT if max_records is None else check_limit(max_records)
        with self._consuming():
            self._live_state()  # (a closed ring hands over nothing: its records went with close())
            kept = self._kept
            kept.settle()
            return kept_first(kept.deliver(Ring._callback_for, limit, self), limit, self._consume)

    def consume_batch(self, dtype: DTypeLike | None = None, max_records: int | None = None, out: Any = None) -> Any:
        """Take every record available now in one call, bypassing the callback.

        Without ``dtype``: a list of ``bytes``. With ``dtype`` (a numpy dtype, or anything numpy
        accepts): a numpy array, one element per record, copied out in one pass over the ring (in
        C) before ``consumer_pos`` moves. A record whose size is not ``dtype.itemsize`` raises
        :class:`RecordSizeError` when it is reached, and stays in the ring.

        ``out``: a contiguous array of ``dtype`` to copy into instead of a new array (no
        allocation, no page faults on fresh memory); at most ``len(out)`` records are taken and
        ``out[:n]`` is returned. Without ``out``, a batch of 1 MiB or more is built on memory that
        bpfring keeps when the batch's last array is freed, for the next large batch (one block
        per process, about the size of the last large batch; :func:`release_batch_memory` unmaps
        it).
        """
        self._live_state()  # (before what is kept is handed over: a closed ring's went with close(),
        # and a fork() child's parent has it too)
        return handed(self._consuming(), self._kept, lambda: self._consume_batch(dtype, max_records, out))[0]

    def _consume_batch(self, dtype: DTypeLike | None, max_records: int | None, out: Any) -> tuple[Any, Any]:
        """consume_batch, with the runs of its records (Kept.hand_over), keeping what it takes
        until it returns: what an earlier call kept of this ring is returned first, and alone."""
        kept = self._kept
        limit = NO_LIMIT if max_records is None else check_limit(max_records)
        if dtype is None:
            if out is not None:
                raise TypeError("out= needs a dtype")
            kept.settle()
            if not kept.has(self):
                self._consume(limit, kept.rows(self).append)  # each record kept as it leaves the ring
            return kept.hand_over(None, limit, only=self)
        np, dt, limit = batch_dtype(dtype, limit, out)
        kept.settle()
        if kept.has(self):
            return kept.hand_over(dt, limit, out, only=self)
        records = self._take(kept, np, dt, limit, out)
        runs = [(self, len(records))]
        kept.filled()  # no signal check from here to the return
        return records, runs

    def _take(self, kept: Kept, np: Any, dt: Any, limit: int, out: Any) -> Any:
        """Up to ``limit`` records of ``dt`` copied out of the ring in one pass (in C), into ``out``
        if given; ``kept``'s array being filled meanwhile (see Kept.filling)."""
        state = self._live_state()
        avail = state.avail()
        if not avail:
            return np.empty(0, dtype=dt) if out is None else out[:0]
        # Room for every record up to producer_pos as read here (each fills a slot of stride
        # bytes; at least one, so discarded records and a misfit at the head are still met).
        room = min(limit, max(1, avail // roundup_len(dt.itemsize)))
        records = out[:room] if out is not None else new_records(np, dt, room)
        taken: list[int] = []
        # take() appends its count to taken and then moves consumer_pos, with no signal check in
        # between: a Ctrl-C that lands after it returns finds the records kept.
        kept.filling(records, taken, self)
        state.take(dt.itemsize, records, taken, dt)
        return records[: taken[0]]

    def _take_part(self, kept: Kept, dt: Any, limit: int) -> int:
        """Up to ``limit`` records (``bytes``, or of ``dt``) moved from the ring into ``kept``, for
        a RingBuffer's call over several rings; returns how many."""
        if dt is None:
            return self._consume(limit, kept.rows(self).append)
        self._take(kept, numpy_module(), dt, limit, None)
        return kept.keep_filled()

    @contextlib.contextmanager
    def batch(self, dtype: DTypeLike, max_records: int | None = None) -> Iterator[Any]:
        """Zero-copy: a read-only numpy view of the available records, straight into the ring.

        The records stay reserved (``consumer_pos`` does not move) until the block exits, then are
        released at once, so producers cannot overwrite them while the block runs. The view is
        valid only inside the block: after it, producers reuse that memory. A batch stops before a
        discarded record (a view cannot skip one); the next batch skips it. Records whose size is
        not ``dtype.itemsize`` raise :class:`RecordSizeError` and stay in the ring. An exception
        inside the block leaves the records unconsumed. While records of this ring taken earlier
        wait (an async iteration left early, an interrupted batch call), it raises RuntimeError:
        the view would skip ahead of them.
        """
        with self._consuming(), self._batch(dtype, max_records) as records:
            yield records

    @contextlib.contextmanager
    def _batch(self, dtype: DTypeLike, max_records: int | None) -> Iterator[Any]:
        kept = self._kept
        kept.settle()
        if kept.has(self):  # the view would skip ahead of them
            raise RuntimeError(
                f"{kept.count(self)} records taken earlier (by an async iteration left early, or an interrupted "
                "batch call) come before the ring's: take them with consume_batch() first"
            )
        limit = NO_LIMIT if max_records is None else check_limit(max_records)
        np = numpy_module()
        dt = record_dtype(np, dtype)
        pos, n = self._live_state().scan(dt.itemsize, limit, dt)
        yield self._records_view(np, dt, pos, n)
        if n and self._state is not None:  # (the block may have closed the ring)
            self._state.commit(pos + n * roundup_len(dt.itemsize))

    def _records_view(self, np: Any, dt: Any, pos: int, n: int) -> Any:
        """A read-only view of n records of ``dt`` from ``pos``, one per stride, into the mapping.

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

    def _consume(self, limit: int, callback: Callback | None = None) -> int:
        cb = callback or self._callback_for()
        return self._live_state().consume(cb, limit)

    def _callback_for(self) -> Callback:
        """The callback for this ring's records; TypeError if it has none (before any is taken)."""
        if self._callback is None:
            raise _no_callback(f"ring of map {self._map.name!r}")
        return self._callback

    # -- lifetime -------------------------------------------------------------------------------

    def _release(self) -> None:
        try:
            self._unmap_ring()
        finally:
            if self._claim is not None:
                self._claim.release()
            self._map.close()

    def close(self) -> None:
        """Unmap the ring, close its fd and give up its claim; idempotent. In a fork() child it
        releases only the child's copies (nothing shared is written)."""
        if not self._map.closed:
            if self._poller is None and self._lock._is_owned():  # type: ignore[attr-defined]
                # (The walk or the delivery of kept records that called it would go on.)
                raise RuntimeError("Ring.close() called from its own callback: return a negative value to stop")
            if self._state is not None:
                # Refused (RuntimeError) while a walk of this ring runs (close() from its callback):
                # then nothing is released (the fd and the claim went, and the walk went on).
                self._state.release()
            if self._pid == os.getpid() and self._poller is None:  # (a RingBuffer's: it warns)
                self._kept.warn_dropped("Ring")
                self._kept.drop()
            elif self._pid == os.getpid():
                owner = self._owner() if self._owner is not None else None
                if owner is not None:
                    owner._forget(self)
            self._release()

    @property
    def closed(self) -> bool:
        return self._map.closed

    def __del__(self) -> None:
        m = self.__dict__.get("_map")
        if m is not None and not m.closed:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)
            self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<Ring closed>"
        cons, prod = self._state.positions()
        return f"<Ring map={self._map.name!r} size={self.size} consumer_pos={cons} producer_pos={prod}>"


class RingBuffer:
    """libbpf's ``ring_buffer`` in Python: one or more ringbuf maps polled on one epoll.

    ``callback(data)`` receives each record's bytes, exactly ``len`` of them, and may keep them.
    A negative return value stops consumption and becomes the return value of
    :meth:`poll`/:meth:`consume` (that record counts as consumed). An exception raised by the
    callback propagates; its record counts as consumed and the records after it stay in the ring
    for the next call, so no record is delivered twice.

    Records taken from a ring and not handed over yet (an ``async for`` left early or cancelled,
    a batch call interrupted by Ctrl-C or raising on a corrupt ring) are kept, each with its ring,
    and every consumer call hands them over before it takes newer ones of that ring: batch calls
    and iterations return them first; :meth:`poll` and :meth:`consume` deliver them first (without
    waiting), each to the callback of its ring, counted in ``max_records``; a :class:`Ring` used
    directly hands over its own first. Each ring's records arrive in order, once.

    Example, as the seed's ``ring_buffer__new`` / ``ring_buffer__poll`` loop::

        with bpfring.RingBuffer(obj.map("rb"), handle_event) as rb:
            while True:
                rb.poll(timeout_ms=100)

    With asyncio, ``async for data in rb`` (see :meth:`records` and :meth:`batches`).

    A ring has one consumer: a ring that another RingBuffer (in this process or any other) is
    consuming is refused with an error naming that process, until it closes or exits.
    ``shared=True`` opts out: each record then goes to whichever consumer walks it first, and
    neither can tell a move of consumer_pos by the other from corruption.
    """

    def __init__(self, map: MapLike | None = None, callback: Callback | None = None, *, shared: bool = False) -> None:
        self._shared = shared
        self._rings: list[Ring] = []
        self._by_fd: dict[int, Ring] = {}
        self._poller = Poller("RingBuffer")
        # What batch calls and async iterations took from the rings and have not returned or
        # yielded yet (Ctrl-C, a corrupt ring among healthy ones, a cancelled task): the next
        # batch call or iteration returns it first.
        self._kept = Kept()
        try:
            if map is not None:
                self.add(map, callback)
        except BaseException:
            self.close()
            raise

    def add(self, map: MapLike, callback: Callback | None = None) -> Ring:
        """Add another ringbuf map with its own callback; returns its :class:`Ring`.

        Without a callback the ring serves batches (:meth:`consume_batch`, :meth:`batch`) and
        ``async for``; :meth:`poll` and :meth:`consume` then raise TypeError.
        """
        self._poller.check_open()
        ring = Ring(map, callback, index=len(self._rings), shared=self._shared)
        ring._poller = self._poller
        try:
            self._poller.register(ring.map_fd)
        except BaseException:
            ring.close()
            raise
        ring._kept = self._kept  # one holder for every ring (parts tagged with their ring)
        ring._owner = weakref.ref(self)
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

        Returns records delivered (0 on timeout) or a callback's negative return value. Records
        kept from an earlier call (see the class) are delivered first, without waiting.
        """
        self._poller.consuming()  # refused at once from a callback, rather than after the wait
        # Holding no lock: consume() in another thread goes on.
        ready = self._poller.wait(0 if self._kept.waiting() else timeout_ms)
        with self._poller.consuming():
            if self._poller.closing or self._poller.closed:
                return 0  # closed from another thread while this one waited

            def walk(left: int) -> int:
                # At most a ring's worth per ring: a producer as fast as the callback cannot keep
                # poll() (and a close() waiting for it) going; the level-triggered epoll reports
                # what is left at once. (The rings still open once the kept records are out.)
                rings = [self._by_fd[fd] for fd in ready if fd in self._by_fd]
                return self._each_ring(rings, lambda ring, left: ring.size // BPF_RINGBUF_HDR_SZ)

            return kept_first(self._deliver_kept(NO_LIMIT), NO_LIMIT, walk)

    def _deliver_kept(self, limit: int) -> int:
        """Up to ``limit`` kept records, each to its ring's callback (see Kept.deliver)."""
        kept = self._kept
        kept.settle()
        return kept.deliver(Ring._callback_for, limit)

    def _each_ring(
        self, rings: list[Ring], limit: Callable[[Ring, int], int], left: int = NO_LIMIT, keep: Kept | None = None
    ) -> int:
        """Consume ``rings`` in turn (up to ``limit(ring, left)`` records each, ``left`` in all),
        to their callbacks, or into ``keep`` (tagged with their ring).

        A corrupt ring does not stop the others: its RingCorruptError is raised once every
        healthy ring has delivered, and poll() no longer waits on it until ``resync()``. A
        callback's negative return stops at once and is returned.
        """
        total = 0
        error: RingCorruptError | None = None
        for ring in rings:
            if left <= 0:
                break
            try:
                n = ring._consume(limit(ring, left), None if keep is None else keep.rows(ring).append)
            except RingCorruptError as exc:
                self._quarantine(ring)
                error = error or exc
                continue
            if n < 0:
                return n
            total += n
            left -= n
        if error is not None:
            raise error
        return total

    def _forget(self, ring: Ring) -> None:
        """``ring`` closes on its own (Ring.close(), this RingBuffer open): it leaves the epoll and
        the rings (the others go on; it kept reporting its fd, and every call raised "closed"),
        and what is kept of it goes, with a warning (it was handed over after the close)."""
        poller = self._poller
        if poller.closing or poller.closed or ring not in self._rings:
            return  # (closing: its release closes the rings)
        with poller._lock:  # (reentrant: close() inside the ring's own batch() block)
            n = self._kept.drop_ring(ring)
            if not ring._quarantined:
                poller.unregister(ring.map_fd)
            self._rings.remove(ring)
            self._by_fd.pop(ring.map_fd, None)
        if n:
            warnings.warn(
                f"closing this Ring of a RingBuffer drops {n} records taken from it and never handed over "
                "(an async iteration left early, or a batch call interrupted): no consumer will see them",
                RuntimeWarning,
                stacklevel=4,
            )

    def _quarantine(self, ring: Ring) -> None:
        """Take a corrupt ring out of the epoll: it would be reported ready forever, and a poll()
        loop that logs the error and goes on would spin. Ring.resync() puts it back."""
        if not ring._quarantined:
            self._poller.unregister(ring.map_fd)
            ring._quarantined = True

    def consume(self, max_records: int | None = None) -> int:
        """Consume every ring without waiting, up to ``max_records`` in all (libbpf's consume_n);
        records kept from an earlier call (see the class) first."""
        self._poller.check_open()
        left = NO_LIMIT if max_records is None else check_limit(max_records)
        with self._poller.consuming():
            return kept_first(
                self._deliver_kept(left), left, lambda rest: self._each_ring(self._rings, lambda ring, left: left, rest)
            )

    def consume_batch(self, dtype: DTypeLike | None = None, max_records: int | None = None, out: Any = None) -> Any:
        """Every record available now, from every ring, in one call: see :meth:`Ring.consume_batch`.

        A Ctrl-C that interrupts the call loses no record: what it had taken is returned first by
        the next call (with ``out=`` over several rings, it waits in ``out`` until then: leave
        ``out`` alone until that call).
        """
        self._poller.check_open()
        limit = NO_LIMIT if max_records is None else check_limit(max_records)
        return handed(self._poller.consuming(), self._kept, lambda: self._consume_batch(dtype, limit, out))[0]

    def _handed_batch(self, dtype: DTypeLike | None, max_records: int | None, out: Any) -> tuple[Any, Any]:
        """consume_batch, with the runs of its records (for a put_back), for batches() (handed's hold)."""
        self._poller.check_open()
        limit = NO_LIMIT if max_records is None else check_limit(max_records)
        return handed(self._poller.consuming(), self._kept, lambda: self._consume_batch(dtype, limit, out), True)

    def _consume_batch(self, dtype: DTypeLike | None, limit: int, out: Any) -> tuple[Any, Any]:
        kept = self._kept
        if len(self._rings) == 1:
            return self._rings[0]._consume_batch(dtype, limit, out)
        dt = None
        if dtype is not None:
            _, dt, limit = batch_dtype(dtype, limit, out)
        elif out is not None:
            raise TypeError("out= needs a dtype")
        kept.settle()
        if not kept:
            # Each ring's records go into kept as they are taken: if Ctrl-C or a corrupt ring
            # interrupts the call, the next one returns them first.
            have = 0
            error: RingCorruptError | None = None
            for ring in self._rings:
                if have >= limit:
                    break
                try:
                    have += ring._take_part(kept, dt, limit - have)
                except RingCorruptError as exc:
                    self._quarantine(ring)
                    error = error or exc
            if error is not None:
                raise error
        return kept.hand_over(dt, limit, out)

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

    def records(self, interval: float | None = None) -> AsyncIterator[bytes]:
        """Every record of every ring as ``bytes``, waiting on the event loop (not the callback).

        Cancelling the task that iterates (or leaving the loop) loses nothing: records taken from
        the rings but not yet yielded are kept, and come first from the next iteration or
        :meth:`consume_batch`; likewise what a batch call kept comes first here. ``interval`` (seconds)
        also drains the rings that often without a wakeup, for producers that pass
        ``BPF_RB_NO_WAKEUP``. The iteration ends when the RingBuffer is closed.
        """
        kept = self._kept

        def refill() -> None:
            kept.settle()
            if not kept:
                self._each_ring(self._rings, lambda ring, left: ASYNC_REFILL, NO_LIMIT, kept)

        # The iteration is drain() itself: a generator around it would cost a fifth of each step.
        return self._poller.drain(kept, refill, interval)

    async def batches(
        self, dtype: DTypeLike | None = None, max_records: int | None = None, interval: float | None = None
    ) -> AsyncIterator[Any]:
        """:meth:`consume_batch` on the event loop: yields each non-empty batch as it arrives.

        Nothing is taken from the rings while the iteration waits, so cancelling it loses nothing.
        """
        async for batch in self._poller.batches(
            lambda: self._handed_batch(dtype, max_records, None), lambda batch: not len(batch), interval, self._kept
        ):
            yield batch

    # -- lifetime -------------------------------------------------------------------------------

    def _release(self) -> None:
        self._kept.drop()  # (close() said how many)
        for ring in self._rings:
            ring.close()
        self._rings.clear()
        self._by_fd.clear()

    def close(self) -> None:
        """Unmap every ring and close every fd; a poll() blocked in another thread returns first.

        In a fork() child it releases only the child's copies of the descriptors and mappings:
        nothing the parent shares (epoll, eventfd, consumer_pos) is touched.

        Records an async iteration or a batch call took and did not hand over go with it: a
        RuntimeWarning says how many."""
        if not (self._poller.closed or self._poller.forked):
            self._kept.warn_dropped("RingBuffer")
        self._poller.close(self._release)

    def __del__(self) -> None:
        poller = self.__dict__.get("_poller")
        if poller is not None and not poller.closed:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)
            self.close()

    @property
    def closed(self) -> bool:
        return self._poller.closed

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RingBuffer rings={len(self._rings)}{' closed' if self.closed else ''}>"

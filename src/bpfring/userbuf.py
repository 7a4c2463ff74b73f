"""The user ring buffer (BPF_MAP_TYPE_USER_RINGBUF, Linux 6.1+): Python produces, BPF consumes.

The roles of :mod:`bpfring.ringbuf` swap: user space reserves a record, fills it in place in the
shared mapping and submits it; a BPF program drains the records with ``bpf_user_ringbuf_drain()``.
The protocol is the one of kernel/bpf/ringbuf.c (``__bpf_user_ringbuf_peek``) and the API follows
libbpf's ``user_ring_buffer__reserve/reserve_blocking/submit/discard``.
"""

from __future__ import annotations

import asyncio
import errno
import select
import threading
import time
import warnings
from types import TracebackType

from ._claim import Claim
from ._poller import Poller, forked_error
from ._sys.bpf import MapType
from .errors import RingFullError
from .maps import PAGE_SIZE, Map, MapLike, open_map
from ._protocol import BPF_RINGBUF_HDR_SZ, MappedRing, roundup_len

# The drain hands each record to the BPF callback as a dynptr, and bpf_dynptr_check_size()
# (kernel/bpf/helpers.c, DYNPTR_MAX_SIZE) refuses more than 2^24 - 1 bytes: a bigger record makes
# every drain fail with E2BIG and stalls the ring for good, so it is refused here instead.
# (libbpf only refuses sizes that collide with the BUSY/DISCARD bits, 2^30 and up.)
DYNPTR_MAX_SIZE = (1 << 24) - 1

_RESERVED, _SUBMITTED, _DISCARDED = "reserved", "submitted", "discarded"

# reserve_blocking() callers not in epoll wait on a condition, re-checked at least this often.
FOLLOWER_RECHECK_S = 1.0


class Sample:
    """A record reserved in a :class:`UserRingBuffer`: fill :attr:`buf`, then submit or discard.

    ``buf`` is a writable memoryview of exactly the requested size, pointing into the ring (no
    copy). Until the sample is submitted the kernel stops at it, so every later record waits too.
    Submit and discard release ``buf``; views made from it (slices, ``numpy.frombuffer``) are not
    tracked by Python and must not be written to afterwards.
    As a context manager it hands out ``buf`` and submits on a normal exit, discards on an
    exception::

        with urb.reserve(len(data)) as buf:
            buf[:] = data
    """

    __slots__ = ("_urb", "_pos", "_size", "_buf", "_state")

    def __init__(self, urb: UserRingBuffer, pos: int, size: int, buf: memoryview) -> None:
        self._urb = urb
        self._pos = pos
        self._size = size
        self._buf = buf
        self._state = _RESERVED

    @property
    def buf(self) -> memoryview:
        """The record's bytes in the ring; released (unusable) once submitted or discarded."""
        self._check_reserved()
        return self._buf

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return self._size

    @property
    def pos(self) -> int:
        """The ring position of the record's header (the producer_pos it was reserved at)."""
        return self._pos

    @property
    def submitted(self) -> bool:
        return self._state == _SUBMITTED

    @property
    def discarded(self) -> bool:
        return self._state == _DISCARDED

    def submit(self) -> None:
        """Publish the record to the BPF side (same as ``urb.submit(sample)``)."""
        self._urb.submit(self)

    def discard(self) -> None:
        """Give the space back without the BPF side ever seeing the record."""
        self._urb.discard(self)

    def _check_reserved(self) -> None:
        if self._state != _RESERVED:
            raise ValueError(f"sample of {self._size} bytes already {self._state}")

    def __enter__(self) -> memoryview:
        return self.buf

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._state != _RESERVED:
            return  # submitted or discarded explicitly inside the block
        if exc_type is None:
            self._urb.submit(self)
        else:
            self._urb.discard(self)

    def __repr__(self) -> str:
        return f"<Sample {self._size} bytes at pos {self._pos} {self._state}>"


class UserRingBuffer(MappedRing):
    """libbpf's ``user_ring_buffer`` in Python: the producer side of a BPF_MAP_TYPE_USER_RINGBUF.

    ``map`` is a :class:`~bpfring.Map`, an fd or a pinned path; the buffer works on its own
    duplicate of the fd. Records may be submitted in any order: the kernel delivers them in ring
    order and stops at the first one still reserved. Reserving is thread-safe, blocking too (each
    drain wakes every thread waiting in :meth:`reserve_blocking`). A map has one producer: a second
    UserRingBuffer on it, in this process or another, is refused (EBUSY, naming the holder) until
    the first closes or exits.

    Example::

        with bpfring.UserRingBuffer(obj.map("urb")) as urb:
            with urb.reserve(len(data)) as buf:
                buf[:] = data
            obj.program("drain").test_run()   # the BPF side calls bpf_user_ringbuf_drain()
    """

    def __init__(self, map: MapLike) -> None:
        self._claim: Claim | None = None
        self._map = open_map(map, MapType.USER_RINGBUF)
        try:
            self._claim = Claim(self._map, "UserRingBuffer", producer=True)
        except BaseException:
            self._map.close()
            raise
        self._lock = threading.Lock()
        self._pending: dict[int, Sample] = {}  # reserved samples by position, discarded on close()
        # One reserve_blocking() waits in epoll, the others on _woken (see _wait_for_drain);
        # _wakeups counts the epoll waits that returned.
        self._epoll_waiter = False
        self._wakeups = 0
        self._woken = threading.Condition(self._lock)
        self._aio: Poller | None = None  # reserve_async()'s epoll, made on first use
        self._closing = False
        try:
            # The consumers' waiting code: an epoll that close() from another thread wakes (and
            # waits for its waiters to leave before closing), refused in a fork() child.
            self._poller = Poller("UserRingBuffer")
        except BaseException:
            self._claim.release()
            self._map.close()
            raise
        try:
            self._map_ring(user=True)
            self.max_sample_size: int = min(self.size - BPF_RINGBUF_HDR_SZ, DYNPTR_MAX_SIZE)
            # ringbuf_map_poll_user: EPOLLOUT while any space is free. Edge-triggered, so a wait
            # for a record bigger than the free space sleeps until the next drain instead of
            # spinning; the drain wakes the fd whenever it consumed something.
            self._poller.register(self._map.fd, select.EPOLLOUT | select.EPOLLET)
        except BaseException:
            self._poller.close(self._release)
            raise

    # -- positions ------------------------------------------------------------------------------

    @property
    def map(self) -> Map:
        return self._map

    def fileno(self) -> int:
        """The map fd: writable (EPOLLOUT) while the ring has free space, for selectors and asyncio."""
        return self._map.fd

    @property
    def consumer_pos(self) -> int:
        """Bytes the BPF side has drained so far (a free-running counter)."""
        self._check_open()
        return self._state.positions()[0]

    @property
    def producer_pos(self) -> int:
        """Bytes reserved so far, committed or not (a free-running counter)."""
        self._check_open()
        return self._state.positions()[1]

    @property
    def avail_space(self) -> int:
        """Free bytes in the ring; a record of n bytes needs ``(n + 8 + 7) & ~7`` of them."""
        self._check_open()
        cons, prod = self._state.positions()
        return self.size - (prod - cons)

    # -- producing ------------------------------------------------------------------------------

    def reserve(self, size: int) -> Sample:
        """Reserve a record of ``size`` bytes; raise :class:`RingFullError` at once if it does not fit."""
        total = self._check_size(size)
        with self._lock:
            self._check_open()
            # In C: consumer_pos loaded with acquire, the BUSY header stored before producer_pos
            # (release), both checked against what this producer last stored.
            prod_pos, free = self._state.reserve(size)
            if prod_pos < 0:
                raise RingFullError(
                    errno.ENOSPC,
                    f"user ring buffer of map {self._map.name!r} has no room for a sample of {size} bytes "
                    f"({total} with its header): {free} of {self.size} bytes free",
                )
            start = PAGE_SIZE + (prod_pos & self._mask) + BPF_RINGBUF_HDR_SZ
            sample = Sample(self, prod_pos, size, memoryview(self._producer_mm)[start : start + size])
            self._pending[prod_pos] = sample
        return sample

    def reserve_blocking(self, size: int, timeout_ms: int = -1) -> Sample:
        """Reserve ``size`` bytes, waiting up to ``timeout_ms`` (-1: forever) for the BPF side to drain.

        Raises :class:`RingFullError` if the space did not free up in time, ValueError if
        :meth:`close` is called meanwhile. Each drain that consumes records wakes the wait (unless
        the BPF program passed BPF_RB_NO_WAKEUP to ``bpf_user_ringbuf_drain()``).
        """
        self._check_size(size)
        if timeout_ms < 0 and timeout_ms != -1:
            raise ValueError(f"timeout_ms must be -1 (wait forever) or at least 0, got {timeout_ms}")
        deadline = None if timeout_ms == -1 else time.monotonic() + timeout_ms / 1000
        with self._lock:
            self._check_open()
        while True:
            seen = self._wakeups  # before the attempt: a wakeup after it means try again
            try:
                return self.reserve(size)  # raises "closed" once close() has begun
            except RingFullError:
                pass
            if deadline is None:
                wait = -1.0
            else:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
            self._wait_for_drain(wait, seen)
        try:
            return self.reserve(size)  # one last try at the deadline, as libbpf does
        except RingFullError:
            raise self._timed_out(size, f"{timeout_ms} ms") from None

    async def reserve_async(self, size: int, timeout: float | None = None) -> Sample:
        """:meth:`reserve_blocking` on the event loop: wait up to ``timeout`` seconds (None: no
        limit) for the BPF side to drain, without blocking the loop.

        Raises :class:`RingFullError` if the space did not free up in time, ValueError if
        :meth:`close` is called meanwhile. Cancelling the wait reserves nothing. Use it from one
        event loop (any number of tasks).
        """
        self._check_size(size)
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be None (no limit) or at least 0, got {timeout}")
        aio = self._async_poller()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            try:
                return self.reserve(size)  # raises "closed" once close() has begun
            except RingFullError:
                pass
            wait = None if deadline is None else deadline - loop.time()
            if wait is not None and wait <= 0:
                break
            # No await since the failed reserve: a drain since then is still on aio's epoll.
            await aio.wait_readable(wait)
            if not aio.closing:
                aio.wait(0)  # take the drain's edge, so the epoll fd goes quiet until the next one
        try:
            return self.reserve(size)
        except RingFullError:
            raise self._timed_out(size, f"{timeout} s") from None

    def _timed_out(self, size: int, waited: str) -> RingFullError:
        return RingFullError(
            errno.ENOSPC,
            f"timed out after {waited} waiting for room for a sample of {size} bytes in the user "
            f"ring buffer of map {self._map.name!r}: {self.avail_space} of {self.size} bytes free",
        )

    def _async_poller(self) -> Poller:
        """reserve_async()'s epoll, watching the map fd for EPOLLOUT edge-triggered (made on first
        use). asyncio's own EPOLLOUT wait would be level-triggered, ready while any byte is free:
        a wait for more room than that would spin."""
        with self._lock:
            self._check_open()
            if self._aio is None:
                aio = Poller("UserRingBuffer")
                try:
                    aio.register(self._map.fd, select.EPOLLOUT | select.EPOLLET)
                except BaseException:
                    aio.close(lambda: None)
                    raise
                self._aio = aio
            return self._aio

    def _wait_for_drain(self, wait: float, seen: int) -> None:
        """Sleep until a wakeup newer than ``seen`` (a drain, or close()) or ``wait`` seconds
        (-1: no limit).

        A drain makes one EPOLLOUT edge, and an edge wakes one epoll_wait: so one waiter sleeps in
        epoll and, when it returns, counts a wakeup and wakes the others (on a condition); every
        waiter then tries again. A waiter whose failed reserve() came before a wakeup it did not
        see (another waiter took the edge) returns at once; a drain with nobody in epoll leaves
        its edge there for the next poll.
        """
        leader = False
        try:
            with self._lock:
                if self._closing or self._wakeups != seen:
                    return
                if self._epoll_waiter:
                    # Re-checked at least every second, should the epoll waiter be interrupted
                    # between its last two steps (see the finally below).
                    timeout = FOLLOWER_RECHECK_S if wait < 0 else min(wait, FOLLOWER_RECHECK_S)
                    self._woken.wait_for(lambda: self._wakeups != seen or not self._epoll_waiter, timeout)
                    return
                self._epoll_waiter = leader = True
            try:
                self._poller.wait(-1 if wait < 0 else wait * 1000)
            except ValueError:
                pass  # closed meanwhile: the next reserve() says so
        finally:
            if leader:
                with self._lock:
                    self._epoll_waiter = False
                    self._wakeups += 1
                    self._woken.notify_all()

    def submit(self, sample: Sample) -> None:
        """Publish ``sample`` to the BPF side; its buffer is released and can't be used any more."""
        self._commit(sample, discard=False)

    def discard(self, sample: Sample) -> None:
        """Drop ``sample``: the BPF side skips it and its space is reclaimed by the next drain."""
        self._commit(sample, discard=True)

    def _commit(self, sample: Sample, discard: bool) -> None:
        if not isinstance(sample, Sample):
            raise TypeError(f"expected a Sample from reserve(), got {type(sample).__name__}")
        if sample._urb is not self:
            raise ValueError(f"{sample!r} was reserved in another UserRingBuffer")
        with self._lock:
            sample._check_reserved()
            # Release the view before publishing, so no write through it can land after the
            # kernel starts reading. If a consumer still holds its buffer open (a Py_buffer
            # export, e.g. pickle.PickleBuffer), the sample stays reserved: release that, retry.
            try:
                sample._buf.release()
            except BufferError:
                raise BufferError(
                    f"{sample!r} is still exported (something holds its buffer open): "
                    f"release that before {'discard' if discard else 'submit'}"
                ) from None
            self._publish(sample, discard)

    def _publish(self, sample: Sample, discard: bool) -> None:
        # One release store clears BUSY (and sets DISCARD): the record's bytes, written before it,
        # are visible first. It pairs with the smp_load_acquire(hdr) in __bpf_user_ringbuf_peek().
        self._state.commit(sample._pos, sample._size, discard)
        sample._state = _DISCARDED if discard else _SUBMITTED
        del self._pending[sample._pos]

    # -- lifetime -------------------------------------------------------------------------------

    def _check_size(self, size: int) -> int:
        """The ring bytes a record of ``size`` takes (header included, rounded up to 8)."""
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"sample size must be an int, got {type(size).__name__}")
        if not 1 <= size <= self.max_sample_size:
            raise ValueError(
                f"sample size must be 1 to {self.max_sample_size} bytes in this {self.size}-byte ring, got {size}"
                + ("" if size < 1 else _size_limit_reason(self.size))
            )
        return roundup_len(size)

    def _check_open(self) -> None:
        if self._closing or self._poller.closed:
            raise ValueError(f"user ring buffer of map {self._map.name!r} is closed")
        if self._poller.forked:
            raise forked_error("UserRingBuffer", self._poller.pid)

    def _release(self, in_child: bool = False) -> None:
        """Discard what is still reserved, unmap and close the map; in a fork() child only the
        child's descriptors and mappings (the parent's reserved samples are its own)."""
        if in_child:
            self._unmap_ring()
        else:
            with self._lock:  # a reserve() in another thread finishes first; later ones say "closed"
                for sample in list(self._pending.values()):
                    # A record left BUSY would stop the kernel there for good (the map may
                    # outlive us): discard what was never submitted.
                    try:
                        sample._buf.release()
                    except BufferError:
                        pass  # still exported: the mapping lives until that export goes
                    if self._state is not None:
                        self._publish(sample, discard=True)
                self._unmap_ring()
        if self._aio is not None:  # wakes reserve_async() waits: their next reserve() says "closed"
            aio, self._aio = self._aio, None
            aio.close(lambda: None)  # (in a child, Poller.close touches nothing shared)
        self._claim.release()  # (in a child, it holds none: nothing to give back)
        self._map.close()

    def close(self) -> None:
        """Discard samples still reserved, unmap the ring and close its fds; idempotent.

        A ``reserve_blocking()`` waiting in another thread, or a ``reserve_async()``, raises
        ValueError ("closed"). In a fork() child only the child's copies are released.
        """
        if self._poller.forked:  # no lock (one may be held forever), nothing shared
            self._closing = True
            self._poller.close(self._release, lambda: self._release(in_child=True))
            return
        with self._lock:
            if self._closing or self._poller.closed:
                return
            self._closing = True
            self._woken.notify_all()  # the waiters on the condition try again and see "closed"
        # Wakes the waiter in epoll and lets it leave before the epoll closes.
        self._poller.close(self._release)

    @property
    def closed(self) -> bool:
        return self._poller.closed

    def __del__(self) -> None:
        poller = self.__dict__.get("_poller")
        if poller is not None and not poller.closed:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)
            self.close()  # the epoll and eventfd are bare fds: nothing else would close them

    def __enter__(self) -> UserRingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<UserRingBuffer closed>"
        return (
            f"<UserRingBuffer map={self._map.name!r} size={self.size} producer_pos={self.producer_pos} "
            f"consumer_pos={self.consumer_pos}>"
        )


def _size_limit_reason(ring_size: int) -> str:
    if ring_size - BPF_RINGBUF_HDR_SZ > DYNPTR_MAX_SIZE:
        return f" (the kernel hands records to BPF as dynptrs of at most {DYNPTR_MAX_SIZE} bytes)"
    return f" (a record and its {BPF_RINGBUF_HDR_SZ}-byte header must fit in the ring)"

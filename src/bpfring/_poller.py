"""The epoll set shared by RingBuffer and PerfBuffer: waiting, one consumer at a time, closing.

Both consumers poll many fds on one epoll, let ``close()`` from another thread wake a blocked
``poll()`` (an eventfd on the epoll), refuse ``close()`` from their own callback, and wait for
data from asyncio. That machinery lives here once.

Waiting and consuming are separate: a thread blocked in ``wait()`` holds no lock, so
``consume()`` and batches in other threads (and async iteration) never wait behind it. The
consumer lock is held only while records are walked.

Every Poller remembers the process that made it. In a fork() child it refuses to be used, and
its ``close()`` releases only the child's own descriptors: the epoll, the eventfd and the rings
are shared with the parent, and a lock another thread held at the fork is held forever there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import threading
import time
from typing import Any, AsyncIterator, Callable

from ._batch import NOTHING, Kept, give_back


def forked_error(owner: str, pid: int) -> RuntimeError:
    return RuntimeError(
        f"this {owner} was opened in process {pid}, and this is process {os.getpid()} (a fork() child): "
        f"its rings, epoll and wake-up eventfd are shared with the parent. Open a new {owner} in the child; "
        "close() here releases only the child's copies of the descriptors"
    )


class Poller:
    """An epoll set with a wake-up eventfd, a consumer lock, and asyncio waiting."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self.pid = os.getpid()
        # The consumer lock: an RLock, as it knows its owner thread (see consuming() and close()).
        self._lock = threading.RLock()
        # Guards _closing and _waiting (threads in epoll, by thread id). A C lock, whose ``with`` is
        # safe against Ctrl-C (a Condition's __enter__ is Python code: an interrupt landing in it
        # would leave the lock held), reentrant for a close() from a signal handler that
        # interrupted this thread while it held it; close() waits for the waiters on _left.
        self._state = threading.RLock()
        self._left = threading.Condition(self._state)
        self._closing = False
        self._waiting: dict[int, int] = {}
        # Per event loop: the fd its reader watches, and the waiters that reader wakes.
        self._async_waiters: dict[asyncio.AbstractEventLoop, tuple[int, set[asyncio.Future[None]]]] = {}
        self._epoll: select.epoll | None = select.epoll()
        try:
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except BaseException:
            self._epoll.close()
            raise
        self._epoll.register(self._wake_fd, select.EPOLLIN)

    def register(self, fd: int, events: int = select.EPOLLIN) -> None:
        """Watch ``fd`` for ``events``; by default EPOLLIN, level-triggered: data left after a poll
        is reported again."""
        self.check_open().register(fd, events)

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd`` (a corrupt ring, until it is resynced)."""
        self.check_open().unregister(fd)

    def check_open(self) -> select.epoll:
        if self._epoll is None or self._closing:
            raise ValueError(f"{self._owner} is closed")
        if os.getpid() != self.pid:
            raise forked_error(self._owner, self.pid)
        return self._epoll

    @property
    def forked(self) -> bool:
        """True in a fork() child of the process that made this Poller."""
        return os.getpid() != self.pid

    @property
    def closed(self) -> bool:
        return self._epoll is None

    @property
    def closing(self) -> bool:
        return self._closing

    def fileno(self) -> int:
        return self.check_open().fileno()

    def consuming(self) -> contextlib.AbstractContextManager[Any]:
        """The consumer lock, for ``with``: one consumer call at a time.

        A consumer call from the thread already inside one (from a callback, or inside a batch()
        block) would walk records its caller is walking: refused. Only the thread that took the
        lock can release it: leave a batch() block in the thread that entered it. The lock's own
        ``with`` costs a fraction of a generator-based context manager, and takes the lock
        signal-safely.
        """
        if os.getpid() != self.pid:
            raise forked_error(self._owner, self.pid)
        if self._lock._is_owned():  # type: ignore[attr-defined]
            raise RuntimeError(
                f"{self._owner}: this thread is already consuming (in a callback or a batch() block); "
                "poll, consume and batches do not nest"
            )
        return self._lock

    def wait(self, timeout_ms: int) -> list[int]:
        """The fds epoll reports ready within ``timeout_ms`` (-1: forever); called outside
        consuming(), so a blocked wait delays no consumer. close() wakes it (and returns [])."""
        me = threading.get_ident()
        counted = False
        try:
            with self._state:
                epoll = self.check_open()
                self._waiting[me] = self._waiting.get(me, 0) + 1
                counted = True  # no signal check between these two lines and the try's finally
            try:
                ready = epoll.poll(-1 if timeout_ms < 0 else timeout_ms / 1000)
            except (OSError, ValueError):
                if self._closing:  # closed by a signal handler that interrupted this wait
                    return []
                raise
        finally:
            if counted:
                with self._state:
                    if self._waiting[me] == 1:
                        del self._waiting[me]
                    else:
                        self._waiting[me] -= 1
                    self._left.notify_all()
        return [] if self._closing else [fd for fd, _ in ready if fd != self._wake_fd]

    def close(self, release: Callable[[], None], release_in_child: Callable[[], None] | None = None) -> None:
        """Run ``release()`` under the consumer lock and close the epoll; idempotent.

        A poll() blocked in another thread is woken first (and left before the epoll closes),
        and asyncio waiters end. In a fork() child, ``release_in_child()`` runs instead, no lock
        is taken and nothing shared is touched: only the child's descriptors close.
        """
        if os.getpid() != self.pid:
            self._close_in_child(release_in_child or release)
            return
        with self._state:  # two close() calls at once: one closes, the other returns
            if self._epoll is None or self._closing:
                return
            if self._lock._is_owned():  # type: ignore[attr-defined]
                raise RuntimeError(f"{self._owner}.close() called from its own callback: return a negative value to stop")
            self._closing = True
            os.eventfd_write(self._wake_fd, 1)  # level-triggered: every wait returns, now and later
            # Every other thread leaves epoll before it closes; this one may be waiting too (close()
            # from a signal handler that interrupted its own wait): its wait then returns [].
            me = threading.get_ident()
            self._left.wait_for(lambda: not any(t != me for t in self._waiting))
        self._end_async_waits()
        with self._lock:
            try:
                release()
            finally:
                epoll, self._epoll = self._epoll, None
                epoll.close()
                os.close(self._wake_fd)

    def _close_in_child(self, release: Callable[[], None]) -> None:
        if self._epoll is None:
            return
        epoll, self._epoll = self._epoll, None
        self._closing = True
        try:
            release()
        finally:
            epoll.close()
            os.close(self._wake_fd)

    async def drain(self, kept: Kept, refill: Callable[[], None], interval: float | None) -> AsyncIterator[Any]:
        """Yield the records ``kept`` holds one by one, ``refill()`` putting more there when it is
        empty, waiting when it stays empty; ends when the buffer is closed.

        A record leaves ``kept`` only as it is yielded, so a cancelled iteration loses nothing: the
        next iteration or batch call returns the rest.
        """
        self.consuming()  # refused at once in a fork() child, or nested in a consumer call
        lent: Any = None
        while True:
            if lent is not None and not kept.holding:
                # Without the lock: the test, the peek and the delete are one step (no call
                # between them, so no other thread and no signal comes in between); batch calls
                # take from a lent deque the same way (Kept.lend). While one holds records that
                # may go back in front (kept.holding), it waits below instead.
                try:
                    record = lent[0]
                    del lent[0]
                except IndexError:
                    lent = None
                else:
                    yield record
                    continue
            with self.consuming():  # (takes no record: a Ctrl-C at its release loses none)
                held = bool(kept.holding)
                if not held:
                    lent = kept.lend()
                    if lent is None and not (self.closed or self._closing):
                        refill()
                        lent = kept.lend()
            if held:
                # A batch call in another thread has left the lock, its records not yet with its
                # caller: they may still go back in front (a Ctrl-C). A few bytecodes, unless
                # they do: wait for them, without spinning on the lock.
                time.sleep(0.0005)
                continue
            if lent is None:
                if self.closed or self._closing:  # closed (maybe from another thread): the end
                    return
                await self.wait_readable(interval)

    async def batches(
        self, take: Callable[[], Any], empty: Callable[[Any], bool], interval: float | None, kept: Kept
    ) -> AsyncIterator[Any]:
        """Yield each batch ``take()`` returns (with its runs, see ``handed()``) that is not
        ``empty``, waiting between them; nothing is taken while waiting, so cancelling loses
        nothing. A Ctrl-C that lands between the take and the yield (``empty()`` is a call: a
        signal check) puts the batch back in ``kept`` (as ``handed()`` does) for the next call."""
        me = threading.get_ident()
        while not (self.closed or self._closing):
            batch = NOTHING
            try:
                batch, runs = take()  # (handed(hold=True): iterations wait until it is cleared here)
                nothing = empty(batch)
                if me in kept.holding:
                    del kept.holding[me]  # (no call from here to the yield: no signal check)
            except BaseException as exc:
                if batch is not NOTHING:
                    give_back(self._lock, kept, batch, runs, me)
                elif me in kept.holding:
                    del kept.holding[me]
                if batch is NOTHING and isinstance(exc, ValueError) and (self.closed or self._closing):
                    return  # closed from another thread between the check and take(): the end
                raise
            if not nothing:
                yield batch
            else:
                await self.wait_readable(interval)

    def _end_async_waits(self) -> None:
        """Wake every asyncio wait; on its loop's thread, unregister the fd before it is closed."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop in list(self._async_waiters):
            if loop is running:
                self._readable(loop)
            elif loop.is_closed():  # nothing runs there any more: nothing to wake or unregister
                self._async_waiters.pop(loop, None)
            else:  # another thread's loop: it unregisters there
                try:
                    loop.call_soon_threadsafe(self._readable, loop)
                except RuntimeError:  # closed meanwhile
                    self._async_waiters.pop(loop, None)

    def _readable(self, loop: asyncio.AbstractEventLoop) -> None:
        """The epoll fd is readable (or closing): wake every waiter of ``loop``; each one looks."""
        entry = self._async_waiters.pop(loop, None)
        if entry is not None:
            fd, waiters = entry
            loop.remove_reader(fd)
            for waiter in waiters:
                _resolve(waiter)

    async def wait_readable(self, interval: float | None) -> None:
        """Wait on the event loop until the epoll fd is readable, ``interval`` seconds pass, or close().

        An event loop has one reader per fd, so the waiters of a loop share one: it wakes them all.
        """
        loop = asyncio.get_running_loop()
        try:
            fd = self.fileno()
        except ValueError:
            if self.closed or self._closing:
                return  # closed meanwhile: the caller's loop sees it and ends
            raise
        waiter: asyncio.Future[None] = loop.create_future()
        entry = self._async_waiters.get(loop)
        if entry is None:
            entry = self._async_waiters[loop] = (fd, set())
            loop.add_reader(fd, self._readable, loop)
        entry[1].add(waiter)
        # The interval is a timer that resolves the waiter, not asyncio.wait_for: in Python 3.11
        # wait_for swallows a cancellation that arrives while its inner wait completes.
        timer = None if interval is None else loop.call_later(interval, _resolve, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            entry[1].discard(waiter)
            if not entry[1] and self._async_waiters.get(loop) is entry:  # the last waiter leaves
                del self._async_waiters[loop]
                loop.remove_reader(fd)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)

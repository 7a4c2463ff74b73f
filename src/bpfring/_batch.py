"""Batches: numpy dtypes for ring records, the memory batch results live on, and the records a
batch call or an async iteration took but has not returned or yielded yet (Ctrl-C, a corrupt
ring among healthy ones, a cancelled task), kept for the next call (Kept). Shared by RingBuffer and
PerfBuffer."""

from __future__ import annotations

import collections
import itertools
import os
import sys
import threading
import warnings
import weakref
from typing import Any, Callable

from ._protocol import _fastring
from .errors import RecordSizeError

DTypeLike = Any  # numpy.typing.DTypeLike, without importing numpy for everyone


def numpy_module() -> Any:
    import numpy

    return numpy


def record_dtype(np: Any, dtype: DTypeLike) -> Any:
    """``dtype`` as a numpy dtype that raw ring bytes can be read as: no Python objects in it."""
    dt = np.dtype(dtype)
    if dt.hasobject:
        # Ring bytes copied into an object array would be taken for PyObject pointers.
        raise TypeError(f"dtype {dt} holds Python objects: ring records can only be read as plain data")
    if dt.itemsize == 0:
        raise ValueError(f"dtype {dt} has no size: a record of 0 bytes cannot be read as it")
    return dt


NO_LIMIT = sys.maxsize
LONG_MIN = -(1 << 63)  # a callback's negative return beyond 64 bits stops as this (as in the C walks)


def new_records(np: Any, dt: Any, n: int) -> Any:
    """An uninitialized array for ``n`` records of ``dt``; a large one on memory that is reused
    once its arrays are gone (fresh pages fault on first write, which costs as much as the copy)."""
    nbytes = n * dt.itemsize
    if nbytes >= _fastring.LARGE_BATCH_BYTES:
        return np.frombuffer(_fastring.batch_block(nbytes), dtype=dt, count=n)
    return np.empty(n, dtype=dt)


def batch_dtype(dtype: DTypeLike, limit: int, out: Any) -> tuple[Any, Any, int]:
    """numpy, ``dtype`` as a numpy dtype and the record limit of a batch with a dtype: ``out``
    (when given) checked and bounding the limit."""
    np = numpy_module()
    dt = record_dtype(np, dtype)
    if out is not None:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a numpy array of {dt}, got {type(out).__name__}")
        if out.dtype != dt or out.ndim != 1 or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"out must be a writable contiguous 1-d array of {dt}, got {out.dtype} {out.shape}")
        if not len(out):  # (a call that can take nothing would return [] with records waiting)
            raise ValueError(f"out has room for no record (shape {out.shape}): give it at least 1 element")
        limit = min(limit, len(out))
    return np, dt, limit


def release_batch_memory() -> int:
    """Unmap the memory kept from the last large batch freed (see :meth:`Ring.consume_batch`);
    returns the bytes unmapped."""
    return _fastring.release_batch_memory()


# Records an async iteration takes from a ring at a time: under sustained load its queue (and
# the delay of the records in it) stays bounded; the rest waits in the ring.
ASYNC_REFILL = 4096


NOTHING = object()  # handed(): nothing handed over yet
ANY = object()  # Kept's ``only``: the records of every ring
CHUNK = ASYNC_REFILL  # kept records at most turned into rows at a time (see Kept._rows_at)


class Kept:
    """The records a consumer took from its rings but has not handed to its caller yet.

    One per consumer (a Ring used on its own, a RingBuffer with its Rings, a PerfBuffer), shared
    by all its calls, so a record taken by one is handed over by whichever comes next:

    - Python raises KeyboardInterrupt between bytecodes, so a call interrupted after records left
      a ring would lose them; the C walks put each record here as it leaves the ring;
    - a call that meets a corrupt ring raises after the healthy rings were read;
    - an async iteration that is cancelled still holds records it has not yielded.

    Each part holds the records of one ring and says which (its tag: the Ring, or a perf ring's
    CPU), so every call hands over what is kept of a ring before it takes from that ring, and
    each ring's records keep their order: batch calls and iterations take what is kept first (and
    nothing new while something is); callbacks get the kept records of their ring first
    (:meth:`deliver`); a Ring of a RingBuffer used directly hands over its own first (``only``);
    the zero-copy batch() refuses while its ring has some, and close() warns what it drops. Every
    change that hands records over is one store, with no signal check between it and the return
    (or the callback's entry): a Ctrl-C lands either before it (the records stay) or after the
    caller has them.

    Parts, oldest first, as ``(tag, part)``: deques of rows that the walks append to (``bytes``,
    or ``(cpu, bytes)`` with ``per_cpu``), whole arrays, and at most one array that a C take is
    filling, with the list it appends its counts to (an int, or ``(cpu, samples, lost)`` per perf
    ring). ``slack``: the bytes a record may have beyond its dtype (a perf sample's padding to 8
    bytes, dropped).

    The first part (made a deque of rows if it is not) may be lent to async iterations
    (:meth:`lend`): they take its records one at a time without the consumer lock, each with
    ``d[0]`` then ``del d[0]`` (no call between the two, so no other thread and no signal can
    come between), and so does everyone else while it is lent. While a batch call holds records
    that may go back in front (``holding``, the threads of such calls, see :func:`handed`: rows
    of the lent deque that do not fit the dtype, or any records a Ctrl-C stops before they reach
    the caller), iterations take nothing, from the deque or the rings: one that took a newer
    record meanwhile would yield it before the older ones.
    """

    def __init__(self, *, per_cpu: bool = False, slack: int = 0) -> None:
        self._parts: collections.deque[tuple[Any, Any]] = collections.deque()
        self._filling: tuple[Any, list[Any], Any] | None = None
        self._lent: collections.deque[Any] | None = None
        # Set under the consumer lock, cleared by the call's thread with no call between its
        # test and its store (no switch point): see the class and handed().
        self.holding: dict[int, bool] = {}
        self._per_cpu = per_cpu
        self._slack = slack
        _every_kept.add(self)

    def __len__(self) -> int:
        return sum(len(part) for _, part in tuple(self._parts))  # (a snapshot: safe outside the lock)

    def __bool__(self) -> bool:
        for _, part in tuple(self._parts):
            if len(part):
                return True
        return False

    def has(self, tag: Any) -> bool:
        """Records of ring ``tag`` are kept."""
        for t, part in tuple(self._parts):
            if len(part) and t == tag:
                return True
        return False

    def count(self, tag: Any) -> int:
        """How many records of ring ``tag`` are kept."""
        return sum(len(part) for t, part in tuple(self._parts) if t == tag)

    def waiting(self) -> bool:
        """Records are kept, or an interrupted take left some in its array: a poll() has records
        to deliver without waiting."""
        return bool(self) or self._filling is not None

    def warn_dropped(self, what: str) -> None:
        """At close(): say how many records were taken and never handed over (they go with it)."""
        filling = self._filling
        n = len(self) + (self._count(filling[1]) if filling is not None else 0)
        if n:
            warnings.warn(
                f"closing this {what} drops {n} records it took from its rings and never handed over "
                "(an async iteration left early, or a batch call interrupted): no consumer will see "
                "them; take them with consume_batch() before close()",
                RuntimeWarning,
                stacklevel=3,
            )

    def drop(self) -> None:
        """At close(), after :meth:`warn_dropped`: forget every kept record, those of the lent
        deque too (emptied in place: an iteration paused on it ends, rather than yield records
        close() said no consumer would see)."""
        lent = self._lent
        self._parts, self._filling, self._lent = collections.deque(), None, None
        self.holding.clear()  # (a fork() child: the parent's threads' calls)
        if lent is not None:
            lent.clear()

    def drop_ring(self, tag: Any) -> int:
        """Forget the records kept of ring ``tag`` (it closed on its own); returns how many. Its
        deques are emptied in place: a delivery or an iteration holding one takes no more."""
        self.settle()
        n = self.count(tag)
        mine = [part for t, part in self._parts if t == tag]
        self._parts = collections.deque((t, part) for t, part in self._parts if t != tag)
        for part in mine:
            if type(part) is collections.deque:
                part.clear()
        if self._lent is not None and any(part is self._lent for part in mine):
            self._lent = None
        return n

    # -- taking -----------------------------------------------------------------------------------

    def rows(self, tag: Any) -> collections.deque[Any]:
        """The deque to append rows taken from ring ``tag`` to (a walk's callback or ``into``):
        kept as it grows."""
        parts = self._parts
        if parts:
            last_tag, last = parts[-1]
            if type(last) is collections.deque and last_tag == tag and last is not self._lent:
                return last
        part: collections.deque[Any] = collections.deque()
        parts.append((tag, part))
        return part

    def filling(self, records: Any, counts: list[Any], tag: Any = None) -> None:
        """``records`` is being filled from ring ``tag`` (perf: the CPUs in ``counts``) by a C take
        that appends its counts to ``counts``; until :meth:`filled` or :meth:`keep_filled`, what
        it filled is kept."""
        self._filling = (records, counts, tag)

    def filled(self) -> None:
        """The array being filled is the caller's now (it returns it next, with no signal check)."""
        self._filling = None

    def keep_filled(self) -> int:
        """Keep what the array being filled holds, as a part; returns how many records that is."""
        if self._filling is None:
            return 0  # (the ring had nothing: no array was made)
        records, counts, tag = self._filling
        n = self._count(counts)
        parts = collections.deque(self._parts)
        parts.append((tag, records[:n]))
        self._parts, self._filling = parts, None  # one step: kept once, never twice
        return n

    def settle(self) -> list[Any]:
        """Keep, as rows, what an interrupted C take had filled. Returns its perf counts that still
        have lost samples to report; they stay here until :meth:`filled`, so a report interrupted
        in its turn is made by the next call."""
        if self._filling is None:
            return []
        records, counts, tag = self._filling
        # (Only parts with records: a take that raised before taking any, retried in a loop, would
        # add an empty part a call, and every later call would walk them all.)
        parts = collections.deque((t, part) for t, part in self._parts if len(part))
        at = 0
        for count in counts:
            n = count[1] if self._per_cpu else count
            if n and self._per_cpu:
                cpu = count[0]
                parts.append((cpu, collections.deque((cpu, data) for data in _as_bytes(records[at : at + n]))))
            elif n:
                parts.append((tag, collections.deque(_as_bytes(records[at : at + n]))))
            at += n
        unreported = [(cpu, 0, lost) for cpu, _, lost in counts if lost] if self._per_cpu else []
        self._parts, self._filling = parts, ((records[:0], unreported, tag) if unreported else None)
        return unreported

    def put_back(self, rows: Any, runs: Any) -> None:
        """Rows handed over but stopped on their way to the caller (see :func:`handed`), first in
        line again: ``runs``, ``(tag, count)`` for each run of rows of one ring (perf: None, the
        rows name their CPU)."""
        rows = list(rows)
        if self._per_cpu:
            groups = [(cpu, list(run)) for cpu, run in itertools.groupby(rows, key=lambda row: row[0])]
        else:
            groups, at = [], 0
            for tag, n in runs:
                if rows[at : at + n]:
                    groups.append((tag, rows[at : at + n]))
                at += n
        # The rows of the lent deque's ring go back into it, wherever it is (an iteration takes
        # from it, without the lock, before it looks at the parts again; it is the first part of
        # its ring); the others first in line, as parts of their own.
        lent = self._lent
        lent_tag = next((tag for tag, part in self._parts if part is lent), NOTHING)
        into_lent = [row for tag, run in groups if tag == lent_tag for row in run][::-1]
        parts = collections.deque(self._parts)
        parts.extendleft([(tag, collections.deque(run)) for tag, run in groups[::-1] if tag != lent_tag])
        self._parts = parts
        if into_lent:
            lent.extendleft(into_lent)  # (no signal check since the store above)

    def as_rows(self, result: Any) -> list[Any]:
        """A :meth:`hand_over` result (``with_cpus`` for a perf buffer) as rows again."""
        if self._per_cpu:
            cpus, records = result
            return list(zip((int(cpu) for cpu in cpus), _record_bytes(records)))
        return _record_bytes(result)

    def _count(self, counts: list[Any]) -> int:
        return sum(count[1] for count in counts) if self._per_cpu else sum(counts)

    # -- handing over -----------------------------------------------------------------------------

    def _first(self) -> tuple[Any, Any] | None:
        """The first part with records in it, as ``(tag, part)`` (the empty ones before it
        dropped), or None."""
        parts = self._parts
        while parts and not len(parts[0][1]):
            parts.popleft()
        return parts[0] if parts else None

    def _rows_at(self, only: Any) -> tuple[Any, collections.deque[Any]] | None:
        """The first part with records (of ring ``only``, unless ANY) as ``(tag, deque)``: an
        array or the rest of a part is turned into a deque of rows first (up to CHUNK records, in
        one store). None if there is none."""
        first = self._first()
        if first is None:
            return None
        for i, (tag, part) in enumerate(self._parts):
            if not len(part) or (only is not ANY and tag != only):
                continue
            if type(part) is collections.deque:
                return tag, part
            k = min(len(part), CHUNK)
            rows = collections.deque(self._rows_of(tag, part, k))
            parts = collections.deque(self._parts)
            parts[i] = (tag, rows)
            if k < len(part):
                parts.insert(i + 1, (tag, _rest_of(part, k)))
            self._parts = parts
            return tag, rows
        return None

    def _rows_of(self, tag: Any, part: Any, k: int) -> list[Any]:
        """The first ``k`` records of a part (not a deque) as rows."""
        if isinstance(part, _Rest):
            return part.rows[part.at : part.at + k]
        if self._per_cpu:  # (never an array today: a perf take's array is settled as rows)
            return [(tag, data) for data in _as_bytes(part[:k])]
        return _as_bytes(part[:k])

    def lend(self) -> collections.deque[Any] | None:
        """The first part with records, as a deque of rows, lent to an async iteration that takes
        from it without the lock (see the class); None if nothing is kept. Call under the
        consumer lock.

        The lent deque stays lent while it has records (a part put back in front of it does not
        take its place): another iteration may hold it, and it must stay the one everybody takes
        from in place. Once empty, it leaves the parts, so no walk appends to it."""
        lent = self._lent
        if lent is not None:
            if len(lent):
                return lent
            self._parts = collections.deque((t, p) for t, p in self._parts if p is not lent)
            self._lent = None
        first = self._rows_at(ANY)
        if first is None:
            return None
        self._lent = first[1]
        return first[1]

    def deliver(self, callback_of: Callable[[Any], Callable[..., Any]], limit: int, only: Any = ANY) -> int:
        """Kept records (of ring ``only``, unless ANY), oldest first, up to ``limit``, each to the
        callback ``callback_of(tag)`` names for its ring (which raises if there is none, before
        that record leaves); perf rows go as ``callback(cpu, data)``. Returns how many, or a
        callback's negative return (that record counts as delivered). An exception from a
        callback propagates; its record counts as delivered, the rest stay. Call under the
        consumer lock."""
        n = 0
        while n < limit:
            first = self._rows_at(only)
            if first is None:
                break
            tag, part = first
            callback = callback_of(tag)
            while n < limit:
                try:
                    row = part[0]
                    del part[0]
                except IndexError:  # (a lent deque, emptied by an iteration in another thread)
                    break
                # No signal check from the del to the callback's entry: once it is entered, the
                # record is delivered (as the C walk delivers it).
                ret = callback(*row) if self._per_cpu else callback(row)
                n += 1
                if type(ret) is not bool and isinstance(ret, int) and ret < 0:
                    return max(ret, LONG_MIN)
        return n

    def hand_over(
        self, dt: Any, limit: int, out: Any = None, with_cpus: bool = False, only: Any = ANY
    ) -> tuple[Any, list[tuple[Any, int]]]:
        """Up to ``limit`` kept records (of ring ``only``, unless ANY), oldest first, removed from
        here: as a list of ``bytes`` (``dt`` None) or an array of ``dt`` (into ``out`` if given);
        with ``with_cpus`` (perf) as ``(cpus, records)``. Returned with their runs, ``(tag,
        count)`` for each run of one ring's records (for :meth:`put_back`). A record that does not
        fit ``dt`` raises RecordSizeError and nothing is removed."""
        rest: collections.deque[tuple[Any, Any]] = collections.deque()
        pieces: list[tuple[Any, int]] = []
        runs: list[tuple[Any, int]] = []
        have = 0
        lent = self._lent
        # Rows taken from deques in place, one at a time (an iteration may hold the lent one), with
        # their deque, to go back where they were if the call fails. (Copying the rest of a deque
        # cost its length a call: callbacks and batch calls taking a few records in turn copied
        # a chunk back and forth each time.)
        from_deques: list[tuple[collections.deque[Any], list[Any]]] = []
        try:
            for tag, part in tuple(self._parts):
                if have >= limit or (only is not ANY and tag != only) or not len(part):
                    if len(part):
                        rest.append((tag, part))
                    continue
                if type(part) is collections.deque:
                    taken: list[Any] = []
                    from_deques.append((part, taken))
                    while have + len(taken) < limit:
                        try:
                            row = part[0]
                            del part[0]
                        except IndexError:
                            break
                        taken.append(row)
                    if taken:
                        pieces.append((taken, len(taken)))
                        runs.append((tag, len(taken)))
                        have += len(taken)
                    if part is lent or len(part):
                        rest.append((tag, part))  # (an iteration may hold the lent one: it stays, maybe empty)
                    continue
                k = min(len(part), limit - have)
                if k < len(part):  # the rest of this part stays first in line
                    rest.append((tag, _rest_of(part, k)))
                pieces.append((part, k))
                runs.append((tag, k))
                have += k
            result = self._build(dt, pieces, out, with_cpus)
        except BaseException:
            for part, taken in from_deques:
                if taken:
                    part.extendleft(taken[::-1])  # back where they were, in one step
            raise
        self._parts = rest  # no signal check from here to the caller's return
        return result, runs

    def _build(self, dt: Any, pieces: list[tuple[Any, int]], out: Any, with_cpus: bool) -> Any:
        """The records of ``pieces`` (a part and how many of its first records) as hand_over returns them."""
        np = None if dt is None else numpy_module()
        if np is not None and not self._per_cpu and not [p for p, _ in pieces if not _is_array_of(p, dt)]:
            if len(pieces) == 1 and out is None:
                return pieces[0][0][: pieces[0][1]]  # an array the ring's take made: the caller's now
            records = np.concatenate([p[:k] for p, k in pieces]) if pieces else np.empty(0, dtype=dt)
        else:
            rows: list[Any] = []
            for part, k in pieces:
                if type(part) is collections.deque or type(part) is list:
                    rows.extend(itertools.islice(part, k))
                elif isinstance(part, _Rest):
                    rows.extend(part.rows[part.at : part.at + k])
                else:
                    rows.extend(_as_bytes(part[:k]))
            if self._per_cpu:
                cpus = [cpu for cpu, _ in rows]
                rows = [data for _, data in rows]
            if np is None:
                return (cpus, rows) if with_cpus else rows
            size = dt.itemsize
            misfits = [len(r) for r in rows if not size <= len(r) <= size + self._slack]
            if misfits:
                raise RecordSizeError(
                    f"a record an earlier call took is {misfits[0]} bytes, dtype {dt} expects {size}: "
                    "read it with consume_batch() without a dtype"
                )
            if self._slack:
                rows = [r[:size] for r in rows]  # the kernel's padding, dropped
            records = np.frombuffer(b"".join(rows), dtype=dt).copy() if rows else np.empty(0, dtype=dt)
        if out is not None:
            out[: len(records)] = records
            records = out[: len(records)]
        if with_cpus:
            return np.array(cpus, dtype=np.int32), records
        return records


# Every Kept of this process: a fork() child forgets what they hold (see _forget_in_child).
_every_kept: weakref.WeakSet[Kept] = weakref.WeakSet()


def _forget_in_child() -> None:
    """The records kept are the parent's to hand over: in a fork() child every consumer call is
    refused, but an iteration paused on a lent deque takes from it without a call that checks
    (the child yielded the parent's records too). Emptied here, it asks, and is refused."""
    for kept in list(_every_kept):
        kept.drop()


os.register_at_fork(after_in_child=_forget_in_child)


def kept_first(n: int, limit: int, walk: Callable[[int], int]) -> int:
    """What a call that delivers kept records first returns: ``n`` kept records delivered (or a
    callback's negative return, which stops there), then ``walk(limit - n)`` over the ring(s)
    unless ``limit`` is reached."""
    if n < 0 or n >= limit:
        return n
    more = walk(limit - n)
    return more if more < 0 else n + more


def handed(lock: Any, kept: Kept, take: Callable[[], tuple[Any, Any]], hold: bool = False) -> tuple[Any, Any]:
    """``take()`` under ``lock`` (a consumer call that hands records over): its result and the
    runs of rings in it (see :meth:`Kept.hand_over`), returned.

    Python checks for signals when the lock's ``__exit__`` returns, after the records have left
    ``kept`` and the ring: a Ctrl-C landing there would lose them. They are put back instead, first
    in line for the next call. (From here to the caller, no further check: a Python function's
    return has none.) Until the records are the caller's, or back, iterations wait
    (``Kept.holding``); ``hold``: the caller (Poller.batches) clears it itself, once it has them.
    """
    me = threading.get_ident()
    result = NOTHING
    try:
        with lock:
            kept.holding[me] = True  # (iterations take nothing until it is cleared)
            result, runs = take()
        if not hold and me in kept.holding:
            del kept.holding[me]  # (no call from here to the caller's return: no signal check)
        return result, runs
    except BaseException:
        if result is not NOTHING:
            give_back(lock, kept, result, runs, me)
        elif me in kept.holding:
            del kept.holding[me]
        raise


def give_back(lock: Any, kept: Kept, result: Any, runs: Any, me: int) -> None:
    """Put ``result``, handed over by a call in thread ``me`` but stopped on its way to the
    caller, back in ``kept``; the iterations that wait for it (``Kept.holding``, still set) go on
    once it is back."""
    try:
        with lock:
            kept.put_back(kept.as_rows(result), runs)
    finally:
        if me in kept.holding:
            del kept.holding[me]


def _record_bytes(records: Any) -> list[bytes]:
    return list(records) if isinstance(records, list) else _as_bytes(records)


def _is_array_of(part: Any, dt: Any) -> bool:
    return type(part) not in (collections.deque, list, _Rest) and part.dtype == dt


class _Rest:
    """What is left of a part of rows after its first ones were handed over: a list and where
    the rest starts. Handing over a few rows at a time from a large part then costs what they
    cost, where copying the rest each time (a deque has no slices) cost its length: quadratic."""

    __slots__ = ("rows", "at")

    def __init__(self, rows: list[Any], at: int) -> None:
        self.rows = rows
        self.at = at

    def __len__(self) -> int:
        return len(self.rows) - self.at


def _rest_of(part: Any, k: int) -> Any:
    """``part`` without its first ``k`` records."""
    if isinstance(part, collections.deque):
        return _Rest(list(part), k)  # (the one copy)
    if isinstance(part, _Rest):
        return _Rest(part.rows, part.at + k)
    return part[k:]


def _as_bytes(array: Any) -> list[bytes]:
    """Each record of ``array`` as ``bytes``."""
    np = numpy_module()
    return [row.tobytes() for row in array.view(np.dtype((np.void, array.dtype.itemsize)))]


def check_positive_int(name: str, value: int) -> int:
    """``value`` if it is an int of at least 1; else a TypeError or ValueError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def check_limit(max_records: int) -> int:
    return check_positive_int("max_records", max_records)

"""Batches: numpy dtypes for ring records, the memory batch results live on, and the records a
batch call took but could not return yet (Ctrl-C, a corrupt ring among healthy ones), kept for
the next call. Shared by RingBuffer and PerfBuffer."""

from __future__ import annotations

import sys
from typing import Any

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
        limit = min(limit, len(out))
    return np, dt, limit


def release_batch_memory() -> int:
    """Unmap the memory kept from the last large batch freed (see :meth:`Ring.consume_batch`);
    returns the bytes unmapped."""
    return _fastring.release_batch_memory()


# Records an async iteration takes from a ring at a time: under sustained load its queue (and
# the delay of the records in it) stays bounded; the rest waits in the ring.
ASYNC_REFILL = 4096


class Taken:
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
            np = numpy_module()
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


def check_positive_int(name: str, value: int) -> int:
    """``value`` if it is an int of at least 1; else a TypeError or ValueError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def check_limit(max_records: int) -> int:
    return check_positive_int("max_records", max_records)


def join_parts(np: Any, dt: Any, parts: list[Any]) -> Any:
    """The records of several batch parts (lists of bytes or arrays) as one list (``dt`` None) or
    one array of ``dt``."""
    if dt is None:
        return [bytes(r) for part in parts for r in (part if isinstance(part, list) else rows(np, part))]
    if all(not isinstance(part, list) and part.dtype == dt for part in parts):
        return np.concatenate(parts) if parts else np.empty(0, dtype=dt)
    rows = [r for part in parts for r in (part if isinstance(part, list) else rows(np, part))]
    misfit = next((len(r) for r in rows if len(r) != dt.itemsize), None)
    if misfit is not None:
        raise RecordSizeError(
            f"a record an earlier batch took is {misfit} bytes, dtype {dt} expects {dt.itemsize}: "
            "read it with consume_batch() without a dtype"
        )
    return np.frombuffer(b"".join(rows), dtype=dt).copy()


def rows(np: Any, array: Any) -> list[bytes]:
    return [row.tobytes() for row in array.view(np.dtype((np.void, array.dtype.itemsize)))]

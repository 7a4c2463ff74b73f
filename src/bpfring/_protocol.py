"""The shared-memory pieces every ring shares: the protocol's constants, the mapping of a ring
map, and the C states (bpfring._fastring) that do every load and store on shared pages.

The constants are named once, in _fastring.c next to the kernel header they come from, and
exported from there; sizes and positions are checked in C before any byte is read.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

from .errors import RingCorruptError
from .maps import PAGE_SIZE, Map, check_ring_size

try:
    from . import _fastring
except ImportError as exc:  # pragma: no cover - a broken install
    raise ImportError(
        "bpfring's C extension (bpfring._fastring) is missing: reinstall bpfring with a C compiler and "
        "Python's headers present (Debian: gcc python3-dev)"
    ) from exc

BPF_RINGBUF_BUSY_BIT: int = _fastring.BPF_RINGBUF_BUSY_BIT
BPF_RINGBUF_DISCARD_BIT: int = _fastring.BPF_RINGBUF_DISCARD_BIT
BPF_RINGBUF_HDR_SZ: int = _fastring.BPF_RINGBUF_HDR_SZ

# Flags a BPF program passes to bpf_ringbuf_output/submit/discard (include/uapi/linux/bpf.h).
BPF_RB_NO_WAKEUP = 1
BPF_RB_FORCE_WAKEUP = 2


def roundup_len(length: int) -> int:
    """Bytes a record of ``length`` occupies in the ring: the header, then the data, 8-aligned."""
    return (length + BPF_RINGBUF_HDR_SZ + 7) & ~7


class Corrupt:
    """Builds the RingCorruptError of one ring for the C walk (which knows only the values).

    Holds names, not the ring object: the C state keeps a reference to it, and a cycle through a
    C type without GC support would never be collected.
    """

    __slots__ = ("map_name", "map_id", "ring", "cpu")

    def __init__(self, m: Map, ring: int | None = None, cpu: int | None = None) -> None:
        self.map_name, self.map_id, self.ring, self.cpu = m.name, m.id, ring, cpu

    def __call__(self, detail: str, values: dict[str, int]) -> RingCorruptError:
        return RingCorruptError(
            detail, map_name=self.map_name, map_id=self.map_id, ring=self.ring, cpu=self.cpu, values=values
        )


class MappedRing:
    """The two mappings of a ring map and the C state that reads and writes them.

    kernel/bpf/ringbuf.c: page 0 holds consumer_pos; from page 1, producer_pos and then the data
    area mapped twice back to back, so a record that wraps the end is contiguous. The side that
    advances a position maps its page read-write: the consumer page for a BPF_MAP_TYPE_RINGBUF
    (ringbuf_map_mmap_kern), the producer page and data for a USER_RINGBUF (ringbuf_map_mmap_user).
    """

    _map: Map
    _consumer_mm: mmap.mmap | None = None
    _producer_mm: mmap.mmap | None = None
    _state: Any = None  # _fastring.RingState or UserRingState
    _corrupt: Corrupt
    # The process that mapped the ring: a fork() child shares the mappings and must not use them.
    _pid: int = -1

    def _map_ring(self, user: bool, shared: bool = False) -> None:
        """Map ``self._map``; on failure nothing stays mapped (the caller closes the map).

        ``shared``: other consumers move consumer_pos too, so the walk does not take a move it
        did not make for corruption."""
        self._pid = os.getpid()
        self.size: int = self._map.max_entries
        check_ring_size(self.size)
        self._mask = self.size - 1
        self._corrupt = Corrupt(self._map)
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        try:
            self._consumer_mm = self._map.mmap(PAGE_SIZE, mmap.PROT_READ if user else rw, 0, "consumer page")
            self._producer_mm = self._map.mmap(
                PAGE_SIZE + 2 * self.size, rw if user else mmap.PROT_READ, PAGE_SIZE, "producer page and data"
            )
            if user:
                self._state = _fastring.UserRingState(self._consumer_mm, self._producer_mm, self.size, self._corrupt)
            else:
                self._state = _fastring.RingState(self._consumer_mm, self._producer_mm, self.size, self._corrupt, shared)
        except BaseException:
            self._unmap_ring()
            raise

    def _unmap_ring(self) -> None:
        """Let go of the mappings (RuntimeError, and nothing released, while a walk of this ring
        runs: a callback closing its own ring)."""
        if self._state is not None:
            self._state.release()
            self._state = None
        for name in ("_producer_mm", "_consumer_mm"):
            mm = getattr(self, name)
            if mm is not None:
                setattr(self, name, None)
                try:
                    mm.close()
                except BufferError:
                    pass  # a view handed out still points in: the mapping goes when it does

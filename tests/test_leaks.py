"""Leaks: thousands of open/close cycles of every class leave the process where it started.

Measured after a warm-up (so caches, allocator arenas and lazily built objects exist already):
- open fds (/proc/self/fd): exactly equal;
- mappings of BPF maps and perf events (anon_inode lines of /proc/self/maps): exactly equal;
- objects gc tracks: at most a few more (one leaked per cycle is CYCLES more);
- Python's allocations (tracemalloc) and malloc's bytes in use (glibc's mallinfo2: libbpf's
  allocations and Python's large ones): grown by less than 8 bytes a cycle, and never by 8 KiB,
  in each of two windows of that many cycles (the smaller counts: the allocator's one-off steps of
  8-9 KiB land in one window, a leak grows both). So over 1,000 cycles a leak of 8 bytes a cycle
  shows, and over the 50 object loads one of 164 bytes a load;
- VmRSS (/proc/self/status): within RSS_TOLERANCE, for leaked pages.
"""

from __future__ import annotations

import ctypes
import gc
import os
import tracemalloc
from typing import Callable

import pytest
from conftest import open_fds
from stress.harness import long_mode, report

import bpfring
from bpfring import Map, MapType, Object, PerfBuffer, RingBuffer, UserRingBuffer

CYCLES = int(os.environ.get("BPFRING_LEAK_CYCLES") or (10_000 if long_mode() else 1_000))
LOADS = CYCLES // 20  # loading an object runs the verifier: slower, fewer
WARMUP = 100
RSS_TOLERANCE = 4 << 20  # pages: a leaked mapping or a large leak; the byte counts below catch small ones


def leak_bound(cycles: int) -> int:
    """Growth allowed over ``cycles`` cycles, in bytes: PER_CYCLE each, at least FLOOR (allocator noise)."""
    return max(PER_CYCLE * cycles, FLOOR)


PER_CYCLE = 8
FLOOR = 8 << 10


def vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class _Mallinfo2(ctypes.Structure):
    """struct mallinfo2 of glibc's <malloc.h> (glibc 2.33+)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


_libc = ctypes.CDLL(None)
_mallinfo2 = getattr(_libc, "mallinfo2", None)
if _mallinfo2 is not None:
    _mallinfo2.restype = _Mallinfo2


def c_heap() -> int:
    """Bytes malloc() has handed out and not had back (libbpf's allocations, Python's big ones)."""
    if _mallinfo2 is None:
        return 0  # not glibc: RSS and tracemalloc still watch
    info = _mallinfo2()
    return info.uordblks + info.hblkhd


def kernel_mappings() -> int:
    """Mappings of BPF maps and perf events: a leaked ring shows here even if never touched."""
    with open("/proc/self/maps") as f:
        return sum("anon_inode:" in line for line in f)


def assert_no_leak(name: str, cycle: Callable[[], None], cycles: int = CYCLES) -> None:
    for _ in range(min(WARMUP, cycles)):
        cycle()
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(min(WARMUP, cycles)):  # tracemalloc's own tables warm up too
            cycle()
        gc.collect()
        fds, maps, rss, objects = open_fds(), kernel_mappings(), vm_rss(), len(gc.get_objects())
        # Two windows of ``cycles`` each, the smaller growth counted: a leak grows both, while the
        # allocator's one-off steps (a new arena, a table resized; 8-9 KiB seen here) land in one.
        py_grown = heap_grown = None
        for _ in range(2):
            heap, py = c_heap(), tracemalloc.get_traced_memory()[0]
            for _ in range(cycles):
                cycle()
            gc.collect()
            py_window, heap_window = tracemalloc.get_traced_memory()[0] - py, c_heap() - heap
            py_grown = py_window if py_grown is None else min(py_grown, py_window)
            heap_grown = heap_window if heap_grown is None else min(heap_grown, heap_window)
        objects_grown = len(gc.get_objects()) - objects
    finally:
        tracemalloc.stop()
    assert open_fds() == fds, f"{name}: fds leaked"
    assert kernel_mappings() == maps, f"{name}: mappings leaked"
    grown = vm_rss() - rss
    report(
        f"leaks: {name}",
        cycles=cycles,
        rss_growth_bytes=grown,
        python_growth_bytes=py_grown,
        c_heap_growth_bytes=heap_grown,
        objects_growth=objects_grown,
    )
    bound = leak_bound(cycles)
    assert objects_grown <= 10, f"{name}: {objects_grown} more objects tracked by gc after {cycles} cycles"
    assert py_grown < bound, f"{name}: Python memory grew by {py_grown} bytes over {cycles} cycles (bound {bound})"
    assert heap_grown < bound, f"{name}: malloc'd memory grew by {heap_grown} bytes over {cycles} cycles (bound {bound})"
    assert grown < RSS_TOLERANCE, f"{name}: RSS grew by {grown} bytes over {cycles} cycles"


def wrong_type(open_it: Callable[[], object]) -> Callable[[], None]:
    def cycle() -> None:
        with pytest.raises(ValueError, match="expected BPF_MAP_TYPE"):
            open_it()

    return cycle


def test_ring_buffers_opened_and_closed_many_times_leak_nothing(producer):
    other = Map.create(MapType.RINGBUF, 4096)

    def cycle() -> None:
        with RingBuffer(producer.ring, lambda d: None) as rb:
            rb.add(other, lambda d: None)
            rb.poll(0)

    def claimed() -> None:
        with pytest.raises(bpfring.BPFError, match="already consumed by a RingBuffer in this process"):
            RingBuffer(other, lambda d: None)

    with other:
        assert_no_leak("RingBuffer", cycle)
        with RingBuffer(other):
            assert_no_leak("RingBuffer refused: the ring is claimed", claimed)
    with Map.create(MapType.ARRAY, 1, 4, 4) as array:
        assert_no_leak("RingBuffer refused", wrong_type(lambda: RingBuffer(array, lambda d: None)))


def test_perf_buffers_opened_and_closed_many_times_leak_nothing(perf_producer):
    def cycle() -> None:
        with PerfBuffer(perf_producer.array, 1, lambda c, d: None) as pb:
            pb.poll(0)

    assert_no_leak("PerfBuffer", cycle)
    with Map.create(MapType.RINGBUF, 4096) as ring:
        assert_no_leak("PerfBuffer refused", wrong_type(lambda: PerfBuffer(ring, 1)))


def test_user_ring_buffers_opened_and_closed_many_times_leak_nothing(bpf):
    with Map.create(MapType.USER_RINGBUF, 1 << 20) as m:  # 16 bytes a cycle, never drained: room for all

        def cycle() -> None:
            with UserRingBuffer(m) as urb:
                urb.reserve(8)  # left reserved: close() discards it

        assert_no_leak("UserRingBuffer", cycle, min(CYCLES, (1 << 20) // 16 - WARMUP))
    with Map.create(MapType.RINGBUF, 4096) as ring:
        assert_no_leak("UserRingBuffer refused", wrong_type(lambda: UserRingBuffer(ring)))


def test_objects_opened_loaded_and_closed_many_times_leak_nothing(bpf_object):
    path = bpf_object("producer")

    def opened() -> None:
        with Object(path) as obj:
            assert obj.map_names

    def loaded() -> None:
        with Object(path) as obj:
            obj.load()
            obj.map("rb")
            assert obj.program("produce").fd >= 0

    assert_no_leak("Object opened", opened)
    assert_no_leak("Object loaded", loaded, LOADS)


def test_maps_created_and_opened_many_times_leak_nothing(bpf, tmp_path):
    from bpfring._sys.mounts import BPFFS, ensure_bpffs

    ensure_bpffs()
    path = f"{BPFFS}/bpfring-leaks-{os.getpid()}"
    with Map.create(MapType.RINGBUF, 4096) as m:
        m.pin(path)
        try:

            def cycle() -> None:
                Map.create(MapType.RINGBUF, 4096).close()
                Map.from_fd(m.fd).close()
                Map.from_pinned(path).close()
                Map.from_id(m.id).close()
                with pytest.raises(bpfring.BPFError):
                    Map.from_fd(0)  # stdin: not a map, and its dup is closed again

            assert_no_leak("Map", cycle)
        finally:
            os.unlink(path)

"""Thin wrappers for perf_event_open(2) and the perf event ioctls, and the online CPU list.

``struct perf_event_attr`` is laid out as in include/uapi/linux/perf_event.h, up to
PERF_ATTR_SIZE_VER1; the kernel treats the fields of later versions as zero. Every failure
raises a :class:`~bpfring.errors.BPFError` naming what was attempted.
"""

from __future__ import annotations

import ctypes
import fcntl

from ..errors import bpf_error
from .bpf import INT_MAX, NR_PERF_EVENT_OPEN, _libc, check_int, check_u32

# include/uapi/linux/perf_event.h
PERF_TYPE_SOFTWARE = 1  # enum perf_type_id
PERF_COUNT_SW_BPF_OUTPUT = 10  # enum perf_sw_ids: the event bpf_perf_event_output() writes to
PERF_SAMPLE_RAW = 1 << 10  # enum perf_event_sample_format
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400  # _IO('$', 0)
PERF_EVENT_IOC_DISABLE = 0x2401  # _IO('$', 1)

# Bits of the flags word that follows read_format (disabled:1, inherit:1, pinned:1, ...).
_ATTR_DISABLED = 1 << 0

_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64

ONLINE_CPUS = "/sys/devices/system/cpu/online"

# The kernel counts a perf ring's data pages in an int (kernel/events/ring_buffer.c, rb_alloc),
# and page_cnt is a power of two: 2**30 is the largest that can reach it intact.
MAX_PAGE_CNT = 1 << 30


class PerfEventAttr(ctypes.Structure):
    _fields_ = [
        ("type", _u32),
        ("size", _u32),
        ("config", _u64),
        ("sample_period", _u64),  # union with sample_freq
        ("sample_type", _u64),
        ("read_format", _u64),
        ("flags", _u64),  # the bitfield word
        ("wakeup_events", _u32),  # union with wakeup_watermark
        ("bp_type", _u32),
        ("config1", _u64),
        ("config2", _u64),
    ]


def perf_event_open(attr: PerfEventAttr, pid: int, cpu: int, group_fd: int, flags: int, what: str) -> int:
    """perf_event_open(&attr, pid, cpu, group_fd, flags); the new fd, or raise for ``what``."""
    check_int("pid", pid, -1, INT_MAX, "a process id, or -1 for any")
    check_int("cpu", cpu, -1, INT_MAX, "a CPU number, or -1 for any")
    check_int("group_fd", group_fd, -1, INT_MAX, "a file descriptor, or -1 for none")
    attr.size = ctypes.sizeof(attr)
    args = (ctypes.c_long(pid), ctypes.c_long(cpu), ctypes.c_long(group_fd), ctypes.c_ulong(flags))
    ret = _libc.syscall(NR_PERF_EVENT_OPEN, ctypes.byref(attr), *args)
    if ret < 0:
        raise bpf_error(ctypes.get_errno(), what)
    return ret


def check_buffer_args(page_cnt: int, wakeup_events: int) -> None:
    """Range-check a perf buffer's sizes before any event is opened, so a refusal leaks nothing.

    page_cnt pages (plus the header page) are mmapped per CPU; wakeup_events is a u32 in
    struct perf_event_attr, where 2**32 would arrive as 0.
    """
    check_int("page_cnt", page_cnt, 1, MAX_PAGE_CNT, "pages per CPU, a power of two")
    check_int("wakeup_events", wakeup_events, 1, (1 << 32) - 1, "a u32 for the kernel")


def open_bpf_output(cpu: int, wakeup_events: int) -> int:
    """A disabled PERF_COUNT_SW_BPF_OUTPUT event on ``cpu`` that records raw samples.

    sample_period=1 makes every bpf_perf_event_output() a sample; the reader is woken every
    ``wakeup_events`` samples. It starts disabled so nothing is written before it is mapped.
    """
    check_int("cpu", cpu, 0, INT_MAX, "a CPU number")
    check_u32("wakeup_events", wakeup_events)
    attr = PerfEventAttr(
        type=PERF_TYPE_SOFTWARE,
        config=PERF_COUNT_SW_BPF_OUTPUT,
        sample_period=1,
        sample_type=PERF_SAMPLE_RAW,
        flags=_ATTR_DISABLED,
        wakeup_events=wakeup_events,
    )
    what = f"perf_event_open of a BPF output event on cpu {cpu} (wakeup_events={wakeup_events})"
    return perf_event_open(attr, -1, cpu, -1, PERF_FLAG_FD_CLOEXEC, what)


def _ioctl(fd: int, request: int, what: str) -> None:
    check_int("perf event fd", fd, 0, INT_MAX, "a file descriptor")
    try:
        fcntl.ioctl(fd, request, 0)
    except OSError as exc:
        raise bpf_error(exc.errno, what) from None


def enable(fd: int) -> None:
    _ioctl(fd, PERF_EVENT_IOC_ENABLE, f"PERF_EVENT_IOC_ENABLE on perf event fd {fd}")


def disable(fd: int) -> None:
    _ioctl(fd, PERF_EVENT_IOC_DISABLE, f"PERF_EVENT_IOC_DISABLE on perf event fd {fd}")


def parse_cpu_list(text: str) -> list[int]:
    """``"0-3,8"`` (the kernel's cpulist format) -> [0, 1, 2, 3, 8]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def online_cpus() -> list[int]:
    """The CPUs online now, from sysfs."""
    with open(ONLINE_CPUS) as f:
        return parse_cpu_list(f.read())

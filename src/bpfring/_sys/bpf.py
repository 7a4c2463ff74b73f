"""Thin ctypes wrappers for bpf(2).

Each command has its own ``union bpf_attr`` member as a ctypes structure laid out as in
include/uapi/linux/bpf.h; the kernel zero-fills whatever tail of the union we do not pass.
Every failure raises a :class:`~bpfring.errors.BPFError` naming the command and its target.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import operator
import os
import platform

from ..errors import bpf_error

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# __NR_bpf and __NR_perf_event_open per architecture (arch/*/include/uapi/asm/unistd*.h).
_SYSCALL_NUMBERS = {
    "x86_64": {"bpf": 321, "perf_event_open": 298},
    "aarch64": {"bpf": 280, "perf_event_open": 241},
}
try:
    _NR = _SYSCALL_NUMBERS[platform.machine()]
except KeyError:  # pragma: no cover - only on unsupported architectures
    raise ImportError(f"bpfring does not know the syscall numbers of {platform.machine()}") from None

NR_BPF: int = _NR["bpf"]
NR_PERF_EVENT_OPEN: int = _NR["perf_event_open"]


class Cmd(enum.IntEnum):
    """enum bpf_cmd (the subset bpfring uses)."""

    MAP_CREATE = 0
    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    MAP_GET_NEXT_KEY = 4
    PROG_LOAD = 5
    OBJ_PIN = 6
    OBJ_GET = 7
    PROG_TEST_RUN = 10
    RAW_TRACEPOINT_OPEN = 17
    MAP_GET_NEXT_ID = 12
    MAP_GET_FD_BY_ID = 14
    OBJ_GET_INFO_BY_FD = 15


class MapType(enum.IntEnum):
    """enum bpf_map_type."""

    UNSPEC = 0
    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    STACK_TRACE = 7
    CGROUP_ARRAY = 8
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    HASH_OF_MAPS = 13
    DEVMAP = 14
    SOCKMAP = 15
    CPUMAP = 16
    XSKMAP = 17
    SOCKHASH = 18
    CGROUP_STORAGE = 19
    REUSEPORT_SOCKARRAY = 20
    PERCPU_CGROUP_STORAGE = 21
    QUEUE = 22
    STACK = 23
    SK_STORAGE = 24
    DEVMAP_HASH = 25
    STRUCT_OPS = 26
    RINGBUF = 27
    INODE_STORAGE = 28
    TASK_STORAGE = 29
    BLOOM_FILTER = 30
    USER_RINGBUF = 31
    CGRP_STORAGE = 32
    ARENA = 33


def map_type_name(value: int) -> str:
    """``BPF_MAP_TYPE_RINGBUF`` for 27; the number itself for types newer than this module."""
    try:
        return f"BPF_MAP_TYPE_{MapType(value).name}"
    except ValueError:
        return f"map type {value}"


# BPF_ANY / BPF_NOEXIST / BPF_EXIST for map updates.
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# BPF_F_RDONLY / BPF_F_WRONLY for BPF_OBJ_GET and BPF_MAP_GET_FD_BY_ID open_flags.
BPF_F_RDONLY = 1 << 3
BPF_F_WRONLY = 1 << 4

BPF_OBJ_NAME_LEN = 16

_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
INT_MAX = (1 << 31) - 1  # fds, cpus and pids are C ints


def check_int(field: str, value: int, low: int, high: int, kind: str) -> int:
    """``value`` as an int if it lies in [low, high], else a TypeError or ValueError naming ``field``.

    ctypes keeps only the low bits of what it packs, so an unchecked 2**32 + 27 reaches the
    kernel as 27: every integer bound is checked here before a structure is built.
    """
    if isinstance(value, bool):
        raise TypeError(f"{field} must be an int, got bool")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{field} must be an int, got {type(value).__name__}") from None
    if not low <= number <= high:
        raise ValueError(f"{field} must be from {low} to {high} ({kind}), got {number}")
    return number


def check_u32(field: str, value: int) -> int:
    return check_int(field, value, 0, U32_MAX, "a u32 for the kernel")


def check_u64(field: str, value: int) -> int:
    return check_int(field, value, 0, U64_MAX, "a u64 for the kernel")


def check_fd(field: str, value: int) -> int:
    return check_int(field, value, 0, INT_MAX, "a file descriptor")


def c_string(field: str, text: str | bytes) -> bytes:
    """``text`` as bytes for a NUL-terminated C string; an embedded NUL would cut it short unseen."""
    data = os.fsencode(text) if isinstance(text, str) else bytes(text)
    if b"\0" in data:
        raise ValueError(f"{field} must not contain a NUL byte, got {text!r}")
    return data


def obj_name(field: str, name: str) -> bytes:
    """A map or program name for the kernel: at most BPF_OBJ_NAME_LEN - 1 bytes, not cut to fit."""
    data = c_string(field, name)
    if len(data) > BPF_OBJ_NAME_LEN - 1:
        raise ValueError(f"{field} must be at most {BPF_OBJ_NAME_LEN - 1} bytes, got {name!r} ({len(data)} bytes)")
    return data


class MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
        ("inner_map_fd", _u32),
        ("numa_node", _u32),
        ("map_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("map_ifindex", _u32),
        ("btf_fd", _u32),
        ("btf_key_type_id", _u32),
        ("btf_value_type_id", _u32),
        ("btf_vmlinux_value_type_id", _u32),
        ("map_extra", _u64),
    ]


class MapElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", _u32), ("_pad", _u32), ("key", _u64), ("value", _u64), ("flags", _u64)]


class ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", _u64), ("bpf_fd", _u32), ("file_flags", _u32)]


class GetIdAttr(ctypes.Structure):
    # start_id / map_id share the first word; next_id is written back by the kernel.
    _fields_ = [("id", _u32), ("next_id", _u32), ("open_flags", _u32)]


class InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", _u32), ("info_len", _u32), ("info", _u64)]


class TestRunAttr(ctypes.Structure):
    __test__ = False  # not a pytest class
    _fields_ = [
        ("prog_fd", _u32),
        ("retval", _u32),
        ("data_size_in", _u32),
        ("data_size_out", _u32),
        ("data_in", _u64),
        ("data_out", _u64),
        ("repeat", _u32),
        ("duration", _u32),
        ("ctx_size_in", _u32),
        ("ctx_size_out", _u32),
        ("ctx_in", _u64),
        ("ctx_out", _u64),
        ("flags", _u32),
        ("cpu", _u32),
        ("batch_size", _u32),
        ("_pad", _u32),
    ]


class ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", _u32),
        ("insn_cnt", _u32),
        ("insns", _u64),
        ("license", _u64),
        ("log_level", _u32),
        ("log_size", _u32),
        ("log_buf", _u64),
        ("kern_version", _u32),
        ("prog_flags", _u32),
        ("prog_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("prog_ifindex", _u32),
        ("expected_attach_type", _u32),
        ("prog_btf_fd", _u32),
        ("func_info_rec_size", _u32),
        ("func_info", _u64),
        ("func_info_cnt", _u32),
        ("line_info_rec_size", _u32),
        ("line_info", _u64),
        ("line_info_cnt", _u32),
        ("attach_btf_id", _u32),
        ("attach_prog_fd", _u32),
    ]


class RawTracepointAttr(ctypes.Structure):
    _fields_ = [("name", _u64), ("prog_fd", _u32)]


class MapInfo(ctypes.Structure):
    """struct bpf_map_info, up to map_extra (older kernels fill less; the rest stays zero)."""

    _fields_ = [
        ("type", _u32),
        ("id", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", _u32),
        ("btf_vmlinux_value_type_id", _u32),
        ("netns_dev", _u64),
        ("netns_ino", _u64),
        ("btf_id", _u32),
        ("btf_key_type_id", _u32),
        ("btf_value_type_id", _u32),
        ("btf_vmlinux_id", _u32),
        ("map_extra", _u64),
    ]


def _addr(obj: ctypes._CData | None) -> int:  # type: ignore[name-defined]
    return 0 if obj is None else ctypes.addressof(obj)


def bpf(cmd: Cmd, attr: ctypes.Structure, what: str) -> int:
    """Issue bpf(cmd, &attr, sizeof(attr)); return the kernel's result or raise for ``what``."""
    ret = _libc.syscall(NR_BPF, int(cmd), ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        raise bpf_error(ctypes.get_errno(), what)
    return ret


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, map_flags: int = 0, name: str = ""
) -> int:
    attr = MapCreateAttr(
        map_type=check_u32("map type", map_type),
        key_size=check_u32("key_size", key_size),
        value_size=check_u32("value_size", value_size),
        max_entries=check_u32("max_entries", max_entries),
        map_flags=check_u32("map_flags", map_flags),
        map_name=obj_name("map name", name),
    )
    what = f"BPF_MAP_CREATE {map_type_name(map_type)} max_entries={max_entries}"
    return bpf(Cmd.MAP_CREATE, attr, what)


def map_lookup_elem(fd: int, key: ctypes.Array, value: ctypes.Array) -> None:
    attr = MapElemAttr(map_fd=check_fd("map fd", fd), key=_addr(key), value=_addr(value))
    bpf(Cmd.MAP_LOOKUP_ELEM, attr, f"BPF_MAP_LOOKUP_ELEM on map fd {fd}")


def map_update_elem(fd: int, key: ctypes.Array, value: ctypes.Array, flags: int = BPF_ANY) -> None:
    attr = MapElemAttr(map_fd=check_fd("map fd", fd), key=_addr(key), value=_addr(value), flags=check_u64("flags", flags))
    bpf(Cmd.MAP_UPDATE_ELEM, attr, f"BPF_MAP_UPDATE_ELEM on map fd {fd}")


def map_delete_elem(fd: int, key: ctypes.Array) -> None:
    attr = MapElemAttr(map_fd=check_fd("map fd", fd), key=_addr(key))
    bpf(Cmd.MAP_DELETE_ELEM, attr, f"BPF_MAP_DELETE_ELEM on map fd {fd}")


def obj_pin(fd: int, path: str) -> None:
    cpath = ctypes.create_string_buffer(c_string("pin path", path))
    attr = ObjAttr(pathname=_addr(cpath), bpf_fd=check_fd("fd", fd))
    bpf(Cmd.OBJ_PIN, attr, f"BPF_OBJ_PIN of fd {fd} at {path!r}")


def obj_get(path: str, file_flags: int = 0) -> int:
    cpath = ctypes.create_string_buffer(c_string("pin path", path))
    attr = ObjAttr(pathname=_addr(cpath), file_flags=check_u32("file_flags", file_flags))
    return bpf(Cmd.OBJ_GET, attr, f"BPF_OBJ_GET {path!r}")


def map_get_fd_by_id(map_id: int) -> int:
    attr = GetIdAttr(id=check_u32("map id", map_id))
    return bpf(Cmd.MAP_GET_FD_BY_ID, attr, f"BPF_MAP_GET_FD_BY_ID id={map_id}")


def map_get_next_id(start_id: int) -> int | None:
    """The id of the next map after ``start_id``, or None at the end of the list."""
    attr = GetIdAttr(id=check_u32("map id", start_id))
    ret = _libc.syscall(NR_BPF, int(Cmd.MAP_GET_NEXT_ID), ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        if err == errno.ENOENT:  # no more maps
            return None
        raise bpf_error(err, f"BPF_MAP_GET_NEXT_ID after {start_id}")
    return attr.next_id


def map_get_info(fd: int) -> MapInfo:
    info = MapInfo()
    attr = InfoAttr(bpf_fd=check_fd("fd", fd), info_len=ctypes.sizeof(info), info=_addr(info))
    bpf(Cmd.OBJ_GET_INFO_BY_FD, attr, f"BPF_OBJ_GET_INFO_BY_FD on fd {fd}")
    return info


# The lines of /proc/<pid>/fdinfo/<map fd> that fill a MapInfo (all there since 4.x; no name).
_FDINFO_FIELDS = {
    "map_type": "type",
    "map_id": "id",
    "key_size": "key_size",
    "value_size": "value_size",
    "max_entries": "max_entries",
    "map_flags": "map_flags",
}


def map_info_from_fdinfo(fd: int) -> MapInfo | None:
    """What /proc/self/fdinfo tells of map ``fd`` (no name), or None if it does not say.

    For a process the kernel refuses BPF_OBJ_GET_INFO_BY_FD: before Linux 5.19,
    kernel.unprivileged_bpf_disabled (set by default on Debian 11's 5.10) refused every bpf()
    command to an unprivileged process, even on a map fd handed to it, while mmap and epoll of
    that fd, all a ring consumer needs, work.
    """
    try:
        with open(f"/proc/self/fdinfo/{check_fd('fd', fd)}") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    try:
        values = {attr: int(fields[key].strip(), 0) for key, attr in _FDINFO_FIELDS.items()}
    except (KeyError, ValueError):
        return None
    return MapInfo(**values)


def prog_load(
    prog_type: int,
    insns: bytes,
    license: str = "GPL",
    name: str = "",
    expected_attach_type: int = 0,
    attach_btf_id: int = 0,
) -> int:
    """Load raw instructions; on a verifier rejection the error carries the verifier log."""
    if len(insns) % 8:
        raise ValueError(f"insns must be whole 8-byte instructions, got {len(insns)} bytes")
    insn_cnt = check_u32("instruction count", len(insns) // 8)
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(c_string("license", license))
    log = ctypes.create_string_buffer(1 << 16)
    attr = ProgLoadAttr(
        prog_type=check_u32("prog_type", prog_type),
        insn_cnt=insn_cnt,
        insns=_addr(code),
        license=_addr(lic),
        log_level=1,
        log_size=len(log),
        log_buf=_addr(log),
        prog_name=obj_name("program name", name),
        expected_attach_type=check_u32("expected_attach_type", expected_attach_type),
        attach_btf_id=check_u32("attach_btf_id", attach_btf_id),
    )
    ret = _libc.syscall(NR_BPF, int(Cmd.PROG_LOAD), ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        verifier = log.value.decode(errors="replace").strip()
        raise bpf_error(err, f"BPF_PROG_LOAD type={prog_type}" + (f"\n{verifier}" if verifier else ""))
    return ret


def raw_tracepoint_open(prog_fd: int, name: str | None = None) -> int:
    """BPF_RAW_TRACEPOINT_OPEN: attach a raw tracepoint program to ``name``, or a tracing
    (fentry/fexit) program to the function it was loaded for (``name`` None); a link fd."""
    cname = ctypes.create_string_buffer(c_string("tracepoint name", name)) if name is not None else None
    attr = RawTracepointAttr(name=_addr(cname), prog_fd=check_fd("program fd", prog_fd))
    return bpf(Cmd.RAW_TRACEPOINT_OPEN, attr, f"BPF_RAW_TRACEPOINT_OPEN of program fd {prog_fd}")


class TestRunResult:
    __test__ = False

    def __init__(self, retval: int, duration_ns: int, data_out: bytes, ctx_out: bytes) -> None:
        self.retval = retval
        self.duration_ns = duration_ns
        self.data_out = data_out
        self.ctx_out = ctx_out


def prog_test_run(
    prog_fd: int,
    data_in: bytes = b"",
    ctx_in: bytes | bytearray = b"",
    repeat: int = 0,
    data_out_size: int = 0,
    cpu: int | None = None,
) -> TestRunResult:
    """BPF_PROG_TEST_RUN; ``ctx_out`` carries what the program wrote into its context."""
    check_fd("program fd", prog_fd)
    check_u32("repeat", repeat)
    check_u32("data_out_size", data_out_size)
    check_u32("data_in size", len(data_in))
    check_u32("ctx_in size", len(ctx_in))
    if cpu is not None:
        check_u32("cpu", cpu)
    din = ctypes.create_string_buffer(bytes(data_in), len(data_in)) if data_in else None
    dout = ctypes.create_string_buffer(data_out_size) if data_out_size else None
    cin = ctypes.create_string_buffer(bytes(ctx_in), len(ctx_in)) if ctx_in else None
    attr = TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(data_in),
        data_size_out=data_out_size,
        data_in=_addr(din),
        data_out=_addr(dout),
        repeat=repeat,
        ctx_size_in=len(ctx_in),
        ctx_in=_addr(cin),
    )
    if cpu is not None:
        attr.flags = 1  # BPF_F_TEST_RUN_ON_CPU
        attr.cpu = cpu
    bpf(Cmd.PROG_TEST_RUN, attr, f"BPF_PROG_TEST_RUN on program fd {prog_fd}")
    # BPF_PROG_TYPE_SYSCALL programs write their context back into ctx_in.
    return TestRunResult(
        retval=attr.retval,
        duration_ns=attr.duration,
        data_out=dout.raw[: attr.data_size_out] if dout is not None else b"",
        ctx_out=cin.raw if cin is not None else b"",
    )

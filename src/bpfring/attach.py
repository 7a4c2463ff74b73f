"""Attaching a loaded program to a target named at run time: kprobes, tracepoints, raw
tracepoints, uprobes and perf events, through libbpf's ``bpf_program__attach_*``.

:class:`~bpfring.Program` calls these; each returns libbpf's ``struct bpf_link *`` or raises an
error that names the program, the target and the reason in words (no such function, tracepoint,
binary or symbol; kprobes missing from this kernel), checked before libbpf is asked where we can.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import TYPE_CHECKING

from ._sys.libbpf import KprobeOpts, UprobeOpts, capture_log, lib
from ._sys.mounts import TRACEFS, ensure_tracefs
from .errors import BPFError, BPFNotFoundError, bpf_error

if TYPE_CHECKING:
    from .objects import Program

# Where a kernel offers kprobes: the kprobe PMU (perf_event_open of type "kprobe", 4.17+), or the
# older text interface in tracefs. A kernel without CONFIG_KPROBES has neither.
KPROBE_PMU = "/sys/bus/event_source/devices/kprobe"
KPROBE_EVENTS = os.path.join(TRACEFS, "kprobe_events")
KALLSYMS = "/proc/kallsyms"


def kprobes_available() -> bool:
    """Whether this kernel can place kprobes (CONFIG_KPROBES): a kprobe PMU or tracefs kprobe_events."""
    if os.path.exists(KPROBE_PMU):
        return True
    ensure_tracefs()
    return os.path.exists(KPROBE_EVENTS)


def _kernel_has_function(name: str) -> bool | None:
    """Whether /proc/kallsyms lists ``name`` (None if it can't be read)."""
    try:
        with open(KALLSYMS, "rb") as f:
            target = name.encode()
            return any(line.split()[2] == target for line in f if len(line.split()) >= 3)
    except OSError:
        return None


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    if not value or "\0" in value:
        raise ValueError(f"{what} must be a non-empty name without NUL bytes, got {value!r}")
    return value


def _count(value: object, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be between {low} and {high}, got {value}")
    return value


def _prog_type(prog: Program) -> str:
    name = lib.libbpf_bpf_prog_type_str(lib.bpf_program__type(prog._ptr))
    return name.decode() if name else "unknown"


# The program types each attach kind takes (libbpf_bpf_prog_type_str names), for a hint on EINVAL.
_EXPECTED_TYPES = {
    "kprobe": ("kprobe",),
    "uprobe": ("kprobe",),
    "tracepoint": ("tracepoint",),
    "raw tracepoint": ("raw_tracepoint", "raw_tracepoint_writable"),
    "perf event": ("perf_event", "kprobe", "tracepoint"),
}


def _failed(prog: Program, target: str, err: int, lines: list[str], reason: str = "", kind: str = "") -> BPFError:
    """The error for a failed attach; ``reason`` says why in words when we know it."""
    what = f"attaching program {prog.name!r} to {target}"
    if reason:
        cls = BPFNotFoundError if err == errno.ENOENT else BPFError
        return cls(err, f"{what}: {reason}")
    actual = _prog_type(prog)
    if kind and actual not in _EXPECTED_TYPES[kind]:
        what += f" (a {kind} takes a program of type {' or '.join(_EXPECTED_TYPES[kind])}; this one is {actual})"
    if lines:
        what += f" ({lines[-1]})"
    return bpf_error(err, what)


def kprobe(prog: Program, function: str, retprobe: bool, offset: int) -> int:
    function = _text(function, "function")
    offset = _count(offset, "offset", 0, 2**32 - 1)
    target = f"{'kretprobe' if retprobe else 'kprobe'} {function!r}" + (f"+{offset}" if offset else "")
    if not kprobes_available():
        raise _failed(
            prog,
            target,
            errno.EOPNOTSUPP,
            [],
            f"kprobes are unavailable in this kernel (no kprobe PMU at {KPROBE_PMU} and no {KPROBE_EVENTS}: "
            "it was built without CONFIG_KPROBES); a tracepoint or raw tracepoint may reach the same event",
        )
    opts = KprobeOpts(sz=ctypes.sizeof(KprobeOpts), offset=offset, retprobe=bool(retprobe))
    with capture_log() as lines:
        ptr = lib.bpf_program__attach_kprobe_opts(prog._ptr, function.encode(), ctypes.byref(opts))
    if ptr:
        return ptr
    err = ctypes.get_errno()
    if err in (errno.ENOENT, errno.EINVAL) and _kernel_has_function(function) is False:
        raise _failed(prog, target, errno.ENOENT, lines, f"no such function in this kernel (not in {KALLSYMS})")
    raise _failed(prog, target, err, lines, kind="kprobe")


def tracepoint(prog: Program, category: str, name: str) -> int:
    category = _text(category, "category")
    name = _text(name, "name")
    if "/" in category or "/" in name:
        raise ValueError(f"a tracepoint's category and name are two names without '/', got {category!r}, {name!r}")
    target = f"tracepoint {category}/{name}"
    ensure_tracefs()
    events = os.path.join(TRACEFS, "events", category, name)
    if not os.path.isdir(events):
        where = os.path.join(TRACEFS, "events", category)
        hint = f"no {events}" if os.path.isdir(where) else f"no category {category!r} in {os.path.dirname(where)}"
        raise _failed(prog, target, errno.ENOENT, [], f"no such tracepoint ({hint})")
    with capture_log() as lines:
        ptr = lib.bpf_program__attach_tracepoint(prog._ptr, category.encode(), name.encode())
    if not ptr:
        raise _failed(prog, target, ctypes.get_errno(), lines, kind="tracepoint")
    return ptr


def raw_tracepoint(prog: Program, name: str) -> int:
    name = _text(name, "name")
    target = f"raw tracepoint {name!r}"
    with capture_log() as lines:
        ptr = lib.bpf_program__attach_raw_tracepoint(prog._ptr, name.encode())
    if ptr:
        return ptr
    err = ctypes.get_errno()
    if err == errno.ENOENT:
        raise _failed(prog, target, err, lines, "no such raw tracepoint in this kernel or its modules")
    raise _failed(prog, target, err, lines, kind="raw tracepoint")


def uprobe(prog: Program, binary: str | os.PathLike[str], symbol: str | None, offset: int, pid: int, retprobe: bool) -> int:
    path = os.fsdecode(os.fspath(binary))
    if symbol is not None:
        symbol = _text(symbol, "symbol")
    offset = _count(offset, "offset", 0, 2**63 - 1)
    pid = _count(pid, "pid", -1, 2**31 - 1)
    where = f"{symbol}+{offset:#x}" if symbol and offset else (symbol or f"offset {offset:#x}")
    target = f"{'uretprobe' if retprobe else 'uprobe'} {where} in {path!r}" + (f" (pid {pid})" if pid >= 0 else "")
    if os.sep in path and not os.path.isfile(path):  # a bare "libc.so.6" is looked up by libbpf
        raise _failed(prog, target, errno.ENOENT, [], "no such binary")
    opts = UprobeOpts(sz=ctypes.sizeof(UprobeOpts), retprobe=bool(retprobe))
    if symbol is not None:
        opts.func_name = symbol.encode()
    with capture_log() as lines:
        ptr = lib.bpf_program__attach_uprobe_opts(prog._ptr, pid, os.fsencode(path), offset, ctypes.byref(opts))
    if ptr:
        return ptr
    err = ctypes.get_errno()
    said = " ".join(lines)
    if symbol is not None and err == errno.ENOENT and ("failed to find" in said or "not found" in said):
        raise _failed(prog, target, errno.ENOENT, lines, f"symbol {symbol!r} not found in the binary")
    if "failed to resolve full path" in said:
        raise _failed(prog, target, errno.ENOENT, lines, "no such binary on PATH or the library path")
    if err == errno.ESRCH:
        raise _failed(prog, target, err, lines, f"no process with pid {pid}")
    raise _failed(prog, target, err, lines, kind="uprobe")


def perf_event(prog: Program, fd: int) -> int:
    """The link owns a duplicate of ``fd`` (libbpf closes it on detach); the caller keeps ``fd``."""
    fd = _count(fd, "fd", 0, 2**31 - 1)
    target = f"perf event fd {fd}"
    try:
        dup = os.dup(fd)
    except OSError as exc:
        raise _failed(prog, target, exc.errno or errno.EBADF, [], "not an open file descriptor") from None
    if os.readlink(f"/proc/self/fd/{dup}") != "anon_inode:[perf_event]":
        os.close(dup)
        raise _failed(prog, target, errno.EINVAL, [], "not a perf event (open one with perf_event_open)")
    with capture_log() as lines:
        ptr = lib.bpf_program__attach_perf_event(prog._ptr, dup)
    if not ptr:
        err = ctypes.get_errno()
        os.close(dup)
        raise _failed(prog, target, err, lines, kind="perf event")
    return ptr


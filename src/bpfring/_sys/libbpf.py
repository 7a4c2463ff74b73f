"""ctypes bindings to libbpf.so.1 (1.0 or later), for BPF ELF objects only.

bpfring reads rings itself; libbpf is used for what it is canonical at: opening ``.bpf.o``
files, CO-RE relocation, loading and auto-attaching by section name. libbpf's log is routed
to the ``bpfring.libbpf`` logger instead of stderr.

The library is loaded on first use, not at import: ring, perf and user ring buffers work
where no libbpf can be loaded, and only what needs it (:class:`~bpfring.Object`) raises
:class:`LibbpfUnavailableError`. ``BPFRING_LIBBPF`` names the file to load instead of the
bundled copy (a wheel's ``bpfring.libs/libbpf*.so*``) or the system's ``libbpf.so.1``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import threading
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("bpfring.libbpf")

ENV_LIBRARY = "BPFRING_LIBBPF"
SONAME = "libbpf.so.1"
# Where auditwheel puts the libraries a wheel bundles: site-packages/bpfring.libs/.
BUNDLED_DIR = Path(__file__).resolve().parents[2] / "bpfring.libs"
INSTALL_HINT = "Debian/Ubuntu: apt install libbpf1; Fedora: dnf install libbpf; or pip install a bpfring wheel"


class LibbpfUnavailableError(ImportError):
    """libbpf could not be loaded: BPF objects (Object, execsnoop) need it, rings do not."""


def candidates() -> list[str]:
    """What :func:`load` tries, in order: $BPFRING_LIBBPF alone if set, else bundled, then system."""
    chosen = os.environ.get(ENV_LIBRARY)
    if chosen:
        return [chosen]
    return [str(p) for p in sorted(BUNDLED_DIR.glob("libbpf*.so*"))] + [SONAME]


_p = ctypes.c_void_p
_s = ctypes.c_char_p

# (name, restype, argtypes) of every function declared with _fn, applied when the library loads.
_declared: list[tuple[str, object, tuple[object, ...]]] = []
_loaded: ctypes.CDLL | None = None
_load_lock = threading.Lock()


def _fn(name: str, restype: object, *argtypes: object) -> None:
    _declared.append((name, restype, argtypes))
    if _loaded is not None:
        _declare(_loaded, name, restype, argtypes)


def _declare(cdll: ctypes.CDLL, name: str, restype: object, argtypes: tuple[object, ...]) -> None:
    try:
        f = getattr(cdll, name)
    except AttributeError:  # an older libbpf: calling it says "undefined symbol"
        return
    f.restype = restype
    f.argtypes = list(argtypes)


def load() -> ctypes.CDLL:
    """The loaded libbpf, loading it (once) on first use; LibbpfUnavailableError saying how to get it."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _load_lock:
        if _loaded is None:
            cdll = _open()
            for name, restype, argtypes in _declared:
                _declare(cdll, name, restype, argtypes)
            found = (cdll.libbpf_major_version(), cdll.libbpf_minor_version())
            if found < (1, 0):  # pragma: no cover - depends on the machine
                raise LibbpfUnavailableError(f"bpfring needs libbpf 1.0 or later, found {found[0]}.{found[1]} ({INSTALL_HINT})")
            cdll.libbpf_set_print(ctypes.cast(_print_fn, _p))
            _loaded = cdll
    return _loaded


def _open() -> ctypes.CDLL:
    errors = []
    for name in candidates():
        try:
            return ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            errors.append(str(exc))
    source = f" (from ${ENV_LIBRARY})" if os.environ.get(ENV_LIBRARY) else ""
    raise LibbpfUnavailableError(
        f"libbpf is needed for BPF objects but could not be loaded{source}: {'; '.join(errors)} ({INSTALL_HINT})"
    )


class _LinkMap(ctypes.Structure):
    """The first fields of <link.h>'s struct link_map: where a loaded library came from."""

    _fields_ = [("l_addr", ctypes.c_void_p), ("l_name", ctypes.c_char_p)]


_RTLD_DI_LINKMAP = 2  # <dlfcn.h>


def path() -> str:
    """The file the loaded libbpf came from (dlinfo of its handle), loading it if need be."""
    handle = load()._handle
    try:
        dlinfo = ctypes.CDLL(None).dlinfo  # in libc since glibc 2.34
    except AttributeError:  # pragma: no cover - older glibc
        dlinfo = ctypes.CDLL("libdl.so.2").dlinfo
    dlinfo.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    link_map = ctypes.POINTER(_LinkMap)()
    if dlinfo(handle, _RTLD_DI_LINKMAP, ctypes.byref(link_map)) != 0 or not link_map:
        return ""
    name = link_map.contents.l_name
    return os.path.realpath(name.decode(errors="replace")) if name else ""


def version() -> tuple[int, int]:
    """(major, minor) of the loaded libbpf."""
    cdll = load()
    return (cdll.libbpf_major_version(), cdll.libbpf_minor_version())


class _Library:
    """Stands for the loaded libbpf: the first function looked up loads it (see :func:`load`)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(load(), name)

    def __repr__(self) -> str:
        return f"<libbpf {'loaded' if _loaded is not None else 'not loaded yet'}>"


lib: Any = _Library()


def __getattr__(name: str) -> Any:  # the module's VERSION, computed on first use
    if name == "VERSION":
        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_fn("libbpf_major_version", ctypes.c_uint32)
_fn("libbpf_minor_version", ctypes.c_uint32)
_fn("bpf_object__open_file", _p, _s, _p)
_fn("bpf_object__load", ctypes.c_int, _p)
_fn("bpf_object__close", None, _p)
_fn("bpf_object__name", _s, _p)
_fn("bpf_object__next_map", _p, _p, _p)
_fn("bpf_object__next_program", _p, _p, _p)
_fn("bpf_object__btf", _p, _p)
_fn("bpf_map__name", _s, _p)
_fn("bpf_map__fd", ctypes.c_int, _p)
_fn("bpf_map__type", ctypes.c_int, _p)
_fn("bpf_map__max_entries", ctypes.c_uint32, _p)
_fn("bpf_map__set_max_entries", ctypes.c_int, _p, ctypes.c_uint32)
_fn("bpf_map__initial_value", _p, _p, ctypes.POINTER(ctypes.c_size_t))
_fn("bpf_map__set_initial_value", ctypes.c_int, _p, _p, ctypes.c_size_t)
_fn("bpf_program__name", _s, _p)
_fn("bpf_program__section_name", _s, _p)
_fn("bpf_program__fd", ctypes.c_int, _p)
_fn("bpf_program__autoload", ctypes.c_bool, _p)
_fn("bpf_program__set_autoload", ctypes.c_int, _p, ctypes.c_bool)
_fn("bpf_program__attach", _p, _p)
_fn("bpf_link__destroy", ctypes.c_int, _p)
_fn("bpf_link__disconnect", None, _p)  # a fork child's copy: freed without detaching
_fn("bpf_link__fd", ctypes.c_int, _p)
_fn("libbpf_set_print", _p, _p)
_fn("btf__find_by_name_kind", ctypes.c_int32, _p, _s, ctypes.c_uint32)
_fn("btf__type_by_id", _p, _p, ctypes.c_uint32)
_fn("btf__name_by_offset", _s, _p, ctypes.c_uint32)
_fn("btf__load_vmlinux_btf", _p)  # bpfring doctor: the BTF id of a kernel function to probe fentry with
_fn("btf__free", None, _p)
# libbpf's own ring buffer consumer: bpfring does not use it, the benchmark compares against it.
_fn("ring_buffer__new", _p, ctypes.c_int, _p, _p, _p)
_fn("ring_buffer__consume", ctypes.c_int, _p)
_fn("ring_buffer__poll", ctypes.c_int, _p, ctypes.c_int)
_fn("ring_buffer__free", None, _p)
# ... and its perf buffer consumer. perf_buffer__new_raw takes a struct perf_event_attr, which
# is how a wakeup_events other than 1 is chosen (as the kernel's ringbuf benchmark does).
_fn("perf_buffer__new", _p, ctypes.c_int, ctypes.c_size_t, _p, _p, _p, _p)
_fn("perf_buffer__new_raw", _p, ctypes.c_int, ctypes.c_size_t, _p, _p, _p, _p)
_fn("perf_buffer__poll", ctypes.c_int, _p, ctypes.c_int)
_fn("perf_buffer__consume", ctypes.c_int, _p)
_fn("perf_buffer__free", None, _p)
# Typed globals (bpfring.globals) and attaching by target (Program.attach_*).
_fn("libbpf_strerror", ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
_fn("libbpf_bpf_prog_type_str", _s, ctypes.c_int)
_fn("bpf_map__btf_value_type_id", ctypes.c_uint32, _p)
_fn("bpf_map__value_size", ctypes.c_uint32, _p)
_fn("bpf_program__type", ctypes.c_int, _p)
_fn("bpf_program__attach_kprobe_opts", _p, _p, _s, _p)
_fn("bpf_program__attach_tracepoint", _p, _p, _s, _s)
_fn("bpf_program__attach_raw_tracepoint", _p, _p, _s)
_fn("bpf_program__attach_uprobe_opts", _p, _p, ctypes.c_int, _s, ctypes.c_size_t, _p)
_fn("bpf_program__attach_perf_event", _p, _p, ctypes.c_int)


class KprobeOpts(ctypes.Structure):
    """struct bpf_kprobe_opts as of libbpf 1.0 (later fields stay zero: ``sz`` says where we stop)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("bpf_cookie", ctypes.c_uint64),
        ("offset", ctypes.c_size_t),
        ("retprobe", ctypes.c_bool),
    ]


class UprobeOpts(ctypes.Structure):
    """struct bpf_uprobe_opts as of libbpf 1.0 (``func_name`` since 0.8)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("ref_ctr_offset", ctypes.c_size_t),
        ("bpf_cookie", ctypes.c_uint64),
        ("retprobe", ctypes.c_bool),
        ("func_name", ctypes.c_char_p),
    ]


# libbpf's own error codes (enum libbpf_errno in libbpf.h): errno values no strerror() knows.
LIBBPF_ERRNO_START, LIBBPF_ERRNO_END = 4000, 4100


def strerror(err: int) -> str:
    """The message for ``err``, a system errno or one of libbpf's own codes (4000 and up)."""
    buf = ctypes.create_string_buffer(256)
    lib.libbpf_strerror(err, buf, len(buf))
    return buf.value.decode(errors="replace")


# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
RING_BUFFER_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
# void (*perf_buffer_sample_fn)(void *ctx, int cpu, void *data, __u32 size)
PERF_BUFFER_SAMPLE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32)
# void (*perf_buffer_lost_fn)(void *ctx, int cpu, __u64 cnt)
PERF_BUFFER_LOST_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64)
# enum bpf_perf_event_ret (*perf_buffer_event_fn)(void *ctx, int cpu, struct perf_event_header *event)
PERF_BUFFER_EVENT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
LIBBPF_PERF_EVENT_CONT = -2  # enum bpf_perf_event_ret: keep going

# --- libbpf's log -> logging -----------------------------------------------------------------

_libc = ctypes.CDLL(None)
_libc.vsnprintf.restype = ctypes.c_int
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]

# enum libbpf_print_level: LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG
_LEVELS = (logging.WARNING, logging.INFO, logging.DEBUG)
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_captured = threading.local()


# sizeof(va_list) where it is a struct handed over by pointer (x86-64: __va_list_tag; aarch64: AAPCS64).
_VA_LIST_SIZE = {"x86_64": 24, "aarch64": 32}.get(platform.machine(), 32)


def _format(fmt: bytes, args: int) -> str:
    # vsnprintf consumes its va_list, so each attempt formats from a copy (what va_copy does).
    size = 1024
    while True:
        va_copy = ctypes.create_string_buffer(ctypes.string_at(args, _VA_LIST_SIZE), _VA_LIST_SIZE)
        buf = ctypes.create_string_buffer(size)
        n = _libc.vsnprintf(buf, size, fmt, ctypes.addressof(va_copy))
        if n < size:
            return buf.value.decode(errors="replace").rstrip("\n")
        size = n + 1


def _print(level: int, fmt: bytes, args: int) -> int:
    text = _format(fmt, args)
    pylevel = _LEVELS[level] if 0 <= level < len(_LEVELS) else logging.DEBUG
    lines = getattr(_captured, "lines", None)
    if lines is not None and pylevel >= logging.INFO:
        lines.append(text)
    log.log(pylevel, "%s", text)
    return len(text)


_print_fn = _PRINT_FN(_print)  # kept alive for the life of the process; installed by load()


@contextlib.contextmanager
def capture_log() -> Iterator[list[str]]:
    """Collect libbpf's warnings in this thread, to put the verifier's words into an exception."""
    _captured.lines = []
    try:
        yield _captured.lines
    finally:
        _captured.lines = None

"""BPF ELF objects through libbpf: open, size the maps, load, attach, close.

This is the seed's skeleton workflow (``*_bpf__open``, ``bpf_map__set_max_entries``,
``*_bpf__load``, ``*_bpf__attach``) for any ``.bpf.o`` file, without generated code.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import stat
import struct
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Iterator, TypeVar

from . import attach as _attach
from . import features
from ._sys import bpf as sys_bpf
from ._sys.bpf import MapType
from ._sys.libbpf import LIBBPF_ERRNO_END, LIBBPF_ERRNO_START, capture_log, lib, strerror
from ._sys.mounts import ensure_tracefs
from .btf import KIND_STRUCT, BTFTypes
from .build import cached_object
from .errors import BPFError, bpf_error
from .features import bump_memlock_rlimit  # noqa: F401 (was defined here; tests import it from here)
from .globals import GlobalData, Section, sections
from .maps import Map, check_ring_size

log = logging.getLogger("bpfring")

# Section prefixes whose auto-attach goes through tracefs (tracepoint ids, legacy k/uprobes).
_TRACEFS_SECTIONS = ("tp/", "tracepoint/", "kprobe/", "kretprobe/", "ksyscall/", "kretsyscall/", "uprobe", "uretprobe")

_F = TypeVar("_F", bound=Callable[..., Any])


def _exclusive(method: _F) -> _F:
    """A method of an Object, or of a Program of one, that hands libbpf pointers into the object:
    run it holding the object's lock, so that close() in another thread waits for it instead of
    freeing what libbpf is reading (a crash), and a link it makes is the object's to destroy."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        obj = self if isinstance(self, Object) else self._obj
        return obj._exclusively(method, self, *args, **kwargs)

    return run  # type: ignore[return-value]


def _core_relocations(path: str) -> int:
    """How many bytes of CO-RE relocation records the ELF object at ``path`` carries (0: none).

    They live in the .BTF.ext section, after its header's func_info and line_info parts
    (include/uapi/linux/btf.h's btf_ext_header; the core_relo fields exist when hdr_len >= 32).
    The part starts with its record size (4 bytes), so records are there when it is longer.
    """
    try:
        with open(path, "rb") as f:
            elf = f.read()
        return _relocation_bytes(elf)
    except (OSError, ValueError, OverflowError, struct.error, IndexError):  # unreadable or malformed: libbpf says what
        return 0


def _relocation_bytes(elf: bytes) -> int:
    if elf[:4] != b"\x7fELF" or elf[4] != 2:  # ELFCLASS64, as clang -target bpf writes
        return 0
    end = "<" if elf[5] == 1 else ">"  # ELFDATA2LSB: bpfel
    shoff, = struct.unpack_from(end + "Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:  # (name offset, file offset, size) of section i
        name, = struct.unpack_from(end + "I", elf, shoff + i * shentsize)
        offset, size = struct.unpack_from(end + "QQ", elf, shoff + i * shentsize + 24)
        return name, offset, size

    _, names, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        if elf[names + name : names + name + 9] == b".BTF.ext\0":
            hdr_len, = struct.unpack_from(end + "I", elf, offset + 4)
            if hdr_len < 32 or size < 32:
                return 0
            _, relo_len = struct.unpack_from(end + "II", elf, offset + 24)
            return relo_len - 4 if relo_len > 4 else 0
    return 0


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def bundled_object(name: str) -> str:
    """Path of a BPF object shipped with bpfring (``"execsnoop"`` -> ``.../bpf/execsnoop.bpf.o``)."""
    path = os.path.join(os.path.dirname(__file__), "bpf", f"{name}.bpf.o")
    if not os.path.exists(path):
        raise bpf_error(
            errno.ENOENT,
            f"bundled BPF object {name!r} (bpfring was installed without it: reinstall with clang and bpftool present)",
        )
    return path


def libbpf_error(err: int, what: str) -> BPFError:
    """:func:`bpf_error` that also knows libbpf's own error codes (4000 and up: "BPF object format invalid"...)."""
    if LIBBPF_ERRNO_START <= err < LIBBPF_ERRNO_END:
        first, _, details = what.partition("\n")
        return BPFError(err, f"{first}: {strerror(err)}" + (f"\n{details}" if details else ""))
    return bpf_error(err, what)


def _decode(name: bytes | None) -> str:
    """A name from an ELF file or a path: not necessarily UTF-8 (undecodable bytes are kept as escapes)."""
    return os.fsdecode(name or b"")


class _Attachment:
    """What an :class:`Object` keeps of each link it made: no reference back to the object.

    The object must keep a link its caller did not (``prog.attach()`` alone stays attached until
    ``close()``), and the :class:`Link` keeps its program and so the object alive. Were the object
    to keep the Link itself, every attached object would be a reference cycle: dropped without
    ``close()``, it would stay attached until the cyclic collector ran, or forever with
    ``gc.disable()``.
    """

    __slots__ = ("ptr", "prog_ptr", "prog_name", "section", "target", "wrapper", "pid", "call", "__weakref__")
    _taking = threading.Lock()

    def __init__(self, ptr: int, program: Program, target: str) -> None:
        self.ptr: int | None = ptr
        # the program by its pointer and names: Object.links asks libbpf nothing, as close() in
        # another thread may be freeing the program
        self.prog_ptr, self.prog_name, self.section = program._ptr, program.name, program.section
        self.target = target
        self.wrapper: weakref.ref[Link] | None = None
        self.pid = os.getpid()
        self.call = program._obj._attaching  # the Object.attach() that made it, if one did
        _every_attachment.add(self)

    def destroy(self) -> bool:
        """Detach, once however many threads call it (libbpf frees the link).

        In a fork() child (at the fork: see _release_in_child) only the child's copy of the link fd
        goes: libbpf's detach would also disable the perf event (PERF_EVENT_IOC_DISABLE) that the
        parent shares, stopping the parent's program. A perf event's own fd stays open in the child
        (libbpf keeps it private); it holds no program once the parent's link is gone.
        """
        destroy_link = lib.bpf_link__destroy  # (looked up before the link is taken: Python code)
        in_child = os.getpid() != self.pid
        ptr, freed = None, []
        try:
            with self._taking:
                ptr, self.ptr = self.ptr, None
            if ptr and in_child:
                fd = lib.bpf_link__fd(ptr)
                lib.bpf_link__disconnect(ptr)  # bpf_link__destroy() then frees it without detaching
                os.close(fd)
                self.pid = os.getpid()  # (done: a destroy() again, after a Ctrl-C, only frees it)
            if ptr:  # `freed` is filled in C once libbpf has freed it (see Program.attach)
                freed.extend(map(destroy_link, (ptr,)))
        except BaseException:
            # A Ctrl-C (a signal handler's exception, maybe after it closed the object) once this
            # call took the link: nobody else would free it, attached for good. Freed here, with no
            # Python code first, then raised; in a fork child given back, for the next destroy().
            if ptr and not freed:
                if in_child:
                    self.ptr = ptr
                else:
                    destroy_link(ptr)
            raise
        return bool(ptr)


# Every attachment of this process: a fork() child lets go of its parent's (see _release_in_child).
_every_attachment: weakref.WeakSet[_Attachment] = weakref.WeakSet()
# Every open Object of this process: a fork() child takes a fresh lock for each.
_every_object: weakref.WeakSet[Object] = weakref.WeakSet()


def _release_in_child() -> None:
    """A link stays attached while any copy of its fd is open: were a fork() child (one that does
    not exec) to keep its copies, the parent's destroy() would not detach while the child lived.
    The links are the parent's to detach: the child closes its copies at once.

    An object's lock that another thread held at the fork stays held in the child, where that
    thread does not exist: each object gets a new one, so the child can close its copy. So does
    the attachments' own (another thread's destroy() may have held it)."""
    _Attachment._taking = threading.Lock()
    for attachment in list(_every_attachment):
        attachment.destroy()
    for obj in list(_every_object):
        obj._lock = threading.RLock()
        obj._running = {}  # the threads that ran them are not in this process


os.register_at_fork(after_in_child=_release_in_child)


class Link:
    """An attachment of a program (a ``struct bpf_link``); destroying it detaches."""

    def __init__(self, attachment: _Attachment, program: Program) -> None:
        self._attachment = attachment
        self.program = program
        self.target = attachment.target or f"section {program.section!r}"
        attachment.wrapper = weakref.ref(self)

    def destroy(self) -> None:
        """Detach; idempotent. The object's ``links`` no longer lists it."""
        if self._attachment.destroy():
            obj = self.program._obj
            with obj._lock:  # close() in another thread may be clearing the list
                if self._attachment in obj._links:
                    obj._links.remove(self._attachment)

    close = destroy

    @property
    def attached(self) -> bool:
        return bool(self._attachment.ptr)

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"<Link {self.program.name} -> {self.target} {'attached' if self.attached else 'detached'}>"


class Program:
    """A program of an :class:`Object`; valid while its object is open."""

    def __init__(self, ptr: int, obj: Object, name: str | None = None, section: str | None = None) -> None:
        self._ptr = ptr
        self._obj = obj
        self.name: str = _decode(lib.bpf_program__name(ptr)) if name is None else name
        self.section: str = _decode(lib.bpf_program__section_name(ptr)) if section is None else section

    @property
    @_exclusive
    def fd(self) -> int:
        """The program's fd after load (owned by the object)."""
        self._obj._check_open()
        fd = lib.bpf_program__fd(self._ptr)
        if fd < 0:
            raise ValueError(f"program {self.name!r} is not loaded")
        return fd

    @property
    @_exclusive
    def autoload(self) -> bool:
        self._obj._check_open()
        return bool(lib.bpf_program__autoload(self._ptr))

    @autoload.setter
    @_exclusive
    def autoload(self, value: bool) -> None:
        """Whether :meth:`Object.load` loads this program (set before load)."""
        self._obj._check_not_loaded(f"set autoload of {self.name!r}")
        lib.bpf_program__set_autoload(self._ptr, bool(value))

    @_exclusive
    def attach(self) -> Link:
        """Attach the way libbpf does by section name (``tp/``, ``raw_tp/``, ``kprobe/``, ``fentry/``...)."""
        self._obj._check_open()
        if self.section.startswith(_TRACEFS_SECTIONS):
            ensure_tracefs()
        # The link goes into `made` in C, as libbpf returns it: a Ctrl-C is raised only after (at
        # the return of a C function), where `ptr = lib.bpf_program__attach(...)` lost it, attached.
        made: list[int] = []
        try:
            with capture_log() as lines:
                made.extend(map(lib.bpf_program__attach, (self._ptr,)))
            ptr = made[0]
            if not ptr:
                err = ctypes.get_errno()
                detail = f" ({lines[-1]})" if lines else ""
                raise libbpf_error(err, f"attaching program {self.name!r} (section {self.section!r}){detail}")
            return self._link(ptr)
        except BaseException:
            if made and made[0] and not any(a.ptr == made[0] for a in self._obj._links):  # not the object's yet
                for attachment in list(_every_attachment):  # one made for it, kept by the traceback:
                    if attachment.ptr == made[0]:  # no destroy() of it (a fork child's) frees it again
                        attachment.ptr = None
                lib.bpf_link__destroy(made[0])
            raise

    def _link(self, ptr: int, target: str = "") -> Link:
        attachment = _Attachment(ptr, self, target)
        self._obj._links.append(attachment)
        return Link(attachment, self)

    def _check_loaded(self, what: str) -> None:
        self._obj._check_open()
        if lib.bpf_program__fd(self._ptr) < 0:
            raise ValueError(f"cannot {what}: program {self.name!r} is not loaded (call load() on its object first)")

    @_exclusive
    def attach_kprobe(self, function: str, retprobe: bool = False, offset: int = 0) -> Link:
        """Attach to the entry (or, with ``retprobe``, the return) of kernel ``function``, at ``offset``.

        Raises :class:`BPFError` (EOPNOTSUPP) on kernels built without kprobes.
        """
        self._check_loaded("attach a kprobe")
        ptr = _attach.kprobe(self, function, retprobe, offset)
        return self._link(ptr, f"{'kretprobe' if retprobe else 'kprobe'}:{function}" + (f"+{offset:#x}" if offset else ""))

    @_exclusive
    def attach_tracepoint(self, category: str, name: str) -> Link:
        """Attach to the tracepoint ``category/name`` (as in /sys/kernel/tracing/events/CATEGORY/NAME)."""
        self._check_loaded("attach a tracepoint")
        return self._link(_attach.tracepoint(self, category, name), f"tracepoint:{category}/{name}")

    @_exclusive
    def attach_raw_tracepoint(self, name: str) -> Link:
        """Attach a ``raw_tp`` program to the raw tracepoint ``name`` (``"sys_enter"``, ``"sched_switch"``...)."""
        self._check_loaded("attach a raw tracepoint")
        return self._link(_attach.raw_tracepoint(self, name), f"raw_tracepoint:{name}")

    @_exclusive
    def attach_uprobe(
        self,
        binary: str | os.PathLike[str],
        symbol: str | None = None,
        offset: int = 0,
        pid: int = -1,
        retprobe: bool = False,
    ) -> Link:
        """Attach to a function of a user-space ``binary`` (an executable or a shared library).

        The probe sits at ``symbol`` plus ``offset``, or at the file ``offset`` alone without a
        symbol; ``pid`` -1 traces every process that runs the binary. A binary without a ``/`` is
        looked up as libbpf does (``"libc.so.6"``).
        """
        self._check_loaded("attach a uprobe")
        ptr = _attach.uprobe(self, binary, symbol, offset, pid, retprobe)
        where = f"{os.fsdecode(os.fspath(binary))}:{symbol or hex(offset)}" + (f"+{offset:#x}" if symbol and offset else "")
        return self._link(ptr, f"{'uretprobe' if retprobe else 'uprobe'}:{where}")

    @_exclusive
    def attach_perf_event(self, fd: int) -> Link:
        """Run the program on each overflow of the perf event ``fd`` (a sampling event, say).

        The link holds its own duplicate of ``fd``: closing yours does not detach it.
        """
        self._check_loaded("attach to a perf event")
        return self._link(_attach.perf_event(self, fd), f"perf_event:fd {fd}")

    def test_run(
        self, ctx: bytes | bytearray = b"", data: bytes = b"", repeat: int = 0, cpu: int | None = None
    ) -> sys_bpf.TestRunResult:
        """Run the program once (or ``repeat`` times) in the kernel with BPF_PROG_TEST_RUN.

        Runs in other threads go on at once, side by side (producers racing each other); the
        object's close() waits for them, so the fd stays this program's for the whole run.
        """
        obj, run = self._obj, object()
        try:
            with obj._lock:
                fd = self.fd
                obj._running[run] = threading.get_ident()
            return sys_bpf.prog_test_run(fd, data_in=data, ctx_in=ctx, repeat=repeat, cpu=cpu)
        finally:
            # Uncounted by one C call, before any Python function is entered: a Ctrl-C (a signal
            # handler's exception) landing there would leave a run counted for ever, close() waiting.
            obj._running.pop(run, None)
            obj._ran()  # also for a close() put off while the fd was taken, before the run counted

    def __repr__(self) -> str:
        return f"<Program {self.name} section={self.section!r}>"


class Object:
    """A BPF ELF object file opened by libbpf.

    Typical use, as in the seed::

        with bpfring.Object("execsnoop.bpf.o") as obj:
            obj.set_max_entries("rb", 1 << 20)   # optional, before load
            obj.load()
            obj.attach()
            with bpfring.RingBuffer(obj.map("rb"), handle_event) as rb:
                ...
    """

    def __init__(self, path: str | bytes | os.PathLike[str]) -> None:
        """Open a ``.bpf.o`` file, or a ``.bpf.c`` source built first (cached: see :func:`bpfring.build.cached_object`)."""
        self._ptr: int | None = None
        # Held around every use of libbpf's pointers into the object (see _exclusively); a C lock,
        # whose `with` is safe against Ctrl-C, and reentrant: methods call each other.
        self._lock = threading.RLock()
        self._close_asked = False  # close() called inside a method of this object, in its own thread
        self._closing = False  # close() waits for test runs in other threads; nothing new starts
        self._close_after_runs = False  # that close() was interrupted: the last run to end does it
        self._attaching: object | None = None  # the Object.attach() under way: marks the links it makes
        # Program.test_run()s under way (each its own key) and their threads: they run without the
        # lock, close() waits for them.
        self._running: dict[object, int] = {}
        self.path: str = os.fsdecode(os.fspath(path))
        self.source: str | None = None
        if self.path.endswith(".c"):
            self.source = self.path
            self.path = os.fspath(cached_object(self.source))
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            raise bpf_error(errno.ENOENT, f"opening BPF object {self.path!r}") from None
        except OSError as exc:
            raise bpf_error(exc.errno or errno.EINVAL, f"opening BPF object {self.path!r}") from None
        if not stat.S_ISREG(mode):  # libbpf would block on a FIFO, or read a device forever
            raise BPFError(
                errno.EINVAL, f"opening BPF object {self.path!r}: it is {_file_kind(mode)}, not a regular file"
            )
        with capture_log() as lines:
            ptr = lib.bpf_object__open_file(os.fsencode(self.path), None)
        if not ptr:
            detail = f" ({lines[-1]})" if lines else ""
            raise libbpf_error(ctypes.get_errno(), f"opening BPF object {self.path!r}{detail}")
        self._ptr = ptr
        self._loaded = False
        self._links: list[_Attachment] = []
        self._maps: dict[str, Map] = {}
        self._sections_found: dict[str, Section] | None = None
        self._global_maps: dict[str, Any] = {}  # section -> its live mapping (globals._Live), made on first use
        self.name: str = _decode(lib.bpf_object__name(ptr))
        _every_object.add(self)

    # -- before load ----------------------------------------------------------------------------

    def _check_open(self) -> int:
        if self.closed:
            raise ValueError(f"BPF object {self.path!r} is closed")
        return self._ptr

    def _exclusively(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``method(*args)`` holding the lock. A close() asked for inside it, in this thread (by a
        signal handler, or a logging handler called by libbpf's log) is done once it returns."""
        try:
            with self._lock:
                return method(*args, **kwargs)
        finally:
            if self._close_asked:
                self.close()

    def _ran(self) -> None:
        """A test run in this thread ended (or never began): do a close() asked for in this thread
        while it held the lock or ran; or, the last run to end, one interrupted while it waited."""
        if self._close_asked and threading.get_ident() not in self._running.values():
            self.close()
        elif self._close_after_runs and not self._running:  # (not waiting here for the other runs)
            self.close()

    def _check_not_loaded(self, what: str) -> None:
        self._check_open()
        if self._loaded:
            raise ValueError(f"cannot {what}: object {self.name!r} is already loaded")

    def _map_ptr(self, name: str) -> int:  # valid while the caller holds the lock
        ptr = None
        while True:
            ptr = lib.bpf_object__next_map(self._check_open(), ptr)
            if not ptr:
                raise KeyError(f"object {self.name!r} has no map {name!r} (it has: {', '.join(self.map_names)})")
            if _decode(lib.bpf_map__name(ptr)) == name:
                return ptr

    @property
    @_exclusive
    def map_names(self) -> list[str]:
        names, ptr = [], None
        while ptr := lib.bpf_object__next_map(self._check_open(), ptr):
            names.append(_decode(lib.bpf_map__name(ptr)))
        return names

    @property
    @_exclusive
    def programs(self) -> list[Program]:
        progs, ptr = [], None
        while ptr := lib.bpf_object__next_program(self._check_open(), ptr):
            progs.append(Program(ptr, self))
        return progs

    def program(self, name: str) -> Program:
        for prog in self.programs:
            if prog.name == name:
                return prog
        raise KeyError(f"object {self.name!r} has no program {name!r}")

    @_exclusive
    def set_max_entries(self, map_name: str, max_entries: int) -> None:
        """Override a map's size before load (libbpf's ``bpf_map__set_max_entries``)."""
        max_entries = sys_bpf.check_u32("max_entries", max_entries)  # libbpf would cut it to 32 bits
        self._check_not_loaded(f"resize map {map_name!r}")
        ptr = self._map_ptr(map_name)
        if lib.bpf_map__type(ptr) in (MapType.RINGBUF, MapType.USER_RINGBUF):
            check_ring_size(max_entries)  # libbpf would round it up silently
        ret = lib.bpf_map__set_max_entries(ptr, max_entries)
        if ret < 0:
            raise bpf_error(-ret, f"setting max_entries={max_entries} on map {map_name!r}")

    @_exclusive
    def initial_value(self, map_name: str) -> bytearray:
        """A copy of the initial contents of a global-data map (``".rodata"``, ``".data"``, ``".bss"``)."""
        size = ctypes.c_size_t()
        addr = lib.bpf_map__initial_value(self._map_ptr(self._resolve(map_name)), ctypes.byref(size))
        if not addr:
            raise ValueError(f"map {map_name!r} has no initial value (not a global-data map)")
        return bytearray(ctypes.string_at(addr, size.value))

    @_exclusive
    def set_initial_value(self, map_name: str, data: bytes) -> None:
        """Set a global-data map's contents before load (e.g. ``const volatile`` settings in .rodata)."""
        self._check_not_loaded(f"set the initial value of {map_name!r}")
        ptr = self._map_ptr(self._resolve(map_name))
        size = ctypes.c_size_t()
        if lib.bpf_map__initial_value(ptr, ctypes.byref(size)) and size.value != len(data):
            raise ValueError(
                f"map {map_name!r} takes an initial value of {size.value} bytes, got {len(data)} "
                "(obj.rodata.NAME = value sets one variable by name)"
            )
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        ret = lib.bpf_map__set_initial_value(ptr, buf, len(data))
        if ret < 0:
            raise bpf_error(-ret, f"setting the initial value of map {map_name!r} ({len(data)} bytes)")

    # -- load, attach ---------------------------------------------------------------------------

    @_exclusive
    def load(self) -> Object:
        """Create the maps and load the programs (libbpf's ``bpf_object__load``)."""
        self._check_not_loaded("load")
        if not features.has(features.BTF) and _core_relocations(self.path):
            # libbpf would stop at "failed to find valid kernel BTF"; say what is missing instead
            raise features.FeatureError(
                errno.EOPNOTSUPP,
                f"loading BPF object {self.path!r}: its programs read kernel structures through CO-RE "
                f"relocations, which need {features.BTF} (Linux {'.'.join(map(str, features.BTF.since))} or "
                f"later, built with it); this kernel, {features.kernel_release()}, has none",
            )
        bump_memlock_rlimit()
        with capture_log() as lines:
            ret = lib.bpf_object__load(self._ptr)
        if ret < 0:
            self._require_map_features()  # a map type this kernel lacks: say which, since when
            tail = "\n".join(lines[-20:])
            if "PROG LOAD LOG" in tail:  # EACCES/EINVAL here is the verifier's verdict, not a privilege problem
                raise BPFError(-ret, f"loading BPF object {self.path!r}: the verifier rejected a program\n{tail}")
            raise libbpf_error(-ret, f"loading BPF object {self.path!r}" + (f"\n{tail}" if tail else ""))
        self._loaded = True
        return self

    def _require_map_features(self) -> None:
        ptr = None
        while ptr := lib.bpf_object__next_map(self._check_open(), ptr):
            feature = {MapType.RINGBUF: features.RINGBUF, MapType.USER_RINGBUF: features.USER_RINGBUF}.get(
                lib.bpf_map__type(ptr)
            )
            if feature is not None:
                features.require(feature)

    @property
    def loaded(self) -> bool:
        return self._loaded

    @_exclusive
    def map(self, name: str) -> Map:
        """The loaded map ``name`` as a :class:`Map` (owned by this object, closed with it).

        Global-data maps may be named by their section alone (``".bss"``), since libbpf prefixes
        them with a truncated object name.
        """
        ptr = self._map_ptr(self._resolve(name))  # a missing map is named as missing, loaded or not
        if not self._loaded:
            raise ValueError(f"map {name!r} has no fd before load(): call load() first")
        if name not in self._maps:
            self._maps[name] = Map.from_fd(lib.bpf_map__fd(ptr))
        return self._maps[name]

    def _resolve(self, name: str) -> str:
        names = self.map_names
        if name in names or not name.startswith("."):
            return name
        matches = [n for n in names if n.endswith(name)]
        return matches[0] if len(matches) == 1 else name

    def attach(self) -> list[Link]:
        """Attach every loaded program that libbpf can attach from its section name alone.

        Programs that have no automatic attach point (``syscall``, ``xdp``...) are left for the
        caller, as libbpf's skeleton ``__attach`` does. All or nothing: when one program fails to
        attach (or a Ctrl-C lands anywhere in the call), the links this call made are destroyed
        before the error is raised; links the caller made before stay.
        """
        call = object()  # marks the links this call makes, returned or not (a Ctrl-C may land between)
        try:
            return self._exclusively(self._attach_all, call)  # type: ignore[no-any-return]
        except BaseException:
            self._destroy_made_by(call)  # (again, for a Ctrl-C landing as the lock was let go)
            raise

    @_exclusive
    def _destroy_made_by(self, call: object) -> None:
        for attachment in [a for a in self._links if a.call is call]:
            attachment.destroy()
            self._links.remove(attachment)

    def _attach_all(self, call: object) -> list[Link]:
        self._check_open()
        if not self._loaded:
            raise ValueError("attach() needs a loaded object: call load() first")
        links: list[Link] = []
        self._attaching = call
        try:
            for prog in self.programs:
                if not prog.autoload:
                    continue
                try:
                    links.append(prog.attach())
                except BPFError as exc:
                    if exc.errno != errno.EOPNOTSUPP:  # no automatic attach point for this section
                        raise
                    log.debug("program %s (%s) has no automatic attach point", prog.name, prog.section)
        except BaseException:
            self._destroy_made_by(call)  # in the lock: no other thread sees them listed after
            raise
        finally:
            self._attaching = None
        return links

    @_exclusive
    def struct(self, name: str) -> Any:
        """``struct name`` as its BPF program declares it, as a numpy dtype (from the object's BTF).

        Offsets, padding, nested structs and arrays follow the C layout; ``char x[N]`` becomes
        bytes (``S{N}``). Use it with :meth:`RingBuffer.consume_batch`, or ``np.frombuffer`` in a
        callback, so a consumer never restates a C struct in Python.
        """
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"a struct name is a C identifier such as 'event', got {name!r}")
        btf = lib.bpf_object__btf(self._check_open())
        if not btf:
            raise ValueError(f"{self.path!r} has no BTF: compile it with clang -g")
        types = BTFTypes(btf, f"BPF object {self.name!r}")
        return types.dtype(types.find(name, KIND_STRUCT), f"struct {name}")

    # -- global variables -----------------------------------------------------------------------

    @_exclusive
    def _sections(self) -> dict[str, Section]:
        ptr = self._check_open()  # found once, but no GlobalData of a closed object
        if self._sections_found is None:
            self._sections_found = sections(ptr, f"BPF object {self.name!r}")
        return self._sections_found

    @property
    def global_sections(self) -> list[str]:
        """The object's global-data sections (``".rodata"``, ``".bss"``, ``".data.custom"``...)."""
        return list(self._sections())

    def global_data(self, section: str) -> GlobalData:
        """The variables of one global-data section by name and type (see :mod:`bpfring.globals`)."""
        found = self._sections()
        if section not in found:
            known = ", ".join(found) or "none"
            raise KeyError(f"object {self.name!r} has no global-data section {section!r} (it has: {known})")
        return GlobalData(self, found[section])

    @property
    def rodata(self) -> GlobalData:
        """``const volatile`` globals: ``obj.rodata.targ_pid = 1234`` before load, read-only after."""
        return self.global_data(".rodata")

    @property
    def data(self) -> GlobalData:
        """Initialised globals: initial values before load, the live values after."""
        return self.global_data(".data")

    @property
    def bss(self) -> GlobalData:
        """Zero-initialised globals: initial values before load, the live values after."""
        return self.global_data(".bss")

    @property
    def links(self) -> list[Link]:
        """The attached links (a destroyed one leaves the list), kept by the caller or not."""
        links = []
        for attachment in list(self._links):
            if not attachment.ptr:  # destroyed by another thread, or the parent's (in a fork child)
                continue
            link = attachment.wrapper() if attachment.wrapper else None
            if link is None:  # the caller dropped it: one anew, of the same program and target
                link = Link(attachment, Program(attachment.prog_ptr, self, attachment.prog_name, attachment.section))
            links.append(link)
        return links

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Detach every link, close every map handed out, and free the libbpf object.

        A method running in another thread finishes first (what it made is then destroyed here);
        one called after raises ValueError.
        """
        if self._lock._is_owned() or threading.get_ident() in self._running.values():  # type: ignore[attr-defined]
            # Inside a method of this object (or a test run: a signal handler), still using
            # libbpf's pointers or the program's fd: done once it returns.
            self._close_asked = True
            return
        try:
            with self._lock:
                self._closing = True  # no run starts now: each takes its fd in the lock
            # Test runs under way, outside the lock, looked at now and then: a Condition's wait
            # (Python code) let a Ctrl-C land with the lock let go, and close() went on without it.
            while self._running:
                time.sleep(0.005)
            with self._lock:
                self._close()
        except BaseException:  # interrupted (Ctrl-C): the last run to end closes
            self._close_after_runs = True
            if not self._running:  # (or none is left to)
                with self._lock:
                    self._close()
            raise

    def _close(self) -> None:
        """Free everything. A Ctrl-C landing halfway is raised once the rest is done (each step is
        idempotent: done again, twice at most); it left the object saying closed and holding
        fds and attached links until collected."""
        interrupted: BaseException | None = None
        for _ in range(3):
            try:
                self._free()
                break
            except BaseException as exc:  # noqa: PERF203 (a Ctrl-C, or a signal handler's exception)
                interrupted = interrupted or exc
        if interrupted is not None:
            raise interrupted

    def _free(self) -> None:
        if not self._ptr:
            return
        for attachment in list(self._links):  # a copy: Link.destroy() in another thread removes its own
            attachment.destroy()
        self._links.clear()
        for live in self._global_maps.values():
            live.close()
        self._global_maps.clear()
        for m in self._maps.values():
            m.close()
        self._maps.clear()
        close_object = lib.bpf_object__close  # (looked up first: Python code, where a Ctrl-C can land)
        ptr, self._ptr = self._ptr, None
        close_object(ptr)

    @property
    def closed(self) -> bool:
        return not self._ptr or self._close_asked or self._closing or self._close_after_runs

    def __enter__(self) -> Object:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_ptr", None):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)
            self.close()

    def __iter__(self) -> Iterator[Program]:
        return iter(self.programs)

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("loaded" if self._loaded else "opened")
        return f"<Object {self.name!r} {state}>"

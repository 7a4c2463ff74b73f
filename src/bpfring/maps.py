"""Map: one owned file descriptor of a BPF map, and what the kernel says about it."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import warnings
from typing import Union

from . import features
from ._sys import bpf as sys_bpf
from ._sys.bpf import MapType, map_type_name
from ._sys.mounts import BPFFS, ensure_bpffs, is_mounted_bpffs
from .errors import BPFError, BPFNotFoundError, BPFPermissionError

PAGE_SIZE = mmap.PAGESIZE

# Python's mmap keeps a dup of the fd it maps, unless told not to (Python 3.13+): one fd per
# mapping that nothing here needs (the mapping outlives its fd by itself).
_MMAP_OPTIONS = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def map_shared(fd: int, length: int, prot: int, offset: int = 0) -> mmap.mmap:
    """mmap(MAP_SHARED) of ``fd``; OSError as mmap raises it.

    A length past ssize_t is EOVERFLOW too, rather than the OverflowError Python's mmap raises,
    so callers that close their fd on OSError also close it then.
    """
    if length > sys.maxsize:
        raise OSError(errno.EOVERFLOW, f"mmap of {length} bytes: {os.strerror(errno.EOVERFLOW)}")
    return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=prot, offset=offset, **_MMAP_OPTIONS)

# Ring maps whose max_entries is a byte size: a power of two and a multiple of the page size
# (kernel/bpf/ringbuf.c, ringbuf_map_alloc).
_RING_TYPES = (MapType.RINGBUF, MapType.USER_RINGBUF)
_RING_FEATURES = {MapType.RINGBUF: features.RINGBUF, MapType.USER_RINGBUF: features.USER_RINGBUF}


def check_ring_size(max_entries: int) -> None:
    if max_entries <= 0 or max_entries & (max_entries - 1) or max_entries % PAGE_SIZE:
        raise ValueError(
            f"ring size must be a power of two and a multiple of the page size ({PAGE_SIZE}), got {max_entries}"
        )


class Map:
    """A BPF map held by an fd this object owns and closes.

    Build one with :meth:`create`, :meth:`from_fd`, :meth:`from_pinned` or :meth:`from_id`;
    its type, size and name are read from the kernel (BPF_OBJ_GET_INFO_BY_FD), never guessed.
    """

    def __init__(self, fd: int, *, _origin: str = "") -> None:
        """Take ownership of ``fd``; it is closed if it is not a BPF map."""
        self._fd = fd
        what = _origin or f"fd {fd}"
        try:
            kind = os.readlink(f"/proc/self/fd/{fd}")
            if kind != "anon_inode:bpf-map":
                raise BPFError(errno.EINVAL, f"{what} is not a BPF map (it is {kind})")
            try:
                info = sys_bpf.map_get_info(fd)
            except BPFPermissionError:
                info = sys_bpf.map_info_from_fdinfo(fd)  # (kernels before 5.19: see there)
                if info is None:
                    raise
        except BaseException:
            self._fd = -1
            os.close(fd)
            raise
        self.type: int = _as_map_type(info.type)
        self.id: int = info.id
        self.key_size: int = info.key_size
        self.value_size: int = info.value_size
        self.max_entries: int = info.max_entries
        self.map_flags: int = info.map_flags
        self.name: str = info.name.decode(errors="replace")

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        type: int,
        max_entries: int,
        key_size: int = 0,
        value_size: int = 0,
        name: str | None = None,
        map_flags: int = 0,
    ) -> Map:
        """BPF_MAP_CREATE. Ring maps take their size in bytes: a power of two, page-aligned.

        Every number must fit the kernel's u32 fields: a ValueError names the one that does not.
        """
        type = sys_bpf.check_u32("map type", type)
        if type in _RING_TYPES:
            check_ring_size(max_entries)
            if key_size or value_size:
                raise ValueError(f"{map_type_name(type)} takes key_size=0 and value_size=0")
        features.bump_memlock_rlimit()  # kernels before 5.11 charge the map to RLIMIT_MEMLOCK
        try:
            fd = sys_bpf.map_create(type, key_size, value_size, max_entries, map_flags, name or "")
        except BPFError as exc:
            if exc.errno == errno.EINVAL and type in _RING_FEATURES:  # an unknown map type is EINVAL too
                features.require(_RING_FEATURES[type])
            raise
        return cls(fd)

    @classmethod
    def from_fd(cls, fd: int) -> Map:
        """A new Map on a duplicate of ``fd``; the caller keeps its own fd."""
        if not isinstance(fd, int) or isinstance(fd, bool):
            raise TypeError(f"a map fd must be an int, got {type(fd).__name__}")
        if fd > sys_bpf.INT_MAX:  # os.dup would raise OverflowError; negative fds are EBADF below
            raise ValueError(f"a map fd must be from 0 to {sys_bpf.INT_MAX} (a file descriptor), got {fd}")
        try:
            dup = os.dup(fd)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise BPFError(exc.errno, f"fd {fd} is not an open file descriptor") from None
            raise BPFError(exc.errno, f"can't duplicate map fd {fd}: {exc.strerror}") from None
        return cls(dup, _origin=f"fd {fd}")

    @classmethod
    def from_pinned(cls, path: str | os.PathLike[str]) -> Map:
        """Open the map pinned at ``path`` on bpffs (BPF_OBJ_GET)."""
        path = os.fspath(path)
        try:
            fd = sys_bpf.obj_get(path)
        except BPFError as exc:
            # The kernel answers EACCES for an existing path that is not on bpffs, and for a
            # directory on it: neither is about privileges.
            if exc.errno in (errno.EACCES, errno.EPERM) and os.path.isdir(path):
                raise BPFError(errno.EISDIR, f"{path!r} is a directory, not a BPF object pinned on bpffs") from None
            if exc.errno in (errno.EACCES, errno.EPERM) and os.path.exists(path) and not is_mounted_bpffs(path):
                raise BPFError(errno.EINVAL, f"{path!r} is not a BPF object pinned on bpffs") from None
            if exc.errno == errno.ENOENT and _under(os.path.abspath(path), BPFFS) and not is_mounted_bpffs(BPFFS):
                raise BPFNotFoundError(
                    errno.ENOENT,
                    f"nothing is pinned at {path!r}: bpffs is not mounted at {BPFFS} (pins do not outlive a reboot)",
                ) from None
            raise
        return cls(fd, _origin=f"{path!r}")

    @classmethod
    def from_id(cls, map_id: int) -> Map:
        """Open a map by its system-wide id (BPF_MAP_GET_FD_BY_ID; needs CAP_SYS_ADMIN)."""
        return cls(sys_bpf.map_get_fd_by_id(map_id), _origin=f"map id {map_id}")

    # -- properties and operations --------------------------------------------------------------

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError(f"map {self.name!r} (id {self.id}) is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def type_name(self) -> str:
        return map_type_name(self.type)

    def pin(self, path: str | os.PathLike[str]) -> None:
        """Pin the map on bpffs so it outlives this process (BPF_OBJ_PIN).

        A fresh boot leaves /sys/fs/bpf unmounted, and the kernel then answers ENOENT (it is a
        sysfs directory): a pin under it mounts bpffs there first (root only), as bpftool does.
        A directory elsewhere must already be on bpffs; the error says which one is not.
        """
        path = os.fspath(path)
        fd = self.fd
        directory = os.path.dirname(os.path.abspath(path))
        if _under(directory, BPFFS) and not is_mounted_bpffs(BPFFS):
            ensure_bpffs()
        try:
            sys_bpf.obj_pin(fd, path)
        except BPFError as exc:
            if exc.errno in (errno.ENOENT, errno.EPERM, errno.EACCES):
                _why_not_pinned(path, directory)
            raise

    def unpin(self, path: str | os.PathLike[str]) -> None:
        """Remove the pin of this map at ``path`` (the map lives on while anyone holds it).

        Refused if ``path`` pins another map, so a stale path never removes someone else's pin.
        """
        path = os.fspath(path)
        with Map.from_pinned(path) as pinned:
            if pinned.id != self.id:
                raise ValueError(
                    f"{path!r} pins map {pinned.name!r} (id {pinned.id}), not this map {self.name!r} (id {self.id})"
                )
        try:
            os.unlink(path)
        except OSError as exc:
            raise BPFError(exc.errno, f"can't unpin map {self.name!r} (id {self.id}) at {path!r}: {exc.strerror}") from None

    def lookup(self, key: bytes) -> bytes:
        """The value stored at ``key`` (raw bytes of value_size)."""
        k = ctypes.create_string_buffer(bytes(key), self.key_size)
        v = ctypes.create_string_buffer(self.value_size)
        sys_bpf.map_lookup_elem(self.fd, k, v)
        return v.raw

    def update(self, key: bytes, value: bytes, flags: int = sys_bpf.BPF_ANY) -> None:
        """Store ``value`` at ``key``."""
        if len(value) != self.value_size:
            raise ValueError(f"map {self.name!r} takes values of {self.value_size} bytes, got {len(value)}")
        k = ctypes.create_string_buffer(bytes(key), self.key_size)
        v = ctypes.create_string_buffer(bytes(value), self.value_size)
        sys_bpf.map_update_elem(self.fd, k, v, flags)

    def delete(self, key: bytes) -> None:
        """Remove ``key`` (BPF_MAP_DELETE_ELEM)."""
        sys_bpf.map_delete_elem(self.fd, ctypes.create_string_buffer(bytes(key), self.key_size))

    def mmap(self, length: int, prot: int, offset: int, what: str) -> mmap.mmap:
        """Map ``length`` bytes of the map at ``offset`` (shared); ``what`` names the region in errors."""
        try:
            return map_shared(self.fd, length, prot, offset)
        except OSError as exc:
            raise BPFError(exc.errno, f"can't mmap the {what} of map {self.name!r} (id {self.id})") from None

    def close(self) -> None:
        """Close the fd; idempotent. Pins and other holders keep the map alive in the kernel."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<Map {self.name!r} id={self.id} {self.type_name} max_entries={self.max_entries} {state}>"


MapLike = Union[Map, int, str, "os.PathLike[str]"]


def open_map(source: MapLike, expected: int) -> Map:
    """An owned Map from a Map (its fd is duplicated), an fd, or a pinned path; checks the type."""
    if isinstance(source, Map):
        m = Map.from_fd(source.fd)
    elif isinstance(source, int) and not isinstance(source, bool):
        m = Map.from_fd(source)
    elif isinstance(source, (str, os.PathLike)):
        m = Map.from_pinned(source)
    else:
        raise TypeError(f"expected a Map, an fd or a pinned path, got {type(source).__name__}")
    if m.type != expected:
        got = m.type_name
        m.close()
        raise ValueError(f"map {m.name!r} (id {m.id}) is {got}, expected {map_type_name(expected)}")
    return m


def _as_map_type(value: int) -> int:
    try:
        return MapType(value)
    except ValueError:
        return value


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory + "/")


def _why_not_pinned(path: str, directory: str) -> None:
    """For a pin at ``path`` the kernel refused: raise what is wrong with ``directory``, if it is
    missing or not on bpffs (the kernel says ENOENT or EPERM, as for a lack of privilege)."""
    if not os.path.isdir(directory):
        raise BPFNotFoundError(errno.ENOENT, f"can't pin at {path!r}: directory {directory!r} does not exist") from None
    if not is_mounted_bpffs(directory):
        raise BPFError(
            errno.EINVAL,
            f"can't pin at {path!r}: {directory!r} is not on bpffs (pins live on a bpf filesystem: pin under "
            f"{BPFFS}, or mount one with `mount -t bpf none {directory}`)",
        ) from None

"""Mount tracefs and bpffs where a fresh boot left them out.

libbpf attaches ``tp/`` programs through tracefs (/sys/kernel/tracing) and pins live on bpffs
(/sys/fs/bpf); neither is mounted on a minimal boot. Root can mount them; anyone else gets an
error that says which mount is missing.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os

from ..errors import BPFPermissionError, bpf_error

log = logging.getLogger("bpfring")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]

TRACEFS = "/sys/kernel/tracing"
BPFFS = "/sys/fs/bpf"

# Filesystem magic numbers from include/uapi/linux/magic.h, to tell a mount from an empty directory.
_FS_MAGIC = {"tracefs": 0x74726163, "bpf": 0xCAFE4A11}


def _statfs_type(path: str) -> int | None:
    class _StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]

    buf = _StatFs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return None
    return buf.f_type & 0xFFFFFFFF


def is_mounted(path: str, fstype: str) -> bool:
    return _statfs_type(path) == _FS_MAGIC[fstype]


def is_mounted_bpffs(path: str) -> bool:
    """Whether ``path`` lies on a bpffs mount."""
    return is_mounted(path, "bpf")


def _ensure(path: str, fstype: str, purpose: str) -> None:
    if is_mounted(path, fstype):
        return
    if os.geteuid() != 0:
        raise BPFPermissionError(
            errno.EPERM, f"{fstype} is not mounted at {path}, and {purpose} needs it: run as root, or `mount -t {fstype} none {path}`"
        )
    if _libc.mount(b"none", os.fsencode(path), fstype.encode(), 0, None) != 0:
        raise bpf_error(ctypes.get_errno(), f"mount -t {fstype} none {path} (needed for {purpose})")
    log.info("mounted %s at %s (needed for %s)", fstype, path, purpose)


def ensure_tracefs() -> None:
    """Make sure tracefs is mounted: libbpf needs it to attach tracepoint programs."""
    _ensure(TRACEFS, "tracefs", "attaching tracepoint programs")


def ensure_bpffs() -> None:
    """Make sure bpffs is mounted at /sys/fs/bpf: pinning needs it."""
    _ensure(BPFFS, "bpf", "pinning BPF objects")

"""One consumer per ring: a claim on a map, held by this process until close() or exit.

Two consumers of one ring take each other's records (a record goes to whichever walks it first,
and a stale consumer_pos store hands records out twice). A claim is a POSIX record lock
(fcntl F_SETLK) on a file named after the map's id: the kernel releases it when the holder
closes it or dies, so it never goes stale the way a pid file does, and F_GETLK names the holder.
Within a process, a registry of claimed map ids does the same (POSIX locks do not conflict with
their own process). A fork() child holds none of its parent's locks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import tempfile
import threading

from .errors import BPFError
from .maps import Map

# struct flock on x86-64 and arm64 Linux: short l_type, l_whence; off_t l_start, l_len; pid_t l_pid.
_FLOCK = "hhqqi4x"

_claimed: dict[int, str] = {}  # map id -> what holds it, in this process
_claimed_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A fork child holds none of its parent's locks, and may inherit _claimed_lock held."""
    global _claimed_lock
    _claimed.clear()
    _claimed_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def lock_dir() -> str:
    """Where claims live: $BPFRING_LOCK_DIR, else /run/bpfring (root), else a per-user temp dir."""
    chosen = os.environ.get("BPFRING_LOCK_DIR")
    if chosen:
        return chosen
    if os.geteuid() == 0 and os.path.isdir("/run"):
        return "/run/bpfring"
    return os.path.join(tempfile.gettempdir(), f"bpfring-{os.geteuid()}")


def _holder(fd: int) -> int:
    """The pid holding a conflicting lock on ``fd`` (0 if none)."""
    probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    return struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, probe))[4]


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f"pid {pid} ({f.read().strip()})"
    except OSError:
        return f"pid {pid}"


class Claim:
    """This process's claim on a map; ``release()`` (idempotent) gives it back."""

    def __init__(self, m: Map, what: str) -> None:
        self.map_id = m.id
        self._pid = os.getpid()
        self._fd = -1
        with _claimed_lock:
            holder = _claimed.get(m.id)
            if holder is not None:
                raise _busy(m, f"a {holder} in this process", what)
            directory = lock_dir()
            os.makedirs(directory, mode=0o755, exist_ok=True)
            fd = os.open(os.path.join(directory, f"map-{m.id}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
            except OSError as exc:
                try:
                    if exc.errno not in (errno.EACCES, errno.EAGAIN):
                        raise BPFError(exc.errno, f"can't claim map {m.name!r} (id {m.id}) in {directory}") from None
                    pid = _holder(fd)
                finally:
                    os.close(fd)
                raise _busy(m, _describe(pid) if pid > 0 else "another process", what) from None
            self._fd = fd
            _claimed[m.id] = what

    def release(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        os.close(fd)  # releases the lock (in the process that took it; a fork child holds none)
        if os.getpid() == self._pid:
            with _claimed_lock:
                _claimed.pop(self.map_id, None)


def _busy(m: Map, holder: str, what: str) -> BPFError:
    return BPFError(
        errno.EBUSY,
        f"map {m.name!r} (id {m.id}) is already consumed by {holder}: a ring has one consumer, and two "
        f"would take each other's records. Close that one first, or open this {what} with shared=True "
        "if you mean to share it (each record then goes to one of them)",
    )

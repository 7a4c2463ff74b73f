"""One consumer per ring (and one producer per user ring): a claim on a map, held by this process
until close() or exit.

Two consumers of one ring take each other's records (a record goes to whichever walks it first,
and a stale consumer_pos store hands records out twice). A claim is a POSIX record lock
(fcntl F_SETLK) on a file named after the map's id: the kernel releases it when the holder
closes it or dies, so it never goes stale the way a pid file does, and F_GETLK names the holder.
Within a process, a registry of claimed map ids does the same (POSIX locks do not conflict with
their own process). A fork() child holds none of its parent's locks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import tempfile
import threading
import weakref

from .errors import BPFError
from .maps import Map

# struct flock on x86-64 and arm64 Linux: short l_type, l_whence; off_t l_start, l_len; pid_t l_pid.
_FLOCK = "hhqqi4x"

_claimed: dict[int, str] = {}  # map id -> what holds it, in this process
# Reentrant: the garbage collector may finalize a buffer (releasing its claim) while this thread
# is inside Claim() holding it.
_claimed_lock = threading.RLock()
_open: weakref.WeakSet[Claim] = weakref.WeakSet()  # claims holding a lock file open


def _after_fork_in_child() -> None:
    """A fork child holds none of its parent's locks, and may inherit _claimed_lock held. It
    closes the lock files it inherited now: POSIX drops all of a process's locks on a file when it
    closes any descriptor of it, so closing one later would drop a claim the child made itself."""
    global _claimed_lock
    _claimed.clear()
    _claimed_lock = threading.RLock()
    for claim in list(_open):
        claim._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)

SHARED_LOCK_DIR = "/run/bpfring"


def lock_dir() -> str:
    """Where claims live: $BPFRING_LOCK_DIR, else /run/bpfring, shared by every user (root makes
    it, sticky and world-writable as /tmp is), else, where a non-root process finds no such
    directory, one of its own (claims then do not span users)."""
    chosen = os.environ.get("BPFRING_LOCK_DIR")
    if chosen:
        return chosen
    if os.geteuid() == 0:
        os.makedirs(SHARED_LOCK_DIR, exist_ok=True)
        os.chmod(SHARED_LOCK_DIR, 0o1777)
        return SHARED_LOCK_DIR
    if os.access(SHARED_LOCK_DIR, os.W_OK | os.X_OK):
        return SHARED_LOCK_DIR
    own = os.path.join(tempfile.gettempdir(), f"bpfring-{os.geteuid()}")
    os.makedirs(own, mode=0o700, exist_ok=True)
    info = os.lstat(own)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise PermissionError(errno.EPERM, f"{own} is not a directory of this user's", own)
    return own


def _open_lock_file(path: str) -> int:
    """The lock file at ``path``, opened read-write (a write lock needs it), never through a link."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
    if os.fstat(fd).st_uid == os.geteuid():
        os.fchmod(fd, 0o666)  # past the umask: every user's consumer can lock it
    return fd


def _still_there(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd``: its holder unlinks it on release, so a
    lock taken on a file opened just before is a lock on nothing (open it again)."""
    try:
        there = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)


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
    """This process's claim on a map; ``release()`` (idempotent) gives it back.

    ``producer``: the claim of a user ring buffer's one producer (the same lock, other words).
    """

    def __init__(self, m: Map, what: str, *, producer: bool = False) -> None:
        self.map_id = m.id
        self._fd = -1
        with _claimed_lock:
            holder = _claimed.get(m.id)
            if holder is not None:
                raise _busy(m, f"a {holder} in this process", what, producer)
            try:
                self._path = os.path.join(lock_dir(), f"map-{m.id}.lock")
                fd = self._lock(m, what, producer)
            except OSError as exc:
                if isinstance(exc, BPFError):
                    raise
                raise BPFError(
                    exc.errno,
                    f"can't claim map {m.name!r} (id {m.id}) for this {what}: its lock file could not be "
                    f"opened ({exc.strerror}: {exc.filename}); set BPFRING_LOCK_DIR to a writable directory"
                    + ("" if producer else ", or pass shared=True"),
                ) from None
            self._fd = fd
            _claimed[m.id] = what
            _open.add(self)

    def _lock(self, m: Map, what: str, producer: bool) -> int:
        """The lock file, opened and write-locked (not waiting), or EBUSY naming its holder."""
        while True:
            fd = _open_lock_file(self._path)
            try:
                fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
            except OSError as exc:
                try:
                    if exc.errno not in (errno.EACCES, errno.EAGAIN):
                        raise BPFError(exc.errno, f"can't lock the claim file of map {m.name!r} (id {m.id})") from None
                    pid = _holder(fd)
                finally:
                    os.close(fd)
                raise _busy(m, _describe(pid) if pid > 0 else "another process", what, producer) from None
            if _still_there(fd, self._path):
                return fd
            os.close(fd)  # its holder let go and unlinked it meanwhile: the claim is a new file's

    def release(self) -> None:
        if self._fd < 0:
            return
        with _claimed_lock:
            fd, self._fd = self._fd, -1
            _open.discard(self)
            _claimed.pop(self.map_id, None)
            # Unlinked while still locked (so /run/bpfring keeps no file per map ever claimed): one
            # who opened it meanwhile finds it gone once it has the lock, and opens the new one.
            # (Another user's file in the sticky directory cannot be unlinked: it stays.)
            with contextlib.suppress(OSError):
                os.unlink(self._path)
            os.close(fd)  # releases the lock

    def _forget(self) -> None:
        """In a fork child: close the inherited lock file (the child holds no lock on it)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __del__(self) -> None:
        self.release()


def _busy(m: Map, holder: str, what: str, producer: bool) -> BPFError:
    if producer:
        return BPFError(
            errno.EBUSY,
            f"user ring buffer {m.name!r} (id {m.id}) already has a producer, {holder}: it has one producer in "
            "user space, and two would reserve the same space (each keeps producer_pos for itself). Close "
            "that one first, or send this process's records through it",
        )
    return BPFError(
        errno.EBUSY,
        f"map {m.name!r} (id {m.id}) is already consumed by {holder}: a ring has one consumer, and two "
        f"would take each other's records. Close that one first, or open this {what} with shared=True "
        "if you mean to share it (each record then goes to one of them)",
    )

"""Exceptions raised by bpfring.

Kernel failures are ``OSError`` subclasses that keep ``errno`` and say what was attempted,
so ``except PermissionError`` and ``except OSError`` work as they do for any other system call.
"""

from __future__ import annotations

import errno as _errno
import os


class BPFError(OSError):
    """A BPF-related system call failed; ``errno`` is the kernel's answer."""


class BPFPermissionError(BPFError, PermissionError):
    """The kernel refused for lack of privilege (EPERM/EACCES): run as root or with CAP_BPF."""


class BPFNotFoundError(BPFError, FileNotFoundError):
    """The object (pinned path, map id, name) does not exist (ENOENT)."""


class RingFullError(BPFError):
    """No room in a ring for the requested record (ENOSPC)."""


_BY_ERRNO: dict[int, type[BPFError]] = {
    _errno.EPERM: BPFPermissionError,
    _errno.EACCES: BPFPermissionError,
    _errno.ENOENT: BPFNotFoundError,
    _errno.ENOSPC: RingFullError,
}

_PRIVILEGE_HINT = " (BPF needs root, or CAP_BPF with CAP_PERFMON)"


def bpf_error(err: int, what: str) -> BPFError:
    """Build the exception for a failed attempt at ``what`` that ended with ``err``."""
    cls = _BY_ERRNO.get(err, BPFError)
    first, _, details = what.partition("\n")  # keep the verdict on the first line, details after
    message = f"{first}: {os.strerror(err)}"
    if cls is BPFPermissionError:
        message += _PRIVILEGE_HINT
    return cls(err, message + (f"\n{details}" if details else ""))


class RecordSizeError(ValueError):
    """A record's size does not match the dtype it is read as; the record stays in the ring."""


class RingCorruptError(BPFError):
    """A ring's shared memory holds a position or a header that cannot be right (EBADMSG).

    Another process that has the map (or the perf event) mapped can write the consumer page of a
    ring buffer and the control page of a perf ring. Nothing is delivered from the bad region and
    the ring is left as found; ``resync()`` on the ring skips to the producer's position.
    ``map_name``/``map_id`` name the map, ``ring`` is the ring's index in its RingBuffer (None for
    a perf ring), ``cpu`` the perf ring's CPU (None for a ring buffer), ``values`` what was read.
    """

    def __init__(
        self,
        detail: str,
        *,
        map_name: str,
        map_id: int,
        ring: int | None = None,
        cpu: int | None = None,
        values: dict[str, int] | None = None,
    ) -> None:
        where = f"perf ring of cpu {cpu}" if cpu is not None else "ring" + ("" if ring is None else f" {ring}")
        super().__init__(
            _errno.EBADMSG,
            f"{where} of map {map_name!r} (id {map_id}) is corrupt: {detail}; nothing was read from it "
            "(resync() skips to the producer's position)",
        )
        self.map_name = map_name
        self.map_id = map_id
        self.ring = ring
        self.cpu = cpu
        self.values = dict(values or {})

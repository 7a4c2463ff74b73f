"""The Python side of tests/bpf/user_drain.bpf.c: drain the user ring in the kernel, read the echo back."""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass, field

import bpfring

MAX_ECHO = 16384  # user_drain.h: records of 1..MAX_ECHO-1 bytes are echoed back
PATTERN = bytes((i * 13 + 5) & 0xFF for i in range(256 + MAX_ECHO))


class DrainArgs(ctypes.Structure):
    """struct drain_args of user_drain.h."""

    _fields_ = [
        ("max_records", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("ret", ctypes.c_int64),
        ("drained", ctypes.c_uint64),
        ("dropped", ctypes.c_uint64),
        ("oversize", ctypes.c_uint64),
    ]


@dataclass
class Drained:
    ret: int  # bpf_user_ringbuf_drain's return: records consumed (discarded ones excluded) or -errno
    drained: int  # records the BPF callback saw
    dropped: int  # records the echo ring had no room for
    oversize: int  # records too big to echo
    records: list[bytes] = field(default_factory=list)  # the echoed records, in order


def record_size(seq: int, size_min: int, size_max: int) -> int:
    """A spread of sizes over [size_min, size_max], mostly not multiples of 8."""
    span = size_max - size_min + 1
    return size_min + (((seq & 0xFFFFFFFF) * 2654435761) & 0xFFFFFFFF) % span


def payload(seq: int, size: int) -> bytes:
    """The bytes a test writes as record ``seq``: its number, then pattern bytes from seq % 256."""
    start = seq & 255
    return (struct.pack("<I", seq & 0xFFFFFFFF) + PATTERN[start : start + size])[:size]


class UserDrain:
    """user_drain.bpf.o, loaded; ``drain()`` runs its BPF program and returns what came back."""

    def __init__(
        self, path: os.PathLike[str] | str, urb_size: int | None = None, echo_size: int | None = None
    ) -> None:
        self.obj = bpfring.Object(path)
        self._got: list[bytes] = []
        try:
            if urb_size is not None:
                self.obj.set_max_entries("urb", urb_size)
            if echo_size is not None:
                self.obj.set_max_entries("echo", echo_size)
            self.obj.load()
            self.urb = self.obj.map("urb")
            self._echo = bpfring.RingBuffer(self.obj.map("echo"), self._got.append)
        except BaseException:
            self.obj.close()
            raise

    def drain(self, max_records: int = 0, flags: int = 0) -> Drained:
        """One bpf_user_ringbuf_drain() in the kernel (at most ``max_records`` records, 0: all)."""
        args = DrainArgs(max_records=max_records, flags=flags)
        out = DrainArgs.from_buffer_copy(self.obj.program("drain").test_run(ctx=bytes(args)).ctx_out)
        self._got.clear()
        self._echo.consume()
        return Drained(out.ret, out.drained, out.dropped, out.oversize, list(self._got))

    def close(self) -> None:
        self._echo.close()
        self.obj.close()

    def __enter__(self) -> UserDrain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

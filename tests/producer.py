"""The Python side of tests/bpf/producer.bpf.c: run it, and recompute what it should produce."""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import bpfring

MAX_RECORD = 8192
MODE_OUTPUT = 0
MODE_RESERVE = 1
HDR = struct.Struct("<QII")  # struct rec_hdr: seq, producer, size
FIXED_SIZE = 64
PATTERN = bytes((i * 7 + 3) & 0xFF for i in range(MAX_RECORD + 256))


class Args(ctypes.Structure):
    """struct args of producer.h."""

    _fields_ = [
        ("seq", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("size_min", ctypes.c_uint32),
        ("size_max", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("mode", ctypes.c_uint32),
        ("discard_every", ctypes.c_uint32),
        ("producer", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("produced", ctypes.c_uint64),
        ("discarded", ctypes.c_uint64),
        ("dropped", ctypes.c_uint64),
    ]


@dataclass
class Produced:
    first_seq: int
    count: int
    produced: int
    discarded: int
    dropped: int


def record_size(seq: int, size_min: int, size_max: int) -> int:
    span = size_max - size_min + 1
    return size_min + (((seq & 0xFFFFFFFF) * 2654435761) & 0xFFFFFFFF) % span


def expected_record(seq: int, producer: int, size: int) -> bytes:
    start = seq & 255
    full = HDR.pack(seq, producer, size) + PATTERN[start : start + max(0, size - HDR.size)]
    return full[:size]


def expected_fixed(seq: int, producer: int) -> bytes:
    return HDR.pack(seq, producer, FIXED_SIZE) + bytes((seq + j) & 0xFF for j in range(FIXED_SIZE - HDR.size))


def parse(record: bytes) -> tuple[int, int, int]:
    """(seq, producer, size) of a record of at least 16 bytes."""
    return HDR.unpack_from(record)


class Producer:
    """producer.bpf.o, loaded; ``produce()`` runs it in the kernel and reports what happened.

    Or producer_compat.bpf.o, its twin for kernels before 5.19 (conftest picks the one the kernel
    loads): the same records, one run of its program per record.
    """

    def __init__(self, path: os.PathLike[str] | str, ring_size: int | None = None) -> None:
        self.compat = Path(path).name.startswith("producer_compat")
        self.obj = bpfring.Object(path)
        try:
            if ring_size is not None:
                self.obj.set_max_entries("rb", ring_size)
            self.obj.load()
            self.obj.map("pattern").update(b"\0\0\0\0", PATTERN)
        except BaseException:
            self.obj.close()
            raise
        self.ring = self.obj.map("rb")
        self._next_seq: dict[int, int] = {}

    def produce(
        self,
        count: int,
        size: int | tuple[int, int] = 16,
        *,
        flags: int = 0,
        mode: int = MODE_RESERVE,
        discard_every: int = 0,
        producer: int = 0,
        fixed: bool = False,
        cpu: int | None = None,
    ) -> Produced:
        """Produce ``count`` records with consecutive sequence numbers (per producer id)."""
        size_min, size_max = (size, size) if isinstance(size, int) else size
        seq = self._next_seq.get(producer, 0)
        args = Args(
            seq=seq,
            count=count,
            size_min=size_min,
            size_max=size_max,
            flags=flags,
            mode=mode,
            discard_every=discard_every,
            producer=producer,
        )
        prog = self.obj.program("produce_fixed" if fixed else "produce")
        if self.compat:
            return self._produce_compat(prog, args, fixed, cpu)
        out = Args.from_buffer_copy(prog.test_run(ctx=bytes(args), cpu=cpu).ctx_out)
        self._next_seq[producer] = seq + count
        return Produced(seq, count, out.produced, out.discarded, out.dropped)

    def _produce_compat(self, prog: bpfring.Program, args: Args, fixed: bool, cpu: int | None) -> Produced:
        if args.mode == MODE_RESERVE and args.discard_every and not fixed:
            from conftest import require_feature  # discarding a variable-size record needs a dynptr

            from bpfring import features

            require_feature(features.RINGBUF_DYNPTR)
        seq, count = args.seq, args.count
        done = [0, 0, 0]  # what each run returns: 0 produced, 1 discarded, 2 dropped (3: failed)
        args.count = 1
        for k in range(count):
            args.seq = seq + k
            said = prog.test_run(ctx=bytes(args), cpu=cpu).retval
            if said > 2:
                raise RuntimeError(f"producer_compat failed on record {seq + k} (returned {said})")
            done[said] += 1
        self._next_seq[args.producer] = seq + count
        return Produced(seq, count, *done)

    def close(self) -> None:
        self.obj.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

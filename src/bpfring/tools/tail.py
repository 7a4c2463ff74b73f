"""``bpfring tail``: consume a ring buffer map another program created, and print its records."""

from __future__ import annotations

import argparse
import datetime
import errno
import json
import os
import struct
import sys
import time
from typing import Any, Callable

import numpy as np

from .._sys.bpf import U32_MAX, MapType
from ..errors import BPFError
from ..maps import Map
from ..objects import Object
from ..perfbuf import PerfBuffer
from ..ringbuf import RingBuffer
from .common import (
    follow,
    paragraphs,
    positive_int,
    positive_seconds,
    require_admin,
)


def open_map(target: str) -> Map:
    """The map named by a bpffs path or by a map id (all digits), in words when it is not there."""
    if target.isascii() and target.isdigit():
        if int(target) > U32_MAX:  # Map.from_id would refuse it as a ValueError; here it is just absent
            raise BPFError(errno.ENOENT, f"no BPF map has id {target}: map ids are u32, at most {U32_MAX}")
        require_admin("bpfring tail", "to open a map by id")
        try:
            return Map.from_id(int(target))
        except FileNotFoundError:
            raise BPFError(errno.ENOENT, f"no BPF map has id {target} ('bpfring maps' lists the rings)") from None
    try:
        return Map.from_pinned(target)
    except FileNotFoundError:
        raise BPFError(errno.ENOENT, f"nothing is pinned at {target!r} (give a path on bpffs or a map id)") from None
    except PermissionError:
        if os.geteuid() == 0:  # sudo would change nothing: say what the kernel said
            raise
        raise PermissionError(
            errno.EACCES, f"no permission to open the map pinned at {target!r}: run bpfring tail with sudo"
        ) from None
    except BPFError as exc:
        if exc.errno != errno.EISDIR:
            raise
        raise BPFError(
            errno.EISDIR,
            f"{target!r} is a directory: give the path of a map pinned in it, or a map id ('bpfring maps' lists the rings)",
        ) from None


def check_ring(m: Map) -> None:
    """Ring buffers and perf event arrays can be tailed; say why for the other map types."""
    what = f"map {m.name!r} (id {m.id})"
    if m.type in (MapType.RINGBUF, MapType.PERF_EVENT_ARRAY):
        return
    if m.type == MapType.USER_RINGBUF:
        raise ValueError(f"{what} is a user ring buffer: user space writes it and BPF reads it, there is nothing to tail")
    raise ValueError(f"{what} is {m.type_name}, not a ring: tail reads ring buffers and perf event arrays")


PERF_PAGES = 8  # per CPU, the seed's perf_buffer__new(..., 8, ...)


def _value(v: object) -> object:
    """bytes fields (``s``, ``p``, ``c``) shown as the C strings they usually are."""
    if isinstance(v, bytes):
        return v.split(b"\0", 1)[0].decode(errors="backslashreplace")
    return v


class Decoder:
    """Decodes the start of a record: a Python struct format, or a C struct from BTF (numpy)."""

    def __init__(self, fmt: struct.Struct | None = None, dtype: Any = None) -> None:
        self.fmt = fmt
        self.dtype = dtype
        self.size = fmt.size if fmt is not None else dtype.itemsize

    def values(self, data: bytes) -> list[object]:
        if self.fmt is not None:
            return [_value(v) for v in self.fmt.unpack_from(data)]
        record = np.frombuffer(data, dtype=self.dtype, count=1)[0]
        if self.dtype.names is None:
            return [_plain(record)]
        return [_plain(record[name]) for name in self.dtype.names]


def _plain(v: Any) -> object:
    """A numpy field as a plain value: char arrays as C strings, arrays as lists, times as text."""
    if isinstance(v, (bytes, np.bytes_)):
        return _value(bytes(v))
    if isinstance(v, (np.datetime64, np.timedelta64)):
        return str(v)  # .item() would give a datetime, an int or a timedelta depending on the unit
    if isinstance(v, np.void) and v.dtype.names:
        return {name: _plain(v[name]) for name in v.dtype.names}
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v.item() if isinstance(v, np.generic) else v


def formatter(fmt: Decoder | None, as_json: bool) -> Callable[[bytes], str]:
    """One output line per record: ``LEN HEX``, or the values ``fmt`` decodes, or JSON of either."""

    def line(data: bytes) -> str:
        if fmt is None or len(data) < fmt.size:
            if as_json:
                return json.dumps({"len": len(data), "hex": data.hex()})
            return f"{len(data)} {data.hex()}"
        values = fmt.values(data)
        if as_json:
            return json.dumps({"len": len(data), "values": values}, default=_json_value)
        return " ".join(json.dumps(v, default=_json_value) if isinstance(v, (str, dict)) else str(v) for v in values)

    return line


def _json_value(v: object) -> object:
    """What JSON has no type for: a complex number as [real, imag], anything else as its text."""
    if isinstance(v, complex):
        return [v.real, v.imag]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (datetime.date, datetime.time, datetime.timedelta)):
        return str(v)
    return repr(v)


def run(args: argparse.Namespace) -> int:
    """Attach a consumer to a pinned or numbered ring and print its records until stopped."""
    fmt = _decoder(args)
    line = formatter(fmt, args.json)
    printed = short = 0
    out = sys.stdout

    def on_record(data: bytes) -> int:
        nonlocal printed, short
        out.write(line(data) + "\n")
        out.flush()
        printed += 1
        if fmt is not None and len(data) < fmt.size:
            short += 1
        return -1 if args.count and printed >= args.count else 0  # leave the rest in the ring

    with open_map(args.target) as m:
        check_ring(m)
        if m.type == MapType.PERF_EVENT_ARRAY:
            reader: Any = PerfBuffer(m, PERF_PAGES, lambda cpu, data: on_record(data), shared=args.shared)
            about = f"perf event array {m.name!r} (id {m.id}, {reader.buffer_cnt} CPUs)"
        else:
            reader = RingBuffer(m, on_record, shared=args.shared)
            ring = reader.rings[0]
            about = f"ring {m.name!r} (id {m.id}, {ring.size} bytes, {ring.avail_data_size} pending)"
    with reader:
        print(f"bpfring: tailing {about}; Ctrl-C to stop", file=sys.stderr, flush=True)
        status = follow(reader, time.monotonic() + args.duration if args.duration else None)
    note = f" ({short} shorter than --format's {fmt.size} bytes, shown as hex)" if short else ""
    print(f"{printed} records printed{note}", file=sys.stderr)
    return status


def _decoder(args: argparse.Namespace) -> Decoder | None:
    if args.struct:
        if not args.object:
            raise ValueError("--struct needs --object FILE.bpf.o, the BPF object whose BTF declares it")
        with Object(args.object) as obj:
            try:
                return Decoder(dtype=obj.struct(args.struct))
            except TypeError as exc:  # a C type numpy cannot hold (a bitfield, a pointer...)
                raise ValueError(f"--struct {args.struct} can't be decoded: {exc}") from None
    if args.object:
        raise ValueError("--object goes with --struct NAME")
    return args.format


def _format(text: str) -> Decoder:
    """A Python struct format (``<i16s``), else a numpy dtype string (``<i4,S16``)."""
    try:
        decoder = Decoder(fmt=struct.Struct(text))
    except struct.error as exc:
        try:
            dtype = np.dtype(text)
        except (TypeError, ValueError, SyntaxError):
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither a Python struct format ({exc}) nor a numpy dtype"
            ) from None
        if dtype.hasobject:
            raise argparse.ArgumentTypeError(f"{text!r} holds Python objects: records are plain bytes") from None
        decoder = Decoder(dtype=dtype)
    if decoder.size == 0:
        raise argparse.ArgumentTypeError(f"{text!r} decodes no bytes")
    return decoder


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "tail",
        parents=parents,
        help="print the records of a ring buffer map another program created",
        description=paragraphs(
            "Attach a consumer to a BPF_MAP_TYPE_RINGBUF map that another program created, given "
            "the path where it is pinned on bpffs or its map id, and print each record: its length "
            "and its bytes in hex, or the values --format decodes, or JSON lines.",
            "tail TAKES the records: a ring has a single consumer position, so what tail prints, "
            "the ring's own consumer will not see. The producer is not disturbed otherwise. Use it "
            "on rings nobody else reads: a ring another bpfring consumer (any process) is reading is "
            "refused, naming that process, unless --shared, where each record goes to whichever "
            "consumer takes it first.",
            "A perf event array is read by putting tail's own perf events in the array's CPU slots, "
            "which replaces any other reader's; tail clears them on exit.",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--format takes a Python struct format (https://docs.python.org/3/library/struct.html)\n"
        "or, where that does not parse, a numpy dtype string ('<u4,S16'), and decodes the first\n"
        "bytes of each record; bytes fields are shown as C strings; records shorter than the\n"
        "format are printed in hex.\n"
        "\n"
        "examples:\n"
        "  bpfring tail /sys/fs/bpf/events                   # LEN HEX, one line per record\n"
        "  bpfring tail 42 --count 10                        # map id 42: ten records, then exit\n"
        "  bpfring tail /sys/fs/bpf/events --format '<i16s'  # e.g. 4242 \"bash\"\n"
        "  bpfring tail /sys/fs/bpf/events --format 'i4,S16' # the same, as a numpy dtype\n"
        "  bpfring tail /sys/fs/bpf/events --object prog.bpf.o --struct event   # C types from BTF\n"
        "  bpfring tail /sys/fs/bpf/events --json --duration 5\n",
    )
    p.add_argument("target", metavar="PATH_OR_ID", help="a map pinned on bpffs, or a map id")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--format", type=_format, metavar="FORMAT", help="decode records with a struct format or numpy dtype")
    how.add_argument("--struct", metavar="NAME", help="decode records as C struct NAME (with --object)")
    p.add_argument("--object", metavar="FILE.bpf.o", help="the BPF object whose BTF declares --struct")
    p.add_argument("--json", action="store_true", help="one JSON object per record")
    p.add_argument("--count", type=positive_int(), metavar="N", help="stop after N records")
    p.add_argument("--duration", type=positive_seconds, metavar="SECONDS", help="stop after this many seconds")
    p.add_argument(
        "--shared", action="store_true", help="read a ring another consumer is reading too (each record goes to one of them)"
    )
    p.set_defaults(func=run)

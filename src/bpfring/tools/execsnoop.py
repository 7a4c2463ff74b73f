"""``bpfring execsnoop``: the seed's exec tracer, with filters and wakeup control in the BPF program."""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import numpy as np

from ..maps import PAGE_SIZE
from ..objects import Object, bundled_object
from ..perfbuf import PerfBuffer
from ..ringbuf import RingBuffer
from .common import (
    Reader,
    follow,
    paragraphs,
    positive_int,
    positive_seconds,
    require_tracing_privileges,
)

PERFBUF_DEFAULT_BYTES = 8 * PAGE_SIZE  # the seed's 8 pages (32 KB) per CPU
# struct config of bpf/execsnoop.h: __u32 pid; __u32 wakeup_every; char comm[16]
CONFIG = struct.Struct("<II16s")
TASK_COMM_LEN = 16

OnEvent = Callable[[bytes], None]


@dataclass(frozen=True)
class Form:
    """One way the BPF side sends events: its program, how to size its map, how to read it."""

    program: str
    prepare: Callable[[Object, argparse.Namespace], None]
    open_reader: Callable[[Object, OnEvent, argparse.Namespace], ContextManager[Reader]]


def _size_ring(obj: Object, args: argparse.Namespace) -> None:
    if args.ring_size:
        obj.set_max_entries("rb", args.ring_size)


def _ring_reader(obj: Object, on_event: OnEvent, args: argparse.Namespace) -> RingBuffer:
    return RingBuffer(obj.map("rb"), on_event)


def _no_ring(obj: Object, args: argparse.Namespace) -> None:
    """The perf buffer is sized per CPU when it is opened, not in the map."""


def _perf_reader(obj: Object, on_event: OnEvent, args: argparse.Namespace) -> PerfBuffer:
    # --ring-size is the per-CPU buffer here (at least a page); --wakeup every:N is wakeup_events,
    # the perf buffer's own sampled notification.
    pages = max(1, (args.ring_size or PERFBUF_DEFAULT_BYTES) // PAGE_SIZE)
    return PerfBuffer(
        obj.map("pb"),
        pages,
        lambda cpu, data: on_event(data),
        lambda cpu, lost: args.perf_lost.append(lost),
        wakeup_events=args.wakeup or 1,
    )


FORMS: dict[str, Form] = {
    "ringbuf-reserve": Form("handle_exec_reserve", _size_ring, _ring_reader),
    "ringbuf-output": Form("handle_exec_output", _size_ring, _ring_reader),
    "perfbuf": Form("handle_exec_perfbuf", _no_ring, _perf_reader),
}


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _configure(obj: Object, args: argparse.Namespace) -> None:
    """Write struct config into .rodata, where the BPF programs read their settings as constants."""
    have = len(obj.initial_value(".rodata")) if any(n.endswith(".rodata") for n in obj.map_names) else 0
    if have != CONFIG.size:
        raise ValueError(
            f"{obj.path} has {have} bytes of .rodata where struct config needs {CONFIG.size}: "
            "it was built from another execsnoop.h (reinstall bpfring)"
        )
    comm = (args.comm or "").encode()
    obj.set_initial_value(".rodata", CONFIG.pack(args.pid or 0, args.wakeup, comm))


def run(args: argparse.Namespace) -> int:
    """Trace exec() system-wide and print TIME EVENT PID COMM FILENAME until stopped."""
    require_tracing_privileges("bpfring execsnoop")
    form = FORMS[args.via]
    seen = 0
    out = sys.stdout
    args.perf_lost = []
    event: Any = None  # struct event, read from the object's BTF once it is open

    def on_event(data: bytes) -> None:
        nonlocal seen
        e = np.frombuffer(data, dtype=event, count=1)[0]  # count=1: a perf sample may carry padding
        pid, comm, filename = int(e["pid"]), e["comm"], e["filename"]
        seen += 1
        now = time.strftime("%H:%M:%S")
        if args.json:
            record = {"time": now, "event": "EXEC", "pid": pid, "comm": _cstr(comm), "filename": _cstr(filename)}
            out.write(json.dumps(record) + "\n")
        else:
            out.write(f"{now:<8} {'EXEC':<5} {pid:<7} {_cstr(comm):<16} {_cstr(filename)}\n")
        out.flush()

    with Object(bundled_object("execsnoop")) as obj:
        event = obj.struct("event")
        for prog in obj.programs:
            prog.autoload = prog.name == form.program
        form.prepare(obj, args)
        _configure(obj, args)
        obj.load()
        # The reader first: a perf event array drops what arrives before its CPU slots are set.
        with form.open_reader(obj, on_event, args) as reader:
            obj.attach()
            print(f"bpfring: tracing exec() via {args.via}; Ctrl-C to stop", file=sys.stderr, flush=True)
            deadline = time.monotonic() + args.duration if args.duration else None

            def header() -> None:
                if not args.json:
                    out.write(f"{'TIME':<8} {'EVENT':<5} {'PID':<7} {'COMM':<16} {'FILENAME'}\n")
                    out.flush()

            status = follow(reader, deadline, header)
        dropped = struct.unpack_from("<Q", obj.map(".bss").lookup(b"\0\0\0\0"))[0]
        lost = f", {sum(args.perf_lost)} reported lost by the kernel" if args.via == "perfbuf" else ""
        print(f"{seen} events seen, {dropped} dropped{lost}", file=sys.stderr)
        return status


# -- arguments ------------------------------------------------------------------------------------


def _positive_power_of_two(text: str) -> int:
    value = int(text, 0)
    if value <= 0 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two, got {text}")
    return value


def _comm(text: str) -> str:
    raw = text.encode()
    if not raw or len(raw) >= TASK_COMM_LEN or b"\0" in raw:
        raise argparse.ArgumentTypeError(
            f"must be 1 to {TASK_COMM_LEN - 1} bytes, as the kernel keeps command names, got {text!r}"
        )
    return text


def _wakeup(text: str) -> int:
    """``adaptive`` -> 0; ``every:N`` -> N records."""
    if text == "adaptive":
        return 0
    kind, _, count = text.partition(":")
    if kind == "every" and count.isdigit() and 0 < int(count) < 2**32:
        return int(count)
    raise argparse.ArgumentTypeError(f"must be 'adaptive' or 'every:N' with N a positive number, got {text!r}")


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "execsnoop",
        parents=parents,
        help="trace exec() system-wide (the seed's example program)",
        description=paragraphs(
            "Trace every exec() on the system and print TIME EVENT PID COMM FILENAME, from a BPF "
            "program on tp/sched/sched_process_exec writing into a BPF ring buffer.",
            "--pid and --comm filter in the BPF program (settings in .rodata, constants to the "
            "verifier): what they reject never reaches the ring. On exit it prints to stderr how "
            "many events it saw and how many the ring had no room for.",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="wakeups:\n"
        "  adaptive   the kernel wakes us when we have caught up (the default, and the seed's)\n"
        "  every:N    the BPF program passes BPF_RB_NO_WAKEUP until N records are pending, then\n"
        "             BPF_RB_FORCE_WAKEUP; fewer than N are still printed within 100 ms, when\n"
        "             the poll times out and we drain the ring anyway. With --via perfbuf it is\n"
        "             the perf buffer's wakeup_events: the kernel wakes us every N samples\n"
        "\n"
        "examples:\n"
        "  bpfring execsnoop                        # until Ctrl-C\n"
        "  bpfring execsnoop --via ringbuf-output   # bpf_ringbuf_output() instead of reserve/submit\n"
        "  bpfring execsnoop --via perfbuf          # the perf buffer: bpf_perf_event_output()\n"
        "  bpfring execsnoop --duration 10 --json   # ten seconds, one JSON object per line\n"
        "  bpfring execsnoop --comm bash            # only execs whose new command name is 'bash'\n"
        "  bpfring execsnoop --pid 4242             # only execs by process 4242\n"
        "  bpfring execsnoop --wakeup every:64      # one wakeup per 64 events\n"
        "  bpfring execsnoop --ring-size 4096       # a tiny ring: see the drop count on exit\n",
    )
    p.add_argument(
        "--via",
        choices=sorted(FORMS),
        default="ringbuf-reserve",
        help="how the BPF program sends events (default: ringbuf-reserve)",
    )
    p.add_argument("--pid", type=positive_int("a process id (a positive number)"), metavar="PID", help="only execs by this process id")
    p.add_argument("--comm", type=_comm, metavar="COMM", help="only execs whose new command name is COMM")
    p.add_argument(
        "--wakeup",
        type=_wakeup,
        default=0,
        metavar="adaptive|every:N",
        help="when the BPF program wakes us (default: adaptive; see below)",
    )
    p.add_argument("--duration", type=positive_seconds, metavar="SECONDS", help="stop after this many seconds")
    p.add_argument(
        "--ring-size",
        type=_positive_power_of_two,
        metavar="BYTES",
        help="the ring's size (default: 262144; perfbuf: per CPU, default 32768)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=run)

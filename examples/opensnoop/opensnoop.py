#!/usr/bin/env python3
"""opensnoop with bpfring: your own BPF program, built, configured, attached and read from Python.

    sudo python3 opensnoop.py                   # every openat() on the machine
    sudo python3 opensnoop.py -p 1234           # one process
    sudo python3 opensnoop.py --mode batch      # numpy batches instead of a callback per record
    sudo python3 opensnoop.py --mode async      # asyncio

The steps, each one line of bpfring (see docs/own-program.md):
  1. build    bpfring.compile("opensnoop.bpf.c")          clang -target bpf, vmlinux.h cached
  2. set      obj.rodata.targ_pid = pid                    a typed global, by name, before load
  3. load     obj.load()
  4. attach   prog.attach_tracepoint("syscalls", "sys_enter_openat")
  5. read     RingBuffer(obj.map("events"), ...)           records typed by obj.struct("event")
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bpfring

HERE = Path(__file__).resolve().parent


def row(pid: int, comm: bytes, flags: int, path: bytes) -> str:
    return f"{time.strftime('%H:%M:%S'):<8} {pid:<7} {comm.decode(errors='replace'):<16} {flags:<#8x} {path.decode(errors='replace')}"


class Printer:
    """Prints events and counts them; ``done`` once ``count`` have been printed."""

    def __init__(self, count: int | None) -> None:
        self.count = count
        self.seen = 0

    @property
    def done(self) -> bool:
        return self.count is not None and self.seen >= self.count

    def show(self, records: np.ndarray) -> None:
        for r in records:
            if self.done:
                return
            print(row(int(r["pid"]), r["comm"], int(r["flags"]), r["path"]), flush=True)
            self.seen += 1


def with_callback(rb_map: bpfring.Map, event: np.dtype, printer: Printer, deadline: float) -> None:
    """One call per record: the record's bytes, read as one struct event."""

    def on_event(data: bytes) -> None:
        printer.show(np.frombuffer(data, event))

    with bpfring.RingBuffer(rb_map, on_event) as rb:
        while not printer.done and time.monotonic() < deadline:
            rb.poll(timeout_ms=100)


def with_batches(rb_map: bpfring.Map, event: np.dtype, printer: Printer, deadline: float) -> None:
    """Every waiting record in one numpy array per call; no Python step per record."""
    with bpfring.RingBuffer(rb_map) as rb:  # batches need no callback
        while not printer.done and time.monotonic() < deadline:
            select.select([rb], [], [], 0.1)  # wait on the ring's epoll fd, consume nothing
            printer.show(rb.consume_batch(event))


def with_asyncio(rb_map: bpfring.Map, event: np.dtype, printer: Printer, deadline: float) -> None:
    """Batches as they arrive, on an event loop that stays free for other work."""

    async def main() -> None:
        with bpfring.RingBuffer(rb_map) as rb:

            async def read() -> None:
                async for records in rb.batches(event):
                    printer.show(records)
                    if printer.done:
                        return

            try:
                await asyncio.wait_for(read(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                pass

    asyncio.run(main())


MODES = {"callback": with_callback, "batch": with_batches, "async": with_asyncio}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Trace openat() with your own BPF program, through bpfring.")
    parser.add_argument("-p", "--pid", type=int, default=0, help="only this process (default: all)")
    parser.add_argument("--mode", choices=MODES, default="callback", help="how records are read (default: callback)")
    parser.add_argument("--count", type=int, help="stop after this many events")
    parser.add_argument("--duration", type=float, default=float("inf"), help="stop after this many seconds")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="opensnoop-") as build_dir:
        # 1. build: clang -g -O2 -target bpf, with this kernel's vmlinux.h (made once, cached)
        obj_path = bpfring.compile(HERE / "opensnoop.bpf.c", Path(build_dir) / "opensnoop.bpf.o")
        with bpfring.Object(obj_path) as obj:
            obj.rodata.targ_pid = args.pid  # 2. a typed global, set by name before load
            obj.load()  # 3. maps created, program verified
            obj.program("handle_openat").attach_tracepoint("syscalls", "sys_enter_openat")  # 4. attach by target
            event = obj.struct("event")  # struct event from the object's BTF, as a numpy dtype

            print(f"tracing openat() of {f'pid {args.pid}' if args.pid else 'every process'}... Ctrl-C to stop",
                  file=sys.stderr, flush=True)
            print(f"{'TIME':<8} {'PID':<7} {'COMM':<16} {'FLAGS':<8} PATH", flush=True)
            printer = Printer(args.count)
            deadline = time.monotonic() + args.duration
            try:
                MODES[args.mode](obj.map("events"), event, printer, deadline)  # 5. read
            except KeyboardInterrupt:
                pass
            # .bss, read live from the kernel's map: what the program could not fit in the ring
            print(f"{printer.seen} events, {obj.bss.dropped} dropped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("opensnoop.py needs root (BPF and tracepoints): run it with sudo")
    sys.exit(main())

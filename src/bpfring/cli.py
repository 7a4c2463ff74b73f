"""The ``bpfring`` command line: the seed's exec tracer, and more to come.

Exit codes: 0 ok, 1 error, 2 usage, 130 interrupted (Ctrl-C). Errors print one line; ``--debug``
shows the traceback and libbpf's log.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import signal
import struct
import sys
import time
from typing import Callable, Sequence

from .errors import BPFError
from .objects import Object, bundled_object
from .ringbuf import RingBuffer

log = logging.getLogger("bpfring")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# struct event of bpf/execsnoop.h: int pid; char comm[16]; char filename[512]
EXEC_EVENT = struct.Struct("<i16s512s")

# --via form -> the program of execsnoop.bpf.c that implements it
EXECSNOOP_FORMS = {
    "ringbuf-reserve": "handle_exec_reserve",
    "ringbuf-output": "handle_exec_output",
}


class _Stop(Exception):
    """Raised by the SIGTERM handler so a terminated trace ends like an interrupted one."""


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


# capability bits (include/uapi/linux/capability.h)
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def require_tracing_privileges(command: str) -> None:
    """Fail early, in words, where the kernel would refuse to load or attach a tracing program."""
    caps = _effective_caps()
    if caps >> CAP_SYS_ADMIN & 1 or (caps >> CAP_BPF & 1 and caps >> CAP_PERFMON & 1):
        return
    raise PermissionError(errno.EPERM, f"{command} needs root (or CAP_BPF and CAP_PERFMON): run it with sudo")


def execsnoop(args: argparse.Namespace) -> int:
    """Trace exec() system-wide and print TIME EVENT PID COMM FILENAME until Ctrl-C."""
    require_tracing_privileges("bpfring execsnoop")
    seen = 0
    out = sys.stdout

    def handle_event(data: bytes) -> None:
        nonlocal seen
        pid, comm, filename = EXEC_EVENT.unpack_from(data)
        seen += 1
        now = time.localtime()
        if args.json:
            record = {
                "time": time.strftime("%H:%M:%S", now),
                "event": "EXEC",
                "pid": pid,
                "comm": _cstr(comm),
                "filename": _cstr(filename),
            }
            out.write(json.dumps(record) + "\n")
        else:
            out.write(f"{time.strftime('%H:%M:%S', now):<8} {'EXEC':<5} {pid:<7} {_cstr(comm):<16} {_cstr(filename)}\n")
        out.flush()

    with Object(bundled_object("execsnoop")) as obj:
        wanted = EXECSNOOP_FORMS[args.via]
        for prog in obj.programs:
            prog.autoload = prog.name == wanted
        if args.ring_size:
            obj.set_max_entries("rb", args.ring_size)
        obj.load()
        obj.attach()
        print(f"bpfring: tracing exec() via {args.via}; Ctrl-C to stop", file=sys.stderr, flush=True)
        if not args.json:
            out.write(f"{'TIME':<8} {'EVENT':<5} {'PID':<7} {'COMM':<16} {'FILENAME'}\n")
            out.flush()
        deadline = time.monotonic() + args.duration if args.duration else None
        status = EXIT_OK
        with RingBuffer(obj.map("rb"), handle_event) as rb:
            try:
                while deadline is None or time.monotonic() < deadline:
                    left = 100 if deadline is None else max(0, min(100, int((deadline - time.monotonic()) * 1000)))
                    rb.poll(left)
                rb.consume()
            except (KeyboardInterrupt, _Stop):
                status = EXIT_INTERRUPTED
            bss = obj.map(".bss").lookup(b"\0\0\0\0")
            dropped = struct.unpack_from("<Q", bss)[0]
        print(f"{seen} events seen, {dropped} dropped", file=sys.stderr)
        return status


def _positive_power_of_two(text: str) -> int:
    value = int(text, 0)
    if value <= 0 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bpfring", description="BPF ring buffers from Python.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and libbpf's log")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "execsnoop",
        help="trace exec() system-wide (the seed's example program)",
        description="Trace every exec() on the system and print TIME EVENT PID COMM FILENAME, "
        "from a BPF program on tp/sched/sched_process_exec writing into a BPF ring buffer.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  bpfring execsnoop                        # until Ctrl-C\n"
        "  bpfring execsnoop --via ringbuf-output   # bpf_ringbuf_output() instead of reserve/submit\n"
        "  bpfring execsnoop --duration 10 --json   # ten seconds, one JSON object per line\n",
    )
    p.add_argument(
        "--via",
        choices=sorted(EXECSNOOP_FORMS),
        default="ringbuf-reserve",
        help="how the BPF program sends events (default: ringbuf-reserve)",
    )
    p.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this many seconds")
    p.add_argument("--ring-size", type=_positive_power_of_two, metavar="BYTES", help="override the ring's size")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=execsnoop)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="bpfring: %(message)s", stream=sys.stderr
    )
    if not args.debug:
        logging.getLogger("bpfring.libbpf").setLevel(logging.CRITICAL)  # errors carry what matters

    def terminate(signum: int, frame: object) -> None:
        raise _Stop()

    signal.signal(signal.SIGTERM, terminate)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (BPFError, OSError, ValueError, KeyError) as exc:
        if args.debug:
            raise
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        message = text.splitlines()[0] if text else type(exc).__name__
        print(f"bpfring: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

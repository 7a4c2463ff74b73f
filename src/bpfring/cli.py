"""The ``bpfring`` command line: the seed's exec tracer, and tools for rings others created.

Each command lives in :mod:`bpfring.tools`; this module parses, installs the signal handlers,
and turns failures into one line. Exit codes: 0 ok, 1 error, 2 usage, 130 Ctrl-C (SIGINT),
143 SIGTERM; long-running commands print what they counted before exiting either way.
``--debug`` shows the traceback and libbpf's log.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
from typing import Callable, Sequence

from ._sys.libbpf import LibbpfUnavailableError
from .build import BuildError
from .tools import build, doctor, execsnoop, maps, tail
from .tools.common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    SIGNALS,
    exit_code_of,
    require_tracing_privileges,
)

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "build_parser",
    "main",
    "require_tracing_privileges",
]

log = logging.getLogger("bpfring")

EPILOG = """\
examples:
  sudo bpfring execsnoop --comm bash
  sudo bpfring maps
  sudo bpfring tail /sys/fs/bpf/events --count 5
  sudo bpfring bench --quick
  bpfring build prog.bpf.c
  sudo bpfring doctor
  python -m bpfring execsnoop --help

exit codes: 0 ok, 1 error, 2 usage, 130 Ctrl-C, 143 SIGTERM
"""


def build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before or after the command name; the subcommand's copy must not
    # overwrite the top-level one with its default, hence SUPPRESS.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and libbpf's log"
    )
    parser = argparse.ArgumentParser(
        prog="bpfring",
        description="BPF ring buffers from Python.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[debug],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for tool in (execsnoop, tail, maps, build, doctor):
        tool.add_parser(sub, [debug])
    # Listed here for --help; main() hands `bpfring bench ...` to bpfring.bench, which has its own options.
    sub.add_parser("bench", help="consumer throughput side by side (see bpfring bench --help)", add_help=False)
    return parser


def _message(exc: BaseException) -> str:
    """The first line of what went wrong, in words."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSYS:
        return "BPF is not available: this kernel has no bpf() system call (CONFIG_BPF_SYSCALL is off)"
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main  # numpy and the benchmark's helpers load only for it
        from .features import FeatureError

        try:
            return bench_main(argv[1:])
        except FeatureError as exc:  # a kernel older than the benchmark's programs need
            print(f"bpfring bench: error: {exc.strerror}", file=sys.stderr)
            return EXIT_ERROR
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="bpfring: %(message)s", stream=sys.stderr)
    if not debug:
        logging.getLogger("bpfring.libbpf").setLevel(logging.CRITICAL)  # errors carry what matters

    previous = {}
    SIGNALS.pending = None
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[signum] = signal.signal(signum, SIGNALS.handler)
        except ValueError:  # not the main thread: signals stay as they are
            pass
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt as exc:  # before a command's loop started: nothing counted yet
        return exit_code_of(exc)
    except (OSError, ValueError, KeyError, BuildError, LibbpfUnavailableError) as exc:
        if debug:
            raise
        print(f"bpfring: error: {_message(exc)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())

"""``bpfring build``: compile your own ``PROG.bpf.c`` for this kernel, as :func:`bpfring.compile` does."""

from __future__ import annotations

import argparse
import sys

from .. import build
from .common import EXIT_ERROR, EXIT_OK, paragraphs, require_tracing_privileges


def run(args: argparse.Namespace) -> int:
    if args.print_vmlinux_h:
        path = build.vmlinux_h_path()
        print(path if path.exists() else f"{path} (not generated yet: the first build makes it)")
        return EXIT_OK
    if not args.source:
        args.parser.error("PROG.bpf.c is required (or --print-vmlinux-h)")  # exits 2
    try:
        out = build.compile(args.source, args.output, args.include, args.define)
    except build.BuildError as exc:
        # The compiler's diagnostics are the message: all of them, not only the first line.
        print(f"bpfring: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.verify:
        require_tracing_privileges("bpfring build --verify")
        from ..objects import Object  # libbpf only when asked to load

        with Object(out) as obj:
            try:
                obj.load()
            except OSError as exc:
                if getattr(args, "debug", False):
                    raise
                print(f"bpfring: error: {exc.strerror or exc}", file=sys.stderr)  # with the verifier's log
                return EXIT_ERROR
            names = ", ".join(p.name for p in obj.programs if p.autoload)
        print(f"{out}: the verifier accepted {names or 'no programs'}", file=sys.stderr)
    print(out)
    return EXIT_OK


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "build",
        parents=parents,
        help="compile your own PROG.bpf.c into a CO-RE PROG.bpf.o for bpfring.Object",
        description=paragraphs(
            "Compile a BPF C program with clang -g -O2 -target bpf and the architecture define, with a "
            "vmlinux.h of the running kernel (generated once with bpftool and cached, keyed by the "
            "kernel's BTF) and libbpf's headers (bpf/bpf_helpers.h) on the include path. Prints the "
            "object's path; clang's warnings and errors pass through.",
            "Needs clang, bpftool and libbpf-dev (scripts/setup installs them).",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  bpfring build opensnoop.bpf.c                 # -> opensnoop.bpf.o beside it\n"
        "  bpfring build prog.bpf.c -o out/prog.bpf.o -I include -D MAX_ENTRIES=1024\n"
        "  sudo bpfring build prog.bpf.c --verify        # and load it once: does the verifier accept it?\n"
        "  bpfring build --print-vmlinux-h               # where the cached vmlinux.h is\n",
    )
    p.add_argument("source", nargs="?", metavar="PROG.bpf.c", help="the BPF C source")
    p.add_argument("-o", "--output", metavar="OUT", help="the object to write (default: PROG.bpf.o beside the source)")
    p.add_argument(
        "-I", dest="include", action="append", default=[], metavar="DIR", help="add DIR to the include path (repeatable)"
    )
    p.add_argument(
        "-D", dest="define", action="append", default=[], metavar="NAME[=VALUE]", help="define a macro (repeatable)"
    )
    p.add_argument("--verify", action="store_true", help="load the built object once (needs root): the verifier's verdict")
    p.add_argument("--print-vmlinux-h", action="store_true", help="print where the cached vmlinux.h is, and exit")
    p.set_defaults(func=run, parser=p)

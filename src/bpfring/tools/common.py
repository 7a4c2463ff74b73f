"""What every command shares: exit codes, privilege checks, signals, and the poll loop."""

from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import sys
import textwrap
import time
from contextlib import contextmanager
from types import FrameType
from typing import Callable, Iterator, Protocol

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, the shell's convention for Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141: the reader of our output went away (| head)

# How long one poll waits; also the longest a record sent with BPF_RB_NO_WAKEUP waits for us.
POLL_MS = 100

# capability bits (include/uapi/linux/capability.h)
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: long-running commands stop, report, and exit 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _Signals:
    """SIGINT/SIGTERM as :class:`Interrupted`, held back while a batch of records is consumed.

    A record counts as consumed before its callback runs, so an exception in the middle would take
    it from the ring without printing or counting it. Inside :func:`deferred_signals` the handler
    only notes the signal (the interrupted epoll_wait is retried and ends within its timeout) and
    the exception is raised when the batch is done. A second signal meanwhile is not held back.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.depth and self.pending is None:
            self.pending = signum
            return
        self.pending = None
        raise Interrupted(signum)


SIGNALS = _Signals()


@contextmanager
def deferred_signals() -> Iterator[None]:
    SIGNALS.depth += 1
    try:
        yield
    finally:
        SIGNALS.depth -= 1
        if not SIGNALS.depth and SIGNALS.pending is not None:
            signum, SIGNALS.pending = SIGNALS.pending, None
            raise Interrupted(signum)


def exit_code_of(exc: KeyboardInterrupt) -> int:
    return exc.exit_code if isinstance(exc, Interrupted) else EXIT_INTERRUPTED


def hold_signals() -> None:
    """Ignore further SIGINT/SIGTERM so a second Ctrl-C cannot cut the summary short.

    :func:`bpfring.cli.main` restores the previous handlers when the command returns.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(signum, signal.SIG_IGN)
        except ValueError:  # not the main thread: nothing was installed either
            pass


def silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def positive_int(what: str = "a positive number") -> Callable[[str], int]:
    """An argparse type: a whole number above zero, refused in words that name ``what``."""

    def parse(text: str) -> int:
        if not text.isdigit() or int(text) == 0:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return int(text)

    return parse


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above zero (``--duration``)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(
            f"must be a finite number of seconds above 0, got {text!r} (leave it out to run until Ctrl-C)"
        )
    return seconds


def paragraphs(*texts: str) -> str:
    """A --help description wrapped by hand (the raw formatter keeps the examples' layout as is)."""
    return "\n\n".join(textwrap.fill(text, 88) for text in texts)


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


def require_admin(command: str, why: str) -> None:
    """Map ids are system-wide: listing them or opening one by id needs CAP_SYS_ADMIN."""
    if not _effective_caps() >> CAP_SYS_ADMIN & 1:
        raise PermissionError(errno.EPERM, f"{command} needs root (CAP_SYS_ADMIN) {why}: run it with sudo")


class Reader(Protocol):
    """The consumer surface the commands drive: RingBuffer and PerfBuffer both have it."""

    def poll(self, timeout_ms: int = -1) -> int: ...

    def consume(self) -> int: ...


def poll_until(reader: Reader, deadline: float | None) -> int:
    """Poll until ``deadline`` (time.monotonic(); None: forever) or until a callback returns < 0.

    Records a producer sent with ``BPF_RB_NO_WAKEUP`` raise no epoll event, so every poll that
    times out is followed by a ``consume()``: none waits longer than :data:`POLL_MS`. Returns the
    callback's negative value, or 0 at the deadline (after a last drain). SIGINT/SIGTERM raise
    :class:`Interrupted` between batches, never in the middle of one.
    """
    while True:
        if deadline is None:
            timeout = POLL_MS
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                with deferred_signals():
                    return min(reader.consume(), 0)
            # Compared before ceil(): left * 1000 of a deadline centuries away is no int (inf).
            timeout = POLL_MS if left * 1000 >= POLL_MS else math.ceil(left * 1000)
        with deferred_signals():
            n = reader.poll(timeout)
            if n == 0:
                n = reader.consume()
        if n < 0:
            return n


def follow(reader: Reader, deadline: float | None, start: Callable[[], None] = lambda: None) -> int:
    """Run ``start()`` then :func:`poll_until`, as a command's exit status.

    0 at the deadline, 128 + signal on SIGINT/SIGTERM, 141 when the reader of our output went
    away; then further signals are held so the command's summary is always printed.
    """
    status = EXIT_OK
    try:
        start()
        poll_until(reader, deadline)
    except KeyboardInterrupt as exc:
        status = exit_code_of(exc)
    except BrokenPipeError:
        silence_stdout()
        status = EXIT_BROKEN_PIPE
    hold_signals()
    return status

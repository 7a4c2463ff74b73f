"""An adversarial review of the changes of 28 Nov (7e8ac39..2f135f4): kept_first(), Kept.holding,
one walk of a ring at a time, the boot watchdog of scripts/kernels. Each test reproduces one
finding against the real kernel and its producers; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any

import pytest
from producer import parse
from test_review_kept import interrupted_by
from test_review_kept2 import step

from bpfring import PerfBuffer, RingBuffer
from bpfring._batch import NOTHING


def seqs(records: list[Any]) -> list[int]:
    """Sequence numbers of records, ``bytes`` or perf ``(cpu, bytes)`` rows."""
    return [parse(r[1] if isinstance(r, tuple) else r)[0] for r in records]


def interrupted_on_the_way_out(where: str, step_other: Any, call: Any) -> None:
    """``call()`` with ``step_other()`` run, then a Ctrl-C raised, where a batch call's records
    have left Kept but not reached the caller: as handed()'s consumer lock is released (the
    switch point after its ``__exit__``), or as Poller.batches() calls ``empty(batch)``. The
    records are put back in front (put_back), as a Ctrl-C there would have them."""

    def profile(frame: Any, event: str, arg: Any) -> None:
        if where == "handed":
            hit = (
                event == "c_return"
                and frame.f_code.co_name == "handed"
                and getattr(arg, "__name__", "") == "__exit__"
                and frame.f_locals.get("result", NOTHING) is not NOTHING
            )
        else:
            caller = frame.f_back
            hit = (
                event == "call"
                and caller is not None
                and caller.f_code.co_name == "batches"
                and caller.f_code.co_filename.endswith("_poller.py")
                and caller.f_locals.get("batch", NOTHING) is not NOTHING
            )
        if hit:
            sys.setprofile(None)
            step_other()
            raise KeyboardInterrupt

    interrupted_by(profile, call)


# -- Kept.holding lasts until the records reach the caller ---------------------------------------------


@pytest.mark.parametrize("kind", ["ring", "perf"])
@pytest.mark.parametrize("where", ["handed", "batches"])
def test_rows_put_back_after_a_ctrl_c_on_the_way_out_come_before_what_an_iteration_took_meanwhile(
    producer, perf_producer, kind, where
):
    """A batch call took rows 1-2 of the deque lent to an iteration; Ctrl-C lands after the lock
    is released and before the caller has them, so they are put back in front. An iteration in
    another thread took row 3 meanwhile (Kept.holding was already clear) and yielded it: the user
    sees 0, 3, 1, 2, ... It waits now until the rows are back (Kept.holding stays set until
    handed() returns, or batches() has checked the batch), as it does for a RecordSizeError."""
    if kind == "ring":
        buf: Any = RingBuffer(producer.ring)
        producer.produce(6, 16)
    else:
        buf = PerfBuffer(perf_producer.array, 1, cpus=[0])
        perf_producer.output(6, 40, cpu=0)
    with buf:
        iteration = buf.records()
        got = [step(iteration)]  # 0; 1-5 lent to it
        assert got[0] is not None
        other = threading.Thread(target=lambda: got.append(step(iteration)))

        def start_other_and_give_it_a_second() -> None:  # (it finishes at once where nothing stops it)
            other.start()
            other.join(1)

        if where == "handed":
            call = lambda: buf.consume_batch(max_records=2)  # noqa: E731
        else:
            call = lambda: step(buf.batches(max_records=2))  # noqa: E731
        interrupted_on_the_way_out(where, start_other_and_give_it_a_second, call)
        other.join(10)
        assert not other.is_alive(), "the iteration still waits after the batch call ended"
        got += [r for r in (step(iteration) for _ in range(5)) if r is not None]
        got += buf.consume_batch()
    assert seqs(got) == [0, 1, 2, 3, 4, 5]


# -- a fork() child of a process where another thread walks a ring ------------------------------------


@pytest.mark.parametrize("kind", ["ring", "perf"])
def test_a_fork_child_closes_its_copy_while_another_thread_of_the_parent_walks_the_ring(producer, perf_producer, kind):
    """A thread of the parent was inside a callback when another thread forked: the child has that
    walk's count (no thread of the child will end it), so its close() met "the ring is being
    consumed" and left its copies of the descriptors and mappings open (a child that closes what it
    inherited, as the docs say to, raised instead). Nothing of the walk runs in the child."""
    from conftest import fork_call, open_fds

    entered, release = threading.Event(), threading.Event()

    def blocking(*args: Any) -> None:
        entered.set()
        release.wait(10)

    if kind == "ring":
        buf: Any = RingBuffer(producer.ring, blocking)
        producer.produce(2, 16)
    else:
        buf = PerfBuffer(perf_producer.array, 1, blocking, cpus=[0])
        perf_producer.output(2, 40, cpu=0)
    with buf:
        walk = threading.Thread(target=buf.consume)
        walk.start()
        try:
            assert entered.wait(10)

            def close_in_child() -> str:
                before = open_fds()
                buf.close()
                return f"closed, {len(before - open_fds())} fds fewer"

            said = fork_call(close_in_child)
        finally:
            release.set()
            walk.join(10)
        assert not walk.is_alive()
    assert said.startswith("ok: closed,") and not said.endswith(" 0 fds fewer"), said


@pytest.mark.parametrize("kind", ["ring", "perf"])
def test_a_child_forked_inside_a_callback_closes_its_copy_there_and_the_parent_reads_on(producer, perf_producer, kind):
    """A callback that forks a worker, which closes what it inherited before it goes on: the
    child's close() ran inside the walk the parent started and was refused. It closes now, and the
    child's walk stops at the callback's return (check_not_forked) without reading the mappings it
    let go; the parent's walk goes on with every record once."""
    from conftest import open_fds

    got: list[int] = []
    said: list[str] = []
    buf: Any = None

    def callback(*args: Any) -> None:
        got.append(parse(args[-1])[0])
        if len(got) != 1:
            return
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: close what it inherited, say how it went, return into the walk
            try:
                before = open_fds()
                buf.close()
                message = f"closed, {len(before - open_fds())} fds fewer"
            except BaseException as exc:
                message = f"{type(exc).__name__}: {exc}"
            os.write(w, message.encode())
            os.close(w)
            return None  # (the walk raises its fork() RuntimeError; os._exit below ends the child)
        os.close(w)
        with os.fdopen(r) as f:
            said.append(f.read())
        os.waitpid(pid, 0)

    if kind == "ring":
        buf = RingBuffer(producer.ring, callback)
        producer.produce(3, 16)
    else:
        buf = PerfBuffer(perf_producer.array, 1, callback, cpus=[0])
        perf_producer.output(3, 40, cpu=0)
    me = os.getpid()
    with buf:
        try:
            n = buf.consume()
        except BaseException:
            if os.getpid() != me:
                os._exit(0)
            raise
        if os.getpid() != me:
            os._exit(1)  # the child's walk went on: it must not
    assert (n, got) == (3, [0, 1, 2])
    assert len(said) == 1 and said[0].startswith("closed,") and not said[0].endswith(" 0 fds fewer"), said


# -- scripts/kernels: a second Ctrl-C while a guest that ignores SIGTERM is stopped -------------------

IGNORES_TERM_VNG = """#!/bin/sh
# stands in for virtme-ng with a qemu that does not listen to SIGTERM (busy under TCG): its
# process group ignores SIGTERM and SIGINT, and it never comes up
trap '' TERM INT
sleep 600 &
echo $$ $! > "$FAKE_VNG_PIDS"
wait
"""

BOOT_ONE = """
import importlib.machinery, importlib.util, sys
from pathlib import Path
loader = importlib.machinery.SourceFileLoader("kernels", sys.argv[1])
module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
sys.modules[loader.name] = module
loader.exec_module(module)
import signal, os
signal.signal(signal.SIGTERM, signal.default_int_handler)  # as main() does
print(module.boot([sys.argv[2]], dict(os.environ), Path(sys.argv[3]), 120, 120), flush=True)
"""


def test_scripts_kernels_a_second_ctrl_c_while_the_guest_is_stopped_leaves_no_guest_running(tmp_path):
    """Ctrl-C sends the guest's process group SIGTERM and waits 5 s for it, then SIGKILL; a second
    Ctrl-C (or SIGTERM) in those 5 s ended the wait with the group still running: vng and qemu
    left behind, in a session of their own, using the cores until someone finds them."""
    import signal
    import subprocess
    import time
    from pathlib import Path

    from test_kernels import fake_vng

    script = Path(__file__).resolve().parent.parent / "scripts" / "kernels"
    fake = fake_vng(tmp_path, IGNORES_TERM_VNG)
    pids_file = tmp_path / "pids"
    env = {**os.environ, "FAKE_VNG_PIDS": str(pids_file)}
    runner = subprocess.Popen(
        [sys.executable, "-c", BOOT_ONE, str(script), str(fake), str(tmp_path / "console.log")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 300  # (a guest under TCG took more than 30 s to start Python)
        while not pids and time.monotonic() < deadline:
            text = pids_file.read_text() if pids_file.exists() else ""
            pids = [int(p) for p in text.split()] if text.endswith("\n") else []
            time.sleep(0.05)
        assert len(pids) == 2, "the fake vng did not start"
        time.sleep(1.5)  # boot() is in its wait loop
        runner.send_signal(signal.SIGINT)  # Ctrl-C: SIGTERM to the guest, which does not listen
        time.sleep(1)
        runner.send_signal(signal.SIGTERM)  # and again, within the 5 s boot() gives it
        runner.communicate(timeout=30)
        deadline = time.monotonic() + 10
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in pids if _alive(pid)]
            time.sleep(0.05)
        assert not alive, f"left running after the second Ctrl-C: {alive}"
    finally:
        runner.kill()
        runner.wait()
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL) if pid == pids[0] else os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    """``pid`` runs (a zombie, reaped by nobody here, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- a PerfRing kept after its PerfBuffer closed ------------------------------------------------------


def test_a_perf_ring_kept_after_its_buffer_closed_says_so_and_closes_nothing_of_anyone_else(perf_producer):
    """PerfBuffer.rings hands the rings out; one kept past close() raised ValueError from repr()
    (a log line or a debugger showing it failed), and its close() closed its fd number again: by
    then another file of the process had that number, and it was closed under its owner."""
    pb = PerfBuffer(perf_producer.array, 1, lambda cpu, data: None, cpus=[0])
    ring = pb.rings[0]
    fd = ring.fd
    pb.close()
    assert "closed" in repr(ring)
    r, w = os.pipe()
    os.dup2(r, fd)  # another file of the process gets the ring's number, as the next open() may
    try:
        ring.close()
        assert os.path.samestat(os.fstat(fd), os.fstat(r)), "the pipe's fd was closed (or replaced)"
        with pytest.raises(ValueError, match="closed"):
            ring.consume(lambda cpu, data: None, lambda cpu, lost: None)
    finally:
        for n in {r, w, fd}:
            with contextlib.suppress(OSError):
                os.close(n)


def test_a_perf_ring_its_user_closed_leaves_the_buffers_close_whole(perf_producer):
    """A ring closed by its user (PerfBuffer.rings hands them out) made the buffer's close() fail:
    it disabled fd -1 (EBADF) and stopped there, the other rings, the claim and the map left open."""
    pb = PerfBuffer(perf_producer.array, 1, lambda cpu, data: None, cpus=sorted(os.sched_getaffinity(0))[:2])
    first, rest = pb.rings[0], pb.rings[1:]
    fds = [ring.fd for ring in rest]
    first.close()
    pb.close()
    assert pb.closed
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed with the buffer (nothing else of this test opened files meanwhile)
    with PerfBuffer(perf_producer.array, 1, lambda cpu, data: None, cpus=[0]):
        pass  # the array is free again: its claim went with the close


SPEWING_VNG = """#!/bin/sh
# a guest that never comes up and fills its console first (a warning in a loop): 64 MiB
head -c 67108864 /dev/zero | tr '\\0' x
touch "$0.spewed"
exec sleep 600
"""

SLOW_MARK_VNG = """#!/bin/sh
# a guest whose console line saying it is up arrives in two writes, a look apart
printf 'virtme-ng-init: starting'
sleep 2
echo ' script (console fallback)'
touch "$0.written"
sleep 3
"""


def _boot(tmp_path: Any, monkeypatch: Any, fake_text: str, flag: str) -> tuple[str, int]:
    """boot() a fake vng with a 3 s boot timeout on a clock that stands still until the fake
    touches ``vng.<flag>``, then passes it: what the fake wrote by then is watched however slow
    the machine (a guest under TCG wrote 14 of 64 MiB in 3 real seconds, and another wrote the
    second half of a line after them)."""
    import time
    from types import SimpleNamespace

    from test_kernels import _kernels_script, fake_vng

    kernels = _kernels_script(monkeypatch)
    fake = fake_vng(tmp_path, fake_text)
    done = tmp_path / f"vng.{flag}"
    monkeypatch.setattr(kernels, "time", SimpleNamespace(monotonic=lambda: 1000.0 if done.exists() else 0.0,
                                                         sleep=time.sleep))
    return kernels.boot([str(fake)], dict(os.environ), tmp_path / "console.log", 3600, 3)


def test_scripts_kernels_watching_a_console_that_fills_before_the_guest_is_up_reads_each_byte_once(
    tmp_path, monkeypatch
):
    """The boot watchdog read the whole console log every second until the guest was up: a guest
    spewing before that (up to --boot-timeout, 300 s) had its whole log in memory, twice (bytes and
    text), each second, and read again and again."""
    import tracemalloc

    tracemalloc.start()
    try:
        outcome = _boot(tmp_path, monkeypatch, SPEWING_VNG, "spewed")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome[0] == "hung"
    assert (tmp_path / "console.log").stat().st_size == 64 << 20
    assert peak < 16 << 20, f"{peak >> 20} MiB at the peak to watch a 64 MiB console"


def test_scripts_kernels_sees_the_guest_up_when_its_console_line_arrives_in_two_writes(tmp_path, monkeypatch):
    """The console is read as it grows: the line that says the guest is up, cut in two by a look
    between its writes, still counts (else the boot is taken for hung, killed and booted again)."""
    assert _boot(tmp_path, monkeypatch, SLOW_MARK_VNG, "written") == ("done", 0)


@pytest.mark.parametrize("kind", ["ring", "perf"])
def test_records_a_ctrl_c_puts_back_from_the_ring_come_before_what_an_iteration_reads_meanwhile(
    producer, perf_producer, kind
):
    """As above, with nothing kept: the batch call took records 3-4 from the ring itself, and the
    Ctrl-C at its lock's release puts them back (they are kept for the next call). An iteration in
    another thread that refilled from the ring meanwhile took 5 and yielded it first."""
    if kind == "ring":
        buf: Any = RingBuffer(producer.ring)
        more = lambda n: producer.produce(n, 16)  # noqa: E731
    else:
        buf = PerfBuffer(perf_producer.array, 1, cpus=[0])
        more = lambda n: perf_producer.output(n, 40, cpu=0)  # noqa: E731
    with buf:
        more(3)
        iteration = buf.records()
        got = [step(iteration) for _ in range(3)]  # 0-2: the deque lent to it is empty
        more(3)
        other = threading.Thread(target=lambda: got.append(step(iteration)))

        def start_other_and_give_it_a_second() -> None:
            other.start()
            other.join(1)

        interrupted_on_the_way_out("handed", start_other_and_give_it_a_second,
                                   lambda: buf.consume_batch(max_records=2))
        other.join(10)
        assert not other.is_alive(), "the iteration still waits after the batch call ended"
        while len(got) < 6 and got[-1] is not None:  # (a step that would wait ends the iteration)
            got.append(step(iteration))
        got = [r for r in got if r is not None] + buf.consume_batch()
    assert seqs(got) == [0, 1, 2, 3, 4, 5]

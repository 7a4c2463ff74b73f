"""An adversarial review of the lifecycle change (issue 13): each test reproduced one finding
(hangs on Ctrl-C and on close() from a signal handler, a GC deadlock inside a claim, a buffer stuck
open after its event loop closed, claims dropped or leaked across fork() and finalization, claims
that did not span users, an unusable lock directory named nowhere) and failed on the code as
reviewed; they pass since the fixes. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
from conftest import open_fds, require_feature
from producer import parse

import bpfring
from bpfring import RingBuffer, features

# -- close() from a signal handler while poll() waits in the same thread -----------------------------

SIGNAL_CLOSE = textwrap.dedent(
    """
    import signal, sys, bpfring
    kind = sys.argv[1]
    if kind == "RingBuffer":
        m = bpfring.Map.create(bpfring.MapType.RINGBUF, 4096)
        buf = bpfring.RingBuffer(m, lambda data: None)
        wait = lambda: buf.poll(-1)
    elif kind == "PerfBuffer":
        m = bpfring.Map.create(bpfring.MapType.PERF_EVENT_ARRAY, 64, 4, 4)
        buf = bpfring.PerfBuffer(m, 1, lambda cpu, data: None, cpus=[0])
        wait = lambda: buf.poll(-1)
    else:
        m = bpfring.Map.create(bpfring.MapType.USER_RINGBUF, 4096)
        buf = bpfring.UserRingBuffer(m)
        while True:  # fill it: nothing drains this ring
            try:
                buf.reserve(64)
            except bpfring.RingFullError:
                break
        wait = lambda: buf.reserve_blocking(64)
    # The usual way to stop a service's poll loop on SIGTERM: close the buffer from the handler.
    signal.signal(signal.SIGALRM, lambda *a: buf.close())
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        print("returned", wait(), flush=True)
    except ValueError as exc:
        print("returned", exc, flush=True)
    """
)


@pytest.mark.parametrize("kind", ["RingBuffer", "PerfBuffer", "UserRingBuffer"])
def test_close_from_a_signal_handler_while_this_thread_waits_does_not_hang(bpf, kind):
    """close() in a signal handler that interrupts this thread's own poll(): before the change it
    was refused (RuntimeError, the thread held the consumer lock); now close() waits for the
    thread in epoll to leave, and that thread is the one running the handler: a deadlock."""
    if kind == "UserRingBuffer":
        require_feature(features.USER_RINGBUF)  # the child makes one: 6.1+
    # A deadlock never ends; the bound leaves a slow machine room to start Python (a TCG guest).
    try:
        proc = subprocess.run([sys.executable, "-c", SIGNAL_CLOSE, kind], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        proc = None  # (run() has killed it)
    assert proc is not None, f"{kind}: close() from a signal handler during the same thread's wait hung (> 60 s)"
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("returned"), proc.stdout + proc.stderr


# -- a standalone Ring dropped without close() keeps its claim and lock fd forever -------------------


def test_a_ring_dropped_without_close_releases_its_claim_and_lock_fd(bpf):
    """bpfring.Ring is public and claims the map like a RingBuffer, but has no finalizer: dropped,
    its Map's fd goes (the Map has one) while the claim's lock fd leaks and the in-process registry
    keeps the map claimed, so no RingBuffer can ever consume that map in this process again."""
    m = bpfring.Map.create(bpfring.MapType.RINGBUF, 4096)
    try:
        before = open_fds()
        ring = bpfring.Ring(m)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            del ring
            gc.collect()
        leaked = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() - before if os.path.exists(f"/proc/self/fd/{fd}")}
        assert not leaked, f"fds left by a dropped Ring: {leaked}"
        RingBuffer(m).close()  # the claim must have gone with the Ring
    finally:
        m.close()


# -- a fork child's close() of an inherited buffer drops the child's own claim -----------------------

FORK_CLAIM = textwrap.dedent(
    """
    import os, time, bpfring
    m = bpfring.Map.create(bpfring.MapType.RINGBUF, 4096)
    inherited = bpfring.RingBuffer(m, lambda d: None)
    go, went = os.pipe()
    ready, said = os.pipe()
    pid = os.fork()
    if pid == 0:  # a pre-forked worker taking over the ring from its parent
        os.read(go, 1)
        mine = bpfring.RingBuffer(m, lambda d: None)  # the parent has let go: the child claims it
        inherited.close()  # only the child's copies of the parent's descriptors... and its claim
        os.write(said, b"x")
        time.sleep(5)
        mine.close()
        os._exit(0)
    inherited.close()
    os.write(went, b"x")
    os.read(ready, 1)
    try:
        bpfring.RingBuffer(m, lambda d: None).close()
        print(f"a second consumer was accepted while the child {pid} consumes")
    except bpfring.BPFError as exc:
        print("refused", exc.errno)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    """
)


def test_a_fork_childs_close_of_an_inherited_buffer_keeps_the_childs_own_claim(bpf):
    """POSIX locks go when the process closes ANY fd of the file: the inherited Claim's lock fd
    (same /run/bpfring/map-ID.lock) closed by the child's close() drops the child's own claim."""
    proc = subprocess.run([sys.executable, "-c", FORK_CLAIM], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "refused 16", proc.stdout


# -- a fork() child that returns from a callback goes on consuming the parent's ring -----------------


def test_a_fork_child_returning_from_a_callback_does_not_consume_the_parents_ring(producer):
    """The issue's rule: in a child the parent's objects refuse to be used. A child forked inside
    a callback returns into the parent's walk (C, no pid check) and takes the rest of the records:
    each is delivered twice, once in each process."""
    producer.produce(10)
    seen: list[int] = []
    in_child = False
    r, w = os.pipe()

    def callback(data: bytes) -> None:
        nonlocal in_child
        seen.append(parse(data)[0])
        if len(seen) == 1 and os.fork() == 0:
            in_child = True

    rb = RingBuffer(producer.ring, callback)
    try:
        try:
            result = f"delivered {rb.consume()}: {seen}"
        except BaseException as exc:  # what the child should meet: the fork error
            result = f"{type(exc).__name__}: {exc}"
        if in_child:
            os.write(w, result.encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            child_said = f.read()
        os.wait()
    finally:
        if not in_child:
            rb.close()
    assert seen == list(range(10))
    assert "fork() child" in child_said, f"the child consumed the parent's ring: {child_said}"


# -- an unusable lock directory ----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["a-file", "/proc/sys"])
def test_an_unusable_lock_dir_is_named_in_the_error(bpf, tmp_path, monkeypatch, where):
    """A RingBuffer refused because of BPFRING_LOCK_DIR says what the path is for, as errors must:
    today a bare "[Errno 17] File exists: '/tmp/...'" (or ENOENT on a file the user never named)
    reaches the user, who asked for a RingBuffer."""
    lock_dir = tmp_path / "a-file" if where == "a-file" else where
    if where == "a-file":
        lock_dir.write_text("")
    monkeypatch.setenv("BPFRING_LOCK_DIR", str(lock_dir))
    m = bpfring.Map.create(bpfring.MapType.RINGBUF, 4096)
    try:
        before = open_fds()
        with pytest.raises(OSError) as info:
            RingBuffer(m).close()
        assert open_fds() == before
        message = str(info.value)
        assert "BPFRING_LOCK_DIR" in message or "claim" in message, message
    finally:
        m.close()


# -- Ctrl-C landing in poll() leaves the Poller's state lock held, or its waiter count up ------------

CTRL_C_STORM = textwrap.dedent(
    """
    import faulthandler, os, signal, subprocess, sys, threading, time, bpfring
    kind, seconds = sys.argv[1], float(sys.argv[2])
    if kind == "RingBuffer":
        m = bpfring.Map.create(bpfring.MapType.RINGBUF, 4096)
        buf = bpfring.RingBuffer(m, lambda data: None)
    else:
        m = bpfring.Map.create(bpfring.MapType.PERF_EVENT_ARRAY, 64, 4, 4)
        buf = bpfring.PerfBuffer(m, 1, lambda cpu, data: None, cpus=[0])
    armed = False

    def ctrl_c(*args):  # KeyboardInterrupt, but only inside the try below (never in this script)
        global armed
        if armed:
            armed = False
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, ctrl_c)
    # Ctrl-C from outside, as a terminal sends it (at any moment), about 1000 times a second.
    sender = subprocess.Popen([sys.executable, "-c", (
        "import os, time\\n"
        f"end = time.monotonic() + {seconds}\\n"
        "while time.monotonic() < end:\\n"
        f"    os.kill({os.getpid()}, 2)\\n"
        "    time.sleep(0.001)"
    )])
    faulthandler.dump_traceback_later(seconds + 5, exit=True)  # a hang: the stacks, exit 1
    interrupted = 0
    while sender.poll() is None:
        try:
            armed = True
            buf.poll(0)  # "Ctrl-C during poll(): the next call goes on where it stopped"
            armed = False
        except KeyboardInterrupt:
            interrupted += 1
    closer = threading.Thread(target=buf.close, daemon=True)
    closer.start()
    closer.join(3)
    faulthandler.cancel_dump_traceback_later()
    print(f"interrupted {interrupted}; close() {'hung' if closer.is_alive() else 'returned'}", flush=True)
    """
)


@pytest.mark.parametrize("kind", ["RingBuffer", "PerfBuffer"])
def test_ctrl_c_landing_anywhere_in_poll_leaves_poll_and_close_working(bpf, kind):
    """docs/guarantees.md: Ctrl-C while poll() waits or walks propagates, and the next call goes
    on. Poller.wait() takes a threading.Condition (whose __enter__ is Python code: a
    KeyboardInterrupt can land after the lock is acquired and before the with-block owns it, so
    the lock is held forever and the next poll() blocks in Condition.__enter__), and counts itself
    in _waiting outside its try (an interrupt between the two leaves the count up, and close()
    waits for it forever)."""
    proc = subprocess.run([sys.executable, "-c", CTRL_C_STORM, kind, "5"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "close() returned" in proc.stdout, (proc.stdout + proc.stderr)[-1500:]


# -- the claim does not span users: root and a CAP_BPF user consume one ring together ----------------

NOBODY_CONSUMER = textwrap.dedent(
    """
    import sys, time, bpfring
    rb = bpfring.RingBuffer(sys.argv[1], lambda d: None)
    print("consuming", flush=True)
    time.sleep(20)
    """
)


def test_a_ring_consumed_by_another_user_is_refused(bpf, tmp_path):
    """docs/guarantees.md: a second consumer "in this process or another" is refused, whichever
    user runs it: a service running as a user with CAP_BPF and root's `bpfring tail` see each
    other's claims in /run/bpfring (before the fix the directory depended on the euid)."""
    import shutil
    import tempfile

    from bpfring._claim import lock_dir
    from bpfring._sys.mounts import BPFFS, ensure_bpffs

    ensure_bpffs()
    lock_dir()  # as root: /run/bpfring made, shared by every user
    # The service's user may not read this checkout (CI clones into a private directory): it
    # imports the installed package from a world-readable copy.
    share = tempfile.mkdtemp(prefix="bpfring-nobody-")
    os.chmod(share, 0o755)
    shutil.copytree(os.path.dirname(bpfring.__file__), os.path.join(share, "bpfring"))
    path = f"{BPFFS}/bpfring-review-{os.getpid()}"
    m = bpfring.Map.create(bpfring.MapType.RINGBUF, 4096)
    m.pin(path)
    os.chmod(path, 0o666)  # the service's user may open the pinned ring
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=+bpf,+perfmon", "--ambient-caps=+bpf,+perfmon"]
    service = subprocess.Popen(
        [*cmd, sys.executable, "-c", NOBODY_CONSUMER, path],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=share),
    )
    try:
        assert service.stdout.readline().strip() == "consuming", service.stderr.read()
        with pytest.raises(bpfring.BPFError, match=rf"already consumed by pid {service.pid}"):
            RingBuffer(path, lambda d: None).close()
    finally:
        service.kill()
        service.wait(10)
        os.unlink(path)
        m.close()
        shutil.rmtree(share)


# -- close() after the event loop of a pending async iteration was closed ----------------------------


@pytest.mark.parametrize("kind", ["RingBuffer", "PerfBuffer", "UserRingBuffer"])
def test_close_after_an_iterating_event_loop_was_closed_releases_everything(bpf, kind):
    """A loop stopped and closed with an `async for` (or a reserve_async()) still pending (a
    framework shutting down, loop.run_until_complete() of something else, then loop.close()): its
    waiter stays in Poller._async_waiters, and close() calls loop.call_soon_threadsafe() on the
    closed loop (_poller.py _end_async_waits), which raises RuntimeError after _closing was set.
    RingBuffer/PerfBuffer: nothing is released, every later close() returns at once, the claim is
    held for good. UserRingBuffer: close() raises and the reserve_async() epoll and eventfd leak."""
    if kind == "RingBuffer":
        m = bpfring.Map.create(bpfring.MapType.RINGBUF, 4096)
        make = lambda: RingBuffer(m)  # noqa: E731
    elif kind == "PerfBuffer":
        m = bpfring.Map.create(bpfring.MapType.PERF_EVENT_ARRAY, 64, 4, 4)
        make = lambda: bpfring.PerfBuffer(m, 1, cpus=[0])  # noqa: E731
    else:
        m = bpfring.Map.create(bpfring.MapType.USER_RINGBUF, 4096)
        make = lambda: bpfring.UserRingBuffer(m)  # noqa: E731
    try:
        before = open_fds()
        buf = make()

        async def wait() -> None:
            if kind == "UserRingBuffer":
                while True:  # nothing drains this ring: fill it, then wait for room
                    try:
                        buf.reserve(64)
                    except bpfring.RingFullError:
                        break
                await buf.reserve_async(64)
            else:
                async for _ in buf:
                    pass

        loop = asyncio.new_event_loop()
        task = loop.create_task(wait())
        loop.run_until_complete(asyncio.sleep(0.1))  # the task now waits on this loop
        loop.close()
        try:
            buf.close()
        finally:
            del task  # (the pending task is destroyed with its loop)
            assert buf.closed, "close() left the buffer open"
            leaked = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() - before if os.path.exists(f"/proc/self/fd/{fd}")}
            assert not leaked, f"fds left: {leaked}"
            make().close()  # the claim went with it
    finally:
        m.close()


# -- the garbage collector finalizing a buffer inside Claim() deadlocks on _claimed_lock -------------

GC_IN_CLAIM = textwrap.dedent(
    """
    import faulthandler, gc, warnings, bpfring
    warnings.simplefilter("ignore", ResourceWarning)
    pool = [bpfring.Map.create(bpfring.MapType.RINGBUF, 4096) for _ in range(40)]
    mine = bpfring.Map.create(bpfring.MapType.RINGBUF, 4096)

    class Tracer:  # the usual shape: the callback is a method of the object holding the buffer
        def __init__(self, m):
            self.rb = bpfring.RingBuffer(m, self.handle)  # a cycle: only the cyclic GC frees it

        def handle(self, data):
            pass

    gc.set_threshold(7, 1, 1)  # collections often, at allocation points anywhere (as ever, only sooner)
    for i in range(3000):
        faulthandler.dump_traceback_later(5, exit=True)  # no progress for 5 s: the stacks, exit 1
        try:
            Tracer(pool[i % len(pool)])  # dropped without close()
        except bpfring.BPFError:
            pass  # that map's previous Tracer is not collected yet
        bpfring.RingBuffer(mine).close()
    faulthandler.cancel_dump_traceback_later()
    print("done", flush=True)
    """
)


def test_a_buffer_finalized_by_the_gc_inside_another_claim_does_not_deadlock(bpf):
    """Claim.__init__ holds the non-reentrant _claimed_lock while it allocates (lock_dir(),
    os.makedirs, os.path.join): a cyclic GC pass there may finalize an unclosed RingBuffer, whose
    __del__ -> close() -> Claim.release() takes _claimed_lock again in the same thread: the
    process hangs for good (_claim.py, Claim.__init__ and release())."""
    proc = subprocess.run([sys.executable, "-c", GC_IN_CLAIM], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", (proc.stdout + proc.stderr)[-2500:]

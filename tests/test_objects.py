"""Object: BPF ELF files through libbpf, on the package's own exec tracer and the test producer."""

from __future__ import annotations

import ctypes
import errno
import gc
import json
import logging
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings

import pytest
from conftest import as_nobody, fork_and, fork_call, open_fds, without_collector

import bpfring
from bpfring import Object, RingBuffer
from bpfring._sys import mounts
from bpfring.objects import bump_memlock_rlimit

EVENT = struct.Struct("<i16s512s")  # struct event of execsnoop.h


def only(obj: Object, program: str) -> Object:
    for prog in obj.programs:
        prog.autoload = prog.name == program
    return obj


def test_attach_by_section_name_and_consume_the_seed_events(execsnoop_object):
    with Object(execsnoop_object) as obj:
        only(obj, "handle_exec_reserve").load()
        links = obj.attach()
        assert [link.program.name for link in links] == ["handle_exec_reserve"]
        got: list[bytes] = []
        with RingBuffer(obj.map("rb"), got.append) as rb:
            child = subprocess.Popen(["/bin/true", "bpfring-objects-test"])
            child.wait()
            pids = []
            while child.pid not in pids:
                assert rb.poll(5000) > 0, "no exec event arrived"
                pids = [EVENT.unpack(g)[0] for g in got]
            pid, comm, filename = EVENT.unpack(got[pids.index(child.pid)])
            # C strings: what follows the first NUL is whatever the reserved record held before
            # (6.1's bpf_get_current_comm() leaves it; later kernels zero it)
            assert filename.split(b"\0", 1)[0] == b"/bin/true"
            assert comm.split(b"\0", 1)[0] == b"true"

            links[0].destroy()  # detached: execs no longer reach the ring
            assert not links[0].attached
            rb.consume()
            subprocess.run(["/bin/true"])
            assert rb.poll(200) == 0


def test_a_link_nobody_kept_stays_attached_and_listed_until_destroyed(execsnoop_object):
    with Object(execsnoop_object) as obj:
        only(obj, "handle_exec_reserve").load()
        obj.program("handle_exec_reserve").attach()  # the Link is dropped at once
        gc.collect()
        got: list[bytes] = []
        with RingBuffer(obj.map("rb"), got.append) as rb:
            child = subprocess.Popen(["/bin/true"])
            child.wait()
            while child.pid not in [EVENT.unpack(g)[0] for g in got]:
                assert rb.poll(5000) > 0, "no exec event arrived: the link went with its Python object"
            [link] = obj.links
            assert link.attached and link.program.name == "handle_exec_reserve"
            link.destroy()
            assert obj.links == []
            rb.consume()
            subprocess.run(["/bin/true"])
            assert rb.poll(200) == 0


def test_an_attached_object_dropped_without_close_detaches_at_once_even_without_the_collector(execsnoop_object):
    """A dropped object is released by its reference count, not left for the cyclic collector
    (which an agent may have disabled or frozen): a link it made is no reference cycle."""
    with without_collector(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = open_fds()
        obj = Object(execsnoop_object)
        only(obj, "handle_exec_reserve").load()
        obj.attach()
        assert open_fds() - before
        del obj
        assert open_fds() == before  # link, program and maps closed: detached
        assert [w for w in caught if issubclass(w.category, ResourceWarning) and "Object" in str(w.message)]

        caught.clear()
        obj = Object(execsnoop_object)
        only(obj, "handle_exec_reserve").load()
        link = obj.program("handle_exec_reserve").attach()
        del obj  # the link keeps its program, and so its object
        assert link.attached and open_fds() - before and not caught
        del link
        assert open_fds() == before
        assert [w for w in caught if issubclass(w.category, ResourceWarning) and "Object" in str(w.message)]


LIST_WHILE_CLOSING = """
import os, sys, threading
from bpfring import Object
from bpfring._sys import perf

# 200 links a round, each on a perf event of its own (a kernel before 6.2 or so refuses a second
# attach of a program to one raw tracepoint: EEXIST); cpu-clock, sampling once a minute
attr = perf.PerfEventAttr(type=perf.PERF_TYPE_SOFTWARE, config=0, sample_period=60 * 10**9)
names = set()
for _ in range(20):
    obj = Object(sys.argv[1])
    obj.load()
    prog = obj.program("on_perf_event")
    for _ in range(200):
        fd = perf.perf_event_open(attr, 0, -1, -1, perf.PERF_FLAG_FD_CLOEXEC, "a cpu-clock event")
        prog.attach_perf_event(fd)  # each Link dropped: obj.links makes one anew
        os.close(fd)  # (the link holds its own)
    del prog
    started = threading.Event()

    def list_links():
        started.set()
        while not obj.closed:
            names.update(link.program.name for link in obj.links)

    lister = threading.Thread(target=list_links)
    lister.start()
    started.wait()
    obj.close()
    lister.join()
print(sorted(names))
"""


def test_links_listed_while_another_thread_closes_the_object_name_their_program(bpf_object):
    """Object.links makes a Link anew for an attachment whose Link was dropped: it must not ask
    libbpf for the program's name then, as close() in another thread may be freeing it (a crash,
    or a name read from freed memory)."""
    run = subprocess.run(
        [sys.executable, "-c", LIST_WHILE_CLOSING, str(bpf_object("attach"))], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "['on_perf_event']"


CLOSE_RACING_METHODS = """
import json, logging, os, platform, random, sys, threading
import bpfring
from bpfring import Map, Object
from bpfring._sys import perf

GETPPID_NR = {"x86_64": 110, "aarch64": 173}[platform.machine()]
path, rounds = sys.argv[1], int(sys.argv[2])
logging.getLogger("bpfring").addHandler(logging.NullHandler())  # libbpf's EEXIST warnings
sys.setswitchinterval(1e-5)  # switch threads often: close() lands anywhere in a method


def racing(obj, loaded, perf_fd):
    raw, tp = obj.program("on_raw_tracepoint"), obj.program("on_tracepoint")
    up, pe = obj.program("on_uprobe"), obj.program("on_perf_event")
    ops = {
        "programs": lambda: obj.programs,
        "iter": lambda: [p.section for p in obj],
        "map_names": lambda: obj.map_names,
        "autoload": lambda: raw.autoload,
        "initial_value": lambda: obj.initial_value(".rodata"),
        "struct": lambda: obj.struct("bpf_raw_tracepoint_args"),
        "global_sections": lambda: obj.global_sections,
        "rodata": lambda: obj.rodata.targ_nr,
    }
    if not loaded:
        bss = next(n for n in obj.map_names if n.endswith(".bss"))
        ops.update({
            "load": obj.load,
            "set_autoload": lambda: setattr(raw, "autoload", True),
            "set_max_entries": lambda: obj.set_max_entries(bss, 1),
            "set_initial_value": lambda: obj.set_initial_value(".rodata", obj.initial_value(".rodata")),
            "set_rodata": lambda: setattr(obj.rodata, "targ_nr", GETPPID_NR),
        })
    else:
        ops.update({
            "fd": lambda: raw.fd,
            "map": lambda: obj.map(".bss"),
            "bss": lambda: obj.bss.raw_tp_hits,
            "attach": raw.attach,
            "object_attach": obj.attach,
            "attach_raw_tracepoint": lambda: raw.attach_raw_tracepoint("sys_enter"),
            "attach_tracepoint": lambda: tp.attach_tracepoint("syscalls", "sys_enter_getppid"),
            "attach_uprobe": lambda: up.attach_uprobe("libc.so.6", "getppid"),
            "attach_perf_event": lambda: pe.attach_perf_event(perf_fd),
        })
    return ops


# What a call may meet before close(): a load() won by another thread, a program attached once
# already to the same event (EEXIST), a section with no automatic attach point (EOPNOTSUPP).
REFUSALS = ("is already loaded", "has no fd before load()", "froze .rodata at load")
done, unexpected, leaks, links = {}, [], [], []


def call_until_closed(name, op, go, obj):
    go.wait()
    while True:
        was_closed = obj.closed
        try:
            result = op()
        except (ValueError, bpfring.BPFError) as exc:
            if "is closed" in str(exc):
                return  # the end every thread must reach
            if was_closed or not (any(r in str(exc) for r in REFUSALS) or getattr(exc, "errno", 0) in (17, 95)):
                unexpected.append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
                return
        except Exception as exc:
            unexpected.append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
            return
        else:
            if was_closed:
                unexpected.append(f"{name} succeeded on a closed object")
                return
            done[name] = done.get(name, 0) + 1
            links.extend(r for r in (result if isinstance(result, list) else [result]) if isinstance(r, bpfring.Link))


for i in range(rounds):
    loaded = i % 2 == 1
    before = set(os.listdir("/proc/self/fd"))
    obj = Object(path)
    obj.rodata.targ_tgid = os.getpid()
    obj.rodata.targ_nr = GETPPID_NR
    bss = perf_fd = None
    if loaded:
        obj.load()
        bss = Map.from_fd(obj.map(".bss").fd)  # ours: still readable after close()
        attr = perf.PerfEventAttr(type=perf.PERF_TYPE_SOFTWARE, config=0, sample_period=200_000)  # cpu-clock
        perf_fd = perf.perf_event_open(attr, 0, -1, -1, perf.PERF_FLAG_FD_CLOEXEC, "a cpu-clock event")
    ops = racing(obj, loaded, perf_fd)
    go = threading.Barrier(len(ops) + 1)
    threads = [threading.Thread(target=call_until_closed, args=(n, op, go, obj)) for n, op in ops.items()]
    for t in threads:
        t.start()
    go.wait()
    threading.Event().wait(random.random() * 0.02)
    obj.close()
    for t in threads:
        t.join()
    if any(link.attached for link in links):
        leaks.append(f"round {i}: a link says it is still attached after close()")
    del ops, obj
    if loaded:
        hits = bss.lookup(bytes(4))
        for _ in range(200):
            os.getppid()  # the tracepoint, raw tracepoint and (libc's getppid) uprobe programs' event
        sum(range(2_000_000))  # CPU time in this thread: the perf event's samples
        if bss.lookup(bytes(4)) != hits:
            leaks.append(f"round {i}: a program still runs after close(): a link was left attached")
        bss.close()
        os.close(perf_fd)
    left = set(os.listdir("/proc/self/fd")) - before
    if left:
        leaks.append(f"round {i}: fds left open: " + ", ".join(os.readlink("/proc/self/fd/" + fd) for fd in left))
print(json.dumps({"done": done, "unexpected": unexpected[:10], "leaks": leaks[:10], "links": len(links)}))
"""


def test_close_racing_every_method_in_other_threads_never_crashes_and_leaves_nothing_attached(bpf_object):
    """Threads call every method that hands libbpf pointers into the object (attach_*, fd,
    programs, map(), load(), the setters, globals...) while the main thread closes it: each call
    either completes before close() (which then destroys the links it made) or raises "is
    closed". Before, close() freed what libbpf was reading (a segfault) and an attach finishing
    after close() left its link attached, for nobody to destroy. In a child, so a crash fails
    the test; MALLOC_PERTURB_ fills freed memory, so a read of it goes wrong at once."""
    run = subprocess.run(
        [sys.executable, "-c", CLOSE_RACING_METHODS, str(bpf_object("attach")), "20"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MALLOC_PERTURB_": "165"},
    )
    assert run.returncode == 0, f"the child died (exit {run.returncode}): {run.stderr[-2000:]}"
    said = json.loads(run.stdout)
    assert said["unexpected"] == [] and said["leaks"] == []
    # the race was run: every method completed in some round, and links were made to be destroyed
    assert set(said["done"]) >= {"programs", "autoload", "struct", "load", "fd", "map", "bss", "attach_raw_tracepoint", "attach_uprobe"}
    assert said["links"] > 0


def fork_and_close(obj: Object) -> int:
    """close() in a fork() child; its exit status (the child is killed, and the test fails, if it hangs)."""

    def close() -> None:
        obj.close()
        assert obj.closed

    return fork_and(close)


class _Calling(logging.Handler):
    """A handler of bpfring's log (libbpf's, during load()) that runs ``action`` on a record, in the loading thread."""

    def __init__(self, action) -> None:
        super().__init__(logging.DEBUG)
        self.action = action

    def emit(self, record: logging.LogRecord) -> None:
        self.action()


def test_a_fork_child_closes_an_object_another_thread_was_inside(bpf_object):
    """A thread inside load() holds the object's lock at the fork: it would stay held in the child
    forever, where that thread does not exist. The child takes a fresh one and closes its copy."""
    inside, go_on = threading.Event(), threading.Event()
    obj = Object(bpf_object("attach"))
    loader = threading.Thread(target=obj.load)

    def stall() -> None:
        if threading.current_thread() is loader:
            inside.set()
            go_on.wait(10)

    logger, handler = logging.getLogger("bpfring"), _Calling(stall)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        loader.start()
        assert inside.wait(10), "libbpf logged nothing during load()"
        assert fork_and_close(obj) == 0
    finally:
        go_on.set()
        loader.join(10)
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert obj.loaded and obj.programs  # the parent's object is the parent's still
    obj.close()


def test_a_fork_child_lets_go_of_the_links_while_another_thread_was_destroying_one(bpf_object):
    """At the fork the child lets go of the parent's links (its hook destroys its copies); a
    thread of the parent inside a link's destroy() at that moment holds the attachments' lock,
    which the child inherits held: the child hung in the fork itself."""
    from bpfring.objects import _Attachment

    with Object(bpf_object("attach")) as obj:
        obj.load()
        link = obj.program("on_raw_tracepoint").attach_raw_tracepoint("sys_enter")
        with _Attachment._taking:  # as a destroy() in another thread holds it for a moment
            status = fork_and_close(obj)
        assert status == 0
        assert link.attached


CLOSE_INSIDE_LOAD = """
import logging, os, sys
from bpfring import Object

before = set(os.listdir("/proc/self/fd"))
obj = Object(sys.argv[1])

class CloseIt(logging.Handler):
    def emit(self, record):
        obj.close()  # in the thread that is inside load(), as a signal handler would

logger = logging.getLogger("bpfring")
logger.setLevel(logging.DEBUG)
logger.addHandler(CloseIt())
obj.load()
try:
    obj.programs
except ValueError as exc:
    print(exc)
print(obj.closed, set(os.listdir("/proc/self/fd")) == before)
"""


def test_close_called_by_a_handler_inside_load_is_done_when_load_returns(bpf_object):
    """A close() from a signal handler, or a logging handler that libbpf's log calls, in the
    thread that is inside load(): freeing the object there crashed the load still using it. It
    is done once load() returns: the object is closed then, every fd with it."""
    run = subprocess.run(
        [sys.executable, "-c", CLOSE_INSIDE_LOAD, str(bpf_object("attach"))],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MALLOC_PERTURB_": "165"},
    )
    assert run.returncode == 0, f"the child died (exit {run.returncode}): {run.stderr[-2000:]}"
    assert run.stdout.splitlines()[-2:] == [f"BPF object {str(bpf_object('attach'))!r} is closed", "True True"]


def test_set_max_entries_before_load_only(execsnoop_object):
    with Object(execsnoop_object) as obj:
        only(obj, "handle_exec_reserve")
        obj.set_max_entries("rb", 1 << 21)
        obj.load()
        assert obj.map("rb").max_entries == 1 << 21
        with pytest.raises(ValueError, match="cannot resize map 'rb': object 'execsnoop' is already loaded"):
            obj.set_max_entries("rb", 1 << 22)


def test_maps_by_name_and_global_data(execsnoop_object):
    with Object(execsnoop_object) as obj:
        assert {"rb", "pb", "heap"} <= set(obj.map_names)
        with pytest.raises(ValueError, match="call load\\(\\) first"):
            obj.map("rb")
        only(obj, "handle_exec_output").load()
        assert obj.map("rb").type == bpfring.MapType.RINGBUF
        assert obj.map(".bss").lookup(b"\0" * 4) == b"\0" * 8  # __u64 dropped = 0
        with pytest.raises(KeyError, match="has no map 'nope' \\(it has: "):
            obj.map("nope")
        with pytest.raises(KeyError, match="has no program 'nope'"):
            obj.program("nope")


def test_a_ring_size_that_is_not_a_power_of_two_is_refused(execsnoop_object):
    with Object(execsnoop_object) as obj:
        with pytest.raises(ValueError, match="power of two and a multiple of the page size .*got 3000"):
            obj.set_max_entries("rb", 3000)


def test_a_verifier_rejection_says_why_and_libbpf_logs_to_logging(bpf_object, caplog, capfd):
    with Object(bpf_object("rejected")) as obj:
        with caplog.at_level(logging.DEBUG, logger="bpfring.libbpf"):
            with pytest.raises(bpfring.BPFError) as info:
                obj.load()
    assert not isinstance(info.value, PermissionError)
    assert "the verifier rejected a program" in str(info.value)
    assert "invalid mem access" in str(info.value)
    assert any(r.name == "bpfring.libbpf" and r.levelno == logging.WARNING for r in caplog.records)
    assert capfd.readouterr().err == ""  # nothing of libbpf's on stderr


def test_open_errors(bpf, tmp_path):
    before = open_fds()
    with pytest.raises(bpfring.BPFNotFoundError, match="opening BPF object '/nonexistent.bpf.o'"):
        Object("/nonexistent.bpf.o")
    junk = tmp_path / "junk.bpf.o"
    junk.write_bytes(b"not an ELF file")
    with pytest.raises(bpfring.BPFError, match="opening BPF object .*junk.bpf.o"):
        Object(junk)
    assert open_fds() == before


def test_close_detaches_and_frees_everything(execsnoop_object):
    before = open_fds()
    obj = Object(execsnoop_object)
    only(obj, "handle_exec_reserve").load()
    link = obj.attach()[0]
    rb_map = obj.map("rb")
    obj.close()
    obj.close()
    assert not link.attached and rb_map.closed
    assert open_fds() == before
    with pytest.raises(ValueError, match="is closed"):
        obj.programs
    with pytest.raises(ValueError, match="is closed"):
        link.program.autoload  # noqa: B018 - a Program kept past close() must not touch freed memory


def test_programs_without_an_attach_point_are_left_to_the_caller(bpf_object):
    with Object(bpf_object("producer")) as obj:
        obj.load()
        assert obj.attach() == []  # SEC("syscall") programs are run, not attached
        with pytest.raises(bpfring.BPFError) as info:
            obj.program("produce").attach()
        assert info.value.errno == 95


def test_an_attach_that_fails_partway_leaves_nothing_attached(bpf_object):
    before = open_fds()
    with Object(bpf_object("lifetime")) as obj:
        obj.rodata.targ_tgid = os.getpid()
        obj.load()
        names = [p.name for p in obj.programs]
        assert names.index("counts") < names.index("cannot_attach")  # one attaches before the other fails
        with pytest.raises(bpfring.BPFNotFoundError, match="attaching program 'cannot_attach'"):
            obj.attach()
        assert obj.links == []
        os.getppid()
        assert obj.bss.hits == 0  # 'counts' attached, then detached: it saw nothing
        link = obj.program("counts").attach()  # the object is as it was: its programs attach one by one
        os.getppid()
        assert obj.bss.hits == 1 and obj.links == [link]
    assert open_fds() == before


def test_an_attach_that_fails_partway_keeps_the_links_the_caller_made_before(bpf_object):
    with Object(bpf_object("lifetime")) as obj:
        obj.rodata.targ_tgid = os.getpid()
        obj.load()
        kept = obj.program("counts").attach_tracepoint("syscalls", "sys_enter_getsid")  # the same program
        with pytest.raises(bpfring.BPFNotFoundError, match="attaching program 'cannot_attach'"):
            obj.attach()
        assert obj.links == [kept] and kept.attached
        os.getppid()
        os.getsid(0)
        assert obj.bss.hits == 1  # at getsid only: the attach() made at getppid is gone


def test_an_attach_interrupted_at_any_point_leaves_only_what_was_attached_before(bpf_object):
    """A Ctrl-C at each point of Object.attach() in turn: the links it made are destroyed, the one
    the caller made before (of the same program) stays, and close() leaves no fd. A Ctrl-C
    landing as libbpf handed a link over left it attached for good (not even close() knew it);
    one landing after the object took it (or as attach() let go of the object's lock, all done)
    left it attached and listed, though attach() raised."""
    before = open_fds()
    with Object(bpf_object("lifetime")) as obj:
        obj.rodata.targ_tgid = os.getpid()
        obj.program("cannot_attach").autoload = False
        obj.load()
        kept = obj.program("counts").attach_tracepoint("syscalls", "sys_enter_getsid")
        for link in obj.attach():  # once, so that each call passes the same points (caches filled)
            link.destroy()
        k, landed = 0, True
        while landed:
            k += 1
            made: list = []
            landed = interrupted_at(k, lambda: made.extend(obj.attach()))  # 'counts' again, at sys_enter_getppid
            hits = obj.bss.hits
            os.getppid()
            if landed:
                assert obj.links == [kept], f"Ctrl-C at point {k} of attach()"
                assert obj.bss.hits == hits, f"Ctrl-C at point {k} of attach(): still attached at getppid"
            else:
                assert obj.bss.hits == hits + 1 and obj.links == [kept, *made]
                made[0].destroy()
            os.getsid(0)
            assert kept.attached and obj.bss.hits == k + 1 - landed
        assert k > 20
    assert open_fds() == before

def test_a_link_destroy_interrupted_at_any_point_leaves_it_attached_and_listed_or_gone(bpf_object):
    """A Ctrl-C at each point of Link.destroy() in turn: the link is either detached (the program
    no longer runs) or still attached, listed, and detached by a destroy() again. One landing
    after destroy() took the link, before libbpf freed it, left it attached for good, though the
    link said detached and the object listed nothing."""
    before = open_fds()
    with Object(bpf_object("lifetime")) as obj:
        obj.rodata.targ_tgid = os.getpid()
        obj.load()
        k, landed = 0, True
        while landed:
            k += 1
            link = obj.program("counts").attach()
            landed = interrupted_at(k, link.destroy)
            hits = obj.bss.hits
            os.getppid()
            if obj.bss.hits != hits:  # still attached: it says so, and goes when asked again
                assert link.attached and obj.links == [link], f"Ctrl-C at point {k} of destroy()"
                link.destroy()
                hits = obj.bss.hits
                os.getppid()
            assert obj.bss.hits == hits and not link.attached and obj.links == [], f"Ctrl-C at point {k}"
        assert k > 5
    assert open_fds() == before


def test_a_handler_closing_the_object_and_raising_at_any_point_of_a_link_destroy_leaves_no_fd(bpf_object):
    """A signal handler that closes the object and raises (Ctrl-C: clean up, stop) at each point of
    Link.destroy() in turn: nothing is left attached or open. Landing after destroy() took the
    link, its close() passed the link by; destroy() then gave it back to an object already
    closed, and it stayed attached for good."""
    path = bpf_object("lifetime")
    before = open_fds()
    k, called = 0, True
    while called:
        k += 1
        obj = Object(path)
        obj.load()
        link = obj.program("counts").attach()
        seen, called = 0, False

        def profile(frame, event, arg):
            nonlocal seen, called
            where = frame.f_code.co_filename
            if event in ("call", "c_return") and not where.startswith(TESTS) and not where.endswith("_weakrefset.py"):
                seen += 1
                if seen == k:
                    called = True
                    obj.close()
                    raise KeyboardInterrupt

        sys.setprofile(profile)
        try:
            link.destroy()
        except KeyboardInterrupt:
            pass
        finally:
            sys.setprofile(None)
        obj.close()
        assert open_fds() == before, f"a handler's close() and Ctrl-C at point {k} of destroy()"
    assert k > 5


def loaded_answers(path) -> tuple[Object, bpfring.Program]:
    """lifetime.bpf.o loaded, and its program that answers 1."""
    obj = Object(path)
    obj.load()
    return obj, obj.program("answers")


RUNS = 10**7  # test runs of a one-instruction socket filter: a few tenths of a second


def test_close_waits_for_a_test_run_in_another_thread(bpf_object):
    obj, prog = loaded_answers(bpf_object("lifetime"))
    started, outcome = threading.Event(), []

    def run():
        started.set()
        outcome.append(prog.test_run(data=bytes(64), repeat=RUNS).retval)

    t = threading.Thread(target=run)
    t.start()
    started.wait()
    time.sleep(0.05)  # into the kernel's loop
    obj.close()
    assert outcome == [1]  # the run ended, with its own program, before close() returned
    t.join()
    with pytest.raises(ValueError, match="is closed"):
        prog.test_run(data=bytes(64))


def test_test_runs_racing_close_run_their_own_program_or_say_closed(bpf_object):
    """Each object's program answers its own number; closing one and loading the next reuses the
    fd numbers, so a run that took its fd before a close() and ran after it would run the next
    object's program (or fail with EBADF or EINVAL, on a map)."""
    path = bpf_object("lifetime")
    current: list = []
    wrong: list = []
    stop = threading.Event()

    def runner():
        while not stop.is_set():
            if not current:
                continue
            prog, expected = current[-1]
            try:
                got = prog.test_run(data=bytes(64)).retval
            except ValueError as exc:
                if "is closed" not in str(exc):
                    wrong.append(repr(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - reported below
                wrong.append(repr(exc))
                continue
            if got != expected:
                wrong.append(f"ran answer {got} for {expected}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=runner) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for n in range(2, 200):
            obj = Object(path)
            obj.rodata.answer = n
            obj.load()
            current.append((obj.program("answers"), n))
            time.sleep(0.001)
            obj.close()
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        for t in threads:
            t.join()
    assert not wrong, wrong[:5]


TESTS = os.path.dirname(os.path.abspath(__file__)) + os.sep


def interrupted_at(k: int, call) -> bool:
    """``call()`` with a Ctrl-C at its k-th point where Python can raise one (sys.setprofile sees
    each: the entry of each Python function, the return of each C function), outside the tests'
    code; whether it landed."""
    seen = 0

    def profile(frame, event, arg):
        nonlocal seen
        where = frame.f_code.co_filename
        # (not in the tests' code, nor in a weakref callback, whose exceptions Python ignores)
        if event in ("call", "c_return") and not where.startswith(TESTS) and not where.endswith("_weakrefset.py"):
            seen += 1
            if seen == k:
                raise KeyboardInterrupt  # (the profiler is switched off by it)

    sys.setprofile(profile)
    try:
        call()
    except KeyboardInterrupt:
        return True
    finally:
        sys.setprofile(None)
    return False


def test_a_close_from_a_handler_at_any_point_of_a_test_run_is_done_when_it_returns(bpf_object):
    """close() called by a signal handler at each point of test_run() in turn (sys.setprofile
    stands for the handler): the run runs its own program or says the object is closed, and once
    it returns the object is closed, no fd left. One landing as the run took its program's fd (in
    the object's lock, before the run was counted) was put off, and then never done: the object
    said closed and kept its fds."""
    path = bpf_object("lifetime")
    before = open_fds()
    k, called = 0, True
    while called:
        k += 1
        obj, prog = loaded_answers(path)
        seen, called = 0, False

        def profile(frame, event, arg):
            nonlocal seen, called
            if event in ("call", "c_return") and not frame.f_code.co_filename.startswith(TESTS):
                seen += 1
                if seen == k:
                    called = True
                    obj.close()

        sys.setprofile(profile)
        try:
            assert prog.test_run(data=bytes(64)).retval == 1
        except ValueError as exc:
            assert "is closed" in str(exc)
        finally:
            sys.setprofile(None)
        if called:
            assert obj.closed and open_fds() == before, f"close() at point {k} of test_run()"
        obj.close()
    assert k > 20


def closed_in_another_thread(obj: Object) -> bool:
    closer = threading.Thread(target=obj.close, daemon=True)  # (one waiting for ever is left behind)
    closer.start()
    closer.join(10)
    return not closer.is_alive()


def test_a_test_run_interrupted_at_any_point_leaves_the_object_to_close(bpf_object):
    """A Ctrl-C at each point of test_run() in turn; then close(), in another thread, frees
    everything. One landing where the run's end was being counted left the object counting a run
    that had ended: close() waited for it for ever in another thread, and in the run's own thread
    was put off for ever (the fds open, the programs attached)."""
    path = bpf_object("lifetime")
    before = open_fds()
    k, landed = 0, True
    while landed:
        k += 1
        obj, prog = loaded_answers(path)
        landed = interrupted_at(k, lambda: prog.test_run(data=bytes(64)))
        assert closed_in_another_thread(obj), f"close() waits for the test run interrupted at its point {k}"
        assert open_fds() == before, f"a test run interrupted at its point {k}"
    assert k > 20  # every point of a run was tried, up to one that ran to its end


def test_a_close_waiting_for_a_run_interrupted_as_it_ends_returns(bpf_object):
    """close() in another thread waits for a run in the main thread; a signal ends the run (the
    kernel stops it with EINTR) and a Ctrl-C lands at each point of its end in turn: close()
    returns. One landing before the waiting close() was woken left it waiting for ever."""
    path = bpf_object("lifetime")
    main = threading.get_ident()
    old = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    try:
        k, landed = 0, True
        while landed:
            obj, prog = loaded_answers(path)
            ending = threading.Event()

            def close():
                time.sleep(0.05)  # the run into the kernel's loop
                obj.close()

            def end_the_run():
                deadline = time.monotonic() + 10
                while not obj.closed and time.monotonic() < deadline:  # close() called
                    time.sleep(0.001)
                time.sleep(0.01)  # and waiting
                ending.set()
                signal.pthread_kill(main, signal.SIGALRM)

            seen = 0

            def profile(frame, event, arg):
                nonlocal seen
                if event in ("call", "c_return") and ending.is_set():  # from the run's end on
                    seen += 1
                    if seen == k + 1:
                        raise KeyboardInterrupt

            threads = [threading.Thread(target=f, daemon=True) for f in (close, end_the_run)]
            for t in threads:
                t.start()
            sys.setprofile(profile)
            try:
                prog.test_run(data=bytes(64), repeat=2**32 - 1)  # hours, unless a signal ends it
            except KeyboardInterrupt:
                landed = True
            except OSError as exc:
                assert exc.errno == errno.EINTR
                landed = False
            except ValueError as exc:  # closed before the run started: again
                assert "is closed" in str(exc)
                k -= 1
            finally:
                sys.setprofile(None)
            k += 1
            for t in threads:
                t.join(10)
                assert not t.is_alive(), f"close() waits for a test run interrupted at point {k} of its end"
            assert obj.closed
    finally:
        signal.signal(signal.SIGALRM, old)
    assert k > 3


def test_a_close_interrupted_at_any_point_while_a_run_goes_on_is_done_when_the_run_ends(bpf_object):
    """A Ctrl-C at each point of close() in turn, while a test run goes on in another thread: the
    KeyboardInterrupt is raised, and the object is closed once the run ends, no fd left (or, if
    it landed before close() began, still open, closing the next time). One
    landing as the wait let go of the object's lock (Condition.wait is Python code) left it let
    go: close() then freed the object without it, and raised RuntimeError (releasing a lock it
    did not hold) instead of the KeyboardInterrupt."""
    path = bpf_object("lifetime")
    before = open_fds()
    old = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    try:
        k, landed = 0, True
        while landed:
            k += 1
            obj = Object(path)
            obj.program("cannot_attach").autoload = False
            obj.load()
            obj.attach()
            prog = obj.program("answers")
            started, done, outcome = threading.Event(), threading.Event(), []

            def run():
                started.set()
                try:
                    prog.test_run(data=bytes(64), repeat=2**32 - 1)  # hours, unless a signal ends it
                except OSError as exc:
                    outcome.append(exc.errno)

            runner = threading.Thread(target=run, daemon=True)
            runner.start()
            started.wait()
            time.sleep(0.02)  # into the kernel's loop

            def end_the_run():
                done.wait(0.05)  # at once after an interrupted close(), a while into a waiting one
                signal.pthread_kill(runner.ident, signal.SIGALRM)

            ender = threading.Thread(target=end_the_run, daemon=True)
            ender.start()
            try:
                landed = interrupted_at(k, obj.close)
            finally:  # (the run ended before the SIGALRM handler goes)
                done.set()
                runner.join(10)
                ender.join(10)
            assert outcome == [errno.EINTR]
            if not obj.closed:  # landed before close() began: the object is as it was
                obj.close()
            assert open_fds() == before, f"a Ctrl-C at point {k} of close(): it said closed, held its fds"
    finally:
        signal.signal(signal.SIGALRM, old)
    assert k > 5


def test_a_fork_child_closes_an_object_while_another_thread_of_the_parent_runs_it(bpf_object):
    """A test run under way in another thread at the fork is counted in the child too, where no
    thread will end it: the child's close() would wait for it for ever. The child forgets it."""
    obj, prog = loaded_answers(bpf_object("lifetime"))
    started, outcome = threading.Event(), []

    def run():
        started.set()
        try:
            prog.test_run(data=bytes(64), repeat=2**32 - 1)  # hours, unless a signal ends it
        except OSError as exc:
            outcome.append(exc.errno)

    old = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    runner = threading.Thread(target=run, daemon=True)
    try:
        runner.start()
        started.wait()
        time.sleep(0.05)  # into the kernel's loop
        assert fork_and_close(obj) == 0
        assert not obj.closed  # the parent's object is the parent's still
    finally:
        signal.pthread_kill(runner.ident, signal.SIGALRM)
        runner.join(10)
        signal.signal(signal.SIGALRM, old)
    assert outcome == [errno.EINTR]
    obj.close()


def test_a_close_interrupted_while_it_waits_for_a_test_run_is_done_when_the_run_ends(bpf_object):
    """Ctrl-C while close() waits for a run in another thread: the KeyboardInterrupt is raised, and
    the close is done once the run ends. It was left half done: the object said closed, and kept
    its fds and its attached programs until it was collected."""
    before = open_fds()
    obj = Object(bpf_object("lifetime"))
    obj.rodata.targ_tgid = os.getpid()
    obj.load()
    obj.program("counts").attach()
    prog = obj.program("answers")
    started, outcome = threading.Event(), []

    def run():
        started.set()
        outcome.append(prog.test_run(data=bytes(64), repeat=RUNS).retval)

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt

    t = threading.Thread(target=run, daemon=True)
    old = signal.signal(signal.SIGALRM, ctrl_c)
    try:
        t.start()
        started.wait()
        time.sleep(0.05)  # into the kernel's loop
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            obj.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    t.join(60)
    assert outcome == [1] and obj.closed
    assert open_fds() == before  # closed by the run as it ended: no close() called again


def test_after_an_interrupted_close_only_the_last_run_to_end_closes(bpf_object):
    """Ctrl-C while close() waits for two runs in other threads: the close is left to the last run
    to end. The first to end did it, and so waited for the other run (hours here) before its own
    test_run() returned."""
    before = open_fds()
    obj, prog = loaded_answers(bpf_object("lifetime"))
    started, outcome = threading.Semaphore(0), []

    def run(repeat):
        started.release()
        try:
            outcome.append(prog.test_run(data=bytes(64), repeat=repeat).retval)
        except OSError as exc:
            outcome.append(exc.errno)

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt

    short = threading.Thread(target=run, args=(RUNS,), daemon=True)
    long = threading.Thread(target=run, args=(2**32 - 1,), daemon=True)  # hours, unless a signal ends it
    old = {sig: signal.signal(sig, handler) for sig, handler in ((signal.SIGALRM, ctrl_c), (signal.SIGUSR1, lambda *_: None))}
    try:
        long.start()
        short.start()
        started.acquire()
        started.acquire()
        time.sleep(0.05)  # into the kernel's loop
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            obj.close()
        signal.setitimer(signal.ITIMER_REAL, 0)
        short.join(60)
        assert not short.is_alive(), "the run that ended first waits for the other one to close the object"
        assert outcome == [1] and not long.join(0) and long.is_alive()
        signal.pthread_kill(long.ident, signal.SIGUSR1)  # the kernel ends the long run (EINTR)
        long.join(60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if long.is_alive():
            signal.pthread_kill(long.ident, signal.SIGUSR1)
            long.join(60)
        for sig, handler in old.items():
            signal.signal(sig, handler)
    assert outcome == [1, errno.EINTR] and obj.closed
    assert open_fds() == before  # closed by the last run as it ended


def test_tracefs_is_mounted_when_missing(execsnoop_object, caplog):
    if mounts.is_mounted(mounts.TRACEFS, "tracefs"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(mounts.TRACEFS.encode(), 0) != 0:
            pytest.fail(f"could not unmount tracefs to test the mount: errno {ctypes.get_errno()}")
    said = fork_call(as_nobody(mounts.ensure_tracefs))
    assert said.startswith("BPFPermissionError") and "mount -t tracefs none /sys/kernel/tracing" in said
    with Object(execsnoop_object) as obj, caplog.at_level(logging.INFO, logger="bpfring"):
        only(obj, "handle_exec_reserve").load()
        assert len(obj.attach()) == 1
    assert mounts.is_mounted(mounts.TRACEFS, "tracefs")
    assert "mounted tracefs at /sys/kernel/tracing" in caplog.text


def test_memlock_is_raised_only_on_kernels_that_charge_bpf_to_it():
    assert bump_memlock_rlimit((6, 18)) is False
    saved = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (min(saved[1], 65536), saved[1]))
        assert bump_memlock_rlimit((5, 10)) is True
        soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        assert soft == hard  # unlimited where the process may, else up to the hard limit
    finally:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, saved)


# -- edges of Object() (issue 13) ----------------------------------------------------------------


def in_thread(func, timeout: float = 5.0):
    """``func()`` in a thread, so a call that hangs fails the test instead of hanging it."""
    result: list = []

    def run():
        try:
            result.append(("ok", func()))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result.append(("raised", exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert result, f"still running after {timeout} s"
    return result[0]


def test_a_fifo_or_a_directory_is_refused_before_libbpf_reads_it(bpf, tmp_path):
    fifo = tmp_path / "prog.bpf.o"
    os.mkfifo(fifo)
    before = open_fds()
    outcome, exc = in_thread(lambda: Object(fifo))  # libbpf would block opening a FIFO
    assert outcome == "raised" and isinstance(exc, bpfring.BPFError)
    assert exc.errno == errno.EINVAL
    assert exc.strerror == f"opening BPF object '{fifo}': it is a FIFO, not a regular file"
    with pytest.raises(bpfring.BPFError, match="it is a directory, not a regular file"):
        Object(tmp_path)
    with pytest.raises(bpfring.BPFError, match="it is a character device, not a regular file"):
        Object("/dev/zero")
    assert open_fds() == before


def test_a_file_name_that_is_not_utf8_opens_and_loads(bpf_object, tmp_path):
    raw = os.fsencode(tmp_path) + b"/\xff\xfeprog.bpf.o"
    shutil.copy(bpf_object("producer"), raw)
    for path in (raw, os.fsdecode(raw)):
        with Object(path) as obj:
            assert obj.path == os.fsdecode(raw)
            assert obj.name == os.fsdecode(b"\xff\xfeprog")
            obj.load()
            assert "rb" in obj.map_names and repr(obj)
    junk = os.fsencode(tmp_path) + b"/\xffjunk.bpf.o"
    with open(junk, "wb") as f:
        f.write(b"not an ELF file")
    with pytest.raises(bpfring.BPFError, match="opening BPF object .*junk.bpf.o"):
        Object(junk)


def test_libbpf_error_codes_become_libbpfs_messages(bpf, tmp_path):
    not_bpf = tmp_path / "true.o"
    shutil.copy("/bin/true", not_bpf)  # an ELF file, but not a BPF object
    with pytest.raises(bpfring.BPFError) as info:
        Object(not_bpf)
    assert info.value.errno == 4001  # LIBBPF_ERRNO__FORMAT
    assert info.value.strerror.endswith(": BPF object format invalid")
    assert "Unknown error" not in str(info.value)
    assert bpfring.objects.libbpf_error(4007, "loading x").strerror == "loading x: Kernel verifier blocks program loading"
    assert bpfring.objects.libbpf_error(errno.ENOENT, "x").strerror == "x: No such file or directory"


def test_struct_with_an_empty_or_invalid_name_is_refused(bpf_object):
    with Object(bpf_object("types")) as obj:
        assert obj.struct("demo").itemsize > 0
        for bad in ("", "struct demo", "1x"):
            with pytest.raises(ValueError, match=f"a struct name is a C identifier such as 'event', got {bad!r}"):
                obj.struct(bad)
        with pytest.raises(KeyError, match="declares no struct 'nope'"):
            obj.struct("nope")


def test_a_missing_map_is_named_as_missing_before_load_too(bpf_object):
    with Object(bpf_object("producer")) as obj:
        with pytest.raises(KeyError, match=r"object 'producer' has no map 'nope' \(it has: rb, "):
            obj.map("nope")
        with pytest.raises(ValueError, match="call load\\(\\) first"):
            obj.map("rb")  # it exists: it is only not loaded yet


def test_unpin_removes_only_this_maps_pin(bpf_object):
    mounts.ensure_bpffs()
    base = f"/sys/fs/bpf/bpfring-unpin-{os.getpid()}"
    with Object(bpf_object("producer")) as obj, Object(bpf_object("producer")) as other:
        obj.load()
        other.load()
        rb, other_rb = obj.map("rb"), other.map("rb")
        rb.pin(base + "-a")
        other_rb.pin(base + "-b")
        try:
            with pytest.raises(ValueError, match=r"pins map 'rb' \(id \d+\), not this map 'rb' \(id \d+\)"):
                rb.unpin(base + "-b")
            assert os.path.exists(base + "-b")  # someone else's pin stays
            rb.unpin(base + "-a")
            assert not os.path.exists(base + "-a")
            with pytest.raises(bpfring.BPFNotFoundError):
                rb.unpin(base + "-a")
            assert rb.max_entries and not rb.closed  # the map lives on
        finally:
            for suffix in ("-a", "-b"):
                if os.path.exists(base + suffix):
                    os.unlink(base + suffix)

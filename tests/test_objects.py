"""Object: BPF ELF files through libbpf, on the package's own exec tracer and the test producer."""

from __future__ import annotations

import ctypes
import errno
import gc
import logging
import os
import resource
import shutil
import struct
import subprocess
import sys
import threading
import warnings

import pytest
from conftest import as_nobody, fork_call, open_fds, without_collector

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
import sys, threading
from bpfring import Object

names = set()
for _ in range(20):
    obj = Object(sys.argv[1])
    obj.load()
    prog = obj.program("on_raw_tracepoint")
    for _ in range(200):
        prog.attach_raw_tracepoint("sys_enter")  # each Link dropped: obj.links makes one anew
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
        [sys.executable, "-c", LIST_WHILE_CLOSING, str(bpf_object("attach"))], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "['on_raw_tracepoint']"


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

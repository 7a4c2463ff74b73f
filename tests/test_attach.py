"""Program.attach_*(): a program attached by target at run time, each kind against a real target.

tests/bpf/attach.bpf.c counts, in .bss, the hits of each program for this test's process; a test
makes a known number of events (getppid() calls, runs of a small C binary it builds, CPU time
under a sampling perf event) and reads the count back live.
"""

from __future__ import annotations

import errno
import os
import platform
import shutil
import subprocess
import time

import pytest
from conftest import fork_call, open_fds

import bpfring
from bpfring import BPFError, BPFNotFoundError, Object
from bpfring._sys import mounts, perf

# the syscall the kernel-side tests make: getppid(), which nothing in Python caches
GETPPID_NR = {"x86_64": 110, "aarch64": 173}[platform.machine()]
PERF_COUNT_SW_CPU_CLOCK = 0  # include/uapi/linux/perf_event.h, enum perf_sw_ids
GETPPID_FN = {"x86_64": "__x64_sys_getppid", "aarch64": "__arm64_sys_getppid"}[platform.machine()]

TARGET_C = r"""
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) int bpfring_target(int x)
{
	__asm__ volatile("");
	return x * 2 + 1;
}

int main(int argc, char **argv)
{
	int n = atoi(argv[1]), sum = 0;
	char line[8];

	if (argc > 2 && !fgets(line, sizeof(line), stdin)) /* "wait": until told to go on */
		return 1;

	for (int i = 0; i < n; i++)
		sum += bpfring_target(40 + i);
	printf("%d\n", sum);
	return 0;
}
"""


@pytest.fixture
def obj(bpf_object):
    with Object(bpf_object("attach")) as o:
        o.rodata.targ_tgid = os.getpid()
        o.rodata.targ_nr = GETPPID_NR
        o.load()
        yield o


@pytest.fixture(scope="module")
def target_binary(tmp_path_factory):
    """A small C program with a function to probe (built with gcc, as a user's binary would be)."""
    d = tmp_path_factory.mktemp("uprobe")
    (d / "target.c").write_text(TARGET_C)
    subprocess.run([shutil.which("gcc") or "gcc", "-O1", "-o", str(d / "target"), str(d / "target.c")], check=True)
    return d / "target"


def getppid_times(n: int) -> None:
    for _ in range(n):
        os.getppid()


def kernel_has_kprobes() -> bool:
    """CONFIG_KPROBES, seen the way perf and bpftrace see it: a kprobe PMU, or tracefs kprobe_events."""
    mounts.ensure_tracefs()
    return os.path.exists("/sys/bus/event_source/devices/kprobe") or os.path.exists("/sys/kernel/tracing/kprobe_events")


def test_attach_tracepoint_counts_the_syscalls_this_test_makes(obj):
    prog = obj.program("on_tracepoint")
    link = prog.attach_tracepoint("syscalls", "sys_enter_getppid")
    assert isinstance(link, bpfring.Link) and link.attached and link in obj.links
    assert link.target == "tracepoint:syscalls/sys_enter_getppid"
    getppid_times(5)
    assert obj.bss.tp_hits == 5
    link.destroy()
    getppid_times(3)
    assert obj.bss.tp_hits == 5


def test_attach_tracepoint_errors_name_the_tracepoint(obj):
    prog = obj.program("on_tracepoint")
    with pytest.raises(BPFNotFoundError, match=r"'on_tracepoint' to tracepoint syscalls/sys_enter_nope: no such tracepoint \(no /sys/kernel/tracing/events/syscalls/sys_enter_nope\)"):
        prog.attach_tracepoint("syscalls", "sys_enter_nope")
    with pytest.raises(BPFNotFoundError, match=r"tracepoint nocat/x: no such tracepoint \(no category 'nocat' in /sys/kernel/tracing/events\)"):
        prog.attach_tracepoint("nocat", "x")
    with pytest.raises(ValueError, match="non-empty name"):
        prog.attach_tracepoint("", "x")
    with pytest.raises(BPFError, match=r"'on_uprobe' to tracepoint syscalls/sys_enter_getppid \(a tracepoint takes a program of type tracepoint; this one is kprobe\)"):
        obj.program("on_uprobe").attach_tracepoint("syscalls", "sys_enter_getppid")  # not a tracepoint program


def test_attach_raw_tracepoint(obj):
    link = obj.program("on_raw_tracepoint").attach_raw_tracepoint("sys_enter")
    getppid_times(4)
    assert obj.bss.raw_tp_hits == 4
    link.destroy()
    with pytest.raises(BPFNotFoundError, match="'on_raw_tracepoint' to raw tracepoint 'no_such_tp': no such raw tracepoint"):
        obj.program("on_raw_tracepoint").attach_raw_tracepoint("no_such_tp")


def test_attach_kprobe_where_the_kernel_has_kprobes_and_a_clear_error_where_not(obj):
    prog = obj.program("on_kprobe")
    if kernel_has_kprobes():  # Debian's kernels in the kernel matrix
        link = prog.attach_kprobe(GETPPID_FN)
        ret = obj.program("on_kretprobe").attach_kprobe(GETPPID_FN, retprobe=True)
        getppid_times(3)
        assert (obj.bss.kprobe_hits, obj.bss.kretprobe_hits) == (3, 3)
        assert link.target == f"kprobe:{GETPPID_FN}" and ret.target == f"kretprobe:{GETPPID_FN}"
        link.destroy()
        ret.destroy()
        with pytest.raises(BPFNotFoundError, match="kprobe 'no_such_function_xyz': no such function in this kernel"):
            prog.attach_kprobe("no_such_function_xyz")
    else:  # this machine: CONFIG_KPROBES is off
        with pytest.raises(BPFError) as info:
            prog.attach_kprobe(GETPPID_FN)
        assert info.value.errno == errno.EOPNOTSUPP
        assert info.value.strerror.startswith(
            f"attaching program 'on_kprobe' to kprobe '{GETPPID_FN}': kprobes are unavailable in this kernel"
        )
        assert "CONFIG_KPROBES" in str(info.value)
        with pytest.raises(BPFError, match="kretprobe .*kprobes are unavailable in this kernel"):
            obj.program("on_kretprobe").attach_kprobe(GETPPID_FN, retprobe=True)
    assert obj.links == []
    with pytest.raises(ValueError, match="offset must be between 0 and"):
        prog.attach_kprobe(GETPPID_FN, offset=-1)


def test_attach_uprobe_to_a_function_of_a_binary(obj, target_binary):
    entry = obj.program("on_uprobe").attach_uprobe(target_binary, "bpfring_target")
    ret = obj.program("on_uretprobe").attach_uprobe(target_binary, symbol="bpfring_target", retprobe=True)
    assert entry.target == f"uprobe:{target_binary}:bpfring_target"
    out = subprocess.run([str(target_binary), "3"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(81 + 83 + 85)
    assert (obj.bss.uprobe_hits, obj.bss.uretprobe_hits) == (3, 3)
    assert (obj.bss.uprobe_arg, obj.bss.uretprobe_ret) == (42, 85)  # the last call: bpfring_target(42) = 85
    entry.destroy()
    ret.destroy()
    subprocess.run([str(target_binary), "2"], capture_output=True, check=True)
    assert obj.bss.uprobe_hits == 3


def test_attach_uprobe_to_one_process(obj, target_binary):
    waiting = subprocess.Popen([str(target_binary), "2", "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        link = obj.program("on_uprobe").attach_uprobe(target_binary, "bpfring_target", pid=waiting.pid)
        assert link.target == f"uprobe:{target_binary}:bpfring_target"
        subprocess.run([str(target_binary), "5"], capture_output=True, check=True)  # another process: not counted
        out, _ = waiting.communicate("go\n", timeout=60)
    finally:
        waiting.kill()
        waiting.wait()
    assert out.strip() == str(81 + 83)
    assert obj.bss.uprobe_hits == 2


def test_attach_uprobe_errors_name_the_binary_and_symbol(obj, target_binary, tmp_path):
    prog = obj.program("on_uprobe")
    with pytest.raises(BPFNotFoundError, match=r"uprobe no_such_fn in '.*/target': symbol 'no_such_fn' not found in the binary"):
        prog.attach_uprobe(target_binary, "no_such_fn")
    with pytest.raises(BPFNotFoundError, match=r"uprobe f in '.*/missing': no such binary"):
        prog.attach_uprobe(tmp_path / "missing", "f")
    with pytest.raises(BPFNotFoundError, match=r"uprobe f in 'libnope.so.9': no such binary on PATH or the library path"):
        prog.attach_uprobe("libnope.so.9", "f")
    with pytest.raises(ValueError, match="pid must be between -1 and"):
        prog.attach_uprobe(target_binary, "bpfring_target", pid=-2)
    assert obj.links == []


def test_attach_perf_event_runs_on_each_sample(obj):
    attr = perf.PerfEventAttr(type=perf.PERF_TYPE_SOFTWARE, config=PERF_COUNT_SW_CPU_CLOCK, sample_period=1_000_000)  # 1 ms
    fd = perf.perf_event_open(attr, 0, -1, -1, perf.PERF_FLAG_FD_CLOEXEC, "a cpu-clock sampling event")
    try:
        link = obj.program("on_perf_event").attach_perf_event(fd)
    finally:
        os.close(fd)  # the link holds its own duplicate
    deadline = time.monotonic() + 10
    while obj.bss.perf_hits < 3 and time.monotonic() < deadline:
        sum(range(100_000))  # burn CPU time in this thread: samples
    assert obj.bss.perf_hits >= 3
    before = open_fds()
    link.destroy()
    assert len(open_fds()) < len(before)  # the duplicate is closed with the link
    hits = obj.bss.perf_hits
    sum(range(1_000_000))
    assert obj.bss.perf_hits == hits

    with pytest.raises(BPFError, match=r"to perf event fd \d+: not a perf event"):
        r, w = os.pipe()
        try:
            obj.program("on_perf_event").attach_perf_event(r)
        finally:
            os.close(r)
            os.close(w)
    with pytest.raises(BPFError, match="to perf event fd 9999: not an open file descriptor"):
        obj.program("on_perf_event").attach_perf_event(9999)


def test_attach_needs_a_loaded_program(bpf_object):
    with Object(bpf_object("attach")) as o:
        with pytest.raises(ValueError, match="cannot attach a tracepoint: program 'on_tracepoint' is not loaded"):
            o.program("on_tracepoint").attach_tracepoint("syscalls", "sys_enter_getppid")


def test_a_destroyed_link_leaves_the_objects_links_and_close_detaches_the_rest(obj):
    first = obj.program("on_tracepoint").attach_tracepoint("syscalls", "sys_enter_getppid")
    second = obj.program("on_raw_tracepoint").attach_raw_tracepoint("sys_enter")
    assert obj.links == [first, second]
    first.destroy()
    assert obj.links == [second] and not first.attached
    obj.close()
    assert not second.attached and obj.links == []


def test_a_fork_child_destroying_its_copies_of_the_links_leaves_the_parent_attached(obj):
    """The child shares the parent's perf events: libbpf's own detach disables them (an ioctl on
    the shared event), which would stop the parent's sampling program for good."""
    attr = perf.PerfEventAttr(type=perf.PERF_TYPE_SOFTWARE, config=PERF_COUNT_SW_CPU_CLOCK, sample_period=1_000_000)
    fd = perf.perf_event_open(attr, 0, -1, -1, perf.PERF_FLAG_FD_CLOEXEC, "a cpu-clock sampling event")
    try:
        sampling = obj.program("on_perf_event").attach_perf_event(fd)
    finally:
        os.close(fd)
    counting = obj.program("on_tracepoint").attach_tracepoint("syscalls", "sys_enter_getppid")

    def destroy_and_close():
        sampling.destroy()
        obj.close()
        return sampling.attached, counting.attached

    assert fork_call(destroy_and_close) == "ok: (False, False)"
    assert sampling.attached and counting.attached and obj.links == [sampling, counting]
    getppid_times(3)
    assert obj.bss.tp_hits == 3
    hits = obj.bss.perf_hits
    deadline = time.monotonic() + 10
    while obj.bss.perf_hits < hits + 3 and time.monotonic() < deadline:
        sum(range(100_000))
    assert obj.bss.perf_hits >= hits + 3, "the child's destroy() disabled the parent's perf event"


def test_a_link_destroyed_in_the_parent_detaches_while_a_fork_child_lives_on(obj):
    """A link stays attached while any copy of its fd is open: a child forked without exec (a
    multiprocessing worker) would keep the parent's programs running after their destroy()."""
    counting = obj.program("on_tracepoint").attach_tracepoint("syscalls", "sys_enter_getppid")
    raw = obj.program("on_raw_tracepoint").attach_raw_tracepoint("sys_enter")
    assert fork_call(lambda: (counting.attached, raw.attached, obj.links)) == "ok: (False, False, [])"  # not the child's
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # lives on (until the parent closes hold_w), holding whatever it kept at the fork
        os.close(hold_w)
        os.write(ready_w, b"!")
        os.read(hold_r, 1)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"!"
        counting.destroy()
        raw.destroy()
        getppid_times(5)
        assert (obj.bss.tp_hits, obj.bss.raw_tp_hits) == (0, 0), "the fork child kept the links attached"
    finally:
        for fd in (ready_r, ready_w, hold_r, hold_w):
            os.close(fd)
        os.waitpid(pid, 0)

"""Kernel features and programs built once: what holds on every kernel of the matrix (docs/kernels.md).

These run on this machine's kernel like the rest, and inside each kernel of `scripts/kernels`,
where the same assertions see the older kernels' answers.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import PKG_BPF, fork_call

from bpfring import Map, MapType, Object, RingBuffer, features
from bpfring import _build
from bpfring._sys import bpf as sys_bpf
from bpfring.features import FeatureError

EVENT_PID = slice(0, 4)
KIB = 1024


@pytest.mark.parametrize("feature", [features.RINGBUF, features.USER_RINGBUF, features.BPF_LOOP, features.RINGBUF_DYNPTR])
def test_a_probed_feature_is_present_on_every_kernel_that_has_its_version(bpf, feature):
    """The probe asks the kernel; on a mainline kernel at or past the version it must find the feature."""
    assert features.has(feature) == feature.probe()
    if features.kernel_version() >= feature.since:
        assert features.has(feature), f"{feature} probed missing on {features.kernel_release()}"


def test_the_probes_can_say_no(bpf):
    """A helper id and a map type no kernel has are found missing, so a "yes" above means something."""
    assert features._helper(100_000)() is False
    assert features._map_type(1000)() is False


def test_a_missing_feature_is_one_error_naming_it_the_version_needed_and_the_kernel():
    future = features.Feature("a feature from the future", (99, 1), lambda: False)
    with pytest.raises(FeatureError) as info:
        features.require(future)
    assert isinstance(info.value, OSError) and info.value.errno == errno.EOPNOTSUPP
    assert str(info.value).endswith(
        f"a feature from the future needs Linux 99.1 or later; this kernel is {os.uname().release}"
    )


@pytest.mark.parametrize("map_type, feature", [(MapType.RINGBUF, features.RINGBUF), (MapType.USER_RINGBUF, features.USER_RINGBUF)])
def test_ring_maps_are_created_where_the_kernel_has_them_and_refused_clearly_where_not(bpf, map_type, feature):
    if features.has(feature):
        with Map.create(map_type, 4 * KIB) as m:
            assert m.type == map_type
    else:
        with pytest.raises(FeatureError, match=rf"needs Linux {feature.since[0]}\.{feature.since[1]} or later"):
            Map.create(map_type, 4 * KIB)


def test_programs_build_without_the_build_machines_kernel(tmp_path, monkeypatch):
    """The package's programs include kernel_types.h: no vmlinux.h, no BTF of this kernel needed."""
    monkeypatch.setattr(_build, "VMLINUX_BTF", str(tmp_path / "no-btf-here"))
    built = _build.build_dir(PKG_BPF, tmp_path / "out")
    assert sorted(p.name for p in built) == sorted(p.name[: -len(".c")] + ".o" for p in PKG_BPF.glob("*.bpf.c"))
    assert not (tmp_path / "out" / "vmlinux.h").exists()
    with pytest.raises(_build.BuildError, match="no-btf-here is missing"):
        _build.vmlinux_h(tmp_path / "gen")  # bpfring build (user programs) still needs the kernel's BTF


def _big_rings(obj_path: str) -> str:
    """In a child with RLIMIT_MEMLOCK at 5.10's default: a 1 MiB ring raw, then through bpfring."""
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * KIB, 64 * KIB))
    try:
        os.close(sys_bpf.map_create(int(MapType.RINGBUF), 0, 0, 1024 * KIB))
        said = "raw ok"
    except OSError as exc:
        said = f"raw errno {exc.errno}"
    with Map.create(MapType.RINGBUF, 1024 * KIB) as m:  # bpfring's own bpf(): its own memlock bump
        soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        said += f"; Map.create ok {m.max_entries}, memlock {'unlimited' if soft == resource.RLIM_INFINITY else soft}"
    with Object(obj_path) as obj:  # through libbpf, which raises the limit too where it must
        for prog in obj.programs:
            prog.autoload = prog.name == "handle_exec_reserve"
        obj.set_max_entries("rb", 1024 * KIB)
        obj.load()
        obj.attach()
        got: list[bytes] = []
        with RingBuffer(obj.map("rb"), got.append) as rb:
            child = subprocess.Popen(["/bin/true"])
            child.wait()
            pid = child.pid.to_bytes(4, "little")
            while not any(g[EVENT_PID] == pid for g in got):
                if rb.poll(5000) <= 0:
                    return f"{said}; no exec event"
    return f"{said}; exec event seen"


def test_a_ring_bigger_than_the_default_memlock_works_on_every_kernel(execsnoop_object):
    """Before 5.11 a 1 MiB ring does not fit in 64 KiB of RLIMIT_MEMLOCK: bpfring raises the limit.

    The raw creation shows the limit bites on such kernels (EPERM) and not on later ones; the same
    ring through bpfring works on both, and carries an exec event from execsnoop's program.
    """
    said = fork_call(lambda: _big_rings(str(execsnoop_object)))
    if features.kernel_version() < features.MEMCG_ACCOUNTING.since:
        assert said == f"ok: raw errno {errno.EPERM}; Map.create ok {1024 * KIB}, memlock unlimited; exec event seen"
    else:
        assert said == f"ok: raw ok; Map.create ok {1024 * KIB}, memlock {64 * KIB}; exec event seen"


def _ring_records(p, **produce) -> tuple[list[bytes], object]:
    got: list[bytes] = []
    with RingBuffer(p.ring, lambda r: got.append(bytes(r))) as rb:
        out = p.produce(**produce)
        rb.consume()
    return got, out


@pytest.mark.parametrize("name", ["producer_compat", "producer"])
def test_each_ring_producer_writes_the_records_the_tests_expect(bpf_object, name):
    """producer_compat (5.10+) stands in for producer (5.19+) on older kernels: the same records.

    Fixed records are discarded every third.
    """
    from producer import FIXED_SIZE, MODE_OUTPUT, MODE_RESERVE, Producer, expected_fixed, expected_record, record_size

    with Producer(bpf_object(name), ring_size=256 * KIB) as p:
        for mode in (MODE_OUTPUT, MODE_RESERVE):
            got, out = _ring_records(p, count=300, size=(1, 300), mode=mode, producer=mode)
            assert (out.produced, out.discarded, out.dropped) == (300, 0, 0)
            assert got == [expected_record(s, mode, record_size(s, 1, 300)) for s in range(300)]
        got, out = _ring_records(p, count=300, fixed=True, discard_every=3, producer=7)
        assert (out.produced, out.discarded, out.dropped) == (200, 100, 0)
        assert got == [expected_fixed(s, 7) for s in range(300) if s % 3]
        assert all(len(g) == FIXED_SIZE for g in got)


def test_an_object_with_a_user_ring_buffer_loads_or_names_the_missing_feature(bpf, tmp_path):
    """Not libbpf's EINVAL from map creation: the feature, the version needed, the kernel found."""
    from conftest import TESTS_BPF

    path = _build.compile_bpf(TESTS_BPF / "user_drain.bpf.c", tmp_path / "user_drain.bpf.o", [TESTS_BPF, PKG_BPF])
    with Object(path) as obj:
        if features.has(features.USER_RINGBUF):
            obj.load()
            assert obj.map("urb").type == MapType.USER_RINGBUF
        else:
            with pytest.raises(FeatureError, match=r"the user ring buffer \(BPF_MAP_TYPE_USER_RINGBUF\) needs Linux 6\.1"):
                obj.load()


REPO = Path(__file__).resolve().parent.parent
FRESH = os.environ.get("BPFRING_KERNELS_FRESH") == "1"


def _as_nobody() -> list[str]:
    """The command prefix that runs a program as an unprivileged user (nothing when not root already)."""
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []


def test_scripts_kernels_not_as_root_stops_before_installing_and_says_how_to_run_it():
    """A fresh Debian has no sudo: scripts/kernels must not reach for it, and must say how to run it.

    Its own copy (where anyone can read it: pytest's tmp_path is root's alone), run by the system's
    Python, with an empty cache directory: nothing may be installed or fetched before the message.
    """
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        script, cache = Path(tmp) / "kernels", Path(tmp) / "cache"
        shutil.copy(REPO / "scripts" / "kernels", script)
        done = subprocess.run([*_as_nobody(), "/usr/bin/python3", str(script), "--fetch-only"], capture_output=True,
                              text=True, timeout=60, cwd=tmp, env={**os.environ, "BPFRING_KERNELS_CACHE": str(cache)})
        cache_made = cache.exists()
    assert done.returncode == 1, done
    assert done.stderr.strip() == (
        "kernels: run it as root: it installs its tools with apt-get, and the BPF tests need root "
        f"(e.g. su -c '{script} --fetch-only', or sudo where sudo is installed)"
    )
    assert not cache_made


def up_and_one_passing(release: str) -> str:
    """A fake guest's lines once it is up: the console line, then what the first pytest run leaves
    in the results directory (--rwdir): the release and one passing case."""
    return f"""echo "[   22.167501] virtme-ng-init: starting script (console fallback)"
for arg; do case "$arg" in --rwdir=*) dir=${{arg#--rwdir=}};; esac; done
echo {release} > "$dir/release"
echo '<testsuites><testsuite><testcase classname="tests.test_x" name="test_y" time="1"/></testsuite></testsuites>' \\
    > "$dir/junit-000.xml"
"""


FAKE_VNG = """#!/bin/sh
# stands in for virtme-ng: the first BOOTS_THAT_HANG boots stop before the guest is up, as a 5.10
# boot under TCG once did; the next comes up, "runs" the tests and leaves one passing case
echo $$ >> "$FAKE_VNG_PIDS"
n=$(wc -l < "$FAKE_VNG_PIDS")
echo "[    0.000000] Linux version 5.10.0-32-amd64"
if [ "$n" -le "$BOOTS_THAT_HANG" ]; then echo "[    2.200000] sched_clock: Marking stable"; exec sleep 600; fi
""" + up_and_one_passing("5.10.0-32-amd64")


def fake_vng(tmp_path: Path, script: str) -> Path:
    """An executable ``tmp_path/vng`` running ``script``, for scripts/kernels to boot."""
    fake = tmp_path / "vng"
    fake.write_text(script)
    fake.chmod(0o755)
    return fake


def _kernels_script(monkeypatch):
    """scripts/kernels as a module (it has no .py suffix; its dataclasses need it in sys.modules)."""
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("bpfring_scripts_kernels", str(REPO / "scripts" / "kernels"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    monkeypatch.setitem(sys.modules, loader.name, module)
    loader.exec_module(module)
    return module


@pytest.mark.parametrize("hangs", [1, 3], ids=["once", "every-attempt"])
def test_scripts_kernels_boots_again_when_a_boot_hangs_and_kills_the_hung_guest(tmp_path, monkeypatch, hangs):
    """A guest whose console never shows that it is up is killed and booted again, up to three times.

    Without the watchdog a hung boot used up the run's whole --timeout (an hour and more) and
    ran nothing. The fake vng hangs the way that boot did; what a user sees is the report.
    """
    kernels = _kernels_script(monkeypatch)
    fake = fake_vng(tmp_path, FAKE_VNG)
    pids = tmp_path / "pids"
    monkeypatch.setattr(kernels, "vng", lambda: fake)
    monkeypatch.setenv("FAKE_VNG_PIDS", str(pids))
    monkeypatch.setenv("BOOTS_THAT_HANG", str(hangs))
    start = time.monotonic()
    result = kernels.run_guest(kernels.Kernel("5.10", "bullseye"), tmp_path / "vmlinuz", ["tests/test_x.py"],
                               False, 2, "2G", tmp_path / "logs", timeout=120, boot_timeout=3)
    took = time.monotonic() - start
    boots = pids.read_text().split()
    for pid in boots:  # every hung guest is gone, not left running beside the next
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)
    hung = sorted(p.name for p in (tmp_path / "logs" / "5.10").glob("console.log.hung-*"))
    if hangs < kernels.BOOT_ATTEMPTS:
        assert (result.passed, result.failed, result.errors, result.note) == (1, 0, 0, "")
        assert result.release == "5.10.0-32-amd64"
        assert len(boots) == hangs + 1
    else:
        assert (result.passed, result.errors, result.note) == (0, 1, "boot hung")
        assert len(boots) == kernels.BOOT_ATTEMPTS
    assert hung == [f"console.log.hung-{i}" for i in range(1, min(hangs, kernels.BOOT_ATTEMPTS) + 1)]
    assert took < 60, f"{took:.0f} s: the hung boots were not cut off after their 3 s"
    # the kernel's time in the report counts every boot (it counted the last one only)
    assert result.seconds >= 3 * len(hung), f"{result.seconds:.1f} s reported: the hung boots' 3 s are not counted"


PANICKING_VNG = """#!/bin/sh
# stands in for virtme-ng: the guest comes up, finishes one pytest run, then its kernel panics
# (as a 6.12 guest under TCG once did, in the allocator) and sits dead
echo $$ > "$FAKE_VNG_PIDS"
""" + up_and_one_passing("6.12.95+deb12-amd64") + """echo "[  285.662300] traps: PANIC: double fault, error_code: 0x0"
echo "[  285.803927] Kernel panic - not syncing: Fatal exception in interrupt"
exec sleep 600
"""


def test_scripts_kernels_stops_a_guest_whose_kernel_panicked_and_keeps_what_finished(tmp_path, monkeypatch):
    """A guest whose kernel panicked runs nothing more: it used to sit until --timeout (90 minutes
    that time). It is stopped at once; the runs it finished count, the rest is one error."""
    kernels = _kernels_script(monkeypatch)
    fake = fake_vng(tmp_path, PANICKING_VNG)
    pids = tmp_path / "pids"
    monkeypatch.setattr(kernels, "vng", lambda: fake)
    monkeypatch.setenv("FAKE_VNG_PIDS", str(pids))
    start = time.monotonic()
    result = kernels.run_guest(kernels.Kernel("6.12", "bookworm-backports"), tmp_path / "vmlinuz",
                               ["tests/test_x.py::test_y", "tests/test_x.py::test_z"], True, 2, "2G",
                               tmp_path / "logs", timeout=120, boot_timeout=60)
    assert time.monotonic() - start < 60, "the dead guest was left to its --timeout"
    assert (result.passed, result.failed, result.errors, result.note) == (1, 0, 1, "kernel panic")
    with pytest.raises(ProcessLookupError):
        os.kill(int(pids.read_text()), 0)


def test_scripts_kernels_a_ctrl_c_as_the_guest_starts_stops_the_guest(tmp_path, monkeypatch):
    """A Ctrl-C that lands the moment vng has started (before boot() holds it) stops it too:
    it used to leave the guest running, its qemu holding CPU, after the script had exited."""
    kernels = _kernels_script(monkeypatch)
    pidfile = tmp_path / "pid"
    fake = fake_vng(tmp_path, f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 600\n")
    real_popen = subprocess.Popen

    def popen_then_ctrl_c(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        while not pidfile.exists():  # the guest is up and running
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)  # lands here, inside Popen's return
        return proc

    monkeypatch.setattr(kernels.subprocess, "Popen", popen_then_ctrl_c)
    try:
        outcome = kernels.boot([str(fake)], dict(os.environ), tmp_path / "console.log", timeout=120, boot_timeout=60)
    except KeyboardInterrupt:
        outcome = ("raised KeyboardInterrupt", None)
    guest = int(pidfile.read_text())
    try:
        os.kill(guest, 0)
    except ProcessLookupError:
        pass
    else:
        os.killpg(guest, signal.SIGKILL)
        pytest.fail(f"boot() {outcome[0]} and left the guest running")
    assert outcome[0] == "interrupted"


@pytest.mark.parametrize("option", ["--timeout", "--boot-timeout", "--cpus"])
def test_scripts_kernels_refuses_a_bound_of_zero_or_less_before_doing_anything(option):
    """--boot-timeout 0 killed every boot at once (three boots, nothing run); say so instead."""
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "kernels"), option, "0", "--fetch-only"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == f"kernels: error: {option} must be more than 0, got 0" + (
        "" if option == "--cpus" else ".0"
    )


if FRESH:  # minutes (apt-get installs, three kernels downloaded, a guest booted): asked for, never by default

    def test_scripts_kernels_on_a_fresh_machine_installs_what_it_needs_and_passes():
        """scripts/kernels-fresh: the README's set-up and the matrix in a Debian root with nothing installed.

        BPFRING_KERNELS_FRESH=1 .venv/bin/python -m pytest tests/test_kernels.py -k fresh_machine (root)
        """
        done = subprocess.run([str(REPO / "scripts" / "kernels-fresh"), "--kernel", "6.12", "tests/test_maps.py"],
                              capture_output=True, text=True, timeout=3600, cwd=REPO)
        assert done.returncode == 0, done.stderr[-4000:]
        assert "lacks: python3 sudo qemu-system-x86_64 depmod busybox file clang gcc bpftool" in done.stderr
        row = next(line for line in done.stdout.splitlines() if line.startswith("| 6.12 "))
        kernel, release, passed, failed, skipped, errors, _ = (c.strip() for c in row.strip("|").split("|"))
        assert release.startswith("6.12.") and int(passed) > 0 and (failed, skipped, errors) == ("0", "0", "0"), row
        assert re.search(r"^matrix: \d+ passed, 0 failed, 0 skipped$", done.stdout, re.M), done.stdout

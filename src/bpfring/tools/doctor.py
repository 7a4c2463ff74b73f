"""``bpfring doctor``: what works on this machine, and what to do about what does not.

Every check asks the kernel or the file system itself (a map is created, a hand-assembled
program writes a record that is read back, a PMU directory is looked for) rather than guessing
from version numbers. Each line says ok or what to do. The exit status is 0 when the basics
work (the bpf() system call, and a ring buffer a program writes and bpfring reads).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import resource
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable

from .._sys import bpf as sys_bpf
from .._sys import libbpf
from .._sys import perf as sys_perf
from .._sys import probes
from .._sys.bpf import MapType
from .._sys.mounts import BPFFS, TRACEFS, is_mounted
from ..maps import Map
from .common import CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, EXIT_ERROR, EXIT_OK, _effective_caps, paragraphs

OK, MISSING, FAIL, UNCHECKED = "ok", "missing", "fail", "unchecked"

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
PMU_DIR = "/sys/bus/event_source/devices"
# Kernel functions an fentry probe may attach to: the first is there for BPF's own self-tests.
FENTRY_TARGETS = ("bpf_fentry_test1", "do_nanosleep")
BTF_KIND_FUNC = 12
ENOTSUPP = 524  # the kernel-internal "not supported" that BPF attach paths return


@dataclass
class Check:
    """One line of the report: ``status`` is ok, missing (with what to do), fail or unchecked."""

    id: str
    title: str
    status: str
    detail: str
    basic: bool = False  # a failure here means bpfring cannot read rings on this machine
    facts: dict[str, Any] = field(default_factory=dict)


def kernel_version() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _privileged() -> bool:
    caps = _effective_caps()
    return bool(caps >> CAP_SYS_ADMIN & 1 or (caps >> CAP_BPF & 1 and caps >> CAP_PERFMON & 1))


def _kernel_refused(exc: OSError) -> str:
    """The kernel's answer in words, with a hint where it is about privileges."""
    if exc.errno in (errno.EPERM, errno.EACCES) and not _privileged():
        return "the kernel refused for lack of privileges: run bpfring doctor with sudo"
    return f"the kernel said: {os.strerror(exc.errno) if exc.errno != ENOTSUPP else 'not supported'} (errno {exc.errno})"


# -- the checks, in the order printed ---------------------------------------------------------------


def check_kernel() -> Check:
    release, machine = os.uname().release, platform.machine()
    facts = {"release": release, "machine": machine, "version": "%d.%d" % kernel_version()}
    if kernel_version() < (5, 8):
        return Check("kernel", "kernel", MISSING, f"Linux {release} {machine}: ring buffers need Linux 5.8 or later", facts=facts)
    return Check("kernel", "kernel", OK, f"Linux {release} {machine}", facts=facts)


def check_bpf_syscall() -> Check:
    try:
        Map.create(MapType.ARRAY, 1, 4, 4).close()
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            detail = "this kernel has no bpf() system call (built without CONFIG_BPF_SYSCALL)"
        else:
            detail = f"creating a BPF map failed: {_kernel_refused(exc)}"
        return Check("bpf", "bpf()", FAIL, detail, basic=True)
    return Check("bpf", "bpf()", OK, "the bpf() system call creates maps", basic=True)


def check_privileges() -> Check:
    caps = _effective_caps()
    held = [name for bit, name in ((CAP_SYS_ADMIN, "CAP_SYS_ADMIN"), (CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")) if caps >> bit & 1]
    facts = {"uid": os.geteuid(), "capabilities": held}
    try:
        with open("/proc/sys/kernel/unprivileged_bpf_disabled") as f:
            facts["unprivileged_bpf_disabled"] = int(f.read())
    except (OSError, ValueError):
        pass
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    if _privileged():
        return Check("privileges", "privileges", OK, f"{who} with {', '.join(held)}", facts=facts)
    return Check(
        "privileges", "privileges", MISSING,
        f"{who} with {', '.join(held) or 'no BPF capability'}: loading and attaching programs needs root, or CAP_BPF"
        " and CAP_PERFMON (sudo bpfring ..., or setcap cap_bpf,cap_perfmon+ep on the interpreter)",
        facts=facts,
    )


def check_btf() -> Check:
    if os.path.exists(VMLINUX_BTF):
        return Check("btf", "BTF", OK, f"{VMLINUX_BTF}: CO-RE programs load on this kernel")
    return Check(
        "btf", "BTF", MISSING,
        f"no {VMLINUX_BTF}: CO-RE programs (execsnoop, bpfring's objects) need a kernel built with CONFIG_DEBUG_INFO_BTF=y",
    )


def _check_mount(id: str, path: str, fstype: str, needed_for: str) -> Check:
    if is_mounted(path, fstype):
        return Check(id, id, OK, f"mounted at {path}")
    return Check(
        id, id, MISSING,
        f"not mounted at {path}; {needed_for} needs it: sudo mount -t {fstype} none {path} (bpfring mounts it when run as root)",
    )


def check_bpffs() -> Check:
    return _check_mount("bpffs", BPFFS, "bpf", "pinning maps (bpfring tail PATH)")


def check_tracefs() -> Check:
    return _check_mount("tracefs", TRACEFS, "tracefs", "attaching tracepoint programs")


def check_memlock() -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    shown = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft // 1024} KiB"
    facts = {"soft": None if soft == resource.RLIM_INFINITY else soft, "hard": None if hard == resource.RLIM_INFINITY else hard}
    if kernel_version() >= (5, 11):
        return Check("memlock", "RLIMIT_MEMLOCK", OK, f"{shown}; does not matter on 5.11+ (BPF memory is charged to the memory cgroup)", facts=facts)
    if soft == resource.RLIM_INFINITY:
        return Check("memlock", "RLIMIT_MEMLOCK", OK, "unlimited (this kernel charges BPF maps to it)", facts=facts)
    return Check(
        "memlock", "RLIMIT_MEMLOCK", MISSING,
        f"{shown}, and this kernel (before 5.11) charges BPF maps to it: bpfring raises it when it loads objects as root;"
        " elsewhere run ulimit -l unlimited first",
        facts=facts,
    )


def check_ring_buffer() -> Check:
    from ..ringbuf import RingBuffer

    title = "ring buffer"
    try:
        m = Map.create(MapType.RINGBUF, 4096)
    except OSError as exc:
        detail = "needs Linux 5.8 or later" if exc.errno == errno.EINVAL else _kernel_refused(exc)
        return Check("ring_buffer", title, FAIL, f"no BPF_MAP_TYPE_RINGBUF: {detail}", basic=True)
    got: list[bytes] = []
    try:
        prog = probes.ringbuf_output_program(m.fd, 0xB9F)
        try:
            with RingBuffer(m, got.append) as rb:
                sys_bpf.prog_test_run(prog, probes.TEST_PACKET)
                rb.consume()
        finally:
            os.close(prog)
    except OSError as exc:
        return Check("ring_buffer", title, FAIL, f"a program writing to a ring buffer: {_kernel_refused(exc)}", basic=True)
    finally:
        m.close()
    if got != [(0xB9F).to_bytes(8, "little")]:
        return Check("ring_buffer", title, FAIL, f"a program wrote 1 record, bpfring read {got!r}", basic=True)
    return Check("ring_buffer", title, OK, "a BPF program wrote a record and bpfring read it back", basic=True)


def check_user_ring_buffer() -> Check:
    title = "user ring buffer"
    try:
        Map.create(MapType.USER_RINGBUF, 4096).close()
    except OSError as exc:
        detail = "needs Linux 6.1 or later" if exc.errno == errno.EINVAL else _kernel_refused(exc)
        return Check("user_ring_buffer", title, MISSING, f"no BPF_MAP_TYPE_USER_RINGBUF: {detail}")
    return Check("user_ring_buffer", title, OK, "BPF_MAP_TYPE_USER_RINGBUF maps can be created")


def check_perf_buffer() -> Check:
    from ..perfbuf import PerfBuffer

    title = "perf buffer"
    got: list[bytes] = []
    try:
        with Map.create(MapType.PERF_EVENT_ARRAY, max(sys_perf.online_cpus()) + 1, 4, 4) as m:
            prog = probes.perf_output_program(m.fd, 0xB9F)
            try:
                with PerfBuffer(m, 1, lambda cpu, data: got.append(data[:8])) as pb:
                    sys_bpf.prog_test_run(prog, probes.TEST_PACKET)
                    pb.consume()
            finally:
                os.close(prog)
    except OSError as exc:
        return Check("perf_buffer", title, MISSING, f"a program writing to a perf event array: {_kernel_refused(exc)}")
    if got != [(0xB9F).to_bytes(8, "little")]:
        return Check("perf_buffer", title, MISSING, f"a program wrote 1 sample, bpfring read {got!r}")
    return Check("perf_buffer", title, OK, "a BPF program wrote a sample and bpfring read it back")


def _pmu(name: str) -> bool:
    return os.path.isdir(f"{PMU_DIR}/{name}")


def check_tracepoints() -> Check:
    if not _pmu("tracepoint"):
        return Check("tracepoints", "tracepoints", MISSING, f"no {PMU_DIR}/tracepoint: this kernel was built without tracepoint events")
    if not os.path.isdir(f"{TRACEFS}/events"):
        return Check("tracepoints", "tracepoints", MISSING, f"the kernel has them, but tracefs is not mounted at {TRACEFS} (see tracefs)")
    return Check("tracepoints", "tracepoints", OK, f"{PMU_DIR}/tracepoint and {TRACEFS}/events")


def _check_probe(id: str, title: str, pmu: str, legacy: str, instead: str) -> Check:
    if _pmu(pmu):
        return Check(id, title, OK, f"{PMU_DIR}/{pmu}")
    if os.path.exists(f"{TRACEFS}/{legacy}"):
        return Check(id, title, OK, f"through {TRACEFS}/{legacy} (no {pmu} PMU: libbpf uses the legacy interface)")
    return Check(
        id, title, MISSING,
        f"this kernel has no {title} (no {PMU_DIR}/{pmu}, no {TRACEFS}/{legacy}): programs in {pmu}/ sections cannot"
        f" attach here; {instead}",
    )


def check_kprobes() -> Check:
    return _check_probe("kprobes", "kprobes", "kprobe", "kprobe_events", "attach to tracepoints (tp/) instead, or rebuild with CONFIG_KPROBE_EVENTS=y")


def check_uprobes() -> Check:
    return _check_probe("uprobes", "uprobes", "uprobe", "uprobe_events", "rebuild the kernel with CONFIG_UPROBE_EVENTS=y")


def _vmlinux_func_id(names: tuple[str, ...]) -> tuple[str, int] | None:
    lib = libbpf.load()
    btf = lib.btf__load_vmlinux_btf()
    if not btf:
        return None
    try:
        for name in names:
            type_id = lib.btf__find_by_name_kind(btf, name.encode(), BTF_KIND_FUNC)
            if type_id > 0:
                return name, type_id
        return None
    finally:
        lib.btf__free(btf)


def check_fentry() -> Check:
    title = "fentry"
    if not os.path.exists(VMLINUX_BTF):
        return Check("fentry", title, MISSING, "fentry programs need the kernel's BTF (see BTF)")
    if not _privileged():
        return Check("fentry", title, UNCHECKED, "loading a tracing program needs privileges: run bpfring doctor with sudo")
    try:
        target = _vmlinux_func_id(FENTRY_TARGETS)
    except libbpf.LibbpfUnavailableError:
        return Check("fentry", title, UNCHECKED, "finding a kernel function in BTF needs libbpf (see libbpf)")
    if target is None:
        return Check("fentry", title, UNCHECKED, f"none of {', '.join(FENTRY_TARGETS)} is in the kernel's BTF")
    name, type_id = target
    step = "loading"
    try:
        prog = probes.fentry_program(type_id)
        try:
            step = "attaching"
            os.close(sys_bpf.raw_tracepoint_open(prog))
        finally:
            os.close(prog)
    except OSError as exc:
        return Check(
            "fentry", title, MISSING,
            f"{step} an fentry program on {name} was refused ({_kernel_refused(exc)}): fentry/fexit programs cannot"
            " run here (they need BPF trampolines: CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS and the JIT); use"
            " tracepoints (tp/) instead",
        )
    return Check("fentry", title, OK, f"an fentry program loaded and attached to {name}")


def check_libbpf() -> Check:
    try:
        path = libbpf.path()
        major, minor = libbpf.version()
    except libbpf.LibbpfUnavailableError as exc:
        return Check("libbpf", "libbpf", MISSING, f"{exc}; ring, perf and user ring buffers work without it")
    if os.environ.get(libbpf.ENV_LIBRARY):
        origin = f"${libbpf.ENV_LIBRARY}"
    elif os.path.dirname(path) == str(libbpf.BUNDLED_DIR):
        origin = "bundled"
    else:
        origin = "system"
    facts = {"version": f"{major}.{minor}", "path": path, "origin": origin}
    return Check("libbpf", "libbpf", OK, f"{major}.{minor} ({origin}) at {path}", facts=facts)


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else ""


def check_build() -> Check:
    clang, bpftool = _tool("clang"), _tool("bpftool")
    facts = {"clang": clang, "bpftool": bpftool}
    missing = [name for name, path in (("clang", clang), ("bpftool", bpftool)) if not path]
    if missing:
        return Check(
            "build", "building BPF C", MISSING,
            f"{' and '.join(missing)} not found: compiling *.bpf.c needs them (Debian: apt install {' '.join(missing)});"
            " prebuilt objects load without them",
            facts=facts,
        )
    version = _first_line([clang, "--version"])
    return Check("build", "building BPF C", OK, f"{version or 'clang'} at {clang}, bpftool at {bpftool}", facts=facts)


CHECKS: list[Callable[[], Check]] = [
    check_kernel,
    check_bpf_syscall,
    check_privileges,
    check_btf,
    check_bpffs,
    check_tracefs,
    check_memlock,
    check_ring_buffer,
    check_user_ring_buffer,
    check_perf_buffer,
    check_tracepoints,
    check_uprobes,
    check_kprobes,
    check_fentry,
    check_libbpf,
    check_build,
]


def run_checks() -> list[Check]:
    """Every check; one that breaks is reported as unchecked with its error, never raised."""
    results = []
    for check in CHECKS:
        try:
            results.append(check())
        except Exception as exc:  # a diagnostic tool reports what it could not find out
            name = check.__name__.removeprefix("check_")
            results.append(Check(name, name, UNCHECKED, f"the check itself failed: {type(exc).__name__}: {exc}"))
    return results


def run(args: argparse.Namespace) -> int:
    checks = run_checks()
    basics_ok = all(c.status == OK for c in checks if c.basic)
    if args.json:
        doc = {
            "basics_ok": basics_ok,
            "checks": {c.id: {"title": c.title, "status": c.status, "detail": c.detail, **c.facts} for c in checks},
        }
        print(json.dumps(doc, indent=2))
    else:
        width = max(len(c.title) for c in checks)
        for c in checks:
            print(f"{c.title:<{width}}  {c.status:<9}  {c.detail}")
        not_ok = [c.title for c in checks if c.status != OK]
        verdict = "the basics work: bpfring can read rings here" if basics_ok else "the basics do NOT work: see the lines marked fail"
        print(f"\n{verdict}" + (f"; not available: {', '.join(not_ok)}" if not_ok else "; everything checked is available"))
    return EXIT_OK if basics_ok else EXIT_ERROR


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "doctor",
        parents=parents,
        help="say what works on this machine (kernel features, privileges, libbpf, build tools)",
        description=paragraphs(
            "Check what bpfring needs and what the kernel offers: the kernel and its BTF, privileges, "
            "the bpffs and tracefs mounts, RLIMIT_MEMLOCK, ring, user ring and perf buffers (a tiny "
            "program writes a record that is read back), tracepoints, uprobes, kprobes and fentry, "
            "the libbpf in use, and whether BPF C can be built here. Each line says ok or what to do.",
            "Exit status 0 when the basics work (the bpf() system call and a ring buffer), else 1.",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  sudo bpfring doctor\n  sudo bpfring doctor --json | jq .checks.fentry\n",
    )
    p.add_argument("--json", action="store_true", help="one JSON document: basics_ok and every check by id")
    p.set_defaults(func=run)

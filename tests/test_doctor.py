"""``bpfring doctor`` through the real command: what it says matches what the machine has."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
from conftest import as_nobody, fork_call

from bpfring import cli
from bpfring._sys import libbpf
from bpfring.tools import doctor

PMU = "/sys/bus/event_source/devices"
STATUSES = {"ok", "missing", "fail", "unchecked"}
IDS = [
    "kernel", "bpf", "privileges", "btf", "bpffs", "tracefs", "memlock", "ring_buffer", "user_ring_buffer",
    "perf_buffer", "tracepoints", "uprobes", "kprobes", "fentry", "libbpf", "build",
]


def run_doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bpfring", "doctor", *args], capture_output=True, text=True, timeout=300, env=env
    )


def doctor_json(env: dict[str, str] | None = None) -> tuple[int, dict]:
    done = run_doctor("--json", env=env)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def test_the_basics_work_here_and_every_check_has_a_line(bpf):
    done = run_doctor()
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    _, doc = doctor_json()
    assert len(lines) == len(IDS) + 2  # a line per check, a blank line, the verdict
    for line, check in zip(lines, doc["checks"].values()):
        title = line[: line.index("  ")]
        assert title == check["title"], line
        assert line.split(None, len(title.split()) + 1)[len(title.split()):] == [check["status"], check["detail"]]
    assert f"Linux {os.uname().release}" in lines[0]
    assert lines[-1].startswith("the basics work: bpfring can read rings here")


def test_json_says_what_the_machine_has(bpf):
    code, doc = doctor_json()
    assert code == 0
    checks = doc["checks"]
    assert doc["basics_ok"] is True
    assert list(checks) == IDS
    assert all(c["status"] in STATUSES and c["detail"] for c in checks.values())
    assert checks["kernel"]["release"] == os.uname().release
    for basic in ("bpf", "ring_buffer"):
        assert checks[basic]["status"] == "ok"
    assert checks["privileges"]["status"] == "ok" and "CAP_BPF" in checks["privileges"]["capabilities"]
    assert checks["btf"]["status"] == ("ok" if os.path.exists("/sys/kernel/btf/vmlinux") else "missing")
    assert checks["libbpf"]["version"] == "%d.%d" % libbpf.VERSION
    assert checks["libbpf"]["path"] == libbpf.path()


@pytest.mark.parametrize("feature, pmu", [("kprobes", "kprobe"), ("uprobes", "uprobe"), ("tracepoints", "tracepoint")])
def test_probe_types_follow_the_kernels_event_sources(bpf, feature, pmu):
    # This kernel has uprobes and tracepoints but no kprobes: doctor says so instead of failing.
    _, doc = doctor_json()
    check = doc["checks"][feature]
    legacy = f"/sys/kernel/tracing/{pmu}_events"
    if os.path.isdir(f"{PMU}/{pmu}") or (pmu != "tracepoint" and os.path.exists(legacy)):
        assert check["status"] == "ok", check
    else:
        assert check["status"] == "missing", check
        assert f"this kernel has no {feature}" in check["detail"] or "built without" in check["detail"]


def test_fentry_is_tried_for_real_and_a_refusal_is_said_in_words(bpf):
    # fentry is refused on this kernel (no BPF trampolines); elsewhere an fentry program attaches.
    _, doc = doctor_json()
    check = doc["checks"]["fentry"]
    attached = doctor.check_fentry()  # the same probe, in this process
    assert check["status"] == attached.status
    if check["status"] == "ok":
        assert check["detail"].startswith("an fentry program loaded and attached to")
    else:
        assert check["status"] == "missing", check
        assert "fentry program on bpf_fentry_test1 was refused (the kernel said:" in check["detail"]
        assert "use tracepoints (tp/) instead" in check["detail"]


def test_without_libbpf_the_basics_still_work_and_libbpf_is_named_missing(bpf):
    code, doc = doctor_json(env={**os.environ, "BPFRING_LIBBPF": "/nonexistent/libbpf.so.1"})
    assert code == 0
    checks = doc["checks"]
    assert checks["ring_buffer"]["status"] == checks["perf_buffer"]["status"] == "ok"
    assert checks["libbpf"]["status"] == "missing"
    assert "apt install libbpf1" in checks["libbpf"]["detail"]
    assert "ring, perf and user ring buffers work without it" in checks["libbpf"]["detail"]
    assert checks["fentry"] == {"title": "fentry", "status": "unchecked", "detail": "finding a kernel function in BTF needs libbpf (see libbpf)"}


def test_missing_build_tools_are_named_with_the_package_to_install(bpf, tmp_path):
    # An empty PATH: clang is not found (bpftool may still be, in /usr/sbin).
    _, doc = doctor_json(env={**os.environ, "PATH": str(tmp_path)})
    build = doc["checks"]["build"]
    assert build["status"] == "missing"
    assert build["clang"] is None
    assert "clang" in build["detail"] and "apt install clang" in build["detail"]


def doctor_in_process() -> str:
    """``bpfring doctor`` run by cli.main in this process (for fork_call): 'CODE' then its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["doctor"])
    return f"{code}\n{out.getvalue()}"


def test_without_privileges_doctor_says_to_use_sudo_and_exits_1(bpf):
    said = fork_call(as_nobody(doctor_in_process))
    assert said.startswith("ok: 1\n"), said
    assert "creating a BPF map failed: the kernel refused for lack of privileges: run bpfring doctor with sudo" in said
    assert "uid 65534 with no BPF capability: loading and attaching programs needs root" in said
    assert "\nthe basics do NOT work: see the lines marked fail; not available: bpf(), privileges," in said


def test_a_check_that_breaks_is_reported_not_raised(monkeypatch):
    def broken() -> doctor.Check:
        raise RuntimeError("boom")

    monkeypatch.setattr(doctor, "CHECKS", [broken])
    [check] = doctor.run_checks()
    assert (check.status, check.detail) == ("unchecked", "the check itself failed: RuntimeError: boom")

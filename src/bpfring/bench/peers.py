"""The peers a user would pick instead of bpfring, run where they can and skipped with the
reason where they cannot: bcc's Python ring_buffer_consume() and cilium/ebpf's Go ringbuf.Reader.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from typing import Optional

import numpy as np

from ..ringbuf import Ring
from .consumers import Consumer, Session
from .native import LATENCY_EVERY
from .workload import Workload

GO_SOURCE = os.path.join(os.path.dirname(__file__), "cilium_ringbuf.go")
GOPATH = "/usr/share/gocode"  # Debian's Go libraries: golang-github-cilium-ebpf-dev
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python3-bpfcc installs bcc there


def bcc_unavailable() -> str:
    """Why bcc cannot run here; it always cannot be compared, see the last line."""
    if not os.path.exists(SYSTEM_PYTHON):
        return f"skipped: bcc needs {SYSTEM_PYTHON} with python3-bpfcc (Debian: apt install python3-bpfcc)"
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import bcc; bcc.BPF(text='int f(void *ctx) { return 0; }')"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        lines = [line.strip() for line in (probe.stdout + probe.stderr).splitlines() if line.strip()]
        if any("No module named 'bcc'" in line for line in lines):
            return "skipped: bcc is not installed (Debian: apt install python3-bpfcc)"
        headers = next((line for line in lines if "kernel headers" in line), None)
        if headers:
            release = os.uname().release
            return (
                f"skipped: bcc compiles its BPF C at run time and needs this kernel's headers "
                f"(/lib/modules/{release}/build, or CONFIG_IKHEADERS), which this kernel lacks: "
                f'bcc says "{headers.split(".")[0]}"'
            )
        return f"skipped: bcc cannot compile a BPF program here: {lines[-1] if lines else probe.returncode}"
    # bcc runs only programs it compiled itself, so it cannot read this workload's map; a bcc
    # twin of the workload was not written, as it could not be checked where this was written.
    return "skipped: bcc works here, but reads only maps of the programs it compiles; no bcc twin of the workload yet"


def build_go_consumer(workdir: str) -> tuple[Optional[str], str]:
    """(path of the built Go consumer, "") or (None, why it could not be built)."""
    go = shutil.which("go") or shutil.which("go", path="/usr/lib/go/bin")
    if not go:
        return None, "skipped: no Go toolchain (Debian: apt install golang-go golang-github-cilium-ebpf-dev)"
    if not os.path.isdir(os.path.join(GOPATH, "src", "github.com", "cilium", "ebpf", "ringbuf")):
        return None, f"skipped: cilium/ebpf is not in {GOPATH} (Debian: apt install golang-github-cilium-ebpf-dev)"
    src = os.path.join(workdir, "cilium", "main.go")
    os.makedirs(os.path.dirname(src), exist_ok=True)
    shutil.copyfile(GO_SOURCE, src)
    out = os.path.join(workdir, "cilium", "bench-cilium")
    env = dict(os.environ, GOPATH=GOPATH, GO111MODULE="off", GOFLAGS="", CGO_ENABLED="0")
    env.setdefault("GOCACHE", os.path.join(os.environ.get("HOME") or workdir, ".cache", "go-build"))
    built = subprocess.run([go, "build", "-o", out, src], capture_output=True, text=True, env=env, timeout=600)
    if built.returncode != 0:
        detail = (built.stderr.strip().splitlines() or ["go build failed"])[-1]
        return None, f"skipped: the cilium/ebpf consumer does not build against {GOPATH}: {detail}"
    return out, ""


class CiliumGo(Session):
    """The Go consumer in its own process, pinned like the others, reading the inherited map fd."""

    def __init__(self, wl: Workload, binary: str) -> None:
        self.map = wl.map
        self.ring = Ring(wl.map, lambda data: None)  # only to watch the positions, never consumes
        # The process inherits the benchmark thread's CPU affinity: the consumer's placement.
        self.proc = subprocess.Popen(
            [binary, str(self.map.fd), str(LATENCY_EVERY)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=[self.map.fd],
        )
        ready = self.proc.stdout.readline()
        if ready.strip() != b"ready":
            err = self.proc.stderr.read().decode(errors="replace").strip()
            self.close()
            raise RuntimeError(f"the cilium/ebpf consumer did not start: {err or ready!r}")
        self.count = 0
        self.lat = np.empty(0, dtype=np.int64)

    def run(self, stopped: threading.Event) -> None:
        stopped.wait()
        give_up = time.monotonic() + 10
        while self.ring.avail_data_size and time.monotonic() < give_up:
            time.sleep(0.001)  # the Go reader drains what is left (the wakeup reached it)
        self.proc.stdin.write(b"stop\n")
        self.proc.stdin.close()
        out = self.proc.stdout.read()
        # Reaped here rather than by Popen, for the child's CPU time.
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        if self.proc.returncode != 0:
            err = self.proc.stderr.read().decode(errors="replace").strip()
            raise RuntimeError(f"the cilium/ebpf consumer failed ({self.proc.returncode}): {err}")
        done = json.loads(out)
        self.count = done["consumed"]
        self.lat = np.array(done["latency_ns"] or [], dtype=np.int64)
        self.cpu_s = usage.ru_utime + usage.ru_stime

    def result(self) -> tuple[int, np.ndarray]:
        return self.count, self.lat

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.ring.close()


def peer_consumers(workdir: str) -> list[Consumer]:
    """bcc and cilium/ebpf, with their reasons when they cannot run."""
    bcc_reason = bcc_unavailable()
    binary, go_reason = build_go_consumer(workdir)

    def go_unsupported(channel: str) -> Optional[str]:
        if not binary:
            return go_reason
        if channel != "ringbuf":
            return "n/a: the Go consumer reads ring buffers (ringbuf.Reader) only"
        return None

    return [
        Consumer("bcc-python", "bcc's Python ring_buffer_consume()", lambda wl: None, lambda ch: bcc_reason),  # type: ignore[arg-type, return-value]
        Consumer(
            "cilium-go",
            "cilium/ebpf ringbuf.Reader ReadInto(), Go",
            lambda wl: CiliumGo(wl, binary),  # type: ignore[arg-type]
            go_unsupported,
        ),
    ]

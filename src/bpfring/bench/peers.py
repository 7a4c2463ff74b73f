"""The peers a user would pick instead of bpfring, run where they can and skipped with the
reason where they cannot: bcc's Python ring_buffer_poll() (on its own compiled copy of the
workload, bcc_twin.py) and cilium/ebpf's Go ringbuf.Reader.
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
from .bcc_consumer import BccTwin
from .consumers import Consumer, Session
from .native import LATENCY_EVERY
from .workload import Scenario, Workload

GO_SOURCE = os.path.join(os.path.dirname(__file__), "cilium_ringbuf.go")
GOPATH = "/usr/share/gocode"  # Debian's Go libraries: golang-github-cilium-ebpf-dev


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
        self.ring = Ring(wl.map, lambda data: None, shared=True)  # only to watch the positions, never consumes
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
    bcc = BccTwin(workdir)
    binary, go_reason = build_go_consumer(workdir)

    def go_unsupported(scenario: Scenario) -> Optional[str]:
        if not binary:
            return go_reason
        if scenario.channel != "ringbuf":
            return "n/a: the Go consumer reads ring buffers (ringbuf.Reader) only"
        return None

    bcc_what = "bcc's Python ring_buffer_poll()/perf_buffer_poll(), its own copy of the workload program"
    return [
        Consumer(
            "bcc-python",
            f"{bcc_what}, compiled against {bcc.headers}" if bcc.headers else bcc_what,
            bcc.open,  # type: ignore[arg-type]
            bcc.unsupported,
            bcc.release,
        ),
        Consumer(
            "cilium-go",
            "cilium/ebpf ringbuf.Reader ReadInto(), Go",
            lambda wl: CiliumGo(wl, binary),  # type: ignore[arg-type]
            go_unsupported,
        ),
    ]

"""bcc as a benchmark consumer: bcc_twin.py, bcc's own compiled copy of the workload, run by the
system's Python (Debian's python3-bpfcc), with the kernel headers bcc compiles against.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import subprocess
import threading
from typing import Optional

import numpy as np

from .._sys.mounts import BPFFS, ensure_bpffs
from ..maps import Map, MapType
from .consumers import Session
from .native import LATENCY_EVERY
from .workload import Scenario, Workload

BCC_TWIN = os.path.join(os.path.dirname(__file__), "bcc_twin.py")
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python3-bpfcc installs bcc there
DEBIAN_HEADERS = "/usr/src"  # Debian's linux-headers-VERSION-FLAVOUR and linux-headers-VERSION-common
BCC_PROBE = "import bcc; bcc.BPF(text='int f(void *ctx) { return 0; }')"


def _debian_headers() -> Optional[tuple[str, str, str]]:
    """(version, flavour dir, common dir) of the newest Debian kernel headers installed, if any."""
    found = []
    for name in os.listdir(DEBIAN_HEADERS) if os.path.isdir(DEBIAN_HEADERS) else []:
        m = re.fullmatch(r"linux-headers-(\d+)\.(\d+)\.(\d+)-(\d+)-(.+)", name)
        if not m or m.group(5).startswith("common"):
            continue
        common = os.path.join(DEBIAN_HEADERS, f"linux-headers-{'.'.join(m.groups()[:3])}-{m.group(4)}-common")
        if os.path.isdir(common):
            found.append((tuple(int(g) for g in m.groups()[:4]), os.path.join(DEBIAN_HEADERS, name), common))
    if not found:
        return None
    version, flavour, common = max(found)
    return ".".join(map(str, version[:3])) + f"-{version[3]}", flavour, common


def bcc_setup(workdir: str) -> tuple[str, dict, str]:
    """("", the environment bcc compiles in, what headers it uses), or (why bcc cannot run, {}, "").

    bcc compiles against kernel headers: /lib/modules/RELEASE/build, or CONFIG_IKHEADERS's
    /sys/kernel/kheaders.tar.xz. A kernel with neither (this one, as built) can still use the
    headers of a nearby Debian kernel: its flavour and common trees merged into one (symlinks),
    named by BCC_KERNEL_SOURCE. The workload's program uses no structure those headers could
    get wrong: tracepoint arguments come from this kernel's tracefs, the helpers are stable.
    """
    if not os.path.exists(SYSTEM_PYTHON):
        return f"skipped: bcc needs {SYSTEM_PYTHON} with python3-bpfcc (Debian: apt install python3-bpfcc)", {}, ""
    release = os.uname().release
    env = dict(os.environ)
    headers = f"this kernel's (/lib/modules/{release}/build)"
    if not os.path.isdir(f"/lib/modules/{release}/build") and not os.path.exists("/sys/kernel/kheaders.tar.xz"):
        debian = _debian_headers()
        if debian is None:
            probe = subprocess.run([SYSTEM_PYTHON, "-c", "import bcc"], capture_output=True, text=True, timeout=60)
            if probe.returncode != 0:
                return "skipped: bcc is not installed (Debian: apt install python3-bpfcc)", {}, ""
            return (
                "skipped: bcc compiles its BPF C at run time against kernel headers; this kernel has none "
                f"(/lib/modules/{release}/build, or CONFIG_IKHEADERS) and no Debian kernel headers are "
                f"installed in {DEBIAN_HEADERS} (apt install linux-headers-amd64: a nearby kernel's serve)",
                {},
                "",
            )
        version, flavour, common = debian
        merged = os.path.join(workdir, f"linux-headers-{version}")
        if not os.path.isdir(merged):
            for tree in (common, flavour):  # the flavour's generated files over the common tree
                subprocess.run(["cp", "-as", "--remove-destination", f"{tree}/.", merged], check=True)
        env["BCC_KERNEL_SOURCE"] = merged
        headers = f"Debian's linux-headers-{version} (this kernel {release} has none)"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", BCC_PROBE], capture_output=True, text=True, timeout=120, env=env)
    if probe.returncode != 0:
        lines = [line.strip() for line in (probe.stdout + probe.stderr).splitlines() if line.strip()]
        if any("No module named 'bcc'" in line for line in lines):
            return "skipped: bcc is not installed (Debian: apt install python3-bpfcc)", {}, ""
        last = lines[-1] if lines else f"exit status {probe.returncode}"
        said = next((line for line in lines if "kernel headers" in line or "error:" in line), last)
        return f"skipped: bcc cannot compile a BPF program here with {headers}: bcc says {said!r}", {}, ""
    return "", env, headers


class BccProcess:
    """bcc_twin.py in the system's Python: bcc's compiled copy of the workload for one batch size
    and buffer size, with the map of producers its program reads (created here, pinned for bcc)."""

    def __init__(self, s: Scenario, env: dict, log: str) -> None:
        self.log = log
        self.proc: Optional[subprocess.Popen] = None
        ensure_bpffs()
        self.pin = f"{BPFFS}/bpfring-bench-bcc-{os.getpid()}-{id(self)}"
        self.producers: Optional[Map] = Map.create(MapType.HASH, 256, 4, 1, name="producers")
        try:
            self.producers.pin(self.pin)
            with open(log, "w") as err:
                self.proc = subprocess.Popen(
                    [
                        SYSTEM_PYTHON,
                        BCC_TWIN,
                        f"--batch-cnt={s.batch_cnt}",
                        f"--ringbuf-sz={s.ringbuf_sz}",
                        f"--perfbuf-pages={s.perfbuf_pages}",
                        f"--producers-pin={self.pin}",
                        f"--every={LATENCY_EVERY}",
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    env=env,
                    text=True,
                )
            self.expect("ready", 120)  # bcc compiles here: not measured
        except BaseException:
            self.close()
            raise

    def send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            with open(self.log) as f:
                said = f.read().strip().splitlines()
            self.close()
            why = said[-1] if said else (f"no answer in {timeout:g} s" if not ready else "it exited")
            raise RuntimeError(f"the bcc consumer ({SYSTEM_PYTHON} bcc_twin.py) stopped: {why}")
        return line.strip()

    def expect(self, want: str, timeout: float) -> None:
        got = self.receive(timeout)
        if got != want:
            raise RuntimeError(f"the bcc consumer said {got!r}, expected {want!r}")

    def place(self) -> None:
        """Every thread of the bcc process on this run's consumer CPUs (the calling thread's)."""
        assert self.proc is not None
        cpus = os.sched_getaffinity(0)
        for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(tid), cpus)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # type: ignore[union-attr]
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
        if self.pin:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pin)
            self.pin = ""
        if self.producers is not None:
            self.producers.close()
            self.producers = None


class BccTwin:
    """bcc as a consumer: one BccProcess per batch size (bcc compiles its program once for each),
    kept for every scenario and producer count, until release()."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.reason, self.env, self.headers = bcc_setup(workdir)
        self.processes: dict[tuple[int, int, int], BccProcess] = {}

    def unsupported(self, scenario: Scenario) -> Optional[str]:
        if self.reason:
            return self.reason
        if scenario.wakeup_data_size:
            return "n/a: bcc's ring buffer table has no ringbuf_query() (bcc 0.26), which the sampled wakeup rule needs"
        return None

    def open(self, wl: Workload) -> BccSession:
        s = wl.scenario
        key = (s.batch_cnt, s.ringbuf_sz, s.perfbuf_pages)
        process = self.processes.get(key)
        if process is None or not process.alive:
            log = os.path.join(self.workdir, f"bcc-{len(self.processes)}.log")
            process = self.processes[key] = BccProcess(s, self.env, log)
        return BccSession(process, s)

    def release(self) -> None:
        """End every bcc process and drop their maps of producers."""
        processes, self.processes = list(self.processes.values()), {}
        for process in processes:
            process.close()


class BccSession(Session):
    """One run of a bcc process: it consumes its own program's buffer, counts with its own counters."""

    owns_workload_ring = False

    def __init__(self, process: BccProcess, s: Scenario) -> None:
        self.process = process
        self.producers_map = process.producers
        process.place()
        process.send(f"run {s.channel} {int(s.use_output)} {s.wakeup_events}")
        process.expect("running", 30)
        self.count = 0
        self.lat = np.empty(0, dtype=np.int64)
        self._counters: Optional[tuple[int, int]] = None

    def run(self, stopped: threading.Event) -> None:
        stopped.wait()
        self.process.send("stop")
        done = json.loads(self.process.receive(60))
        self.count = done["consumed"]
        self.lat = np.array(done["latency_ns"] or [], dtype=np.int64)
        self.cpu_s = done["cpu_s"]
        self._counters = (done["produced"], done["dropped"])

    def result(self) -> tuple[int, np.ndarray]:
        return self.count, self.lat

    def counters(self) -> Optional[tuple[int, int]]:
        return self._counters

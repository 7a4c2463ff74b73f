"""The benchmark's C helper (bench_callback.c), built at run time, and the tally it fills.

libbpf's consumers need a C callback to be measured as a C tool would use them; the helper
also holds the consumer loop of the kernel's benchmark, so libbpf-c never returns to Python
while it runs.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench_callback.c")
LATENCY_EVERY = 64  # every consumer samples the latency of every 64th record
LATENCY_CAP = 1 << 20  # samples kept per run (8 MiB): 2 s at 30 M records/s


class BenchTally(ctypes.Structure):
    """struct bench_tally of bench_callback.c."""

    _fields_ = [
        ("count", ctypes.c_uint64),
        ("lost", ctypes.c_uint64),
        ("every", ctypes.c_uint64),
        ("lat_cap", ctypes.c_uint64),
        ("lat_n", ctypes.c_uint64),
        ("lat", ctypes.POINTER(ctypes.c_uint64)),
    ]


def new_tally() -> tuple[BenchTally, np.ndarray]:
    """A zeroed tally and the array its latencies go into (keep both alive together)."""
    lat = np.zeros(LATENCY_CAP, dtype=np.uint64)
    tally = BenchTally(0, 0, LATENCY_EVERY, LATENCY_CAP, 0, lat.ctypes.data_as(ctypes.POINTER(ctypes.c_uint64)))
    return tally, lat


def compile_helper(workdir: str) -> ctypes.CDLL:
    """Build bench_callback.c into a shared object with the system's C compiler."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("the libbpf-c baseline needs a C compiler (cc, gcc or clang)")
    out = os.path.join(workdir, "bench_callback.so")
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", out, SOURCE], check=True)
    helper = ctypes.CDLL(out)
    helper.bpfring_bench_poll_until.restype = ctypes.c_int
    helper.bpfring_bench_poll_until.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
    return helper

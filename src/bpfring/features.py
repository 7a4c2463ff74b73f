"""Which BPF features the running kernel has, found by asking it, and one clear error when one is missing.

bpfring runs on kernels from 5.10 on (docs/kernels.md). Where a kernel lacks what a call needs,
:func:`require` raises :class:`FeatureError`, naming the feature, the Linux version that added it
and the kernel found. Each feature is probed (a map created, a helper call shown to the verifier),
not inferred from the version number, since distributions backport features; the version is the
fallback only where probing is not allowed (no privilege).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import resource
import struct
from dataclasses import dataclass
from typing import Callable

from ._sys import bpf as sys_bpf
from ._sys.bpf import MapType
from .errors import BPFError

log = logging.getLogger("bpfring")

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
_PAGE = 4096
_PROG_TYPE_TRACEPOINT = 5


class FeatureError(BPFError):
    """The running kernel lacks a BPF feature (errno EOPNOTSUPP); the message says which and since when."""


@dataclass(frozen=True)
class Feature:
    name: str  # what it is, for people: "the user ring buffer (BPF_MAP_TYPE_USER_RINGBUF)"
    since: tuple[int, int]  # the mainline Linux version that added it
    probe: Callable[[], bool | None]  # True/False from the kernel; None: could not tell

    def __str__(self) -> str:
        return self.name


def kernel_release() -> str:
    return os.uname().release


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of a release string such as ``5.10.0-32-amd64`` (default: the running kernel)."""
    major, minor = (release or kernel_release()).split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _map_type(map_type: MapType) -> Callable[[], bool | None]:
    def probe() -> bool | None:
        try:
            os.close(sys_bpf.map_create(int(map_type), 0, 0, _PAGE))
        except BPFError as exc:
            return False if exc.errno == errno.EINVAL else None  # EINVAL: no such map type
        return True

    return probe


def _helper(helper_id: int) -> Callable[[], bool | None]:
    """A program that only calls the helper: the verifier names an unknown one before anything else."""

    def probe() -> bool | None:
        insns = struct.pack("<BBhi", 0x85, 0, 0, helper_id)  # call helper_id
        insns += struct.pack("<BBhi", 0xB7, 0, 0, 0)  # r0 = 0
        insns += struct.pack("<BBhi", 0x95, 0, 0, 0)  # exit
        try:
            os.close(sys_bpf.prog_load(_PROG_TYPE_TRACEPOINT, insns))
        except BPFError as exc:
            if exc.errno == errno.EPERM:
                return None  # not allowed to ask
            said = str(exc)
            return not ("unknown func" in said or "invalid func" in said)  # else refused for its arguments
        return True

    return probe


# Where libbpf looks for the kernel's BTF when VMLINUX_BTF is absent: vmlinux images kept beside
# the kernel ({r}: the release), whose BTF it reads instead (libbpf's btf__load_vmlinux_btf).
BTF_FALLBACKS = (
    "/boot/vmlinux-{r}",
    "/lib/modules/{r}/vmlinux-{r}",
    "/lib/modules/{r}/build/vmlinux",
    "/usr/lib/modules/{r}/kernel/vmlinux",
    "/usr/lib/debug/boot/vmlinux-{r}",
    "/usr/lib/debug/boot/vmlinux-{r}.debug",
    "/usr/lib/debug/lib/modules/{r}/vmlinux",
)


def _kernel_btf() -> bool:
    """Whether libbpf will find this kernel's BTF (CO-RE relocations are resolved against it)."""
    release = kernel_release()
    return any(os.path.exists(path.format(r=release)) for path in (VMLINUX_BTF, *BTF_FALLBACKS))


RINGBUF = Feature("the BPF ring buffer (BPF_MAP_TYPE_RINGBUF)", (5, 8), _map_type(MapType.RINGBUF))
USER_RINGBUF = Feature("the user ring buffer (BPF_MAP_TYPE_USER_RINGBUF)", (6, 1), _map_type(MapType.USER_RINGBUF))
BTF = Feature(f"kernel BTF ({VMLINUX_BTF}, CONFIG_DEBUG_INFO_BTF)", (5, 4), lambda: _kernel_btf())
BPF_LOOP = Feature("bpf_loop() (and SEC(\"syscall\") programs, 5.14)", (5, 17), _helper(181))
RINGBUF_DYNPTR = Feature("bpf_ringbuf_reserve_dynptr() (variable-size reservations)", (5, 19), _helper(198))
# Not probed: from 5.11 BPF memory is charged to the memory cgroup instead of RLIMIT_MEMLOCK.
MEMCG_ACCOUNTING = Feature("BPF memory charged to the memory cgroup, not RLIMIT_MEMLOCK", (5, 11), lambda: None)

ALL = (RINGBUF, USER_RINGBUF, BTF, BPF_LOOP, RINGBUF_DYNPTR, MEMCG_ACCOUNTING)


@functools.lru_cache(maxsize=None)
def has(feature: Feature) -> bool:
    """Whether the running kernel has ``feature``: its probe's answer, else the version's."""
    found = feature.probe()
    return kernel_version() >= feature.since if found is None else found


def missing_reason(feature: Feature) -> str:
    major, minor = feature.since
    return f"{feature} needs Linux {major}.{minor} or later; this kernel is {kernel_release()}"


def require(feature: Feature) -> None:
    """Raise :class:`FeatureError` if the running kernel lacks ``feature``."""
    if not has(feature):
        raise FeatureError(errno.EOPNOTSUPP, missing_reason(feature))


def bump_memlock_rlimit(kernel: tuple[int, int] | None = None) -> bool:
    """Lift RLIMIT_MEMLOCK on kernels that still charge BPF memory to it (before 5.11).

    Returns whether the limit was raised. Kernels from 5.11 on account BPF memory to the memory
    cgroup instead, and the limit is left alone. Called before every map is created.
    """
    if (kernel or kernel_version()) >= MEMCG_ACCOUNTING.since:
        return False
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == hard == resource.RLIM_INFINITY:
        return True
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        log.info("raised RLIMIT_MEMLOCK to unlimited: this kernel charges BPF maps to it")
    except (ValueError, OSError):  # no CAP_SYS_RESOURCE: the hard limit is as far as we can go
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
        log.warning("this kernel charges BPF maps to RLIMIT_MEMLOCK; raised it only to its hard limit, %d bytes", hard)
    return True

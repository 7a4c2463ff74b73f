"""Compile BPF C programs with clang -target bpf.

The package's own programs (setup.py, at install time) and the tests' include
``bpf/kernel_types.h``, the few kernel types they touch marked for CO-RE, so they build the same on
any machine and load on every kernel from 5.10 on. Users' programs (``bpfring build``) include a
``vmlinux.h`` that :func:`vmlinux_h` generates from the running kernel's BTF.
It imports nothing from bpfring, so setup.py can load it before the package is installed.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
_TARGET_ARCH = {"x86_64": "x86", "aarch64": "arm64"}


class BuildError(RuntimeError):
    """A tool the BPF build needs is missing or failed."""


def _tool(name: str, hint: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if not path:
        raise BuildError(f"{name} is needed to build BPF programs and is not installed ({hint})")
    return path


def vmlinux_h(out_dir: str | os.PathLike[str]) -> Path:
    """Write ``vmlinux.h`` for the running kernel into ``out_dir`` (once) and return its path."""
    out = Path(out_dir) / "vmlinux.h"
    if out.exists():
        return out
    if not os.path.exists(VMLINUX_BTF):
        raise BuildError(f"{VMLINUX_BTF} is missing: this kernel was built without BTF (CONFIG_DEBUG_INFO_BTF)")
    bpftool = _tool("bpftool", "Debian: apt install bpftool")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        subprocess.run([bpftool, "btf", "dump", "file", VMLINUX_BTF, "format", "c"], stdout=f, check=True)
    tmp.replace(out)
    return out


def compile_bpf(
    source: str | os.PathLike[str], output: str | os.PathLike[str], include_dirs: list[str | os.PathLike[str]] = ()
) -> Path:
    """clang -g -O2 -target bpf: compile one ``*.bpf.c`` into a CO-RE ``*.bpf.o``."""
    clang = _tool("clang", "Debian: apt install clang")
    arch = _TARGET_ARCH.get(platform.machine(), platform.machine())
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    cmd = [clang, "-g", "-O2", "-target", "bpf", f"-D__TARGET_ARCH_{arch}", "-Wall", "-Wno-unused-function"]
    cmd += [f"-I{d}" for d in include_dirs]
    cmd += ["-c", os.fspath(source), "-o", os.fspath(output)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"clang failed on {source}:\n{result.stderr}")
    return output


KERNEL_TYPES_DIR = Path(__file__).resolve().parent / "bpf"  # kernel_types.h, in the source tree and installed


def build_dir(
    source_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], work_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Compile every ``*.bpf.c`` in ``source_dir`` into ``out_dir``; headers are looked up beside them.

    Independent of the build machine's kernel: the programs include kernel_types.h, not vmlinux.h.
    ``work_dir`` is no longer used (kept for callers that pass it).
    """
    return [
        compile_bpf(src, Path(out_dir) / (src.name[: -len(".c")] + ".o"), [source_dir, KERNEL_TYPES_DIR])
        for src in sorted(Path(source_dir).glob("*.bpf.c"))
    ]

"""Compile your own BPF program: ``bpfring.compile("prog.bpf.c")`` -> ``prog.bpf.o``.

The recipe every CO-RE program needs: clang ``-target bpf`` with ``-g`` (the BTF that libbpf
relocates against and :meth:`Object.struct` reads), ``-O2`` (the verifier wants optimised code)
and ``-D__TARGET_ARCH_<arch>`` (``bpf_tracing.h`` picks the register layout by it); a
``vmlinux.h`` generated from the running kernel's BTF, made once and cached, keyed by a hash of
that BTF, in ``$XDG_CACHE_HOME/bpfring`` (else ``~/.cache/bpfring``); libbpf's headers
(``bpf/bpf_helpers.h``, from libbpf-dev) on the include path.

This module imports nothing else from bpfring, and no libbpf: building needs only the tools.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

# platform.machine() -> the __TARGET_ARCH_ suffix that libbpf's bpf_tracing.h expects
_TARGET_ARCH = {
    "x86_64": "x86",
    "i686": "x86",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "powerpc",
    "s390x": "s390",
    "riscv64": "riscv",
    "loongarch64": "loongarch",
    "mips64": "mips",
}

# Debian package that provides each tool or header
_PACKAGES = {"clang": "clang", "bpftool": "bpftool", "bpf/bpf_helpers.h": "libbpf-dev"}

# Where clang -target bpf looks for <bpf/bpf_helpers.h> by default; the multiarch directory
# (asm/types.h for programs that include <linux/bpf.h>) is added after everything else.
_SYSTEM_INCLUDES = ("/usr/local/include", "/usr/include")

_DEFINE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

Defines = Union[Iterable[str], Mapping[str, Union[str, int, None]]]


class BuildError(RuntimeError):
    """A BPF program could not be built: a tool is missing, or the compiler refused it.

    ``diagnostics`` holds what the tool printed (clang's errors and warnings), if anything.
    """

    def __init__(self, message: str, diagnostics: str = "") -> None:
        super().__init__(message + (f"\n{diagnostics.rstrip()}" if diagnostics.strip() else ""))
        self.diagnostics = diagnostics


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if not path:
        raise BuildError(
            f"{name} is needed to build BPF programs and is not installed (Debian/Ubuntu: apt install {_PACKAGES[name]})"
        )
    return path


def cache_dir() -> Path:
    """bpfring's cache directory: ``$XDG_CACHE_HOME/bpfring``, else ``~/.cache/bpfring``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bpfring"


def kernel_btf_hash(btf: str | os.PathLike[str] = VMLINUX_BTF) -> str:
    """A short hash of the kernel's BTF: the key of its cached ``vmlinux.h``."""
    try:
        with open(btf, "rb") as f:
            digest = hashlib.file_digest(f, "sha256") if hasattr(hashlib, "file_digest") else hashlib.sha256(f.read())
    except FileNotFoundError:
        raise BuildError(
            f"{os.fspath(btf)} is missing: this kernel was built without BTF (CONFIG_DEBUG_INFO_BTF), "
            "so there is no vmlinux.h to generate"
        ) from None
    return digest.hexdigest()[:16]


def vmlinux_h_path() -> Path:
    """Where the ``vmlinux.h`` of the running kernel is (or will be) cached."""
    return cache_dir() / "vmlinux" / kernel_btf_hash() / "vmlinux.h"


def vmlinux_h() -> Path:
    """The running kernel's ``vmlinux.h``, generated with bpftool on first use and cached."""
    out = vmlinux_h_path()
    if out.exists():
        return out
    bpftool = _tool("bpftool")
    tmp = out.with_name(f".vmlinux.h.{os.getpid()}")  # concurrent builds each write their own, then rename
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            result = subprocess.run(
                [bpftool, "btf", "dump", "file", VMLINUX_BTF, "format", "c"], stdout=f, stderr=subprocess.PIPE
            )
        if result.returncode != 0:
            raise BuildError(
                f"bpftool could not write vmlinux.h from {VMLINUX_BTF} (exit {result.returncode})",
                result.stderr.decode(errors="replace"),
            )
        tmp.replace(out)
    except OSError as exc:
        raise BuildError(
            f"can't write vmlinux.h into {out.parent}: {exc.strerror} (XDG_CACHE_HOME chooses another cache directory)"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return out


def libbpf_include_dir() -> Path:
    """The directory that holds libbpf's ``bpf/bpf_helpers.h``."""
    for d in _SYSTEM_INCLUDES:
        if os.path.exists(os.path.join(d, "bpf", "bpf_helpers.h")):
            return Path(d)
    raise BuildError(
        "libbpf's headers (bpf/bpf_helpers.h) are needed to build BPF programs and are not installed "
        "(Debian/Ubuntu: apt install libbpf-dev)"
    )


def target_arch() -> str:
    """The ``__TARGET_ARCH_`` suffix for this machine (``x86``, ``arm64``...)."""
    return _TARGET_ARCH.get(platform.machine(), platform.machine())


def _define_flags(defines: Defines) -> list[str]:
    if isinstance(defines, str):
        raise TypeError(f"defines must be a list of 'NAME' or 'NAME=VALUE' strings or a dict, got the string {defines!r}")
    if isinstance(defines, Mapping):
        items = [(str(k), None if v is None else str(v)) for k, v in defines.items()]
    else:
        items = []
        for d in defines:
            if not isinstance(d, str):
                raise TypeError(f"a define must be a 'NAME' or 'NAME=VALUE' string, got {d!r}")
            name, eq, value = d.partition("=")
            items.append((name, value if eq else None))
    flags = []
    for name, value in items:
        if not _DEFINE_NAME.match(name):
            raise ValueError(f"{name!r} is not a C macro name (expected letters, digits and '_', not starting with a digit)")
        flags.append(f"-D{name}" if value is None else f"-D{name}={value}")
    return flags


def default_output(source: str | os.PathLike[str]) -> Path:
    """``prog.bpf.c`` -> ``prog.bpf.o`` beside it (``prog.c`` -> ``prog.o``)."""
    src = Path(source)
    return src.with_name((src.name[:-2] if src.name.endswith(".c") else src.name) + ".o")


def clang_command(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    include_dirs: Iterable[str | os.PathLike[str]] = (),
    defines: Defines = (),
) -> list[str]:
    """The clang command line :func:`compile` runs (vmlinux.h is generated if needed)."""
    clang = _tool("clang")
    header = vmlinux_h()
    libbpf = libbpf_include_dir()
    cmd = [clang, "-g", "-O2", "-target", "bpf", f"-D__TARGET_ARCH_{target_arch()}"]
    cmd += _define_flags(defines)
    # Yours first, then the source's own directory, then vmlinux.h, then libbpf's headers.
    includes = [*map(os.fspath, include_dirs), os.fspath(Path(source).parent), str(header.parent), str(libbpf)]
    cmd += [f"-I{d}" for d in dict.fromkeys(includes)]
    multiarch = Path("/usr/include") / f"{platform.machine()}-linux-gnu"
    if multiarch.is_dir():  # asm/ headers for programs that use <linux/bpf.h> rather than vmlinux.h
        cmd += ["-idirafter", str(multiarch)]
    cmd += ["-c", os.fspath(source), "-o", os.fspath(out)]
    return cmd


def compile(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    include_dirs: Iterable[str | os.PathLike[str]] = (),
    defines: Defines = (),
) -> Path:
    """Compile one BPF C file into a CO-RE object that :class:`bpfring.Object` loads; its path.

    ``out`` defaults to the source's name with ``.o`` for ``.c`` beside it (or in ``out``, if
    that is a directory). ``include_dirs``
    come first on the include path; ``defines`` are ``"NAME"``/``"NAME=VALUE"`` strings or a
    dict. clang's warnings go to stderr as they would from clang itself; its errors are in the
    :class:`BuildError` it raises.
    """
    src = _source(source)
    output = Path(out) if out is not None else default_output(src)
    if output.is_dir():  # -o build/: the default name, in that directory
        output = output / default_output(src).name
    return _clang(src, output, include_dirs, defines)


def _source(source: str | os.PathLike[str]) -> Path:
    src = Path(source)
    if not src.is_file():
        raise FileNotFoundError(2, f"BPF source {os.fspath(source)!r} does not exist or is not a file")
    return src


def _clang(
    src: Path, output: Path, include_dirs: Iterable[str | os.PathLike[str]], defines: Defines, extra: Sequence[str] = ()
) -> Path:
    cmd = clang_command(src, output, include_dirs, defines) + list(extra)
    if output.parent != Path(""):
        output.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
    diagnostics = result.stdout + result.stderr
    if result.returncode != 0:
        raise BuildError(f"clang could not compile {os.fspath(src)} (exit {result.returncode})", diagnostics)
    if diagnostics:
        sys.stderr.write(diagnostics)
    return output


def cached_object(
    source: str | os.PathLike[str], include_dirs: Iterable[str | os.PathLike[str]] = (), defines: Defines = ()
) -> Path:
    """``source`` compiled into bpfring's cache directory, rebuilt only when needed.

    The cache entry is keyed by the source's path and contents, the flags and the kernel's BTF;
    it is rebuilt when the source or any header it included (clang's ``-MD`` list) is newer than
    the object, as make would. This is what ``Object("prog.bpf.c")`` loads.
    """
    src = _source(source).resolve()
    includes = [os.path.abspath(d) for d in include_dirs]
    flags = "\0".join([*includes, *_define_flags(defines)])
    digest = hashlib.sha256(f"{src}\0{flags}\0{kernel_btf_hash()}\0".encode() + src.read_bytes())
    out = cache_dir() / "objects" / digest.hexdigest()[:16] / default_output(src).name
    depfile = out.with_name(out.name + ".d")
    if _up_to_date(out, depfile):
        return out
    tmp = out.with_name(f".{out.name}.{os.getpid()}")  # concurrent builds each write their own, then rename
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(
            f"can't write the built object into {out.parent}: {exc.strerror} "
            "(XDG_CACHE_HOME chooses another cache directory)"
        ) from None
    try:
        _clang(src, tmp, includes, defines, ["-MD", "-MF", str(depfile)])
        tmp.replace(out)
    except BaseException:
        depfile.unlink(missing_ok=True)
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return out


def _up_to_date(out: Path, depfile: Path) -> bool:
    try:
        built = out.stat().st_mtime_ns
        text = depfile.read_text()
    except OSError:
        return False
    # make's syntax: "target: dep dep \<newline> dep", a space in a name escaped as "\ "
    deps = text.replace("\\\n", " ").partition(":")[2].replace("\\ ", "\0").split()
    try:
        return all(os.stat(d.replace("\0", " ")).st_mtime_ns <= built for d in deps)
    except OSError:  # a header is gone: rebuild, and let clang say what is missing
        return False

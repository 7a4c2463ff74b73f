"""The memory ordering of the C walk on arm64, where it matters (x86-64 orders loads and stores
for free): compiled for aarch64 with Debian's cross compiler, every acquire load of a position or
header in _fastring.c is an ``ldar`` (or ``ldapr``) and every release store an ``stlr``.

This machine is x86-64 and cannot run arm64 code with arm64's memory model (qemu's TCG on an
x86-64 host orders like the host), so the instructions are what can be checked here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "bpfring" / "_fastring.c"
CC = "aarch64-linux-gnu-gcc"
OBJDUMP = "aarch64-linux-gnu-objdump"


def sites(order: str, call: str) -> int:
    """The __atomic_<call>_n(..., __ATOMIC_<order>) calls in the source."""
    return len(re.findall(rf"__atomic_{call}_n\([^;]*__ATOMIC_{order}\)", SOURCE.read_text()))


def instructions(tmp_path: Path, *defines: str) -> dict[str, int]:
    if not (shutil.which(CC) and shutil.which(OBJDUMP)):
        pytest.fail(f"{CC} is missing: scripts/setup test installs gcc-aarch64-linux-gnu from Debian")
    obj = tmp_path / "fastring-aarch64.o"
    include = sysconfig.get_paths()["include"]  # (Python's headers are the same for LP64 arm64)
    subprocess.run([CC, "-O2", "-fPIC", "-w", f"-I{include}", *defines, "-c", str(SOURCE), "-o", str(obj)], check=True)
    text = subprocess.run([OBJDUMP, "-d", str(obj)], check=True, capture_output=True, text=True).stdout
    ops = re.findall(r"^\s+[0-9a-f]+:\s+[0-9a-f]{8}\s+(\w+)", text, re.M)
    return {
        "acquire": sum(op.startswith(("ldar", "ldapr")) for op in ops),
        "release": sum(op.startswith("stlr") for op in ops),
    }


def test_every_acquire_load_and_release_store_is_an_ordering_instruction_on_arm64(tmp_path):
    acquire, release = sites("ACQUIRE", "load"), sites("RELEASE", "store")
    assert acquire >= 10 and release >= 4  # producer_pos, data_head, headers; consumer_pos, data_tail, the user ring's
    found = instructions(tmp_path)
    assert found["acquire"] >= acquire, f"{found['acquire']} ldar/ldapr for {acquire} acquire loads"
    assert found["release"] >= release, f"{found['release']} stlr for {release} release stores"


def test_the_check_sees_a_walk_built_with_relaxed_atomics(tmp_path):
    """The same build with acquire and release made relaxed has none of them: the check above
    counts the walk's ordering, not instructions that are there anyway."""
    found = instructions(tmp_path, "-D__ATOMIC_ACQUIRE=__ATOMIC_RELAXED", "-D__ATOMIC_RELEASE=__ATOMIC_RELAXED")
    assert found == {"acquire": 0, "release": 0}

"""Building your own program: ``bpfring build`` and ``bpfring.compile``, with the real clang and bpftool.

Each test builds into its own directory with its own XDG_CACHE_HOME where it matters, so the
cached vmlinux.h of one test is never the one another test asserts about.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bpfring
from bpfring import build

GOOD = """\
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "step.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct my_sample {
	__u32 pid;
	char comm[sizeof(((struct task_struct *)0)->comm)]; /* a vmlinux.h type (TASK_COMM_LEN: 5.10's BTF has none) */
};
struct my_sample unused_sample; /* a global, so struct my_sample reaches BTF */

__u64 calls = 0;

SEC("raw_tp") /* run by BPF_PROG_TEST_RUN from 5.10 on (SEC("syscall") from 5.14) */
int bump(void *ctx)
{
	calls += STEP * SCALE;
	return 0;
}
"""

SYNTAX_ERROR = """\
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
char LICENSE[] SEC("license") = "GPL";
SEC("syscall")
int broken(void *ctx)
{
	return undeclared_thing;
}
"""

# Reads through a pointer the verifier knows may be NULL (a hash lookup may miss): it compiles,
# the kernel refuses it.
VERIFIER_REFUSES = """\
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
char LICENSE[] SEC("license") = "GPL";
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} values SEC(".maps");
SEC("raw_tp")
int unchecked(void *ctx)
{
	__u32 zero = 0;
	__u64 *v = bpf_map_lookup_elem(&values, &zero);
	return *v;
}
"""


def bpfring_cmd(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bpfring", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def project(tmp_path):
    """A program in src/ with a header in include/ (found only with -I)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "include").mkdir()
    write(tmp_path / "include" / "step.h", "#define STEP 3\n")
    return tmp_path


def run_bump(obj_path: Path, times: int) -> int:
    with bpfring.Object(obj_path) as obj:
        obj.load()
        for _ in range(times):
            obj.program("bump").test_run()
        return int.from_bytes(obj.map(".bss").lookup(b"\0" * 4), "little")


def test_compile_builds_a_loadable_object_with_includes_defines_and_btf(project, bpf):
    src = write(project / "src" / "good.bpf.c", GOOD)
    out = bpfring.compile(src, include_dirs=[project / "include"], defines=["SCALE=5"])
    assert out == project / "src" / "good.bpf.o"
    assert run_bump(out, 2) == 2 * 3 * 5
    with bpfring.Object(out) as obj:  # -g: the program's own types are in BTF, vmlinux.h's too
        assert obj.struct("my_sample").fields["comm"][0].itemsize == 16

    # a dict of defines, and another output path
    out2 = bpfring.compile(src, project / "out" / "x.bpf.o", [project / "include"], {"SCALE": 7})
    assert out2 == project / "out" / "x.bpf.o" and run_bump(out2, 1) == 21
    assert bpfring.compile(src, project / "out", [project / "include"], ["SCALE"]) == project / "out" / "good.bpf.o"


def test_build_command_prints_the_object_path(project, bpf):
    src = write(project / "src" / "good.bpf.c", GOOD)
    res = bpfring_cmd("build", str(src), "-I", str(project / "include"), "-D", "SCALE=2", "-o", str(project / "g.o"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(project / "g.o")
    assert run_bump(project / "g.o", 1) == 6

    res = bpfring_cmd("build", "good.bpf.c", "-I", "../include", "-DSCALE=1", cwd=project / "src")
    assert res.returncode == 0, res.stderr
    assert (project / "src" / "good.bpf.o").exists()


def test_a_syntax_error_shows_clangs_diagnostics(project):
    src = write(project / "bad.bpf.c", SYNTAX_ERROR)
    with pytest.raises(build.BuildError) as info:
        bpfring.compile(src)
    assert str(info.value).startswith(f"clang could not compile {src} (exit 1)\n")
    assert "bad.bpf.c:7:9: error: use of undeclared identifier 'undeclared_thing'" in info.value.diagnostics
    assert not (project / "bad.bpf.o").exists()

    res = bpfring_cmd("build", str(src))
    assert res.returncode == 1
    assert res.stderr.startswith(f"bpfring: error: clang could not compile {src} (exit 1)\n")
    assert "error: use of undeclared identifier 'undeclared_thing'" in res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_a_program_the_verifier_refuses_builds_and_its_load_says_why(project, bpf):
    src = write(project / "refused.bpf.c", VERIFIER_REFUSES)
    out = bpfring.compile(src)
    with bpfring.Object(out) as obj:
        with pytest.raises(bpfring.BPFError, match="the verifier rejected a program") as info:
            obj.load()
    assert "invalid mem access 'map_value_or_null'" in str(info.value)

    res = bpfring_cmd("build", str(src), "--verify")
    assert res.returncode == 1
    assert res.stderr.startswith(f"bpfring: error: loading BPF object '{out}': the verifier rejected a program")
    assert "invalid mem access 'map_value_or_null'" in res.stderr
    assert "Traceback" not in res.stderr

    good = write(project / "good.bpf.c", GOOD.replace('#include "step.h"', "#define STEP 1\n#define SCALE 1"))
    res = bpfring_cmd("build", str(good), "--verify")
    assert res.returncode == 0, res.stderr
    assert "the verifier accepted bump" in res.stderr


def test_vmlinux_h_is_generated_once_per_kernel_btf_in_the_cache_dir(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    expected = cache / "bpfring" / "vmlinux" / build.kernel_btf_hash() / "vmlinux.h"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}

    res = bpfring_cmd("build", "--print-vmlinux-h", env=env)
    assert res.returncode == 0 and res.stdout.strip() == f"{expected} (not generated yet: the first build makes it)"

    src = write(tmp_path / "p.bpf.c", GOOD.replace('#include "step.h"', "#define STEP 1\n#define SCALE 1"))
    bpfring.compile(src)
    assert expected.exists() and "struct task_struct {" in expected.read_text()
    assert build.vmlinux_h() == expected
    stamp = expected.stat().st_mtime_ns
    bpfring.compile(src)
    assert expected.stat().st_mtime_ns == stamp  # cached, not regenerated
    res = bpfring_cmd("build", "--print-vmlinux-h", env=env)
    assert res.stdout.strip() == str(expected)

    # without XDG_CACHE_HOME: ~/.cache/bpfring
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert build.vmlinux_h_path().parent.parent.parent == tmp_path / "home" / ".cache" / "bpfring"

    # a cache directory that can't be written: one line that says where and what to do
    blocked = write(tmp_path / "blocked", "a file, not a directory")
    res = bpfring_cmd("build", str(src), env={**os.environ, "XDG_CACHE_HOME": str(blocked)})
    assert res.returncode == 1
    assert res.stderr.startswith(f"bpfring: error: can't write vmlinux.h into {blocked}/bpfring/vmlinux/")
    assert "XDG_CACHE_HOME chooses another cache directory" in res.stderr and "Traceback" not in res.stderr

    # another kernel's BTF: another key
    other = write(tmp_path / "btf", "not the kernel's")
    assert build.kernel_btf_hash(other) != build.kernel_btf_hash()


def test_a_missing_tool_is_one_line_naming_the_package(tmp_path, monkeypatch):
    src = write(tmp_path / "p.bpf.c", SYNTAX_ERROR)
    env = {**os.environ, "PATH": str(tmp_path / "nothing-here")}  # no clang anywhere
    res = bpfring_cmd("build", str(src), env=env)
    assert res.returncode == 1
    assert res.stderr == (
        "bpfring: error: clang is needed to build BPF programs and is not installed (Debian/Ubuntu: apt install clang)\n"
    )

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no vmlinux.h yet: bpftool is needed
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, **kw: None if name == "bpftool" else real_which(name, **kw))
    with pytest.raises(build.BuildError, match=r"^bpftool is needed .* \(Debian/Ubuntu: apt install bpftool\)$"):
        bpfring.compile(src)

    monkeypatch.setattr(build, "_SYSTEM_INCLUDES", (str(tmp_path),))
    monkeypatch.setattr(build, "vmlinux_h", lambda: tmp_path / "vmlinux.h")
    with pytest.raises(build.BuildError, match=r"bpf/bpf_helpers.h\) .* \(Debian/Ubuntu: apt install libbpf-dev\)$"):
        bpfring.compile(src)


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bpf.c' does not exist"):
        bpfring.compile(tmp_path / "nope.bpf.c")
    src = write(tmp_path / "p.bpf.c", GOOD)
    with pytest.raises(ValueError, match="'1X' is not a C macro name"):
        bpfring.compile(src, defines=["1X=2"])
    with pytest.raises(TypeError, match="got the string 'A=1'"):
        bpfring.compile(src, defines="A=1")
    res = bpfring_cmd("build")
    assert res.returncode == 2 and "PROG.bpf.c is required" in res.stderr


def test_object_builds_a_c_source_once_and_again_when_it_or_a_header_changes(tmp_path, monkeypatch, bpf):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    header = write(tmp_path / "step.h", "#define STEP 3\n#define SCALE 1\n")
    src = write(tmp_path / "good.bpf.c", GOOD)  # includes "step.h" from its own directory

    def built() -> Path:
        with bpfring.Object(src) as obj:
            assert obj.source == str(src)
            return Path(obj.path)

    first = built()
    assert first.parent.parent == tmp_path / "cache" / "bpfring" / "objects" and first.name == "good.bpf.o"
    assert run_bump(first, 1) == 3
    stamp = first.stat().st_mtime_ns
    assert built() == first and first.stat().st_mtime_ns == stamp  # cached

    write(header, "#define STEP 4\n#define SCALE 1\n")
    os.utime(header, ns=(stamp + 10**9, stamp + 10**9))  # newer than the object, whatever the clock's grain
    assert built() == first and first.stat().st_mtime_ns != stamp  # rebuilt in place
    assert run_bump(first, 1) == 4

    write(src, GOOD.replace("STEP * SCALE", "STEP * SCALE * 2"))
    assert built() != first  # another source, another entry
    with bpfring.Object(src) as obj:
        obj.load()
        obj.program("bump").test_run()
        assert obj.bss.calls == 8

    write(src, SYNTAX_ERROR)
    with pytest.raises(build.BuildError, match="use of undeclared identifier 'undeclared_thing'"):
        bpfring.Object(src)

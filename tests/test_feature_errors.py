"""What a user reads where the kernel lacks what a program needs: bpfring's one error, not libbpf's.

`bpfring bench` needs bpf_loop() (5.17); an object with CO-RE relocations needs kernel BTF. On a
kernel that lacks the feature (5.10 in scripts/kernels' matrix for bpf_loop()) the tests see the
real answer; where the kernel has it, the probe the features module asks is told "missing" (the
seam), so the check is shown to run before libbpf or the verifier would be reached. That the
programs load where the feature exists is the rest of the suite (test_bench.py, test_cli.py).
"""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path

import pytest
from bpfring import Object, cli, features
from bpfring.features import FeatureError


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_bench_names_bpf_loop_and_the_kernel_where_the_kernel_lacks_it(bpf, monkeypatch, capsys):
    if features.has(features.BPF_LOOP):  # this kernel has it: the probe is told it does not
        monkeypatch.setattr(features, "BPF_LOOP", dataclasses.replace(features.BPF_LOOP, probe=lambda: False))
    status = cli.main(["bench", "--quick", "--only", "drain"])
    err = capsys.readouterr().err
    assert status == cli.EXIT_ERROR
    assert err.startswith("bpfring bench: error: bpf_loop()"), err
    assert f"needs Linux 5.17 or later; this kernel is {os.uname().release}" in err
    assert "verifier" not in err and "libbpf" not in err, err


@pytest.fixture
def no_kernel_btf(monkeypatch, tmp_path):
    """The BTF probe finds no kernel BTF: neither /sys/kernel/btf/vmlinux nor libbpf's fallbacks."""
    monkeypatch.setattr(features, "VMLINUX_BTF", str(tmp_path / "no-vmlinux-btf"))
    monkeypatch.setattr(features, "BTF_FALLBACKS", ())
    features.has.cache_clear()
    assert not features.has(features.BTF)
    yield
    features.has.cache_clear()  # the next test probes the real kernel again


def test_an_object_with_core_relocations_names_kernel_btf_where_there_is_none(bpf, execsnoop_object, no_kernel_btf):
    before = _open_fds()
    obj = Object(execsnoop_object)  # reads tracepoint fields through CO-RE relocations
    with pytest.raises(FeatureError) as info:
        obj.load()
    assert info.value.errno == errno.EOPNOTSUPP
    said = info.value.strerror
    assert "CO-RE relocations" in said and "kernel BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF" in said, said
    assert said.endswith(f"this kernel, {os.uname().release}, has none"), said
    assert str(execsnoop_object) in said
    assert not obj.loaded
    obj.close()
    assert _open_fds() == before


def test_an_object_without_core_relocations_loads_without_kernel_btf(bpf_object, no_kernel_btf):
    """producer_compat reads no kernel structure: kernel BTF does not matter to it."""
    with Object(bpf_object("producer_compat")) as obj:
        obj.load()
        assert obj.loaded


def test_the_bundled_programs_load_with_the_kernels_own_btf(bpf, execsnoop_object):
    """Every kernel of the matrix has BTF (Debian's are built with it): the same object loads."""
    assert features.has(features.BTF), f"no kernel BTF found on {os.uname().release}"
    with Object(execsnoop_object) as obj:
        obj.load()
        assert obj.loaded


def test_an_object_file_garbled_after_open_does_not_break_the_btf_check(bpf_object, no_kernel_btf, tmp_path):
    """The check reads the object's file again at load(): one changed meanwhile into something that
    is not a BPF object (here an ELF header and then 0xff bytes, which sends a naive reader past
    any int) is not a CO-RE object, and load() goes on to libbpf, which has the object in memory."""
    copy = tmp_path / "producer_compat.bpf.o"
    copy.write_bytes(Path(bpf_object("producer_compat")).read_bytes())
    with Object(copy) as obj:
        copy.write_bytes(b"\x7fELF\x02\x01" + b"\xff" * 100)
        obj.load()
        assert obj.loaded

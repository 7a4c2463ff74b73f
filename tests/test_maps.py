"""Map: creation, opening by fd/pin/id, what the kernel reports, and errors."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap

import pytest
from conftest import as_nobody, fork_call, open_fds

import bpfring
from bpfring import Map, MapType
from bpfring._sys import bpf as sys_bpf
from bpfring._sys.mounts import BPFFS, ensure_bpffs


@pytest.fixture
def pin_path(bpf):
    ensure_bpffs()
    path = f"{BPFFS}/bpfring-test-map-{os.getpid()}"
    yield path
    if os.path.exists(path):
        os.unlink(path)


def test_create_reads_type_size_and_name_back_from_the_kernel(bpf):
    with Map.create(MapType.RINGBUF, 16384, name="events") as m:
        assert m.type == MapType.RINGBUF and m.type_name == "BPF_MAP_TYPE_RINGBUF"
        assert m.max_entries == 16384
        assert m.name == "events"
        assert m.id > 0 and m.fd >= 0
    assert m.closed


def test_array_lookup_and_update(bpf):
    with Map.create(MapType.ARRAY, 4, key_size=4, value_size=8) as m:
        key = (2).to_bytes(4, "little")
        m.update(key, b"abcdefgh")
        assert m.lookup(key) == b"abcdefgh"
        with pytest.raises(ValueError, match="takes values of 8 bytes, got 3"):
            m.update(key, b"abc")


def test_from_fd_duplicates_so_both_can_close(bpf):
    with Map.create(MapType.RINGBUF, 4096) as m:
        other = Map.from_fd(m.fd)
        assert other.fd != m.fd and other.id == m.id
        other.close()
        assert m.max_entries == 4096  # the original fd is untouched


def test_from_id_and_pin_and_from_pinned(pin_path):
    with Map.create(MapType.RINGBUF, 8192, name="pinned") as m:
        with Map.from_id(m.id) as by_id:
            assert (by_id.name, by_id.max_entries) == ("pinned", 8192)
        m.pin(pin_path)
    with Map.from_pinned(pin_path) as again:  # the pin kept the map alive
        assert (again.name, again.type) == ("pinned", MapType.RINGBUF)


@pytest.mark.parametrize("size", [3000, 4096 * 3, 0, 1024])
def test_ring_size_must_be_a_power_of_two_and_a_page_multiple(bpf, size):
    before = open_fds()
    with pytest.raises(ValueError, match=f"power of two and a multiple of the page size.*got {size}"):
        Map.create(MapType.RINGBUF, size)
    assert open_fds() == before


def test_non_map_fds_are_refused_and_closed(bpf, tmp_path):
    before = open_fds()
    r, w = os.pipe()
    try:
        with pytest.raises(bpfring.BPFError, match=r"fd \d+ is not a BPF map \(it is pipe:"):
            Map.from_fd(r)
    finally:
        os.close(r)
        os.close(w)
    # a BPF program is a BPF object, but not a map: BPF_PROG_TYPE_SOCKET_FILTER, "r0 = 0; exit"
    prog = sys_bpf.prog_load(1, bytes.fromhex("b700000000000000") + bytes.fromhex("9500000000000000"))
    try:
        with pytest.raises(bpfring.BPFError, match="is not a BPF map \\(it is anon_inode:bpf-prog\\)"):
            Map.from_fd(prog)
    finally:
        os.close(prog)
    with pytest.raises(bpfring.BPFError, match="fd 999 is not an open file descriptor"):
        Map.from_fd(999)
    with pytest.raises(TypeError, match="a map fd must be an int, got str"):
        Map.from_fd("3")  # type: ignore[arg-type]
    assert open_fds() == before


def test_pinned_path_errors_say_what_is_wrong(bpf, tmp_path):
    ensure_bpffs()
    with pytest.raises(bpfring.BPFNotFoundError, match="BPF_OBJ_GET '/sys/fs/bpf/no-such-map'"):
        Map.from_pinned("/sys/fs/bpf/no-such-map")
    plain = tmp_path / "plain-file"
    plain.write_text("x")
    with pytest.raises(bpfring.BPFError, match="is not a BPF object pinned on bpffs"):
        Map.from_pinned(plain)


def without_bpffs(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a Python whose mount namespace is a fresh boot's: /sys/fs/bpf unmounted."""
    script = f"umount {BPFFS} 2>/dev/null; exec {shlex.quote(sys.executable)} -c {shlex.quote(code)}"
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300)


def test_a_pin_on_a_fresh_boot_mounts_bpffs_and_a_pin_elsewhere_says_what_is_wrong(bpf, tmp_path):
    """A fresh boot leaves /sys/fs/bpf unmounted, and the kernel's answer to a pin there is a bare
    ENOENT; outside bpffs it is EPERM, read as a lack of privilege."""
    done = without_bpffs(textwrap.dedent(f"""
        import os
        from bpfring import Map, MapType
        from bpfring._sys.mounts import is_mounted_bpffs
        assert not is_mounted_bpffs("{BPFFS}")
        try:
            Map.from_pinned("{BPFFS}/bpfring-test-gone")
        except FileNotFoundError as exc:
            print("get:", exc)
        with Map.create(MapType.RINGBUF, 4096, name="fresh") as m:
            m.pin("{BPFFS}/bpfring-test-fresh")
            with Map.from_pinned("{BPFFS}/bpfring-test-fresh") as again:
                print("pinned:", again.name, again.id == m.id, is_mounted_bpffs("{BPFFS}"))
            os.unlink("{BPFFS}/bpfring-test-fresh")
            for where in ("{tmp_path}/pin", "{tmp_path}/no-such-dir/pin", "{BPFFS}/no-such-dir/pin"):
                try:
                    m.pin(where)
                except OSError as exc:
                    print(f"{{type(exc).__name__}}: {{exc}}")
    """))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"get: [Errno 2] nothing is pinned at '{BPFFS}/bpfring-test-gone': bpffs is not mounted at {BPFFS} "
        "(pins do not outlive a reboot)",
        "pinned: fresh True True",
        f"BPFError: [Errno 22] can't pin at '{tmp_path}/pin': '{tmp_path}' is not on bpffs (pins live on a bpf "
        f"filesystem: pin under {BPFFS}, or mount one with `mount -t bpf none {tmp_path}`)",
        f"BPFNotFoundError: [Errno 2] can't pin at '{tmp_path}/no-such-dir/pin': directory "
        f"'{tmp_path}/no-such-dir' does not exist",
        f"BPFNotFoundError: [Errno 2] can't pin at '{BPFFS}/no-such-dir/pin': directory "
        f"'{BPFFS}/no-such-dir' does not exist",
    ]


@pytest.mark.parametrize("kind", [MapType.RINGBUF, MapType.PERF_EVENT_ARRAY, MapType.ARRAY])
def test_fdinfo_tells_what_bpf_obj_get_info_tells_but_the_name(bpf, kind):
    """Where the kernel refuses BPF_OBJ_GET_INFO_BY_FD to an unprivileged holder of a map fd (before
    5.19, with kernel.unprivileged_bpf_disabled: tests/test_bad_input.py shows it in the 5.10
    guest), Map reads /proc/self/fdinfo instead; it must say the same."""
    sizes = {MapType.RINGBUF: (0, 0, 8192), MapType.PERF_EVENT_ARRAY: (4, 4, 2), MapType.ARRAY: (4, 24, 3)}[kind]
    with Map.create(kind, sizes[2], key_size=sizes[0], value_size=sizes[1], name="fdinfo") as m:
        info, fdinfo = sys_bpf.map_get_info(m.fd), sys_bpf.map_info_from_fdinfo(m.fd)
        fields = ("type", "id", "key_size", "value_size", "max_entries", "map_flags")
        assert [getattr(fdinfo, f) for f in fields] == [getattr(info, f) for f in fields]
        assert (fdinfo.type, fdinfo.id, fdinfo.max_entries) == (kind, m.id, sizes[2])
    r, w = os.pipe()
    try:
        assert sys_bpf.map_info_from_fdinfo(r) is None  # not a map: the fallback says nothing
    finally:
        os.close(r)
        os.close(w)


def test_from_id_of_a_missing_map(bpf):
    with pytest.raises(bpfring.BPFNotFoundError, match="BPF_MAP_GET_FD_BY_ID id=4000000000"):
        Map.from_id(4_000_000_000)


def test_closed_map_says_so(bpf):
    m = Map.create(MapType.RINGBUF, 4096, name="gone")
    m.close()
    m.close()
    with pytest.raises(ValueError, match="map 'gone' .* is closed"):
        m.fd


def test_kernel_errors_keep_errno_and_say_what_was_attempted(bpf):
    with pytest.raises(OSError) as info:
        sys_bpf.map_create(MapType.ARRAY, 4, 0, 1)  # value_size 0: the kernel says EINVAL
    assert info.value.errno == 22
    assert "BPF_MAP_CREATE BPF_MAP_TYPE_ARRAY max_entries=1" in str(info.value)


def test_without_privileges_the_error_says_so(bpf):
    said = fork_call(as_nobody(lambda: bpfring.Map.create(MapType.RINGBUF, 4096)))
    assert said.startswith("BPFPermissionError: [Errno 1] BPF_MAP_CREATE BPF_MAP_TYPE_RINGBUF")
    assert "needs root" in said

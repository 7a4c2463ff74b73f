"""Numbers too large for the kernel's fields are refused by name, never truncated to their low bits.

ctypes packs a Python int into a u32 field by keeping its low 32 bits, so before these checks
``Map.create(HASH, 2**32 + 1)`` made a map of one entry, map type ``2**32 + 27`` a ring buffer,
``Map.from_id(2**32 + N)`` opened map N. Every refusal leaves no descriptor behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from conftest import open_fds

from bpfring import Map, MapType, PerfBuffer
from bpfring._sys import bpf as sys_bpf
from bpfring._sys import perf as sys_perf

U32 = 1 << 32


def refused(exc_type: type[Exception], match: str, func, *args, **kwargs) -> None:
    """``func(*args)`` raises ``exc_type`` matching ``match`` and leaves the process's fds as they were."""
    before = open_fds()
    with pytest.raises(exc_type, match=match):
        func(*args, **kwargs)
    assert open_fds() == before


# -- Map.create ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, bad, kwargs",
    [
        ("max_entries", U32 + 1, dict(type=MapType.HASH, max_entries=U32 + 1, key_size=4, value_size=4)),
        ("key_size", U32 + 4, dict(type=MapType.HASH, max_entries=1, key_size=U32 + 4, value_size=4)),
        ("value_size", U32 + 8, dict(type=MapType.ARRAY, max_entries=1, key_size=4, value_size=U32 + 8)),
        ("map_flags", U32, dict(type=MapType.HASH, max_entries=1, key_size=4, value_size=4, map_flags=U32)),
        ("map type", U32 + 27, dict(type=U32 + MapType.RINGBUF, max_entries=4096)),
        ("max_entries", -1, dict(type=MapType.HASH, max_entries=-1, key_size=4, value_size=4)),
        ("map type", -1, dict(type=-1, max_entries=1, key_size=4, value_size=4)),
    ],
)
def test_map_create_refuses_numbers_past_a_u32_by_field(bpf, field, bad, kwargs):
    message = f"^{field} must be from 0 to 4294967295 \\(a u32 for the kernel\\), got {bad}$"
    refused(ValueError, message, Map.create, **kwargs)


@pytest.mark.parametrize("value", [2.0, True, "1"])
def test_map_create_refuses_numbers_that_are_not_ints(bpf, value):
    refused(TypeError, "max_entries must be an int, got", Map.create, MapType.HASH, value, 4, 4)


def test_map_names_are_refused_rather_than_cut_to_fifteen_bytes(bpf):
    refused(ValueError, r"map name must be at most 15 bytes, got 'sixteen_bytes_xx' \(16 bytes\)",
            Map.create, MapType.ARRAY, 1, 4, 4, name="sixteen_bytes_xx")
    with Map.create(MapType.ARRAY, 1, 4, 4, name="fifteen_bytes_x") as m:
        assert m.name == "fifteen_bytes_x"


# -- opening by id, fd, path ------------------------------------------------------------------------------


def test_from_id_past_a_u32_is_refused_not_taken_for_a_smaller_id(bpf):
    with Map.create(MapType.RINGBUF, 4096) as m:
        with Map.from_id(m.id) as same:
            assert same.id == m.id
        refused(ValueError, f"^map id must be from 0 to 4294967295 .*got {U32 + m.id}$", Map.from_id, U32 + m.id)
        refused(ValueError, "^map id must be from 0", Map.from_id, -1)


def test_from_fd_past_an_int_is_refused_not_taken_for_a_smaller_fd(bpf):
    with Map.create(MapType.RINGBUF, 4096) as m:
        refused(ValueError, f"a map fd must be from 0 to 2147483647 .*got {U32 + m.fd}$", Map.from_fd, U32 + m.fd)


def test_map_operations_refuse_fds_and_flags_out_of_range(bpf):
    with Map.create(MapType.ARRAY, 1, 4, 4) as m:
        key, value = bytes(4), (7).to_bytes(4, "little")
        refused(ValueError, f"^flags must be from 0 to {(1 << 64) - 1} \\(a u64 for the kernel\\)", m.update, key, value, 1 << 64)
        refused(ValueError, "^flags must be from 0", m.update, key, value, -1)
        buf = sys_bpf.ctypes.create_string_buffer(4)
        refused(ValueError, "^map fd must be from 0 to 2147483647", sys_bpf.map_lookup_elem, U32 + m.fd, buf, buf)
        refused(ValueError, "^fd must be from 0 to 2147483647", sys_bpf.map_get_info, U32 + m.fd)
        m.update(key, value)
        assert m.lookup(key) == value


def test_pin_paths_with_a_nul_byte_are_refused_not_cut_short(bpf):
    ensure = f"/sys/fs/bpf/bpfring-bounds-{uuid.uuid4().hex[:8]}"
    with Map.create(MapType.RINGBUF, 4096) as m:
        refused(ValueError, "pin path must not contain a NUL byte", m.pin, ensure + "\0tail")
        assert not os.path.exists(ensure)  # nothing pinned at the part before the NUL
        m.pin(ensure)
    try:
        refused(ValueError, "pin path must not contain a NUL byte", Map.from_pinned, ensure + "\0tail")
        with Map.from_pinned(ensure) as again:
            assert again.type == MapType.RINGBUF
    finally:
        os.unlink(ensure)


# -- programs -------------------------------------------------------------------------------------------


def socket_filter() -> int:
    """A loaded "r0 = 0; exit" socket filter."""
    return sys_bpf.prog_load(1, bytes.fromhex("b700000000000000") + bytes.fromhex("9500000000000000"))


def test_test_run_refuses_a_repeat_count_past_a_u32(bpf):
    prog = socket_filter()
    try:
        refused(ValueError, f"^repeat must be from 0 to 4294967295 .*got {U32 + 1}$",
                sys_bpf.prog_test_run, prog, bytes(64), repeat=U32 + 1)
        refused(ValueError, "^cpu must be from 0 to 4294967295", sys_bpf.prog_test_run, prog, bytes(64), cpu=-1)
        assert sys_bpf.prog_test_run(prog, bytes(64), repeat=2).retval == 0
    finally:
        os.close(prog)


def test_prog_load_refuses_a_partial_instruction(bpf):
    refused(ValueError, "insns must be whole 8-byte instructions, got 12 bytes", sys_bpf.prog_load, 1, bytes(12))


# -- perf events ----------------------------------------------------------------------------------------


@pytest.fixture
def perf_array(bpf):
    with Map.create(MapType.PERF_EVENT_ARRAY, max(sys_perf.online_cpus()) + 1, 4, 4) as m:
        yield m


def test_wakeup_events_past_a_u32_is_refused_not_sent_as_zero(perf_array):
    refused(ValueError, f"^wakeup_events must be from .* to 4294967295 \\(a u32 for the kernel\\), got {U32}$",
            PerfBuffer, perf_array, 1, wakeup_events=U32)
    refused(ValueError, f"^wakeup_events must be from 0 to 4294967295 .*got {U32}$", sys_perf.open_bpf_output, 0, U32)
    with PerfBuffer(perf_array, 1, wakeup_events=U32 - 1) as pb:
        assert pb.wakeup_events == U32 - 1


def test_open_bpf_output_refuses_a_cpu_past_an_int(bpf):
    # perf_event_open takes an int cpu: 2**32 would have opened an event on cpu 0.
    refused(ValueError, f"^cpu must be from 0 to 2147483647 \\(a CPU number\\), got {U32}$", sys_perf.open_bpf_output, U32, 1)


def test_perf_buffer_sizes_are_checked_before_any_event_is_opened():
    with pytest.raises(ValueError, match=f"^page_cnt must be from 1 to {1 << 30} .*got {1 << 62}$"):
        sys_perf.check_buffer_args(1 << 62, 1)
    with pytest.raises(ValueError, match=f"^wakeup_events must be from 1 to 4294967295 .*got {U32}$"):
        sys_perf.check_buffer_args(1, U32)
    sys_perf.check_buffer_args(1 << 30, U32 - 1)


def test_a_huge_page_cnt_is_refused_and_leaks_no_perf_event(perf_array):
    # mmap of (2**62 + 1) pages raised OverflowError after the cpu's perf event was opened, which
    # then stayed open. Refused as EOVERFLOW, the event is closed; once PerfBuffer calls
    # sys_perf.check_buffer_args() first, it is a ValueError before any event is opened.
    for _ in range(3):
        refused((ValueError, OSError), f"{1 << 62}", PerfBuffer, perf_array, 1 << 62)


# -- the command line -----------------------------------------------------------------------------------


def test_tail_of_a_map_id_past_a_u32_is_not_taken_for_a_smaller_one(bpf):
    with Map.create(MapType.RINGBUF, 4096) as m:
        target = str(U32 + m.id)
        done = subprocess.run([sys.executable, "-m", "bpfring", "tail", target, "--duration", "0.1"],
                              capture_output=True, text=True, timeout=300)  # (numpy alone took 21 s to import in a 5.10 guest)
    assert done.returncode == 1, done.stderr
    assert done.stderr == f"bpfring: error: no BPF map has id {target}: map ids are u32, at most 4294967295\n"


def test_perf_event_ioctls_refuse_an_fd_past_an_int(bpf):
    fd = sys_perf.open_bpf_output(0, 1)
    try:
        for ioctl in (sys_perf.enable, sys_perf.disable):
            refused(ValueError, f"^perf event fd must be from 0 to 2147483647 .*got {U32 + fd}$", ioctl, U32 + fd)
        sys_perf.enable(fd)
        sys_perf.disable(fd)
    finally:
        os.close(fd)

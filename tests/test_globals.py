"""Typed globals by name (obj.rodata / obj.data / obj.bss): tests/bpf/globals.bpf.c, through the kernel.

`step` copies its .rodata settings and .data values into .bss and counts its runs there, so each
test sees a value set from Python arrive in the program, and a value the program wrote arrive in
Python, live.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from conftest import open_fds

from bpfring import Object


@pytest.fixture
def obj(bpf_object):
    with Object(bpf_object("globals")) as o:
        yield o


def step(obj: Object, times: int = 1) -> None:
    for _ in range(times):
        assert obj.program("step").test_run().retval == 0


def bpf_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("anon_inode:bpf-map" in line for line in f)


def test_initial_values_are_read_from_the_object_before_load(obj):
    assert obj.global_sections == [".rodata", ".rodata.config", ".data", ".data.custom", ".bss"]
    r = obj.rodata
    assert dir(r) == ["cfg", "limits", "mode", "prefix", "targ_pid", "verbose"]
    assert (r.targ_pid, r.verbose, r.mode, r.prefix) == (0, False, 1, b"abc")
    assert type(r.targ_pid) is int and type(r.verbose) is bool and type(r.prefix) is bytes
    assert r.limits.tolist() == [1, 2, 3] and r.limits.dtype == np.uint32
    assert (r.cfg["port"], r.cfg["mask"], r.cfg["tag"]) == (80, 0xFF, b"web")
    assert obj.global_data(".rodata.config").threshold == 5
    assert (obj.data.data_value, obj.data.data_name, obj.data.ratio) == (-42, b"hello", 0.5)
    assert obj.global_data(".data.custom")["custom_counter"] == 7
    assert obj.bss.runs == 0 and obj.bss.seen_prefix == b""


def test_rodata_set_by_name_before_load_is_what_the_program_sees(obj):
    r = obj.rodata
    r.targ_pid = 1234
    r.verbose = True
    r.mode = -1  # MODE_BACKWARDS: the enum is signed
    r.prefix = b"xyz"
    r.limits = [7, 8, 9]
    r.cfg = {"port": 443}  # a dict changes only the fields it names
    obj.global_data(".rodata.config").threshold = 11
    assert r.targ_pid == 1234 and r.cfg["mask"] == 0xFF  # read back before load
    obj.load()
    step(obj)
    b = obj.bss
    assert (b.seen_pid, b.seen_verbose, b.seen_mode, b.seen_prefix) == (1234, True, -1, b"xyz")
    assert b.seen_limits.tolist() == [7, 8, 9]
    assert (b.seen_cfg["port"], b.seen_cfg["mask"], b.seen_cfg["tag"]) == (443, 0xFF, b"web")
    assert b.seen_threshold == 11
    # after load .rodata is read from the kernel's map, and is read-only
    assert (r.targ_pid, r.prefix, obj.global_data(".rodata.config").threshold) == (1234, b"xyz", 11)
    with pytest.raises(ValueError, match=r"cannot set \.rodata variable 'targ_pid': object 'globals' is loaded"):
        r.targ_pid = 1
    with pytest.raises(ValueError, match=r"cannot set \.rodata\.config variable 'threshold'"):
        obj.global_data(".rodata.config").threshold = 1
    assert r.targ_pid == 1234


def test_a_struct_takes_a_tuple_or_its_own_numpy_value(obj):
    obj.rodata.cfg = (8080, 1 << 40, b"api")
    cfg = obj.rodata.cfg
    assert (cfg["port"], cfg["mask"], cfg["tag"]) == (8080, 1 << 40, b"api")
    obj.load()
    step(obj)
    seen = obj.bss.seen_cfg
    assert (seen["port"], seen["mask"], seen["tag"]) == (8080, 1 << 40, b"api")
    assert cfg.tobytes() == seen.tobytes()  # padding too: zeroed, as a C initialiser leaves it


def test_bss_counter_is_read_live_after_load(obj):
    obj.bss.runs = 100  # before load: the initial value
    obj.load()
    bss = obj.bss
    assert bss.runs == 100
    step(obj)
    assert bss.runs == 101
    step(obj, 3)
    assert bss.runs == 104  # the same object, the kernel's current value
    bss.runs = 0  # and written live
    step(obj)
    assert bss.runs == 1


def test_data_written_after_load_reaches_the_program(obj):
    obj.data.data_value = 5
    obj.load()
    step(obj)
    assert obj.bss.seen_data_value == 5
    obj.data.data_value = -(2**63)
    obj.data.ratio = 0.125
    obj.data.data_name = "bye"
    step(obj)
    assert obj.bss.seen_data_value == -(2**63)
    assert (obj.data.ratio, obj.data.data_name) == (0.125, b"bye")
    custom = obj.global_data(".data.custom")
    assert custom.custom_counter == 7 + 2 * 5  # step adds threshold (5) each run
    custom.custom_counter = 0
    step(obj)
    assert custom.custom_counter == 5


def test_a_variable_named_like_an_attribute_of_globaldata_is_the_variable(obj):
    d = obj.data
    assert (d.section, d.close) == (3, 4)
    d.section = 5
    assert d.section == 5 and d["section"] == 5 and "section" in dir(d)
    obj.load()
    d.close = 6
    d.read_only = False  # .data: writable after load, whatever its variables are called
    assert (d.close, d.read_only) == (6, False)
    obj.close()  # closes the section's mapping even so


def test_wrong_names_types_and_values_say_what_is_expected(obj):
    r = obj.rodata
    with pytest.raises(AttributeError, match=r"\.rodata of object 'globals' has no variable 'nope' \(it has: cfg, limits"):
        r.nope  # noqa: B018
    with pytest.raises(AttributeError, match="has no variable 'nope'"):
        r.nope = 1
    with pytest.raises(KeyError, match="has no variable 'nope'"):
        r["nope"]  # noqa: B018
    with pytest.raises(ValueError, match=r"'targ_pid' is int32 \(-2147483648 to 2147483647\), got 4294967296"):
        r.targ_pid = 2**32
    with pytest.raises(TypeError, match="'targ_pid' is int32: expected an int, got str"):
        r.targ_pid = "1234"
    with pytest.raises(TypeError, match="expected an int, got float"):
        r.targ_pid = 1.5
    with pytest.raises(ValueError, match="'verbose' is a bool: expected True, False, 0 or 1, got 2"):
        r.verbose = 2
    with pytest.raises(ValueError, match=r"'prefix' is char\[8\]: at most 8 bytes, got 9"):
        r.prefix = b"123456789"
    with pytest.raises(TypeError, match=r"'prefix' is char\[8\]: expected bytes or str, got int"):
        r.prefix = 5
    with pytest.raises(ValueError, match=r"'limits' is an array of shape \(3,\), got shape \(2,\)"):
        r.limits = [1, 2]
    with pytest.raises(ValueError, match="'limits' is an array of uint32"):
        r.limits = [1, 2, -1]
    with pytest.raises(ValueError, match=r"'cfg' has no field 'nope' \(it has: port, mask, tag\)"):
        r.cfg = {"nope": 1}
    with pytest.raises(ValueError, match=r"'cfg' field 'port' is uint16 \(0 to 65535\), got 70000"):
        r.cfg = {"port": 70000}
    with pytest.raises(TypeError, match="'cfg' is a struct: expected a dict of fields, a tuple"):
        r.cfg = 5
    with pytest.raises(ValueError, match="read-only"):
        r.limits[0] = 5  # arrays are snapshots: assign the whole array
    assert r.targ_pid == 0 and r.limits.tolist() == [1, 2, 3] and r.cfg["port"] == 80  # nothing half-written
    with pytest.raises(KeyError, match=r"no global-data section '\.data\.nope' \(it has: \.rodata, \.rodata\.config"):
        obj.global_data(".data.nope")
    with pytest.raises(ValueError, match=r"map '\.rodata' takes an initial value of 56 bytes, got 4"):
        obj.set_initial_value(".rodata", b"\0" * 4)


def test_close_unmaps_and_later_use_is_refused(bpf_object):
    before = bpf_mappings()
    obj = Object(bpf_object("globals"))
    obj.load()
    bss = obj.bss
    step(obj)
    assert bss.runs == 1 and obj.rodata.targ_pid == 0
    assert bpf_mappings() > before
    obj.close()
    assert bpf_mappings() == before
    with pytest.raises(ValueError, match="is closed"):
        bss.runs  # noqa: B018


def test_an_object_dropped_after_using_its_globals_is_freed_at_once(bpf_object):
    before, fds = bpf_mappings(), open_fds()
    gc.disable()  # freed by reference counting alone: the globals make no cycle
    try:
        obj = Object(bpf_object("globals"))
        obj.rodata.targ_pid = 7
        obj.load()
        step(obj)
        assert obj.bss.seen_pid == 7 and obj.data.data_value == -42
        ref = weakref.ref(obj)
        del obj
        assert ref() is None
        assert bpf_mappings() == before and open_fds() == fds
    finally:
        gc.enable()

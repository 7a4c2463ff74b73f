"""Object.struct(): C types from BTF as numpy dtypes, checked against what the kernel wrote."""

from __future__ import annotations

import numpy as np
import pytest

from bpfring import Object


@pytest.fixture
def types_obj(bpf_object):
    with Object(bpf_object("types")) as obj:
        obj.load()
        yield obj


def test_a_struct_read_through_its_dtype_has_every_field_where_c_put_it(types_obj):
    demo = types_obj.struct("demo")
    demos = types_obj.map("demos")
    assert demo.itemsize == demos.value_size  # the kernel's idea of sizeof(struct demo)
    assert types_obj.program("fill").test_run().retval == 0
    d = np.frombuffer(demos.lookup(b"\0\0\0\0"), dtype=demo)[0]
    assert d["comm"] == b"bpfring-types"
    assert d["flag"] == 0xAB and d["pid"] == 123456
    assert d["in"]["a"] == 0xBEEF and d["in"]["b"] == 0x0102030405060708
    assert d["matrix"].tolist() == [[0, -1, -2], [-10, -11, -12]]
    assert d["as_float"] == 1.5 and d["as_int"] == np.float32(1.5).view(np.uint32)  # one union
    assert d["color"] == -3 and d["ok"] == True  # noqa: E712
    assert d["ptr"] == 0xDEADBEEF and d["ratio"] == 0.25
    assert d["raw"].tolist() == [250, 251, 252, 253, 254]


def test_layout_details(types_obj):
    demo = types_obj.struct("demo")
    assert demo.fields["comm"][0] == np.dtype("S16")  # char[N] is bytes
    assert demo.fields["raw"][0] == np.dtype(("u1", (5,)))  # unsigned char[N] stays numbers
    assert demo.fields["pid"][1] == 20  # after 3 bytes of padding
    assert demo.fields["in"][0].fields["b"][1] == 8
    assert demo.fields["matrix"][0].shape == (2, 3)
    assert demo.fields["as_int"][1] == demo.fields["as_float"][1]


def test_unknown_structs_and_bitfields_are_refused_in_words(types_obj):
    with pytest.raises(KeyError, match="declares no struct 'nope' in its BTF"):
        types_obj.struct("nope")
    with pytest.raises(TypeError, match="struct with_bits.low is a bitfield"):
        types_obj.struct("with_bits")


def test_the_exec_tracer_event_from_btf(execsnoop_object):
    with Object(execsnoop_object) as obj:
        event = obj.struct("event")
    assert event.names == ("pid", "comm", "filename")
    assert event == np.dtype([("pid", "<i4"), ("comm", "S16"), ("filename", "S512")])

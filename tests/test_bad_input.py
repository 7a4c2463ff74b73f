"""Bad input and hostile ring contents: a clear exception every time, never a crash, a hang or a
leaked fd. (The cases tests/test_*.py already cover are not repeated here.)"""

from __future__ import annotations

import errno
import mmap
import os
import random
import struct
from typing import Any, Callable

import numpy as np
import pytest
from conftest import as_nobody, fork_call, open_fds

import bpfring
from bpfring import BPFError, Map, MapType, PerfBuffer, RingBuffer, UserRingBuffer, features
from bpfring._sys import bpf as sys_bpf
from bpfring._sys.mounts import BPFFS, ensure_bpffs
from bpfring.maps import PAGE_SIZE

OPENERS: dict[str, Callable[[Any], Any]] = {
    "RingBuffer": lambda source: RingBuffer(source, lambda d: None),
    "PerfBuffer": lambda source: PerfBuffer(source, 1, lambda c, d: None),
    "UserRingBuffer": UserRingBuffer,
    "Map.from_fd": Map.from_fd,
}
PATH_OPENERS = {**{k: v for k, v in OPENERS.items() if k != "Map.from_fd"}, "Map.from_pinned": Map.from_pinned}
RIGHT_TYPE = {
    "RingBuffer": MapType.RINGBUF,
    "PerfBuffer": MapType.PERF_EVENT_ARRAY,
    "UserRingBuffer": MapType.USER_RINGBUF,
}


@pytest.fixture
def pin_dir(bpf):
    ensure_bpffs()
    path = f"{BPFFS}/bpfring-bad-input-{os.getpid()}"
    os.mkdir(path)
    yield path
    for name in os.listdir(path):
        (os.rmdir if os.path.isdir(f"{path}/{name}") else os.unlink)(f"{path}/{name}")
    os.rmdir(path)


def a_program() -> int:
    """A loaded BPF program's fd: a BPF object, but not a map (socket filter "r0 = 0; exit")."""
    return sys_bpf.prog_load(1, bytes.fromhex("b700000000000000") + bytes.fromhex("9500000000000000"))


def create(kind: MapType, name: str = "m") -> Map:
    if kind == MapType.PERF_EVENT_ARRAY:
        return Map.create(kind, 64, 4, 4, name=name)
    if kind in (MapType.RINGBUF, MapType.USER_RINGBUF):
        return Map.create(kind, 4096, name=name)
    return Map.create(kind, 1, 4, 4, name=name)


# -- what is opened ----------------------------------------------------------------------------------


@pytest.mark.parametrize("opener", OPENERS)
def test_a_closed_fd_is_refused_by_name(bpf, opener):
    with Map.create(MapType.RINGBUF, 4096) as m:
        fd = os.dup2(m.fd, max(open_fds()) + 100)  # a number nothing else will take meanwhile
    os.close(fd)  # was a ring buffer map, is closed now
    before = open_fds()
    with pytest.raises(BPFError, match=f"fd {fd} is not an open file descriptor") as info:
        OPENERS[opener](fd)
    assert info.value.errno == errno.EBADF
    assert open_fds() == before


@pytest.mark.parametrize("opener", OPENERS)
def test_fds_that_are_not_bpf_maps_are_refused_by_what_they_are(bpf, opener):
    r, w = os.pipe()
    prog = a_program()
    before = open_fds()
    try:
        with pytest.raises(BPFError, match=r"is not a BPF map \(it is pipe:"):
            OPENERS[opener](r)
        with pytest.raises(BPFError, match=r"is not a BPF map \(it is anon_inode:bpf-prog\)"):
            OPENERS[opener](prog)
        assert open_fds() == before
    finally:
        for fd in (r, w, prog):
            os.close(fd)


KINDS = [MapType.ARRAY, MapType.HASH, MapType.RINGBUF, MapType.USER_RINGBUF, MapType.PERF_EVENT_ARRAY]


@pytest.mark.parametrize(
    "opener, kind",
    [(o, k) for o in RIGHT_TYPE for k in KINDS if k != RIGHT_TYPE[o]],
    ids=lambda v: getattr(v, "name", v),
)
def test_every_wrong_map_type_is_refused_by_name(bpf, opener, kind):
    with create(kind, "wrong") as m:
        before = open_fds()
        want = f"map 'wrong' .* is BPF_MAP_TYPE_{kind.name}, expected BPF_MAP_TYPE_{RIGHT_TYPE[opener].name}"
        with pytest.raises(ValueError, match=want):
            OPENERS[opener](m)
        with pytest.raises(ValueError, match=want):
            OPENERS[opener](m.fd)
        assert open_fds() == before


@pytest.mark.parametrize("opener", PATH_OPENERS)
def test_pinned_paths_that_are_missing_or_not_maps_say_so(pin_dir, tmp_path, opener):
    open_it = PATH_OPENERS[opener]
    prog = a_program()
    try:
        sys_bpf.obj_pin(prog, f"{pin_dir}/prog")
    finally:
        os.close(prog)
    os.mkdir(f"{pin_dir}/dir")
    plain = tmp_path / "plain"
    plain.write_text("x")
    before = open_fds()
    with pytest.raises(bpfring.BPFNotFoundError, match=f"{pin_dir}/missing"):
        open_it(f"{pin_dir}/missing")
    with pytest.raises(BPFError, match=r"is not a BPF map \(it is anon_inode:bpf-prog\)"):
        open_it(f"{pin_dir}/prog")
    with pytest.raises(BPFError, match=f"{pin_dir}/dir"):
        open_it(f"{pin_dir}/dir")
    with pytest.raises(BPFError, match="is not a BPF object pinned on bpffs"):
        open_it(str(plain))
    assert open_fds() == before


@pytest.mark.parametrize("opener", RIGHT_TYPE)
@pytest.mark.parametrize("source", [3.5, True, b"/sys/fs/bpf/x", [3]])
def test_sources_of_the_wrong_python_type_are_refused(bpf, opener, source):
    with pytest.raises(TypeError, match="expected a Map, an fd or a pinned path"):
        OPENERS[opener](source)


# -- sizes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, -4096, 4095, 4096 * 3, 4096 + 1, (1 << 33) + 4096])
@pytest.mark.parametrize("kind", [MapType.RINGBUF, MapType.USER_RINGBUF])
def test_ring_maps_refuse_sizes_that_are_not_page_multiple_powers_of_two(bpf, kind, size):
    before = open_fds()
    with pytest.raises(ValueError, match=f"power of two and a multiple of the page size .*got {size}"):
        Map.create(kind, size)
    assert open_fds() == before


@pytest.mark.parametrize("size", [1 << 32, 1 << 33])
@pytest.mark.parametrize("kind", [MapType.RINGBUF, MapType.USER_RINGBUF])
def test_ring_sizes_past_a_u32_are_refused_before_the_kernel_sees_them(bpf, kind, size):
    before = open_fds()
    with pytest.raises(ValueError, match=f"max_entries must be from 0 to 4294967295 .*got {size}"):
        Map.create(kind, size)  # a power of two and a page multiple, but max_entries is a u32
    assert open_fds() == before


def test_ring_maps_refuse_key_and_value_sizes(bpf):
    with pytest.raises(ValueError, match="BPF_MAP_TYPE_USER_RINGBUF takes key_size=0 and value_size=0"):
        Map.create(MapType.USER_RINGBUF, 4096, key_size=4)


@pytest.mark.parametrize(
    "size, error, message",
    [
        (1 << 31, ValueError, "sample size must be 1 to 4088 bytes in this 4096-byte ring, got 2147483648"),
        (1 << 30, ValueError, "got 1073741824"),
        (1 << 64, ValueError, "got 18446744073709551616"),
        (-(1 << 64), ValueError, "got -18446744073709551616"),
        (True, TypeError, "sample size must be an int, got bool"),
        ("8", TypeError, "sample size must be an int, got str"),
        (None, TypeError, "sample size must be an int, got NoneType"),
    ],
)
def test_user_ring_sample_sizes_out_of_range_or_type_are_refused_before_touching_the_ring(bpf, size, error, message):
    with Map.create(MapType.USER_RINGBUF, 4096) as m, UserRingBuffer(m) as urb:
        with pytest.raises(error, match=message):
            urb.reserve(size)
        with pytest.raises(error, match=message):
            urb.reserve_blocking(size, 10_000)  # at once, not after a wait
        assert urb.producer_pos == 0 and urb.avail_space == 4096


def test_user_ring_sizes_that_fit_exactly_still_work(bpf):
    with Map.create(MapType.USER_RINGBUF, 4096) as m, UserRingBuffer(m) as urb:
        urb.reserve(4088).discard()  # the largest: 4088 + 8-byte header == the ring
        assert urb.avail_space == 4096 - 4096


# -- dtypes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [object, np.dtype([("pid", "<i4"), ("obj", "O")]), np.dtype(("O", 2))])
def test_dtypes_holding_python_objects_are_refused_not_filled_with_ring_bytes(producer, dtype):
    """Ring bytes copied into an object array would be taken for pointers: a crash, not an error."""
    with RingBuffer(producer.ring, lambda d: None) as rb:
        producer.produce(3, np.dtype(dtype).itemsize)
        with pytest.raises(TypeError, match="holds Python objects"):
            rb.consume_batch(dtype)
        with pytest.raises(TypeError, match="holds Python objects"):
            rb.consume_batch(dtype, out=np.empty(3, dtype=dtype))
        with pytest.raises(TypeError, match="holds Python objects"):
            with rb.batch(dtype):
                pass
        assert rb.consume() == 3  # nothing was taken


def test_dtypes_that_do_not_fit_the_records_raise_and_leave_them(producer):
    with RingBuffer(producer.ring, lambda d: None) as rb:
        producer.produce(2, 24)
        for dtype in ("<u4", np.dtype((np.void, 1 << 20))):
            with pytest.raises(bpfring.RecordSizeError, match="is 24 bytes, dtype .* expects"):
                rb.consume_batch(dtype)
        with pytest.raises(ValueError, match=r"dtype \[\] has no size"):
            rb.consume_batch(np.dtype([]))
        with pytest.raises(TypeError):
            rb.consume_batch("not a dtype")
        assert rb.consume() == 2


# -- privileges ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opener", PATH_OPENERS)
def test_opening_a_pin_without_privileges_says_root_is_needed(pin_dir, opener):
    kind = RIGHT_TYPE.get(opener, MapType.RINGBUF)
    with create(kind) as m:
        path = f"{pin_dir}/{opener.replace('.', '_')}"  # bpffs names take no dots
        m.pin(path)  # mode 0600, owned by root: bpffs permissions are the access control
        os.chmod(pin_dir, 0o755)
        said = fork_call(as_nobody(lambda: PATH_OPENERS[opener](path)))
    # bpffs refuses by the file's mode (EACCES); before 5.19, kernel.unprivileged_bpf_disabled
    # refused every bpf() call to an unprivileged process first (EPERM; Debian 11's 5.10 sets it).
    refused = errno.EPERM if every_bpf_call_refused_unprivileged() else errno.EACCES
    assert said.startswith(f"BPFPermissionError: [Errno {refused}] BPF_OBJ_GET"), said
    assert "needs root, or CAP_BPF" in said


def every_bpf_call_refused_unprivileged() -> bool:
    with open("/proc/sys/kernel/unprivileged_bpf_disabled") as f:
        return features.kernel_version() < (5, 19) and int(f.read()) != 0


def test_a_perf_buffer_without_privileges_says_root_is_needed_even_with_the_map(perf_producer):
    """An unprivileged process may hold the array (an fd passed to it), but per-CPU perf events need
    CAP_PERFMON (kernel.perf_event_paranoid)."""
    said = fork_call(as_nobody(lambda: PerfBuffer(perf_producer.array.fd, 1, lambda c, d: None)))
    assert said.startswith("BPFPermissionError: [Errno 13] perf_event_open of a BPF output event on cpu"), said
    assert "needs root, or CAP_BPF with CAP_PERFMON" in said


@pytest.mark.parametrize("opener", ["RingBuffer", "UserRingBuffer"])
def test_ring_buffers_open_without_privileges_when_the_map_is_handed_over(producer, opener):
    """Not an error: a map fd (or a pin the user may read) is the capability; the kernel lets an
    unprivileged process consume or produce through it."""
    kind = RIGHT_TYPE[opener]
    with create(kind) as m:
        said = fork_call(as_nobody(lambda: OPENERS[opener](m.fd).close()))
    assert said == "ok: None"


def test_loading_an_object_without_privileges_says_root_is_needed(bpf_object):
    import shutil
    import tempfile

    readable = tempfile.mkdtemp(prefix="bpfring-nobody-")  # in /tmp, reachable by anyone
    os.chmod(readable, 0o755)
    path = shutil.copy(bpf_object("producer"), f"{readable}/producer.bpf.o")
    os.chmod(path, 0o644)

    def load() -> None:
        with bpfring.Object(path) as obj:
            obj.load()

    try:
        said = fork_call(as_nobody(load))
    finally:
        shutil.rmtree(readable)
    assert said.startswith("BPFPermissionError: [Errno 1] loading BPF object"), said
    assert "needs root, or CAP_BPF" in said


# -- hostile ring contents ------------------------------------------------------------------------------------


def plant_header(producer: Any, rb: RingBuffer, length: int, laps_behind: int) -> int:
    """Make the ring walk read ``length`` as a record header, the way a process sharing the map fd
    can: a BPF-written record whose payload holds that value everywhere, and consumer_pos (the one
    user-writable word of a RINGBUF map) moved onto the payload, ``laps_behind`` ring sizes back.
    The kernel producer cannot write a bad header itself (the verifier sees to it).
    Returns the consumer_pos planted."""
    ring = rb.rings[0]
    while ring.producer_pos < (laps_behind + 2) * ring.size:  # lap the ring so positions can go back
        producer.produce(3, 1000)
        rb.consume()
    producer.obj.map("pattern").update(b"\0\0\0\0", struct.pack("<I", length) * ((8192 + 256) // 4))
    producer._next_seq[0] = 0  # record 0 copies the pattern from its offset 0: words stay aligned
    at = ring.producer_pos
    producer.produce(1, 200)
    hostile = at + 8 + 16 - laps_behind * ring.size  # the first payload word after header and seq header
    with mmap.mmap(ring.map_fd, PAGE_SIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE) as consumer_page:
        consumer_page[:8] = struct.pack("<Q", hostile)
    assert ring.consumer_pos == hostile
    return hostile


def test_a_header_planted_in_a_record_is_read_back_as_planted(make_producer):
    """The planting itself works: at a sane length, a consumer opened on the planted ring delivers
    what the header claims. The consumer that was reading when consumer_pos moved refuses."""
    producer = make_producer(ring_size=4096)
    got: list[bytes] = []
    with RingBuffer(producer.ring, got.append) as rb:
        pos = plant_header(producer, rb, 16, 0)
        with pytest.raises(bpfring.RingCorruptError, match=f"consumer_pos is {pos}, this consumer left it at .*another process"):
            rb.consume()
    got.clear()
    with RingBuffer(producer.ring, got.append) as rb:
        rb.consume(max_records=1)
        assert got == [struct.pack("<I", 16) * 4] and rb.rings[0].consumer_pos == pos + 24


@pytest.mark.parametrize(
    "length, laps_behind",
    [(0x3FF00000, 0), (3000, 0), (64 * 1024, 40), (0x3FFFFFF0, 0)],
    ids=["past-producer_pos", "just-past-producer_pos", "bigger-than-the-ring", "max-length"],
)
def test_a_header_pointing_past_the_ring_raises_ebadmsg(make_producer, length, laps_behind):
    """A consumer opened on a ring whose consumer_pos was moved onto a planted header (or whole
    laps back) refuses to read it, names what it found, and moves nothing."""
    producer = make_producer(ring_size=4096)
    with RingBuffer(producer.ring, lambda d: None) as rb:
        pos = plant_header(producer, rb, length, laps_behind)
    got: list[bytes] = []
    with RingBuffer(producer.ring, got.append) as rb:
        with pytest.raises(bpfring.RingCorruptError) as info:
            rb.consume()
        assert info.value.errno == errno.EBADMSG and info.value.ring == 0
        assert info.value.map_id == rb.rings[0].map.id and info.value.values["consumer_pos"] == pos
        if laps_behind:
            assert f"the whole {rb.rings[0].size}-byte ring or more" in str(info.value)
        else:
            assert f"record at {pos} claims {length} bytes" in str(info.value)
        assert got == [] and rb.rings[0].consumer_pos == pos  # nothing read, nothing moved
        assert rb.poll(0) == 0  # out of the epoll until resync(): a poll() loop does not spin on it
        with pytest.raises(bpfring.RingCorruptError):
            rb.consume()  # still refused, not skipped


def _fits(length: int) -> np.dtype:
    """A dtype of exactly the planted length: the size check passes, only the bounds check is left."""
    return np.dtype([("payload", "u1", (length,))])


# A header bigger than the 4 KiB ring: 6000 bytes (its view would still fit in the double
# mapping) and 64 KiB (it would not). (A consumer_pos laps behind is refused before any header is
# read: tests above.)
OVERSIZE = pytest.mark.parametrize("length", [6000, 64 * 1024], ids=["6000", "64KiB"])


def planted_ring(make_producer: Any, length: int) -> tuple[Any, int]:
    producer = make_producer(ring_size=4096)
    with RingBuffer(producer.ring, lambda d: None) as rb:
        return producer, plant_header(producer, rb, length, 0)


@OVERSIZE
def test_batches_over_a_hostile_header_raise_instead_of_reading_it(make_producer, length):
    fits = _fits(length)
    producer, pos = planted_ring(make_producer, length)
    with RingBuffer(producer.ring) as rb:  # a consumer opened on the planted ring
        takes = {
            "consume_batch(dtype)": lambda: rb.consume_batch(fits),
            "consume_batch(dtype, out=)": lambda: rb.consume_batch(fits, out=np.zeros(4, fits)),
            "consume_batch()": rb.consume_batch,
        }
        for name, take in takes.items():
            with pytest.raises(BPFError) as info:
                take()
            assert info.value.errno == errno.EBADMSG, (name, info.value)
            assert f"{length} bytes" in str(info.value), (name, info.value)
            assert rb.rings[0].consumer_pos == pos, f"{name} moved consumer_pos"


@OVERSIZE
def test_a_zero_copy_batch_over_a_hostile_header_raises_instead_of_viewing_it(make_producer, length):
    producer, pos = planted_ring(make_producer, length)
    with RingBuffer(producer.ring) as rb:
        try:
            with pytest.raises(BPFError) as info:
                with rb.batch(_fits(length)):
                    pass
            assert info.value.errno == errno.EBADMSG and f"{length} bytes" in str(info.value)
        finally:
            assert rb.rings[0].consumer_pos == pos, "batch() moved consumer_pos"


def test_user_ring_buffer_headers_are_always_accepted_by_the_kernel(bpf_object):
    """Random sizes (1 byte to the largest), submitted or discarded, in and out of order, over many
    laps: the kernel's drain never refuses a header bpfring wrote, takes exactly the submitted
    records and reads back each one's bytes, in ring order."""
    from user_drain import UserDrain, payload

    rng = random.Random(9)
    seq = 0
    with UserDrain(bpf_object("user_drain"), urb_size=4096) as d, UserRingBuffer(d.urb) as urb:
        drained = discarded = 0
        while urb.consumer_pos < 200 * urb.size:
            samples = []
            while True:
                size = rng.choice([1, 7, 8, 9, rng.randint(1, 4088), 4088])
                try:
                    sample = urb.reserve(size)
                except bpfring.RingFullError:
                    break
                sample.buf[:] = payload(seq, size)
                samples.append((sample, payload(seq, size)))
                seq += 1
            submitted = []
            for sample, data in rng.sample(samples, len(samples)):
                if rng.random() < 0.8:
                    sample.submit()
                    submitted.append(sample)
                else:
                    sample.discard()
            kept = {id(sample) for sample in submitted}
            expected = [data for sample, data in samples if id(sample) in kept]  # ring (reserve) order
            result = d.drain()
            assert result.ret >= 0, f"the kernel refused a header bpfring wrote: {result.ret}"
            assert result.ret == len(expected), f"the kernel took {result.ret} records, {len(expected)} were submitted"
            assert (result.dropped, result.oversize) == (0, 0)
            assert result.records == expected, "the kernel read back other bytes than bpfring wrote"
            drained += result.ret
            discarded += len(samples) - len(expected)
        assert drained > 200 and discarded > 0


@pytest.mark.parametrize(
    "header, advance, ret",
    [
        (5000, 8, -errno.EINVAL),  # a length past producer_pos
        (8, 12, -errno.EINVAL),  # producer_pos not a multiple of 8
        (4096, 2 * 4096, -errno.E2BIG),  # bigger than the ring, producer_pos claiming it all
        (0x3FFFFFFF, 2 * 4096, -errno.EINVAL),  # the largest length the flag bits leave
    ],
    ids=["past-producer_pos", "misaligned-producer_pos", "bigger-than-the-ring", "max-length"],
)
def test_a_hostile_header_in_a_user_ring_makes_the_drain_fail_cleanly(bpf_object, header, advance, ret):
    """A user ring's producer page and data are user-writable: a header written there by hand (not
    through UserRingBuffer) is the kernel's to reject, in __bpf_user_ringbuf_peek()."""
    from user_drain import UserDrain

    with UserDrain(bpf_object("user_drain"), urb_size=4096) as d:
        with mmap.mmap(d.urb.fd, PAGE_SIZE + 2 * 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=PAGE_SIZE) as mm:
            mm[PAGE_SIZE : PAGE_SIZE + 8] = struct.pack("<II", header, 0)
            mm[:8] = struct.pack("<Q", advance)  # producer_pos
            for _ in range(3):  # and it stays refused, nothing consumed
                result = d.drain()
                assert (result.ret, result.drained, result.records) == (ret, 0, [])

"""The command line, run for real: the seed's exec tracer, tail and maps, end to end.

Each command runs as ``python -m bpfring`` against the installed package; execs are of copies
of /bin/true with names no other process has, so a filter on that name sees only the test's.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import mmap
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import threading
import uuid

import pytest
from conftest import as_nobody, fork_call

import bpfring
from bpfring import cli

# Not a timing assertion: a guard so a command that never prints what we wait for ends the test
# with a failure instead of hanging it.
WATCHDOG_S = 120

EVENT_RECORD_SZ = 544  # struct event (532 bytes) + the 8-byte ring header, rounded up to 8


class Running:
    """``python -m bpfring ARGS`` in the background, started once it says ``ready`` on stderr."""

    def __init__(self, *args: str, ready: str = "tracing exec()") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bpfring", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.watchdog = threading.Timer(WATCHDOG_S, self.proc.kill)
        self.watchdog.daemon = True
        self.watchdog.start()
        line = self.proc.stderr.readline()
        if ready not in line:
            self.proc.kill()
            raise AssertionError(line + self.proc.stderr.read())
        self.lines: list[str] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read_until(self, pattern: str) -> str:
        """The next stdout line containing ``pattern``; the lines before it are kept in ``lines``."""
        while line := self.proc.stdout.readline():
            self.lines.append(line)
            if pattern in line:
                return line
        raise AssertionError(f"{pattern!r} never printed; stderr: {self.proc.stderr.read()}")

    def finish(self, signum: int | None = signal.SIGINT) -> tuple[str, str]:
        """Signal it (or let it end by itself), then (the rest of stdout, stderr)."""
        if signum is not None:
            self.proc.send_signal(signum)
        out = self.proc.stdout.read()
        err = self.proc.stderr.read()
        self.proc.wait()
        self.watchdog.cancel()
        return out, err

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode


def bpfring_cmd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bpfring", *args], capture_output=True, text=True, timeout=WATCHDOG_S)


@pytest.fixture
def make_program(bpf, tmp_path):
    """``make_program()``: a copy of /bin/true with a name no other process has."""

    def make():
        path = tmp_path / f"bpfr-{uuid.uuid4().hex[:8]}"
        shutil.copy("/bin/true", path)
        return path

    return make


@pytest.fixture
def unique_program(make_program):
    return make_program()


def run_program(path) -> int:
    """Exec ``path`` in a child, wait for it, return its pid."""
    child = subprocess.Popen([str(path)])
    assert child.wait() == 0
    return child.pid


def summary(err: str) -> tuple[int, int]:
    found = re.search(r"^(\d+) events seen, (\d+) dropped(?:, \d+ reported lost by the kernel)?$", err, re.M)
    assert found, err
    return int(found[1]), int(found[2])


def wait_stopped(pid: int) -> None:
    """Until the kernel has stopped ``pid`` (kill() returns before the signal is acted on)."""
    while True:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return


# -- execsnoop --------------------------------------------------------------------------------------


# The tests that assert nothing was dropped trace every exec() of a shared machine: a burst elsewhere
# could fill the default ring (32 KB a CPU for the perf buffer, about 60 events) while the tracer
# waits for a core. 4 MiB leaves room for thousands.
ROOMY = ("--ring-size", str(4 << 20))


@pytest.mark.parametrize("via", ["ringbuf-reserve", "ringbuf-output", "perfbuf"])
def test_execsnoop_prints_the_seed_columns_for_an_exec(unique_program, via):
    tracer = Running("execsnoop", "--via", via, *ROOMY)
    try:
        pid = run_program(unique_program)
        line = tracer.read_until(unique_program.name)
    finally:
        _, err = tracer.finish()
    assert tracer.lines[0].split() == ["TIME", "EVENT", "PID", "COMM", "FILENAME"]
    fields = line.split()
    assert re.fullmatch(r"\d\d:\d\d:\d\d", fields[0])
    assert fields[1:] == ["EXEC", str(pid), unique_program.name, str(unique_program)]
    assert line == f"{fields[0]:<8} {'EXEC':<5} {pid:<7} {unique_program.name:<16} {unique_program}\n"
    assert tracer.returncode == 130
    assert summary(err)[1] == 0


@pytest.mark.parametrize("via", ["ringbuf-reserve", "ringbuf-output", "perfbuf"])
def test_execsnoop_json_and_duration(unique_program, via):
    tracer = Running("execsnoop", "--via", via, "--json", "--duration", "3", *ROOMY)
    pid = run_program(unique_program)
    out, err = tracer.finish(None)  # it ends by itself
    assert tracer.returncode == 0
    records = [json.loads(line) for line in out.splitlines()]
    mine = [r for r in records if r["pid"] == pid]
    assert mine == [
        {"time": mine[0]["time"], "event": "EXEC", "pid": pid, "comm": unique_program.name, "filename": str(unique_program)}
    ]
    assert summary(err) == (len(records), 0)


@pytest.mark.parametrize("via", ["ringbuf-reserve", "ringbuf-output", "perfbuf"])
def test_execsnoop_pid_filter_prints_only_that_process(make_program, via):
    wanted, other = make_program(), make_program()
    # a shell that waits, then execs `wanted` as itself: its pid is known before the exec
    shell = subprocess.Popen(["sh", "-c", f"read x && exec {shlex.quote(str(wanted))}"], stdin=subprocess.PIPE)
    tracer = Running("execsnoop", "--via", via, "--pid", str(shell.pid))
    try:
        run_program(other)  # another process: filtered in the BPF program
        shell.communicate(b"go\n")
        line = tracer.read_until(wanted.name)
    finally:
        out, err = tracer.finish()
    assert shell.returncode == 0
    assert line.split()[2:] == [str(shell.pid), wanted.name, str(wanted)]
    # the other exec came first: had it passed the filter, it would be printed before
    assert other.name not in "".join(tracer.lines) + out
    assert summary(err) == (1, 0)


@pytest.mark.parametrize("via", ["ringbuf-reserve", "ringbuf-output", "perfbuf"])
def test_execsnoop_comm_filter_prints_only_that_command(make_program, via):
    wanted, other = make_program(), make_program()
    tracer = Running("execsnoop", "--via", via, "--comm", wanted.name, "--json")
    try:
        run_program(other)
        pid = run_program(wanted)
        line = tracer.read_until(wanted.name)
    finally:
        out, err = tracer.finish()
    assert json.loads(line) == {
        "time": json.loads(line)["time"], "event": "EXEC", "pid": pid, "comm": wanted.name, "filename": str(wanted)
    }
    assert tracer.lines == [line] and out == ""
    assert summary(err) == (1, 0)


@pytest.mark.parametrize(
    "via, wakeup",
    [
        ("ringbuf-reserve", "every:1000"),
        ("ringbuf-output", "every:1000"),
        ("ringbuf-reserve", "every:2"),
        ("perfbuf", "every:1000"),  # wakeup_events=1000
    ],
)
def test_execsnoop_wakeup_every_n_still_delivers_every_event(make_program, via, wakeup):
    """Fewer than N pending records never wake the consumer: the poll-timeout drain prints them."""
    program = make_program()
    tracer = Running("execsnoop", "--via", via, "--wakeup", wakeup, "--comm", program.name)
    try:
        pids = [run_program(program) for _ in range(3)]
        printed = [int(tracer.read_until(program.name).split()[2]) for _ in pids]
        # a perf buffer keeps order per CPU only: execs on two CPUs may print in either order
        assert (printed if via != "perfbuf" else sorted(printed)) == pids
    finally:
        _, err = tracer.finish()
    assert summary(err) == (3, 0)


@pytest.mark.parametrize("via", ["ringbuf-reserve", "ringbuf-output"])
def test_execsnoop_counts_what_a_tiny_ring_drops(unique_program, via):
    """A 4096-byte ring holds 7 events of 544 bytes: with the tracer stopped, 50 execs drop 43."""
    tracer = Running("execsnoop", "--via", via, "--ring-size", "4096", "--comm", unique_program.name)
    try:
        os.kill(tracer.pid, signal.SIGSTOP)
        wait_stopped(tracer.pid)
        for _ in range(50):
            run_program(unique_program)
        os.kill(tracer.pid, signal.SIGCONT)
        for _ in range(4096 // EVENT_RECORD_SZ):
            tracer.read_until(unique_program.name)
    finally:
        out, err = tracer.finish()
    seen, dropped = summary(err)
    assert (seen, dropped) == (7, 43)
    assert seen + dropped == 50  # every exec the BPF program saw (the --comm filter admits only ours)
    assert out == ""


def test_execsnoop_perfbuf_counts_what_a_one_page_buffer_drops(unique_program):
    """One page per CPU holds 7 samples of 544 bytes: with the tracer stopped, 50 execs on CPU 0 drop 43."""
    tracer = Running("execsnoop", "--via", "perfbuf", "--ring-size", "4096", "--comm", unique_program.name)
    try:
        os.kill(tracer.pid, signal.SIGSTOP)
        wait_stopped(tracer.pid)
        for _ in range(50):
            child = subprocess.Popen([str(unique_program)], preexec_fn=lambda: os.sched_setaffinity(0, {0}))
            assert child.wait() == 0
        os.kill(tracer.pid, signal.SIGCONT)
        for _ in range(7):
            tracer.read_until(unique_program.name)
    finally:
        out, err = tracer.finish()
    assert summary(err) == (7, 43)
    assert out == ""


def test_execsnoop_sigterm_ends_with_the_summary(unique_program):
    tracer = Running("execsnoop", "--comm", unique_program.name)
    run_program(unique_program)
    tracer.read_until(unique_program.name)
    _, err = tracer.finish(signal.SIGTERM)
    assert tracer.returncode == 143
    assert summary(err) == (1, 0)


# -- tail -------------------------------------------------------------------------------------------


@pytest.fixture
def pin_path(bpf):
    """A fresh path on bpffs, unpinned after the test."""
    path = f"/sys/fs/bpf/bpfring-test-{uuid.uuid4().hex[:8]}"
    yield path
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@pytest.fixture
def pinned_producer(producer, pin_path):
    """tests/producer.py's ring, pinned: its records are 24 bytes, (seq, producer 0, size 24) + 8 pattern bytes."""
    producer.ring.pin(pin_path)
    return producer, pin_path


def produce(producer, count: int, **kwargs) -> list[bytes]:
    from producer import expected_record

    done = producer.produce(count, 24, **kwargs)
    assert done.produced == count
    return [expected_record(seq, 0, 24) for seq in range(done.first_seq, done.first_seq + count)]


def ring_pending(m: bpfring.Map) -> int:
    with bpfring.RingBuffer(m, lambda data: None) as rb:
        return rb.rings[0].avail_data_size


def test_tail_prints_a_pinned_ring_as_hex(pinned_producer):
    producer, path = pinned_producer
    records = produce(producer, 5)
    done = bpfring_cmd("tail", path, "--count", "5")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"24 {r.hex()}" for r in records]
    assert done.stderr.splitlines()[-1] == "5 records printed"
    assert ring_pending(producer.ring) == 0


def test_tail_a_pinned_perf_event_array(perf_producer, pin_path):
    from producer import expected_record

    perf_producer.array.pin(pin_path)
    tail = Running("tail", pin_path, "--count", "4", ready="tailing perf event array")
    perf_producer.output(4, 20, cpu=0)
    out, err = tail.finish(None)
    assert tail.returncode == 0, err
    assert out.splitlines() == [f"20 {expected_record(seq, 0, 20).hex()}" for seq in range(4)]
    assert err.splitlines()[-1] == "4 records printed"
    after = perf_producer.output(1, 20, cpu=0)  # tail cleared the CPU slots it set on exit
    assert (after.produced, after.last_err) == (0, -errno.ENOENT)


def test_tail_decodes_a_c_struct_from_btf(producer, pin_path, execsnoop_object):
    from producer import expected_record

    producer.ring.pin(pin_path)
    assert producer.produce(2, 532).produced == 2  # the size of execsnoop's struct event
    done = bpfring_cmd(
        "tail", pin_path, "--object", str(execsnoop_object), "--struct", "event", "--json", "--count", "2"
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    cstr = lambda b: b.split(b"\0", 1)[0].decode(errors="backslashreplace")  # noqa: E731
    for seq, line in enumerate(lines):
        pid, comm, filename = struct.unpack("<i16s512s", expected_record(seq, 0, 532))
        assert json.loads(line) == {"len": 532, "values": [pid, cstr(comm), cstr(filename)]}
    done = bpfring_cmd("tail", pin_path, "--struct", "event")
    assert error_line(done) == "bpfring: error: --struct needs --object FILE.bpf.o, the BPF object whose BTF declares it"


def test_tail_by_id_with_format_takes_only_count_records(pinned_producer):
    producer, _ = pinned_producer
    produce(producer, 5)
    done = bpfring_cmd("tail", str(producer.ring.id), "--count", "2", "--format", "<QII")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["0 0 24", "1 0 24"]
    assert ring_pending(producer.ring) == 3 * 32  # the other three stay for the ring's consumer
    done = bpfring_cmd("tail", str(producer.ring.id), "--json", "--format", "<QI4s", "--duration", "1")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == [
        {"len": 24, "values": [seq, 0, "\x18"]} for seq in (2, 3, 4)
    ]
    assert done.stderr.splitlines()[-1] == "3 records printed"


def test_tail_format_as_a_numpy_dtype(pinned_producer):
    producer, path = pinned_producer
    produce(producer, 2)
    done = bpfring_cmd("tail", path, "--count", "2", "--json", "--format", "u8,u4,u4,S8")
    assert done.returncode == 0, done.stderr
    values = [json.loads(line)["values"] for line in done.stdout.splitlines()]
    assert [v[:3] for v in values] == [[0, 0, 24], [1, 0, 24]]


def test_tail_json_hex_and_short_records(pinned_producer):
    producer, path = pinned_producer
    records = produce(producer, 2)
    done = bpfring_cmd("tail", path, "--json", "--count", "2")
    assert [json.loads(line) for line in done.stdout.splitlines()] == [{"len": 24, "hex": r.hex()} for r in records]
    records = produce(producer, 1)
    done = bpfring_cmd("tail", path, "--format", "<QQQQ", "--count", "1")  # 32 bytes: longer than the record
    assert done.returncode == 0
    assert done.stdout == f"24 {records[0].hex()}\n"
    assert done.stderr.splitlines()[-1] == "1 records printed (1 shorter than --format's 32 bytes, shown as hex)"


@pytest.mark.parametrize("flags, signum, code", [(0, signal.SIGINT, 130), (bpfring.BPF_RB_NO_WAKEUP, signal.SIGTERM, 143)])
def test_tail_follows_live_records_until_stopped(pinned_producer, flags, signum, code):
    producer, path = pinned_producer
    tail = Running("tail", path, ready="tailing ring")
    try:
        records = produce(producer, 3, flags=flags)  # NO_WAKEUP records arrive by the poll-timeout drain
        for r in records:
            assert tail.read_until(r.hex()) == f"24 {r.hex()}\n"
    finally:
        out, err = tail.finish(signum)
    assert tail.returncode == code
    assert out == ""
    assert err.splitlines()[-1] == "3 records printed"


def test_tail_duration_on_a_quiet_ring(pinned_producer):
    _, path = pinned_producer
    done = bpfring_cmd("tail", path, "--duration", "0.5")
    assert done.returncode == 0
    assert done.stdout == ""
    assert "tailing ring 'rb'" in done.stderr and done.stderr.splitlines()[-1] == "0 records printed"


# -- maps -------------------------------------------------------------------------------------------


def test_maps_lists_rings_with_their_pending_bytes(pinned_producer):
    producer, _ = pinned_producer
    produce(producer, 5)
    ncpu = os.cpu_count()
    with bpfring.Map.create(bpfring.MapType.PERF_EVENT_ARRAY, ncpu, 4, 4, name="bpfr_perf") as perf, \
         bpfring.Map.create(bpfring.MapType.USER_RINGBUF, 8192, name="bpfr_user") as user, \
         bpfring.Map.create(bpfring.MapType.HASH, 4, 4, 4, name="bpfr_hash") as hash_map:
        done = bpfring_cmd("maps", "--json")
        text = bpfring_cmd("maps")
    assert done.returncode == 0 and text.returncode == 0, done.stderr + text.stderr
    rows = {row["id"]: row for row in map(json.loads, done.stdout.splitlines())}
    assert rows[producer.ring.id] == {
        "id": producer.ring.id, "name": "rb", "type": "ringbuf", "size": 65536, "unit": "bytes", "pending": 5 * 32,
        "corrupt": None,
    }
    assert rows[perf.id] == {
        "id": perf.id, "name": "bpfr_perf", "type": "perf_event_array", "size": ncpu, "unit": "cpus", "pending": None,
        "corrupt": None,
    }
    assert rows[user.id] == {
        "id": user.id, "name": "bpfr_user", "type": "user_ringbuf", "size": 8192, "unit": "bytes", "pending": 0,
        "corrupt": None,
    }
    assert hash_map.id not in rows
    assert {row["type"] for row in rows.values()} <= {"ringbuf", "user_ringbuf", "perf_event_array"}
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["ID", "TYPE", "NAME", "SIZE", "PENDING"]
    assert f"{producer.ring.id} ringbuf rb 65536 160" in [" ".join(line.split()) for line in lines]
    assert f"{perf.id} perf_event_array bpfr_perf {ncpu} cpus -" in [" ".join(line.split()) for line in lines]


# -- help, usage and errors -------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["execsnoop"], ["tail"], ["maps"]])
def test_help_on_every_command_has_examples(command):
    done = bpfring_cmd(*command, "--help")
    assert done.returncode == 0
    assert "examples:" in done.stdout


def test_help_says_what_each_command_promises():
    assert "TIME EVENT PID COMM FILENAME" in bpfring_cmd("execsnoop", "--help").stdout
    tail_help = " ".join(bpfring_cmd("tail", "--help").stdout.split())
    assert "tail TAKES the records: a ring has a single consumer position" in tail_help
    assert "A perf event array is read by putting tail's own perf events in the array's CPU slots" in tail_help


@pytest.mark.parametrize(
    "args, message",
    [
        (["execsnoop", "--ring-size", "3000"], "must be a power of two, got 3000"),
        (["execsnoop", "--wakeup", "every:0"], "must be 'adaptive' or 'every:N'"),
        (["execsnoop", "--wakeup", "sometimes"], "must be 'adaptive' or 'every:N'"),
        (["execsnoop", "--pid", "abc"], "must be a process id"),
        (["execsnoop", "--comm", "a-name-of-16-chr"], "must be 1 to 15 bytes"),
        (["execsnoop", "--via", "carrier-pigeon"], "invalid choice"),
        (["tail", "/sys/fs/bpf/x", "--format", "<Z"], "'<Z' is neither a Python struct format"),
        (["tail", "/sys/fs/bpf/x", "--format", "<"], "'<' decodes no bytes"),
        (["tail", "/sys/fs/bpf/x", "--count", "0"], "must be a positive number"),
        (["tail"], "the following arguments are required: PATH_OR_ID"),
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(args, message):
    done = bpfring_cmd(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_tail_errors_are_one_line_and_exit_1(pin_path):
    assert error_line(bpfring_cmd("tail", pin_path)) == (
        f"bpfring: error: nothing is pinned at {pin_path!r} (give a path on bpffs or a map id)"
    )
    assert error_line(bpfring_cmd("tail", "4000000000")) == (
        "bpfring: error: no BPF map has id 4000000000 ('bpfring maps' lists the rings)"
    )
    assert error_line(bpfring_cmd("tail", "/proc/version")) == (
        "bpfring: error: '/proc/version' is not a BPF object pinned on bpffs"
    )


@pytest.mark.parametrize(
    "kind, args, message",
    [
        ("hash", (bpfring.MapType.HASH, 4, 4, 4), "is BPF_MAP_TYPE_HASH, not a ring: tail reads ring buffers and perf event arrays"),
        ("user", (bpfring.MapType.USER_RINGBUF, 4096), "is a user ring buffer: user space writes it and BPF reads it, there is nothing to tail"),
    ],
)
def test_tail_refuses_other_map_types_in_words(pin_path, kind, args, message):
    with bpfring.Map.create(*args, name=f"bpfr_{kind}") as m:
        m.pin(pin_path)
        for target in (pin_path, str(m.id)):
            line = error_line(bpfring_cmd("tail", target))
            assert line == f"bpfring: error: map 'bpfr_{kind}' (id {m.id}) {message}"


def test_debug_shows_the_traceback(pin_path):
    done = bpfring_cmd("tail", pin_path, "--debug")
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "BPFError" in done.stderr


def test_no_bpf_syscall_is_said_in_words():
    assert cli._message(OSError(errno.ENOSYS, "BPF_MAP_CREATE: Function not implemented")).startswith(
        "BPF is not available: this kernel has no bpf() system call"
    )


def in_process(*argv: str):
    """cli.main(argv) in this process (for fork_call): 'CODE STDERR'."""

    def run() -> str:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(list(argv))
        return f"{code} {err.getvalue()}"

    return run


@pytest.mark.parametrize(
    "argv, message",
    [
        (["execsnoop", "--duration", "1"], "bpfring execsnoop needs root (or CAP_BPF and CAP_PERFMON): run it with sudo"),
        (["maps"], "bpfring maps needs root (CAP_SYS_ADMIN) to list the system's BPF maps: run it with sudo"),
        (["tail", "42"], "bpfring tail needs root (CAP_SYS_ADMIN) to open a map by id: run it with sudo"),
    ],
)
def test_not_root_is_one_line_and_exit_1(bpf, argv, message):
    said = fork_call(as_nobody(in_process(*argv)))
    assert said == f"ok: 1 bpfring: error: {message}\n"


def test_not_root_tail_of_a_pin_is_one_line_and_exit_1(pinned_producer):
    _, path = pinned_producer
    said = fork_call(as_nobody(in_process("tail", path)))
    assert said == f"ok: 1 bpfring: error: no permission to open the map pinned at {path!r}: run bpfring tail with sudo\n"


@pytest.mark.parametrize(
    "consumer_pos, why",
    [(1 << 40, "is past producer_pos"), (3, "is not 8-byte aligned")],
    ids=["past-the-producer", "unaligned"],
)
def test_maps_marks_an_impossible_fill_level_instead_of_printing_it(bpf, consumer_pos, why):
    """Another process wrote consumer_pos: no negative or oversized PENDING, the word corrupt."""
    with bpfring.Map.create(bpfring.MapType.RINGBUF, 8192, name="bpfr_bad") as m:
        with mmap.mmap(m.fd, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE) as page:
            page[:8] = consumer_pos.to_bytes(8, "little")
        done = bpfring_cmd("maps", "--json")
        text = bpfring_cmd("maps")
    assert done.returncode == 0 and text.returncode == 0, done.stderr + text.stderr
    row = next(row for row in map(json.loads, done.stdout.splitlines()) if row["id"] == m.id)
    assert row["pending"] is None and why in row["corrupt"]
    assert f"{m.id} ringbuf bpfr_bad 8192 corrupt" in [" ".join(line.split()) for line in text.stdout.splitlines()]

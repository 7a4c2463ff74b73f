"""The edges of ``bpfring tail`` (issue 13): formats JSON has no type for, durations past any
clock, structs numpy cannot hold, a directory for a pin. Each works or says so in one line,
through the real command."""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest
from test_cli import bpfring_cmd, error_line, pin_path, pinned_producer, produce  # noqa: F401 (fixtures)

from bpfring._sys.mounts import BPFFS


def usage_error(done) -> str:
    """The argparse error line of a usage error (exit 2), after its usage lines."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr.splitlines()[-1]


def test_complex_fields_are_json_pairs_of_real_and_imaginary(pinned_producer):
    producer, path = pinned_producer
    records = produce(producer, 2)
    done = bpfring_cmd("tail", path, "--format", "c16", "--json", "--count", "2")
    assert done.returncode == 0, done.stderr
    for line, record in zip(done.stdout.splitlines(), records, strict=True):
        z = complex(np.frombuffer(record, "c16", count=1)[0])
        assert json.loads(line) == {"len": 24, "values": [[z.real, z.imag]]}


def test_datetime_fields_are_json_iso_strings(pinned_producer):
    producer, path = pinned_producer
    records = produce(producer, 2)  # the first 8 bytes are the sequence number: seconds since 1970
    done = bpfring_cmd("tail", path, "--format", "M8[s],m8[s]", "--json", "--count", "2")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["values"] for line in done.stdout.splitlines()] == [
        ["1970-01-01T00:00:00", "103079215104 seconds"],  # (size 24 << 32 | producer 0) seconds
        ["1970-01-01T00:00:01", "103079215104 seconds"],
    ]
    assert len(records) == 2


@pytest.mark.parametrize("value", ["inf", "1e999", "nan", "0", "-1", "soon"])
@pytest.mark.parametrize("command", [["tail", "/sys/fs/bpf/x"], ["execsnoop"]])
def test_durations_that_are_not_a_finite_positive_time_are_usage_errors(command, value):
    done = bpfring_cmd(*command, "--duration", value)
    assert usage_error(done).endswith(
        f"error: argument --duration: must be a finite number of seconds above 0, got {value!r}"
        " (leave it out to run until Ctrl-C)"
    )


def test_a_duration_past_any_clock_runs_until_the_count(pinned_producer):
    producer, path = pinned_producer
    records = produce(producer, 1)
    done = bpfring_cmd("tail", path, "--duration", "1e308", "--count", "1")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"24 {records[0].hex()}\n"


def test_a_struct_with_bitfields_is_one_line(pinned_producer, bpf_object):
    _, path = pinned_producer
    done = bpfring_cmd("tail", path, "--object", str(bpf_object("types")), "--struct", "with_bits")
    assert error_line(done) == (
        "bpfring: error: --struct with_bits can't be decoded: struct with_bits.low is a bitfield:"
        " numpy dtypes have no bitfields"
    )


@pytest.fixture
def bpffs_dir(bpf):
    path = f"{BPFFS}/bpfring-edges-{uuid.uuid4().hex[:8]}"
    os.mkdir(path)
    yield path
    os.rmdir(path)


def test_a_directory_on_bpffs_is_named_a_directory_not_a_permission_problem(bpffs_dir):
    for target in (BPFFS, bpffs_dir, bpffs_dir + "/"):
        assert error_line(bpfring_cmd("tail", target)) == (
            f"bpfring: error: {target!r} is a directory: give the path of a map pinned in it, or a map id"
            " ('bpfring maps' lists the rings)"
        )

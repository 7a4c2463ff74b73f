"""The command line, run for real: the seed's exec tracer end to end."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid

import pytest
from conftest import as_nobody, fork_call

from bpfring import cli


def start(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bpfring", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = proc.stderr.readline()  # attached once it says so
    assert "tracing exec()" in line, line + proc.stderr.read()
    return proc


@pytest.fixture
def unique_program(bpf, tmp_path):
    """A copy of /bin/true with a name no other process has."""
    path = tmp_path / f"bpfr-{uuid.uuid4().hex[:8]}"
    shutil.copy("/bin/true", path)
    return path


def read_until(proc: subprocess.Popen, pattern: str) -> str:
    for line in proc.stdout:
        if pattern in line:
            return line
    raise AssertionError(f"{pattern!r} never printed; stderr: {proc.stderr.read()}")


@pytest.mark.parametrize("via", ["ringbuf-reserve", "ringbuf-output"])
def test_execsnoop_prints_the_seed_columns_for_an_exec(unique_program, via):
    proc = start("execsnoop", "--via", via)
    try:
        child = subprocess.run([str(unique_program), "--some", "args"])
        assert child.returncode == 0
        line = read_until(proc, unique_program.name)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    fields = line.split()
    assert re.fullmatch(r"\d\d:\d\d:\d\d", fields[0])
    assert fields[1] == "EXEC"
    assert int(fields[2]) > 0
    assert fields[3] == unique_program.name[:15]  # comm is TASK_COMM_LEN - 1 characters at most
    assert fields[4] == str(unique_program)
    assert proc.returncode == 130
    assert re.search(r"^\d+ events seen, 0 dropped$", err, re.M), err


def test_execsnoop_json_and_duration(unique_program):
    proc = start("execsnoop", "--json", "--duration", "3")
    child = subprocess.Popen([str(unique_program)])
    child.wait()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    records = [json.loads(line) for line in out.splitlines()]
    mine = [r for r in records if r["pid"] == child.pid]
    assert mine == [
        {
            "time": mine[0]["time"],
            "event": "EXEC",
            "pid": child.pid,
            "comm": unique_program.name[:15],
            "filename": str(unique_program),
        }
    ]
    assert re.search(rf"^{len(records)} events seen, 0 dropped$", err, re.M)


def test_python_dash_m_help_and_usage_errors():
    done = subprocess.run([sys.executable, "-m", "bpfring", "execsnoop", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert "TIME EVENT PID COMM FILENAME" in done.stdout and "examples:" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "bpfring", "execsnoop", "--ring-size", "3000"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "must be a power of two, got 3000" in done.stderr


def test_not_root_is_one_line_and_exit_1(bpf):
    def run() -> str:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(["execsnoop", "--duration", "1"])
        return f"{code} {err.getvalue()}"

    said = fork_call(as_nobody(run))
    assert said == "ok: 1 bpfring: error: bpfring execsnoop needs root (or CAP_BPF and CAP_PERFMON): run it with sudo\n"
    assert "Traceback" not in said and said.count("\n") == 1

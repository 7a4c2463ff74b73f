"""examples/opensnoop end to end: the script builds its own program, filters by PID, attaches to
syscalls/sys_enter_openat and reads in each of its modes; it must see a known open by a known PID.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parent.parent / "examples" / "opensnoop" / "opensnoop.py"
TIMEOUT_S = 120  # a guard against a hang, not a timing assertion

# Opens the file named on its command line once told to (a line on stdin), so the tracer is ready
# before the open it must see; then waits to be told to exit.
# Another process opening files all along: what the PID filter must keep out.
NOISE = "import time\nwhile True:\n    open('/dev/null').close()\n    time.sleep(0.001)"
OPENER = "import sys; print('ready', flush=True); sys.stdin.readline(); open(sys.argv[1]).close(); sys.stdin.readline()"


@pytest.mark.parametrize("mode", ["callback", "batch", "async"])
def test_opensnoop_sees_a_known_open_by_a_known_pid(bpf, tmp_path, mode):
    target = tmp_path / f"opened-by-the-test-{uuid.uuid4().hex}"
    target.write_text("x")
    noise = subprocess.Popen([sys.executable, "-c", NOISE])
    opener = subprocess.Popen([sys.executable, "-c", OPENER, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert opener.stdout.readline() == "ready\n"
        comm = Path(f"/proc/{opener.pid}/comm").read_text().strip()
        snoop = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "-p", str(opener.pid), "--mode", mode, "--count", "1", "--duration", str(TIMEOUT_S)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        ready = snoop.stderr.readline()
        assert ready == f"tracing openat() of pid {opener.pid}... Ctrl-C to stop\n", ready + snoop.stderr.read()
        opener.stdin.write("open\n")
        opener.stdin.flush()
        out, err = snoop.communicate(timeout=TIMEOUT_S)
    finally:
        noise.kill()
        noise.wait()
        opener.stdin.close()
        opener.wait(timeout=TIMEOUT_S)
    assert snoop.returncode == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["TIME", "PID", "COMM", "FLAGS", "PATH"]
    assert len(rows) == 1, out
    _, pid, seen_comm, flags, path = rows[0].split()
    assert (int(pid), seen_comm, path) == (opener.pid, comm, str(target))
    assert int(flags, 16) & os.O_ACCMODE == os.O_RDONLY
    assert err == "1 events, 0 dropped\n"

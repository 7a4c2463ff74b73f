"""Where no libbpf can be loaded, bpfring still imports and its rings work; only BPF objects
say that libbpf is missing (issue 16).

Each case runs in a fresh interpreter with ``BPFRING_LIBBPF=/nonexistent``, the loader's
documented seam: it then tries that file alone. The records come from hand-assembled programs
(bpfring._sys.probes) loaded with bpf(2) directly, and the test checks that no libbpf was
mapped into the process at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import require_feature

import bpfring
from bpfring import features
from bpfring._sys import libbpf

NO_LIBBPF = {**os.environ, "BPFRING_LIBBPF": "/nonexistent/libbpf.so.1"}

PRELUDE = """
import os
import bpfring
from bpfring._sys import bpf as sys_bpf, perf as sys_perf, probes

def no_libbpf_mapped():
    with open("/proc/self/maps") as f:
        assert "libbpf" not in f.read(), "libbpf was mapped"
"""


def run_without_libbpf(code: str) -> subprocess.CompletedProcess:
    script = PRELUDE + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=NO_LIBBPF)


def test_import_needs_no_libbpf():
    done = run_without_libbpf("no_libbpf_mapped(); print(bpfring.__version__, bpfring.Object.__name__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{bpfring.__version__} Object\n"


def test_a_ring_buffer_round_trip_needs_no_libbpf(bpf):
    done = run_without_libbpf(
        """
        got = []
        with bpfring.Map.create(bpfring.MapType.RINGBUF, 4096) as m:
            prog = probes.ringbuf_output_program(m.fd, 0x1122334455667788)
            with bpfring.RingBuffer(m, got.append) as rb:
                for _ in range(3):
                    sys_bpf.prog_test_run(prog, probes.TEST_PACKET)
                assert rb.consume() == 3
            os.close(prog)
        assert got == [(0x1122334455667788).to_bytes(8, "little")] * 3, got
        no_libbpf_mapped()
        print("ok")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"


def test_a_perf_buffer_round_trip_needs_no_libbpf(bpf):
    done = run_without_libbpf(
        """
        got = []
        slots = max(sys_perf.online_cpus()) + 1
        with bpfring.Map.create(bpfring.MapType.PERF_EVENT_ARRAY, slots, 4, 4) as m:
            prog = probes.perf_output_program(m.fd, 42)
            with bpfring.PerfBuffer(m, 1, lambda cpu, data: got.append(data[:8])) as pb:
                for _ in range(2):
                    sys_bpf.prog_test_run(prog, probes.TEST_PACKET)
                assert pb.consume() == 2
            os.close(prog)
        assert got == [(42).to_bytes(8, "little")] * 2, got
        no_libbpf_mapped()
        print("ok")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"


def test_a_user_ring_buffer_produces_without_libbpf(bpf):
    require_feature(features.USER_RINGBUF)  # (6.1: on 5.10 the child only said so, slowly)
    done = run_without_libbpf(
        """
        with bpfring.Map.create(bpfring.MapType.USER_RINGBUF, 4096) as m:
            with bpfring.UserRingBuffer(m) as urb:
                with urb.reserve(8) as buf:
                    buf[:] = b"12345678"
                assert urb.producer_pos == 16, urb.producer_pos  # 8-byte header + the sample
        no_libbpf_mapped()
        print("ok")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"


def test_objects_say_libbpf_is_missing_and_how_to_get_it(bpf):
    done = run_without_libbpf(
        """
        import sys
        try:
            bpfring.Object(sys.executable)  # an ELF file that exists: libbpf is what fails
        except bpfring.LibbpfUnavailableError as exc:
            assert isinstance(exc, ImportError)
            print(exc)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "libbpf is needed for BPF objects but could not be loaded (from $BPFRING_LIBBPF): /nonexistent/libbpf.so.1:"
        " cannot open shared object file: No such file or directory"
        " (Debian/Ubuntu: apt install libbpf1; Fedora: dnf install libbpf; or pip install a bpfring wheel)\n"
    )


def test_the_command_line_says_libbpf_is_missing_in_one_line(bpf):
    done = subprocess.run(
        [sys.executable, "-m", "bpfring", "execsnoop", "--duration", "1"],
        capture_output=True, text=True, timeout=300, env=NO_LIBBPF,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("bpfring: error: libbpf is needed for BPF objects but could not be loaded")
    assert "apt install libbpf1" in done.stderr and len(done.stderr.splitlines()) == 1


def test_bpfring_libbpf_chooses_the_file_loaded(bpf):
    real = libbpf.path()  # this process loaded the system's copy
    assert os.path.exists(real) and "libbpf" in os.path.basename(real)
    done = subprocess.run(
        [sys.executable, "-c", "from bpfring._sys import libbpf; print(libbpf.path(), '%d.%d' % libbpf.VERSION)"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "BPFRING_LIBBPF": real},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{real} {'%d.%d' % libbpf.VERSION}\n"


@pytest.mark.parametrize("value", ["", None])
def test_without_bpfring_libbpf_the_system_copy_is_tried_last(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("BPFRING_LIBBPF", raising=False)
    else:
        monkeypatch.setenv("BPFRING_LIBBPF", value)
    assert libbpf.candidates()[-1] == "libbpf.so.1"


def test_libbpf_is_loaded_on_first_use_not_at_import(bpf_object):
    # With libbpf present: importing maps nothing; opening an object loads it.
    code = f"""
import bpfring
with open("/proc/self/maps") as f:
    assert "libbpf" not in f.read(), "libbpf mapped at import"
with bpfring.Object({str(bpf_object("producer"))!r}) as obj:
    with open("/proc/self/maps") as f:
        assert "libbpf" in f.read()
    print(obj.name)
"""
    env = {k: v for k, v in os.environ.items() if k != "BPFRING_LIBBPF"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "producer\n"

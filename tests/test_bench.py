"""`bpfring bench` in a tiny mode: what a user reads in its output and JSON.

No timing is asserted: speed claims belong to the benchmark's output, not to tests.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from conftest import require_bpf

TINY = [
    "--duration", "0.1",
    "--records", "2000",
    "--rounds", "1",
    "--producers", "1",
    "--scenarios", "rb-reserve,rb-sampled,pb-500,paced-rb-sampled",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    require_bpf()
    from bpfring import bench

    out = tmp_path_factory.mktemp("bench") / "bench.json"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        status = bench.main([*TINY, "--json", str(out)])
    return status, text.getvalue(), json.loads(out.read_text())


def test_bench_exits_zero_and_prints_both_parts(tiny_run):
    status, text, _ = tiny_run
    assert status == 0
    assert "pre-produced drain" in text
    assert "workload:" in text


def test_every_consumer_is_listed_or_skipped_with_a_reason(tiny_run):
    from bpfring.bench.command import ALL_CONSUMERS

    _, text, report = tiny_run
    outcomes = report["workload"]["outcomes"]
    for scenario in ("rb-reserve", "rb-sampled", "pb-500", "paced-rb-sampled"):
        seen = {o["consumer"]: o for o in outcomes if o["scenario"] == scenario}
        assert sorted(seen) == sorted(ALL_CONSUMERS), scenario
        for name, o in seen.items():
            assert o["status"] == "ok" or o["status"].split(":")[0] in ("skipped", "n/a"), (scenario, name, o["status"])
            if o["status"] != "ok":
                assert len(o["status"].split(":", 1)[1].strip()) > 10, "a skip says why"
    for name in ALL_CONSUMERS:
        assert name in text
    # bpfring's and libbpf's consumers run everywhere.
    for o in outcomes:
        if o["consumer"].startswith(("bpfring", "libbpf")):
            assert o["status"] == "ok", (o["scenario"], o["consumer"], o["status"])


def test_ratios_are_against_libbpf_c_in_the_same_scenario(tiny_run):
    _, text, report = tiny_run
    assert "x libbpf-c" in text
    outcomes = [o for o in report["workload"]["outcomes"] if o["status"] == "ok"]
    for o in outcomes:
        base = next(b for b in outcomes if b["consumer"] == "libbpf-c" and b["scenario"] == o["scenario"])
        assert o["ratio"] == pytest.approx(o["consumer_rate"] / base["consumer_rate"])
    assert all(o["ratio"] == pytest.approx(1.0) for o in outcomes if o["consumer"] == "libbpf-c")
    drain = report["drain"]["results"]
    assert {r["consumer"] for r in drain} >= {"libbpf-c", "libbpf-ctypes", "bpfring-batch-view"}


def test_json_has_the_machine_and_the_raw_figures(tiny_run):
    _, _, report = tiny_run
    machine = report["machine"]
    for key in ("kernel", "cpus", "python", "libbpf", "cpu_model"):
        assert key in machine
    o = next(o for o in report["workload"]["outcomes"] if o["status"] == "ok")
    for key in ("seconds", "produced", "dropped", "consumed", "cpu_s", "producer_rate", "consumer_rate", "latency_us"):
        assert key in o
    assert {s["name"] for s in report["workload"]["scenarios"]} >= {"rb-reserve", "pb-500"}
    assert report["drain"]["results"][0]["rates"]


def test_records_counted_are_those_produced_minus_dropped(tiny_run):
    _, _, report = tiny_run
    ran = [o for o in report["workload"]["outcomes"] if o["status"] == "ok"]
    assert ran
    for o in ran:
        # `produced` counts what the program wrote; the attempts are produced + dropped.
        assert o["consumed"] == o["produced"], (o["scenario"], o["consumer"])
        assert o["produced"] > 0, (o["scenario"], o["consumer"])
        assert o["latency_us"]["n"] > 0 or o["consumed"] < 64


def test_plots_without_matplotlib_say_so(monkeypatch, capsys):
    require_bpf()
    import builtins

    from bpfring import bench

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--plots", "/nonexistent", "--only", "drain"])
    assert exit_.value.code == 2
    assert "matplotlib" in capsys.readouterr().err

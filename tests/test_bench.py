"""`bpfring bench` in a tiny mode: what a user reads in its output and JSON.

No timing is asserted: speed claims belong to the benchmark's output, not to tests.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from conftest import require_bpf

import bpfring

TINY = [
    "--duration", "0.5",  # (0.1 s: a busy machine (load 8 on 2 cores) left the producers of a round unscheduled)
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


def test_no_run_failed(tiny_run):
    _, text, report = tiny_run
    outcomes = report["workload"]["outcomes"]
    failed = [(o["scenario"], o["consumer"], o["status"]) for o in outcomes if o["status"].startswith("failed")]
    assert failed == []
    assert "failed" not in text


def test_records_counted_are_those_produced_minus_dropped(tiny_run):
    _, _, report = tiny_run
    outcomes = report["workload"]["outcomes"]
    assert all(o["status"] == "ok" or o["status"].startswith(("skipped", "n/a")) for o in outcomes)
    ran = [o for o in outcomes if o["status"] == "ok"]
    assert ran
    for o in ran:
        # `produced` counts what the program wrote; the attempts are produced + dropped.
        assert o["consumed"] == o["produced"], (o["scenario"], o["consumer"])
        assert o["produced"] > 0, (o["scenario"], o["consumer"])
        assert o["latency_us"]["n"] > 0 or o["consumed"] < 64


def test_the_consumer_clock_covers_its_drain(tiny_run):
    """Rate and CPU % count every record the consumer counted, over the time it took to count them:
    the producers' start to the end of the drain, not to the producers' stop."""
    _, _, report = tiny_run
    ran = [o for o in report["workload"]["outcomes"] if o["status"] == "ok"]
    for o in ran:
        assert o["consumer_seconds"] >= o["seconds"] > 0, (o["scenario"], o["consumer"])
        assert o["consumer_rate"] == pytest.approx(o["consumed"] / o["consumer_seconds"])
        assert o["cpu_share"] == pytest.approx(o["cpu_s"] / o["consumer_seconds"])
        assert o["producer_rate"] == pytest.approx((o["produced"] + o["dropped"]) / o["seconds"])


def test_bcc_runs_its_own_twin_or_says_why_not(tiny_run):
    _, _, report = tiny_run
    bcc = {o["scenario"]: o["status"] for o in report["workload"]["outcomes"] if o["consumer"] == "bcc-python"}
    assert set(bcc) == {"rb-reserve", "rb-sampled", "pb-500", "paced-rb-sampled"}
    if bcc["rb-reserve"].startswith("skipped"):  # bcc or kernel headers missing: every scenario says so
        assert len(set(bcc.values())) == 1 and "bcc" in bcc["rb-reserve"], bcc
    else:  # it compiled its copy and counted every record its program wrote
        assert bcc["rb-reserve"] == "ok" and bcc["pb-500"] == "ok", bcc
        assert bcc["rb-sampled"].startswith("n/a: ") and "ringbuf_query" in bcc["rb-sampled"], bcc


def test_the_drain_checks_the_ring_not_the_consumers_word(bpf):
    """A consumer that says it took every record without taking them fails the round."""
    from bpfring.bench import drain

    def liar(bench):
        return (lambda: bench.count), (lambda: None)

    def miscounting(bench):  # takes them all, counts one more
        rb = bpfring.RingBuffer(bench.map, lambda d: None)
        return (lambda: rb.consume() + 1), rb.close

    cases = (("liar", liar, "left 16000 bytes in the ring"), ("miscounting", miscounting, "counted 1001"))
    for name, form, said in cases:
        with pytest.raises(RuntimeError, match=said):
            drain.run([8], 1000, 1, None, lambda what: None, forms={name: form})
    honest = drain.run([8], 1000, 2, None, lambda what: None, forms={"honest": drain.bpfring_batch_copy})
    assert len(honest[0].rates) == 2


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

"""``bpfring bench``: the command line, and the order things run in."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from typing import Sequence

from .. import features
from . import drain, workload
from .consumers import bpfring_consumers, libbpf_consumers
from .native import compile_helper
from .peers import peer_consumers
from .report import (
    Progress,
    check_matplotlib,
    machine,
    plot,
    ratio_note,
    report_workload,
)
from .runner import INTERRUPTED, Outcome, interrupt, run_scenario

DESCRIPTION = """\
Consumers of BPF ring buffers and perf buffers, side by side, in one run.

workload: the kernel's ringbuf benchmark (tools/testing/selftests/bpf/benchs/bench_ringbufs.c):
producer processes pinned to CPUs call getpgid(); a BPF program writes 500 8-byte records per
call into a 512 KiB ring buffer or a perf buffer of 128 pages per CPU. Scenarios: ringbuf
reserve/submit and output with adaptive notification, reserve/submit sampled (BPF_RB_NO_WAKEUP
until wakeup_data_size bytes wait, then BPF_RB_FORCE_WAKEUP), perfbuf wakeup_events 1 and N;
flat out with 1..nproc producers, then paced (1000 calls/s of 10 records) for latency. Each
consumer's rate is shown as a ratio to libbpf's with a C callback in the same scenario.

drain: the same pre-produced records drained by each consumer (bpfring callback, batch copy,
zero-copy view; libbpf with ctypes and C callbacks).
"""

EPILOG = """\
examples:
  bpfring bench --quick
  bpfring bench --json bench.json --plots plots/
  bpfring bench --only workload --scenarios rb-reserve,rb-sampled --producers 1 --duration 5

Ctrl-C stops and reports what was measured so far (exit status 130).
"""

ALL_CONSUMERS = [
    "bpfring-callback",
    "bpfring-batch",
    "bpfring-async",
    "bpfring-async-batch",
    "libbpf-c",
    "libbpf-ctypes",
    "bcc-python",
    "cilium-go",
]


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bpfring bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="shorter runs: under a minute on 2 CPUs")
    p.add_argument("--only", choices=["workload", "drain"], help="run one part only")
    p.add_argument("--json", metavar="FILE", help="write every raw figure and the machine's description")
    p.add_argument("--plots", metavar="DIR", help="write throughput.png and latency.png (needs matplotlib)")
    w = p.add_argument_group("workload")
    w.add_argument("--duration", type=float, help="seconds per consumer and scenario (default 2; --quick 0.1)")
    w.add_argument("--producers", help="producer counts, e.g. 1,2 (default 1..nproc)")
    w.add_argument("--scenarios", help="a subset of the scenarios, by name (default all)")
    w.add_argument("--consumers", help=f"a subset of: {','.join(ALL_CONSUMERS)}")
    w.add_argument("--batch-cnt", type=int, default=workload.BATCH_CNT, help="records per getpgid() call (500)")
    w.add_argument(
        "--sample-rate",
        type=int,
        default=workload.SAMPLE_RATE,
        help="sampled modes: records per wakeup (500: wakeup_data_size 8000 B, wakeup_events 500)",
    )
    w.add_argument("--ringbuf-sz", type=int, default=workload.RINGBUF_SZ, help="ring buffer bytes (524288)")
    w.add_argument("--perfbuf-pages", type=int, default=workload.PERFBUF_PAGES, help="perf buffer pages per CPU (128)")
    w.add_argument("--paced-calls", type=float, default=1000.0, help="paced scenarios: getpgid() calls/s (1000)")
    d = p.add_argument_group("drain")
    d.add_argument("--records", type=int, help="records per round (default 1000000; --quick 100000)")
    d.add_argument("--rounds", type=int, help="rounds per consumer (default 5; --quick 2)")
    d.add_argument("--sizes", default="8,64", help="record sizes, from 8 and 64 (default both)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    seconds = args.duration or (0.1 if args.quick else 2.0)
    count = args.records or (100_000 if args.quick else 1_000_000)
    rounds = args.rounds or (2 if args.quick else 5)
    sizes = [int(s) for s in _list(args.sizes)]
    if bad := [s for s in sizes if s not in drain.RECORD_DTYPES]:
        parser.error(f"--sizes takes 8 and/or 64, got {bad}")
    producer_counts = [int(n) for n in _list(args.producers)] if args.producers else list(range(1, len(cpus) + 1))
    all_scenarios = workload.scenarios(
        args.batch_cnt, args.sample_rate, args.ringbuf_sz, args.perfbuf_pages, args.paced_calls
    )
    chosen = _list(args.scenarios) if args.scenarios else [s.name for s in all_scenarios]
    if unknown := sorted(set(chosen) - {s.name for s in all_scenarios}):
        parser.error(f"unknown scenarios {unknown}; choose from {', '.join(s.name for s in all_scenarios)}")
    scenarios = [s for s in all_scenarios if s.name in chosen]
    wanted = _list(args.consumers) if args.consumers else ALL_CONSUMERS
    if unknown := sorted(set(wanted) - set(ALL_CONSUMERS)):
        parser.error(f"unknown consumers {unknown}; choose from {', '.join(ALL_CONSUMERS)}")
    if args.plots and (missing := check_matplotlib()):
        parser.error(missing)
    if not 1 <= args.batch_cnt <= 1 << 20:
        parser.error(f"--batch-cnt must be between 1 and {1 << 20}, got {args.batch_cnt}")

    # Every program of the benchmark loops with bpf_loop() (the syscall-run ones are SEC("syscall"),
    # 5.14): on an older kernel say so here, not through the verifier's log of the first load.
    features.require(features.BPF_LOOP)
    do_drain = args.only in (None, "drain")
    do_workload = args.only in (None, "workload")
    n_consumers = len(wanted)
    total = (len(sizes) * rounds * 7 if do_drain else 0) + sum(
        n_consumers * (1 if s.paced else len(producer_counts)) for s in scenarios
    ) * do_workload
    progress = Progress(total)
    drained: dict = {}
    outcomes: list[Outcome] = []
    status = 0
    INTERRUPTED.clear()
    try:
        previous = signal.signal(signal.SIGINT, interrupt)
    except ValueError:  # not the main thread: Ctrl-C behaves as usual
        previous = None
    with tempfile.TemporaryDirectory(prefix="bpfring-bench-") as work:
        try:
            helper = compile_helper(work)
            if do_drain:
                drain.run(sizes, count, rounds, helper, progress, drained)
            if do_workload:
                progress("setting up the peers' consumers (bcc, cilium/ebpf)")
                everyone = bpfring_consumers() + libbpf_consumers(helper) + peer_consumers(work)
                chosen_consumers = [c for name in wanted for c in everyone if c.name == name]
                try:
                    for s in scenarios:
                        counts = [1] if s.paced else producer_counts
                        run_scenario(s, chosen_consumers, counts, seconds, cpus, outcomes, progress)
                finally:
                    for c in everyone:
                        c.release()
        except KeyboardInterrupt:
            status = 130
            progress.clear()
            sys.stderr.write("interrupted: reporting what was measured so far\n")
        finally:
            progress.clear()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
    results = [r for r in drained.values() if r.rates]
    if results:
        drain.report(results, count)
    if outcomes:
        from .runner import fill_ratios

        fill_ratios(outcomes)
        report_workload(outcomes, scenarios)
        print(
            f"\n{ratio_note(outcomes)}; consumed M/s and CPU % are over the consumer's wall time, from the "
            "producers' start to the end of its drain (its user+system time for CPU %);"
        )
        print("latency: bpf_ktime_get_ns() in the record to the consumer's CLOCK_MONOTONIC, every 64th record")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "command": ["bpfring", "bench", *(argv if argv is not None else sys.argv[1:])],
                    "interrupted": status == 130,
                    "machine": machine(),
                    "drain": {
                        "records_per_round": count,
                        "rounds": rounds,
                        "results": [r.__dict__ | {"median_rate": r.rate} for r in results],
                    },
                    "workload": {
                        "seconds_per_run": seconds,
                        "producer_counts": producer_counts,
                        "scenarios": [s.describe() for s in scenarios],
                        "outcomes": [o.as_json() for o in outcomes],
                    },
                },
                f,
                indent=2,
            )
    if args.plots and outcomes:
        for path in plot(outcomes, scenarios, args.plots):
            print(f"wrote {path}")
    return status

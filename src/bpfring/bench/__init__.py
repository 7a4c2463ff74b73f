"""``bpfring bench``: every consumer side by side, on the kernel benchmark's workload and on
pre-produced records; see :mod:`bpfring.bench.command` for the options.

  workload.py   the producers and the BPF program (bench_workload.bpf.c), one Scenario per mode
  consumers.py  bpfring (callback, batch, asyncio) and libbpf (C and ctypes callbacks)
  peers.py      bcc (Python) and cilium/ebpf (Go), or why they cannot run here
  bcc_consumer.py bcc's consumer: its own compiled copy of the workload (bcc_twin.py), its headers
  runner.py     one consumer on one scenario: the figures of a run (Outcome)
  drain.py      the pre-produced drain comparison
  report.py     progress bar, tables, JSON, plots
"""

from .command import main

__all__ = ["main"]

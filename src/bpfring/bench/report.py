"""What `bpfring bench` shows: a progress bar, the tables, the JSON and the plots."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from typing import IO, Optional

import numpy as np

from .. import __version__
from .._sys import libbpf
from .runner import BASELINE, Outcome
from .workload import Scenario


class Progress:
    """A one-line bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, stream: IO[str] = sys.stderr) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream
        self.tty = stream.isatty()
        self.t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        """Announce the next step (the previous one is done)."""
        if not self.tty:
            return
        width = 24
        filled = min(width, width * self.done // self.total)
        elapsed = time.monotonic() - self.t0
        self.stream.write(
            f"\r\033[K[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:4.0f}s {text}"
        )
        self.stream.flush()
        self.done += 1

    def clear(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _fmt(value: Optional[float], spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None or value != value else f"{value:>{width}{spec}}"


def report_workload(outcomes: list[Outcome], scenarios: list[Scenario], out: Optional[IO[str]] = None) -> None:
    """One table per scenario; reasons for consumers that did not run, numbered, at the end."""
    out = out or sys.stdout
    reasons: dict[str, int] = {}
    by_name = {s.name: s for s in scenarios}
    out.write(
        "\nworkload: producers call getpgid(); a BPF program on its tracepoint writes records (the kernel's ringbuf bench)\n"
    )
    for name in dict.fromkeys(o.scenario for o in outcomes):
        s = by_name[name]
        pace = f"{s.calls_per_s:g} calls/s per producer" if s.paced else "flat out"
        size = f"{s.ringbuf_sz >> 10} KiB ring" if s.channel == "ringbuf" else f"{s.perfbuf_pages} pages per CPU"
        out.write(f"\n{name}: {s.channel} {s.mode}; {s.batch_cnt} x 8 B records per call, {pace}; {size}\n")
        out.write(
            f"  {'consumer':<20} {'prod':>4} {'produced M/s':>12} {'consumed M/s':>12} {'x libbpf-c':>10} "
            f"{'dropped M/s':>11} {'CPU %':>6} {'p50 us':>8} {'p99 us':>9}\n"
        )
        for o in (o for o in outcomes if o.scenario == name):
            if o.status.startswith(("skipped", "n/a")):
                n = reasons.setdefault(o.status, len(reasons) + 1)
                out.write(f"  {o.consumer:<20} {o.producers:>4}   {o.status.split(':')[0]} [{n}]\n")
                continue
            lat = o.latency_us
            line = (
                f"  {o.consumer:<20} {o.producers:>4} {o.producer_rate / 1e6:>12.2f} {o.consumer_rate / 1e6:>12.2f} "
                f"{_fmt(o.ratio, '.2f', 10)} {o.drop_rate / 1e6:>11.2f} {o.cpu_share * 100:>6.0f} "
                f"{_fmt(lat.get('p50'), '.0f', 8)} {_fmt(lat.get('p99'), '.0f', 9)}"
            )
            if not o.ran:
                line += f"  {o.status}"
            out.write(line + "\n")
    if reasons:
        out.write("\n")
        for text, n in reasons.items():
            out.write(f"[{n}] {text}\n")


def machine() -> dict:
    """What the figures were measured on."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    go = ""
    try:
        go = subprocess.run(["go", "version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "cpus_usable": sorted(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "bpfring": __version__,
        "libbpf": "%d.%d" % libbpf.VERSION,
        "go": go,
        "loadavg_at_end": os.getloadavg(),
    }


def check_matplotlib() -> Optional[str]:
    """None when plots can be drawn, else what to install."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return (
            "--plots needs matplotlib, which is not installed: pip install 'bpfring[bench]' (or pip install matplotlib)"
        )
    return None


def plot(outcomes: list[Outcome], scenarios: list[Scenario], directory: str) -> list[str]:
    """throughput.png (consumer rate vs producers, per consumer, one panel per flat-out mode) and
    latency.png (p50/p99 per notification mode and consumer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    written = []
    ran = [o for o in outcomes if o.ran]
    flat = [s for s in scenarios if not s.paced and any(o.scenario == s.name for o in ran)]
    if flat:
        fig, axes = plt.subplots(1, len(flat), figsize=(4.2 * len(flat), 4.4), squeeze=False)
        # One colour per consumer in every panel, and one legend for the figure: a consumer that
        # does not run in the last panel (cilium-go on perf buffers) is still named.
        palette = plt.get_cmap("tab10")
        colour = {c: palette(i % 10) for i, c in enumerate(dict.fromkeys(o.consumer for o in ran))}
        for ax, s in zip(axes[0], flat):
            rows = [o for o in ran if o.scenario == s.name]
            for consumer in dict.fromkeys(o.consumer for o in rows):
                pts = sorted((o.producers, o.consumer_rate / 1e6) for o in rows if o.consumer == consumer)
                ax.plot([p for p, _ in pts], [r for _, r in pts], marker="o", label=consumer, color=colour[consumer])
            ax.set_title(f"{s.name}\n{s.mode}", fontsize=9)
            ax.set_xlabel("producers")
            ax.set_xticks(sorted({o.producers for o in rows}))
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel("consumed, M records/s")
        handles = [plt.Line2D([], [], color=c, marker="o", label=name) for name, c in colour.items()]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        path = os.path.join(directory, "throughput.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    groups = [
        ("paced", [s for s in scenarios if s.paced]),
        ("flat out, 1 producer", [s for s in scenarios if not s.paced]),
    ]
    groups = [
        (title, [s for s in ss if any(o.scenario == s.name and o.latency_us.get("n") for o in ran)])
        for title, ss in groups
    ]
    groups = [g for g in groups if g[1]]
    if groups:
        fig, axes = plt.subplots(len(groups), 1, figsize=(11, 4 * len(groups)), squeeze=False)
        for ax, (title, ss) in zip(axes[:, 0], groups):
            consumers = list(dict.fromkeys(o.consumer for o in ran if o.scenario in {s.name for s in ss}))
            width = 0.8 / max(len(consumers), 1)
            for i, consumer in enumerate(consumers):
                p50, p99 = [], []
                for s in ss:
                    o = next(
                        (o for o in ran if o.scenario == s.name and o.consumer == consumer and o.producers == 1), None
                    )
                    lat = o.latency_us if o else {}
                    p50.append(lat.get("p50", np.nan))
                    p99.append(lat.get("p99", np.nan))
                x = np.arange(len(ss)) + i * width
                ax.bar(x, p99, width, alpha=0.35, color=f"C{i}")
                ax.bar(x, p50, width, color=f"C{i}", label=consumer)
            ax.set_xticks(np.arange(len(ss)) + 0.4 - width / 2)
            ax.set_xticklabels([f"{s.channel}\n{s.mode}" for s in ss], fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel("delivery latency, us (solid p50, light p99)")
            ax.set_title(f"latency per notification mode: {title}", fontsize=10)
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=7, ncol=4)
        fig.tight_layout()
        path = os.path.join(directory, "latency.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def ratio_note(outcomes: list[Outcome]) -> str:
    return f"ratios are consumer rate / {BASELINE}'s in the same scenario and producer count, measured in this run"

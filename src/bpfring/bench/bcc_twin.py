"""bcc's twin of the workload, run by the system's Python (Debian's python3-bpfcc), not bpfring's.

bcc compiles its BPF C at run time and reads only the maps of programs it compiled, so it cannot
read bench_workload.bpf.o's ring. This process compiles bcc's own copy of that program (the same
getpgid() tracepoint, batch of 8-byte records, timestamp every 64th record and counters, in bcc's
dialect), and consumes it as bcc tools do: open_ring_buffer() and ring_buffer_poll(), or
open_perf_buffer() and perf_buffer_poll(), with a Python callback per record that counts it and
reads every 64th record's timestamp, the same work as the other consumers.

Where the copy differs from bench_workload.bpf.c: a bounded loop instead of bpf_loop() (bcc does
not relocate a callback's subprogram), with the call's tally in a per-CPU array; the counters in
an array map instead of .bss; the producers' tgids in a hash map the benchmark creates and pins
(BPF_TABLE_PINNED). No sampled
mode: bcc 0.26's ring buffer table has no ringbuf_query().

One process serves every scenario of a batch size (the loop bound is compiled in): the channel
and the output mode are settings in a map, and the perf buffer is reopened when wakeup_events
changes. Protocol, one line each way: prints "ready" once loaded; for each
"run CHANNEL USE_OUTPUT WAKEUP_EVENTS" line it sets them, zeroes the counters, prints "running",
consumes until a "stop" line, drains what is left, then prints {"consumed", "latency_ns",
"produced", "dropped", "cpu_s"} as JSON. It exits at the end of input.
"""

import argparse
import ctypes
import json
import os
import queue
import resource
import signal
import sys
import threading
import time

PROGRAM = r"""
BPF_RINGBUF_OUTPUT(ringbuf, RINGBUF_PAGES);
BPF_PERF_OUTPUT(perfbuf);

/* Set for each run (one compiled program serves every scenario of a batch size). */
struct bench_settings {
	u32 ringbuf;     /* 1: the ring buffer, 0: the perf buffer */
	u32 use_output;  /* ringbuf_output() instead of ringbuf_reserve()/ringbuf_submit() */
};
BPF_ARRAY(settings, struct bench_settings, 1);

/* The tgids of the benchmark's producer processes: the benchmark's map, pinned. */
BPF_TABLE_PINNED("hash", u32, u8, producers, 256, PRODUCERS_PIN);

/* Produced and dropped records, each on its own cache line: producers on other CPUs add here. */
struct bench_counters {
	u64 produced __attribute__((aligned(128)));
	u64 dropped __attribute__((aligned(128)));
};
BPF_ARRAY(counters, struct bench_counters, 1);

/* One call's tally, per CPU. In map memory rather than on the stack: the verifier then does not
 * track the counts as constants, which would make each of the loop's paths a state of its own. */
struct batch {
	u64 ts;
	u64 ok;
	u64 lost;
};
BPF_PERCPU_ARRAY(scratch, struct batch, 1);

TRACEPOINT_PROBE(syscalls, sys_enter_getpgid)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct bench_settings *set;
	struct bench_counters *c;
	struct batch *b;
	int zero = 0;

	if (!producers.lookup(&tgid))
		return 0;
	b = scratch.lookup(&zero);
	set = settings.lookup(&zero);
	if (!b || !set)
		return 0;
	b->ok = 0;
	b->lost = 0;
#pragma clang loop unroll(disable)
	for (u32 i = 0; i < BATCH_CNT; i++) {
		if (!(i & (TS_EVERY - 1)))
			b->ts = bpf_ktime_get_ns();
		if (!set->ringbuf) {
			if (perfbuf.perf_submit(args, &b->ts, sizeof(b->ts)))
				b->lost++;
			else
				b->ok++;
		} else if (set->use_output) {
			if (ringbuf.ringbuf_output(&b->ts, sizeof(b->ts), 0))
				b->lost++;
			else
				b->ok++;
		} else {
			u64 *rec = ringbuf.ringbuf_reserve(sizeof(*rec));
			if (!rec) {
				b->lost++;
				continue;
			}
			*rec = b->ts;
			ringbuf.ringbuf_submit(rec, 0);
			b->ok++;
		}
	}
	/* One atomic add per call, not per record, as the workload does. */
	c = counters.lookup(&zero);
	if (c) {
		__sync_fetch_and_add(&c->produced, b->ok);
		if (b->lost)
			__sync_fetch_and_add(&c->dropped, b->lost);
	}
	return 0;
}
"""

POLL_MS = 10  # as the other consumers: the longest a poll waits before looking for "stop"
TS_EVERY = 64  # the workload's: a timestamp every 64th record


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-cnt", type=int, required=True)
    p.add_argument("--ringbuf-sz", type=int, required=True)
    p.add_argument("--perfbuf-pages", type=int, required=True)
    p.add_argument("--producers-pin", required=True)
    p.add_argument("--every", type=int, required=True)
    args = p.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the benchmark's: it stops this run cleanly

    # Run as a script, this file's directory (bpfring's bench package) leads sys.path: bcc must
    # come from the system's Python, not a module of ours.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    from bcc import BPF  # only in the system's Python

    cflags = [
        f"-DBATCH_CNT={args.batch_cnt}",
        f"-DTS_EVERY={TS_EVERY}",
        f"-DRINGBUF_PAGES={args.ringbuf_sz // 4096}",
        f'-DPRODUCERS_PIN="{args.producers_pin}"',
    ]
    b = BPF(text=PROGRAM, cflags=cflags)  # compiles, loads, attaches the tracepoint

    count = 0
    lat = []
    mask = args.every - 1
    clock, mono = time.clock_gettime_ns, time.CLOCK_MONOTONIC
    u64 = ctypes.c_uint64.from_address

    def on_record(ctx, data, size):
        nonlocal count
        count += 1
        if not count & mask:
            lat.append(clock(mono) - u64(data).value)

    def on_sample(cpu, data, size):
        nonlocal count
        count += 1
        if not count & mask:
            lat.append(clock(mono) - u64(data).value)

    b["ringbuf"].open_ring_buffer(on_record)
    perfbuf = b["perfbuf"]
    perf_wakeup_events = 0  # the perf buffer is opened by the first perf run, with its wakeup_events
    settings, counters = b["settings"], b["counters"]

    lines: "queue.Queue[str | None]" = queue.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=read_stdin, daemon=True).start()
    print("ready", flush=True)
    while (command := lines.get()) is not None:
        words = command.split()
        if len(words) != 4 or words[0] != "run":
            print(f"expected 'run CHANNEL USE_OUTPUT WAKEUP_EVENTS', got {command!r}", file=sys.stderr)
            return 2
        ring, use_output, wakeup_events = words[1] == "ringbuf", int(words[2]), int(words[3])
        if ring:
            poll, consume = b.ring_buffer_poll, b.ring_buffer_consume
        else:
            if wakeup_events != perf_wakeup_events:
                for cpu in list(perfbuf._open_key_fds):
                    del perfbuf[cpu]  # frees that CPU's perf reader
                # The BPF side counts what did not fit; bcc would print each lost count.
                perfbuf.open_perf_buffer(
                    on_sample, page_cnt=args.perfbuf_pages, lost_cb=lambda lost: None, wakeup_events=wakeup_events
                )
                perf_wakeup_events = wakeup_events
            poll, consume = b.perf_buffer_poll, b.perf_buffer_consume
        settings[ctypes.c_int(0)] = settings.Leaf(int(ring), use_output)
        counters[ctypes.c_int(0)] = counters.Leaf()
        count = 0
        lat.clear()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        cpu0 = ru.ru_utime + ru.ru_stime
        print("running", flush=True)
        while lines.empty():
            poll(POLL_MS)
        if lines.get() != "stop":
            print("expected stop", file=sys.stderr)
            return 2
        consume()  # the producers are stopped: what is left in the buffer
        ru = resource.getrusage(resource.RUSAGE_SELF)
        c = counters[ctypes.c_int(0)]
        done = {
            "consumed": count,
            "latency_ns": lat,
            "produced": c.produced,
            "dropped": c.dropped,
            "cpu_s": ru.ru_utime + ru.ru_stime - cpu0,
        }
        print(json.dumps(done), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

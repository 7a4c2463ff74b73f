// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Producers for `bpfring bench`'s workload: the kernel's ringbuf/perfbuf benchmark, in our words.
 *
 * As in tools/testing/selftests/bpf/benchs/bench_ringbufs.c: producer processes pinned to CPUs
 * call getpgid() in a loop; this program, on the syscall's entry, writes batch_cnt 8-byte
 * records per call into a ring buffer (reserve/submit, or output) or a perf buffer. Only the
 * benchmark's producers count (their tgids are in `producers`), not the rest of the machine.
 *
 * The kernel bench attaches with fentry; this program uses the syscall's tracepoint instead,
 * which every kernel with BPF tracing allows (some, like the one this was written on, refuse
 * fentry programs with EPERM). It costs some hundred ns more per call, under 1 ns per record.
 *
 * Each record is a CLOCK_MONOTONIC timestamp (bpf_ktime_get_ns), taken every ts_every records
 * so the clock does not weigh on the producer, from which the consumer computes the delivery
 * latency. Notification: adaptive (no flag), or sampled (wakeup_data_size > 0: BPF_RB_NO_WAKEUP
 * until that many bytes wait in the ring, then BPF_RB_FORCE_WAKEUP, the kernel bench's rule).
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 512 * 1024); /* the kernel bench's ringbuf_sz; resized before load */
} ringbuf SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(int));
	__uint(value_size, sizeof(int));
} perfbuf SEC(".maps");

/* The tgids of the benchmark's producer processes. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u8);
} producers SEC(".maps");

/* Set by the benchmark before load (.rodata); laid out as SETTINGS in bench/workload.py. */
struct bench_settings {
	__u32 batch_cnt;         /* records per getpgid() call */
	__u32 use_output;        /* bpf_ringbuf_output instead of reserve/submit */
	__u64 wakeup_data_size;  /* 0: adaptive notification */
	__u32 ts_every;          /* a power of two */
	__u32 pad;
};

const volatile struct bench_settings settings = { .batch_cnt = 500, .ts_every = 64 };

/* Written by the producers, read by the benchmark after the run; each on its own cache line. */
struct bench_counters {
	__u64 produced __attribute__((aligned(128)));
	__u64 dropped __attribute__((aligned(128)));
};

struct bench_counters counters;

static __always_inline bool is_producer(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	return bpf_map_lookup_elem(&producers, &tgid) != NULL;
}

static __always_inline __u64 notify_flags(void)
{
	if (!settings.wakeup_data_size)
		return 0;
	return bpf_ringbuf_query(&ringbuf, BPF_RB_AVAIL_DATA) >= settings.wakeup_data_size ? BPF_RB_FORCE_WAKEUP
											    : BPF_RB_NO_WAKEUP;
}

/* One batch's state. The loop runs under bpf_loop(): an unrolled loop of 500 reserves, each
 * of which may fail, is more paths than the verifier explores (a few ns per record more). */
struct batch {
	void *ctx;
	__u64 ts;
	__u64 ok;
	__u64 lost;
};

static __always_inline void stamp(__u64 i, struct batch *b)
{
	if (!(i & (settings.ts_every - 1)))
		b->ts = bpf_ktime_get_ns();
}

static long ringbuf_one(__u64 i, struct batch *b)
{
	__u64 *rec;

	stamp(i, b);
	if (settings.use_output) {
		if (bpf_ringbuf_output(&ringbuf, &b->ts, sizeof(b->ts), notify_flags()))
			b->lost++;
		else
			b->ok++;
		return 0;
	}
	rec = bpf_ringbuf_reserve(&ringbuf, sizeof(*rec), 0);
	if (!rec) {
		b->lost++;
		return 0;
	}
	*rec = b->ts;
	bpf_ringbuf_submit(rec, notify_flags());
	b->ok++;
	return 0;
}

static long perfbuf_one(__u64 i, struct batch *b)
{
	stamp(i, b);
	if (bpf_perf_event_output(b->ctx, &perfbuf, BPF_F_CURRENT_CPU, &b->ts, sizeof(b->ts)))
		b->lost++;
	else
		b->ok++;
	return 0;
}

/* One atomic add per call, not per record: producers on other CPUs share these lines. */
static __always_inline void count(struct batch *b)
{
	__sync_fetch_and_add(&counters.produced, b->ok);
	if (b->lost)
		__sync_fetch_and_add(&counters.dropped, b->lost);
}

SEC("tp/syscalls/sys_enter_getpgid")
int bench_ringbuf(void *ctx)
{
	struct batch b = { .ctx = ctx };

	if (!is_producer())
		return 0;
	bpf_loop(settings.batch_cnt, ringbuf_one, &b, 0);
	count(&b);
	return 0;
}

SEC("tp/syscalls/sys_enter_getpgid")
int bench_perfbuf(void *ctx)
{
	struct batch b = { .ctx = ctx };

	if (!is_producer())
		return 0;
	bpf_loop(settings.batch_cnt, perfbuf_one, &b, 0);
	count(&b);
	return 0;
}

/* Run with BPF_PROG_TEST_RUN after the producers stopped: a discarded record with
 * BPF_RB_FORCE_WAKEUP wakes a consumer blocked in epoll (the sampled mode leaves the tail of the
 * run without a wakeup) without adding a record anyone counts. */
SEC("syscall")
int wake_consumer(void *ctx)
{
	__u64 *rec = bpf_ringbuf_reserve(&ringbuf, sizeof(*rec), 0);

	if (rec)
		bpf_ringbuf_discard(rec, BPF_RB_FORCE_WAKEUP);
	return 0;
}

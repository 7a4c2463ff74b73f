// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Producers for `bpfring bench`: fill the ring with fixed-size records on demand.
 *
 * Run with BPF_PROG_TEST_RUN, they reserve and submit `count` records of 8 or 64 bytes with
 * BPF_RB_NO_WAKEUP, the way a busy tracer would, and report how many the ring had no room for.
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096 * 1024); /* sized by the benchmark before load */
} rb SEC(".maps");

struct bench_args {
	__u32 count;   /* in: records to produce */
	__u32 flags;   /* in: BPF_RB_* for submit */
	__u64 seq;     /* in: first sequence number */
	__u64 dropped; /* out: reservations that failed */
};

struct rec8 {
	__u64 seq;
};

struct rec64 {
	__u64 seq;
	__u64 ts;
	__u8 payload[48];
};

struct loop_ctx {
	__u64 seq;
	__u64 dropped;
	__u32 flags;
};

static long produce8_one(__u64 i, struct loop_ctx *c)
{
	struct rec8 *r = bpf_ringbuf_reserve(&rb, sizeof(*r), 0);

	if (!r) {
		c->dropped++;
		return 0;
	}
	r->seq = c->seq + i;
	bpf_ringbuf_submit(r, c->flags);
	return 0;
}

static long produce64_one(__u64 i, struct loop_ctx *c)
{
	struct rec64 *r = bpf_ringbuf_reserve(&rb, sizeof(*r), 0);

	if (!r) {
		c->dropped++;
		return 0;
	}
	r->seq = c->seq + i;
	r->ts = bpf_ktime_get_ns();
	__builtin_memset(r->payload, 0x5a, sizeof(r->payload));
	bpf_ringbuf_submit(r, c->flags);
	return 0;
}

SEC("syscall")
int produce8(struct bench_args *args)
{
	struct loop_ctx c = { .seq = args->seq, .flags = args->flags };

	bpf_loop(args->count, produce8_one, &c, 0);
	args->dropped = c.dropped;
	return 0;
}

SEC("syscall")
int produce64(struct bench_args *args)
{
	struct loop_ctx c = { .seq = args->seq, .flags = args->flags };

	bpf_loop(args->count, produce64_one, &c, 0);
	args->dropped = c.dropped;
	return 0;
}

// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* The kernel side of the user ring buffer tests, run on demand with BPF_PROG_TEST_RUN.
 *
 * `drain` consumes the records user space wrote into `urb` with bpf_user_ringbuf_drain() and
 * echoes each one, byte for byte, into the kernel-produced ring `echo`, so a test can read back
 * with RingBuffer exactly what the kernel received. What happened is written back into the
 * program's context (struct drain_args).
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include "user_drain.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_USER_RINGBUF);
	__uint(max_entries, 16 * 1024);
} urb SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} echo SEC(".maps");

struct scratch {
	__u8 bytes[MAX_ECHO];
	__u32 size; /* record_size(), passed through memory (see echo_one) */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch SEC(".maps");

/* The record's size, MAX_ECHO if it is that or more. The kfunc bpf_dynptr_size() would say it
 * directly but needs 6.4; bpf_dynptr_read() (6.1, with the user ring buffer) fails past the end, so
 * the size is found one bit at a time, from the highest: log2(MAX_ECHO) reads of one byte. The
 * loop is unrolled and keeps only `record` and `size` live, so neither is spilled: this verifier
 * does not track a spilled dynptr pointer.
 */
static __always_inline __u32 record_size(struct bpf_dynptr *record)
{
	__u32 size = 0;
	__u8 byte;

	if (!bpf_dynptr_read(&byte, 1, record, MAX_ECHO - 1, 0))
		return MAX_ECHO;
#pragma unroll
	for (int bit = MAX_ECHO_BITS - 1; bit >= 0; bit--)
		if (!bpf_dynptr_read(&byte, 1, record, size + (1u << bit) - 1, 0))
			size += 1u << bit; /* byte size + 2^bit - 1 exists: at least that many */
	return size;
}

/* Called once per committed record; returning 1 stops the drain. */
static long echo_one(struct bpf_dynptr *record, struct drain_args *a)
{
	__u32 zero = 0, size;
	struct scratch *s = bpf_map_lookup_elem(&scratch, &zero);

	a->drained++;
	if (!s)
		return 1;
	/* Through the map value: the verifier sees an unknown size from a load, which keeps the bounds
	 * check below from marking each of record_size's 2^14 outcomes a distinct state to explore. */
	s->size = record_size(record);
	size = *(volatile __u32 *)&s->size;
	if (size >= MAX_ECHO) {
		a->oversize++;
	} else {
		asm volatile("" : "+r"(size)); /* keep clang from folding the mask into the branch */
		size &= MAX_ECHO - 1;           /* a bound the verifier can see */
		if (bpf_dynptr_read(s->bytes, size, record, 0, 0) ||
		    bpf_ringbuf_output(&echo, s->bytes, size, 0))
			a->dropped++;
	}
	return a->max_records && a->drained >= a->max_records;
}

/* The drain callback's context must live on the stack: work on a copy, then write it back. */
SEC("syscall")
int drain(struct drain_args *ctx)
{
	struct drain_args a = {};

	a.max_records = ctx->max_records;
	a.flags = ctx->flags;
	a.ret = bpf_user_ringbuf_drain(&urb, echo_one, &a, a.flags);
	ctx->ret = a.ret;
	ctx->drained = a.drained;
	ctx->dropped = a.dropped;
	ctx->oversize = a.oversize;
	return 0;
}

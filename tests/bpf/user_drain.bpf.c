// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* The kernel side of the user ring buffer tests, run on demand with BPF_PROG_TEST_RUN.
 *
 * `drain` consumes the records user space wrote into `urb` with bpf_user_ringbuf_drain() and
 * echoes each one, byte for byte, into the kernel-produced ring `echo`, so a test can read back
 * with RingBuffer exactly what the kernel received. What happened is written back into the
 * program's context (struct drain_args).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "user_drain.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* kfunc (kernel/bpf/helpers.c, 6.4+): the size of the record the drain hands to the callback */
extern __u32 bpf_dynptr_size(const struct bpf_dynptr *p) __ksym;

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
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch SEC(".maps");

/* Called once per committed record; returning 1 stops the drain. */
static long echo_one(struct bpf_dynptr *record, struct drain_args *a)
{
	__u32 zero = 0, size = bpf_dynptr_size(record);
	struct scratch *s = bpf_map_lookup_elem(&scratch, &zero);

	a->drained++;
	if (!s)
		return 1;
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

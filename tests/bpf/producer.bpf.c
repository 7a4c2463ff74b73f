// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Test producers for the ring buffer, run on demand with BPF_PROG_TEST_RUN.
 *
 * Each call of a SEC("syscall") program produces `count` records into `rb` and writes what
 * happened back into its context (struct args), so a test knows exactly what was produced,
 * discarded and dropped. A record is a struct rec_hdr followed by pattern bytes, truncated to
 * its size, so user space can recompute every byte it should receive.
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include "producer.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} rb SEC(".maps");

/* Payload bytes, written once by the test; record `seq` copies them from offset seq % 256. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pattern);
} pattern SEC(".maps");

struct scratch {
	__u8 bytes[MAX_RECORD + sizeof(struct rec_hdr)];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch SEC(".maps");

static __always_inline __u32 record_size(struct args *a, __u64 seq)
{
	__u32 span = a->size_max - a->size_min + 1;

	return a->size_min + ((__u32)seq * 2654435761u) % span;
}

static long produce_one(__u64 i, struct args *a)
{
	__u32 zero = 0, size, n;
	struct scratch *s = bpf_map_lookup_elem(&scratch, &zero);
	struct pattern *p = bpf_map_lookup_elem(&pattern, &zero);
	struct rec_hdr *h;
	struct bpf_dynptr ptr;
	__u64 seq = a->seq + i;
	int discard;
	long err;

	if (!s || !p)
		return 1;
	size = record_size(a, seq);
	if (size < 1 || size >= MAX_RECORD)
		return 1;
	asm volatile("" : "+r"(size));
	size &= MAX_RECORD - 1; /* visible bound for the verifier: sizes are 1..MAX_RECORD-1 */
	h = (void *)s->bytes;
	h->seq = seq;
	h->producer = a->producer;
	h->size = size;
	n = size > sizeof(*h) ? size - sizeof(*h) : 0;
	asm volatile("" : "+r"(n)); /* keep clang from folding the mask into the branch above */
	n &= MAX_RECORD - 1;         /* a bound the verifier can see */
	bpf_probe_read_kernel(s->bytes + sizeof(*h), n, &p->bytes[seq & 255]);

	discard = a->discard_every && seq % a->discard_every == 0;
	if (a->mode == MODE_OUTPUT) {
		err = bpf_ringbuf_output(&rb, s, size, a->flags);
		if (err)
			a->dropped++;
		else
			a->produced++;
		return 0;
	}
	/* MODE_RESERVE: variable-size reserve through a dynptr, then submit or discard */
	err = bpf_ringbuf_reserve_dynptr(&rb, size, 0, &ptr);
	if (err) {
		bpf_ringbuf_discard_dynptr(&ptr, 0); /* the verifier wants it released even so */
		a->dropped++;
		return 0;
	}
	bpf_dynptr_write(&ptr, 0, s, size, 0);
	if (discard) {
		bpf_ringbuf_discard_dynptr(&ptr, a->flags);
		a->discarded++;
	} else {
		bpf_ringbuf_submit_dynptr(&ptr, a->flags);
		a->produced++;
	}
	return 0;
}

/* bpf_loop's context must live on the stack: work on a copy, then write the counts back. */
SEC("syscall")
int produce(struct args *ctx)
{
	struct args a = *ctx;

	bpf_loop(ctx->count, produce_one, &a, 0); /* a u32 load: the inlined loop checks all 64 bits */
	ctx->produced = a.produced;
	ctx->discarded = a.discarded;
	ctx->dropped = a.dropped;
	return 0;
}

static long produce_fixed_one(__u64 i, struct args *a)
{
	__u64 seq = a->seq + i;
	struct fixed_rec *r;

	/* the seed's reserve/submit: a constant size, written in place */
	r = bpf_ringbuf_reserve(&rb, sizeof(*r), 0);
	if (!r) {
		a->dropped++;
		return 0;
	}
	r->hdr.seq = seq;
	r->hdr.producer = a->producer;
	r->hdr.size = sizeof(*r);
	for (int j = 0; j < sizeof(r->payload); j++)
		r->payload[j] = (seq + j) & 0xff;
	if (a->discard_every && seq % a->discard_every == 0) {
		bpf_ringbuf_discard(r, a->flags);
		a->discarded++;
	} else {
		bpf_ringbuf_submit(r, a->flags);
		a->produced++;
	}
	return 0;
}

SEC("syscall")
int produce_fixed(struct args *ctx)
{
	struct args a = *ctx;

	bpf_loop(ctx->count, produce_fixed_one, &a, 0);
	ctx->produced = a.produced;
	ctx->discarded = a.discarded;
	ctx->dropped = a.dropped;
	return 0;
}

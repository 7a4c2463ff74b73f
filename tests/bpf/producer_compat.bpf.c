// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* producer.bpf.c for kernels without bpf_loop() (5.17), SEC("syscall") (5.14) or
 * bpf_ringbuf_reserve_dynptr() (5.19): the same records into the same ring, from 5.10 on.
 *
 * Raw tracepoint programs, run with BPF_PROG_TEST_RUN (5.10) on struct args as their context. The
 * context is read-only, so what happened goes into `results`. A bounded loop (5.3) produces at most
 * MAX_PER_RUN records a run; tests/producer.py runs it again for more. Without dynptrs a reservation
 * has a constant size, so variable-size records are written with bpf_ringbuf_output(): the ring
 * holds the same bytes either way, but they cannot be discarded (the Python side refuses that case).
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include "producer.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define MAX_PER_RUN 64 /* more paths than 5.10-6.18 verifiers walk in produce_fixed beyond this */

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} rb SEC(".maps");

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

struct result {
	__u64 produced;
	__u64 discarded;
	__u64 dropped;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct result);
} results SEC(".maps");

/* Returns the number of records it tried, or -1 (a map lookup failed or a size is out of range). */
SEC("raw_tp")
int produce(struct args *a)
{
	__u32 zero = 0, count = a->count, size_min = a->size_min, span = a->size_max - a->size_min + 1, i;
	__u32 producer = a->producer, flags = a->flags;
	struct scratch *s = bpf_map_lookup_elem(&scratch, &zero);
	struct pattern *p = bpf_map_lookup_elem(&pattern, &zero);
	struct result *r = bpf_map_lookup_elem(&results, &zero);
	__u64 seq0 = a->seq;

	if (!s || !p || !r)
		return -1;
	r->produced = r->discarded = r->dropped = 0;
	for (i = 0; i < MAX_PER_RUN && i < count; i++) {
		__u64 seq = seq0 + i;
		__u32 size = size_min + ((__u32)seq * 2654435761u) % span, n; /* as record_size() in producer.py */
		struct rec_hdr *h = (void *)s->bytes;

		if (size < 1 || size >= MAX_RECORD)
			return -1;
		asm volatile("" : "+r"(size));
		size &= MAX_RECORD - 1; /* a bound the verifier can see */
		h->seq = seq;
		h->producer = producer;
		h->size = size;
		n = size > sizeof(*h) ? size - sizeof(*h) : 0;
		asm volatile("" : "+r"(n));
		n &= MAX_RECORD - 1;
		bpf_probe_read_kernel(s->bytes + sizeof(*h), n, &p->bytes[seq & 255]);
		if (bpf_ringbuf_output(&rb, s, size, flags))
			r->dropped++;
		else
			r->produced++;
	}
	return i;
}

/* payload[j] = (seq + j) & 0xff, as producer.bpf.c writes it, eight bytes at a time: a byte loop
 * inside the record loop is more than 5.10's verifier walks. Byte-wise addition without carries
 * between bytes: add the low seven bits of each byte, then put back the top bits' sum (xor). */
static __always_inline void fill_ramp(__u64 *words, __u64 seq)
{
	const __u64 ones = 0x0101010101010101ULL, top = 0x8080808080808080ULL, steps = 0x0706050403020100ULL;

#pragma unroll
	for (int k = 0; k < sizeof(((struct fixed_rec *)0)->payload) / 8; k++) {
		__u64 x = ((seq + 8 * k) & 0xff) * ones;

		words[k] = ((x & ~top) + (steps & ~top)) ^ ((x ^ steps) & top);
	}
}

SEC("raw_tp")
int produce_fixed(struct args *a)
{
	__u32 zero = 0, count = a->count, discard_every = a->discard_every, i;
	__u32 producer = a->producer, flags = a->flags;
	struct result *r = bpf_map_lookup_elem(&results, &zero);
	__u64 seq0 = a->seq;

	if (!r)
		return -1;
	r->produced = r->discarded = r->dropped = 0;
	for (i = 0; i < MAX_PER_RUN && i < count; i++) {
		__u64 seq = seq0 + i;
		/* the seed's reserve/submit: a constant size, written in place */
		struct fixed_rec *rec = bpf_ringbuf_reserve(&rb, sizeof(*rec), 0);

		if (!rec) {
			r->dropped++;
			continue;
		}
		rec->hdr.seq = seq;
		rec->hdr.producer = producer;
		rec->hdr.size = sizeof(*rec);
		fill_ramp((__u64 *)rec->payload, seq);
		if (discard_every && seq % discard_every == 0) {
			bpf_ringbuf_discard(rec, flags);
			r->discarded++;
		} else {
			bpf_ringbuf_submit(rec, flags);
			r->produced++;
		}
	}
	return i;
}

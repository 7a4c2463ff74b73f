// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* producer.bpf.c for kernels without bpf_loop() (5.17), SEC("syscall") (5.14) or
 * bpf_ringbuf_reserve_dynptr() (5.19): the same records into the same ring, from 5.10 on.
 *
 * Raw tracepoint programs, run with BPF_PROG_TEST_RUN (5.10) on struct args as their context, one
 * record a run (record `seq`; `count` is ignored): tests/producer.py runs them once per record. No
 * loop: a bounded loop of reservations, each of which may fail, is more paths than 5.10's verifier
 * walks. The context is read-only, so the return value says what became of the record. Without
 * dynptrs a reservation has a constant size, so variable-size records are written with
 * bpf_ringbuf_output(): the ring holds the same bytes either way, but they cannot be discarded
 * (the Python side refuses that case).
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include "producer.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* What a run returns */
#define PRODUCED 0
#define DISCARDED 1
#define DROPPED 2
#define FAILED 3 /* a map lookup failed or the size is out of range */

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

SEC("raw_tp")
int produce(struct args *a)
{
	__u32 zero = 0, span = a->size_max - a->size_min + 1, size, n;
	struct scratch *s = bpf_map_lookup_elem(&scratch, &zero);
	struct pattern *p = bpf_map_lookup_elem(&pattern, &zero);
	__u64 seq = a->seq;
	struct rec_hdr *h;

	if (!s || !p)
		return FAILED;
	size = a->size_min + ((__u32)seq * 2654435761u) % span; /* as record_size() in producer.py */
	if (size < 1 || size >= MAX_RECORD)
		return FAILED;
	asm volatile("" : "+r"(size));
	size &= MAX_RECORD - 1; /* a bound the verifier can see */
	h = (void *)s->bytes;
	h->seq = seq;
	h->producer = a->producer;
	h->size = size;
	n = size > sizeof(*h) ? size - sizeof(*h) : 0;
	asm volatile("" : "+r"(n));
	n &= MAX_RECORD - 1;
	bpf_probe_read_kernel(s->bytes + sizeof(*h), n, &p->bytes[seq & 255]);
	return bpf_ringbuf_output(&rb, s, size, a->flags) ? DROPPED : PRODUCED;
}

SEC("raw_tp")
int produce_fixed(struct args *a)
{
	/* the seed's reserve/submit: a constant size, written in place */
	struct fixed_rec *r = bpf_ringbuf_reserve(&rb, sizeof(*r), 0);
	__u64 seq = a->seq;

	if (!r)
		return DROPPED;
	r->hdr.seq = seq;
	r->hdr.producer = a->producer;
	r->hdr.size = sizeof(*r);
	for (int j = 0; j < sizeof(r->payload); j++)
		r->payload[j] = (seq + j) & 0xff;
	if (a->discard_every && seq % a->discard_every == 0) {
		bpf_ringbuf_discard(r, a->flags);
		return DISCARDED;
	}
	bpf_ringbuf_submit(r, a->flags);
	return PRODUCED;
}

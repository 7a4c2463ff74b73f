// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Test producer for the perf buffer, run on demand with BPF_PROG_TEST_RUN.
 *
 * A SEC("syscall") program cannot do this: it is sleepable, and sleepable programs may not use a
 * PERF_EVENT_ARRAY. A raw tracepoint program can call bpf_perf_event_output() and can be test-run
 * on a chosen CPU (BPF_F_TEST_RUN_ON_CPU), so every sample lands in that CPU's buffer. Its context
 * is read-only, so each run writes what happened into `results` at its CPU's index.
 *
 * Samples are the ring buffer producer's records (struct rec_hdr with the CPU as `producer`, then
 * pattern bytes, truncated to the sample's size), so user space recomputes every byte it receives.
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include "producer.h"
#include "perf_producer.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* The seed's perf buffer map: libbpf sizes it to the number of possible CPUs. */
struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(int));
	__uint(value_size, sizeof(int));
} pb SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_CPUS);
	__type(key, __u32);
	__type(value, struct perf_result);
} results SEC(".maps");

/* Payload bytes, written once by the test; sample `seq` copies them from offset seq % 256. */
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

struct loop_ctx {
	void *ctx; /* the program's context: bpf_perf_event_output needs it */
	struct perf_result *res;
	__u64 seq;
	__u32 size_min;
	__u32 size_max;
	__u32 cpu;
};

/* __always_inline: a plain loop calls it, not bpf_loop(). A callback bpf_loop() would call is
 * referenced by a BPF_PSEUDO_FUNC load (5.13+); 5.10's verifier does not count such a function
 * as a subprogram and refuses the object ("number of funcs in func_info doesn't match number of
 * subprogs"), and bpf_loop() itself is 5.17+. A bounded loop (5.3+) loads everywhere.
 */
static __always_inline long output_one(__u64 i, struct loop_ctx *lc)
{
	__u32 zero = 0, span = lc->size_max - lc->size_min + 1, size, n;
	struct scratch *s = bpf_map_lookup_elem(&scratch, &zero);
	struct pattern *p = bpf_map_lookup_elem(&pattern, &zero);
	__u64 seq = lc->seq + i;
	struct rec_hdr *h;
	long err;

	if (!s || !p)
		return 1;
	size = lc->size_min + ((__u32)seq * 2654435761u) % span; /* as record_size() in producer.py */
	if (size < 1 || size >= MAX_RECORD)
		return 1;
	asm volatile("" : "+r"(size));
	size &= MAX_RECORD - 1; /* a bound the verifier can see */
	h = (void *)s->bytes;
	h->seq = seq;
	h->producer = lc->cpu;
	h->size = size;
	n = size > sizeof(*h) ? size - sizeof(*h) : 0;
	asm volatile("" : "+r"(n));
	n &= MAX_RECORD - 1;
	bpf_probe_read_kernel(s->bytes + sizeof(*h), n, &p->bytes[seq & 255]);

	err = bpf_perf_event_output(lc->ctx, &pb, BPF_F_CURRENT_CPU, s, size);
	if (err) {
		lc->res->failed++;
		lc->res->last_err = err;
	} else {
		lc->res->produced++;
	}
	return 0;
}

/* Returns the number of samples it tried (at most MAX_PER_RUN; the caller runs it again for more). */
SEC("raw_tp")
int produce(struct perf_args *args)
{
	struct loop_ctx lc = { .ctx = args, .seq = args->seq, .size_min = args->size_min, .size_max = args->size_max };
	__u32 cpu = bpf_get_smp_processor_id(), count = args->count, i;

	lc.cpu = cpu;
	lc.res = bpf_map_lookup_elem(&results, &cpu);
	if (!lc.res)
		return -1;
	lc.res->produced = 0;
	lc.res->failed = 0;
	lc.res->last_err = 0;
	for (i = 0; i < MAX_PER_RUN && i < count; i++)
		if (output_one(i, &lc))
			break;
	return i;
}

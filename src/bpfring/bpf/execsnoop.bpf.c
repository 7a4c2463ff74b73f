// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* The seed's exec tracer, in its three forms: perfbuf-output, ringbuf-output and
 * ringbuf-reserve-submit. User space picks one by turning the others' autoload off.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "execsnoop.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* BPF ringbuf map; user space may override the size before load */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024 /* 256 KB */);
} rb SEC(".maps");

/* BPF perfbuf map */
struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(int));
	__uint(value_size, sizeof(int));
} pb SEC(".maps");

/* scratch space for the output forms: struct event is too big for the BPF stack */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, int);
	__type(value, struct event);
} heap SEC(".maps");

/* events the ring had no room for; user space reports it on exit */
__u64 dropped = 0;

static __always_inline void fill(struct event *e, struct trace_event_raw_sched_process_exec *ctx)
{
	unsigned fname_off = ctx->__data_loc_filename & 0xFFFF;

	e->pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(&e->comm, sizeof(e->comm));
	bpf_probe_read_str(&e->filename, sizeof(e->filename), (void *)ctx + fname_off);
}

SEC("tp/sched/sched_process_exec")
int handle_exec_perfbuf(struct trace_event_raw_sched_process_exec *ctx)
{
	int zero = 0;
	struct event *e = bpf_map_lookup_elem(&heap, &zero);

	if (!e) /* can't happen */
		return 0;
	fill(e, ctx);
	if (bpf_perf_event_output(ctx, &pb, BPF_F_CURRENT_CPU, e, sizeof(*e)))
		__sync_fetch_and_add(&dropped, 1);
	return 0;
}

SEC("tp/sched/sched_process_exec")
int handle_exec_output(struct trace_event_raw_sched_process_exec *ctx)
{
	int zero = 0;
	struct event *e = bpf_map_lookup_elem(&heap, &zero);

	if (!e) /* can't happen */
		return 0;
	fill(e, ctx);
	if (bpf_ringbuf_output(&rb, e, sizeof(*e), 0))
		__sync_fetch_and_add(&dropped, 1);
	return 0;
}

SEC("tp/sched/sched_process_exec")
int handle_exec_reserve(struct trace_event_raw_sched_process_exec *ctx)
{
	struct event *e = bpf_ringbuf_reserve(&rb, sizeof(*e), 0);

	if (!e) {
		__sync_fetch_and_add(&dropped, 1);
		return 0;
	}
	fill(e, ctx);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

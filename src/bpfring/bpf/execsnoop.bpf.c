// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* The seed's exec tracer, in its three forms: perfbuf-output, ringbuf-output and
 * ringbuf-reserve-submit. User space picks one by turning the others' autoload off, and sets
 * the filters and the wakeup policy in `cfg` before load.
 */
#include "kernel_types.h"
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

/* Settings from user space. const volatile: the verifier sees the loaded values as constants
 * and prunes the filters that are off; volatile keeps clang from folding in the zeros.
 */
const volatile struct config cfg = {};

/* events the ring had no room for; user space reports it on exit */
__u64 dropped = 0;

/* Bytes one event takes in the ring: the 8-byte record header, then the event, rounded up to 8
 * (kernel/bpf/ringbuf.c, __bpf_ringbuf_reserve).
 */
#define EVENT_RECORD_SZ ((sizeof(struct event) + BPF_RINGBUF_HDR_SZ + 7) / 8 * 8)

/* Whether this exec passes the --pid and --comm filters; fills pid and comm on the way. */
static __always_inline bool wanted(int *pid, char comm[TASK_COMM_LEN])
{
	*pid = bpf_get_current_pid_tgid() >> 32;
	if (cfg.pid && *pid != cfg.pid)
		return false;
	bpf_get_current_comm(comm, TASK_COMM_LEN);
	if (!cfg.comm[0])
		return true;
	for (int i = 0; i < TASK_COMM_LEN; i++) {
		if (comm[i] != cfg.comm[i])
			return false;
		if (!comm[i])
			break;
	}
	return true;
}

static __always_inline void fill(struct event *e, struct trace_event_raw_sched_process_exec *ctx, int pid,
				 const char comm[TASK_COMM_LEN])
{
	unsigned fname_off = ctx->__data_loc_filename & 0xFFFF;

	e->pid = pid;
	__builtin_memcpy(e->comm, comm, TASK_COMM_LEN);
	bpf_probe_read_str(&e->filename, sizeof(e->filename), (void *)ctx + fname_off);
}

/* Notification control for output/submit, given the bytes pending once this record is in.
 * Adaptive (0) lets the kernel wake the consumer only when it has caught up; with wakeup_every
 * the consumer sleeps until that many records wait, and drains any remainder on its poll timeout.
 */
static __always_inline __u64 wakeup_flags(__u64 pending)
{
	if (!cfg.wakeup_every)
		return 0;
	return pending >= (__u64)cfg.wakeup_every * EVENT_RECORD_SZ ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

SEC("tp/sched/sched_process_exec")
int handle_exec_perfbuf(struct trace_event_raw_sched_process_exec *ctx)
{
	char comm[TASK_COMM_LEN];
	int zero = 0, pid;
	struct event *e;

	if (!wanted(&pid, comm))
		return 0;
	e = bpf_map_lookup_elem(&heap, &zero);
	if (!e) /* can't happen */
		return 0;
	fill(e, ctx, pid, comm);
	/* perf buffers sample their wakeups in user space (wakeup_events), not per record */
	if (bpf_perf_event_output(ctx, &pb, BPF_F_CURRENT_CPU, e, sizeof(*e)))
		__sync_fetch_and_add(&dropped, 1);
	return 0;
}

SEC("tp/sched/sched_process_exec")
int handle_exec_output(struct trace_event_raw_sched_process_exec *ctx)
{
	char comm[TASK_COMM_LEN];
	int zero = 0, pid;
	struct event *e;
	__u64 pending;

	if (!wanted(&pid, comm))
		return 0;
	e = bpf_map_lookup_elem(&heap, &zero);
	if (!e) /* can't happen */
		return 0;
	fill(e, ctx, pid, comm);
	pending = cfg.wakeup_every ? bpf_ringbuf_query(&rb, BPF_RB_AVAIL_DATA) + EVENT_RECORD_SZ : 0;
	if (bpf_ringbuf_output(&rb, e, sizeof(*e), wakeup_flags(pending)))
		__sync_fetch_and_add(&dropped, 1);
	return 0;
}

SEC("tp/sched/sched_process_exec")
int handle_exec_reserve(struct trace_event_raw_sched_process_exec *ctx)
{
	char comm[TASK_COMM_LEN];
	struct event *e;
	__u64 pending;
	int pid;

	if (!wanted(&pid, comm))
		return 0;
	e = bpf_ringbuf_reserve(&rb, sizeof(*e), 0);
	if (!e) {
		__sync_fetch_and_add(&dropped, 1);
		return 0;
	}
	fill(e, ctx, pid, comm);
	/* the reservation already advanced producer_pos: pending counts this record */
	pending = cfg.wakeup_every ? bpf_ringbuf_query(&rb, BPF_RB_AVAIL_DATA) : 0;
	bpf_ringbuf_submit(e, wakeup_flags(pending));
	return 0;
}

// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* opensnoop: every openat() as a record in a ring buffer, optionally for one process only.
 *
 * Built by opensnoop.py with bpfring.compile(); it needs nothing but this file: vmlinux.h (the
 * running kernel's types) and libbpf's bpf_helpers.h come from `bpfring build`'s include path.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define PATH_LEN 256

/* What user space reads: obj.struct("event") turns it into a numpy dtype. */
struct event {
	__u64 ts_ns;  /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u32 pid;    /* the process (tgid) */
	__u32 tid;
	__u32 uid;
	__s32 flags;  /* openat()'s flags argument */
	char comm[16];
	char path[PATH_LEN];
};

/* A ring buffer has no value type, so nothing above would put struct event into BTF: a global
 * pointer to it does, at the cost of 8 bytes of .bss. */
struct event *unused_event __attribute__((unused));

/* Settings, set by name from Python before load: obj.rodata.targ_pid = 1234 */
const volatile __u32 targ_pid = 0; /* 0: every process */

/* Counters, read live from Python after load: obj.bss.dropped */
__u64 dropped;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* No target in the section name: opensnoop.py attaches it to syscalls/sys_enter_openat. */
SEC("tp")
int handle_openat(struct trace_event_raw_sys_enter *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 pid = pid_tgid >> 32;
	struct event *e;

	if (targ_pid && pid != targ_pid)
		return 0;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		__sync_fetch_and_add(&dropped, 1);
		return 0;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->pid = pid;
	e->tid = (__u32)pid_tgid;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->flags = (__s32)ctx->args[2];
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	if (bpf_probe_read_user_str(e->path, sizeof(e->path), (const char *)ctx->args[1]) < 0)
		e->path[0] = '\0';
	bpf_ringbuf_submit(e, 0);
	return 0;
}

// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* One program per attach kind of Program.attach_*(), each counting its hits in .bss. The
 * sections carry no target: the test names it at attach time. Kernel-side hits are counted only
 * for the test's own process (targ_tgid), and for one syscall number (targ_nr) where the hook
 * sees every syscall, so a test knows exactly how many to expect.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

const volatile __u32 targ_tgid = 0;
const volatile long targ_nr = -1;

__u64 kprobe_hits, kretprobe_hits, tp_hits, raw_tp_hits, uprobe_hits, uretprobe_hits, perf_hits;
int uprobe_arg, uretprobe_ret;

static __always_inline bool mine(void)
{
	return bpf_get_current_pid_tgid() >> 32 == targ_tgid;
}

SEC("kprobe")
int on_kprobe(void *ctx)
{
	if (mine())
		__sync_fetch_and_add(&kprobe_hits, 1);
	return 0;
}

SEC("kretprobe")
int on_kretprobe(void *ctx)
{
	if (mine())
		__sync_fetch_and_add(&kretprobe_hits, 1);
	return 0;
}

SEC("tp")
int on_tracepoint(void *ctx)
{
	if (mine())
		__sync_fetch_and_add(&tp_hits, 1);
	return 0;
}

/* raw_tp/sys_enter: args[0] is the pt_regs, args[1] the syscall number */
SEC("raw_tp")
int on_raw_tracepoint(struct bpf_raw_tracepoint_args *ctx)
{
	if (mine() && (long)ctx->args[1] == targ_nr)
		__sync_fetch_and_add(&raw_tp_hits, 1);
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(on_uprobe, int x)
{
	__sync_fetch_and_add(&uprobe_hits, 1);
	uprobe_arg = x;
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(on_uretprobe, int ret)
{
	__sync_fetch_and_add(&uretprobe_hits, 1);
	uretprobe_ret = ret;
	return 0;
}

SEC("perf_event")
int on_perf_event(void *ctx)
{
	if (mine())
		__sync_fetch_and_add(&perf_hits, 1);
	return 0;
}

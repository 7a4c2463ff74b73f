// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Programs for an Object's lifetime edges (tests/test_objects.py), on every kernel since 5.10:
 * an Object.attach() that fails partway (the first program attaches, the second names a
 * tracepoint no kernel has), and a program whose test runs last long enough to race close().
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

const volatile __u32 targ_tgid = 0;
const volatile int answer = 1; /* what answers() returns: tells one object's program from another's */

__u64 hits;

SEC("tp/syscalls/sys_enter_getppid")
int counts(void *ctx)
{
	if (bpf_get_current_pid_tgid() >> 32 == targ_tgid)
		__sync_fetch_and_add(&hits, 1);
	return 0;
}

SEC("tp/bpfring_no_such_category/no_such_event")
int cannot_attach(void *ctx)
{
	return 0;
}

SEC("socket") /* a socket filter: test runs take data and a repeat count (raw_tp's refuse repeat) */
int answers(void *skb)
{
	return answer;
}

/* Shared between user_drain.bpf.c and tests/user_drain.py (which mirrors this layout). */
#ifndef __USER_DRAIN_H
#define __USER_DRAIN_H

#define MAX_ECHO_BITS 14
#define MAX_ECHO (1 << MAX_ECHO_BITS) /* records of 1..MAX_ECHO-1 bytes are echoed */

struct drain_args {
	__u32 max_records; /* stop after this many records (0: drain everything available) */
	__u32 flags;       /* BPF_RB_* for bpf_user_ringbuf_drain */
	__s64 ret;         /* out: what bpf_user_ringbuf_drain returned */
	__u64 drained;     /* out: records the callback saw */
	__u64 dropped;     /* out: records the echo ring had no room for */
	__u64 oversize;    /* out: records too big to echo (MAX_ECHO or more) */
};

#endif /* __USER_DRAIN_H */

/* The kernel types and constants bpfring's BPF programs use, and nothing else.
 *
 * It stands in for a vmlinux.h generated from the build machine's kernel, so the objects built
 * from it are the same wherever they are built and load on every kernel from 5.10 on (CO-RE):
 * - constants are the UAPI's (include/uapi/linux/bpf.h), which never change value;
 * - kernel structs a program reads are marked preserve_access_index, so clang records each field
 *   access as a relocation and libbpf moves it to where the running kernel's BTF has that field;
 * - struct bpf_dynptr is opaque (16 bytes on the stack) on every kernel that has it (5.19+).
 */
#ifndef __BPFRING_KERNEL_TYPES_H
#define __BPFRING_KERNEL_TYPES_H

typedef signed char __s8;
typedef unsigned char __u8;
typedef short __s16;
typedef unsigned short __u16;
typedef int __s32;
typedef unsigned int __u32;
typedef long long __s64;
typedef unsigned long long __u64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u64 __be64;
typedef __u32 __wsum;
typedef int pid_t;
typedef _Bool bool;
enum { false = 0, true = 1 };

/* enum bpf_map_type: only the ones our maps use, at their UAPI values */
enum {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_RINGBUF = 27,      /* 5.8 */
	BPF_MAP_TYPE_USER_RINGBUF = 31, /* 6.1 */
};

#define BPF_F_CURRENT_CPU 0xffffffffULL /* BPF_F_INDEX_MASK: the perf event of this CPU */

/* ring buffer flags and queries */
enum {
	BPF_RB_NO_WAKEUP = 1,
	BPF_RB_FORCE_WAKEUP = 2,
};
enum {
	BPF_RB_AVAIL_DATA = 0,
};
enum {
	BPF_RINGBUF_HDR_SZ = 8,
};

struct bpf_dynptr {
	__u64 : 64;
	__u64 : 64;
} __attribute__((aligned(8)));

/* include/trace/events/sched.h as laid out by TRACE_EVENT(); relocated at load */
struct trace_entry {
	unsigned short type;
	unsigned char flags;
	unsigned char preempt_count;
	int pid;
} __attribute__((preserve_access_index));

struct trace_event_raw_sched_process_exec {
	struct trace_entry ent;
	__u32 __data_loc_filename;
	pid_t pid;
	pid_t old_pid;
	char __data[0];
} __attribute__((preserve_access_index));

#endif /* __BPFRING_KERNEL_TYPES_H */

/* The exec tracer's record and settings, shared by its BPF programs and user space
 * (src/bpfring/tools/execsnoop.py mirrors both layouts).
 */
#ifndef __EXECSNOOP_H
#define __EXECSNOOP_H

#define TASK_COMM_LEN 16
#define MAX_FILENAME_LEN 512

struct event {
	int pid;
	char comm[TASK_COMM_LEN];
	char filename[MAX_FILENAME_LEN];
};

/* Written by user space into .rodata before load: the object's only .rodata variable, so it
 * sits at offset 0 and user space needs no BTF to find it. Zero means "off" everywhere.
 */
struct config {
	__u32 pid;               /* trace only this process id (tgid) */
	__u32 wakeup_every;      /* 0: adaptive wakeups; N: wake the consumer once N records are pending */
	char comm[TASK_COMM_LEN]; /* trace only this command name (NUL-terminated, as the kernel keeps it) */
};

#endif /* __EXECSNOOP_H */

/* Shared between perf_producer.bpf.c and tests/perf_producer.py (which mirrors these layouts). */
#ifndef __PERF_PRODUCER_H
#define __PERF_PRODUCER_H

#define MAX_CPUS 64
#define MAX_PER_RUN 256 /* samples one run outputs at most: the bound of its loop */

/* The test-run context of `produce` (read-only: raw_tp contexts are). */
struct perf_args {
	__u64 seq;      /* sequence number of the first sample */
	__u32 count;    /* samples to output */
	__u32 size_min; /* sample sizes are spread over [size_min, size_max] */
	__u32 size_max;
	__u32 _pad;
};

/* What the last run on a CPU did, in `results` at that CPU's index. */
struct perf_result {
	__u64 produced; /* bpf_perf_event_output succeeded */
	__u64 failed;   /* it returned an error (ring full: the kernel counts a lost sample) */
	__s64 last_err; /* the last error it returned (0: none) */
};

#endif /* __PERF_PRODUCER_H */

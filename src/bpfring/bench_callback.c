/* The native C consumers `bpfring bench` compares against: libbpf's ring_buffer and perf_buffer
 * calling these callbacks, which count (what a C tool's cheapest handler does) and, for the
 * workload, take every `every`-th record's delivery latency. Compiled by the benchmark at run
 * time with the system's C compiler; libbpf's functions come in as pointers from Python, so
 * nothing here links against libbpf.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

/* The pre-produced drain: ring_buffer_sample_fn that only counts. */
int bpfring_bench_count(void *ctx, void *data, size_t size)
{
	(void)data;
	(void)size;
	++*(unsigned long long *)ctx;
	return 0;
}

/* The workload: what one consumer saw. Laid out as BenchTally in bench/native.py. */
struct bench_tally {
	uint64_t count;    /* records delivered */
	uint64_t lost;     /* perf: samples the kernel reported lost */
	uint64_t every;    /* a power of two: sample the latency of every `every`-th record */
	uint64_t lat_cap;  /* room in lat */
	uint64_t lat_n;    /* latencies stored */
	uint64_t *lat;     /* ns from the record's bpf_ktime_get_ns() to its callback */
};

static uint64_t monotonic_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts); /* bpf_ktime_get_ns()'s clock */
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void tally(struct bench_tally *t, const void *data)
{
	uint64_t sent;

	if (++t->count & (t->every - 1) || t->lat_n >= t->lat_cap)
		return;
	memcpy(&sent, data, sizeof(sent));
	t->lat[t->lat_n++] = monotonic_ns() - sent;
}

/* ring_buffer_sample_fn */
int bpfring_bench_ring_sample(void *ctx, void *data, size_t size)
{
	if (size >= sizeof(uint64_t))
		tally(ctx, data);
	return 0;
}

/* perf_buffer_event_fn for perf_buffer__new_raw(), which is how wakeup_events is chosen.
 * include/uapi/linux/perf_event.h: a sample is {u32 type; u16 misc; u16 size; u32 raw_size;
 * raw bytes}, a lost record {header; u64 id; u64 lost}. */
#define PERF_RECORD_LOST 2
#define PERF_RECORD_SAMPLE 9
#define LIBBPF_PERF_EVENT_CONT (-2)

int bpfring_bench_perf_event(void *ctx, int cpu, void *event)
{
	struct bench_tally *t = ctx;
	uint32_t type;
	uint64_t lost;

	(void)cpu;
	memcpy(&type, event, sizeof(type));
	if (type == PERF_RECORD_SAMPLE) {
		tally(t, (char *)event + 12);
	} else if (type == PERF_RECORD_LOST) {
		memcpy(&lost, (char *)event + 16, sizeof(lost));
		t->lost += lost;
	}
	return LIBBPF_PERF_EVENT_CONT;
}

/* The consumer loop in C, as the kernel bench's: `poll` is ring_buffer__poll or
 * perf_buffer__poll. Returns 0 at the deadline, or poll's error (-EINTR on a signal). */
int bpfring_bench_poll_until(int (*poll)(void *, int), void *buf, uint64_t deadline_ns, int timeout_ms)
{
	int err;

	while (monotonic_ns() < deadline_ns) {
		err = poll(buf, timeout_ms);
		if (err < 0)
			return err;
	}
	return 0;
}

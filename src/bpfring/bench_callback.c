/* The native C consumer `bpfring bench` compares against: libbpf's ring_buffer__consume()
 * calling this sample callback, which only counts (what a C tool's cheapest handler does).
 * Compiled by the benchmark at run time with the system's C compiler.
 */
#include <stddef.h>

int bpfring_bench_count(void *ctx, void *data, size_t size)
{
	(void)data;
	(void)size;
	++*(unsigned long long *)ctx;
	return 0;
}

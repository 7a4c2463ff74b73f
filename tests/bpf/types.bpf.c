// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* C types for Object.struct(): `fill` writes known values into every field of a struct demo, so
 * a test can read the bytes back through the dtype built from BTF and see the layout agree.
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

enum color { RED = 1, GREEN = 2, BLUE = -3 };

struct inner {
	__u16 a;
	__u64 b; /* 6 bytes of padding before it */
};

struct demo {
	char comm[16];
	__u8 flag;
	__u32 pid; /* 3 bytes of padding before it */
	struct inner in;
	__s16 matrix[2][3];
	union {
		__u32 as_int;
		float as_float;
	}; /* anonymous: its fields belong to struct demo */
	enum color color;
	_Bool ok;
	void *ptr;
	double ratio;
	unsigned char raw[5];
};

struct with_bits {
	__u32 low : 4;
	__u32 high : 28;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct demo);
} demos SEC(".maps");

struct with_bits bits_example; /* a global, so the type reaches BTF */

SEC("raw_tp") /* test-run since 5.10 (SEC("syscall") needs 5.14) */
int fill(void *ctx)
{
	__u32 zero = 0;
	struct demo *d = bpf_map_lookup_elem(&demos, &zero);

	if (!d)
		return 1;
	__builtin_memcpy(d->comm, "bpfring-types", 14);
	d->flag = 0xab;
	d->pid = 123456;
	d->in.a = 0xbeef;
	d->in.b = 0x0102030405060708ULL;
	for (int i = 0; i < 2; i++)
		for (int j = 0; j < 3; j++)
			d->matrix[i][j] = -(i * 10 + j);
	d->as_float = 1.5f;
	d->color = BLUE;
	d->ok = 1;
	d->ptr = (void *)0xdeadbeef;
	d->ratio = 0.25;
	for (int i = 0; i < 5; i++)
		d->raw[i] = 250 + i;
	bits_example.low = 1;
	return 0;
}

// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Globals of every kind, for Object.rodata/.data/.bss: `step` copies what it was configured
 * with (.rodata, set from Python before load) and what it finds in .data (set from Python after
 * load) into .bss, and counts its runs there, so a test sees both directions through the kernel.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

enum mode { MODE_OFF = 0, MODE_ON = 1, MODE_BACKWARDS = -1 };

struct cfg {
	__u16 port;
	__u64 mask;
	char tag[4];
};

/* .rodata: settings, fixed at load */
const volatile pid_t targ_pid = 0;
const volatile bool verbose = false;
const volatile enum mode mode = MODE_ON;
const volatile char prefix[8] = "abc";
const volatile __u32 limits[3] = { 1, 2, 3 };
const volatile struct cfg cfg = { .port = 80, .mask = 0xff, .tag = "web" };
const volatile __u32 threshold SEC(".rodata.config") = 5;

/* .data: initialised, writable from both sides */
__s64 data_value = -42;
char data_name[16] = "hello";
double ratio = 0.5;
__u64 custom_counter SEC(".data.custom") = 7;
__u32 section = 3; /* a name GlobalData also has: the variable wins */
__u32 close = 4;
bool read_only = true;

/* .bss: what the program saw, and its counters */
__u64 runs;
pid_t seen_pid;
bool seen_verbose;
enum mode seen_mode;
char seen_prefix[8];
__u32 seen_limits[3];
struct cfg seen_cfg;
__s64 seen_data_value;
__u32 seen_threshold;

SEC("syscall")
int step(void *ctx)
{
	runs++;
	seen_pid = targ_pid;
	seen_verbose = verbose;
	seen_mode = mode;
	for (int i = 0; i < sizeof(seen_prefix); i++) /* volatile reads: the value set before load */
		seen_prefix[i] = prefix[i];
	for (int i = 0; i < 3; i++)
		seen_limits[i] = limits[i];
	seen_cfg.port = cfg.port;
	seen_cfg.mask = cfg.mask;
	for (int i = 0; i < sizeof(seen_cfg.tag); i++)
		seen_cfg.tag[i] = cfg.tag[i];
	seen_data_value = data_value;
	seen_threshold = threshold;
	custom_counter += threshold;
	return 0;
}

/* Shared between producer.bpf.c and tests/producer.py (which mirrors these layouts). */
#ifndef __PRODUCER_H
#define __PRODUCER_H

#define MAX_RECORD 8192 /* records are 1..MAX_RECORD-1 bytes */
#define MODE_OUTPUT 0
#define MODE_RESERVE 1

struct args {
	__u64 seq;           /* sequence number of the first record */
	__u32 count;         /* records to produce */
	__u32 size_min;      /* record sizes are spread over [size_min, size_max] */
	__u32 size_max;
	__u32 flags;         /* BPF_RB_* for output/submit/discard */
	__u32 mode;          /* MODE_OUTPUT or MODE_RESERVE (produce only) */
	__u32 discard_every; /* discard records whose seq is a multiple of this (0: never) */
	__u32 producer;      /* written into every record */
	__u32 _pad;
	__u64 produced;      /* out: records committed */
	__u64 discarded;     /* out: records reserved then discarded */
	__u64 dropped;       /* out: records the ring had no room for */
};

struct rec_hdr {
	__u64 seq;
	__u32 producer;
	__u32 size;
};

struct fixed_rec {
	struct rec_hdr hdr;
	__u8 payload[48];
};

struct pattern {
	__u8 bytes[MAX_RECORD + 256];
};

#endif /* __PRODUCER_H */

/* The ring buffer consumer walk in C: the same protocol as Ring._consume_python in ringbuf.py,
 * without the interpreter's cost per record. Optional: when this extension is missing, bpfring
 * uses the pure-Python walk, which passes the same tests.
 *
 * Protocol: kernel/bpf/ringbuf.c. Records are {u32 len; u32 pg_off} headers followed by len
 * bytes, 8-byte aligned; BUSY and DISCARD are the two high bits of len.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#define BPF_RINGBUF_BUSY_BIT (1U << 31)
#define BPF_RINGBUF_DISCARD_BIT (1U << 30)
#define BPF_RINGBUF_HDR_SZ 8
#define LEN_MASK (BPF_RINGBUF_DISCARD_BIT - 1)

static PyObject *bpf_error;         /* bpfring.errors.BPFError */
static PyObject *record_size_error; /* bpfring.errors.RecordSizeError */

/* include/uapi/linux/perf_event.h: struct perf_event_mmap_page's data_head and data_tail, the
 * record types a BPF output event writes, and struct perf_event_header {u32 type; u16 misc; u16 size}. */
#define PERF_DATA_HEAD_OFFSET 1024
#define PERF_DATA_TAIL_OFFSET 1032
#define PERF_RECORD_LOST 2
#define PERF_RECORD_SAMPLE 9
#define PERF_HEADER_SIZE 8

/* Raise bpfring.errors.BPFError(err, message); takes the reference to message (NULL: already failed). */
static void set_bpf_error(int err, PyObject *message)
{
	PyObject *exc_args;

	if (!message)
		return;
	exc_args = Py_BuildValue("(iO)", err, message);
	if (exc_args)
		PyErr_SetObject(bpf_error, exc_args);
	Py_XDECREF(exc_args);
	Py_DECREF(message);
}

/* A callback's return value: negative stops the walk and is returned (libbpf's convention).
 * Takes the reference to ret. */
static long stop_value(PyObject *ret)
{
	long value = 0;

	if (ret != Py_None && PyLong_Check(ret)) {
		value = PyLong_AsLong(ret);
		if (value == -1 && PyErr_Occurred()) {
			PyErr_Clear(); /* beyond a C long: not a stop value */
			value = 0;
		}
	}
	Py_DECREF(ret);
	return value < 0 ? value : 0;
}

/* The position after the record at cons whose header says len. Past producer_pos or bigger than
 * the ring is a corrupt header or consumer_pos (user space can write it), and reading it would
 * run off the end of the mapping: -1 with BPFError set. */
static int ring_next_record(uint64_t cons, uint64_t prod, uint32_t len, uint64_t mask, uint64_t *next)
{
	*next = cons + (((len & LEN_MASK) + BPF_RINGBUF_HDR_SZ + 7) & ~7ULL);
	if (*next > prod || *next - cons > mask + 1) {
		set_bpf_error(EBADMSG, PyUnicode_FromFormat("ring record at %llu claims %u bytes, past producer_pos %llu or the ring",
							     (unsigned long long)cons, len & LEN_MASK, (unsigned long long)prod));
		return -1;
	}
	return 0;
}

/* Ctrl-C is noticed at least this often even when the callback is not Python code. */
#define SIGNAL_CHECK_INTERVAL 4096

/* consume(consumer_mm, producer_mm, data_offset, mask, callback, limit) -> int
 *
 * Delivers committed records to callback(bytes) in order, storing consumer_pos before each call,
 * so a record counts as consumed once its callback is entered. Returns the number delivered, or
 * the callback's negative return value. Exceptions from the callback propagate.
 */
static PyObject *consume(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer cons_buf, prod_buf;
	Py_ssize_t data_offset, limit, count = 0;
	unsigned long long mask;
	PyObject *callback, *result = NULL;
	uint64_t *consumer_pos;
	const uint64_t *producer_pos;
	const uint8_t *data;
	uint64_t cons, prod;
	long stop = 0;

	if (nargs != 6) {
		PyErr_SetString(PyExc_TypeError, "consume() takes 6 arguments");
		return NULL;
	}
	data_offset = PyLong_AsSsize_t(args[2]);
	mask = PyLong_AsUnsignedLongLong(args[3]);
	callback = args[4];
	limit = PyLong_AsSsize_t(args[5]);
	if (PyErr_Occurred())
		return NULL;
	if (PyObject_GetBuffer(args[0], &cons_buf, PyBUF_WRITABLE) < 0)
		return NULL;
	if (PyObject_GetBuffer(args[1], &prod_buf, PyBUF_SIMPLE) < 0) {
		PyBuffer_Release(&cons_buf);
		return NULL;
	}
	if (cons_buf.len < 8 || prod_buf.len < data_offset + 2 * (Py_ssize_t)(mask + 1)) {
		PyErr_SetString(PyExc_ValueError, "ring mappings are smaller than the ring");
		goto out;
	}
	consumer_pos = cons_buf.buf;
	producer_pos = prod_buf.buf;
	data = (const uint8_t *)prod_buf.buf + data_offset;

	cons = __atomic_load_n(consumer_pos, __ATOMIC_ACQUIRE);
	for (;;) {
		/* Pairs with the kernel's smp_store_release of producer_pos at reserve time. */
		prod = __atomic_load_n(producer_pos, __ATOMIC_ACQUIRE);
		if (cons >= prod)
			break;
		while (cons < prod) {
			const uint32_t *hdr = (const uint32_t *)(data + (cons & mask));
			/* Pairs with the kernel's xchg of the header at commit: the record is complete. */
			uint32_t len = __atomic_load_n(hdr, __ATOMIC_ACQUIRE);
			uint64_t next;
			PyObject *record, *ret;

			if (len & BPF_RINGBUF_BUSY_BIT)
				goto done;
			if (ring_next_record(cons, prod, len, mask, &next) < 0)
				goto out;
			if (len & BPF_RINGBUF_DISCARD_BIT) {
				cons = next;
				__atomic_store_n(consumer_pos, cons, __ATOMIC_RELEASE);
				continue;
			}
			record = PyBytes_FromStringAndSize((const char *)hdr + BPF_RINGBUF_HDR_SZ, len & LEN_MASK);
			if (!record)
				goto out;
			/* Give the space back before the callback runs: see Ring._consume_python. */
			cons = next;
			__atomic_store_n(consumer_pos, cons, __ATOMIC_RELEASE);
			ret = PyObject_CallOneArg(callback, record);
			Py_DECREF(record);
			count++;
			if (!ret)
				goto out;
			if ((stop = stop_value(ret)) < 0)
				goto done;
			if (count >= limit)
				goto done;
			if (count % SIGNAL_CHECK_INTERVAL == 0 && PyErr_CheckSignals() < 0)
				goto out;
		}
		/* consumer_pos is stored: re-read producer_pos, so a commit that saw the old
		 * consumer_pos (and skipped the wakeup) is still delivered by this call. */
	}
done:
	result = PyLong_FromSsize_t(stop ? stop : count);
out:
	PyBuffer_Release(&prod_buf);
	PyBuffer_Release(&cons_buf);
	return result;
}

/* scan_fixed(producer_mm, data_offset, cons, mask, itemsize, limit) -> n
 *
 * How many records the zero-copy batch can view as one array from position cons: committed
 * records of exactly itemsize bytes, at most limit, ending at producer_pos or before anything
 * else (BUSY, another size, or a discard a view cannot skip). Moves nothing.
 */
static PyObject *scan_fixed(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer prod_buf;
	Py_ssize_t data_offset, limit, n = 0;
	unsigned long long cons, mask;
	unsigned long itemsize;
	const uint8_t *data;
	uint64_t prod, stride;

	if (nargs != 6) {
		PyErr_SetString(PyExc_TypeError, "scan_fixed() takes 6 arguments");
		return NULL;
	}
	data_offset = PyLong_AsSsize_t(args[1]);
	cons = PyLong_AsUnsignedLongLong(args[2]);
	mask = PyLong_AsUnsignedLongLong(args[3]);
	itemsize = PyLong_AsUnsignedLong(args[4]);
	limit = PyLong_AsSsize_t(args[5]);
	if (PyErr_Occurred())
		return NULL;
	if (PyObject_GetBuffer(args[0], &prod_buf, PyBUF_SIMPLE) < 0)
		return NULL;
	if (prod_buf.len < data_offset + 2 * (Py_ssize_t)(mask + 1)) {
		PyBuffer_Release(&prod_buf);
		PyErr_SetString(PyExc_ValueError, "ring mapping is smaller than the ring");
		return NULL;
	}
	data = (const uint8_t *)prod_buf.buf + data_offset;
	stride = (itemsize + BPF_RINGBUF_HDR_SZ + 7) & ~7ULL;
	prod = __atomic_load_n((const uint64_t *)prod_buf.buf, __ATOMIC_ACQUIRE);
	while (n < limit && cons + stride <= prod &&
	       __atomic_load_n((const uint32_t *)(data + (cons & mask)), __ATOMIC_ACQUIRE) == itemsize) {
		n++;
		cons += stride;
	}
	PyBuffer_Release(&prod_buf);
	return PyLong_FromSsize_t(n);
}

/* Batches bigger than this are copied with non-temporal stores where the CPU has them: the
 * output is written once and read later, so skipping the cache saves reading each destination
 * line before writing it. Results this big also come from a Block (below). */
#define LARGE_BATCH_BYTES (1 << 20)

/* How take_fixed copies one record, chosen once per batch. */
enum copy_mode {
	COPY_ANY,    /* memcpy */
	COPY_SMALL,  /* records of 8 or 16 bytes: inline 8-byte moves, no call */
	COPY_STREAM, /* a large batch of records a multiple of 16 bytes: non-temporal stores */
};

static inline void copy_record(uint8_t *dst, const uint8_t *src, Py_ssize_t itemsize, enum copy_mode mode)
{
#ifdef __SSE2__
	if (mode == COPY_STREAM) {
		for (Py_ssize_t j = 0; j < itemsize / 16; j++)
			_mm_stream_si128((__m128i *)dst + j, _mm_loadu_si128((const __m128i *)src + j));
		return;
	}
#endif
	if (mode == COPY_SMALL) {
		memcpy(dst, src, 8);
		if (itemsize == 16)
			memcpy(dst + 8, src + 8, 8);
		return;
	}
	memcpy(dst, src, itemsize);
}

/* take_fixed(producer_mm, data_offset, cons, mask, itemsize, out) -> (advance, n)
 *
 * The copying batch in one pass over the ring: from position cons, copy each committed record of
 * itemsize bytes into the next slot of the writable contiguous buffer out and skip discarded
 * records of any size, until out is full, producer_pos, or a record it cannot take (BUSY, or
 * committed with another size). Reading each header and its record together reads the ring once,
 * at close to the speed of libbpf's walk of the headers alone. Moves nothing: the caller adds
 * advance to consumer_pos once it holds the n records.
 */
static PyObject *take_fixed(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer prod_buf, out_buf;
	Py_ssize_t data_offset, itemsize, cap, n = 0;
	unsigned long long start, mask;
	const uint8_t *data;
	uint8_t *out;
	uint64_t cons, prod;
	enum copy_mode mode = COPY_ANY;

	if (nargs != 6) {
		PyErr_SetString(PyExc_TypeError, "take_fixed() takes 6 arguments");
		return NULL;
	}
	data_offset = PyLong_AsSsize_t(args[1]);
	start = PyLong_AsUnsignedLongLong(args[2]);
	mask = PyLong_AsUnsignedLongLong(args[3]);
	itemsize = PyLong_AsSsize_t(args[4]);
	if (PyErr_Occurred())
		return NULL;
	if (itemsize <= 0) {
		PyErr_SetString(PyExc_ValueError, "take_fixed(): itemsize must be positive");
		return NULL;
	}
	if (PyObject_GetBuffer(args[0], &prod_buf, PyBUF_SIMPLE) < 0)
		return NULL;
	if (PyObject_GetBuffer(args[5], &out_buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
		PyBuffer_Release(&prod_buf);
		return NULL;
	}
	if (prod_buf.len < data_offset + 2 * (Py_ssize_t)(mask + 1)) {
		PyErr_SetString(PyExc_ValueError, "ring mapping is smaller than the ring");
		goto fail;
	}
	data = (const uint8_t *)prod_buf.buf + data_offset;
	out = out_buf.buf;
	cap = out_buf.len / itemsize;
	if (itemsize == 8 || itemsize == 16)
		mode = COPY_SMALL;
#ifdef __SSE2__
	if (itemsize % 16 == 0 && ((uintptr_t)out & 15) == 0 && out_buf.len >= LARGE_BATCH_BYTES)
		mode = COPY_STREAM;
#endif
	cons = start;
	/* Pairs with the kernel's smp_store_release of producer_pos at reserve time. */
	prod = __atomic_load_n((const uint64_t *)prod_buf.buf, __ATOMIC_ACQUIRE);
	while (n < cap && cons < prod) {
		const uint8_t *hdr = data + (cons & mask);
		/* Pairs with the kernel's xchg of the header at commit: the record is complete. */
		uint32_t len = __atomic_load_n((const uint32_t *)hdr, __ATOMIC_ACQUIRE);
		uint64_t next;

		if (len & BPF_RINGBUF_BUSY_BIT)
			break;
		if (ring_next_record(cons, prod, len, mask, &next) < 0)
			goto fail;
		if (!(len & BPF_RINGBUF_DISCARD_BIT)) {
			if ((uint64_t)len != (uint64_t)itemsize)
				break; /* the caller's next call reports it */
			copy_record(out + n * itemsize, hdr + BPF_RINGBUF_HDR_SZ, itemsize, mode);
			n++;
		}
		cons = next;
	}
#ifdef __SSE2__
	if (mode == COPY_STREAM)
		_mm_sfence(); /* the streamed stores are visible before the caller reads the array */
#endif
	PyBuffer_Release(&out_buf);
	PyBuffer_Release(&prod_buf);
	return Py_BuildValue("(Kn)", (unsigned long long)(cons - start), n);
fail:
	PyBuffer_Release(&out_buf);
	PyBuffer_Release(&prod_buf);
	return NULL;
}

/* A Block is the memory of one large batch result: numpy arrays view it (np.frombuffer), and
 * when the last of them goes, the memory is kept for the next large batch instead of being
 * unmapped. A fresh mapping costs a page fault per page on first write (here, as much as the
 * copy itself), so a consumer taking batch after batch would otherwise pay that every time.
 * One block is kept, the most recently released: at most the size of one batch, which is at
 * most one ring's data. release_batch_memory() gives it back. */
typedef struct {
	PyObject_HEAD
	void *mem;
	size_t size;
} Block;

static void *kept_mem;
static size_t kept_size;

static void unmap_kept(void)
{
	if (kept_mem)
		munmap(kept_mem, kept_size);
	kept_mem = NULL;
	kept_size = 0;
}

static void block_dealloc(Block *self)
{
	if (self->mem) {
		unmap_kept();
		kept_mem = self->mem;
		kept_size = self->size;
	}
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static int block_getbuffer(Block *self, Py_buffer *view, int flags)
{
	return PyBuffer_FillInfo(view, (PyObject *)self, self->mem, (Py_ssize_t)self->size, 0, flags);
}

static PyBufferProcs block_as_buffer = { .bf_getbuffer = (getbufferproc)block_getbuffer };

static PyTypeObject BlockType = {
	PyVarObject_HEAD_INIT(NULL, 0).tp_name = "bpfring._fastring.Block",
	.tp_basicsize = sizeof(Block),
	.tp_dealloc = (destructor)block_dealloc,
	.tp_as_buffer = &block_as_buffer,
	.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
	.tp_doc = "Memory for one large batch result, reused once every array on it is gone.",
};

/* Blocks are madvised for transparent huge pages, and one of at least HUGE_BLOCK_BYTES is sized in
 * whole huge pages (at most 1/8 more than asked), which also lets recent kernels place it on a
 * huge page boundary: where the kernel backs it so, a 64 MB batch faults 32 times, not 16384.
 * Smaller blocks are sized in pages, as a 2 MiB huge page could double the memory of a 1 MiB batch. */
#define HUGE_PAGE_BYTES (2UL << 20)
#define HUGE_BLOCK_BYTES (8 * HUGE_PAGE_BYTES)
#define BLOCK_PAGE_BYTES 4096UL

/* batch_block(nbytes) -> Block of at least nbytes: the kept block when it fits without wasting
 * more than half of it, else a new anonymous mapping. */
static PyObject *batch_block(PyObject *module, PyObject *arg)
{
	Py_ssize_t nbytes = PyLong_AsSsize_t(arg);
	size_t align, size;
	Block *block;

	if (nbytes == -1 && PyErr_Occurred())
		return NULL;
	if (nbytes <= 0) {
		PyErr_SetString(PyExc_ValueError, "batch_block(): nbytes must be positive");
		return NULL;
	}
	align = (size_t)nbytes >= HUGE_BLOCK_BYTES ? HUGE_PAGE_BYTES : BLOCK_PAGE_BYTES;
	size = ((size_t)nbytes + align - 1) & ~(align - 1);
	block = PyObject_New(Block, &BlockType);
	if (!block)
		return NULL;
	if (kept_mem && kept_size >= size && kept_size / 2 <= size) {
		block->mem = kept_mem;
		block->size = kept_size;
		kept_mem = NULL;
		kept_size = 0;
		return (PyObject *)block;
	}
	block->mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (block->mem == MAP_FAILED) {
		block->mem = NULL;
		Py_DECREF(block);
		return PyErr_NoMemory();
	}
	block->size = size;
#ifdef MADV_HUGEPAGE
	madvise(block->mem, size, MADV_HUGEPAGE); /* a hint: without huge pages it still works */
#endif
	return (PyObject *)block;
}

/* release_batch_memory() -> bytes unmapped: the kept block, if any. */
static PyObject *release_batch_memory(PyObject *module, PyObject *unused)
{
	size_t size = kept_size;

	unmap_kept();
	return PyLong_FromSize_t(size);
}

/* Check the perf record at tail (header already read): sizes are multiples of 8 within the ring,
 * and a sample's raw_size fits its record. Anything else is a corrupt header, and reading it would
 * run off the end of the mapping. Returns -1 with BPFError set, or 0. */
static int perf_check_record(PyObject *cpu, const uint8_t *base, uint64_t mask, uint64_t tail, uint64_t head, uint64_t header)
{
	uint64_t rec_size = header >> 48;
	uint32_t raw_size;

	if (rec_size < PERF_HEADER_SIZE || rec_size & 7 || rec_size > mask + 1 || tail + rec_size > head) {
		set_bpf_error(EBADMSG, PyUnicode_FromFormat("perf buffer of cpu %S: record at %llu of %llu bytes, head %llu", cpu,
							     (unsigned long long)tail, (unsigned long long)rec_size,
							     (unsigned long long)head));
		return -1;
	}
	if ((uint32_t)header != PERF_RECORD_SAMPLE)
		return 0;
	raw_size = *(const uint32_t *)(base + ((tail + 8) & mask));
	if ((uint64_t)raw_size + 12 > rec_size) {
		set_bpf_error(EBADMSG, PyUnicode_FromFormat("perf buffer of cpu %S: sample of %llu bytes claims %u", cpu,
							     (unsigned long long)rec_size, raw_size));
		return -1;
	}
	return 0;
}

static void perf_size_error(PyObject *cpu, uint64_t tail, uint32_t raw_size, unsigned long lo, unsigned long hi)
{
	PyErr_Format(record_size_error,
		     "sample at %llu of the perf buffer of cpu %S is %u bytes, the dtype expects %lu "
		     "(up to %lu with the kernel's padding); it stays in the ring (read it with consume())",
		     (unsigned long long)tail, cpu, raw_size, lo, hi);
}

/* Copy len bytes from ring offset start of a perf data area of size bytes: it is mapped once, so
 * a piece that wraps the end comes in two. */
static void perf_copy(uint8_t *dst, const uint8_t *base, uint64_t size, uint64_t start, uint64_t len)
{
	if (start + len <= size) {
		memcpy(dst, base + start, len);
	} else {
		memcpy(dst, base + start, size - start);
		memcpy(dst + (size - start), base, len - (size - start));
	}
}

/* perf_consume(mm, data_offset, size, cpu, sample_cb, lost_cb, into, expect_lo, expect_hi, limit) -> int
 *
 * One CPU's perf ring, the walk of perfbuf._CpuBuffer.consume in C: samples to sample_cb(cpu, data)
 * (or appended to ``into`` as (cpu, data) when it is not None), lost counts to lost_cb(cpu, lost).
 * data_tail is stored before each callback, so a record counts as consumed once its callback is
 * entered. With expect_hi > 0, a sample whose raw size is outside [expect_lo, expect_hi] raises
 * RecordSizeError and stays in the ring. Stops after ``limit`` samples. Returns samples delivered
 * or a negative callback return.
 */
static PyObject *perf_consume(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer buf;
	Py_ssize_t data_offset, limit, count = 0;
	unsigned long long size, mask;
	unsigned long expect_lo, expect_hi;
	PyObject *cpu, *sample_cb, *lost_cb, *into, *append = NULL, *result = NULL;
	uint64_t *tail_ptr, tail, head;
	const uint64_t *head_ptr;
	const uint8_t *base;
	long stop = 0;

	if (nargs != 10) {
		PyErr_SetString(PyExc_TypeError, "perf_consume() takes 10 arguments");
		return NULL;
	}
	data_offset = PyLong_AsSsize_t(args[1]);
	size = PyLong_AsUnsignedLongLong(args[2]);
	cpu = args[3];
	sample_cb = args[4];
	lost_cb = args[5];
	into = args[6];
	expect_lo = PyLong_AsUnsignedLong(args[7]);
	expect_hi = PyLong_AsUnsignedLong(args[8]);
	limit = PyLong_AsSsize_t(args[9]);
	if (PyErr_Occurred())
		return NULL;
	if (size == 0 || (size & (size - 1))) {
		PyErr_SetString(PyExc_ValueError, "perf_consume(): the data area size must be a power of two");
		return NULL;
	}
	if (into != Py_None && !(append = PyObject_GetAttrString(into, "append")))
		return NULL;
	if (PyObject_GetBuffer(args[0], &buf, PyBUF_WRITABLE) < 0) {
		Py_XDECREF(append);
		return NULL;
	}
	if (data_offset < PERF_DATA_TAIL_OFFSET + 8 || buf.len < data_offset + (Py_ssize_t)size) {
		PyErr_SetString(PyExc_ValueError, "perf_consume(): the mapping is smaller than the ring");
		goto out;
	}
	mask = size - 1;
	head_ptr = (const uint64_t *)((const uint8_t *)buf.buf + PERF_DATA_HEAD_OFFSET);
	tail_ptr = (uint64_t *)((uint8_t *)buf.buf + PERF_DATA_TAIL_OFFSET);
	base = (const uint8_t *)buf.buf + data_offset;

	tail = __atomic_load_n(tail_ptr, __ATOMIC_RELAXED);
	for (;;) {
		/* Pairs with the kernel's smp_wmb() before it publishes data_head (perf_output_put_handle). */
		head = __atomic_load_n(head_ptr, __ATOMIC_ACQUIRE);
		if (tail >= head) /* a tail past the head (written by someone else) reads as caught up */
			break;
		while (tail < head) {
			uint64_t off = tail & mask, header, next;
			uint32_t type;
			PyObject *ret;

			/* Records are multiples of 8 bytes: a header never straddles the end of the area. */
			header = *(const uint64_t *)(base + off);
			type = (uint32_t)header;
			next = tail + (header >> 48);
			if (perf_check_record(cpu, base, mask, tail, head, header) < 0)
				goto out;
			if (type == PERF_RECORD_SAMPLE) {
				uint32_t raw_size = *(const uint32_t *)(base + ((off + 8) & mask));
				PyObject *data;

				if (expect_hi && (raw_size < expect_lo || raw_size > expect_hi)) {
					perf_size_error(cpu, tail, raw_size, expect_lo, expect_hi);
					goto out;
				}
				data = PyBytes_FromStringAndSize(NULL, raw_size);
				if (!data)
					goto out;
				perf_copy((uint8_t *)PyBytes_AS_STRING(data), base, size, (off + 12) & mask, raw_size);
				/* The record is copied out: give its space back (perf wants the reads done first). */
				tail = next;
				__atomic_store_n(tail_ptr, tail, __ATOMIC_RELEASE);
				count++;
				if (append) {
					PyObject *pair = PyTuple_Pack(2, cpu, data);

					Py_DECREF(data);
					if (!pair)
						goto out;
					ret = PyObject_CallOneArg(append, pair);
					Py_DECREF(pair);
				} else {
					ret = PyObject_CallFunctionObjArgs(sample_cb, cpu, data, NULL);
					Py_DECREF(data);
				}
			} else if (type == PERF_RECORD_LOST) {
				PyObject *lost = PyLong_FromUnsignedLongLong(*(const uint64_t *)(base + ((off + 16) & mask)));

				if (!lost)
					goto out;
				tail = next;
				__atomic_store_n(tail_ptr, tail, __ATOMIC_RELEASE);
				ret = PyObject_CallFunctionObjArgs(lost_cb, cpu, lost, NULL);
				Py_DECREF(lost);
			} else { /* no other type is written for a BPF output event: skip it */
				tail = next;
				__atomic_store_n(tail_ptr, tail, __ATOMIC_RELEASE);
				continue;
			}
			if (!ret)
				goto out;
			if ((stop = stop_value(ret)) < 0)
				goto done;
			if (type == PERF_RECORD_SAMPLE && count >= limit)
				goto done;
			if (count % SIGNAL_CHECK_INTERVAL == 0 && PyErr_CheckSignals() < 0)
				goto out;
		}
		/* Caught up with the head read above: read it again, so records written meanwhile are
		 * delivered by this call rather than waiting for a wakeup. */
	}
done:
	result = PyLong_FromSsize_t(stop ? stop : count);
out:
	PyBuffer_Release(&buf);
	Py_XDECREF(append);
	return result;
}

/* perf_take(mm, data_offset, size, cpu, itemsize, out, taken, may_raise) -> (n, stop)
 *
 * The copying perf batch, one CPU's ring: from data_tail up to the data_head read at the start,
 * copy the first itemsize bytes of each sample (raw_size itemsize to itemsize + 7: the kernel's
 * padding is dropped) into the next slot of the writable contiguous buffer out, add up the counts
 * of lost records and skip other records; stop when out is full or at a sample of another size,
 * which stays in the ring (RecordSizeError if may_raise and it is the first sample). Then
 * (cpu, n, lost) is appended to the list taken and data_tail stored, with no signal check in
 * between: a caller that keeps out and taken loses nothing to a Ctrl-C. stop says where the walk
 * ended: PERF_TAKE_HEAD, PERF_TAKE_FULL or PERF_TAKE_MISFIT.
 */
enum { PERF_TAKE_HEAD, PERF_TAKE_FULL, PERF_TAKE_MISFIT };

static PyObject *perf_take(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer buf, out_buf;
	Py_ssize_t data_offset, itemsize, cap, n = 0;
	unsigned long long size, mask, lost = 0;
	PyObject *cpu, *taken, *entry;
	uint64_t *tail_ptr, tail, head;
	const uint8_t *base;
	uint8_t *out;
	int may_raise, stop = PERF_TAKE_HEAD;

	if (nargs != 8) {
		PyErr_SetString(PyExc_TypeError, "perf_take() takes 8 arguments");
		return NULL;
	}
	data_offset = PyLong_AsSsize_t(args[1]);
	size = PyLong_AsUnsignedLongLong(args[2]);
	cpu = args[3];
	itemsize = PyLong_AsSsize_t(args[4]);
	taken = args[6];
	may_raise = PyObject_IsTrue(args[7]);
	if (PyErr_Occurred())
		return NULL;
	if (size == 0 || (size & (size - 1)) || itemsize <= 0 || !PyList_Check(taken)) {
		PyErr_SetString(PyExc_ValueError, "perf_take(): size must be a power of two, itemsize positive, taken a list");
		return NULL;
	}
	if (PyObject_GetBuffer(args[0], &buf, PyBUF_WRITABLE) < 0)
		return NULL;
	if (PyObject_GetBuffer(args[5], &out_buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
		PyBuffer_Release(&buf);
		return NULL;
	}
	if (data_offset < PERF_DATA_TAIL_OFFSET + 8 || buf.len < data_offset + (Py_ssize_t)size) {
		PyErr_SetString(PyExc_ValueError, "perf_take(): the mapping is smaller than the ring");
		goto fail;
	}
	mask = size - 1;
	head = __atomic_load_n((const uint64_t *)((const uint8_t *)buf.buf + PERF_DATA_HEAD_OFFSET), __ATOMIC_ACQUIRE);
	tail_ptr = (uint64_t *)((uint8_t *)buf.buf + PERF_DATA_TAIL_OFFSET);
	tail = __atomic_load_n(tail_ptr, __ATOMIC_RELAXED);
	base = (const uint8_t *)buf.buf + data_offset;
	out = out_buf.buf;
	cap = out_buf.len / itemsize;
	while (tail < head) {
		uint64_t off = tail & mask, header = *(const uint64_t *)(base + off);

		if (n == cap) {
			stop = PERF_TAKE_FULL;
			break;
		}

		if (perf_check_record(cpu, base, mask, tail, head, header) < 0)
			goto fail;
		if ((uint32_t)header == PERF_RECORD_SAMPLE) {
			uint32_t raw_size = *(const uint32_t *)(base + ((off + 8) & mask));

			if (raw_size < (uint64_t)itemsize || raw_size > (uint64_t)itemsize + 7) {
				if (n == 0 && may_raise) {
					perf_size_error(cpu, tail, raw_size, itemsize, itemsize + 7);
					goto fail;
				}
				stop = PERF_TAKE_MISFIT;
				break;
			}
			perf_copy(out + n * itemsize, base, size, (off + 12) & mask, itemsize);
			n++;
		} else if ((uint32_t)header == PERF_RECORD_LOST) {
			lost += *(const uint64_t *)(base + ((off + 16) & mask));
		}
		tail += header >> 48;
	}
	entry = Py_BuildValue("(OnK)", cpu, n, lost);
	if (!entry || PyList_Append(taken, entry) < 0) {
		Py_XDECREF(entry);
		goto fail;
	}
	Py_DECREF(entry);
	/* The reads are done: give the space back (perf's smp_mb before the tail store). */
	__atomic_store_n(tail_ptr, tail, __ATOMIC_RELEASE);
	PyBuffer_Release(&out_buf);
	PyBuffer_Release(&buf);
	return Py_BuildValue("(ni)", n, stop);
fail:
	PyBuffer_Release(&out_buf);
	PyBuffer_Release(&buf);
	return NULL;
}

static PyMethodDef methods[] = {
	{ "consume", (PyCFunction)(void (*)(void))consume, METH_FASTCALL,
	  "consume(consumer_mm, producer_mm, data_offset, mask, callback, limit) -> int" },
	{ "batch_block", batch_block, METH_O, "batch_block(nbytes) -> Block of at least nbytes" },
	{ "perf_take", (PyCFunction)(void (*)(void))perf_take, METH_FASTCALL,
	  "perf_take(mm, data_offset, size, cpu, itemsize, out, taken, may_raise) -> (n, stop)" },
	{ "perf_consume", (PyCFunction)(void (*)(void))perf_consume, METH_FASTCALL,
	  "perf_consume(mm, data_offset, size, cpu, sample_cb, lost_cb, into, expect_lo, expect_hi, limit) -> int" },
	{ "release_batch_memory", release_batch_memory, METH_NOARGS, "release_batch_memory() -> bytes unmapped" },
	{ "scan_fixed", (PyCFunction)(void (*)(void))scan_fixed, METH_FASTCALL,
	  "scan_fixed(producer_mm, data_offset, cons, mask, itemsize, limit) -> n" },
	{ "take_fixed", (PyCFunction)(void (*)(void))take_fixed, METH_FASTCALL,
	  "take_fixed(producer_mm, data_offset, cons, mask, itemsize, out) -> (advance, n)" },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_fastring", "The ring buffer consumer walk in C.", -1, methods,
};

PyMODINIT_FUNC PyInit__fastring(void)
{
	PyObject *errors = PyImport_ImportModule("bpfring.errors"), *mod;

	if (!errors)
		return NULL;
	bpf_error = PyObject_GetAttrString(errors, "BPFError");
	record_size_error = PyObject_GetAttrString(errors, "RecordSizeError");
	Py_DECREF(errors);
	if (!bpf_error || !record_size_error)
		return NULL;
	if (PyType_Ready(&BlockType) < 0)
		return NULL;
	mod = PyModule_Create(&module);
	if (mod && (PyModule_AddIntConstant(mod, "LARGE_BATCH_BYTES", LARGE_BATCH_BYTES) < 0 ||
		    PyModule_AddIntConstant(mod, "PERF_TAKE_HEAD", PERF_TAKE_HEAD) < 0))
		Py_CLEAR(mod);
	return mod;
}

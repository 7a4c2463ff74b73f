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
			next = cons + (((len & LEN_MASK) + BPF_RINGBUF_HDR_SZ + 7) & ~7ULL);
			/* Past producer_pos or bigger than the ring: a corrupt header or consumer_pos (user
			 * space can write it). Reading it would run off the end of the mapping. */
			if (next > prod || next - cons > mask + 1) {
				set_bpf_error(EBADMSG, PyUnicode_FromFormat("ring record at %llu claims %u bytes, past producer_pos %llu or the ring",
									     (unsigned long long)cons, len & LEN_MASK,
									     (unsigned long long)prod));
				goto out;
			}
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

/* scan_fixed(producer_mm, data_offset, cons, mask, itemsize, limit, allow_discards) -> (n, discarded)
 *
 * The length of the run of records from position cons that batch reads as one array: committed
 * records of exactly itemsize bytes (and, with allow_discards, discarded ones of that size),
 * at most limit of them, ending at producer_pos. Moves nothing: the caller advances consumer_pos.
 */
static PyObject *scan_fixed(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer prod_buf;
	Py_ssize_t data_offset, limit, n = 0, discarded = 0;
	unsigned long long cons, mask;
	unsigned long itemsize;
	int allow_discards;
	const uint8_t *data;
	uint64_t prod, stride;

	if (nargs != 7) {
		PyErr_SetString(PyExc_TypeError, "scan_fixed() takes 7 arguments");
		return NULL;
	}
	data_offset = PyLong_AsSsize_t(args[1]);
	cons = PyLong_AsUnsignedLongLong(args[2]);
	mask = PyLong_AsUnsignedLongLong(args[3]);
	itemsize = PyLong_AsUnsignedLong(args[4]);
	limit = PyLong_AsSsize_t(args[5]);
	allow_discards = PyObject_IsTrue(args[6]);
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
	while (n < limit && cons + stride <= prod) {
		uint32_t len = __atomic_load_n((const uint32_t *)(data + (cons & mask)), __ATOMIC_ACQUIRE);

		if (len != itemsize) {
			if (!allow_discards || len != (itemsize | BPF_RINGBUF_DISCARD_BIT))
				break; /* BUSY, another size, or a discard a view cannot skip */
			discarded++;
		}
		n++;
		cons += stride;
	}
	PyBuffer_Release(&prod_buf);
	return Py_BuildValue("(nn)", n, discarded);
}

/* Batches bigger than this are copied with non-temporal stores where the CPU has them: the
 * output is written once and read later, so skipping the cache saves reading each destination
 * line before writing it, about a third of the memory traffic of a large copy. */
#define STREAM_MIN_BYTES (1 << 20)

static void copy_records(uint8_t *out, const uint8_t *data, Py_ssize_t n, Py_ssize_t itemsize, uint64_t stride)
{
#ifdef __SSE2__
	if (itemsize % 16 == 0 && ((uintptr_t)out & 15) == 0 && n * itemsize >= STREAM_MIN_BYTES) {
		for (Py_ssize_t i = 0; i < n; i++) {
			const uint8_t *src = data + i * stride;
			__m128i *dst = (__m128i *)(out + i * itemsize);

			for (Py_ssize_t j = 0; j < itemsize / 16; j++)
				_mm_stream_si128(dst + j, _mm_loadu_si128((const __m128i *)src + j));
		}
		_mm_sfence(); /* the streamed stores are visible before the caller reads the array */
		return;
	}
#endif
	for (Py_ssize_t i = 0; i < n; i++)
		memcpy(out + i * itemsize, data + i * stride, itemsize);
}

/* gather(producer_mm, data_offset, cons, mask, itemsize, n, out) -> None
 *
 * Copy n records of itemsize bytes, one per ring slot from position cons, into the writable
 * contiguous buffer out (n * itemsize bytes): the copying batch, one memcpy per record.
 */
static PyObject *gather(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer prod_buf, out_buf;
	Py_ssize_t data_offset, itemsize, n;
	unsigned long long cons, mask;
	const uint8_t *data;
	uint8_t *out;
	uint64_t stride;

	if (nargs != 7) {
		PyErr_SetString(PyExc_TypeError, "gather() takes 7 arguments");
		return NULL;
	}
	data_offset = PyLong_AsSsize_t(args[1]);
	cons = PyLong_AsUnsignedLongLong(args[2]);
	mask = PyLong_AsUnsignedLongLong(args[3]);
	itemsize = PyLong_AsSsize_t(args[4]);
	n = PyLong_AsSsize_t(args[5]);
	if (PyErr_Occurred())
		return NULL;
	if (PyObject_GetBuffer(args[0], &prod_buf, PyBUF_SIMPLE) < 0)
		return NULL;
	if (PyObject_GetBuffer(args[6], &out_buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
		PyBuffer_Release(&prod_buf);
		return NULL;
	}
	stride = ((uint64_t)itemsize + BPF_RINGBUF_HDR_SZ + 7) & ~7ULL;
	if (n < 0 || itemsize <= 0 || out_buf.len < n * itemsize ||
	    (uint64_t)n * stride > mask + 1 || prod_buf.len < data_offset + 2 * (Py_ssize_t)(mask + 1)) {
		PyBuffer_Release(&out_buf);
		PyBuffer_Release(&prod_buf);
		PyErr_SetString(PyExc_ValueError, "gather(): sizes do not fit the ring or the output");
		return NULL;
	}
	/* The double mapping keeps the run contiguous from its first slot, even across the end. */
	data = (const uint8_t *)prod_buf.buf + data_offset + (cons & mask) + BPF_RINGBUF_HDR_SZ;
	out = out_buf.buf;
	copy_records(out, data, n, itemsize, stride);
	PyBuffer_Release(&out_buf);
	PyBuffer_Release(&prod_buf);
	Py_RETURN_NONE;
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
			/* Sizes are multiples of 8 within the ring: anything else is a corrupt header, and
			 * reading it would run off the end of the mapping. */
			if ((header >> 48) < PERF_HEADER_SIZE || (header >> 48) & 7 || (header >> 48) > size || next > head) {
				set_bpf_error(EBADMSG, PyUnicode_FromFormat("perf buffer of cpu %S: record at %llu of %llu bytes, head %llu",
									     cpu, (unsigned long long)tail,
									     (unsigned long long)(header >> 48),
									     (unsigned long long)head));
				goto out;
			}
			if (type == PERF_RECORD_SAMPLE) {
				uint32_t raw_size = *(const uint32_t *)(base + ((off + 8) & mask));
				uint64_t start = (off + 12) & mask;
				PyObject *data;

				if ((uint64_t)raw_size + 12 > (header >> 48)) {
					set_bpf_error(EBADMSG, PyUnicode_FromFormat("perf buffer of cpu %S: sample of %llu bytes claims %u",
										     cpu, (unsigned long long)(header >> 48), raw_size));
					goto out;
				}
				if (expect_hi && (raw_size < expect_lo || raw_size > expect_hi)) {
					PyErr_Format(record_size_error,
						     "sample at %llu of the perf buffer of cpu %S is %u bytes, the dtype expects %lu "
						     "(up to %lu with the kernel's padding); it stays in the ring (read it with consume())",
						     (unsigned long long)tail, cpu, raw_size, expect_lo, expect_hi);
					goto out;
				}
				if (start + raw_size <= size) {
					data = PyBytes_FromStringAndSize((const char *)base + start, raw_size);
				} else { /* wraps the end: the perf data area is mapped once, copy both pieces */
					data = PyBytes_FromStringAndSize(NULL, raw_size);
					if (data) {
						memcpy(PyBytes_AS_STRING(data), base + start, size - start);
						memcpy(PyBytes_AS_STRING(data) + (size - start), base, raw_size - (size - start));
					}
				}
				if (!data)
					goto out;
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

static PyMethodDef methods[] = {
	{ "consume", (PyCFunction)(void (*)(void))consume, METH_FASTCALL,
	  "consume(consumer_mm, producer_mm, data_offset, mask, callback, limit) -> int" },
	{ "gather", (PyCFunction)(void (*)(void))gather, METH_FASTCALL,
	  "gather(producer_mm, data_offset, cons, mask, itemsize, n, out) -> None" },
	{ "perf_consume", (PyCFunction)(void (*)(void))perf_consume, METH_FASTCALL,
	  "perf_consume(mm, data_offset, size, cpu, sample_cb, lost_cb, into, expect_lo, expect_hi, limit) -> int" },
	{ "scan_fixed", (PyCFunction)(void (*)(void))scan_fixed, METH_FASTCALL,
	  "scan_fixed(producer_mm, data_offset, cons, mask, itemsize, limit, allow_discards) -> (n, discarded)" },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_fastring", "The ring buffer consumer walk in C.", -1, methods,
};

PyMODINIT_FUNC PyInit__fastring(void)
{
	PyObject *errors = PyImport_ImportModule("bpfring.errors");

	if (!errors)
		return NULL;
	bpf_error = PyObject_GetAttrString(errors, "BPFError");
	record_size_error = PyObject_GetAttrString(errors, "RecordSizeError");
	Py_DECREF(errors);
	if (!bpf_error || !record_size_error)
		return NULL;
	return PyModule_Create(&module);
}

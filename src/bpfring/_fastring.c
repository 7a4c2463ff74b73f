/* bpfring's record walks, in C: the one place that reads and writes the shared pages of a ring.
 *
 * Three small types hold a mapped ring's state (its mappings, size, mask and the position this
 * process last stored) and walk it:
 *   RingState      the consumer side of a BPF_MAP_TYPE_RINGBUF      (kernel/bpf/ringbuf.c)
 *   UserRingState  the producer side of a BPF_MAP_TYPE_USER_RINGBUF (kernel/bpf/ringbuf.c)
 *   PerfRingState  the reader side of one CPU's BPF output perf ring (kernel/events/ring_buffer.c)
 *
 * Shared memory is untrusted. Any process that has the map (or the perf event) can write the
 * consumer page of a ring buffer and the control page of a perf ring, so every position and length
 * read from them is checked before a byte it points at is read: nothing is read outside the
 * mapping, every loop advances or stops, and a value that cannot be right raises
 * bpfring.RingCorruptError through the owner's ``corrupt`` callable, leaving the ring as found.
 *
 * Memory ordering: positions and headers are loaded with acquire and stored with release, which
 * is what the kernel pairs its own barriers with; the comments name the kernel functions (Linux
 * 6.x, unchanged since the ring buffer's introduction in 5.8 and the user ring buffer in 6.1).
 * These are correct on weakly ordered CPUs (arm64) as well as on x86-64.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <pthread.h>
#include <unistd.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* include/uapi/linux/bpf.h: a record is {u32 len; u32 pg_off} then len bytes, 8-aligned; the two
 * high bits of len are BUSY (reserved, not committed) and DISCARD (committed as discarded). */
#define BPF_RINGBUF_BUSY_BIT (1U << 31)
#define BPF_RINGBUF_DISCARD_BIT (1U << 30)
#define BPF_RINGBUF_HDR_SZ 8
#define LEN_MASK (BPF_RINGBUF_DISCARD_BIT - 1)

/* include/uapi/linux/perf_event.h: struct perf_event_mmap_page's data_head and data_tail, the
 * record types a BPF output event writes, and struct perf_event_header {u32 type; u16 misc; u16 size}.
 * A sample is {header; u32 raw_size; raw bytes}, a lost record {header; u64 id; u64 lost}. */
#define PERF_DATA_HEAD_OFFSET 1024
#define PERF_DATA_TAIL_OFFSET 1032
#define PERF_RECORD_LOST 2
#define PERF_RECORD_SAMPLE 9
#define PERF_HEADER_SIZE 8
#define PERF_SAMPLE_MIN 16 /* header, raw_size, padded to 8 */
#define PERF_LOST_SIZE 24

/* Ctrl-C is noticed at least this often even when the callback is not Python code. */
#define SIGNAL_CHECK_INTERVAL 4096

static PyObject *record_size_error; /* bpfring.errors.RecordSizeError */

/* Bumped in a fork() child (pthread_atfork). A child forked inside a callback returns into the
 * walk: it must not go on consuming the parent's ring (the positions are shared). */
static volatile unsigned long fork_generation;

static void on_fork_child(void)
{
	fork_generation++;
}

/* A walk counted in ``walking`` that started in ``generation`` still reads the mappings. In a fork()
 * child, a walk the parent started does not: the thread that ran it is not in the child, or it is
 * the forking one, inside a callback, and its walk stops at check_not_forked before it reads them
 * again. The child may then release its copies (close() in a child). */
static int walk_is_ours(int walking, unsigned long generation)
{
	return walking && generation == fork_generation;
}

/* After a callback returns: -1 with RuntimeError set if it fork()ed and this is the child. */
static int check_not_forked(unsigned long generation)
{
	if (generation == fork_generation)
		return 0;
	PyErr_SetString(PyExc_RuntimeError,
			"this is a fork() child, forked inside a callback: it stops walking the parent's ring (the "
			"positions are shared with the parent); open a new consumer in the child");
	return -1;
}
static long page_size;               /* the kernel lays rings out in pages */

static inline uint64_t roundup_len(uint32_t len)
{
	return ((uint64_t)(len & LEN_MASK) + BPF_RINGBUF_HDR_SZ + 7) & ~7ULL;
}

/* Raise the owner's RingCorruptError: corrupt(detail, values) builds it (it knows the map's name,
 * id and the ring or CPU). values is a new reference (a dict), detail a printf-style message. */
static void raise_corrupt(PyObject *corrupt, PyObject *values, const char *fmt, ...)
{
	PyObject *detail, *exc;
	va_list ap;

	va_start(ap, fmt);
	detail = PyUnicode_FromFormatV(fmt, ap);
	va_end(ap);
	if (detail && values) {
		exc = PyObject_CallFunctionObjArgs(corrupt, detail, values, NULL);
		if (exc) {
			PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
			Py_DECREF(exc);
		}
	}
	Py_XDECREF(detail);
	Py_XDECREF(values);
}

/* A callback's return value: a negative int stops the walk and is returned (libbpf's convention);
 * anything else (None, a positive int, a bool, a float, a string) goes on. A negative int beyond
 * 64 bits stops as LONG_MIN. Takes the reference to ret. */
static long stop_value(PyObject *ret)
{
	long long value = 0;
	int overflow = 0;

	if (PyLong_Check(ret) && !PyBool_Check(ret)) {
		value = PyLong_AsLongLongAndOverflow(ret, &overflow);
		if (value == -1 && PyErr_Occurred()) {
			PyErr_Clear();
			value = 0;
		}
		if (overflow)
			value = overflow < 0 ? LLONG_MIN : 0;
	}
	Py_DECREF(ret);
	return value < 0 ? (long)value : 0;
}

/* limit from Python: a positive int, anything past PY_SSIZE_T_MAX as "no limit". */
static int as_limit(PyObject *obj, Py_ssize_t *limit)
{
	*limit = PyLong_AsSsize_t(obj);
	if (*limit == -1 && PyErr_Occurred()) {
		if (!PyErr_ExceptionMatches(PyExc_OverflowError))
			return -1;
		PyErr_Clear();
		*limit = PY_SSIZE_T_MAX;
	}
	if (*limit < 1) {
		PyErr_Format(PyExc_ValueError, "limit must be at least 1, got %zd", *limit);
		return -1;
	}
	return 0;
}

/* A ring's data size from Python: a power of two of at least a page (kernel/bpf/ringbuf.c and
 * perf_mmap both refuse anything else), small enough that twice it fits a Py_ssize_t. */
static int check_size(unsigned long long size, const char *what)
{
	if (size < (unsigned long long)page_size || (size & (size - 1)) || size > ((unsigned long long)PY_SSIZE_T_MAX >> 2)) {
		PyErr_Format(PyExc_ValueError, "%s size must be a power of two of at least a page, got %llu", what, size);
		return -1;
	}
	return 0;
}

/* A record size from Python for a batch: 1 to max bytes. */
static int as_itemsize(PyObject *obj, Py_ssize_t max, Py_ssize_t *itemsize)
{
	*itemsize = PyLong_AsSsize_t(obj);
	if (*itemsize == -1 && PyErr_Occurred())
		return -1;
	if (*itemsize <= 0 || *itemsize > max) {
		PyErr_Format(PyExc_ValueError, "itemsize must be 1 to %zd, got %zd", max, *itemsize);
		return -1;
	}
	return 0;
}

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t need, const char *what)
{
	if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
		return -1;
	if (view->len < need) {
		PyErr_Format(PyExc_ValueError, "the %s mapping is %zd bytes, the ring needs %zd", what, view->len, need);
		PyBuffer_Release(view);
		view->obj = NULL;
		return -1;
	}
	return 0;
}

/* Batches bigger than this are copied with non-temporal stores where the CPU has them: the
 * output is written once and read later, so skipping the cache saves reading each destination
 * line before writing it. Results this big also come from a Block (below). */
#define LARGE_BATCH_BYTES (1 << 20)

/* How a batch copies one record, chosen once per batch. */
enum copy_mode {
	COPY_ANY,    /* memcpy */
	COPY_SMALL,  /* records of 8 or 16 bytes: inline 8-byte moves, no call */
	COPY_STREAM, /* a large batch of records a multiple of 16 bytes: non-temporal stores */
};

static enum copy_mode copy_mode_for(const uint8_t *out, Py_ssize_t out_len, Py_ssize_t itemsize)
{
#ifdef __SSE2__
	if (itemsize % 16 == 0 && ((uintptr_t)out & 15) == 0 && out_len >= LARGE_BATCH_BYTES)
		return COPY_STREAM;
#endif
	return itemsize == 8 || itemsize == 16 ? COPY_SMALL : COPY_ANY;
}

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

static inline void copy_done(enum copy_mode mode)
{
#ifdef __SSE2__
	if (mode == COPY_STREAM)
		_mm_sfence(); /* the streamed stores are visible before the caller reads the array */
#endif
}

/* ------------------------------------------------------------------------------------------------
 * RingState: the consumer of a BPF_MAP_TYPE_RINGBUF.
 *
 * kernel/bpf/ringbuf.c maps consumer_pos alone on page 0 (read-write for us) and, from page 1,
 * producer_pos then the data area twice back to back (read-only), so a record that wraps the end is
 * contiguous. Only user space writes consumer_pos; only the kernel writes producer_pos and headers.
 */
typedef struct {
	PyObject_HEAD
	Py_buffer cons_buf, prod_buf;
	uint64_t *consumer_pos;
	const uint64_t *producer_pos;
	const uint8_t *data;
	uint64_t size, mask;
	uint64_t last; /* consumer_pos as this consumer last stored (or found) it */
	PyObject *corrupt;
	int open;
	int walking; /* a walk is running: release() is refused while it reads the mappings */
	unsigned long walk_generation; /* the fork_generation it started in (see walk_is_ours) */
	int shared;  /* other consumers may move consumer_pos too: no "another process wrote it" check */
} RingState;

static int ring_check_open(RingState *s)
{
	if (!s->open) {
		PyErr_SetString(PyExc_ValueError, "the ring is closed");
		return -1;
	}
	return 0;
}

/* A walk stores the position before each callback and goes on from its own copy: a second walk, a
 * resync or a commit of the same ring meanwhile (another thread, or that callback) would deliver
 * records twice and move the position back. The consumer lock keeps them apart; this is for every
 * caller. */
static int ring_check_idle(RingState *s)
{
	if (s->walking) {
		PyErr_SetString(PyExc_RuntimeError,
				"the ring is being consumed (from its own callback, or another thread): one walk at a time");
		return -1;
	}
	return 0;
}

static void ring_store(RingState *s, uint64_t cons)
{
	/* Pairs with the smp_load_acquire(&rb->consumer_pos) in __bpf_ringbuf_reserve(): our reads of
	 * the records before cons are done before a producer may reuse their space. */
	__atomic_store_n(s->consumer_pos, cons, __ATOMIC_RELEASE);
	s->last = cons;
}

/* Check the positions against each other: -1 with RingCorruptError set, or 0. */
static int ring_check_positions(RingState *s, uint64_t cons, uint64_t prod)
{
	if (cons & 7) {
		raise_corrupt(s->corrupt, Py_BuildValue("{s:K,s:K}", "consumer_pos", cons, "producer_pos", prod),
			      "consumer_pos %llu is not 8-byte aligned", (unsigned long long)cons);
		return -1;
	}
	if (cons > prod) {
		raise_corrupt(s->corrupt, Py_BuildValue("{s:K,s:K}", "consumer_pos", cons, "producer_pos", prod),
			      "consumer_pos %llu is past producer_pos %llu", (unsigned long long)cons, (unsigned long long)prod);
		return -1;
	}
	/* __bpf_ringbuf_reserve() never lets producer_pos get more than mask bytes ahead. */
	if (prod - cons > s->mask) {
		raise_corrupt(s->corrupt, Py_BuildValue("{s:K,s:K}", "consumer_pos", cons, "producer_pos", prod),
			      "producer_pos %llu is %llu bytes ahead of consumer_pos %llu, the whole %llu-byte ring or more",
			      (unsigned long long)prod, (unsigned long long)(prod - cons), (unsigned long long)cons,
			      (unsigned long long)s->size);
		return -1;
	}
	return 0;
}

/* Where a walk starts: consumer_pos as this consumer left it, and producer_pos, both checked. */
static int ring_begin(RingState *s, uint64_t *cons, uint64_t *prod)
{
	if (ring_check_open(s) < 0)
		return -1;
	*cons = __atomic_load_n(s->consumer_pos, __ATOMIC_RELAXED);
	/* Pairs with the smp_store_release(&rb->producer_pos) in __bpf_ringbuf_reserve(). */
	*prod = __atomic_load_n(s->producer_pos, __ATOMIC_ACQUIRE);
	if (*cons != s->last && !s->shared) {
		raise_corrupt(s->corrupt,
			      Py_BuildValue("{s:K,s:K,s:K}", "consumer_pos", *cons, "producer_pos", *prod, "expected", s->last),
			      "consumer_pos is %llu, this consumer left it at %llu: another process wrote it",
			      (unsigned long long)*cons, (unsigned long long)s->last);
		return -1;
	}
	return ring_check_positions(s, *cons, *prod);
}

/* The header at cons, loaded with acquire: pairs with the xchg of the header in
 * bpf_ringbuf_commit(), so the record's bytes are complete once BUSY is seen clear. */
static inline uint32_t ring_header(RingState *s, uint64_t cons)
{
	return __atomic_load_n((const uint32_t *)(s->data + (cons & s->mask)), __ATOMIC_ACQUIRE);
}

/* The position after the record at cons, or -1 with RingCorruptError set when it runs past
 * producer_pos (cons and prod are checked, so prod - cons <= size: the record stays in the
 * double mapping). */
static int ring_next(RingState *s, uint64_t cons, uint64_t prod, uint32_t len, uint64_t *next)
{
	*next = cons + roundup_len(len);
	if (*next > prod) {
		raise_corrupt(s->corrupt,
			      Py_BuildValue("{s:K,s:K,s:k}", "consumer_pos", cons, "producer_pos", prod, "len", (unsigned long)len),
			      "the record at %llu claims %u bytes, past producer_pos %llu", (unsigned long long)cons,
			      len & LEN_MASK, (unsigned long long)prod);
		return -1;
	}
	return 0;
}

/* Re-read producer_pos after catching up with the last one; -1 (error set) if it went wrong. */
static int ring_reread(RingState *s, uint64_t cons, uint64_t *prod)
{
	*prod = __atomic_load_n(s->producer_pos, __ATOMIC_ACQUIRE);
	return ring_check_positions(s, cons, *prod);
}

static PyObject *ring_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = { "consumer_mm", "producer_mm", "size", "corrupt", "shared", NULL };
	PyObject *cons_obj, *prod_obj, *corrupt;
	unsigned long long size;
	int shared = 0;
	RingState *s;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOKO|p:RingState", kwlist, &cons_obj, &prod_obj, &size, &corrupt,
					 &shared))
		return NULL;
	if (check_size(size, "ring") < 0)
		return NULL;
	if (!PyCallable_Check(corrupt)) {
		PyErr_SetString(PyExc_TypeError, "corrupt must be callable");
		return NULL;
	}
	s = (RingState *)type->tp_alloc(type, 0);
	if (!s)
		return NULL;
	if (get_buffer(cons_obj, &s->cons_buf, 1, 8, "consumer page") < 0 ||
	    get_buffer(prod_obj, &s->prod_buf, 0, page_size + 2 * (Py_ssize_t)size, "producer page and data") < 0) {
		Py_DECREF(s);
		return NULL;
	}
	s->consumer_pos = s->cons_buf.buf;
	s->producer_pos = s->prod_buf.buf;
	s->data = (const uint8_t *)s->prod_buf.buf + page_size;
	s->size = size;
	s->mask = size - 1;
	s->last = __atomic_load_n(s->consumer_pos, __ATOMIC_RELAXED);
	Py_INCREF(corrupt);
	s->corrupt = corrupt;
	s->shared = shared;
	s->open = 1;
	return (PyObject *)s;
}

static void release_buffer(Py_buffer *view)
{
	if (view->obj)
		PyBuffer_Release(view);
	view->obj = NULL;
}

/* release() drops the mappings (they are unmapped when their last holder lets go); refused while
 * a walk of this ring is running (a callback that closes its own ring). */
static PyObject *ring_release(RingState *s, PyObject *unused)
{
	if (walk_is_ours(s->walking, s->walk_generation)) {
		PyErr_SetString(PyExc_RuntimeError, "the ring is being consumed (close() from its own callback?)");
		return NULL;
	}
	s->open = 0;
	release_buffer(&s->cons_buf);
	release_buffer(&s->prod_buf);
	Py_RETURN_NONE;
}

static void ring_dealloc(RingState *s)
{
	s->walking = 0;
	ring_release(s, NULL);
	Py_CLEAR(s->corrupt);
	Py_TYPE(s)->tp_free((PyObject *)s);
}

/* positions() -> (consumer_pos, producer_pos) as they are now, unchecked. */
static PyObject *ring_positions(RingState *s, PyObject *unused)
{
	if (ring_check_open(s) < 0)
		return NULL;
	return Py_BuildValue("(KK)", (unsigned long long)__atomic_load_n(s->consumer_pos, __ATOMIC_RELAXED),
			     (unsigned long long)__atomic_load_n(s->producer_pos, __ATOMIC_ACQUIRE));
}

/* avail() -> producer_pos - consumer_pos, checked (RingCorruptError): at most the ring's size. */
static PyObject *ring_avail(RingState *s, PyObject *unused)
{
	uint64_t cons, prod;

	if (ring_begin(s, &cons, &prod) < 0)
		return NULL;
	return PyLong_FromUnsignedLongLong(prod - cons);
}

/* resync() -> bytes skipped: move consumer_pos to producer_pos, whatever was written there. */
static PyObject *ring_resync(RingState *s, PyObject *unused)
{
	uint64_t prod, skipped;

	if (ring_check_open(s) < 0 || ring_check_idle(s) < 0)
		return NULL;
	prod = __atomic_load_n(s->producer_pos, __ATOMIC_ACQUIRE);
	skipped = prod >= s->last ? prod - s->last : 0;
	ring_store(s, prod);
	return PyLong_FromUnsignedLongLong(skipped);
}

/* consume(callback, limit) -> int
 *
 * Delivers committed records to callback(bytes) in order, storing consumer_pos before each call,
 * so a record counts as consumed once its callback is entered. Returns the number delivered, or
 * the callback's negative return value. Exceptions from the callback propagate. Corruption met
 * after some progress ends the call there (the next call meets it first and raises).
 */
static PyObject *ring_consume(RingState *s, PyObject *const *args, Py_ssize_t nargs)
{
	Py_ssize_t limit, count = 0;
	uint64_t cons, prod, start;
	unsigned long generation;
	long stop = 0;

	if (nargs != 2) {
		PyErr_SetString(PyExc_TypeError, "consume(callback, limit) takes 2 arguments");
		return NULL;
	}
	if (as_limit(args[1], &limit) < 0 || ring_check_idle(s) < 0 || ring_begin(s, &cons, &prod) < 0)
		return NULL;
	start = cons;
	generation = fork_generation;
	s->walking++;
	s->walk_generation = generation;
	for (;;) {
		while (cons < prod) {
			const uint8_t *hdr = s->data + (cons & s->mask);
			uint32_t len = ring_header(s, cons);
			uint64_t next;
			PyObject *record, *ret;

			if (len & BPF_RINGBUF_BUSY_BIT)
				goto done;
			if (ring_next(s, cons, prod, len, &next) < 0)
				goto corrupt;
			if (len & BPF_RINGBUF_DISCARD_BIT) {
				ring_store(s, next);
				cons = next;
				continue;
			}
			record = PyBytes_FromStringAndSize((const char *)hdr + BPF_RINGBUF_HDR_SZ, len & LEN_MASK);
			if (!record)
				goto fail;
			/* Give the space back before the callback runs: an exception (or Ctrl-C) in it
			 * never redelivers the record. */
			ring_store(s, next);
			cons = next;
			ret = PyObject_CallOneArg(args[0], record);
			Py_DECREF(record);
			count++;
			if (!ret || check_not_forked(generation) < 0) {
				Py_XDECREF(ret);
				goto fail;
			}
			if ((stop = stop_value(ret)) < 0 || count >= limit)
				goto done;
			if (count % SIGNAL_CHECK_INTERVAL == 0 && PyErr_CheckSignals() < 0)
				goto fail;
		}
		/* consumer_pos is stored: re-read producer_pos, so a commit that saw the old
		 * consumer_pos (and skipped the wakeup) is still delivered by this call. */
		if (ring_reread(s, cons, &prod) < 0)
			goto corrupt;
		if (cons == prod)
			break;
	}
done:
	s->walking--;
	return PyLong_FromSsize_t(stop ? stop : count);
corrupt:
	if (cons != start) {
		PyErr_Clear(); /* met after progress: this call returns what it did, the next one raises */
		goto done;
	}
fail:
	s->walking--;
	return NULL;
}

/* take(itemsize, out, taken, dtype) -> n
 *
 * The copying batch in one pass over the ring: copy each committed record of itemsize bytes into
 * the next slot of the writable contiguous buffer out, skipping discarded records of any size,
 * until out is full, producer_pos (as read at the start), or a record it cannot take (BUSY, or
 * committed with another size: RecordSizeError if nothing came before it, else the next call
 * raises). Then n is appended to the list taken and consumer_pos stored, with no signal check in
 * between: a caller that keeps out and taken loses nothing to a Ctrl-C after this returns.
 */
static PyObject *ring_take(RingState *s, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer out_buf;
	Py_ssize_t itemsize, cap, n = 0;
	uint64_t cons, prod, start;
	enum copy_mode mode = COPY_ANY;
	PyObject *count;
	uint8_t *out;

	if (nargs != 4 || !PyList_Check(args[2])) {
		PyErr_SetString(PyExc_TypeError, "take(itemsize, out, taken, dtype) takes an int, a buffer, a list and a dtype");
		return NULL;
	}
	if (as_itemsize(args[0], LEN_MASK, &itemsize) < 0 || ring_check_idle(s) < 0)
		return NULL;
	if (PyObject_GetBuffer(args[1], &out_buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
		return NULL;
	if (ring_begin(s, &cons, &prod) < 0)
		goto fail;
	out = out_buf.buf;
	cap = out_buf.len / itemsize;
	mode = copy_mode_for(out, out_buf.len, itemsize);
	start = cons;
	while (n < cap && cons < prod) {
		const uint8_t *hdr = s->data + (cons & s->mask);
		uint32_t len = ring_header(s, cons);
		uint64_t next;

		if (len & BPF_RINGBUF_BUSY_BIT)
			break;
		if (ring_next(s, cons, prod, len, &next) < 0) {
			if (cons == start)
				goto fail;
			PyErr_Clear(); /* after progress: take what came before, the next call raises */
			break;
		}
		if (!(len & BPF_RINGBUF_DISCARD_BIT)) {
			if ((uint64_t)len != (uint64_t)itemsize) {
				if (n == 0) {
					ring_store(s, cons); /* past the discarded records before it, if any */
					PyErr_Format(record_size_error,
						     "the record at consumer_pos %llu is %u bytes, dtype %S expects %zd; it stays in "
						     "the ring (read it with consume_batch() without a dtype)",
						     (unsigned long long)cons, len & LEN_MASK, args[3], itemsize);
					goto fail;
				}
				break;
			}
			copy_record(out + n * itemsize, hdr + BPF_RINGBUF_HDR_SZ, itemsize, mode);
			n++;
		}
		cons = next;
	}
	copy_done(mode);
	count = PyLong_FromSsize_t(n);
	if (!count || PyList_Append(args[2], count) < 0) {
		Py_XDECREF(count);
		goto fail;
	}
	ring_store(s, cons);
	PyBuffer_Release(&out_buf);
	return count; /* the list's reference plus this one */
fail:
	PyBuffer_Release(&out_buf);
	return NULL;
}

/* scan(itemsize, limit, dtype) -> (pos, n)
 *
 * For the zero-copy batch: past any discarded records at the head (consumer_pos moves past them),
 * how many committed records of exactly itemsize bytes follow from pos, at most limit, before
 * anything else (BUSY, another size, a discard a view cannot skip). A committed record of another
 * size at the head raises RecordSizeError and stays in the ring. The records stay reserved until
 * commit(pos + n * stride).
 */
static PyObject *ring_scan(RingState *s, PyObject *const *args, Py_ssize_t nargs)
{
	Py_ssize_t itemsize, limit, n = 0;
	uint64_t cons, prod, stride;

	if (nargs != 3) {
		PyErr_SetString(PyExc_TypeError, "scan(itemsize, limit, dtype) takes 3 arguments");
		return NULL;
	}
	if (as_itemsize(args[0], LEN_MASK, &itemsize) < 0)
		return NULL;
	if (as_limit(args[1], &limit) < 0 || ring_check_idle(s) < 0 || ring_begin(s, &cons, &prod) < 0)
		return NULL;
	while (cons < prod) {
		uint32_t len = ring_header(s, cons);
		uint64_t next;

		if (len & BPF_RINGBUF_BUSY_BIT)
			break;
		if (ring_next(s, cons, prod, len, &next) < 0) {
			ring_store(s, cons);
			return NULL;
		}
		if (!(len & BPF_RINGBUF_DISCARD_BIT)) {
			if ((uint64_t)len != (uint64_t)itemsize) {
				ring_store(s, cons);
				PyErr_Format(record_size_error,
					     "the record at consumer_pos %llu is %u bytes, dtype %S expects %zd; it stays in the "
					     "ring (read it with consume_batch() without a dtype)",
					     (unsigned long long)cons, len & LEN_MASK, args[2], itemsize);
				return NULL;
			}
			break;
		}
		cons = next;
	}
	ring_store(s, cons);
	stride = roundup_len((uint32_t)itemsize);
	for (uint64_t pos = cons; n < limit && pos + stride <= prod && ring_header(s, pos) == (uint32_t)itemsize; pos += stride)
		n++;
	return Py_BuildValue("(Kn)", (unsigned long long)cons, n);
}

/* commit(pos): the records before pos are consumed (after a zero-copy batch). pos must lie
 * between where this consumer is and producer_pos. */
static PyObject *ring_commit(RingState *s, PyObject *arg)
{
	unsigned long long pos = PyLong_AsUnsignedLongLong(arg);
	uint64_t prod;

	if (pos == (unsigned long long)-1 && PyErr_Occurred())
		return NULL;
	if (ring_check_open(s) < 0 || ring_check_idle(s) < 0)
		return NULL;
	prod = __atomic_load_n(s->producer_pos, __ATOMIC_ACQUIRE);
	if (pos < s->last || pos > prod || (pos & 7)) {
		PyErr_Format(PyExc_ValueError, "commit(%llu): not between this consumer's position %llu and producer_pos %llu", pos,
			     (unsigned long long)s->last, (unsigned long long)prod);
		return NULL;
	}
	ring_store(s, pos);
	Py_RETURN_NONE;
}

static PyMethodDef ring_methods[] = {
	{ "consume", (PyCFunction)(void (*)(void))ring_consume, METH_FASTCALL, "consume(callback, limit) -> int" },
	{ "take", (PyCFunction)(void (*)(void))ring_take, METH_FASTCALL, "take(itemsize, out, taken, dtype) -> n" },
	{ "scan", (PyCFunction)(void (*)(void))ring_scan, METH_FASTCALL, "scan(itemsize, limit, dtype) -> (pos, n)" },
	{ "commit", (PyCFunction)ring_commit, METH_O, "commit(pos): consumer_pos = pos" },
	{ "positions", (PyCFunction)ring_positions, METH_NOARGS, "positions() -> (consumer_pos, producer_pos), unchecked" },
	{ "avail", (PyCFunction)ring_avail, METH_NOARGS, "avail() -> producer_pos - consumer_pos, checked" },
	{ "resync", (PyCFunction)ring_resync, METH_NOARGS, "resync() -> bytes skipped to reach producer_pos" },
	{ "release", (PyCFunction)ring_release, METH_NOARGS, "release(): let go of the mappings" },
	{ NULL },
};

static PyTypeObject RingStateType = {
	PyVarObject_HEAD_INIT(NULL, 0).tp_name = "bpfring._fastring.RingState",
	.tp_basicsize = sizeof(RingState),
	.tp_dealloc = (destructor)ring_dealloc,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_new = ring_new,
	.tp_methods = ring_methods,
	.tp_doc = "RingState(consumer_mm, producer_mm, size, corrupt): the consumer of one BPF ring buffer.",
};

/* ------------------------------------------------------------------------------------------------
 * PerfRingState: the reader of one CPU's BPF output perf ring.
 *
 * kernel/events/ring_buffer.c: the kernel writes records and advances data_head; the reader
 * advances data_tail. The whole first page (struct perf_event_mmap_page) is writable by every
 * process that maps the event, so both positions are checked. The data area is mapped once: a
 * record may wrap its end and is copied in two pieces. Record sizes are multiples of 8
 * (perf_prepare_header), so an aligned header or field never straddles the end.
 */
typedef struct {
	PyObject_HEAD
	Py_buffer buf;
	const uint64_t *head_ptr;
	uint64_t *tail_ptr;
	const uint8_t *base;
	uint64_t size, mask;
	uint64_t last; /* data_tail as this reader last stored (or found) it */
	PyObject *cpu, *corrupt;
	int open, walking;
	unsigned long walk_generation; /* as RingState's */
} PerfRingState;

static int perf_check_open(PerfRingState *s)
{
	if (!s->open) {
		PyErr_SetString(PyExc_ValueError, "the perf ring is closed");
		return -1;
	}
	return 0;
}

/* As ring_check_idle. */
static int perf_check_idle(PerfRingState *s)
{
	if (s->walking) {
		PyErr_Format(PyExc_RuntimeError,
			     "the perf ring of cpu %S is being consumed (from its own callback, or another thread): one walk "
			     "at a time", s->cpu);
		return -1;
	}
	return 0;
}

static void perf_store(PerfRingState *s, uint64_t tail)
{
	/* The reads of the records before tail are done before the kernel may overwrite them: it
	 * pairs this with the smp_mb() in perf_output_begin() before it reads data_tail. */
	__atomic_store_n(s->tail_ptr, tail, __ATOMIC_RELEASE);
	s->last = tail;
}

static int perf_check_positions(PerfRingState *s, uint64_t tail, uint64_t head)
{
	const char *what = NULL;

	if (tail & 7)
		what = "data_tail %llu is not 8-byte aligned (data_head %llu)";
	else if (tail > head)
		what = "data_tail %llu is past data_head %llu";
	else if (head - tail > s->mask) /* perf_output_begin() always leaves a byte free (CIRC_SPACE) */
		what = "data_tail %llu is the whole ring or more behind data_head %llu";
	if (what) {
		raise_corrupt(s->corrupt, Py_BuildValue("{s:K,s:K}", "data_tail", tail, "data_head", head), what,
			      (unsigned long long)tail, (unsigned long long)head);
		return -1;
	}
	return 0;
}

static int perf_begin(PerfRingState *s, uint64_t *tail, uint64_t *head)
{
	if (perf_check_open(s) < 0)
		return -1;
	*tail = __atomic_load_n(s->tail_ptr, __ATOMIC_RELAXED);
	/* Pairs with the smp_wmb() before the kernel publishes data_head (perf_output_put_handle). */
	*head = __atomic_load_n(s->head_ptr, __ATOMIC_ACQUIRE);
	if (*tail != s->last) {
		raise_corrupt(s->corrupt,
			      Py_BuildValue("{s:K,s:K,s:K}", "data_tail", *tail, "data_head", *head, "expected", s->last),
			      "data_tail is %llu, this reader left it at %llu: another process wrote it",
			      (unsigned long long)*tail, (unsigned long long)s->last);
		return -1;
	}
	return perf_check_positions(s, *tail, *head);
}

static inline uint64_t perf_u64(PerfRingState *s, uint64_t pos)
{
	return *(const uint64_t *)(s->base + (pos & s->mask));
}

static inline uint32_t perf_u32(PerfRingState *s, uint64_t pos)
{
	return *(const uint32_t *)(s->base + (pos & s->mask));
}

/* Check the record at tail whose header is header: its size fits what is left up to head and its
 * type's fields fit its size. -1 with RingCorruptError set, or 0. */
static int perf_check_record(PerfRingState *s, uint64_t tail, uint64_t head, uint64_t header)
{
	uint64_t rec_size = header >> 48;
	uint32_t type = (uint32_t)header, raw_size;

	if (rec_size < PERF_HEADER_SIZE || rec_size & 7 || rec_size > head - tail) {
		raise_corrupt(s->corrupt,
			      Py_BuildValue("{s:K,s:K,s:K}", "data_tail", tail, "data_head", head, "size", rec_size),
			      "the record at %llu is %llu bytes, %llu are left before data_head", (unsigned long long)tail,
			      (unsigned long long)rec_size, (unsigned long long)(head - tail));
		return -1;
	}
	if (type == PERF_RECORD_SAMPLE &&
	    (rec_size < PERF_SAMPLE_MIN || (uint64_t)(raw_size = perf_u32(s, tail + 8)) + 12 > rec_size)) {
		raise_corrupt(s->corrupt,
			      Py_BuildValue("{s:K,s:K,s:K}", "data_tail", tail, "data_head", head, "size", rec_size),
			      "the sample at %llu is a %llu-byte record, too small for its raw size", (unsigned long long)tail,
			      (unsigned long long)rec_size);
		return -1;
	}
	if (type == PERF_RECORD_LOST && rec_size < PERF_LOST_SIZE) {
		raise_corrupt(s->corrupt,
			      Py_BuildValue("{s:K,s:K,s:K}", "data_tail", tail, "data_head", head, "size", rec_size),
			      "the lost record at %llu is %llu bytes, %d needed", (unsigned long long)tail,
			      (unsigned long long)rec_size, PERF_LOST_SIZE);
		return -1;
	}
	return 0;
}

/* Copy len bytes from ring position pos; the data area is mapped once, so a piece that wraps the
 * end comes in two. */
static void perf_copy(PerfRingState *s, uint8_t *dst, uint64_t pos, uint64_t len)
{
	uint64_t start = pos & s->mask;

	if (start + len <= s->size) {
		memcpy(dst, s->base + start, len);
	} else {
		memcpy(dst, s->base + start, s->size - start);
		memcpy(dst + (s->size - start), s->base, len - (s->size - start));
	}
}

static PyObject *perf_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = { "mm", "size", "cpu", "corrupt", NULL };
	PyObject *mm, *cpu, *corrupt;
	unsigned long long size;
	PerfRingState *s;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "OKOO:PerfRingState", kwlist, &mm, &size, &cpu, &corrupt))
		return NULL;
	if (check_size(size, "perf ring") < 0)
		return NULL;
	if (!PyCallable_Check(corrupt)) {
		PyErr_SetString(PyExc_TypeError, "corrupt must be callable");
		return NULL;
	}
	s = (PerfRingState *)type->tp_alloc(type, 0);
	if (!s)
		return NULL;
	if (get_buffer(mm, &s->buf, 1, page_size + (Py_ssize_t)size, "perf ring") < 0) {
		Py_DECREF(s);
		return NULL;
	}
	s->head_ptr = (const uint64_t *)((const uint8_t *)s->buf.buf + PERF_DATA_HEAD_OFFSET);
	s->tail_ptr = (uint64_t *)((uint8_t *)s->buf.buf + PERF_DATA_TAIL_OFFSET);
	s->base = (const uint8_t *)s->buf.buf + page_size;
	s->size = size;
	s->mask = size - 1;
	s->last = __atomic_load_n(s->tail_ptr, __ATOMIC_RELAXED);
	Py_INCREF(cpu);
	s->cpu = cpu;
	Py_INCREF(corrupt);
	s->corrupt = corrupt;
	s->open = 1;
	return (PyObject *)s;
}

static PyObject *perf_release(PerfRingState *s, PyObject *unused)
{
	if (walk_is_ours(s->walking, s->walk_generation)) {
		PyErr_SetString(PyExc_RuntimeError, "the perf ring is being consumed (close() from its own callback?)");
		return NULL;
	}
	s->open = 0;
	release_buffer(&s->buf);
	Py_RETURN_NONE;
}

static void perf_dealloc(PerfRingState *s)
{
	s->walking = 0;
	perf_release(s, NULL);
	Py_CLEAR(s->cpu);
	Py_CLEAR(s->corrupt);
	Py_TYPE(s)->tp_free((PyObject *)s);
}

/* positions() -> (data_head, data_tail) as they are now, unchecked. */
static PyObject *perf_positions(PerfRingState *s, PyObject *unused)
{
	if (perf_check_open(s) < 0)
		return NULL;
	return Py_BuildValue("(KK)", (unsigned long long)__atomic_load_n(s->head_ptr, __ATOMIC_ACQUIRE),
			     (unsigned long long)__atomic_load_n(s->tail_ptr, __ATOMIC_RELAXED));
}

/* avail() -> data_head - data_tail, checked: at most the ring's size. */
static PyObject *perf_avail(PerfRingState *s, PyObject *unused)
{
	uint64_t tail, head;

	if (perf_begin(s, &tail, &head) < 0)
		return NULL;
	return PyLong_FromUnsignedLongLong(head - tail);
}

/* resync() -> bytes skipped: move data_tail to data_head. */
static PyObject *perf_resync(PerfRingState *s, PyObject *unused)
{
	uint64_t head, skipped;

	if (perf_check_open(s) < 0 || perf_check_idle(s) < 0)
		return NULL;
	head = __atomic_load_n(s->head_ptr, __ATOMIC_ACQUIRE);
	skipped = head >= s->last ? head - s->last : 0;
	perf_store(s, head & ~7ULL); /* data_head is written by anyone too: keep the tail aligned */
	return PyLong_FromUnsignedLongLong(skipped);
}

/* consume(sample_cb, lost_cb, into, expect_lo, expect_hi, limit) -> int
 *
 * Samples to sample_cb(cpu, data) (or appended to ``into`` as (cpu, data) when it is not None),
 * lost counts to lost_cb(cpu, lost). data_tail is stored before each callback, so a record counts
 * as consumed once its callback is entered. With expect_hi > 0, a sample whose raw size is outside
 * [expect_lo, expect_hi] raises RecordSizeError and stays in the ring. Stops after ``limit``
 * samples. Returns samples delivered or a negative callback return. Corruption met after some
 * progress ends the call there; the next call meets it first and raises.
 */
static PyObject *perf_consume(PerfRingState *s, PyObject *const *args, Py_ssize_t nargs)
{
	PyObject *sample_cb, *lost_cb, *into, *append = NULL, *result = NULL;
	unsigned long expect_lo, expect_hi;
	Py_ssize_t limit, count = 0;
	uint64_t tail, head, start;
	unsigned long generation = fork_generation;
	long stop = 0;

	if (nargs != 6) {
		PyErr_SetString(PyExc_TypeError, "consume() takes 6 arguments");
		return NULL;
	}
	sample_cb = args[0];
	lost_cb = args[1];
	into = args[2];
	expect_lo = PyLong_AsUnsignedLong(args[3]);
	expect_hi = PyLong_AsUnsignedLong(args[4]);
	if (PyErr_Occurred() || as_limit(args[5], &limit) < 0)
		return NULL;
	if (perf_check_idle(s) < 0)
		return NULL;
	if (into != Py_None && !(append = PyObject_GetAttrString(into, "append")))
		return NULL;
	if (perf_begin(s, &tail, &head) < 0) {
		Py_XDECREF(append);
		return NULL;
	}
	start = tail;
	s->walking++;
	s->walk_generation = generation;
	for (;;) {
		while (tail < head) {
			uint64_t header = perf_u64(s, tail), next;
			uint32_t type = (uint32_t)header;
			PyObject *ret;

			if (perf_check_record(s, tail, head, header) < 0)
				goto corrupt;
			next = tail + (header >> 48);
			if (type == PERF_RECORD_SAMPLE) {
				uint32_t raw_size = perf_u32(s, tail + 8);
				PyObject *data;

				if (expect_hi && (raw_size < expect_lo || raw_size > expect_hi)) {
					PyErr_Format(record_size_error,
						     "the sample at %llu of the perf buffer of cpu %S is %u bytes, the dtype expects "
						     "%lu (up to %lu with the kernel's padding); it stays in the ring (read it with "
						     "consume_batch() without a dtype)",
						     (unsigned long long)tail, s->cpu, raw_size, expect_lo, expect_hi);
					goto out;
				}
				data = PyBytes_FromStringAndSize(NULL, raw_size);
				if (!data)
					goto out;
				perf_copy(s, (uint8_t *)PyBytes_AS_STRING(data), tail + 12, raw_size);
				/* Copied out: give its space back before the callback runs. */
				perf_store(s, next);
				tail = next;
				count++;
				if (append) {
					PyObject *pair = PyTuple_Pack(2, s->cpu, data);

					Py_DECREF(data);
					if (!pair)
						goto out;
					ret = PyObject_CallOneArg(append, pair);
					Py_DECREF(pair);
				} else {
					ret = PyObject_CallFunctionObjArgs(sample_cb, s->cpu, data, NULL);
					Py_DECREF(data);
				}
			} else if (type == PERF_RECORD_LOST) {
				PyObject *lost = PyLong_FromUnsignedLongLong(perf_u64(s, tail + 16));

				if (!lost)
					goto out;
				perf_store(s, next);
				tail = next;
				ret = PyObject_CallFunctionObjArgs(lost_cb, s->cpu, lost, NULL);
				Py_DECREF(lost);
			} else { /* no other type is written for a BPF output event: skip it */
				perf_store(s, next);
				tail = next;
				continue;
			}
			if (!ret || check_not_forked(generation) < 0) {
				Py_XDECREF(ret);
				goto out;
			}
			if ((stop = stop_value(ret)) < 0)
				goto done;
			if (type == PERF_RECORD_SAMPLE && count >= limit)
				goto done;
			if (count % SIGNAL_CHECK_INTERVAL == 0 && PyErr_CheckSignals() < 0)
				goto out;
		}
		/* Caught up with the head read above: read it again, so records written meanwhile are
		 * delivered by this call rather than waiting for a wakeup. */
		head = __atomic_load_n(s->head_ptr, __ATOMIC_ACQUIRE);
		if (perf_check_positions(s, tail, head) < 0)
			goto corrupt;
		if (tail == head)
			break;
	}
done:
	result = PyLong_FromSsize_t(stop ? stop : count);
	goto out;
corrupt:
	if (tail != start) {
		PyErr_Clear(); /* met after progress: this call returns what it did, the next one raises */
		goto done;
	}
out:
	s->walking--;
	Py_XDECREF(append);
	return result;
}

/* take(itemsize, out, taken, may_raise) -> (n, stop)
 *
 * The copying perf batch: from data_tail up to the data_head read at the start, copy the first
 * itemsize bytes of each sample (raw_size itemsize to itemsize + 7: the kernel's padding is
 * dropped) into the next slot of the writable contiguous buffer out, add up the counts of lost
 * records and skip other records; stop when out is full or at a sample of another size, which
 * stays in the ring (RecordSizeError if may_raise and it is the first). Then (cpu, n, lost) is
 * appended to the list taken and data_tail stored, with no signal check in between: a caller that
 * keeps out and taken loses nothing to a Ctrl-C. stop says where the walk ended: PERF_TAKE_HEAD,
 * PERF_TAKE_FULL or PERF_TAKE_MISFIT.
 */
enum { PERF_TAKE_HEAD, PERF_TAKE_FULL, PERF_TAKE_MISFIT };

static PyObject *perf_take(PerfRingState *s, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer out_buf;
	Py_ssize_t itemsize, cap, n = 0;
	unsigned long long lost = 0;
	uint64_t tail, head, start;
	int may_raise, stop = PERF_TAKE_HEAD;
	PyObject *entry;
	uint8_t *out;

	if (nargs != 4 || !PyList_Check(args[2])) {
		PyErr_SetString(PyExc_TypeError, "take(itemsize, out, taken, may_raise) takes an int, a buffer, a list, a bool");
		return NULL;
	}
	if (as_itemsize(args[0], 0xFFFF, &itemsize) < 0) /* a perf record's size is a u16 */
		return NULL;
	if ((may_raise = PyObject_IsTrue(args[3])) < 0 || perf_check_idle(s) < 0)
		return NULL;
	if (PyObject_GetBuffer(args[1], &out_buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
		return NULL;
	if (perf_begin(s, &tail, &head) < 0)
		goto fail;
	out = out_buf.buf;
	cap = out_buf.len / itemsize;
	start = tail;
	while (tail < head) {
		uint64_t header = perf_u64(s, tail);

		if (n == cap) {
			stop = PERF_TAKE_FULL;
			break;
		}
		if (perf_check_record(s, tail, head, header) < 0) {
			if (tail == start)
				goto fail;
			PyErr_Clear(); /* after progress: take what came before, the next call raises */
			stop = PERF_TAKE_MISFIT;
			break;
		}
		if ((uint32_t)header == PERF_RECORD_SAMPLE) {
			uint32_t raw_size = perf_u32(s, tail + 8);

			if (raw_size < (uint64_t)itemsize || raw_size > (uint64_t)itemsize + 7) {
				if (n == 0 && may_raise) {
					PyErr_Format(record_size_error,
						     "the sample at %llu of the perf buffer of cpu %S is %u bytes, the dtype expects "
						     "%zd (up to %zd with the kernel's padding); it stays in the ring (read it with "
						     "consume_batch() without a dtype)",
						     (unsigned long long)tail, s->cpu, raw_size, itemsize, itemsize + 7);
					goto fail;
				}
				stop = PERF_TAKE_MISFIT;
				break;
			}
			perf_copy(s, out + n * itemsize, tail + 12, itemsize);
			n++;
		} else if ((uint32_t)header == PERF_RECORD_LOST) {
			lost += perf_u64(s, tail + 16);
		}
		tail += header >> 48;
	}
	entry = Py_BuildValue("(OnK)", s->cpu, n, lost);
	if (!entry || PyList_Append(args[2], entry) < 0) {
		Py_XDECREF(entry);
		goto fail;
	}
	Py_DECREF(entry);
	perf_store(s, tail);
	PyBuffer_Release(&out_buf);
	return Py_BuildValue("(ni)", n, stop);
fail:
	PyBuffer_Release(&out_buf);
	return NULL;
}

static PyMethodDef perf_methods[] = {
	{ "consume", (PyCFunction)(void (*)(void))perf_consume, METH_FASTCALL,
	  "consume(sample_cb, lost_cb, into, expect_lo, expect_hi, limit) -> int" },
	{ "take", (PyCFunction)(void (*)(void))perf_take, METH_FASTCALL, "take(itemsize, out, taken, may_raise) -> (n, stop)" },
	{ "positions", (PyCFunction)perf_positions, METH_NOARGS, "positions() -> (data_head, data_tail), unchecked" },
	{ "avail", (PyCFunction)perf_avail, METH_NOARGS, "avail() -> data_head - data_tail, checked" },
	{ "resync", (PyCFunction)perf_resync, METH_NOARGS, "resync() -> bytes skipped to reach data_head" },
	{ "release", (PyCFunction)perf_release, METH_NOARGS, "release(): let go of the mapping" },
	{ NULL },
};

static PyTypeObject PerfRingStateType = {
	PyVarObject_HEAD_INIT(NULL, 0).tp_name = "bpfring._fastring.PerfRingState",
	.tp_basicsize = sizeof(PerfRingState),
	.tp_dealloc = (destructor)perf_dealloc,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_new = perf_new,
	.tp_methods = perf_methods,
	.tp_doc = "PerfRingState(mm, size, cpu, corrupt): the reader of one CPU's perf ring.",
};

/* ------------------------------------------------------------------------------------------------
 * UserRingState: the producer of a BPF_MAP_TYPE_USER_RINGBUF (kernel/bpf/ringbuf.c,
 * __bpf_user_ringbuf_peek and __bpf_user_ringbuf_sample_release). The roles swap: we map
 * consumer_pos read-only and producer_pos plus the data read-write.
 */
typedef struct {
	PyObject_HEAD
	Py_buffer cons_buf, prod_buf;
	const uint64_t *consumer_pos;
	uint64_t *producer_pos;
	uint8_t *data;
	uint64_t size, mask;
	uint64_t last; /* producer_pos as this producer last stored (or found) it */
	PyObject *corrupt;
	int open;
} UserRingState;

static int user_check_open(UserRingState *s)
{
	if (!s->open) {
		PyErr_SetString(PyExc_ValueError, "the user ring is closed");
		return -1;
	}
	return 0;
}

static PyObject *user_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = { "consumer_mm", "producer_mm", "size", "corrupt", NULL };
	PyObject *cons_obj, *prod_obj, *corrupt;
	unsigned long long size;
	UserRingState *s;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOKO:UserRingState", kwlist, &cons_obj, &prod_obj, &size, &corrupt))
		return NULL;
	if (check_size(size, "ring") < 0)
		return NULL;
	if (!PyCallable_Check(corrupt)) {
		PyErr_SetString(PyExc_TypeError, "corrupt must be callable");
		return NULL;
	}
	s = (UserRingState *)type->tp_alloc(type, 0);
	if (!s)
		return NULL;
	if (get_buffer(cons_obj, &s->cons_buf, 0, 8, "consumer page") < 0 ||
	    get_buffer(prod_obj, &s->prod_buf, 1, page_size + 2 * (Py_ssize_t)size, "producer page and data") < 0) {
		Py_DECREF(s);
		return NULL;
	}
	s->consumer_pos = s->cons_buf.buf;
	s->producer_pos = s->prod_buf.buf;
	s->data = (uint8_t *)s->prod_buf.buf + page_size;
	s->size = size;
	s->mask = size - 1;
	s->last = __atomic_load_n(s->producer_pos, __ATOMIC_RELAXED);
	Py_INCREF(corrupt);
	s->corrupt = corrupt;
	s->open = 1;
	return (PyObject *)s;
}

static PyObject *user_release(UserRingState *s, PyObject *unused)
{
	s->open = 0;
	release_buffer(&s->cons_buf);
	release_buffer(&s->prod_buf);
	Py_RETURN_NONE;
}

static void user_dealloc(UserRingState *s)
{
	user_release(s, NULL);
	Py_CLEAR(s->corrupt);
	Py_TYPE(s)->tp_free((PyObject *)s);
}

/* positions() -> (consumer_pos, producer_pos) as they are now, unchecked. */
static PyObject *user_positions(UserRingState *s, PyObject *unused)
{
	if (user_check_open(s) < 0)
		return NULL;
	return Py_BuildValue("(KK)", (unsigned long long)__atomic_load_n(s->consumer_pos, __ATOMIC_ACQUIRE),
			     (unsigned long long)__atomic_load_n(s->producer_pos, __ATOMIC_RELAXED));
}

/* reserve(size) -> (pos, free): write a BUSY header for a record of size bytes at producer_pos and
 * publish the new producer_pos; pos is -1 (nothing written) when the ring has only free bytes. */
static PyObject *user_reserve(UserRingState *s, PyObject *arg)
{
	Py_ssize_t size = PyLong_AsSsize_t(arg);
	uint64_t cons, prod, total, free;
	uint32_t *hdr;

	if (size == -1 && PyErr_Occurred())
		return NULL;
	if (user_check_open(s) < 0)
		return NULL;
	if (size < 1 || (size_t)size > LEN_MASK) {
		PyErr_Format(PyExc_ValueError, "reserve(): size must be 1 to %u, got %zd", LEN_MASK, size);
		return NULL;
	}
	prod = __atomic_load_n(s->producer_pos, __ATOMIC_RELAXED);
	/* Pairs with the smp_store_release(&rb->consumer_pos) in __bpf_user_ringbuf_sample_release():
	 * the kernel is done reading the space we are about to reuse. */
	cons = __atomic_load_n(s->consumer_pos, __ATOMIC_ACQUIRE);
	if (prod != s->last || (prod & 7) || cons > prod || prod - cons > s->size) {
		raise_corrupt(s->corrupt,
			      Py_BuildValue("{s:K,s:K,s:K}", "consumer_pos", cons, "producer_pos", prod, "expected", s->last),
			      "producer_pos %llu (this producer left it at %llu) and consumer_pos %llu are not a ring's",
			      (unsigned long long)prod, (unsigned long long)s->last, (unsigned long long)cons);
		return NULL;
	}
	total = roundup_len((uint32_t)size);
	free = s->size - (prod - cons);
	if (total > free)
		return Py_BuildValue("(LK)", -1LL, (unsigned long long)free);
	hdr = (uint32_t *)(s->data + (prod & s->mask));
	__atomic_store_n(hdr + 1, 0, __ATOMIC_RELAXED); /* pg_off: unused for user rings */
	__atomic_store_n(hdr, (uint32_t)size | BPF_RINGBUF_BUSY_BIT, __ATOMIC_RELAXED);
	/* Release: the BUSY header is visible before the position that covers it; pairs with the
	 * smp_load_acquire(&rb->producer_pos) in __bpf_user_ringbuf_peek(). */
	__atomic_store_n(s->producer_pos, prod + total, __ATOMIC_RELEASE);
	s->last = prod + total;
	return Py_BuildValue("(KK)", (unsigned long long)prod, (unsigned long long)(free - total));
}

/* commit(pos, size, discard): clear BUSY on the record reserved at pos (and set DISCARD). */
static PyObject *user_commit(UserRingState *s, PyObject *const *args, Py_ssize_t nargs)
{
	unsigned long long pos;
	Py_ssize_t size;
	int discard;
	uint32_t len;

	if (nargs != 3) {
		PyErr_SetString(PyExc_TypeError, "commit(pos, size, discard) takes 3 arguments");
		return NULL;
	}
	pos = PyLong_AsUnsignedLongLong(args[0]);
	size = PyLong_AsSsize_t(args[1]);
	if (PyErr_Occurred() || (discard = PyObject_IsTrue(args[2])) < 0)
		return NULL;
	if (user_check_open(s) < 0)
		return NULL;
	if ((pos & 7) || size < 1 || (size_t)size > LEN_MASK) {
		PyErr_Format(PyExc_ValueError, "commit(%llu, %zd): not a reserved record", pos, size);
		return NULL;
	}
	len = (uint32_t)size | (discard ? BPF_RINGBUF_DISCARD_BIT : 0);
	/* Release: the record's bytes are visible before BUSY clears; pairs with the
	 * smp_load_acquire(hdr) in __bpf_user_ringbuf_peek(). */
	__atomic_store_n((uint32_t *)(s->data + (pos & s->mask)), len, __ATOMIC_RELEASE);
	Py_RETURN_NONE;
}

static PyMethodDef user_methods[] = {
	{ "reserve", (PyCFunction)user_reserve, METH_O, "reserve(size) -> (pos, free); pos -1 when it does not fit" },
	{ "commit", (PyCFunction)(void (*)(void))user_commit, METH_FASTCALL, "commit(pos, size, discard)" },
	{ "positions", (PyCFunction)user_positions, METH_NOARGS, "positions() -> (consumer_pos, producer_pos)" },
	{ "release", (PyCFunction)user_release, METH_NOARGS, "release(): let go of the mappings" },
	{ NULL },
};

static PyTypeObject UserRingStateType = {
	PyVarObject_HEAD_INIT(NULL, 0).tp_name = "bpfring._fastring.UserRingState",
	.tp_basicsize = sizeof(UserRingState),
	.tp_dealloc = (destructor)user_dealloc,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_new = user_new,
	.tp_methods = user_methods,
	.tp_doc = "UserRingState(consumer_mm, producer_mm, size, corrupt): the producer of one user ring buffer.",
};
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


static PyMethodDef methods[] = {
	{ "batch_block", batch_block, METH_O, "batch_block(nbytes) -> Block of at least nbytes" },
	{ "release_batch_memory", release_batch_memory, METH_NOARGS, "release_batch_memory() -> bytes unmapped" },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_fastring", "bpfring's record walks over shared ring memory, in C.", -1, methods,
};

PyMODINIT_FUNC PyInit__fastring(void)
{
	PyObject *errors = PyImport_ImportModule("bpfring.errors"), *mod;

	if (!errors)
		return NULL;
	record_size_error = PyObject_GetAttrString(errors, "RecordSizeError");
	Py_DECREF(errors);
	if (!record_size_error)
		return NULL;
	page_size = sysconf(_SC_PAGESIZE);
	if (pthread_atfork(NULL, NULL, on_fork_child) != 0) {
		PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
		return NULL;
	}
	if (PyType_Ready(&BlockType) < 0 || PyType_Ready(&RingStateType) < 0 || PyType_Ready(&PerfRingStateType) < 0 ||
	    PyType_Ready(&UserRingStateType) < 0)
		return NULL;
	mod = PyModule_Create(&module);
	if (!mod)
		return NULL;
	if (PyModule_AddIntConstant(mod, "LARGE_BATCH_BYTES", LARGE_BATCH_BYTES) < 0 ||
	    PyModule_AddIntConstant(mod, "BPF_RINGBUF_BUSY_BIT", BPF_RINGBUF_BUSY_BIT) < 0 ||
	    PyModule_AddIntConstant(mod, "BPF_RINGBUF_DISCARD_BIT", BPF_RINGBUF_DISCARD_BIT) < 0 ||
	    PyModule_AddIntConstant(mod, "BPF_RINGBUF_HDR_SZ", BPF_RINGBUF_HDR_SZ) < 0 ||
	    PyModule_AddIntConstant(mod, "PERF_TAKE_HEAD", PERF_TAKE_HEAD) < 0 ||
	    PyModule_AddObjectRef(mod, "RingState", (PyObject *)&RingStateType) < 0 ||
	    PyModule_AddObjectRef(mod, "PerfRingState", (PyObject *)&PerfRingStateType) < 0 ||
	    PyModule_AddObjectRef(mod, "UserRingState", (PyObject *)&UserRingStateType) < 0)
		Py_CLEAR(mod);
	return mod;
}

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

#define BPF_RINGBUF_BUSY_BIT (1U << 31)
#define BPF_RINGBUF_DISCARD_BIT (1U << 30)
#define BPF_RINGBUF_HDR_SZ 8
#define LEN_MASK (BPF_RINGBUF_DISCARD_BIT - 1)

static PyObject *bpf_error; /* bpfring.errors.BPFError */

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
			if (next > prod) {
				PyObject *exc = PyUnicode_FromFormat("ring record at %llu claims %u bytes, past producer_pos %llu",
								     (unsigned long long)cons, len & LEN_MASK,
								     (unsigned long long)prod);
				if (exc) {
					PyObject *exc_args = Py_BuildValue("(iO)", EBADMSG, exc);
					if (exc_args)
						PyErr_SetObject(bpf_error, exc_args);
					Py_XDECREF(exc_args);
					Py_DECREF(exc);
				}
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
			if (ret != Py_None && PyLong_Check(ret)) {
				long value = PyLong_AsLong(ret);

				Py_DECREF(ret);
				if (value == -1 && PyErr_Occurred())
					PyErr_Clear(); /* a huge int is not negative enough to matter */
				else if (value < 0) {
					stop = value;
					goto done;
				}
			} else {
				Py_DECREF(ret);
			}
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

static PyMethodDef methods[] = {
	{ "consume", (PyCFunction)(void (*)(void))consume, METH_FASTCALL,
	  "consume(consumer_mm, producer_mm, data_offset, mask, callback, limit) -> int" },
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
	Py_DECREF(errors);
	if (!bpf_error)
		return NULL;
	return PyModule_Create(&module);
}

/* mplog._speedups: the hot loops of the spool ring, the record's marshal and the listener's
 * formatting of the common record, compiled.
 *
 * Optional (mplog/_common/compiled.py). mplog/_common/spool.py has the ring's code in Python and is the
 * reference: the layout of a ring is defined there (the entry is "<IIQ": length | flags, Adler-32 of the payload, seq),
 * this file only does the common case faster and hands everything else back to Python:
 *
 *   RingCore.write(payload)  the producer's publish, when the payload fits inline and the room
 *                            known from the last read of the listener's words suffices; else it
 *                            calls the Python method _write_slow(payload, length_word).
 *   RingCore.publish(payload), RingCore.publish_record(d)
 *                            the worker's whole hot path (mplog/_app/channel.py, put_payload and
 *                            SpoolHandler.handle): the state word, the copy, the sent counter,
 *                            the sleeping flag, without the process's lock (the GIL makes the
 *                            call whole; the Python path holds it off with _hold); the second
 *                            makes the common record's payload too, marshal's bytes on the stack.
 *   take_entries(...)        the listener's loop over whole entries in order, each checked; it
 *                            stops where Python's general loop must go on (the end of the data
 *                            area, a WRAP, a big record's reference, an entry that fails).
 *   dumps(obj, version)      marshal.dumps(obj, version), the same bytes, faster for what a
 *                            record holds (version 2; tuples, str, int, float, bytes, None,
 *                            bools); anything else is CPython's own marshal's.
 *   format_common(...)       the listener's loop over common records in the default formats
 *                            (mplog/_listener/batch.py, Batch._format_common is its twin); it reads
 *                            a common record from its marshal bytes in place where it can, and
 *                            a record it does not fully know goes whole to the general path.
 *
 * Why it is safe to run either: both write the same bytes (tests/test_spool.py and
 * tests/test_records.py compare them, the latter with hypothesis), and the reader checks every
 * entry whoever wrote it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "structmember.h"
#include "marshal.h"  /* not in Python.h from 3.11 on */
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define ENTRY_SIZE 16
#define W_HEAD 4
#define W_PUBLISHED 5

/* zlib's Adler-32, the same value as zlib.adler32(data) (RFC 1950). */
#define ADLER_MOD 65521u
#define ADLER_NMAX 5552

static uint32_t
adler32(const unsigned char *buf, Py_ssize_t len)
{
    uint32_t a = 1, b = 0;
    while (len > 0) {
        Py_ssize_t n = len < ADLER_NMAX ? len : ADLER_NMAX;
        len -= n;
        while (n >= 8) {
            a += buf[0]; b += a; a += buf[1]; b += a; a += buf[2]; b += a; a += buf[3]; b += a;
            a += buf[4]; b += a; a += buf[5]; b += a; a += buf[6]; b += a; a += buf[7]; b += a;
            buf += 8;
            n -= 8;
        }
        while (n--) {
            a += *buf++;
            b += a;
        }
        a %= ADLER_MOD;
        b %= ADLER_MOD;
    }
    return (b << 16) | a;
}

/* The entry's fields are little-endian whatever the machine (struct's "<"). */
static inline void
put_u32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16); p[3] = (unsigned char)(v >> 24);
}

static inline uint32_t
get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline uint64_t
get_u64(const unsigned char *p)
{
    return (uint64_t)get_u32(p) | ((uint64_t)get_u32(p + 4) << 32);
}

static inline void
put_u64(unsigned char *p, uint64_t v)
{
    put_u32(p, (uint32_t)v);
    put_u32(p + 4, (uint32_t)(v >> 32));
}

/* The header's words are native int64 (memoryview.cast("q") in Python). The publishing stores
 * are release stores: the compiler and a weakly ordered CPU keep the entry before them (the
 * reader checks each entry anyway). */
static inline void
store_word(unsigned char *base, int index, long long value)
{
    __atomic_store_n((long long *)(base + 8 * index), value, __ATOMIC_RELEASE);
}


typedef struct {
    PyObject_HEAD
    long long head;        /* _head: where the next entry goes (a running offset) */
    long long seq;         /* _seq: the last seq published */
    long long limit;       /* _limit: room as of the last read of the listener's words */
    long long seq_limit;   /* _seq_limit */
    long long capacity;
    long long inline_max;
    long long header;      /* RING_HEADER */
    Py_buffer view;        /* the ring's mapping, held from _attach() to _detach() */
    int attached;
    /* publish(): the process's counter words (_attach_words), and _hold, which the Python path
     * sets while it has the ring or the counters in hand */
    Py_buffer words;
    int words_attached;
    int hold;
    Py_ssize_t w_state, w_sent, w_sleeping;
    long long stopped;
    /* publish_record(): the record's keys (a tuple of str) and the tag of the common record */
    PyObject *keys;
    long tag;
} RingCore;

static PyObject *str_write_slow;

static PyObject *
RingCore_attach(RingCore *self, PyObject *mm)
{
    if (self->attached) {
        PyErr_SetString(PyExc_ValueError, "ring already attached");
        return NULL;
    }
    if (PyObject_GetBuffer(mm, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
        return NULL;
    self->attached = 1;
    Py_RETURN_NONE;
}

static PyObject *
RingCore_detach(RingCore *self, PyObject *Py_UNUSED(ignored))
{
    if (self->attached) {
        self->attached = 0;
        PyBuffer_Release(&self->view);
    }
    if (self->words_attached) {
        self->words_attached = 0;
        PyBuffer_Release(&self->words);
    }
    Py_RETURN_NONE;
}

/* _attach_words(words, state, sent, sleeping, stopped, keys, tag): hold the counters' words (a
 * writable buffer of 8-byte words) for publish(): the service's state word and its stopped
 * value, this process's sent counter, the listener's sleeping flag; and the record's keys and
 * the common record's tag for publish_record(). Sets _hold: the caller clears it. */
static PyObject *
RingCore_attach_words(RingCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t idx[3];
    long long stopped;
    int k;
    long tag;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "_attach_words(words, state, sent, sleeping, stopped, keys, tag)");
        return NULL;
    }
    if (self->words_attached) {
        PyErr_SetString(PyExc_ValueError, "words already attached");
        return NULL;
    }
    if (!PyTuple_CheckExact(args[5]) || PyTuple_GET_SIZE(args[5]) > INT32_MAX) {
        PyErr_SetString(PyExc_TypeError, "_attach_words: keys must be a tuple of str");
        return NULL;
    }
    for (k = 0; k < PyTuple_GET_SIZE(args[5]); k++)
        if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(args[5], k))) {
            PyErr_SetString(PyExc_TypeError, "_attach_words: keys must be a tuple of str");
            return NULL;
        }
    tag = PyLong_AsLong(args[6]);
    if (tag == -1 && PyErr_Occurred())
        return NULL;
    if (tag > INT32_MAX || tag < INT32_MIN) {
        PyErr_SetString(PyExc_ValueError, "_attach_words: tag out of range");
        return NULL;
    }
    for (k = 0; k < 3; k++) {
        idx[k] = PyNumber_AsSsize_t(args[1 + k], PyExc_OverflowError);
        if (idx[k] == -1 && PyErr_Occurred())
            return NULL;
    }
    stopped = PyLong_AsLongLong(args[4]);
    if (stopped == -1 && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &self->words, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
        return NULL;
    for (k = 0; k < 3; k++)
        if (idx[k] < 0 || idx[k] >= self->words.len / 8 || ((uintptr_t)self->words.buf & 7) != 0) {
            PyBuffer_Release(&self->words);
            PyErr_SetString(PyExc_ValueError, "_attach_words: a word index out of the buffer");
            return NULL;
        }
    self->w_state = idx[0];
    self->w_sent = idx[1];
    self->w_sleeping = idx[2];
    self->stopped = stopped;
    self->tag = tag;
    Py_INCREF(args[5]);
    Py_XSETREF(self->keys, args[5]);
    self->hold = 1;
    self->words_attached = 1;
    Py_RETURN_NONE;
}

/* The copy of an entry: 0 written; 1 not the common case (no room known, too big). */
static int
ring_put_raw(RingCore *self, const unsigned char *data, Py_ssize_t n, long long length_word)
{
    long long word = length_word, head, end, seq, at;
    unsigned char *base, *entry;
    if (!self->attached || self->capacity <= 0)
        return 1;
    if (word < 0 && n <= self->inline_max)
        word = n;
    if (word < 0)
        return 1;
    head = self->head;
    end = head + ((n + ENTRY_SIZE + 7) & -8);
    seq = self->seq + 1;
    at = self->header + head % self->capacity;
    if (end > self->limit || seq > self->seq_limit || at + ENTRY_SIZE + n > (long long)self->view.len)
        return 1;
    base = (unsigned char *)self->view.buf;
    entry = base + at;
    put_u32(entry, (uint32_t)word);
    put_u32(entry + 4, adler32(data, n));
    put_u64(entry + 8, (uint64_t)seq);
    memcpy(entry + ENTRY_SIZE, data, (size_t)n);
    self->head = end;
    self->seq = seq;
    store_word(base, W_HEAD, end);  /* head last, as in Python */
    store_word(base, W_PUBLISHED, seq);
    return 0;
}

static int
ring_put(RingCore *self, PyObject *payload, long long length_word)
{
    if (!PyBytes_CheckExact(payload))
        return 1;
    return ring_put_raw(self, (const unsigned char *)PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload),
                        length_word);
}

/* After an entry is in the ring: count it sent; 2 if the listener sleeps, else 1. */
static PyObject *
published(RingCore *self)
{
    long long *words = (long long *)self->words.buf;
    /* this process alone writes its sent counter; the listener reads it */
    __atomic_store_n(&words[self->w_sent], words[self->w_sent] + 1, __ATOMIC_RELEASE);
    return PyLong_FromLong(__atomic_load_n(&words[self->w_sleeping], __ATOMIC_ACQUIRE) ? 2 : 1);
}

/* publish() may go on: the counters are attached, the Python path does not hold the ring, and
 * the service has not stopped. Never without the GIL (a free-threaded build): nothing then makes
 * the call whole, and the lock does it all. */
static inline int
may_publish(RingCore *self)
{
#ifdef Py_GIL_DISABLED
    (void)self;
    return 0;
#else
    return self->words_attached && !self->hold
        && __atomic_load_n(&((long long *)self->words.buf)[self->w_state], __ATOMIC_ACQUIRE) != self->stopped;
#endif
}

/* publish(payload) -> 0, 1 or 2: the worker's whole hot path in one call (mplog/_app/channel.py,
 * put_payload, is its twin and does everything else). 1: published and counted as sent; 2: the
 * same, and the listener sleeps (the caller rings). 0: nothing done: the service stopped, the
 * ring has no room known, the payload is big, or the Python path holds the ring (_hold): the
 * caller takes the Python path, under its lock. No lock here: with the GIL, a C function that
 * calls no Python code runs whole, between any two bytecodes of another thread or of a signal
 * handler; so the Python path sets _hold while it has the ring or the counters in hand, and the
 * read-modify-write of the sent counter is never torn by a thread. Without the GIL (a
 * free-threaded build) it answers 0 (may_publish) and the lock does it all. */
static PyObject *
RingCore_publish(RingCore *self, PyObject *payload)
{
    if (!may_publish(self) || ring_put(self, payload, -1) != 0)
        return PyLong_FromLong(0);
    return published(self);
}

static PyObject *
RingCore_write(RingCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *payload;
    long long length_word = -1;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "write(payload, length_word=-1)");
        return NULL;
    }
    payload = args[0];
    if (nargs == 2) {
        length_word = PyLong_AsLongLong(args[1]);
        if (length_word == -1 && PyErr_Occurred())
            return NULL;
    }
    if (ring_put(self, payload, length_word) == 0)
        Py_RETURN_TRUE;
    /* Everything else (no room known, a big record, not bytes) is Python's. */
    {
        PyObject *lw = PyLong_FromLongLong(length_word);
        PyObject *res;
        if (lw == NULL)
            return NULL;
        res = PyObject_CallMethodObjArgs((PyObject *)self, str_write_slow, payload, lw, NULL);
        Py_DECREF(lw);
        return res;
    }
}

static void
RingCore_dealloc(RingCore *self)
{
    if (self->attached) {
        self->attached = 0;
        PyBuffer_Release(&self->view);
    }
    if (self->words_attached) {
        self->words_attached = 0;
        PyBuffer_Release(&self->words);
    }
    Py_CLEAR(self->keys);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *RingCore_publish_record(RingCore *self, PyObject *d);  /* after the marshal below */

static PyMethodDef RingCore_methods[] = {
    {"write", (PyCFunction)(void (*)(void))RingCore_write, METH_FASTCALL,
     "write(payload, length_word=-1) -> bool: publish payload; False if the ring has no room."},
    {"_attach", (PyCFunction)RingCore_attach, METH_O, "Hold the ring's mapping (a writable buffer)."},
    {"_detach", (PyCFunction)RingCore_detach, METH_NOARGS, "Let the mappings go (before they are closed)."},
    {"_attach_words", (PyCFunction)(void (*)(void))RingCore_attach_words, METH_FASTCALL,
     "_attach_words(words, state, sent, sleeping, stopped, keys, tag): hold the counters' words for publish()."},
    {"publish", (PyCFunction)RingCore_publish, METH_O,
     "publish(payload) -> 0, 1 or 2: 1 published and counted, 2 also the listener sleeps, 0 nothing done."},
    {"publish_record", (PyCFunction)RingCore_publish_record, METH_O,
     "publish_record(d) -> 0, 1 or 2: publish(dumps((tag, values of d at keys), 2)), without making either."},
    {NULL, NULL, 0, NULL}
};

static PyMemberDef RingCore_members[] = {
    {"_head", T_LONGLONG, offsetof(RingCore, head), 0, NULL},
    {"_seq", T_LONGLONG, offsetof(RingCore, seq), 0, NULL},
    {"_limit", T_LONGLONG, offsetof(RingCore, limit), 0, NULL},
    {"_seq_limit", T_LONGLONG, offsetof(RingCore, seq_limit), 0, NULL},
    {"capacity", T_LONGLONG, offsetof(RingCore, capacity), 0, NULL},
    {"inline_max", T_LONGLONG, offsetof(RingCore, inline_max), 0, NULL},
    {"_header", T_LONGLONG, offsetof(RingCore, header), 0, NULL},
    {"_hold", T_INT, offsetof(RingCore, hold), 0, NULL},
    {NULL, 0, 0, 0, NULL}
};

static PyTypeObject RingCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mplog._speedups.RingCore",
    .tp_basicsize = sizeof(RingCore),
    .tp_dealloc = (destructor)RingCore_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The producer's end of a ring: its state, and the common case of write().",
    .tp_methods = RingCore_methods,
    .tp_members = RingCore_members,
    .tp_new = PyType_GenericNew,
};


/* take_entries(mm, header, capacity, pos, done, head, limit, out) -> (pos, done)
 *
 * Appends to ``out`` (a list) the payloads of whole inline entries from ``pos`` on, in order,
 * each one's seq the next and its Adler-32 right, until ``head``, ``limit`` payloads in ``out``,
 * or the first entry that is anything else. */
static PyObject *
take_entries(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    long long header, cap, pos, done, head;
    Py_ssize_t limit;
    PyObject *out;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "take_entries(mm, header, capacity, pos, done, head, limit, out)");
        return NULL;
    }
    header = PyLong_AsLongLong(args[1]);
    cap = PyLong_AsLongLong(args[2]);
    pos = PyLong_AsLongLong(args[3]);
    done = PyLong_AsLongLong(args[4]);
    head = PyLong_AsLongLong(args[5]);
    limit = PyLong_AsSsize_t(args[6]);
    if (PyErr_Occurred())
        return NULL;
    out = args[7];
    if (!PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "out must be a list");
        return NULL;
    }
    if (cap <= 0) {
        PyErr_SetString(PyExc_ValueError, "capacity must be positive");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    {
        const unsigned char *base = (const unsigned char *)view.buf;
        long long data_end = header + cap;
        if (data_end > (long long)view.len)
            data_end = (long long)view.len;
        while (pos < head && PyList_GET_SIZE(out) < limit) {
            long long at = header + pos % cap;
            uint32_t length_word, crc;
            uint64_t seq;
            long long end;
            PyObject *payload;
            if (at + ENTRY_SIZE > data_end)
                break;
            length_word = get_u32(base + at);
            crc = get_u32(base + at + 4);
            seq = get_u64(base + at + 8);
            end = at + ENTRY_SIZE + (long long)length_word;  /* flag bits make it "too long" */
            if ((long long)seq != done + 1 || end > data_end)
                break;
            if (adler32(base + at + ENTRY_SIZE, (Py_ssize_t)length_word) != crc)
                break;
            payload = PyBytes_FromStringAndSize((const char *)(base + at + ENTRY_SIZE), (Py_ssize_t)length_word);
            if (payload == NULL || PyList_Append(out, payload) < 0) {
                Py_XDECREF(payload);
                PyBuffer_Release(&view);
                return NULL;
            }
            Py_DECREF(payload);
            pos += (ENTRY_SIZE + (long long)length_word + 7) & -8;
            done = (long long)seq;
        }
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("LL", pos, done);
}

static PyObject *
py_adler32(PyObject *Py_UNUSED(module), PyObject *arg)
{
    Py_buffer view;
    uint32_t value;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    value = adler32((const unsigned char *)view.buf, view.len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(value);
}

/* --- marshal version 2, for the caller's record ------------------------------------------
 *
 * The caller's record is a tuple of str, int, float and None (and the message's arguments).
 * CPython's marshal encodes each str through a new bytes object and a codec lookup; for these
 * types version 2 is simple (no back-references: Python/marshal.c, w_object), so it is written
 * here straight from each str's own UTF-8. Every type or value this does not handle (a big int,
 * a str with surrogates, a list, a subclass...) makes the whole object go to CPython's marshal,
 * so the result, and the error for what marshal refuses, are always marshal's.
 */
#define ENC_MAX_DEPTH 16

typedef struct {
    char *buf;
    Py_ssize_t len, cap;
    int heap;
    char local[1024];
} WBuf;

static inline void
wb_init(WBuf *w)
{
    w->buf = w->local;
    w->len = 0;
    w->cap = (Py_ssize_t)sizeof(w->local);
    w->heap = 0;
}

static int
wb_reserve(WBuf *w, Py_ssize_t n)
{
    Py_ssize_t cap;
    char *grown;
    if (w->len + n <= w->cap)
        return 0;
    cap = w->cap;
    while (cap < w->len + n) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    if (w->heap) {
        grown = (char *)PyMem_Realloc(w->buf, (size_t)cap);
    } else {
        grown = (char *)PyMem_Malloc((size_t)cap);
        if (grown != NULL)
            memcpy(grown, w->buf, (size_t)w->len);
    }
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    w->buf = grown;
    w->cap = cap;
    w->heap = 1;
    return 0;
}

static inline void
wb_int32(WBuf *w, char type, int32_t x)
{
    /* marshal's w_long: little-endian whatever the host */
    uint32_t u = (uint32_t)x;
    char *p = w->buf + w->len;
    p[0] = type;
    p[1] = (char)(u & 0xff);
    p[2] = (char)((u >> 8) & 0xff);
    p[3] = (char)((u >> 16) & 0xff);
    p[4] = (char)((u >> 24) & 0xff);
    w->len += 5;
}

/* 0: written; 1: not a case handled here (use marshal); -1: an error is set. */
static int
enc_v2(WBuf *w, PyObject *v, int depth)
{
    if (v == Py_None || v == Py_True || v == Py_False) {
        if (wb_reserve(w, 1) < 0)
            return -1;
        w->buf[w->len++] = v == Py_None ? 'N' : (v == Py_True ? 'T' : 'F');
        return 0;
    }
    if (PyUnicode_CheckExact(v)) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(v, &n);
        if (s == NULL) {  /* a lone surrogate: marshal writes it with "surrogatepass" */
            PyErr_Clear();
            return 1;
        }
        if (n > INT32_MAX)
            return 1;
        if (wb_reserve(w, 5 + n) < 0)
            return -1;
        wb_int32(w, 'u', (int32_t)n);
        memcpy(w->buf + w->len, s, (size_t)n);
        w->len += n;
        return 0;
    }
    if (PyLong_CheckExact(v)) {
        int overflow;
        long x = PyLong_AsLongAndOverflow(v, &overflow);
        if (x == -1 && PyErr_Occurred())
            return -1;
        if (overflow || x > INT32_MAX || x < INT32_MIN)
            return 1;  /* marshal's TYPE_LONG, in 15-bit digits */
        if (wb_reserve(w, 5) < 0)
            return -1;
        wb_int32(w, 'i', (int32_t)x);
        return 0;
    }
    if (PyFloat_CheckExact(v)) {
#if PY_BIG_ENDIAN
        return 1;
#else
        /* TYPE_BINARY_FLOAT: the IEEE 754 double, little-endian (PyFloat_Pack8(x, p, 1)) */
        double x = PyFloat_AS_DOUBLE(v);
        if (wb_reserve(w, 9) < 0)
            return -1;
        w->buf[w->len] = 'g';
        memcpy(w->buf + w->len + 1, &x, 8);
        w->len += 9;
        return 0;
#endif
    }
    if (PyTuple_CheckExact(v)) {
        Py_ssize_t i, n = PyTuple_GET_SIZE(v);
        if (depth >= ENC_MAX_DEPTH || n > INT32_MAX)
            return 1;
        if (wb_reserve(w, 5) < 0)
            return -1;
        wb_int32(w, '(', (int32_t)n);
        for (i = 0; i < n; i++) {
            int rc = enc_v2(w, PyTuple_GET_ITEM(v, i), depth + 1);
            if (rc != 0)
                return rc;
        }
        return 0;
    }
    if (PyBytes_CheckExact(v)) {
        Py_ssize_t n = PyBytes_GET_SIZE(v);
        if (n > INT32_MAX)
            return 1;
        if (wb_reserve(w, 5 + n) < 0)
            return -1;
        wb_int32(w, 's', (int32_t)n);
        memcpy(w->buf + w->len, PyBytes_AS_STRING(v), (size_t)n);
        w->len += n;
        return 0;
    }
    return 1;
}

static PyObject *
py_dumps(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    WBuf w;
    int version, rc;
    PyObject *result;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "dumps(obj, version) takes 2 arguments");
        return NULL;
    }
    {
        long v = PyLong_AsLong(args[1]);
        if (v == -1 && PyErr_Occurred())
            return NULL;
        if (v > INT_MAX || v < INT_MIN) {
            PyErr_SetString(PyExc_OverflowError, "version out of range");
            return NULL;
        }
        version = (int)v;
    }
    if (version != 2)
        return PyMarshal_WriteObjectToString(args[0], version);
    wb_init(&w);
    rc = enc_v2(&w, args[0], 0);
    if (rc == 0)
        result = PyBytes_FromStringAndSize(w.buf, w.len);
    else if (rc == 1)
        result = PyMarshal_WriteObjectToString(args[0], version);
    else
        result = NULL;
    if (w.heap)
        PyMem_Free(w.buf);
    return result;
}

/* publish_record(d): the common record's whole hot path in the caller (mplog/_app/channel.py,
 * SpoolHandler.handle): publish(dumps((tag, (d[k] for k in keys)), 2)), with the same bytes,
 * written into a buffer on the stack and copied into the ring, without the fields' tuple, the
 * record's tuple and the payload's bytes object. 0: nothing done (a key missing, a value the
 * marshal here does not write, anything publish() answers 0 to): the caller takes its path
 * with marshal, which raises what marshal raises. */
static PyObject *
RingCore_publish_record(RingCore *self, PyObject *d)
{
    WBuf w;
    Py_ssize_t k, n;
    int rc = 0;
    PyObject *result;
    if (!PyDict_CheckExact(d) || self->keys == NULL || !may_publish(self))
        return PyLong_FromLong(0);
    n = PyTuple_GET_SIZE(self->keys);
    wb_init(&w);
    /* (tag, (values...)) as enc_v2 writes them: the tuple's depth 0, the fields' tuple 1 */
    wb_int32(&w, '(', 2);
    wb_int32(&w, 'i', (int32_t)self->tag);
    wb_int32(&w, '(', (int32_t)n);
    for (k = 0; k < n && rc == 0; k++) {
        PyObject *v = PyDict_GetItemWithError(d, PyTuple_GET_ITEM(self->keys, k));  /* borrowed */
        rc = v == NULL ? 1 : enc_v2(&w, v, 2);
    }
    if (rc == 0 && ring_put_raw(self, (const unsigned char *)w.buf, w.len, -1) == 0)
        result = published(self);
    else {
        PyErr_Clear();  /* the caller's marshal meets the same error, and raises it */
        result = PyLong_FromLong(0);
    }
    if (w.heap)
        PyMem_Free(w.buf);
    return result;
}

/* ---- the listener's formatting of the common record in the default formats ----------------
 *
 * format_common(payloads, full, simp, simplified_level, stamps, heads, head_rest, tally,
 *               fallback, origin, millis, not_tallied, pieces, tag_common)
 *
 * The twin of the Python loop in mplog/_listener/batch.py (Batch._format_common), which is the
 * reference: for each payload, the record's texts in the default formats are appended to the
 * lists ``full`` and ``simp`` (in pieces: the batch joins them once); a record this loop does
 * not fully understand, or one that fails anywhere, goes whole to ``fallback(payload, origin)``
 * (the general path) before anything of it is appended, so the order of records stays and
 * nothing is written twice. The caches it shares with Python (``stamps``, ``heads``) are only
 * caches: ``stamps.second`` and ``head_rest`` fill them, as in the Python loop. The constant
 * texts of the formats come from Python too (``pieces``: the message label, the block's tail,
 * the newline, the level's colon), so the formats are defined in one place. */

static PyObject *s_second, *s_isprintable;

#define LEAN_LEN 13  /* len(_record.LEAN_KEYS); anything else takes the general path */
#define LEVEL_WARNING 30
#define LEVEL_ERROR 40
#define LEAN_MAX_ARGS 64  /* more arguments than this: marshal reads the record */

static int
ascii_printable(PyObject *s)
{
    /* str.isprintable(), answered here for ASCII (space to tilde) and by str otherwise. */
    if (PyUnicode_IS_ASCII(s)) {
        const unsigned char *p = (const unsigned char *)PyUnicode_DATA(s);
        Py_ssize_t n = PyUnicode_GET_LENGTH(s), i;
        for (i = 0; i < n; i++)
            if (p[i] < 0x20 || p[i] > 0x7e)
                return 0;
        return 1;
    }
    {
        PyObject *r = PyObject_CallMethodObjArgs(s, s_isprintable, NULL);
        int ok;
        if (r == NULL)
            return -1;
        ok = PyObject_IsTrue(r);
        Py_DECREF(r);
        return ok;
    }
}

/* A raw byte string kept from one record to the next (the lean reader's caches). */
typedef struct {
    char *buf;
    Py_ssize_t len, cap;
} Raw;

static int
raw_set2(Raw *r, const unsigned char *a, Py_ssize_t la, const unsigned char *b, Py_ssize_t lb)
{
    if (la + lb > r->cap) {
        char *grown = (char *)PyMem_Realloc(r->buf, (size_t)(la + lb));
        if (grown == NULL)
            return -1;  /* no error set: the cache just stays empty */
        r->buf = grown;
        r->cap = la + lb;
    }
    if (la)
        memcpy(r->buf, a, (size_t)la);
    if (lb)
        memcpy(r->buf + la, b, (size_t)lb);
    r->len = la + lb;
    return 0;
}

/* The loop's inputs and the state it carries from one record to the next. */
typedef struct {
    PyObject *full, *simp, *stamps, *heads, *head_rest, *tally, *millis, *not_tallied;
    PyObject *const *pieces;  /* the message label, the block's tail, the newline, the level's colon */
    long simplified_level, tag_common;
    /* the time prefixes of the current second and millisecond */
    long long cur_sec;
    int cur_ms;
    PyObject *sec_prefix, *ts_text, *ms_prefix;
    /* the previous record's header: its six fields and its text; key_gen counts its changes */
    PyObject *last_key, *last_rest;
    unsigned long key_gen;
    /* the lean reader's caches: the previous message's bytes and str, and the raw bytes of the
     * header fields of last_key while head_gen == key_gen (len -1: none kept) */
    Raw msg_raw, head_raw;
    PyObject *msg_obj;
    unsigned long head_gen;
} Loop;

/* One common record, as format_one reads it; every object borrowed. */
typedef struct {
    double created;
    PyObject *createdo;  /* the float, or NULL: made only when the second changes */
    long levelno;
    PyObject *levelname, *name, *msg, *args;
    PyObject *kf[6];     /* the header's key: levelname, name, processName, process, pathname, lineno */
    PyObject *rest;      /* the header's text when already known (then kf is unused), or NULL */
    int key_is_last;     /* out: L->last_key is this record's header */
} Common;

/* A marshalled (tag, fields) tuple as a Common: 1, 0 not the common case, -1 error. */
static int
common_from_tuple(Loop *L, PyObject *obj, Common *c)
{
    PyObject *tag, *fields;
    long tagv;
    if (!PyTuple_CheckExact(obj) || PyTuple_GET_SIZE(obj) != 2)
        return 0;
    tag = PyTuple_GET_ITEM(obj, 0);
    fields = PyTuple_GET_ITEM(obj, 1);
    if (!PyLong_CheckExact(tag) || !PyTuple_CheckExact(fields) || PyTuple_GET_SIZE(fields) != LEAN_LEN)
        return 0;
    tagv = PyLong_AsLong(tag);
    if (tagv != L->tag_common)
        return tagv == -1 && PyErr_Occurred() ? -1 : 0;
    /* _record.LEAN_KEYS: created, levelno, levelname, name, msg, args, pathname, lineno,
     * processName, process, exc_info, exc_text, stack_info */
    c->createdo = PyTuple_GET_ITEM(fields, 0);
    c->levelname = PyTuple_GET_ITEM(fields, 2);
    c->name = PyTuple_GET_ITEM(fields, 3);
    c->msg = PyTuple_GET_ITEM(fields, 4);
    c->args = PyTuple_GET_ITEM(fields, 5);
    /* Exact types, the header's fields too: the header cache is keyed by equality (True == 1). */
    if (!PyFloat_CheckExact(c->createdo) || !PyLong_CheckExact(PyTuple_GET_ITEM(fields, 1))
            || !PyUnicode_CheckExact(c->levelname) || !PyUnicode_CheckExact(c->name) || !PyUnicode_CheckExact(c->msg)
            || !PyUnicode_CheckExact(PyTuple_GET_ITEM(fields, 6)) || !PyLong_CheckExact(PyTuple_GET_ITEM(fields, 7))
            || !PyUnicode_CheckExact(PyTuple_GET_ITEM(fields, 8)) || !PyLong_CheckExact(PyTuple_GET_ITEM(fields, 9))
            || PyTuple_GET_ITEM(fields, 11) != Py_None || PyTuple_GET_ITEM(fields, 12) != Py_None)
        return 0;
    c->levelno = PyLong_AsLong(PyTuple_GET_ITEM(fields, 1));
    if (c->levelno == -1 && PyErr_Occurred())
        return -1;
    c->created = PyFloat_AS_DOUBLE(c->createdo);
    c->kf[0] = c->levelname;
    c->kf[1] = c->name;
    c->kf[2] = PyTuple_GET_ITEM(fields, 8);
    c->kf[3] = PyTuple_GET_ITEM(fields, 9);
    c->kf[4] = PyTuple_GET_ITEM(fields, 6);
    c->kf[5] = PyTuple_GET_ITEM(fields, 7);
    c->rest = NULL;
    c->key_is_last = 0;
    return 1;
}

/* One record: 1 formatted (pieces appended), 0 not the common case (nothing appended), -1 error
 * (nothing appended; the caller clears it and takes the general path). */
static int
format_one(Loop *L, Common *c)
{
    PyObject *c_message = L->pieces[0], *c_tail = L->pieces[1], *c_nl = L->pieces[2], *c_colon = L->pieces[3];
    PyObject *key = NULL, *rest, *text = NULL;
    double created = c->created, mod, whole;
    long levelno = c->levelno;
    long long sec;
    int idx, ok, rc = -1;

    if (!(created > -9.2e18 && created < 9.2e18))  /* int(created) as a C long long; NaN too */
        return 0;
    sec = (long long)created;  /* int(): truncation toward zero, as here */
    /* int((created % 1) * 1000), with Python's float modulo (its sign is the divisor's) */
    mod = fmod(created, 1.0);
    if (mod != 0.0) {
        if (mod < 0.0)
            mod += 1.0;
    }
    else
        mod = 0.0;
    whole = mod * 1000.0;
    if (!(whole >= 0.0 && whole < 1000.0))
        return 0;
    idx = (int)whole;

    ok = PyObject_IsTrue(c->args);
    if (ok < 0)
        return -1;
    if (ok) {
        text = PyNumber_Remainder(c->msg, c->args);
        if (text == NULL)
            return -1;
        if (!PyUnicode_CheckExact(text)) {
            Py_DECREF(text);
            return 0;
        }
    }
    else {
        text = c->msg;
        Py_INCREF(text);
    }
    ok = ascii_printable(text);
    if (ok <= 0) {
        rc = ok;
        goto done;
    }

    if (sec != L->cur_sec) {
        PyObject *cf = c->createdo != NULL ? (Py_INCREF(c->createdo), c->createdo) : PyFloat_FromDouble(created);
        PyObject *r, *sp;
        if (cf == NULL)
            goto done;
        r = PyObject_CallMethodObjArgs(L->stamps, s_second, cf, NULL);
        Py_DECREF(cf);
        if (r == NULL)
            goto done;
        if (!PyUnicode_CheckExact(r)) {
            Py_DECREF(r);
            rc = 0;
            goto done;
        }
        sp = PyUnicode_FromFormat("[%U] ", r);
        if (sp == NULL) {
            Py_DECREF(r);
            goto done;
        }
        Py_XSETREF(L->ts_text, r);
        Py_XSETREF(L->sec_prefix, sp);
        L->cur_sec = sec;
        L->cur_ms = -1;
    }
    if (idx != L->cur_ms) {
        PyObject *ms = PyList_GET_ITEM(L->millis, idx), *mp;
        if (!PyUnicode_CheckExact(ms)) {  /* %U would read any other object as a str */
            rc = 0;
            goto done;
        }
        mp = PyUnicode_FromFormat("[%U.%U] ", L->ts_text, ms);
        if (mp == NULL)
            goto done;
        Py_XSETREF(L->ms_prefix, mp);
        L->cur_ms = idx;
    }

    /* The header but its time, made once per call site and process by head_rest. A batch's
     * records mostly come from one call site after another: the previous record's key, compared
     * field by field (exact str and int, so equality is the dict's), spares building, hashing
     * and looking up a tuple (0.85x the loop's CPU a record, measured). The cache holds its key,
     * so no address is compared after reuse. */
    if (c->rest != NULL) {
        rest = c->rest;
        Py_INCREF(rest);
    }
    else {
        PyObject **kf = c->kf;
        int hit = L->last_key != NULL, k;
        for (k = 0; hit && k < 6; k++) {
            hit = PyObject_RichCompareBool(kf[k], PyTuple_GET_ITEM(L->last_key, k), Py_EQ);
            if (hit < 0)
                goto done;
        }
        if (hit) {
            rest = L->last_rest;
            Py_INCREF(rest);
        }
        else {
            key = PyTuple_Pack(6, kf[0], kf[1], kf[2], kf[3], kf[4], kf[5]);
            if (key == NULL)
                goto done;
            rest = PyDict_GetItemWithError(L->heads, key);  /* borrowed */
            if (rest != NULL)
                Py_INCREF(rest);
            else if (PyErr_Occurred())
                goto done;
            else {
                rest = PyObject_CallOneArg(L->head_rest, key);
                if (rest == NULL)
                    goto done;
            }
            if (!PyUnicode_CheckExact(rest)) {
                Py_DECREF(rest);
                rc = 0;
                goto done;
            }
            Py_INCREF(key);
            Py_XSETREF(L->last_key, key);
            Py_INCREF(rest);
            Py_XSETREF(L->last_rest, rest);
            L->key_gen++;
        }
    }
    c->key_is_last = 1;

    if (LEVEL_WARNING <= levelno && levelno < LEVEL_ERROR) {
        int skip = PySet_Contains(L->not_tallied, c->name);
        if (skip < 0) {
            Py_DECREF(rest);
            goto done;
        }
        if (!skip) {
            PyObject *head = PyUnicode_Substring(text, 0, 200), *r;
            if (head == NULL) {
                Py_DECREF(rest);
                goto done;
            }
            r = PyObject_CallOneArg(L->tally, head);
            Py_DECREF(head);
            if (r == NULL) {
                Py_DECREF(rest);
                goto done;
            }
            Py_DECREF(r);
        }
    }

    /* Nothing can fail now but an append (memory): the record goes in whole. */
    if (PyList_Append(L->full, L->ms_prefix) < 0 || PyList_Append(L->full, rest) < 0
            || PyList_Append(L->full, c_message) < 0 || PyList_Append(L->full, text) < 0
            || PyList_Append(L->full, c_tail) < 0) {
        Py_DECREF(rest);
        goto done;
    }
    Py_DECREF(rest);
    if (levelno >= L->simplified_level) {
        if (PyList_Append(L->simp, L->sec_prefix) < 0)
            goto done;
        if (levelno >= LEVEL_WARNING && (PyList_Append(L->simp, c->levelname) < 0 || PyList_Append(L->simp, c_colon) < 0))
            goto done;
        if (PyList_Append(L->simp, text) < 0 || PyList_Append(L->simp, c_nl) < 0)
            goto done;
    }
    rc = 1;
done:
    Py_XDECREF(key);
    Py_XDECREF(text);
    return rc;
}

/* ---- the lean reader: a common record read from its marshal bytes in place ----------------
 *
 * marshal.loads builds the whole (tag, fields) tuple: thirteen objects and two tuples a record,
 * five of them str decoded from UTF-8, most of them thrown away the moment the header cache
 * hits. The caller writes that tuple with marshal version 2 (or its compiled twin, the same
 * bytes), so its layout is fixed: '(' 2, 'i' tag, '(' 13, then the fields in LEAN_KEYS order.
 * This reader walks those bytes and makes only what the record needs that the previous record
 * did not have: the arguments, the message when its bytes changed, the header's six fields when
 * their bytes changed, the created float when the second changed. Anything it does not know
 * exactly (another type code, a big int, a nested argument, a mapping, refs of a later version,
 * a big-endian host) it hands back, and marshal reads the record as before: what it reads is a
 * shortcut, never a second definition of the format. */

typedef struct {
    const unsigned char *p, *end;
} Rd;

static inline int
rd_i32(Rd *r, unsigned char type, int32_t *out)
{
    const unsigned char *p = r->p;
    if (r->end - p < 5 || p[0] != type)
        return 0;
    *out = (int32_t)((uint32_t)p[1] | ((uint32_t)p[2] << 8) | ((uint32_t)p[3] << 16) | ((uint32_t)p[4] << 24));
    r->p = p + 5;
    return 1;
}

static inline int
rd_str(Rd *r, const unsigned char **s, Py_ssize_t *len)
{
    int32_t n;
    if (!rd_i32(r, 'u', &n) || n < 0 || r->end - r->p < n)
        return 0;
    *s = r->p;
    *len = n;
    r->p += n;
    return 1;
}

static inline int
rd_float(Rd *r, double *out)
{
#if PY_BIG_ENDIAN
    (void)r;
    (void)out;
    return 0;
#else
    if (r->end - r->p < 9 || r->p[0] != 'g')
        return 0;
    memcpy(out, r->p + 1, 8);  /* marshal's TYPE_BINARY_FLOAT: the little-endian IEEE 754 double */
    r->p += 9;
    return 1;
#endif
}

static inline PyObject *
decode_str(const unsigned char *s, Py_ssize_t n)
{
    /* as marshal's TYPE_UNICODE */
    return PyUnicode_DecodeUTF8((const char *)s, n, "surrogatepass");
}

/* The objects a lean read made for one record (owned). */
typedef struct {
    PyObject *args;
    PyObject *head[6];  /* the header's fields when their bytes changed */
    int nhead;
    const unsigned char *a0, *b0;  /* the header's two spans: levelname and name; pathname to process */
    Py_ssize_t la, lb;
} Lean;

static void
lean_release(Lean *o)
{
    int k;
    Py_CLEAR(o->args);
    for (k = 0; k < o->nhead; k++)
        Py_CLEAR(o->head[k]);
    o->nhead = 0;
}

/* The args tuple of N, True, False, 'i' ints, 'g' floats and 'u' str, or NULL (an error set,
 * or none: not one of these). */
static PyObject *
read_args(Rd *r)
{
    int32_t n, k;
    PyObject *t;
    if (!rd_i32(r, '(', &n) || n < 0 || n > LEAN_MAX_ARGS)
        return NULL;
    t = PyTuple_New(n);
    if (t == NULL)
        return NULL;
    for (k = 0; k < n; k++) {
        PyObject *v = NULL;
        int32_t x;
        double d;
        const unsigned char *s;
        Py_ssize_t len;
        if (r->p >= r->end)
            break;
        switch (r->p[0]) {
        case 'N': v = Py_None; Py_INCREF(v); r->p++; break;
        case 'T': v = Py_True; Py_INCREF(v); r->p++; break;
        case 'F': v = Py_False; Py_INCREF(v); r->p++; break;
        case 'i':
            if (rd_i32(r, 'i', &x))
                v = PyLong_FromLong((long)x);
            break;
        case 'g':
            if (rd_float(r, &d))
                v = PyFloat_FromDouble(d);
            break;
        case 'u':
            if (rd_str(r, &s, &len))
                v = decode_str(s, len);
            break;
        default:
            break;
        }
        if (v == NULL)
            break;
        PyTuple_SET_ITEM(t, k, v);
    }
    if (k < n) {
        Py_DECREF(t);
        return NULL;
    }
    return t;
}

/* 1: the payload read into c (o owns what was made); 0: not read (nothing owned, an error may
 * be set): marshal reads it. */
static int
read_lean(Loop *L, const unsigned char *buf, Py_ssize_t len, Common *c, Lean *o)
{
    Rd r = {buf, buf + len};
    int32_t n, tag, levelno, lineno, process;
    const unsigned char *levelname, *name, *msg, *pathname, *pname;
    Py_ssize_t n_levelname, n_name, n_msg, n_pathname, n_pname;
    o->args = NULL;
    o->nhead = 0;
    if (!rd_i32(&r, '(', &n) || n != 2 || !rd_i32(&r, 'i', &tag) || tag != L->tag_common
            || !rd_i32(&r, '(', &n) || n != LEAN_LEN || !rd_float(&r, &c->created)
            || !rd_i32(&r, 'i', &levelno))
        return 0;
    o->a0 = r.p;
    if (!rd_str(&r, &levelname, &n_levelname) || !rd_str(&r, &name, &n_name))
        return 0;
    o->la = r.p - o->a0;
    if (!rd_str(&r, &msg, &n_msg))
        return 0;
    o->args = read_args(&r);
    if (o->args == NULL)
        return 0;
    o->b0 = r.p;
    if (!rd_str(&r, &pathname, &n_pathname) || !rd_i32(&r, 'i', &lineno) || !rd_str(&r, &pname, &n_pname)
            || !rd_i32(&r, 'i', &process))
        goto no;
    o->lb = r.p - o->b0;
    /* exc_info (None, or a bool a caller set; the formats do not print it), exc_text and
     * stack_info None, and nothing after */
    if (r.end - r.p != 3 || (r.p[0] != 'N' && r.p[0] != 'T' && r.p[0] != 'F') || r.p[1] != 'N' || r.p[2] != 'N')
        goto no;

    c->createdo = NULL;
    c->levelno = levelno;
    c->args = o->args;
    c->key_is_last = 0;
    if (n_msg == L->msg_raw.len && memcmp(msg, L->msg_raw.buf, (size_t)n_msg) == 0) {
        c->msg = L->msg_obj;
    }
    else {
        PyObject *m = decode_str(msg, n_msg);
        if (m == NULL)
            goto no;
        Py_XSETREF(L->msg_obj, m);  /* the cache holds the record's message */
        if (raw_set2(&L->msg_raw, msg, n_msg, NULL, 0) < 0)
            L->msg_raw.len = -1;  /* no bytes kept: no record matches them */
        c->msg = m;
    }
    /* The spans delimit themselves (type codes and lengths), so equal bytes end to end are equal
     * spans, and equal spans are equal fields. */
    if (L->head_gen == L->key_gen && L->head_raw.len == o->la + o->lb
            && memcmp(L->head_raw.buf, o->a0, (size_t)o->la) == 0
            && memcmp(L->head_raw.buf + o->la, o->b0, (size_t)o->lb) == 0) {
        /* the bytes of the header of last_key: its text, and the two fields the record prints */
        c->rest = L->last_rest;
        c->levelname = PyTuple_GET_ITEM(L->last_key, 0);
        c->name = PyTuple_GET_ITEM(L->last_key, 1);
        return 1;
    }
    {
        /* kf's order: levelname, name, processName, process, pathname, lineno */
        PyObject **h = o->head;
        h[0] = decode_str(levelname, n_levelname);
        h[1] = h[0] ? decode_str(name, n_name) : NULL;
        h[2] = h[1] ? decode_str(pname, n_pname) : NULL;
        h[3] = h[2] ? PyLong_FromLong((long)process) : NULL;
        h[4] = h[3] ? decode_str(pathname, n_pathname) : NULL;
        h[5] = h[4] ? PyLong_FromLong((long)lineno) : NULL;
        for (n = 0; n < 6 && h[n] != NULL; n++)
            c->kf[n] = h[n];
        o->nhead = n;
        if (n < 6)
            goto no;
        c->levelname = h[0];
        c->name = h[1];
        c->rest = NULL;
    }
    return 1;
no:
    lean_release(o);
    return 0;
}

/* After format_one on a record read lean: keep its header's bytes if last_key is its header. */
static void
lean_keep_header(Loop *L, const Common *c, const Lean *o)
{
    if (!c->key_is_last || c->rest != NULL)
        return;  /* not known to be last_key's, or already kept */
    if (raw_set2(&L->head_raw, o->a0, o->la, o->b0, o->lb) < 0)
        L->head_raw.len = -1;  /* no bytes kept: no record matches them */
    L->head_gen = L->key_gen;
}

static PyObject *
format_common(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *payloads, *fallback, *origin, *result = NULL;
    Loop L;
    Py_ssize_t i, n;

    if (nargs != 14) {
        PyErr_SetString(PyExc_TypeError, "format_common takes 14 arguments");
        return NULL;
    }
    memset(&L, 0, sizeof(L));
    payloads = args[0]; L.full = args[1]; L.simp = args[2];
    L.stamps = args[4]; L.heads = args[5]; L.head_rest = args[6]; L.tally = args[7]; fallback = args[8];
    origin = args[9]; L.millis = args[10]; L.not_tallied = args[11];
    if (!PyTuple_CheckExact(args[12]) || PyTuple_GET_SIZE(args[12]) != 4) {
        PyErr_SetString(PyExc_TypeError, "format_common: pieces must be a tuple of 4 str");
        return NULL;
    }
    L.pieces = &PyTuple_GET_ITEM(args[12], 0);
    for (i = 0; i < 4; i++)
        if (!PyUnicode_CheckExact(L.pieces[i])) {
            PyErr_SetString(PyExc_TypeError, "format_common: pieces must be a tuple of 4 str");
            return NULL;
        }
    if (!PyList_CheckExact(payloads) || !PyList_CheckExact(L.full) || !PyList_CheckExact(L.simp)
            || !PyDict_CheckExact(L.heads) || !PyList_CheckExact(L.millis) || PyList_GET_SIZE(L.millis) != 1000
            || !PyAnySet_CheckExact(L.not_tallied)) {
        PyErr_SetString(PyExc_TypeError, "format_common: unexpected argument types");
        return NULL;
    }
    L.simplified_level = PyLong_AsLong(args[3]);
    if (L.simplified_level == -1 && PyErr_Occurred())
        return NULL;
    L.tag_common = PyLong_AsLong(args[13]);
    if (L.tag_common == -1 && PyErr_Occurred())
        return NULL;
    L.cur_sec = LLONG_MIN;
    L.cur_ms = -1;
    L.msg_raw.len = L.head_raw.len = -1;  /* nothing kept yet */

    n = PyList_GET_SIZE(payloads);
    for (i = 0; i < n; i++) {
        PyObject *payload = PyList_GET_ITEM(payloads, i), *r;
        Common c;
        Lean o;
        int rc = -1;
        Py_INCREF(payload);
        if (PyBytes_CheckExact(payload)) {
            const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(payload);
            if (read_lean(&L, b, PyBytes_GET_SIZE(payload), &c, &o)) {
                rc = format_one(&L, &c);
                lean_keep_header(&L, &c, &o);
                lean_release(&o);
            }
            else {
                PyObject *obj;
                PyErr_Clear();
                obj = PyMarshal_ReadObjectFromString((const char *)b, PyBytes_GET_SIZE(payload));
                if (obj != NULL) {
                    rc = common_from_tuple(&L, obj, &c);
                    if (rc == 1)
                        rc = format_one(&L, &c);
                    Py_DECREF(obj);
                }
            }
        }
        if (rc != 1) {
            /* Not the common case, or not well formed: the general path (as the Python loop's
             * except clause). Only a failure of the general path itself stops the loop. */
            PyErr_Clear();
            r = PyObject_CallFunctionObjArgs(fallback, payload, origin, NULL);
            if (r == NULL) {
                Py_DECREF(payload);
                goto out;
            }
            Py_DECREF(r);
        }
        Py_DECREF(payload);
    }
    result = Py_None;
    Py_INCREF(result);
out:
    Py_XDECREF(L.sec_prefix);
    Py_XDECREF(L.ts_text);
    Py_XDECREF(L.ms_prefix);
    Py_XDECREF(L.last_key);
    Py_XDECREF(L.last_rest);
    Py_XDECREF(L.msg_obj);
    PyMem_Free(L.msg_raw.buf);
    PyMem_Free(L.head_raw.buf);
    return result;
}

static PyMethodDef module_methods[] = {
    {"take_entries", (PyCFunction)(void (*)(void))take_entries, METH_FASTCALL,
     "take_entries(mm, header, capacity, pos, done, head, limit, out) -> (pos, done)"},
    {"adler32", (PyCFunction)py_adler32, METH_O, "Adler-32 of a buffer, as zlib.adler32(data)."},
    {"dumps", (PyCFunction)(void (*)(void))py_dumps, METH_FASTCALL,
     "dumps(obj, version) -> bytes: marshal.dumps(obj, version), the same bytes."},
    {"format_common", (PyCFunction)(void (*)(void))format_common, METH_FASTCALL,
     "format_common(payloads, full, simp, simplified_level, stamps, heads, head_rest, tally, fallback, origin,"
     " millis, not_tallied, pieces, tag_common): the listener's loop over common records in the default formats."},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "mplog._speedups",
    "The spool ring's hot loops and the record's marshal in C (optional: mplog has them in Python).",
    -1, module_methods
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *m;
    if (PyType_Ready(&RingCoreType) < 0)
        return NULL;
    str_write_slow = PyUnicode_InternFromString("_write_slow");
    if (str_write_slow == NULL)
        return NULL;
    if ((s_second = PyUnicode_InternFromString("second")) == NULL
            || (s_isprintable = PyUnicode_InternFromString("isprintable")) == NULL)
        return NULL;
    m = PyModule_Create(&speedups_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RingCoreType);
    if (PyModule_AddObject(m, "RingCore", (PyObject *)&RingCoreType) < 0) {
        Py_DECREF(&RingCoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

/* mplog._speedups: the hot loops of the spool ring, the record's marshal and the listener's
 * formatting of the common record, compiled.
 *
 * Optional (mplog/_compiled.py). mplog/_spool.py has the ring's code in Python and is the
 * reference: the layout of a ring is defined there (the entry is "<IIQ": length | flags, Adler-32 of the payload, seq),
 * this file only does the common case faster and hands everything else back to Python:
 *
 *   RingCore.write(payload)  the producer's publish, when the payload fits inline and the room
 *                            known from the last read of the listener's words suffices; else it
 *                            calls the Python method _write_slow(payload, length_word).
 *   take_entries(...)        the listener's loop over whole entries in order, each checked; it
 *                            stops where Python's general loop must go on (the end of the data
 *                            area, a WRAP, a big record's reference, an entry that fails).
 *   dumps(obj, version)      marshal.dumps(obj, version), the same bytes, faster for what a
 *                            record holds (version 2; tuples, str, int, float, bytes, None,
 *                            bools); anything else is CPython's own marshal's.
 *   format_common(...)       the listener's loop over common records in the default formats
 *                            (mplog/_listener.py, Batch._format_common is its twin); a record
 *                            it does not fully know goes whole to the general path.
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
    Py_RETURN_NONE;
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
    if (self->attached && PyBytes_CheckExact(payload) && self->capacity > 0) {
        Py_ssize_t n = PyBytes_GET_SIZE(payload);
        long long word = length_word;
        if (word < 0 && n <= self->inline_max)
            word = n;
        if (word >= 0) {
            long long head = self->head;
            long long end = head + ((n + ENTRY_SIZE + 7) & -8);
            long long seq = self->seq + 1;
            long long at = self->header + head % self->capacity;
            if (end <= self->limit && seq <= self->seq_limit
                    && at + ENTRY_SIZE + n <= (long long)self->view.len) {
                unsigned char *base = (unsigned char *)self->view.buf;
                const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(payload);
                unsigned char *entry = base + at;
                put_u32(entry, (uint32_t)word);
                put_u32(entry + 4, adler32(data, n));
                put_u64(entry + 8, (uint64_t)seq);
                memcpy(entry + ENTRY_SIZE, data, (size_t)n);
                self->head = end;
                self->seq = seq;
                store_word(base, W_HEAD, end);  /* head last, as in Python */
                store_word(base, W_PUBLISHED, seq);
                Py_RETURN_TRUE;
            }
        }
    }
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
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef RingCore_methods[] = {
    {"write", (PyCFunction)(void (*)(void))RingCore_write, METH_FASTCALL,
     "write(payload, length_word=-1) -> bool: publish payload; False if the ring has no room."},
    {"_attach", (PyCFunction)RingCore_attach, METH_O, "Hold the ring's mapping (a writable buffer)."},
    {"_detach", (PyCFunction)RingCore_detach, METH_NOARGS, "Let the mapping go (before it is closed)."},
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
    w.buf = w.local;
    w.len = 0;
    w.cap = (Py_ssize_t)sizeof(w.local);
    w.heap = 0;
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

/* ---- the listener's formatting of the common record in the default formats ----------------
 *
 * format_common(payloads, full, simp, simplified_level, stamps, heads, head_rest, tally,
 *               fallback, origin, millis, not_tallied, pieces, tag_common)
 *
 * The twin of the Python loop in mplog/_listener.py (Batch._format_common), which is the
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

/* One record: 1 formatted (pieces appended), 0 not the common case (nothing appended), -1 error
 * (nothing appended; the caller clears it and takes the general path). */
static int
format_one(PyObject *obj, PyObject *full, PyObject *simp, long simplified_level, PyObject *stamps,
           long long *cur_sec, PyObject **sec_prefix, PyObject **ts_text, int *cur_ms, PyObject **ms_prefix,
           PyObject *heads, PyObject *head_rest, PyObject **last_key, PyObject **last_rest, PyObject *tally,
           PyObject *millis, PyObject *not_tallied, PyObject *const *pieces, long tag_common)
{
    PyObject *c_message = pieces[0], *c_tail = pieces[1], *c_nl = pieces[2], *c_colon = pieces[3];
    PyObject *tag, *fields, *createdo, *levelnoo, *levelname, *name, *msg, *args;
    PyObject *key = NULL, *rest, *text = NULL;
    double created, mod, whole;
    long levelno, tagv;
    long long sec;
    int idx, ok, rc = -1;

    if (!PyTuple_CheckExact(obj) || PyTuple_GET_SIZE(obj) != 2)
        return 0;
    tag = PyTuple_GET_ITEM(obj, 0);
    fields = PyTuple_GET_ITEM(obj, 1);
    if (!PyLong_CheckExact(tag) || !PyTuple_CheckExact(fields) || PyTuple_GET_SIZE(fields) != LEAN_LEN)
        return 0;
    tagv = PyLong_AsLong(tag);
    if (tagv != tag_common)
        return tagv == -1 && PyErr_Occurred() ? -1 : 0;
    /* _record.LEAN_KEYS: created, levelno, levelname, name, msg, args, pathname, lineno,
     * processName, process, exc_info, exc_text, stack_info */
    createdo = PyTuple_GET_ITEM(fields, 0);
    levelnoo = PyTuple_GET_ITEM(fields, 1);
    levelname = PyTuple_GET_ITEM(fields, 2);
    name = PyTuple_GET_ITEM(fields, 3);
    msg = PyTuple_GET_ITEM(fields, 4);
    args = PyTuple_GET_ITEM(fields, 5);
    /* Exact types, the header's fields too: the header cache is keyed by equality (True == 1). */
    if (!PyFloat_CheckExact(createdo) || !PyLong_CheckExact(levelnoo) || !PyUnicode_CheckExact(levelname)
            || !PyUnicode_CheckExact(name) || !PyUnicode_CheckExact(msg)
            || !PyUnicode_CheckExact(PyTuple_GET_ITEM(fields, 6)) || !PyLong_CheckExact(PyTuple_GET_ITEM(fields, 7))
            || !PyUnicode_CheckExact(PyTuple_GET_ITEM(fields, 8)) || !PyLong_CheckExact(PyTuple_GET_ITEM(fields, 9))
            || PyTuple_GET_ITEM(fields, 11) != Py_None || PyTuple_GET_ITEM(fields, 12) != Py_None)
        return 0;
    levelno = PyLong_AsLong(levelnoo);
    if (levelno == -1 && PyErr_Occurred())
        return -1;
    created = PyFloat_AS_DOUBLE(createdo);
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

    ok = PyObject_IsTrue(args);
    if (ok < 0)
        return -1;
    if (ok) {
        text = PyNumber_Remainder(msg, args);
        if (text == NULL)
            return -1;
        if (!PyUnicode_CheckExact(text)) {
            Py_DECREF(text);
            return 0;
        }
    }
    else {
        text = msg;
        Py_INCREF(text);
    }
    ok = ascii_printable(text);
    if (ok <= 0) {
        rc = ok;
        goto done;
    }

    if (sec != *cur_sec) {
        PyObject *r = PyObject_CallMethodObjArgs(stamps, s_second, createdo, NULL), *sp;
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
        Py_XSETREF(*ts_text, r);
        Py_XSETREF(*sec_prefix, sp);
        *cur_sec = sec;
        *cur_ms = -1;
    }
    if (idx != *cur_ms) {
        PyObject *ms = PyList_GET_ITEM(millis, idx), *mp;
        if (!PyUnicode_CheckExact(ms)) {  /* %U would read any other object as a str */
            rc = 0;
            goto done;
        }
        mp = PyUnicode_FromFormat("[%U.%U] ", *ts_text, ms);
        if (mp == NULL)
            goto done;
        Py_XSETREF(*ms_prefix, mp);
        *cur_ms = idx;
    }

    /* The header but its time, made once per call site and process by head_rest. A batch's
     * records mostly come from one call site after another: the previous record's key, compared
     * field by field (exact str and int, so equality is the dict's), spares building, hashing
     * and looking up a tuple (0.85x the loop's CPU a record, measured). The cache holds its key, so no address is compared after reuse. */
    {
        PyObject *kf[6] = {levelname, name, PyTuple_GET_ITEM(fields, 8), PyTuple_GET_ITEM(fields, 9),
                           PyTuple_GET_ITEM(fields, 6), PyTuple_GET_ITEM(fields, 7)};
        int hit = *last_key != NULL, k;
        for (k = 0; hit && k < 6; k++) {
            hit = PyObject_RichCompareBool(kf[k], PyTuple_GET_ITEM(*last_key, k), Py_EQ);
            if (hit < 0)
                goto done;
        }
        if (hit) {
            rest = *last_rest;
            Py_INCREF(rest);
        }
        else {
            key = PyTuple_Pack(6, kf[0], kf[1], kf[2], kf[3], kf[4], kf[5]);
            if (key == NULL)
                goto done;
            rest = PyDict_GetItemWithError(heads, key);  /* borrowed */
            if (rest != NULL)
                Py_INCREF(rest);
            else if (PyErr_Occurred())
                goto done;
            else {
                rest = PyObject_CallOneArg(head_rest, key);
                if (rest == NULL)
                    goto done;
            }
            if (!PyUnicode_CheckExact(rest)) {
                Py_DECREF(rest);
                rc = 0;
                goto done;
            }
            Py_INCREF(key);
            Py_XSETREF(*last_key, key);
            Py_INCREF(rest);
            Py_XSETREF(*last_rest, rest);
        }
    }

    if (LEVEL_WARNING <= levelno && levelno < LEVEL_ERROR) {
        int skip = PySet_Contains(not_tallied, name);
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
            r = PyObject_CallOneArg(tally, head);
            Py_DECREF(head);
            if (r == NULL) {
                Py_DECREF(rest);
                goto done;
            }
            Py_DECREF(r);
        }
    }

    /* Nothing can fail now but an append (memory): the record goes in whole. */
    if (PyList_Append(full, *ms_prefix) < 0 || PyList_Append(full, rest) < 0 || PyList_Append(full, c_message) < 0
            || PyList_Append(full, text) < 0 || PyList_Append(full, c_tail) < 0) {
        Py_DECREF(rest);
        goto done;
    }
    Py_DECREF(rest);
    if (levelno >= simplified_level) {
        if (PyList_Append(simp, *sec_prefix) < 0)
            goto done;
        if (levelno >= LEVEL_WARNING && (PyList_Append(simp, levelname) < 0 || PyList_Append(simp, c_colon) < 0))
            goto done;
        if (PyList_Append(simp, text) < 0 || PyList_Append(simp, c_nl) < 0)
            goto done;
    }
    rc = 1;
done:
    Py_XDECREF(key);
    Py_XDECREF(text);
    return rc;
}

static PyObject *
format_common(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *payloads, *full, *simp, *stamps, *heads, *head_rest, *tally, *fallback, *origin, *millis, *not_tallied;
    PyObject *const *pieces;
    PyObject *sec_prefix = NULL, *ts_text = NULL, *ms_prefix = NULL, *result = NULL;
    PyObject *last_key = NULL, *last_rest = NULL;  /* the previous record's header (format_one) */
    long simplified_level, tag_common;
    long long cur_sec = LLONG_MIN;
    int cur_ms = -1;
    Py_ssize_t i, n;

    if (nargs != 14) {
        PyErr_SetString(PyExc_TypeError, "format_common takes 14 arguments");
        return NULL;
    }
    payloads = args[0]; full = args[1]; simp = args[2];
    stamps = args[4]; heads = args[5]; head_rest = args[6]; tally = args[7]; fallback = args[8];
    origin = args[9]; millis = args[10]; not_tallied = args[11];
    if (!PyTuple_CheckExact(args[12]) || PyTuple_GET_SIZE(args[12]) != 4) {
        PyErr_SetString(PyExc_TypeError, "format_common: pieces must be a tuple of 4 str");
        return NULL;
    }
    pieces = &PyTuple_GET_ITEM(args[12], 0);
    for (i = 0; i < 4; i++)
        if (!PyUnicode_CheckExact(pieces[i])) {
            PyErr_SetString(PyExc_TypeError, "format_common: pieces must be a tuple of 4 str");
            return NULL;
        }
    if (!PyList_CheckExact(payloads) || !PyList_CheckExact(full) || !PyList_CheckExact(simp) || !PyDict_CheckExact(heads)
            || !PyList_CheckExact(millis) || PyList_GET_SIZE(millis) != 1000 || !PyAnySet_CheckExact(not_tallied)) {
        PyErr_SetString(PyExc_TypeError, "format_common: unexpected argument types");
        return NULL;
    }
    simplified_level = PyLong_AsLong(args[3]);
    if (simplified_level == -1 && PyErr_Occurred())
        return NULL;
    tag_common = PyLong_AsLong(args[13]);
    if (tag_common == -1 && PyErr_Occurred())
        return NULL;

    n = PyList_GET_SIZE(payloads);
    for (i = 0; i < n; i++) {
        PyObject *payload = PyList_GET_ITEM(payloads, i), *obj, *r;
        int rc = -1;
        Py_INCREF(payload);
        obj = PyBytes_CheckExact(payload)
            ? PyMarshal_ReadObjectFromString(PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload)) : NULL;
        if (obj != NULL) {
            rc = format_one(obj, full, simp, simplified_level, stamps, &cur_sec, &sec_prefix, &ts_text, &cur_ms,
                            &ms_prefix, heads, head_rest, &last_key, &last_rest, tally, millis, not_tallied,
                            pieces, tag_common);
            Py_DECREF(obj);
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
    Py_XDECREF(sec_prefix);
    Py_XDECREF(ts_text);
    Py_XDECREF(ms_prefix);
    Py_XDECREF(last_key);
    Py_XDECREF(last_rest);
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

/* flowscope.ipfix._columnar: an IPFIX data set decoded straight into typed columns, in C.
 *
 * Why it exists: a store wants columns (one array per field), and the record decoder
 * builds one dict per record (about 1 us each) that the store then has to take apart
 * again. This module reads a data set body once and writes every field's values into
 * that field's column: numbers as native-endian arrays of the field's width, text as
 * Arrow's string layout (int32 offsets and UTF-8 data), octets as the same layout.
 * Nothing is built per record.
 *
 * The values are what the record decoder (ipfix/template.py) gives for the same bytes,
 * value for value (tests/ipfix/test_ipfix_columnar.py compares both on valid and
 * malformed sets); ipfix/columnar.py maps each field onto its kind with the rules of
 * template._plan (through accel._kind) and is the pure-Python twin.
 *
 * decode_set(buf, off, end, plan, min_length) -> (n, columns)
 *   plan: bytes, 4 per field: kind (u8), width (u8: the column's item size), length
 *         (u16, native order; 65535 variable)
 *   columns: per field, a number column as bytes (n * width) or a text/octets column as
 *            (offsets bytes ((n + 1) * 4), data bytes)
 *   Records are read while at least min_length octets remain (less is padding); a
 *   record that runs past ``end`` raises ValueError (the caller makes it the codec's
 *   MalformedMessage). Every read is checked against ``end`` and the buffer.
 *
 * concat(parts) -> (offsets, data): text/octets columns (offsets bytes, data bytes)
 *   joined into one, the offsets rebased.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <stdint.h>
#include <string.h>

enum {
    K_UINT = 0, K_SINT, K_F32, K_F64, K_BOOL, K_MAC, K_SECONDS, K_MILLIS, K_NTP, K_IP4, K_IP6,
    K_STR_VAR, K_STR_FIX, K_OCT_VAR, K_OCT_FIX, K_COUNT
};

#define VARIABLE 65535

typedef struct {
    int kind, width, length;
    /* output */
    char *num;              /* n * width */
    int32_t *offsets;       /* n + 1 */
    char *data;             /* grown */
    Py_ssize_t used, cap;
} Field;

static int
is_var_kind(int k)
{
    return k == K_STR_VAR || k == K_OCT_VAR;
}

static int
is_text_kind(int k)
{
    return k == K_MAC || k == K_IP4 || k == K_IP6 || k >= K_STR_VAR;
}

static int
reserve(Field *f, Py_ssize_t need)
{
    if (f->used + need <= f->cap)
        return 0;
    Py_ssize_t cap = f->cap ? f->cap : 256;
    while (cap < f->used + need) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    char *p = PyMem_Realloc(f->data, (size_t)cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    f->data = p;
    f->cap = cap;
    return 0;
}

static int
append(Field *f, const char *p, Py_ssize_t n)
{
    if (reserve(f, n) < 0)
        return -1;
    if (n)
        memcpy(f->data + f->used, p, (size_t)n);
    f->used += n;
    return 0;
}

static uint64_t
be_uint(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

static void
put_uint(char *dst, int width, uint64_t v)
{
    switch (width) {
    case 1: { uint8_t x = (uint8_t)v; memcpy(dst, &x, 1); break; }
    case 2: { uint16_t x = (uint16_t)v; memcpy(dst, &x, 2); break; }
    case 4: { uint32_t x = (uint32_t)v; memcpy(dst, &x, 4); break; }
    default: memcpy(dst, &v, 8); break;
    }
}

/* UTF-8 text as the record decoder gives it: strict where valid, else with U+FFFD replacing
 * what is not (the decoder's lenient retry); ASCII is copied without a decode. */
static int
append_text(Field *f, const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++)
        if (p[i] & 0x80)
            break;
    if (i == n)
        return append(f, (const char *)p, n);
    PyObject *s = PyUnicode_DecodeUTF8((const char *)p, n, "replace");
    if (s == NULL)
        return -1;
    Py_ssize_t size;
    const char *u = PyUnicode_AsUTF8AndSize(s, &size);
    int rc = u == NULL ? -1 : append(f, u, size);
    Py_DECREF(s);
    return rc;
}

static int
convert(Field *f, Py_ssize_t row, const unsigned char *p, Py_ssize_t len)
{
    char tmp[64];
    switch (f->kind) {
    case K_UINT:
    case K_SECONDS:
        put_uint(f->num + row * f->width, f->width, be_uint(p, (int)len));
        return 0;
    case K_SINT: {
        uint64_t v = be_uint(p, (int)len);
        if (len < 8 && (v >> (len * 8 - 1)) & 1)
            v |= ~(uint64_t)0 << (len * 8);
        put_uint(f->num + row * f->width, f->width, v);
        return 0;
    }
    case K_F32: {
        uint32_t b = (uint32_t)be_uint(p, 4);
        float x;
        memcpy(&x, &b, 4);
        double d = (double)x;
        memcpy(f->num + row * 8, &d, 8);
        return 0;
    }
    case K_F64: {
        uint64_t b = be_uint(p, 8);
        memcpy(f->num + row * 8, &b, 8);
        return 0;
    }
    case K_BOOL: {
        uint8_t x = be_uint(p, (int)len) == 1;
        memcpy(f->num + row, &x, 1);
        return 0;
    }
    case K_MILLIS: {
        uint64_t v = be_uint(p, 8);
        double d;
        if (v < ((uint64_t)1 << 53)) {
            d = (double)v / 1000.0; /* exact operand: one rounding, as Python's int / int */
        } else {                    /* Python's true division of big ints rounds once: ask it */
            PyObject *a = PyLong_FromUnsignedLongLong(v), *b = PyLong_FromLong(1000), *q = NULL;
            if (a && b)
                q = PyNumber_TrueDivide(a, b);
            Py_XDECREF(a);
            Py_XDECREF(b);
            if (q == NULL)
                return -1;
            d = PyFloat_AsDouble(q);
            Py_DECREF(q);
        }
        memcpy(f->num + row * 8, &d, 8);
        return 0;
    }
    case K_NTP: {
        uint64_t v = be_uint(p, 8);
        double d = (double)((int64_t)(v >> 32) - 2208988800LL) + (double)(uint32_t)(v & 0xFFFFFFFFu) / 4294967296.0;
        memcpy(f->num + row * 8, &d, 8);
        return 0;
    }
    case K_MAC: {
        static const char hex[] = "0123456789abcdef";
        for (int i = 0; i < 6; i++) {
            tmp[i * 3] = hex[p[i] >> 4];
            tmp[i * 3 + 1] = hex[p[i] & 15];
            tmp[i * 3 + 2] = ':';
        }
        return append(f, tmp, 17);
    }
    case K_IP4: { /* dotted quad, as inet_ntoa (no snprintf: it costs more than the rest of a record) */
        int k = 0;
        for (int i = 0; i < 4; i++) {
            unsigned v = p[i];
            if (v >= 100)
                tmp[k++] = (char)('0' + v / 100);
            if (v >= 10)
                tmp[k++] = (char)('0' + v / 10 % 10);
            tmp[k++] = (char)('0' + v % 10);
            tmp[k++] = '.';
        }
        return append(f, tmp, k - 1);
    }
    case K_IP6: {
        if (inet_ntop(AF_INET6, p, tmp, sizeof tmp) == NULL) {
            PyErr_SetString(PyExc_ValueError, "inet_ntop failed");
            return -1;
        }
        return append(f, tmp, (Py_ssize_t)strlen(tmp));
    }
    case K_STR_VAR:
        return append_text(f, p, len);
    case K_STR_FIX: {
        while (len > 0 && p[len - 1] == 0)
            len--;
        return append_text(f, p, len);
    }
    default: /* octets */
        return append(f, (const char *)p, len);
    }
}

/* One record's field positions from ``off``; returns the offset after it, or -1 if it runs
 * past ``end`` (pos/lens may then be partly written). */
static Py_ssize_t
walk(const unsigned char *buf, Py_ssize_t off, Py_ssize_t end, const Field *fields, Py_ssize_t nf,
     Py_ssize_t *pos, Py_ssize_t *lens)
{
    for (Py_ssize_t i = 0; i < nf; i++) {
        Py_ssize_t n = fields[i].length;
        if (n == VARIABLE) {
            if (off >= end)
                return -1;
            n = buf[off++];
            if (n == 255) {
                if (end - off < 2)
                    return -1;
                n = ((Py_ssize_t)buf[off] << 8) | buf[off + 1];
                off += 2;
            }
        }
        if (end - off < n)
            return -1;
        pos[i] = off;
        lens[i] = n;
        off += n;
    }
    return off;
}

static PyObject *
decode_set(PyObject *self, PyObject *args)
{
    Py_buffer view, plan;
    Py_ssize_t off, end, min_length;
    if (!PyArg_ParseTuple(args, "y*nny*n", &view, &off, &end, &plan, &min_length))
        return NULL;
    PyObject *result = NULL, *cols = NULL;
    Field *fields = NULL;
    Py_ssize_t *pos = NULL, *lens = NULL;
    Py_ssize_t nf = plan.len / 4;
    const unsigned char *buf = view.buf;
    if (plan.len % 4 || nf == 0) {
        PyErr_SetString(PyExc_ValueError, "plan: 4 octets per field, at least one field");
        goto done;
    }
    if (off < 0 || end < off || end > view.len) {
        PyErr_Format(PyExc_ValueError, "set body %zd..%zd is outside the %zd-octet buffer", off, end, view.len);
        goto done;
    }
    if (min_length < 1) {
        PyErr_SetString(PyExc_ValueError, "min_length must be at least 1");
        goto done;
    }
    fields = PyMem_Calloc((size_t)nf, sizeof(Field));
    pos = PyMem_Calloc((size_t)nf, sizeof(Py_ssize_t));
    lens = PyMem_Calloc((size_t)nf, sizeof(Py_ssize_t));
    if (!fields || !pos || !lens) {
        PyErr_NoMemory();
        goto done;
    }
    const unsigned char *pl = plan.buf;
    Py_ssize_t floor_length = 0;
    for (Py_ssize_t i = 0; i < nf; i++) {
        Field *f = &fields[i];
        uint16_t length;
        memcpy(&length, pl + i * 4 + 2, 2);
        f->kind = pl[i * 4];
        f->width = pl[i * 4 + 1];
        f->length = length;
        int ok = f->kind < K_COUNT && length > 0;
        if (ok && f->length == VARIABLE)
            ok = is_var_kind(f->kind);
        else if (ok && is_var_kind(f->kind))
            ok = 0;
        if (ok) {
            switch (f->kind) {
            case K_UINT: case K_SINT:
                ok = length <= 8 && (f->width == 1 || f->width == 2 || f->width == 4 || f->width == 8) &&
                     length <= f->width;
                break;
            case K_F32: ok = length == 4 && f->width == 8; break;
            case K_F64: case K_MILLIS: case K_NTP: ok = length == 8 && f->width == 8; break;
            case K_BOOL: ok = length == 1 && f->width == 1; break;
            case K_SECONDS: ok = length == 4 && f->width == 4; break;
            case K_MAC: ok = length == 6; break;
            case K_IP4: ok = length == 4; break;
            case K_IP6: ok = length == 16; break;
            default: break;
            }
        }
        if (!ok) {
            PyErr_Format(PyExc_ValueError, "plan: field %zd (kind %d, width %d, length %d) is not a layout this takes",
                         i, f->kind, f->width, (int)length);
            goto done;
        }
        floor_length += f->length == VARIABLE ? 1 : f->length;
    }
    if (min_length < floor_length) {
        PyErr_SetString(PyExc_ValueError, "min_length is shorter than the template's records");
        goto done;
    }
    /* pass 1: count the records, every one checked to end inside the set */
    Py_ssize_t n = 0, at = off;
    while (end - at >= min_length) {
        Py_ssize_t next = walk(buf, at, end, fields, nf, pos, lens);
        if (next < 0) {
            PyErr_Format(PyExc_ValueError, "data record %zd runs past the end of its set", n);
            goto done;
        }
        at = next;
        n++;
    }
    for (Py_ssize_t i = 0; i < nf; i++) {
        Field *f = &fields[i];
        if (is_text_kind(f->kind) || f->kind == K_OCT_FIX) {
            f->offsets = PyMem_Malloc((size_t)(n + 1) * sizeof(int32_t));
            if (f->offsets == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            f->offsets[0] = 0;
            if (f->length != VARIABLE && reserve(f, n * (f->kind == K_IP6 ? 40 : f->kind == K_MAC ? 17 :
                                                             f->kind == K_IP4 ? 15 : f->length)) < 0)
                goto done;
        } else {
            f->num = PyMem_Malloc((size_t)(n ? n : 1) * (size_t)f->width);
            if (f->num == NULL) {
                PyErr_NoMemory();
                goto done;
            }
        }
    }
    /* pass 2: convert */
    at = off;
    for (Py_ssize_t r = 0; r < n; r++) {
        at = walk(buf, at, end, fields, nf, pos, lens);
        for (Py_ssize_t i = 0; i < nf; i++) {
            Field *f = &fields[i];
            if (convert(f, r, buf + pos[i], lens[i]) < 0)
                goto done;
            if (f->offsets) {
                if (f->used > INT32_MAX) {
                    PyErr_SetString(PyExc_OverflowError, "a column's data outgrew int32 offsets");
                    goto done;
                }
                f->offsets[r + 1] = (int32_t)f->used;
            }
        }
    }
    cols = PyList_New(nf);
    if (cols == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < nf; i++) {
        Field *f = &fields[i];
        PyObject *item;
        if (f->offsets) {
            item = Py_BuildValue("(y#y#)", (const char *)f->offsets, (Py_ssize_t)((n + 1) * 4),
                                 f->data ? f->data : "", f->used);
        } else {
            item = PyBytes_FromStringAndSize(f->num, n * f->width);
        }
        if (item == NULL)
            goto done;
        PyList_SET_ITEM(cols, i, item);
    }
    result = Py_BuildValue("(nO)", n, cols);
done:
    Py_XDECREF(cols);
    if (fields) {
        for (Py_ssize_t i = 0; i < nf; i++) {
            PyMem_Free(fields[i].num);
            PyMem_Free(fields[i].offsets);
            PyMem_Free(fields[i].data);
        }
    }
    PyMem_Free(fields);
    PyMem_Free(pos);
    PyMem_Free(lens);
    PyBuffer_Release(&view);
    PyBuffer_Release(&plan);
    return result;
}

static PyObject *
concat(PyObject *self, PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "concat takes a sequence of (offsets, data) pairs");
    if (seq == NULL)
        return NULL;
    Py_ssize_t parts = PySequence_Fast_GET_SIZE(seq), rows = 0, total = 0;
    PyObject *result = NULL, *offsets = NULL, *data = NULL;
    for (Py_ssize_t k = 0; k < parts; k++) {
        PyObject *p = PySequence_Fast_GET_ITEM(seq, k);
        if (!PyTuple_Check(p) || PyTuple_GET_SIZE(p) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(p, 0)) ||
            !PyBytes_Check(PyTuple_GET_ITEM(p, 1))) {
            PyErr_SetString(PyExc_TypeError, "concat: every part is a pair (offsets bytes, data bytes)");
            goto done;
        }
        Py_ssize_t olen = PyBytes_GET_SIZE(PyTuple_GET_ITEM(p, 0));
        if (olen < 4 || olen % 4) {
            PyErr_SetString(PyExc_ValueError, "concat: offsets hold n + 1 int32");
            goto done;
        }
        const int32_t *o = (const int32_t *)PyBytes_AS_STRING(PyTuple_GET_ITEM(p, 0));
        Py_ssize_t m = olen / 4 - 1;
        if (o[0] != 0 || o[m] != PyBytes_GET_SIZE(PyTuple_GET_ITEM(p, 1))) {
            PyErr_SetString(PyExc_ValueError, "concat: offsets do not span their data");
            goto done;
        }
        rows += m;
        total += PyBytes_GET_SIZE(PyTuple_GET_ITEM(p, 1));
    }
    if (total > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "concat: the data outgrows int32 offsets");
        goto done;
    }
    offsets = PyBytes_FromStringAndSize(NULL, (rows + 1) * 4);
    data = PyBytes_FromStringAndSize(NULL, total);
    if (offsets == NULL || data == NULL)
        goto done;
    int32_t *out = (int32_t *)PyBytes_AS_STRING(offsets);
    char *d = PyBytes_AS_STRING(data);
    Py_ssize_t row = 0, base = 0;
    out[0] = 0;
    for (Py_ssize_t k = 0; k < parts; k++) {
        PyObject *p = PySequence_Fast_GET_ITEM(seq, k);
        const int32_t *o = (const int32_t *)PyBytes_AS_STRING(PyTuple_GET_ITEM(p, 0));
        Py_ssize_t m = PyBytes_GET_SIZE(PyTuple_GET_ITEM(p, 0)) / 4 - 1;
        for (Py_ssize_t i = 1; i <= m; i++) {
            if (o[i] < o[i - 1]) {
                PyErr_SetString(PyExc_ValueError, "concat: offsets go backwards");
                goto done;
            }
            out[row + i] = (int32_t)(base + o[i]);
        }
        Py_ssize_t len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(p, 1));
        if (len)
            memcpy(d + base, PyBytes_AS_STRING(PyTuple_GET_ITEM(p, 1)), (size_t)len);
        row += m;
        base += len;
    }
    result = PyTuple_Pack(2, offsets, data);
done:
    Py_XDECREF(offsets);
    Py_XDECREF(data);
    Py_DECREF(seq);
    return result;
}

static PyMethodDef methods[] = {
    {"decode_set", decode_set, METH_VARARGS, "A data set body into typed columns (see ipfix/_columnar.c)."},
    {"concat", concat, METH_O, "Text/octets columns (offsets, data) joined into one."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_columnar", "IPFIX data sets into typed columns, in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__columnar(void)
{
    return PyModule_Create(&module);
}

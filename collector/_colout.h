/* The output side of a records-to-columns transposition: one column of the flow store
 * being filled row by row, then handed to Python. Shared by collector/_rowcols.c (records
 * as dicts) and aggregator/_aggr.c's columns() (the export's Records), which both make what
 * collector.rows.columns_of reads: an integer column as bytes of little-endian values of
 * its width, a text column as (offsets, data) in Arrow's layout (n + 1 int32 offsets into
 * UTF-8 data) or, in objects mode, a list of str.
 *
 * A column struct starts with COLOUT_HEAD (as CPython's objects start with PyObject_HEAD)
 * and is passed to these functions as a ColOut *. Rows are written at `row`, the count of
 * rows kept so far; colout_finish cuts the column to the rows kept. */
#ifndef FLOWSCOPE_COLOUT_H
#define FLOWSCOPE_COLOUT_H

#include <Python.h>
#include <stdint.h>
#include <string.h>

#define COLOUT_HEAD                                                                                  \
    int kind;  /* 0 integer, 1 text */                                                               \
    int width; /* an integer column's octets: 1, 2, 4 or 8 */                                        \
    PyObject *ints;    /* integer: bytes, n * width */                                               \
    PyObject *offsets; /* text: bytes, (n + 1) * 4 */                                                \
    PyObject *data;    /* text: bytes, grown */                                                      \
    Py_ssize_t used;   /* text: data octets used */                                                  \
    PyObject *list;    /* text in objects mode */

typedef struct {
    COLOUT_HEAD
} ColOut;

/* The column's buffers for n rows (kind and width set): 0, or -1 with an exception set. */
static int
colout_alloc(ColOut *c, Py_ssize_t n, int objects)
{
    if (c->kind == 0)
        return (c->ints = PyBytes_FromStringAndSize(NULL, n * c->width)) == NULL ? -1 : 0;
    if (objects)
        return (c->list = PyList_New(n)) == NULL ? -1 : 0;
    c->offsets = PyBytes_FromStringAndSize(NULL, (n + 1) * 4);
    c->data = PyBytes_FromStringAndSize(NULL, n * 8 + 64);
    if (c->offsets == NULL || c->data == NULL)
        return -1;
    memset(PyBytes_AS_STRING(c->offsets), 0, 4);
    return 0;
}

static inline void
colout_put_int(ColOut *c, Py_ssize_t row, uint64_t v)
{
    char *p = PyBytes_AS_STRING(c->ints) + row * c->width;
    switch (c->width) {
    case 1: { uint8_t x = (uint8_t)v; memcpy(p, &x, 1); break; }
    case 2: { uint16_t x = (uint16_t)v; memcpy(p, &x, 2); break; }
    case 4: { uint32_t x = (uint32_t)v; memcpy(p, &x, 4); break; }
    default: memcpy(p, &v, 8); break;
    }
}

/* A text value's UTF-8 octets appended as row `row`: 0, or -1 with an exception set. */
static int
colout_put_text(ColOut *c, Py_ssize_t row, const char *ptr, Py_ssize_t len)
{
    if (c->used + len > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "a text column holds more than 2 GiB");
        return -1;
    }
    Py_ssize_t cap = PyBytes_GET_SIZE(c->data);
    if (c->used + len > cap) {
        Py_ssize_t ncap = cap * 2 > c->used + len ? cap * 2 : c->used + len + 1024;
        if (_PyBytes_Resize(&c->data, ncap) < 0)
            return -1;
    }
    memcpy(PyBytes_AS_STRING(c->data) + c->used, ptr, len);
    c->used += len;
    int32_t off = (int32_t)c->used;
    memcpy(PyBytes_AS_STRING(c->offsets) + (row + 1) * 4, &off, 4);
    return 0;
}

/* A text value as row `row` in objects mode (a new reference is taken). */
static inline void
colout_put_obj(ColOut *c, Py_ssize_t row, PyObject *o)
{
    Py_INCREF(o);
    PyList_SET_ITEM(c->list, row, o);
}

/* The column as Python takes it, cut to `kept` of its `n` rows; the column gives its
 * buffers up (colout_clear is still safe). NULL with an exception set on failure. */
static PyObject *
colout_finish(ColOut *c, Py_ssize_t kept, Py_ssize_t n, int objects)
{
    PyObject *item;
    if (c->kind == 0) {
        if (_PyBytes_Resize(&c->ints, kept * c->width) < 0)
            return NULL;
        item = c->ints;
        c->ints = NULL;
    } else if (objects) {
        for (Py_ssize_t r = kept; r < n; r++) { /* unused tail: filled, then cut */
            Py_INCREF(Py_None);
            PyList_SET_ITEM(c->list, r, Py_None);
        }
        if (kept < n && PyList_SetSlice(c->list, kept, n, NULL) < 0)
            return NULL;
        item = c->list;
        c->list = NULL;
    } else {
        if (_PyBytes_Resize(&c->offsets, (kept + 1) * 4) < 0 || _PyBytes_Resize(&c->data, c->used) < 0)
            return NULL;
        item = PyTuple_Pack(2, c->offsets, c->data);
    }
    return item;
}

/* What the column still holds, released (an unfinished list's unset items are NULL, which
 * the list's dealloc skips). */
static void
colout_clear(ColOut *c)
{
    Py_CLEAR(c->ints);
    Py_CLEAR(c->offsets);
    Py_CLEAR(c->data);
    Py_CLEAR(c->list);
}

#endif /* FLOWSCOPE_COLOUT_H */

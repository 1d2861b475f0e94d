/* flowscope.collector._rowcols: the flow store's records-to-columns transposition in C.
 *
 * Why it exists: ingest turns every batch of decoded records (one dict of IE names per
 * record) into one typed column per table column. In Python that is one getitem, one
 * type check and one conversion per value, some 70 values a record: more than chDB
 * takes to store the row. This module does the same in one pass over each record's
 * items, writing each value straight into its column's buffer: integers as
 * little-endian unsigned ints of the column's width, text as Arrow's string layout
 * (int32 offsets and UTF-8 data) or, for the server's driver, a list of the str objects.
 *
 * What it checks is what collector/rows.py's pure-Python twin (_transpose_py) checks,
 * value for value (tests/collector/test_collector_rowcols.py compares both):
 *  - an integer column takes an int (bool included) in 0..2^bits-1; missing: 0;
 *  - a text column takes an exact str that encodes as UTF-8; missing: "";
 *  - a folded address column (IPv4 name, IPv6 name) takes `v4 or v6 or ""`;
 *  - a record that is no dict is copied into one (any mapping); one that cannot be is bad;
 *  - the correlation is a str constant, or one exact str per record.
 * A record with any value its column cannot hold is left out whole and its index
 * returned, so nothing is stored wrong and one bad record costs only itself.
 *
 * transpose(records, slot_of, nslots, plan, correlation, objects)
 *   slot_of: dict element name -> slot (unknown names are ignored)
 *   plan: tuple of (kind, width, slot_a, slot_b) per column; kind 0 integer (width 1, 2,
 *         4, 8 bytes), 1 text; slot_b -1 unless folded
 *   returns (columns, bad): per plan column then the correlation column, an integer
 *   column as bytes, a text column as (offsets bytes, data bytes), or a list of str when
 *   objects is true; bad is the list of the left-out records' indices.
 *
 * Keys are matched by identity first: the records of one template come from the decoder
 * with the very same key objects in the same order, so a cache of (position -> key,
 * slot) answers almost every key with one pointer compare; the cache holds references,
 * so no other object can take a cached key's address.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include "_colout.h"

#define KEY_CACHE 256

typedef struct {
    COLOUT_HEAD /* the output column (collector/_colout.h) */
    Py_ssize_t a, b;
    unsigned long long maximum;
} Col;

/* A text value: 1 ok (ptr/len/obj set), 0 bad. */
static int
text_of(PyObject *v, const char **ptr, Py_ssize_t *len)
{
    if (!PyUnicode_CheckExact(v))
        return 0;
    const char *s = PyUnicode_AsUTF8AndSize(v, len);
    if (s == NULL) {
        PyErr_Clear();
        return 0;
    }
    *ptr = s;
    return 1;
}

static PyObject *EMPTY; /* "" */

static void
release(PyObject **slots, Py_ssize_t nslots, int *held)
{
    if (*held) {
        for (Py_ssize_t s = 0; s < nslots; s++)
            Py_XDECREF(slots[s]);
        *held = 0;
    }
}

/* Truth of a value (NULL: false), -1 on error. Any other type than str, int or None may
 * run code in __bool__ that changes the record under the borrowed slot values: those
 * are then held (once a row; released at its end). */
static int
truth(PyObject *v, PyObject **slots, Py_ssize_t nslots, int *held)
{
    if (v == NULL || v == Py_None)
        return 0;
    if (PyUnicode_CheckExact(v))
        return PyUnicode_GET_LENGTH(v) != 0;
    if (!*held) {
        for (Py_ssize_t s = 0; s < nslots; s++)
            Py_XINCREF(slots[s]);
        *held = 1;
    }
    int t = PyObject_IsTrue(v);
    if (t < 0)
        PyErr_Clear();
    return t;
}

static PyObject *
transpose(PyObject *self, PyObject *args)
{
    PyObject *records, *slot_of, *plan, *correlation;
    Py_ssize_t nslots;
    int objects;
    if (!PyArg_ParseTuple(args, "OO!nO!Op", &records, &PyDict_Type, &slot_of, &nslots, &PyTuple_Type, &plan,
                          &correlation, &objects))
        return NULL;
    if (nslots < 0 || nslots > 4096) {
        PyErr_SetString(PyExc_ValueError, "nslots out of range");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(records, "records must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **recs = PySequence_Fast_ITEMS(seq);
    int corr_const = PyUnicode_CheckExact(correlation);
    PyObject *corr_seq = NULL;
    const char *corr_ptr = NULL;
    Py_ssize_t corr_len = 0;
    if (corr_const) {
        if (!text_of(correlation, &corr_ptr, &corr_len)) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "correlation does not encode as UTF-8");
            return NULL;
        }
    } else {
        corr_seq = PySequence_Fast(correlation, "correlation must be a str or a sequence");
        if (corr_seq == NULL) {
            Py_DECREF(seq);
            return NULL;
        }
        if (PySequence_Fast_GET_SIZE(corr_seq) != n) {
            Py_DECREF(seq);
            Py_DECREF(corr_seq);
            PyErr_SetString(PyExc_ValueError, "one correlation per record");
            return NULL;
        }
    }

    Py_ssize_t nplan = PyTuple_GET_SIZE(plan);
    Py_ssize_t ncols = nplan + 1; /* the correlation column last */
    Col *cols = PyMem_Calloc(ncols, sizeof(Col));
    PyObject **slots = PyMem_Calloc(nslots ? nslots : 1, sizeof(PyObject *));
    unsigned long long *ival = PyMem_Calloc(ncols, sizeof(unsigned long long));
    const char **tptr = PyMem_Calloc(ncols, sizeof(char *));
    Py_ssize_t *tlen = PyMem_Calloc(ncols, sizeof(Py_ssize_t));
    PyObject **tobj = PyMem_Calloc(ncols, sizeof(PyObject *));
    PyObject *cache_key[KEY_CACHE];
    Py_ssize_t cache_slot[KEY_CACHE];
    Py_ssize_t cache_n = 0;
    PyObject *bad = PyList_New(0);
    PyObject *result = NULL;
    if (!cols || !slots || !ival || !tptr || !tlen || !tobj || !bad) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t j = 0; j < ncols; j++) {
        Col *c = &cols[j];
        if (j < nplan) {
            PyObject *spec = PyTuple_GET_ITEM(plan, j);
            if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 4) {
                PyErr_SetString(PyExc_ValueError, "plan entries are (kind, width, slot_a, slot_b)");
                goto done;
            }
            c->kind = (int)PyLong_AsLong(PyTuple_GET_ITEM(spec, 0));
            c->width = (int)PyLong_AsLong(PyTuple_GET_ITEM(spec, 1));
            c->a = PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, 2));
            c->b = PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, 3));
            if (PyErr_Occurred())
                goto done;
            if (c->a < 0 || c->a >= nslots || c->b >= nslots || (c->kind != 0 && c->kind != 1) ||
                (c->kind == 0 && c->width != 1 && c->width != 2 && c->width != 4 && c->width != 8)) {
                PyErr_SetString(PyExc_ValueError, "bad plan entry");
                goto done;
            }
        } else {
            c->kind = 1;
            c->a = c->b = -1;
        }
        if (c->kind == 0)
            c->maximum = c->width == 8 ? ~0ULL : ((1ULL << (8 * c->width)) - 1);
        if (colout_alloc((ColOut *)c, n, objects) < 0)
            goto done;
    }

    Py_ssize_t kept = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *rec = recs[i];
        PyObject *tmp = NULL;
        int ok = 1, held = 0;
        if (!PyDict_Check(rec)) {
            tmp = PyDict_New();
            if (tmp == NULL)
                goto done;
            if (PyDict_Merge(tmp, rec, 1) < 0) {
                PyErr_Clear();
                ok = 0;
            }
            rec = tmp;
        }
        memset(slots, 0, nslots * sizeof(PyObject *));
        if (ok) {
            Py_ssize_t pos = 0, k = 0;
            PyObject *key, *val;
            while (PyDict_Next(rec, &pos, &key, &val)) {
                Py_ssize_t slot;
                if (k < cache_n && cache_key[k] == key) {
                    slot = cache_slot[k];
                } else {
                    PyObject *s = PyDict_GetItemWithError(slot_of, key);
                    if (s == NULL) {
                        if (PyErr_Occurred()) { /* an unhashable key cannot be ours: ignore it */
                            PyErr_Clear();
                        }
                        slot = -1;
                    } else {
                        slot = PyLong_AsSsize_t(s);
                        if (slot < 0 || slot >= nslots) {
                            PyErr_Clear();
                            slot = -1;
                        }
                    }
                    if (k < KEY_CACHE) {
                        if (k < cache_n) {
                            Py_DECREF(cache_key[k]);
                        } else {
                            cache_n = k + 1;
                        }
                        Py_INCREF(key);
                        cache_key[k] = key;
                        cache_slot[k] = slot;
                    }
                }
                if (slot >= 0)
                    slots[slot] = val;
                k++;
            }
        }
        /* the values of this row, checked */
        for (Py_ssize_t j = 0; ok && j < nplan; j++) {
            Col *c = &cols[j];
            PyObject *v = slots[c->a];
            if (c->kind == 0) {
                if (v == NULL) {
                    ival[j] = 0;
                } else if (!PyLong_Check(v)) {
                    ok = 0;
                } else {
                    unsigned long long x = PyLong_AsUnsignedLongLong(v);
                    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
                        PyErr_Clear();
                        ok = 0;
                    } else if (x > c->maximum) {
                        ok = 0;
                    } else {
                        ival[j] = x;
                    }
                }
                continue;
            }
            if (c->b >= 0) { /* v4 or v6 or "" */
                int t = truth(v, slots, nslots, &held);
                if (t < 0) {
                    ok = 0;
                    break;
                }
                if (!t) {
                    v = slots[c->b];
                    if ((t = truth(v, slots, nslots, &held)) < 0) {
                        ok = 0;
                        break;
                    }
                    if (!t)
                        v = NULL;
                }
            }
            if (v == NULL)
                v = EMPTY;
            if (!text_of(v, &tptr[j], &tlen[j]))
                ok = 0;
            tobj[j] = v;
        }
        if (ok) {
            PyObject *cv = corr_const ? correlation : PySequence_Fast_ITEMS(corr_seq)[i];
            if (corr_const) {
                tptr[nplan] = corr_ptr;
                tlen[nplan] = corr_len;
            } else if (!text_of(cv, &tptr[nplan], &tlen[nplan])) {
                ok = 0;
            }
            tobj[nplan] = cv;
        }
        if (ok) {
            for (Py_ssize_t j = 0; j < ncols; j++) {
                Col *c = &cols[j];
                if (c->kind == 0) {
                    colout_put_int((ColOut *)c, kept, ival[j]);
                } else if (objects) {
                    colout_put_obj((ColOut *)c, kept, tobj[j]);
                } else if (colout_put_text((ColOut *)c, kept, tptr[j], tlen[j]) < 0) {
                    release(slots, nslots, &held);
                    Py_XDECREF(tmp);
                    goto done;
                }
            }
            kept++;
        } else {
            PyObject *idx = PyLong_FromSsize_t(i);
            if (idx == NULL || PyList_Append(bad, idx) < 0) {
                Py_XDECREF(idx);
                release(slots, nslots, &held);
                Py_XDECREF(tmp);
                goto done;
            }
            Py_DECREF(idx);
        }
        release(slots, nslots, &held);
        Py_XDECREF(tmp);
    }

    PyObject *out = PyList_New(ncols);
    if (out == NULL)
        goto done;
    for (Py_ssize_t j = 0; j < ncols; j++) {
        PyObject *item = colout_finish((ColOut *)&cols[j], kept, n, objects);
        if (item == NULL) {
            Py_DECREF(out);
            goto done;
        }
        PyList_SET_ITEM(out, j, item);
    }
    result = Py_BuildValue("(NO)", out, bad);

done:
    for (Py_ssize_t k = 0; k < cache_n; k++)
        Py_DECREF(cache_key[k]);
    if (cols) {
        for (Py_ssize_t j = 0; j < ncols; j++) {
            colout_clear((ColOut *)&cols[j]);
        }
    }
    PyMem_Free(cols);
    PyMem_Free(slots);
    PyMem_Free(ival);
    PyMem_Free(tptr);
    PyMem_Free(tlen);
    PyMem_Free(tobj);
    Py_XDECREF(bad);
    Py_DECREF(seq);
    Py_XDECREF(corr_seq);
    return result;
}

/* native_text(offsets, data) -> bytes
 *
 * A text column in Arrow's layout (n + 1 little-endian int32 offsets into UTF-8 data) in
 * ClickHouse's Native layout instead: each value's length as an unsigned LEB128 varint,
 * then its bytes. chDB reads a Native block for about half what its Python() table
 * function takes to read the same columns from Arrow (docs/clickhouse.md). Offsets that
 * go backwards or past the data raise ValueError. */
static PyObject *
native_text(PyObject *self, PyObject *args)
{
    Py_buffer ob, db;
    if (!PyArg_ParseTuple(args, "y*y*", &ob, &db))
        return NULL;
    PyObject *out = NULL;
    if (ob.len < 4 || ob.len % 4) {
        PyErr_SetString(PyExc_ValueError, "offsets must be n + 1 int32 values");
        goto done;
    }
    Py_ssize_t n = ob.len / 4 - 1;
    const unsigned char *op = ob.buf;
    const char *data = db.buf;
    int32_t first;
    memcpy(&first, op, 4);
    if (first < 0 || first > db.len) {
        PyErr_SetString(PyExc_ValueError, "offsets go past the data");
        goto done;
    }
    int32_t last;
    memcpy(&last, op + 4 * n, 4);
    if (last < first || last > db.len) {
        PyErr_SetString(PyExc_ValueError, "offsets go backwards or past the data");
        goto done;
    }
    /* at most 5 varint bytes a value (lengths are under 2^31) */
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(last - first) + 5 * n);
    if (out == NULL)
        goto done;
    unsigned char *w = (unsigned char *)PyBytes_AS_STRING(out);
    unsigned char *start = w;
    int32_t prev = first;
    for (Py_ssize_t i = 1; i <= n; i++) {
        int32_t next;
        memcpy(&next, op + 4 * i, 4);
        if (next < prev || next > last) {
            Py_CLEAR(out);
            PyErr_SetString(PyExc_ValueError, "offsets go backwards or past the data");
            goto done;
        }
        uint32_t len = (uint32_t)(next - prev);
        while (len >= 0x80) {
            *w++ = (unsigned char)(len | 0x80);
            len >>= 7;
        }
        *w++ = (unsigned char)len;
        memcpy(w, data + prev, (size_t)(next - prev));
        w += next - prev;
        prev = next;
    }
    if (_PyBytes_Resize(&out, (Py_ssize_t)(w - start)) < 0)
        out = NULL;
done:
    PyBuffer_Release(&ob);
    PyBuffer_Release(&db);
    return out;
}

static PyMethodDef methods[] = {
    {"transpose", transpose, METH_VARARGS, "Records into typed columns (see collector/_rowcols.c)."},
    {"native_text", native_text, METH_VARARGS, "Arrow's text layout into ClickHouse's Native one."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rowcols", "The flow store's records-to-columns transposition in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__rowcols(void)
{
    EMPTY = PyUnicode_FromString("");
    if (EMPTY == NULL)
        return NULL;
    return PyModule_Create(&module);
}

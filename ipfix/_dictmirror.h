/* The layout of a CPython 3.11/3.12 dict's keys table, mirrored for the accelerators
 * that write a fresh record's values straight into its entries (ipfix/_speedups.c for
 * decoded records, aggregator/_aggr.c for aggregated ones) instead of one PyDict_SetItem
 * per value.
 *
 * Why a mirror: the structs are CPython's internals (Objects/dict-common.h), not in its
 * headers. A dict of str keys with a "combined" table keeps its (key, value) entries in
 * insertion order right after the index table; direct_entries finds them for a fresh
 * copy of a prototype of n keys, or says NULL when the dict is not laid out that way
 * (split table, other key kind, shared keys, another size), and each caller then takes
 * the ordinary way. Callers also check a prototype's layout once (a value written into
 * an entry must be what a lookup finds) before they rely on it. On other versions
 * DIRECT_DICTS is 0, direct_entries always NULL. */
#ifndef FLOWSCOPE_DICTMIRROR_H
#define FLOWSCOPE_DICTMIRROR_H

#include <Python.h>
#include <stdint.h>

typedef struct {
    PyObject *me_key;
    PyObject *me_value;
} UnicodeEntryMirror;

#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000
#define DIRECT_DICTS 1
typedef struct {
    Py_ssize_t dk_refcnt;
    uint8_t dk_log2_size;
    uint8_t dk_log2_index_bytes;
    uint8_t dk_kind;
    uint32_t dk_version;
    Py_ssize_t dk_usable;
    Py_ssize_t dk_nentries;
    char dk_indices[];
} KeysMirror;
#define DICT_KEYS_UNICODE_KIND 1

/* The entries of a fresh copy of a prototype of n keys, or NULL when its layout is not the expected one. */
static inline UnicodeEntryMirror *
direct_entries(PyObject *d, Py_ssize_t n)
{
    PyDictObject *mp = (PyDictObject *)d;
    KeysMirror *k = (KeysMirror *)mp->ma_keys;
    if (mp->ma_values != NULL || k->dk_kind != DICT_KEYS_UNICODE_KIND || k->dk_nentries != n || k->dk_refcnt != 1 ||
        mp->ma_used != n) {
        return NULL;
    }
    return (UnicodeEntryMirror *)(k->dk_indices + ((size_t)1 << k->dk_log2_index_bytes));
}
#else
#define DIRECT_DICTS 0
static inline UnicodeEntryMirror *
direct_entries(PyObject *d, Py_ssize_t n)
{
    (void)d;
    (void)n;
    return NULL;
}
#endif

#endif /* FLOWSCOPE_DICTMIRROR_H */

/* flowscope.agent._ctparse: the conntrack dump parser's inner loop in C.
 *
 * Why it exists: a poll reads the whole conntrack table (100k entries and more) every
 * few seconds; in Python, matching each message against its compiled layout and
 * building its ConntrackEntry costs more than the kernel takes to send the dump.
 *
 * It does no netlink walking of its own: agent/conntrack.py still compiles each new
 * layout (_compile) the first time a message of that shape arrives; agent/ctfast.py
 * turns the compiled layout into a description this module applies (where each leaf
 * value sits, which entry field it fills, the attribute-header bytes that must match)
 * and this module applies it to every later message of the same length and headers,
 * building the very same ConntrackEntry and ConnKey tuples. A message no layout
 * matches is handed back to Python (the `unknown` callback), which compiles a layout or
 * counts the message as malformed. tests/agent/test_agent_ctfast.py compares both
 * parsers on mixed tables.
 *
 * Addresses, ports and repeating 32-bit values (status, mark) are shared objects, from
 * small caches: a table of 100k connections names far fewer distinct ones.
 *
 * Most entries of a poll are unchanged since the last one (same counters, same state),
 * and the store keeps every entry of the last dump anyway. So the parser remembers the
 * entries it returned in the last dump, in dump order with their conntrack ids (CTA_ID).
 * The kernel lists its table in hash-bucket order, the same from one dump to the next,
 * so a message's predecessor is found just after the last one found, in sequential
 * memory (a hash table of 100k pointers cost two cache misses a message). A message
 * whose every value equals the remembered entry's (compared leaf by leaf against the
 * raw message, no object built) returns that very entry again; a changed entry is built
 * anew, keeping the remembered key tuple when the key did not change. Remembered entries
 * are released as soon as their id comes by again (or at the end of the dump for those
 * that left the table), so no second copy of a changing table is held. This is a cache
 * only: a miss builds the entry, a hit is exactly the entry a build would make (equal
 * field for field, of the same types).
 *
 * Given the store's connections (ConnectionStore.held), an unchanged entry whose
 * connection still holds it is marked seen there (connection.seen = poll) instead of
 * being appended, which is what the store's feed would do with it; the connection is
 * remembered beside the entry, so the next dump needs no dict lookup for it (the store
 * marks every connection it lets go with seen = GONE, -1, and a connection remembered
 * from another dict is not trusted). tests/agent/test_agent_ctreuse.py runs sequences
 * of polls through both parsers and compares the stores.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

enum { V_U8 = 0, V_U16 = 1, V_U32 = 2, V_U64 = 3, V_BYTES = 4 };

#define MAX_FIELDS 64

typedef struct Layout {
    struct Layout *next; /* another layout of the same message length */
    Py_ssize_t length;
    unsigned char *mask;
    unsigned char *expected;
    Py_ssize_t nleaves;
    Py_ssize_t *leaf_off;
    int *leaf_kind;
    Py_ssize_t *leaf_size;
    Py_ssize_t nentry; /* entry fields after the key */
    Py_ssize_t *entry_src; /* leaf index, or -1: entry_def */
    PyObject **entry_def;
    Py_ssize_t nkey;
    Py_ssize_t *key_src;
    PyObject **key_def;
    Py_ssize_t zone_field; /* index into the key of the zone (checked; the filter reads key[0]) */
} Layout;

#define ADDR_SLOTS 8192
typedef struct {
    PyObject *value;
} AddrSlot;

#define U32_SLOTS 4096
typedef struct {
    uint32_t key;
    PyObject *value;
} U32Slot;

/* The entries of one dump in the order the kernel listed them (its hash-bucket order,
 * the same from one dump to the next), with their conntrack ids beside them. */
typedef struct {
    PyObject **items; /* owned; NULL once taken */
    PyObject **conns; /* owned or NULL: the connection of held that held the entry */
    PyObject *held; /* owned or NULL: the dict those connections were found in */
    uint32_t *ids;
    size_t len, cap;
    size_t cursor; /* where the next message's predecessor probably is */
    size_t misses; /* consecutive lookups that found nothing near the cursor */
    size_t resyncs; /* searches of the whole remainder this dump */
} EntrySeq;

/* A lookup first tries the WINDOW entries after the cursor (entries that left the table
 * since are skipped over; a new entry finds nothing); after LOST consecutive misses the
 * cursor is probably behind a long run of departures, and the next miss searches the
 * rest of the ids once (a sequential scan) to find its place again, at most RESYNCS times
 * a dump. A miss is only a build: the table decides nothing. */
#define WINDOW 64
#define LOST 32
#define RESYNCS 64

typedef struct {
    PyObject_HEAD
    PyTypeObject *entry_type;
    PyTypeObject *key_type;
    Py_ssize_t id_field; /* index into the entry (key included) of the conntrack id */
    EntrySeq last; /* the entries of the last complete dump, not yet seen again */
    EntrySeq current; /* the entries of this dump so far */
    Py_ssize_t reused; /* entries returned again unchanged (statistics, tests) */
    Layout *by_length[65536];
    Py_ssize_t count;
    AddrSlot addr4[ADDR_SLOTS];
    AddrSlot addr16[ADDR_SLOTS];
    /* Shared int objects: every port (a table of 100k entries holds 4 per entry), and
     * recent 32-bit values (status and mark repeat; ids do not and just pass through). */
    PyObject *u16[65536];
    U32Slot u32[U32_SLOTS];
} ParserObject;

static void
layout_free(Layout *l)
{
    if (l == NULL) {
        return;
    }
    for (Py_ssize_t i = 0; i < l->nentry; i++) {
        Py_XDECREF(l->entry_def ? l->entry_def[i] : NULL);
    }
    for (Py_ssize_t i = 0; i < l->nkey; i++) {
        Py_XDECREF(l->key_def ? l->key_def[i] : NULL);
    }
    PyMem_Free(l->mask);
    PyMem_Free(l->expected);
    PyMem_Free(l->leaf_off);
    PyMem_Free(l->leaf_kind);
    PyMem_Free(l->leaf_size);
    PyMem_Free(l->entry_src);
    PyMem_Free(l->entry_def);
    PyMem_Free(l->key_src);
    PyMem_Free(l->key_def);
    PyMem_Free(l);
}

static void
parser_clear_layouts(ParserObject *self)
{
    for (int i = 0; i < 65536; i++) {
        Layout *l = self->by_length[i];
        while (l != NULL) {
            Layout *next = l->next;
            layout_free(l);
            l = next;
        }
        self->by_length[i] = NULL;
    }
    self->count = 0;
}

static inline uint64_t
load64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline int
headers_match(const Layout *l, const unsigned char *m)
{
    Py_ssize_t i = 0, n = l->length;
    for (; i + 8 <= n; i += 8) {
        if ((load64(m + i) & load64(l->mask + i)) != load64(l->expected + i)) {
            return 0;
        }
    }
    for (; i < n; i++) {
        if ((m[i] & l->mask[i]) != l->expected[i]) {
            return 0;
        }
    }
    return 1;
}

static PyObject *
address(ParserObject *self, const unsigned char *p, Py_ssize_t n)
{
    AddrSlot *table;
    uint64_t h;
    if (n == 4) {
        uint32_t a;
        memcpy(&a, p, 4);
        h = (uint64_t)a * 0x9e3779b97f4a7c15ULL;
        table = self->addr4;
    }
    else if (n == 16) {
        h = (load64(p) * 0x9e3779b97f4a7c15ULL) ^ (load64(p + 8) * 0xbf58476d1ce4e5b9ULL);
        table = self->addr16;
    }
    else {
        return PyBytes_FromStringAndSize((const char *)p, n);
    }
    AddrSlot *slot = &table[(h >> 40) & (ADDR_SLOTS - 1)];
    PyObject *v = slot->value;
    if (v != NULL && memcmp(PyBytes_AS_STRING(v), p, (size_t)n) == 0) {
        Py_INCREF(v);
        return v;
    }
    v = PyBytes_FromStringAndSize((const char *)p, n);
    if (v == NULL) {
        return NULL;
    }
    Py_XSETREF(slot->value, Py_NewRef(v));
    return v;
}

static void
seq_free(EntrySeq *t)
{
    for (size_t i = 0; i < t->len; i++) {
        Py_XDECREF(t->items[i]);
        Py_XDECREF(t->conns[i]);
    }
    Py_XDECREF(t->held);
    PyMem_Free(t->items);
    PyMem_Free(t->conns);
    PyMem_Free(t->ids);
    memset(t, 0, sizeof(*t));
}

/* The conntrack id of an entry (0 when it has none, or not an int). */
static uint32_t
entry_id(ParserObject *self, PyObject *entry)
{
    if (PyTuple_GET_SIZE(entry) <= self->id_field) {
        return 0;
    }
    PyObject *v = PyTuple_GET_ITEM(entry, self->id_field);
    if (!PyLong_CheckExact(v)) {
        return 0;
    }
    unsigned long id = PyLong_AsUnsignedLong(v);
    if (id == (unsigned long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return id > 0xFFFFFFFFUL ? 0 : (uint32_t)id;
}

/* Remember entry (a new reference is taken) under id, at the end of this dump's
 * sequence, with the connection of held that holds it (or NULL). */
static int
seq_append(ParserObject *self, EntrySeq *t, uint32_t id, PyObject *entry, PyObject *held, PyObject *conn)
{
    if (conn != NULL && t->held != held) {
        if (t->held == NULL) {
            t->held = Py_NewRef(held);
        }
        else {
            conn = NULL; /* another store's: not worth remembering */
        }
    }
    if (t->len == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : (self->last.len > 1024 ? self->last.len + self->last.len / 8 : 1024);
        PyObject **items = PyMem_Realloc(t->items, cap * sizeof(PyObject *));
        if (items == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        t->items = items;
        uint32_t *ids = PyMem_Realloc(t->ids, cap * sizeof(uint32_t));
        if (ids == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        t->ids = ids;
        PyObject **conns = PyMem_Realloc(t->conns, cap * sizeof(PyObject *));
        if (conns == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        t->conns = conns;
        t->cap = cap;
    }
    t->conns[t->len] = conn ? Py_NewRef(conn) : NULL;
    t->items[t->len] = Py_NewRef(entry);
    t->ids[t->len] = id;
    t->len++;
    return 0;
}

static PyObject *
seq_take_at(EntrySeq *t, size_t j, PyObject **conn)
{
    PyObject *v = t->items[j];
    t->items[j] = NULL;
    *conn = t->conns[j];
    t->conns[j] = NULL;
    t->cursor = j + 1;
    t->misses = 0;
    return v;
}

/* Take the entry remembered under id out of the last dump's sequence (a reference the
 * caller owns), or NULL when none is found; *conn: its connection (owned) or NULL. */
static PyObject *
seq_take(EntrySeq *t, uint32_t id, PyObject **conn)
{
    *conn = NULL;
    size_t end = t->cursor + WINDOW < t->len ? t->cursor + WINDOW : t->len;
    for (size_t j = t->cursor; j < end; j++) {
        if (t->ids[j] == id && t->items[j] != NULL) {
            return seq_take_at(t, j, conn);
        }
    }
    if (++t->misses > LOST && t->resyncs < RESYNCS) {
        t->resyncs++;
        for (size_t j = end; j < t->len; j++) {
            if (t->ids[j] == id && t->items[j] != NULL) {
                return seq_take_at(t, j, conn);
            }
        }
    }
    return NULL;
}

/* The next dump starts: what this dump remembered becomes the last dump's. */
static void
seqs_rotate(ParserObject *self)
{
    seq_free(&self->last);
    self->last = self->current;
    self->last.cursor = self->last.misses = self->last.resyncs = 0;
    memset(&self->current, 0, sizeof(self->current));
}

static inline uint64_t
leaf_raw(const Layout *l, Py_ssize_t i, const unsigned char *m)
{
    const unsigned char *p = m + l->leaf_off[i];
    switch (l->leaf_kind[i]) {
    case V_U8:
        return p[0];
    case V_U16:
        return ((uint64_t)p[0] << 8) | p[1];
    case V_U32:
        return ((uint64_t)p[0] << 24) | ((uint64_t)p[1] << 16) | ((uint64_t)p[2] << 8) | p[3];
    default: {
        uint64_t v = 0;
        for (int k = 0; k < 8; k++) {
            v = (v << 8) | p[k];
        }
        return v;
    }
    }
}

/* 1 when old (an entry's or a key's field) equals what leaf src (or the default def)
 * of message m would make it, 0 when not, -1 on error. */
static int
same_value(const Layout *l, Py_ssize_t src, PyObject *def, const unsigned char *m, PyObject *old)
{
    if (src < 0) {
        if (old == def) {
            return 1;
        }
        if (Py_TYPE(old) != Py_TYPE(def)) {
            return 0;
        }
        return PyObject_RichCompareBool(old, def, Py_EQ);
    }
    if (l->leaf_kind[src] == V_BYTES) {
        Py_ssize_t size = l->leaf_size[src];
        return PyBytes_CheckExact(old) && PyBytes_GET_SIZE(old) == size &&
               memcmp(PyBytes_AS_STRING(old), m + l->leaf_off[src], (size_t)size) == 0;
    }
    if (!PyLong_CheckExact(old)) {
        return 0;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(old, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    uint64_t raw = leaf_raw(l, src, m);
    if (overflow == 0) {
        return v >= 0 && (uint64_t)v == raw;
    }
    if (overflow < 0 || raw <= (uint64_t)LLONG_MAX) {
        return 0;
    }
    unsigned long long u = PyLong_AsUnsignedLongLong(old);
    if (u == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return u == raw;
}

/* Does old (an entry of the last dump) hold exactly the values of message m laid out as
 * l? *same_key tells whether at least its key does. -1 on error. */
static int
same_entry(ParserObject *self, const Layout *l, const unsigned char *m, PyObject *old, int *same_key)
{
    *same_key = 0;
    if (Py_TYPE(old) != self->entry_type || PyTuple_GET_SIZE(old) != l->nentry + 1) {
        return 0;
    }
    PyObject *key = PyTuple_GET_ITEM(old, 0);
    if (Py_TYPE(key) != self->key_type || PyTuple_GET_SIZE(key) != l->nkey) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < l->nkey; i++) {
        int r = same_value(l, l->key_src[i], l->key_def[i], m, PyTuple_GET_ITEM(key, i));
        if (r <= 0) {
            return r;
        }
    }
    *same_key = 1;
    for (Py_ssize_t i = 0; i < l->nentry; i++) {
        int r = same_value(l, l->entry_src[i], l->entry_def[i], m, PyTuple_GET_ITEM(old, i + 1));
        if (r <= 0) {
            return r;
        }
    }
    return 1;
}

static PyObject *
leaf_value(ParserObject *self, const Layout *l, Py_ssize_t i, const unsigned char *m)
{
    const unsigned char *p = m + l->leaf_off[i];
    switch (l->leaf_kind[i]) {
    case V_U8:
        return PyLong_FromLong(p[0]);
    case V_U16: {
        int v = (p[0] << 8) | p[1];
        PyObject *o = self->u16[v];
        if (o == NULL) {
            o = self->u16[v] = PyLong_FromLong(v);
            if (o == NULL) {
                return NULL;
            }
        }
        return Py_NewRef(o);
    }
    case V_U32: {
        uint32_t v = ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
        U32Slot *slot = &self->u32[(uint32_t)(v * 2654435761u) >> 20];
        if (slot->value != NULL && slot->key == v) {
            return Py_NewRef(slot->value);
        }
        PyObject *o = PyLong_FromUnsignedLong(v);
        if (o == NULL) {
            return NULL;
        }
        Py_XSETREF(slot->value, Py_NewRef(o));
        slot->key = v;
        return o;
    }
    case V_U64: {
        uint64_t v = 0;
        for (int k = 0; k < 8; k++) {
            v = (v << 8) | p[k];
        }
        return PyLong_FromUnsignedLongLong(v);
    }
    default:
        return address(self, p, l->leaf_size[i]);
    }
}

/* The entry of one message laid out as l; NULL on error. */
static PyObject *
build_entry(ParserObject *self, const Layout *l, const unsigned char *m, PyObject *known_key)
{
    PyObject *vals[MAX_FIELDS];
    for (Py_ssize_t i = 0; i < l->nleaves; i++) {
        vals[i] = leaf_value(self, l, i, m);
        if (vals[i] == NULL) {
            for (Py_ssize_t j = 0; j < i; j++) {
                Py_DECREF(vals[j]);
            }
            return NULL;
        }
    }
    PyObject *key = known_key ? Py_NewRef(known_key) : self->key_type->tp_alloc(self->key_type, l->nkey);
    PyObject *entry = key ? self->entry_type->tp_alloc(self->entry_type, l->nentry + 1) : NULL;
    if (entry == NULL) {
        Py_XDECREF(key);
        for (Py_ssize_t j = 0; j < l->nleaves; j++) {
            Py_DECREF(vals[j]);
        }
        return NULL;
    }
    for (Py_ssize_t i = 0; known_key == NULL && i < l->nkey; i++) {
        PyObject *v = l->key_src[i] >= 0 ? vals[l->key_src[i]] : l->key_def[i];
        Py_INCREF(v);
        PyTuple_SET_ITEM(key, i, v);
    }
    PyTuple_SET_ITEM(entry, 0, key);
    for (Py_ssize_t i = 0; i < l->nentry; i++) {
        PyObject *v = l->entry_src[i] >= 0 ? vals[l->entry_src[i]] : l->entry_def[i];
        Py_INCREF(v);
        PyTuple_SET_ITEM(entry, i + 1, v);
    }
    for (Py_ssize_t j = 0; j < l->nleaves; j++) {
        Py_DECREF(vals[j]);
    }
    return entry;
}

static int
to_index_array(PyObject *seq, Py_ssize_t **out, Py_ssize_t *n, Py_ssize_t bound)
{
    PyObject *fast = PySequence_Fast(seq, "a sequence of ints");
    if (fast == NULL) {
        return -1;
    }
    *n = PySequence_Fast_GET_SIZE(fast);
    *out = PyMem_Calloc((size_t)(*n ? *n : 1), sizeof(Py_ssize_t));
    if (*out == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        Py_ssize_t v = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        if (v < -1 || v >= bound) {
            Py_DECREF(fast);
            PyErr_Format(PyExc_ValueError, "index %zd out of range", v);
            return -1;
        }
        (*out)[i] = v;
    }
    Py_DECREF(fast);
    return 0;
}

static int
to_defaults(PyObject *seq, PyObject ***out, Py_ssize_t n)
{
    PyObject *fast = PySequence_Fast(seq, "a sequence of defaults");
    if (fast == NULL) {
        return -1;
    }
    if (PySequence_Fast_GET_SIZE(fast) != n) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "defaults and sources differ in length");
        return -1;
    }
    *out = PyMem_Calloc((size_t)(n ? n : 1), sizeof(PyObject *));
    if (*out == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        (*out)[i] = Py_NewRef(PySequence_Fast_GET_ITEM(fast, i));
    }
    Py_DECREF(fast);
    return 0;
}

/* add(length, mask, expected, leaves, entry_src, entry_def, key_src, key_def, zone_field)
 *   leaves: [(offset, kind, size)], *_src: leaf index or -1, *_def: the value when -1 */
static PyObject *
parser_add(ParserObject *self, PyObject *args)
{
    Py_ssize_t length, zone_field;
    Py_buffer mask, expected;
    PyObject *leaves, *entry_src, *entry_def, *key_src, *key_def;
    if (!PyArg_ParseTuple(args, "ny*y*OOOOOn:add", &length, &mask, &expected, &leaves, &entry_src, &entry_def,
                          &key_src, &key_def, &zone_field)) {
        return NULL;
    }
    Layout *l = PyMem_Calloc(1, sizeof(Layout));
    PyObject *fast = NULL;
    if (l == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    if (length < 20 || length > 65535 || mask.len != length || expected.len != length) {
        PyErr_SetString(PyExc_ValueError, "mask and expected must be as long as the message");
        goto error;
    }
    l->length = length;
    l->mask = PyMem_Malloc((size_t)length);
    l->expected = PyMem_Malloc((size_t)length);
    if (l->mask == NULL || l->expected == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    memcpy(l->mask, mask.buf, (size_t)length);
    memcpy(l->expected, expected.buf, (size_t)length);
    fast = PySequence_Fast(leaves, "leaves must be a sequence");
    if (fast == NULL) {
        goto error;
    }
    l->nleaves = PySequence_Fast_GET_SIZE(fast);
    if (l->nleaves > MAX_FIELDS) {
        PyErr_SetString(PyExc_ValueError, "too many leaves");
        goto error;
    }
    l->leaf_off = PyMem_Calloc((size_t)(l->nleaves ? l->nleaves : 1), sizeof(Py_ssize_t));
    l->leaf_size = PyMem_Calloc((size_t)(l->nleaves ? l->nleaves : 1), sizeof(Py_ssize_t));
    l->leaf_kind = PyMem_Calloc((size_t)(l->nleaves ? l->nleaves : 1), sizeof(int));
    if (l->leaf_off == NULL || l->leaf_size == NULL || l->leaf_kind == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    static const Py_ssize_t sizes[] = {1, 2, 4, 8};
    for (Py_ssize_t i = 0; i < l->nleaves; i++) {
        Py_ssize_t off, size;
        int kind;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "nin:leaf", &off, &kind, &size)) {
            goto error;
        }
        if (kind < V_U8 || kind > V_BYTES || (kind != V_BYTES && size != sizes[kind]) || off < 0 ||
            off + size > length) {
            PyErr_Format(PyExc_ValueError, "leaf %zd does not fit the message", i);
            goto error;
        }
        l->leaf_off[i] = off;
        l->leaf_kind[i] = kind;
        l->leaf_size[i] = size;
    }
    if (to_index_array(entry_src, &l->entry_src, &l->nentry, l->nleaves) < 0 ||
        to_defaults(entry_def, &l->entry_def, l->nentry) < 0 ||
        to_index_array(key_src, &l->key_src, &l->nkey, l->nleaves) < 0 ||
        to_defaults(key_def, &l->key_def, l->nkey) < 0) {
        goto error;
    }
    if (zone_field != 0 || l->nkey < 1) {
        PyErr_SetString(PyExc_ValueError, "zone field out of range");
        goto error;
    }
    l->zone_field = zone_field;
    l->next = self->by_length[length];
    self->by_length[length] = l;
    self->count++;
    Py_DECREF(fast);
    PyBuffer_Release(&mask);
    PyBuffer_Release(&expected);
    Py_RETURN_NONE;
error:
    Py_XDECREF(fast);
    layout_free(l);
    PyBuffer_Release(&mask);
    PyBuffer_Release(&expected);
    return NULL;
}

/* A dump starts. Normally the last one ended with NLMSG_DONE (and rotated the tables);
 * if it broke off, what it remembered so far serves as the last dump instead. */
static PyObject *
parser_begin(ParserObject *self, PyObject *unused)
{
    if (self->current.len > 0) {
        seqs_rotate(self);
    }
    Py_RETURN_NONE;
}

/* Forget the remembered entries (tests; a parser that will not dump again). */
static PyObject *
parser_forget(ParserObject *self, PyObject *unused)
{
    seq_free(&self->last);
    seq_free(&self->current);
    Py_RETURN_NONE;
}

static PyObject *
parser_clear(ParserObject *self, PyObject *unused)
{
    parser_clear_layouts(self);
    Py_RETURN_NONE;
}

static PyObject *str_entry, *str_seen;

/* Does conn hold entry and is it still in its store (its seen is not -1, the mark the
 * store gives every connection it lets go)? 1, 0, or -1 on error. */
static int
holds(PyObject *conn, PyObject *entry)
{
    PyObject *current = PyObject_GetAttr(conn, str_entry);
    if (current == NULL) {
        return -1;
    }
    Py_DECREF(current); /* only its identity matters; conn keeps it */
    if (current != entry) {
        return 0;
    }
    PyObject *seen = PyObject_GetAttr(conn, str_seen);
    if (seen == NULL) {
        return -1;
    }
    long mark = PyLong_Check(seen) ? PyLong_AsLong(seen) : -1;
    Py_DECREF(seen);
    if (mark == -1 && PyErr_Occurred()) {
        return -1;
    }
    return mark != -1;
}

/* held: a dict of connections by key (flowscope.agent.store), or None. An entry returned
 * again unchanged whose connection there still holds that very entry is marked seen
 * (connection.seen = poll) instead of appended: what ConnectionStore.feed would do with it.
 * known: the connection that held it at the last dump (found in the same dict), or NULL;
 * if it still holds it and is still in the store, no dict lookup is needed. *found: the
 * connection marked (borrowed). 1 when marked, 0 when not, -1 on error. */
static int
mark_held(PyObject *held, PyObject *poll, PyObject *entry, PyObject *known, PyObject **found)
{
    *found = NULL;
    PyObject *conn = known;
    int r = conn != NULL ? holds(conn, entry) : 0;
    if (r < 0) {
        return -1;
    }
    if (r == 0) {
        conn = PyDict_GetItemWithError(held, PyTuple_GET_ITEM(entry, 0));
        if (conn == NULL) {
            return PyErr_Occurred() ? -1 : 0;
        }
        r = holds(conn, entry);
        if (r <= 0) {
            return r;
        }
    }
    *found = conn;
    return PyObject_SetAttr(conn, str_seen, poll) < 0 ? -1 : 1;
}

/* parse(buf, n, out, zones, unknown[, held, poll]) -> (done, total, interrupted, problem, marked)
 *   problem: None, ("overrun", length) or ("refused", errno); entries are appended to
 *   out as they are read, as EntryParser.parse does. unknown(off, length) returns the
 *   entry of a message no layout matched, or None (malformed: skipped). With held and
 *   poll, unchanged entries of held connections are marked there instead (mark_held);
 *   marked counts them. */
static PyObject *
parser_parse(ParserObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 && nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "parse(buf, n, out, zones, unknown[, held, poll])");
        return NULL;
    }
    PyObject *held = nargs == 7 && args[5] != Py_None ? args[5] : NULL;
    PyObject *poll = nargs == 7 ? args[6] : Py_None;
    if (held != NULL && !PyDict_CheckExact(held)) {
        PyErr_SetString(PyExc_TypeError, "held must be a dict");
        return NULL;
    }
    Py_ssize_t marked = 0;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    PyObject *out = args[2], *zones = args[3], *unknown = args[4];
    PyObject *result = NULL;
    if ((n == -1 && PyErr_Occurred()) || !PyList_Check(out)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "out must be a list");
        }
        goto done;
    }
    if (n > view.len) {
        n = view.len;
    }
    int filter = zones != Py_None && PyObject_Length(zones) > 0;
    if (PyErr_Occurred()) {
        goto done;
    }
    const unsigned char *buf = view.buf;
    Py_ssize_t off = 0, total = 0;
    int interrupted = 0;
    while (off + 16 <= n) {
        uint32_t length;
        uint16_t mtype, flags;
        memcpy(&length, buf + off, 4);
        memcpy(&mtype, buf + off + 4, 2);
        memcpy(&flags, buf + off + 6, 2);
        if (length < 16 || off + (Py_ssize_t)length > n) {
            result = Py_BuildValue("(Oni(sk)n)", Py_False, total, interrupted, "overrun", (unsigned long)length, marked);
            goto done;
        }
        Py_ssize_t next = off + (((Py_ssize_t)length + 3) & ~(Py_ssize_t)3);
        if (mtype != 0x100) {
            if (mtype == 3) { /* NLMSG_DONE */
                seqs_rotate(self);
                result = Py_BuildValue("(OniOn)", Py_True, total, interrupted, Py_None, marked);
                goto done;
            }
            if (mtype == 2 && off + 20 <= n) { /* NLMSG_ERROR */
                int32_t code;
                memcpy(&code, buf + off + 16, 4);
                if (code != 0) {
                    result = Py_BuildValue("(Oni(si)n)", Py_False, total, interrupted, "refused", (int)-code, marked);
                    goto done;
                }
            }
            off = next;
            continue;
        }
        if (flags & 0x10) {
            interrupted = 1;
        }
        if (length < 20) {
            off = next;
            continue;
        }
        total++;
        PyObject *entry = NULL, *known = NULL;
        int unchanged = 0;
        for (Layout *l = self->by_length[length]; l != NULL; l = l->next) {
            if (headers_match(l, buf + off)) {
                const unsigned char *m = buf + off;
                Py_ssize_t id_leaf = self->id_field - 1 < l->nentry ? l->entry_src[self->id_field - 1] : -1;
                uint32_t id = id_leaf >= 0 && l->leaf_kind[id_leaf] == V_U32 ? (uint32_t)leaf_raw(l, id_leaf, m) : 0;
                PyObject *old = id && self->last.len ? seq_take(&self->last, id, &known) : NULL;
                if (known != NULL && (held == NULL || self->last.held != held)) {
                    Py_CLEAR(known); /* found in another store's dict */
                }
                PyObject *known_key = NULL;
                if (old != NULL) {
                    int same_key;
                    int same = same_entry(self, l, m, old, &same_key);
                    if (same < 0) {
                        Py_DECREF(old);
                        Py_XDECREF(known);
                        goto done;
                    }
                    if (same) {
                        entry = old; /* the reference the table held */
                        self->reused++;
                        unchanged = 1;
                        break;
                    }
                    if (same_key) {
                        known_key = Py_NewRef(PyTuple_GET_ITEM(old, 0));
                    }
                    Py_DECREF(old);
                    Py_CLEAR(known);
                }
                entry = build_entry(self, l, m, known_key);
                Py_XDECREF(known_key);
                if (entry == NULL) {
                    goto done;
                }
                break;
            }
        }
        if (entry == NULL) {
            entry = PyObject_CallFunction(unknown, "nn", off, (Py_ssize_t)length);
            if (entry == NULL) {
                goto done;
            }
            if (entry == Py_None) {
                Py_DECREF(entry);
                off = next;
                continue;
            }
        }
        int keep = 1;
        if (filter) {
            PyObject *key = PyTuple_GET_SIZE(entry) > 0 ? PyTuple_GET_ITEM(entry, 0) : Py_None;
            PyObject *zone = PyTuple_Check(key) && PyTuple_GET_SIZE(key) > 0 ? PyTuple_GET_ITEM(key, 0) : Py_None;
            keep = PySet_Contains(zones, zone);
            if (keep < 0) {
                Py_DECREF(entry);
                Py_XDECREF(known);
                goto done;
            }
        }
        if (keep) {
            uint32_t id = entry_id(self, entry);
            PyObject *conn = NULL;
            int in_place = unchanged && held != NULL ? mark_held(held, poll, entry, known, &conn) : 0;
            if (in_place < 0 || (!in_place && PyList_Append(out, entry) < 0) ||
                (id && seq_append(self, &self->current, id, entry, held, conn) < 0)) {
                Py_DECREF(entry);
                Py_XDECREF(known);
                goto done;
            }
            marked += in_place;
        }
        Py_XDECREF(known);
        Py_DECREF(entry);
        off = next;
    }
    result = Py_BuildValue("(OniOn)", Py_False, total, interrupted, Py_None, marked);
done:
    PyBuffer_Release(&view);
    return result;
}

static PyObject *
parser_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *entry_type, *key_type;
    Py_ssize_t id_field;
    if (!PyArg_ParseTuple(args, "O!O!n:Parser", &PyType_Type, &entry_type, &PyType_Type, &key_type, &id_field)) {
        return NULL;
    }
    if (id_field < 1 || id_field >= MAX_FIELDS) {
        PyErr_SetString(PyExc_ValueError, "id_field out of range");
        return NULL;
    }
    if (!PyType_IsSubtype((PyTypeObject *)entry_type, &PyTuple_Type) ||
        !PyType_IsSubtype((PyTypeObject *)key_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "entry and key types must be tuple subclasses");
        return NULL;
    }
    ParserObject *self = (ParserObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->entry_type = (PyTypeObject *)Py_NewRef(entry_type);
    self->key_type = (PyTypeObject *)Py_NewRef(key_type);
    self->id_field = id_field;
    return (PyObject *)self;
}

static void
parser_dealloc(ParserObject *self)
{
    parser_clear_layouts(self);
    seq_free(&self->last);
    seq_free(&self->current);
    for (int i = 0; i < ADDR_SLOTS; i++) {
        Py_XDECREF(self->addr4[i].value);
        Py_XDECREF(self->addr16[i].value);
    }
    for (int i = 0; i < 65536; i++) {
        Py_XDECREF(self->u16[i]);
    }
    for (int i = 0; i < U32_SLOTS; i++) {
        Py_XDECREF(self->u32[i].value);
    }
    Py_XDECREF(self->entry_type);
    Py_XDECREF(self->key_type);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
parser_get_count(ParserObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->count);
}

static PyObject *
parser_get_reused(ParserObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->reused);
}

static PyObject *
parser_get_remembered(ParserObject *self, void *closure)
{
    size_t n = 0;
    for (size_t i = 0; i < self->last.len; i++) {
        n += self->last.items[i] != NULL;
    }
    return PyLong_FromSize_t(n + self->current.len);
}

static PyMethodDef parser_methods[] = {
    {"begin", (PyCFunction)parser_begin, METH_NOARGS, "a dump starts"},
    {"forget", (PyCFunction)parser_forget, METH_NOARGS, "release the remembered entries"},
    {"parse", (PyCFunction)(void (*)(void))parser_parse, METH_FASTCALL,
     "parse(buf, n, out, zones, unknown[, held, poll]) -> (done, total, interrupted, problem, marked)"},
    {"add", (PyCFunction)parser_add, METH_VARARGS, "add a compiled layout"},
    {"clear", (PyCFunction)parser_clear, METH_NOARGS, "forget every layout"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef parser_getset[] = {
    {"layout_count", (getter)parser_get_count, NULL, "layouts held", NULL},
    {"reused", (getter)parser_get_reused, NULL, "entries returned again unchanged", NULL},
    {"remembered", (getter)parser_get_remembered, NULL, "entries remembered (of the last dump not seen again, and of this one)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ParserType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "flowscope.agent._ctparse.Parser",
    .tp_basicsize = sizeof(ParserObject),
    .tp_dealloc = (destructor)parser_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Applies compiled conntrack layouts to ctnetlink dump buffers.",
    .tp_methods = parser_methods,
    .tp_getset = parser_getset,
    .tp_new = parser_new,
};

static struct PyModuleDef ctparse_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "flowscope.agent._ctparse",
    .m_doc = "C inner loop of the conntrack dump parser; agent/conntrack.py is the reference twin.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__ctparse(void)
{
    if (PyType_Ready(&ParserType) < 0) {
        return NULL;
    }
    str_entry = PyUnicode_InternFromString("entry");
    str_seen = PyUnicode_InternFromString("seen");
    if (str_entry == NULL || str_seen == NULL) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&ctparse_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Parser", (PyObject *)&ParserType) < 0 ||
        PyModule_AddIntConstant(m, "U8", V_U8) < 0 || PyModule_AddIntConstant(m, "U16", V_U16) < 0 ||
        PyModule_AddIntConstant(m, "U32", V_U32) < 0 || PyModule_AddIntConstant(m, "U64", V_U64) < 0 ||
        PyModule_AddIntConstant(m, "BYTES", V_BYTES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

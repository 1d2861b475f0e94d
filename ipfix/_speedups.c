/* flowscope.ipfix._speedups: the record codec's inner loops in C.
 *
 * Why it exists: a data record of the Antrea agent template is 37 fields, 14 of them
 * strings; the generated pure-Python codec (template.py) spends about a microsecond per
 * record on the interpreter alone. This module runs the same loops in C, behind the same
 * functions: Template.decode_records and ExportSession.encode_records try it first.
 *
 * Contract with the pure-Python twin (template.py, which stays the reference):
 * - decode_set returns exactly the records the twin returns, or None when it meets
 *   anything it does not handle itself (a record running past its set, a string that is
 *   not valid UTF-8, a buffer it cannot read). The caller then runs the twin, which
 *   either decodes (leniently) or raises the MalformedMessage a peer's bytes deserve, so
 *   errors are the twin's by construction.
 * - encode_messages writes each record itself when every value is of the exact type the
 *   twin would accept (int, float, str, bytes, bool) and in range; otherwise the whole
 *   record is encoded by the twin's function (the `fallback` argument), which either
 *   gives the same bytes or raises its precise UsageError.
 * - DataRecords (Message.data_records) yields the very pairs the twin's chain of zips does.
 * tests/ipfix/test_ipfix_accel*.py check these claims with hypothesis; the per-template
 * plans of fixed-length sets and batches in test_ipfix_accel_sets.py.
 *
 * Values the twin converts with Python helpers that are not hot (MAC addresses, and
 * millisecond and NTP timestamps on the way out) are converted by calling those very
 * helpers, and addresses on the way out go through the twin's own caches.
 *
 * Decoded strings and addresses come from small caches (bounded: a fixed number of slots,
 * a colliding value replaces an old one; two ways a set for strings, direct-mapped for
 * addresses), as the twin interns them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum {
    K_UINT = 0,
    K_SINT = 1,
    K_F32 = 2,
    K_F64 = 3,
    K_BOOL = 4,
    K_MAC = 5,
    K_SECONDS = 6,
    K_MILLIS = 7,
    K_NTP = 8,
    K_IP4 = 9,
    K_IP6 = 10,
    K_STR_VAR = 11,
    K_STR_FIX = 12,
    K_OCT_VAR = 13,
    K_OCT_FIX = 14,
    K_COUNT
};

#define IS_VAR(k) ((k) == K_STR_VAR || (k) == K_OCT_VAR)
#define IP4_AHEAD_MAX 16 /* IPv4 fields whose cache slots decode_fixed fetches ahead (more: S_OTHER) */

typedef struct {
    int kind;
    Py_ssize_t length; /* octets of a fixed-length field; 0 for variable length */
    PyObject *key;     /* the record key (interned str) */
    PyObject *helper;  /* encode helper: a callable or a cache mapping; or NULL */
} Op;

typedef struct {
    PyObject_HEAD
    Py_ssize_t nops;
    Op *ops;
    PyObject *proto; /* dict: every key -> its placeholder, in template order */
    PyObject **marks; /* the placeholder of each field: a distinct object of the codec's own */
    Py_ssize_t min_length;
    Py_ssize_t fixed_length; /* -1: the template has variable-length fields */
    int direct;              /* copies of proto may have their values written in place */
    PyObject *split;         /* a split-table prototype (keys shared), or NULL */
    Py_ssize_t *split_index; /* its value slot of each field */
    int fresh;               /* records are made by fresh_split, not copied from split */
    struct Step *plan;       /* fixed-length records made by fresh_split: decode_fixed's steps */
    struct EStep *eplan;     /* fixed-length records: encode_fixed_messages' steps, or NULL */
    Py_ssize_t plan_ends[6]; /* the plan's steps of each code end at these (sorted by code) */
    int nip4;                /* the plan's IPv4 fields, at these offsets in the record */
    Py_ssize_t ip4_offset[IP4_AHEAD_MAX];
} CodecObject;

/* ------------------------------------------------------------------ record dicts
 *
 * A record is a copy of the codec's prototype dict (its keys, in template order, each
 * value a placeholder object of the codec's own) with the values replaced.
 * PyDict_SetItem would find each key by hash again; on CPython 3.11 and 3.12, where a copied dict of str keys is a "combined" table whose
 * entries are (key, value) pairs in insertion order, the values are written straight
 * into those entries instead. The layout mirrored below is checked when a codec is made
 * (check_direct) and on every copy; anything unexpected takes the PyDict_SetItem way.
 *
 * Better still, a record is a split-table dict: the keys table shared by every record
 * of the codec (check_split), each record an array of values. On 3.11 such records are
 * made directly (fresh_split: no placeholders at all), for templates of any width up to
 * 100 fields (crafted_split makes the keys table past CPython's 30; check_fresh).
 */
#include "_dictmirror.h"
#if DIRECT_DICTS
typedef struct {
    PyObject *values[1];
} ValuesMirror;

/* The value slots of a fresh copy of a split-table prototype, or NULL if not one. */
static inline PyObject **
split_values(PyObject *d, PyObject *proto)
{
    PyDictObject *mp = (PyDictObject *)d;
    if (mp->ma_values == NULL || mp->ma_keys != ((PyDictObject *)proto)->ma_keys) {
        return NULL;
    }
    return ((ValuesMirror *)mp->ma_values)->values;
}
#endif

/* ------------------------------------------------------------------ value caches */

#define SCACHE_SLOTS 8192 /* in sets of two ways */
typedef struct {
    uint64_t hash;
    PyObject *value; /* an ASCII str: its characters are its UTF-8 octets */
} StrSlot;
static StrSlot str_cache[SCACHE_SLOTS];

#define ACACHE_SLOTS 4096
typedef struct {
    uint32_t addr;
    PyObject *value;
} Ip4Slot;
static Ip4Slot ip4_cache[ACACHE_SLOTS];

typedef struct {
    unsigned char addr[16];
    PyObject *value;
} Ip6Slot;
static Ip6Slot ip6_cache[ACACHE_SLOTS];

static inline uint64_t
load64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint64_t
mix(uint64_t h)
{
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 32;
    return h;
}

static inline uint64_t
hash_bytes(const unsigned char *p, Py_ssize_t n)
{
    uint64_t h = 0x9e3779b97f4a7c15ULL ^ (uint64_t)n;
    if (n >= 8) {
        const unsigned char *last = p + n - 8;
        while (p < last) {
            h = (h ^ load64(p)) * 0x100000001b3ULL;
            h ^= h >> 31;
            p += 8;
        }
        h = (h ^ load64(last)) * 0x100000001b3ULL; /* the last 8, overlapping */
    }
    else {
        uint64_t t = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            t = (t << 8) | p[i];
        }
        h = (h ^ t) * 0x100000001b3ULL;
    }
    return mix(h);
}

static inline uint32_t
load32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Whether a[0:n] == b[0:n]: whole words, the last one overlapping (as hash_bytes reads),
 * so a name of 9-16 octets is two loads a side, not one and a byte loop. */
static inline int
same_octets(const unsigned char *a, const unsigned char *b, Py_ssize_t n)
{
    if (n >= 8) {
        const Py_ssize_t last = n - 8;
        for (Py_ssize_t i = 0; i < last; i += 8) {
            if (load64(a + i) != load64(b + i)) {
                return 0;
            }
        }
        return load64(a + last) == load64(b + last);
    }
    if (n >= 4) {
        return load32(a) == load32(b) && load32(a + n - 4) == load32(b + n - 4);
    }
    while (n-- > 0) {
        if (*a++ != *b++) {
            return 0;
        }
    }
    return 1;
}

/* Strict UTF-8, as bytes.decode(); NULL with UnicodeDecodeError set on invalid input.
 * ASCII results are kept in a cache of two ways a set (Kubernetes names are ASCII). */
static PyObject *empty_text; /* "": the interpreter's own empty str, held from module init */

static PyObject *
decode_str(const unsigned char *p, Py_ssize_t n)
{
    if (n == 0) { /* most of an agent record's strings (no Service, no policy, no Egress) */
        return Py_NewRef(empty_text);
    }
    uint64_t h = hash_bytes(p, n);
    /* two ways a set, the newer first: a name does not lose its slot to the one other
     * name of its set (a cluster's thousands of Pod names in 8192 slots) */
    StrSlot *slot = &str_cache[h & (SCACHE_SLOTS - 2)];
    for (int w = 0; w < 2; w++) {
        PyObject *v = slot[w].value;
        if (v != NULL && slot[w].hash == h && PyUnicode_GET_LENGTH(v) == n &&
            same_octets(PyUnicode_1BYTE_DATA(v), p, n)) {
            Py_INCREF(v);
            return v;
        }
    }
    PyObject *s = PyUnicode_DecodeUTF8((const char *)p, n, NULL);
    if (s == NULL) {
        return NULL;
    }
    if (PyUnicode_IS_COMPACT_ASCII(s)) {
        Py_XSETREF(slot[1].value, slot[0].value); /* the older way's str is let go */
        slot[1].hash = slot[0].hash;
        slot[0].value = Py_NewRef(s);
        slot[0].hash = h;
    }
    return s;
}

/* A str of ASCII text we wrote ourselves: copied, with no decoding to do. */
static PyObject *
ascii_text(const char *text, Py_ssize_t n)
{
    PyObject *s = PyUnicode_New(n, 127);
    if (s != NULL) {
        memcpy(PyUnicode_1BYTE_DATA(s), text, (size_t)n);
    }
    return s;
}

/* The decimal text of each octet value followed by a dot ("7.", "42.", "255."), and its length. */
static char octet_text[256][4];
static uint8_t octet_len[256];

static void
init_octet_text(void)
{
    for (int b = 0; b < 256; b++) {
        int n = 0;
        if (b >= 100) {
            octet_text[b][n++] = (char)('0' + b / 100);
        }
        if (b >= 10) {
            octet_text[b][n++] = (char)('0' + b / 10 % 10);
        }
        octet_text[b][n++] = (char)('0' + b % 10);
        octet_text[b][n++] = '.';
        octet_len[b] = (uint8_t)n;
    }
}

static inline uint32_t
ip4_slot_of(const unsigned char *p)
{
    uint32_t a;
    memcpy(&a, p, 4);
    /* Fibonacci hashing, one multiplication: the product's top bits depend on every
     * octet (measured: 3-5% off decode_set against a 64-bit mix on sets shaped as the
     * agent's, no loss on the benchmark's) */
    return (uint32_t)(a * 0x9E3779B1u) >> (32 - 12);
}
_Static_assert(ACACHE_SLOTS == 1 << 12, "ip4_slot_of takes 12 bits");

/* The text of the IPv4 address at p, through the cache's slot `at` (ip4_slot_of(p)). */
static PyObject *
decode_ip4_at(const unsigned char *p, uint32_t at)
{
    uint32_t a;
    memcpy(&a, p, 4);
    Ip4Slot *slot = &ip4_cache[at];
    if (slot->value != NULL && slot->addr == a) {
        Py_INCREF(slot->value);
        return slot->value;
    }
    char text[20]; /* each octet's text is written as 4 octets, the dot included: no branches */
    int n = 0;
    for (int i = 0; i < 4; i++) {
        memcpy(text + n, octet_text[p[i]], 4);
        n += octet_len[p[i]];
    }
    PyObject *s = ascii_text(text, n - 1);
    if (s == NULL) {
        return NULL;
    }
    Py_XSETREF(slot->value, Py_NewRef(s));
    slot->addr = a;
    return s;
}

static inline PyObject *
decode_ip4(const unsigned char *p)
{
    return decode_ip4_at(p, ip4_slot_of(p));
}

static PyObject *
decode_ip6(const unsigned char *p)
{
    uint64_t h = mix(load64(p) ^ mix(load64(p + 8)));
    Ip6Slot *slot = &ip6_cache[h & (ACACHE_SLOTS - 1)];
    if (slot->value != NULL && memcmp(slot->addr, p, 16) == 0) {
        Py_INCREF(slot->value);
        return slot->value;
    }
    char text[INET6_ADDRSTRLEN];
    if (inet_ntop(AF_INET6, p, text, sizeof text) == NULL) {
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    PyObject *s = ascii_text(text, (Py_ssize_t)strlen(text));
    if (s == NULL) {
        return NULL;
    }
    Py_XSETREF(slot->value, Py_NewRef(s));
    memcpy(slot->addr, p, 16);
    return s;
}

/* ------------------------------------------------------------------ decoding */

static inline uint64_t
load_be(const unsigned char *p, Py_ssize_t n)
{
    switch (n) { /* the widths of IPFIX integers, as single loads */
    case 1:
        return p[0];
    case 2: {
        uint16_t x;
        memcpy(&x, p, 2);
        return ntohs(x);
    }
    case 4: {
        uint32_t x;
        memcpy(&x, p, 4);
        return ntohl(x);
    }
    case 8: {
        uint64_t x;
        memcpy(&x, p, 8);
        return __builtin_bswap64(x);
    }
    }
    uint64_t v = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        v = (v << 8) | p[i];
    }
    return v;
}

static const char HEX[] = "0123456789abcdef";

static PyObject *small_ints[257]; /* the interpreter's own 0..256, held from module init */

#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000 && PYLONG_BITS_IN_DIGIT == 30 && \
    !defined(Py_REF_DEBUG) && !defined(Py_TRACE_REFS)
#define FAST_INTS 1
/* An int of `ndigits` 30-bit digits, made as _PyLong_New makes it less its two calls:
 * PyObject_Malloc (so CPython's own deallocation frees it), then the header. Skipped is
 * only _Py_NewReference's tracemalloc hook, which matters for memory reused from a free
 * list, not for a fresh allocation (tracemalloc saw that in PyObject_Malloc). */
static inline PyObject *
long_of_digits(uint64_t v, Py_ssize_t ndigits)
{
    PyLongObject *o = PyObject_Malloc(offsetof(PyLongObject, ob_digit) + (size_t)ndigits * sizeof(digit));
    if (o == NULL) {
        return PyErr_NoMemory();
    }
    Py_SET_REFCNT(o, 1);
    Py_SET_TYPE(o, &PyLong_Type); /* a static type: no reference to count */
    Py_SET_SIZE(o, ndigits);
    o->ob_digit[0] = (digit)(v & PyLong_MASK);
    if (ndigits == 2) {
        o->ob_digit[1] = (digit)(v >> PyLong_SHIFT);
    }
    return (PyObject *)o;
}
#elif PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000 && PYLONG_BITS_IN_DIGIT == 30
#define FAST_INTS 1
static inline PyObject *
long_of_digits(uint64_t v, Py_ssize_t ndigits)
{
    PyLongObject *o = _PyLong_New(ndigits);
    if (o == NULL) {
        return NULL;
    }
    o->ob_digit[0] = (digit)(v & PyLong_MASK);
    if (ndigits == 2) {
        o->ob_digit[1] = (digit)(v >> PyLong_SHIFT);
    }
    return (PyObject *)o;
}
#else
#define FAST_INTS 0
#endif

/* PyLong_FromUnsignedLongLong, with the common sizes made here: on CPython 3.11 an int
 * of one or two 30-bit digits is filled in directly (the layout of longintrepr.h), which
 * saves the calls the generic way takes to the same allocation. */
static inline PyObject *
new_unsigned(uint64_t v)
{
    if (v <= 256) {
        return Py_NewRef(small_ints[v]);
    }
#if FAST_INTS
    if (v < ((uint64_t)1 << 60)) {
        return long_of_digits(v, v < ((uint64_t)1 << 30) ? 1 : 2);
    }
#endif
    return PyLong_FromUnsignedLongLong(v);
}

/* The Python value of one field; NULL with an exception set on failure. */
static PyObject *
decode_value(const Op *op, const unsigned char *p, Py_ssize_t n)
{
    switch (op->kind) {
    case K_UINT:
    case K_SECONDS:
        return new_unsigned(load_be(p, n));
    case K_SINT: {
        uint64_t u = load_be(p, n);
        if (n < 8 && (u >> (8 * n - 1)) & 1) {
            u |= ~(uint64_t)0 << (8 * n);
        }
        return PyLong_FromLongLong((long long)u);
    }
    case K_F32: {
        double d = PyFloat_Unpack4((const char *)p, 0);
        if (d == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
        return PyFloat_FromDouble(d);
    }
    case K_F64: {
        double d = PyFloat_Unpack8((const char *)p, 0);
        if (d == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
        return PyFloat_FromDouble(d);
    }
    case K_BOOL:
        return Py_NewRef(p[0] == 1 ? Py_True : Py_False);
    case K_MAC: {
        PyObject *s = PyUnicode_New(17, 127);
        if (s == NULL) {
            return NULL;
        }
        Py_UCS1 *d = PyUnicode_1BYTE_DATA(s);
        for (int i = 0; i < 6; i++) {
            d[3 * i] = (Py_UCS1)HEX[p[i] >> 4];
            d[3 * i + 1] = (Py_UCS1)HEX[p[i] & 15];
            if (i < 5) {
                d[3 * i + 2] = ':';
            }
        }
        return s;
    }
    case K_MILLIS: {
        uint64_t v = load_be(p, 8);
        if (v <= (1ULL << 53)) { /* exact in a double: int / int divides the same way */
            return PyFloat_FromDouble((double)v / 1000.0);
        }
        PyObject *num = PyLong_FromUnsignedLongLong(v);
        if (num == NULL) {
            return NULL;
        }
        PyObject *den = PyLong_FromLong(1000);
        if (den == NULL) {
            Py_DECREF(num);
            return NULL;
        }
        PyObject *r = PyNumber_TrueDivide(num, den);
        Py_DECREF(num);
        Py_DECREF(den);
        return r;
    }
    case K_NTP: {
        uint64_t v = load_be(p, 8);
        double whole = (double)((long long)(v >> 32) - 2208988800LL);
        return PyFloat_FromDouble(whole + (double)(v & 0xFFFFFFFFULL) / 4294967296.0);
    }
    case K_IP4:
        return decode_ip4(p);
    case K_IP6:
        return decode_ip6(p);
    case K_STR_VAR:
        return decode_str(p, n);
    case K_STR_FIX:
        while (n > 0 && p[n - 1] == 0) {
            n--;
        }
        return decode_str(p, n);
    default: /* K_OCT_VAR, K_OCT_FIX */
        return PyBytes_FromStringAndSize((const char *)p, n);
    }
}

#if DIRECT_DICTS && PY_VERSION_HEX < 0x030C0000
#define FRESH_SPLIT 1
/* A new record of the split prototype's keys, every value slot empty (NULL), to be
 * filled by the decoder: what PyDict_Copy(split) gives, less its work. The dict comes
 * from CPython's free list of dicts (PyDict_New) instead of a new garbage-collected
 * allocation, and no placeholder is copied in, to be counted and given back. A slot
 * left empty (a record given up) is what a split dict's deallocation already skips.
 * NULL with an exception set on failure. */
static inline PyObject *
fresh_split_filled(const CodecObject *self, Py_ssize_t filled);

static PyObject *
fresh_split(const CodecObject *self)
{
    return fresh_split_filled(self, 0);
}

/* fresh_split, for a caller that fills the first `filled` value slots itself whatever
 * happens (decode_fixed: every field's slot, all of them below the keys' count). */
static inline PyObject *
fresh_split_filled(const CodecObject *self, Py_ssize_t filled)
{
    const PyDictObject *proto = (const PyDictObject *)self->split;
    KeysMirror *k = (KeysMirror *)proto->ma_keys;
    const Py_ssize_t size = k->dk_nentries + k->dk_usable; /* CPython's shared_keys_usable_size */
    const uint8_t *pv = (const uint8_t *)proto->ma_values;
    const size_t prefix = pv[-1];
    uint8_t *mem = PyMem_Malloc(prefix + (size_t)size * sizeof(PyObject *));
    if (mem == NULL) {
        return PyErr_NoMemory();
    }
    /* the insertion order, its length and the prefix size: whole words (the prefix is
     * pointer-aligned), few of them, copied by a loop that needs no rep movs's start-up */
    const uint64_t *from = (const uint64_t *)(const void *)(pv - prefix);
    uint64_t *to = (uint64_t *)(void *)mem;
    for (size_t w = 0; w < prefix / sizeof(uint64_t); w++) {
        to[w] = from[w];
    }
    PyObject **values = (PyObject **)(mem + prefix);
    memset(values + filled, 0, (size_t)(size - filled) * sizeof(PyObject *));
    PyObject *d = PyDict_New();
    if (d == NULL) {
        PyMem_Free(mem);
        return NULL;
    }
    PyDictObject *mp = (PyDictObject *)d;
    ((KeysMirror *)mp->ma_keys)->dk_refcnt--; /* the shared empty keys PyDict_New gave it */
    mp->ma_keys = (PyDictKeysObject *)k;
    k->dk_refcnt++;
    mp->ma_values = (PyDictValues *)values;
    mp->ma_used = proto->ma_used;
    return d;
}
#else
#define FRESH_SPLIT 0
#endif

/* ------------------------------------------------------------------ fixed-length sets
 *
 * Records of fixed-length fields made by fresh_split are decoded by a plan compiled once
 * per codec: one step per field, with its offset in the record, its value slot and one
 * code that says both its kind and its width (no second switch on the length, no length
 * checks: the record's length was checked as a whole, once per set).
 *
 * Measured and left out: taking the previous record's int object when a field's octets
 * repeat (neighbouring records of a set share an end time, a protocol, a Service
 * address). On the benchmark's sets, and on sets shaped as our agent's, it cost 1-6%:
 * the comparisons and the bookkeeping of every field outweigh the few allocations
 * saved (small ints and addresses are shared already, by small_ints and the caches).
 * Also left out, 8% slower: counting the references to small ints per field and value
 * and adding them once per set, so that the increments of one object's count (a
 * record's one-octet fields often hold one value) do not wait on one another. */
enum { S_U8, S_U16, S_U32, S_U64, S_IP4, S_OTHER };
typedef struct Step {
    uint8_t code;
    Py_ssize_t offset; /* in the record */
    Py_ssize_t slot;   /* in the record's values */
    const Op *op;      /* S_OTHER: decoded by decode_value */
    int8_t ip4;        /* S_IP4: its index among the record's IPv4 fields */
} Step;

#define PLAN_MAX 128 /* the widest template a plan is made for (split tables stop at 100) */

#if FRESH_SPLIT
static Step *
make_plan(CodecObject *self)
{
    if (!self->fresh || self->fixed_length <= 0 || self->nops > PLAN_MAX) {
        return NULL;
    }
    Step *plan = PyMem_Calloc((size_t)self->nops, sizeof(Step));
    if (plan == NULL) {
        return NULL; /* the general loop serves */
    }
    Py_ssize_t offset = 0;
    int nip4 = 0;
    Py_ssize_t *ip4_offset = self->ip4_offset;
    for (Py_ssize_t i = 0; i < self->nops; i++) {
        const Op *op = &self->ops[i];
        Step *st = &plan[i];
        st->offset = offset;
        st->slot = self->split_index[i];
        st->op = op;
        st->code = S_OTHER;
        if (op->kind == K_UINT || op->kind == K_SECONDS) {
            st->code = op->length == 1 ? S_U8 : op->length == 2 ? S_U16 : op->length == 4 ? S_U32 : op->length == 8 ? S_U64 : S_OTHER;
        }
        else if (op->kind == K_IP4 && nip4 < IP4_AHEAD_MAX) {
            st->code = S_IP4;
            st->ip4 = (int8_t)nip4;
            ip4_offset[nip4++] = offset;
        }
        offset += op->length;
    }
    self->nip4 = nip4;
    /* Steps of one code together, in field order within each (a stable sort by code):
     * the values are independent of one another, and decode_fixed's switch then changes
     * its target a few times a record, not at nearly every field, so it is predicted. */
    for (Py_ssize_t i = 1; i < self->nops; i++) {
        Step st = plan[i];
        Py_ssize_t j = i;
        for (; j > 0 && plan[j - 1].code > st.code; j--) {
            plan[j] = plan[j - 1];
        }
        plan[j] = st;
    }
    for (int c = S_U8; c <= S_OTHER; c++) {
        Py_ssize_t e = 0;
        for (Py_ssize_t i = 0; i < self->nops; i++) {
            e += plan[i].code <= c;
        }
        self->plan_ends[c] = e;
    }
    /* decode_fixed fills value slots 0..nops-1 itself: each field's must be one of them, once */
    uint8_t seen[PLAN_MAX] = {0};
    for (Py_ssize_t i = 0; i < self->nops; i++) {
        Py_ssize_t slot = plan[i].slot;
        if (slot < 0 || slot >= self->nops || seen[slot]++) {
            PyMem_Free(plan);
            return NULL;
        }
    }
    return plan;
}

static inline uint16_t
be16(const unsigned char *p)
{
    uint16_t x;
    memcpy(&x, p, 2);
    return ntohs(x);
}

static inline uint32_t
be32(const unsigned char *p)
{
    uint32_t x;
    memcpy(&x, p, 4);
    return ntohl(x);
}

/* Drop a record of decode_fixed's given up at step `i`: the slots of steps i.. were not
 * filled (fresh_split_filled left them as they were), and are emptied first. */
static void
give_up(PyObject *d, const Step *plan, Py_ssize_t i, Py_ssize_t nops)
{
    PyObject **slots = ((ValuesMirror *)((PyDictObject *)d)->ma_values)->values;
    for (; i < nops; i++) {
        slots[plan[i].slot] = NULL;
    }
    Py_DECREF(d); /* its empty slots are skipped */
}

/* The records of buf[off:off + count * fixed_length] into out[0:count]: 1 done, 0 the
 * twin must decide (a string that is not UTF-8), -1 an error set. */
static int
decode_fixed(const CodecObject *self, const unsigned char *buf, Py_ssize_t off, Py_ssize_t count, PyObject *out)
{
    const Step *plan = self->plan;
    const Py_ssize_t nops = self->nops, size = self->fixed_length;
    /* The IPv4 cache is larger than the first-level cache, and a new address replaces an
     * entry whose str was made long ago: each a wait on memory. The slots are fetched
     * three records ahead, and a record ahead the str its address would replace, so
     * both are at hand when their record is decoded. */
    const int nip4 = self->nip4;
    uint32_t at[4][IP4_AHEAD_MAX]; /* the slots of record r, at [r & 3], and of the next three */
    for (Py_ssize_t r = 0; r < 3 && r < count; r++) {
        for (int j = 0; j < nip4; j++) {
            at[r & 3][j] = ip4_slot_of(buf + off + r * size + self->ip4_offset[j]);
            __builtin_prefetch(&ip4_cache[at[r & 3][j]]);
        }
    }
    const Py_ssize_t *ends = self->plan_ends; /* where each code's steps end */
    PyObject *d;
    Py_ssize_t i;
    for (Py_ssize_t r = 0; r < count; r++, off += size) {
        d = fresh_split_filled(self, nops);
        if (d == NULL) {
            return -1;
        }
        PyObject **slots = ((ValuesMirror *)((PyDictObject *)d)->ma_values)->values;
        const unsigned char *rec = buf + off;
        const uint32_t *here = at[r & 3];
        if (nip4 > 0 && r + 1 < count) {
            const uint32_t *next = at[(r + 1) & 3];
            for (int j = 0; j < nip4; j++) {
                const Ip4Slot *slot = &ip4_cache[next[j]];
                uint32_t a;
                memcpy(&a, rec + size + self->ip4_offset[j], 4);
                if (slot->value != NULL && slot->addr != a) {
                    __builtin_prefetch(slot->value, 1);
                }
            }
        }
        /* One loop per code, in the plan's order (sorted by code): no switch per field. */
        Py_ssize_t e = ends[S_U8];
        for (i = 0; i < e; i++) {
            slots[plan[i].slot] = Py_NewRef(small_ints[rec[plan[i].offset]]);
        }
        PyObject *v = NULL;
        for (e = ends[S_U16]; i < e; i++) {
            const uint32_t x = be16(rec + plan[i].offset);
#if FAST_INTS
            v = x <= 256 ? Py_NewRef(small_ints[x]) : long_of_digits(x, 1); /* one 30-bit digit */
#else
            v = new_unsigned(x);
#endif
            if (v == NULL) {
                goto failed;
            }
            slots[plan[i].slot] = v;
        }
        for (e = ends[S_U32]; i < e; i++) {
            const uint32_t x = be32(rec + plan[i].offset);
#if FAST_INTS
            v = x <= 256 ? Py_NewRef(small_ints[x]) : long_of_digits(x, x >> 30 ? 2 : 1);
#else
            v = new_unsigned(x);
#endif
            if (v == NULL) {
                goto failed;
            }
            slots[plan[i].slot] = v;
        }
        for (e = ends[S_U64]; i < e; i++) {
            v = new_unsigned(load_be(rec + plan[i].offset, 8));
            if (v == NULL) {
                goto failed;
            }
            slots[plan[i].slot] = v;
        }
        for (e = ends[S_IP4]; i < e; i++) {
            const unsigned char *p = rec + plan[i].offset;
            const Ip4Slot *slot = &ip4_cache[here[plan[i].ip4]];
            uint32_t a;
            memcpy(&a, p, 4);
            /* a cached address here, a new one (made and cached) in decode_ip4_at */
            v = slot->value != NULL && slot->addr == a ? Py_NewRef(slot->value) : decode_ip4_at(p, here[plan[i].ip4]);
            if (v == NULL) {
                goto failed;
            }
            slots[plan[i].slot] = v;
        }
        for (; i < nops; i++) {
            v = decode_value(plan[i].op, rec + plan[i].offset, plan[i].op->length);
            if (v == NULL) {
                goto failed;
            }
            slots[plan[i].slot] = v;
        }
        PyList_SET_ITEM(out, r, d);
        if (r + 3 < count) {
            uint32_t *later = at[(r + 3) & 3];
            for (int j = 0; j < nip4; j++) {
                later[j] = ip4_slot_of(rec + 3 * size + self->ip4_offset[j]);
                __builtin_prefetch(&ip4_cache[later[j]]);
            }
        }
    }
    return 1;
failed: /* step i of record d made no value */
    give_up(d, plan, i, nops);
    if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        PyErr_Clear();
        return 0;
    }
    return -1;
}
#endif

/* Give back the references to the placeholders that `records` in-place records stopped
 * holding (see codec_decode_set), and those of the first `partial` fields of one more. */
static void
settle_marks(CodecObject *self, Py_ssize_t records, Py_ssize_t partial)
{
    if (records == 0 && partial == 0) {
        return;
    }
    for (Py_ssize_t i = 0; i < self->nops; i++) {
        PyObject *m = self->marks[i];
        Py_SET_REFCNT(m, Py_REFCNT(m) - records - (i < partial));
    }
}

/* decode_set(buf, off, end) -> list of dicts, or None: let the pure-Python twin decide.
 *
 * A record made by fresh_split starts with every value slot empty, and decoded values
 * are written into their slots. Otherwise each record starts as a copy of the prototype, whose value of field i is the codec's
 * own placeholder object marks[i] (distinct objects: the copy's reference increments do
 * not queue behind one another on one shared refcount, as they would on None). A value
 * decoded replaces its placeholder in place, and the references the replaced
 * placeholders lose are given back once per set (settle_marks), not once per field: the
 * prototype keeps every placeholder alive meanwhile, and no one else can see them. */
static PyObject *
codec_decode_set(CodecObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "decode_set(buf, off, end)");
        return NULL;
    }
    Py_ssize_t off = PyLong_AsSsize_t(args[1]);
    if (off == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t end = PyLong_AsSsize_t(args[2]);
    if (end == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    if (off < 0 || end > view.len || off > end) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    const unsigned char *buf = (const unsigned char *)view.buf;
    /* Sets of fixed-length records hold exactly this many; others grow the list. */
    const Py_ssize_t room = self->fixed_length > 0 ? (end - off) / self->fixed_length : 0;
    PyObject *out = PyList_New(room);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
#if FRESH_SPLIT
    if (self->plan != NULL) {
        /* Out of the garbage collector's sight while it has empty items (a collection
         * that an allocation starts may run any finalizer, and gc.get_objects() would
         * hand the list to it). Records of ints and strs hold no cycle; the list is
         * tracked again when it is full. */
        PyObject_GC_UnTrack(out);
        int rc = decode_fixed(self, buf, off, room, out);
        PyBuffer_Release(&view);
        if (rc > 0) {
            PyObject_GC_Track(out);
            return out;
        }
        /* records not yet made are NULL items, which list deallocation skips */
        Py_DECREF(out);
        if (rc < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
#endif
    const Py_ssize_t nops = self->nops;
    const Op *ops = self->ops;
    PyObject *const src = self->split ? self->split : self->proto;
    Py_ssize_t count = 0;   /* records made */
    Py_ssize_t settled = 0; /* of them, those whose placeholders were replaced in place */
    Py_ssize_t partial = 0; /* fields replaced in place in a record given up */
    while (end - off >= self->min_length) {
#if FRESH_SPLIT
        PyObject *d = self->fresh ? fresh_split(self) : PyDict_Copy(src);
#else
        PyObject *d = PyDict_Copy(src);
#endif
        if (d == NULL) {
            goto error;
        }
#if DIRECT_DICTS
        PyObject **slots = self->split ? split_values(d, self->split) : NULL;
        UnicodeEntryMirror *entries = slots == NULL && self->direct ? direct_entries(d, nops) : NULL;
        const Py_ssize_t *index = self->split_index;
        const int inplace = (slots != NULL && !self->fresh) || entries != NULL; /* placeholders replaced */
#else
        const int inplace = 0;
#endif
        Py_ssize_t i = 0;
        const int fixed = self->fixed_length > 0; /* the loop condition checked the whole record */
        for (; i < nops; i++) {
            const Op *op = &ops[i];
            Py_ssize_t n = op->length;
            if (fixed) {
                /* nothing to check */
            }
            else if (IS_VAR(op->kind)) {
                if (off >= end) {
                    goto give_up_fallback;
                }
                n = buf[off++];
                if (n == 255) {
                    if (end - off < 2) {
                        goto give_up_fallback;
                    }
                    n = (buf[off] << 8) | buf[off + 1];
                    off += 2;
                }
                if (end - off < n) {
                    goto give_up_fallback;
                }
            }
            else if (end - off < n) {
                goto give_up_fallback;
            }
            PyObject *v = decode_value(op, buf + off, n);
            off += n;
            if (v == NULL) {
                if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                    PyErr_Clear();
                    goto give_up_fallback;
                }
                goto give_up_error;
            }
#if DIRECT_DICTS
            if (slots != NULL) {
                slots[index[i]] = v; /* marks[i]'s reference: settled later */
                continue;
            }
            if (entries != NULL) {
                entries[i].me_value = v;
                continue;
            }
#endif
            int rc = PyDict_SetItem(d, op->key, v);
            Py_DECREF(v);
            if (rc < 0) {
                goto give_up_error;
            }
        }
        settled += inplace;
        if (count < room) {
            PyList_SET_ITEM(out, count, d);
        }
        else {
            int rc = PyList_Append(out, d);
            Py_DECREF(d);
            if (rc < 0) {
                goto error;
            }
        }
        count++;
        continue;
    give_up_fallback:
        partial = inplace ? i : 0;
        Py_DECREF(d);
        goto fallback;
    give_up_error:
        partial = inplace ? i : 0;
        Py_DECREF(d);
        goto error;
    }
    settle_marks(self, settled, 0);
    PyBuffer_Release(&view);
    if (count < room) { /* cannot happen (room is exact), but never hand out NULL items */
        if (PyList_SetSlice(out, count, room, NULL) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
fallback:
    settle_marks(self, settled, partial);
    PyBuffer_Release(&view);
    Py_DECREF(out);
    Py_RETURN_NONE;
error:
    settle_marks(self, settled, partial);
    PyBuffer_Release(&view);
    Py_DECREF(out);
    return NULL;
}

/* ------------------------------------------------------------------ encoding */

typedef struct {
    unsigned char *data;
    Py_ssize_t len;
    Py_ssize_t cap;
} Buf;

static int
buf_reserve(Buf *b, Py_ssize_t more)
{
    if (b->len + more <= b->cap) {
        return 0;
    }
    Py_ssize_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more) {
        cap *= 2;
    }
    unsigned char *d = PyMem_Realloc(b->data, (size_t)cap);
    if (d == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = d;
    b->cap = cap;
    return 0;
}

static inline void
store_be(unsigned char *p, uint64_t v, Py_ssize_t n)
{
    switch (n) { /* the widths of IPFIX integers, as single stores */
    case 1:
        p[0] = (unsigned char)v;
        return;
    case 2: {
        uint16_t x = htons((uint16_t)v);
        memcpy(p, &x, 2);
        return;
    }
    case 4: {
        uint32_t x = htonl((uint32_t)v);
        memcpy(p, &x, 4);
        return;
    }
    case 8: {
        uint64_t x = __builtin_bswap64(v);
        memcpy(p, &x, 8);
        return;
    }
    }
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        p[i] = (unsigned char)v;
        v >>= 8;
    }
}

enum { ENC_OK = 0, ENC_FALLBACK = 1, ENC_ERROR = -1 };

/* The value of an exact int in 0 .. 2**64-1 into *x: 1, or 0 (anything else, no error set). */
static inline int
uint_of(PyObject *v, uint64_t *x)
{
    if (!PyLong_CheckExact(v)) {
        return 0;
    }
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000 && PYLONG_BITS_IN_DIGIT == 30
    /* 3.11's layout (longintrepr.h): the sign in the size, 30-bit digits */
    const Py_ssize_t size = Py_SIZE(v);
    const digit *dg = ((PyLongObject *)v)->ob_digit;
    if (size == 1) {
        *x = dg[0];
        return 1;
    }
    if (size == 0) {
        *x = 0;
        return 1;
    }
    if (size == 2) {
        *x = (uint64_t)dg[0] | ((uint64_t)dg[1] << PyLong_SHIFT);
        return 1;
    }
#endif
    unsigned long long u = PyLong_AsUnsignedLongLong(v);
    if (u == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *x = u;
    return 1;
}

/* An int in 0 .. 2**(8n)-1 written in n octets, or ENC_FALLBACK. */
static int
put_unsigned(unsigned char *p, PyObject *v, Py_ssize_t n)
{
    uint64_t x;
    if (!uint_of(v, &x) || (n < 8 && (x >> (8 * n)) != 0)) {
        return ENC_FALLBACK;
    }
    store_be(p, x, n);
    return ENC_OK;
}

static int
put_helper_unsigned(unsigned char *p, PyObject *helper, PyObject *v, Py_ssize_t n)
{
    PyObject *r = PyObject_CallOneArg(helper, v);
    if (r == NULL) {
        PyErr_Clear();
        return ENC_FALLBACK;
    }
    int rc = put_unsigned(p, r, n);
    Py_DECREF(r);
    return rc;
}

/* Dotted-quad text to 4 octets, accepting exactly what inet_pton(AF_INET) accepts (four
 * decimal octets up to 255, no leading zeros, nothing else) or a subset: 1 written, 0 not
 * (the caller then asks the twin's cache, which decides). */
static int
parse_ip4(PyObject *v, unsigned char *out)
{
    if (!PyUnicode_CheckExact(v) || !PyUnicode_IS_COMPACT_ASCII(v)) {
        return 0;
    }
    const unsigned char *s = PyUnicode_1BYTE_DATA(v);
    Py_ssize_t n = PyUnicode_GET_LENGTH(v), i = 0;
    for (int part = 0; part < 4; part++) {
        if (part > 0) {
            if (i >= n || s[i] != '.') {
                return 0;
            }
            i++;
        }
        Py_ssize_t start = i;
        unsigned value = 0;
        while (i < n && s[i] >= '0' && s[i] <= '9' && i - start < 3) {
            value = value * 10 + (unsigned)(s[i] - '0');
            i++;
        }
        if (i == start || value > 255 || (i - start > 1 && s[start] == '0')) {
            return 0;
        }
        out[part] = (unsigned char)value;
    }
    return i == n;
}

static int
put_mapped_bytes(unsigned char *p, PyObject *mapping, PyObject *v, Py_ssize_t n)
{
    PyObject *r = PyObject_GetItem(mapping, v);
    if (r == NULL) {
        PyErr_Clear();
        return ENC_FALLBACK;
    }
    int rc = ENC_FALLBACK;
    if (PyBytes_CheckExact(r) && PyBytes_GET_SIZE(r) == n) {
        memcpy(p, PyBytes_AS_STRING(r), (size_t)n);
        rc = ENC_OK;
    }
    Py_DECREF(r);
    return rc;
}

/* put_mapped_bytes for a str already in a dict cache, looked up without its __missing__
 * (a str's hash and equality are C: no Python code runs); ENC_FALLBACK if not there. */
static int
put_cached_bytes(unsigned char *p, PyObject *cache, PyObject *v, Py_ssize_t n)
{
    PyObject *r = PyDict_GetItemWithError(cache, v); /* borrowed */
    if (r == NULL) {
        PyErr_Clear();
        return ENC_FALLBACK;
    }
    if (PyBytes_CheckExact(r) && PyBytes_GET_SIZE(r) == n) {
        memcpy(p, PyBytes_AS_STRING(r), (size_t)n);
        return ENC_OK;
    }
    return ENC_FALLBACK;
}

/* Bytes of a str as UTF-8, or NULL (no exception left set) when the twin must decide. */
static const char *
utf8_of(PyObject *v, Py_ssize_t *n)
{
    if (!PyUnicode_CheckExact(v)) {
        return NULL;
    }
    const char *s = PyUnicode_AsUTF8AndSize(v, n);
    if (s == NULL) {
        PyErr_Clear();
    }
    return s;
}

static int
put_var(Buf *b, const char *s, Py_ssize_t n)
{
    if (n > 65535) {
        return ENC_FALLBACK;
    }
    if (buf_reserve(b, n + 3) < 0) {
        return ENC_ERROR;
    }
    unsigned char *p = b->data + b->len;
    if (n < 255) {
        *p++ = (unsigned char)n;
    }
    else {
        *p++ = 255;
        *p++ = (unsigned char)(n >> 8);
        *p++ = (unsigned char)n;
    }
    memcpy(p, s, (size_t)n);
    b->len = (p - b->data) + n;
    return ENC_OK;
}

static void
put_fixed(unsigned char *p, const char *s, Py_ssize_t n, Py_ssize_t length)
{
    Py_ssize_t k = n < length ? n : length;
    memcpy(p, s, (size_t)k);
    memset(p + k, 0, (size_t)(length - k));
}

#if DIRECT_DICTS
/* Prefetch a record dict's entries. */
static inline void
prefetch_entries(PyObject *rec, Py_ssize_t nops)
{
    PyDictObject *mp = (PyDictObject *)rec;
    KeysMirror *k = (KeysMirror *)mp->ma_keys;
    if (mp->ma_values != NULL || k->dk_kind != DICT_KEYS_UNICODE_KIND) {
        return;
    }
    const char *e = k->dk_indices + ((size_t)1 << k->dk_log2_index_bytes);
    Py_ssize_t n = k->dk_nentries < nops ? k->dk_nentries : nops;
    for (Py_ssize_t off = 0; off < n * (Py_ssize_t)sizeof(UnicodeEntryMirror); off += 64) {
        __builtin_prefetch(e + off);
    }
}
#endif

/* Around the calls that may run Python code (the helpers of the rare kinds, and the
 * address caches' __missing__): that code may change the record or drop it from the
 * batch, so the record and the value are held, and the record's entries are no longer
 * trusted (the fields after are looked up). *ran tells the caller to hold its batch. */
#if DIRECT_DICTS
/* The entries of a record dict laid out as the template (the decoder's, or one built in
 * template order with the same key objects), to be read in order; or NULL: looked up.
 * Each entry is still checked for its key before it is read. */
static inline const UnicodeEntryMirror *
record_entries(const CodecObject *self, PyObject *rec)
{
    PyDictObject *mp = (PyDictObject *)rec;
    KeysMirror *k = (KeysMirror *)mp->ma_keys;
    if (mp->ma_values == NULL && k->dk_kind == DICT_KEYS_UNICODE_KIND && k->dk_nentries >= self->nops &&
        self->direct) {
        return (const UnicodeEntryMirror *)(k->dk_indices + ((size_t)1 << k->dk_log2_index_bytes));
    }
    return NULL;
}
/* The value slots of a record copied from the codec's split-table prototype (the
 * decoder's records of a split codec, read back for export), or NULL. */
static inline PyObject *const *
record_split_values(const CodecObject *self, PyObject *rec)
{
    PyDictObject *mp = (PyDictObject *)rec;
    if (self->split == NULL || mp->ma_values == NULL || mp->ma_keys != ((PyDictObject *)self->split)->ma_keys) {
        return NULL;
    }
    return ((ValuesMirror *)mp->ma_values)->values;
}
#define FORGET_ENTRIES() /* the dict may have changed */ \
    (entries = record_entries(self, rec), svalues = record_split_values(self, rec))
#else
#define FORGET_ENTRIES() ((void)0)
#endif
#define BEFORE_PYTHON()                 \
    do {                                \
        if (hold_batch(bt) < 0) {       \
            return ENC_ERROR;           \
        }                               \
        if (!*ran) {                    \
            Py_INCREF(rec);             \
            *ran = 1;                   \
        }                               \
        Py_INCREF(v);         \
        ahead = NULL;         \
    } while (0)
#define AFTER_PYTHON()        \
    do {                      \
        Py_DECREF(v);         \
        FORGET_ENTRIES();     \
    } while (0)

/* The records of one encode_messages call. Before any Python code runs (see
 * BEFORE_PYTHON), a list of them is copied into a tuple of our own, which that code cannot
 * change under us: the batch encoded is the batch as it was passed, as the twin's slices. */
typedef struct {
    PyObject *seq; /* a list or tuple (PySequence_Fast), owned */
    PyObject **items;
    Py_ssize_t count;
    int held;
} Batch;

static int
hold_batch(Batch *bt)
{
    if (bt->held) {
        return 0;
    }
    if (PyList_CheckExact(bt->seq)) {
        PyObject *t = PyList_AsTuple(bt->seq);
        if (t == NULL) {
            return -1;
        }
        Py_SETREF(bt->seq, t);
        bt->items = PySequence_Fast_ITEMS(t);
        bt->count = PyTuple_GET_SIZE(t);
    }
    bt->held = 1;
    return 0;
}

static int encode_fields(CodecObject *self, PyObject *rec, Buf *b, int *ran, const void *ahead, Batch *bt);

/* Append one record to b; ENC_FALLBACK leaves b as it was. *ran: Python code ran. */
static int
encode_one(CodecObject *self, PyObject *rec, Buf *b, int *ran, const void *ahead, Batch *bt)
{
    *ran = 0;
    int rc = encode_fields(self, rec, b, ran, ahead, bt);
    if (*ran) {
        Py_DECREF(rec);
    }
    return rc;
}

static int
encode_fields(CodecObject *self, PyObject *rec, Buf *b, int *ran, const void *ahead, Batch *bt)
{
    if (!PyDict_CheckExact(rec)) {
        return ENC_FALLBACK;
    }
    const Py_ssize_t start = b->len;
#if DIRECT_DICTS
    /* A record laid out as the template (the decoder's, or one built in template order
     * with the same key objects) is read in order, entry by entry; any other by lookups. */
    const UnicodeEntryMirror *entries = record_entries(self, rec);
    PyObject *const *svalues = record_split_values(self, rec);
#endif
    for (Py_ssize_t i = 0; i < self->nops; i++) {
        const Op *op = &self->ops[i];
        PyObject *v;
#if DIRECT_DICTS
        if (ahead != NULL) { /* the next record's value of this field, fetched ahead */
            __builtin_prefetch(((const UnicodeEntryMirror *)ahead)[i].me_value);
        }
        if (svalues != NULL && svalues[self->split_index[i]] != NULL) {
            v = svalues[self->split_index[i]]; /* the slot of this key in every copy */
        }
        else if (entries != NULL && entries[i].me_key == op->key && entries[i].me_value != NULL) {
            v = entries[i].me_value;
        }
        else
#endif
        {
            v = PyDict_GetItemWithError(rec, op->key);
            if (v == NULL) {
                PyErr_Clear();
                goto fallback;
            }
        }
        int rc = ENC_OK;
        if (IS_VAR(op->kind)) {
            Py_ssize_t n;
            const char *s;
            if (op->kind == K_STR_VAR) {
                s = utf8_of(v, &n);
            }
            else {
                s = PyBytes_CheckExact(v) ? PyBytes_AS_STRING(v) : NULL;
                n = s ? PyBytes_GET_SIZE(v) : 0;
            }
            if (s == NULL) {
                goto fallback;
            }
            rc = put_var(b, s, n);
            if (rc == ENC_ERROR) {
                return ENC_ERROR;
            }
            if (rc != ENC_OK) {
                goto fallback;
            }
            continue;
        }
        const Py_ssize_t n = op->length;
        if (buf_reserve(b, n) < 0) {
            return ENC_ERROR;
        }
        unsigned char *p = b->data + b->len;
        switch (op->kind) {
        case K_UINT:
        case K_SECONDS:
            rc = put_unsigned(p, v, n);
            break;
        case K_SINT: {
            if (!PyLong_CheckExact(v)) {
                rc = ENC_FALLBACK;
                break;
            }
            int overflow = 0;
            long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
            if (overflow || (x == -1 && PyErr_Occurred())) {
                PyErr_Clear();
                rc = ENC_FALLBACK;
                break;
            }
            if (n < 8) {
                long long lim = 1LL << (8 * n - 1);
                if (x < -lim || x >= lim) {
                    rc = ENC_FALLBACK;
                    break;
                }
            }
            store_be(p, (uint64_t)x, n);
            break;
        }
        case K_F32:
        case K_F64:
            if (!PyFloat_CheckExact(v)) {
                rc = ENC_FALLBACK;
                break;
            }
            if ((op->kind == K_F32 ? PyFloat_Pack4(PyFloat_AS_DOUBLE(v), (char *)p, 0)
                                   : PyFloat_Pack8(PyFloat_AS_DOUBLE(v), (char *)p, 0)) < 0) {
                PyErr_Clear();
                rc = ENC_FALLBACK;
            }
            break;
        case K_BOOL:
            if (PyBool_Check(v) || PyLong_CheckExact(v)) {
                int t = PyObject_IsTrue(v);
                if (t < 0) {
                    PyErr_Clear();
                    rc = ENC_FALLBACK;
                    break;
                }
                p[0] = t ? 1 : 2;
            }
            else {
                rc = ENC_FALLBACK;
            }
            break;
        case K_MAC:
        case K_IP4:
        case K_IP6:
            if (op->kind == K_MAC) {
                BEFORE_PYTHON();
                PyObject *r = PyObject_CallOneArg(op->helper, v);
                AFTER_PYTHON();
                if (r == NULL) {
                    PyErr_Clear();
                    rc = ENC_FALLBACK;
                    break;
                }
                if (PyBytes_CheckExact(r) && PyBytes_GET_SIZE(r) == 6) {
                    memcpy(p, PyBytes_AS_STRING(r), 6);
                }
                else {
                    rc = ENC_FALLBACK;
                }
                Py_DECREF(r);
            }
            else if (op->kind == K_IP4 && parse_ip4(v, p)) {
                rc = ENC_OK;
            }
            else if (PyUnicode_CheckExact(v) && PyDict_Check(op->helper) &&
                     (rc = put_cached_bytes(p, op->helper, v, n)) != ENC_FALLBACK) {
                /* in the twin's cache: found without running any Python code */
            }
            else {
                BEFORE_PYTHON();
                rc = put_mapped_bytes(p, op->helper, v, n);
                AFTER_PYTHON();
            }
            break;
        case K_MILLIS:
        case K_NTP:
            BEFORE_PYTHON();
            rc = put_helper_unsigned(p, op->helper, v, 8);
            AFTER_PYTHON();
            break;
        case K_STR_FIX: {
            Py_ssize_t len;
            const char *s = utf8_of(v, &len);
            if (s == NULL) {
                rc = ENC_FALLBACK;
                break;
            }
            put_fixed(p, s, len, n);
            break;
        }
        default: /* K_OCT_FIX */
            if (!PyBytes_CheckExact(v)) {
                rc = ENC_FALLBACK;
                break;
            }
            put_fixed(p, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v), n);
            break;
        }
        if (rc != ENC_OK) {
            goto fallback;
        }
        b->len += n;
    }
    return ENC_OK;
fallback:
    b->len = start;
    return ENC_FALLBACK;
}

/* Append to `messages` one message of the `payload` octets at p, its header's sequence
 * number `number`. 0, or -1 with an exception set. */
static int
emit_message(PyObject *messages, const unsigned char *payload, Py_ssize_t size, unsigned long export_time,
             uint32_t number, unsigned long domain, unsigned long template_id)
{
    Py_ssize_t length = 20 + size;
    PyObject *msg = PyBytes_FromStringAndSize(NULL, length);
    if (msg == NULL) {
        return -1;
    }
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(msg);
    store_be(p, 10, 2);
    store_be(p + 2, (uint64_t)length, 2);
    store_be(p + 4, export_time, 4);
    store_be(p + 8, number, 4);
    store_be(p + 12, domain, 4);
    store_be(p + 16, template_id, 2);
    store_be(p + 18, (uint64_t)(size + 4), 2);
    memcpy(p + 20, payload, (size_t)size);
    int rc = PyList_Append(messages, msg);
    Py_DECREF(msg);
    return rc;
}

/* ------------------------------------------------------------------ fixed-length batches
 *
 * A batch of a template of fixed-length fields is written by a plan compiled once per
 * codec, as its sets are decoded: one step per field with its offset in the record, its
 * value slot (records of the codec's split table: the decoder's, re-exported) and one
 * code for its kind and width. Every message of such a batch holds the same number of
 * records (limit / fixed_length, the last one fewer), so each message is made at its
 * final size and the records are written straight into it: no scratch buffer, no copy,
 * no check of the room left. A step reads its value from the record's split values or
 * its entries laid out in template order, and writes it when it is of the exact type
 * and in range; anything else (a key looked up, a value the plan does not write itself,
 * one that would run Python code) sends that whole record the general way, encode_one
 * and then the twin's fallback, which decide exactly as for any other template. No
 * Python code runs inside a step, so the batch is held (hold_batch) only before a
 * record goes the general way. */
enum { E_U8, E_U16, E_U32, E_U64, E_UINT, E_IP4, E_IP6, E_SLOW };
typedef struct EStep {
    uint8_t code;
    Py_ssize_t offset; /* in the record */
    Py_ssize_t slot;   /* in a split record's values; -1 without a split table */
    const Op *op;
} EStep;

static EStep *
make_eplan(const CodecObject *self)
{
    if (self->fixed_length <= 0 || self->nops > PLAN_MAX) {
        return NULL;
    }
    EStep *plan = PyMem_Calloc((size_t)self->nops, sizeof(EStep));
    if (plan == NULL) {
        return NULL; /* the general loop serves */
    }
    Py_ssize_t offset = 0;
    for (Py_ssize_t i = 0; i < self->nops; i++) {
        const Op *op = &self->ops[i];
        EStep *st = &plan[i];
        st->offset = offset;
        st->slot = self->split != NULL ? self->split_index[i] : -1;
        st->op = op;
        st->code = E_SLOW;
        if (op->kind == K_UINT || op->kind == K_SECONDS) {
            st->code = op->length == 1 ? E_U8 : op->length == 2 ? E_U16 : op->length == 4 ? E_U32 : op->length == 8 ? E_U64 : E_UINT;
        }
        else if ((op->kind == K_IP4 || op->kind == K_IP6) && op->helper != NULL && PyDict_Check(op->helper)) {
            st->code = op->kind == K_IP4 ? E_IP4 : E_IP6;
        }
        offset += op->length;
    }
    for (Py_ssize_t i = 0; i < self->nops; i++) {
        if (plan[i].code == E_SLOW) { /* a kind the plan does not write: every record the general way */
            PyMem_Free(plan);
            return NULL;
        }
    }
    return plan;
}

/* Write `rec` at p by the plan: ENC_OK, or ENC_FALLBACK (p partly written, no Python code
 * run, no error set): the record is to go the general way. */
static inline int
encode_planned(const CodecObject *self, PyObject *rec, unsigned char *p, PyObject *next)
{
    if (!PyDict_CheckExact(rec)) {
        return ENC_FALLBACK;
    }
#if DIRECT_DICTS
    PyObject *const *svalues = record_split_values(self, rec);
    const UnicodeEntryMirror *entries = svalues == NULL ? record_entries(self, rec) : NULL;
    /* the next record's values, fetched one by one as this record's fields are written */
    PyObject *const *next_svalues = NULL;
    const UnicodeEntryMirror *next_entries = NULL;
    if (next != NULL && PyDict_CheckExact(next)) {
        next_svalues = record_split_values(self, next);
        next_entries = next_svalues == NULL ? record_entries(self, next) : NULL;
    }
#else
    PyObject *const *svalues = NULL;
    const void *entries = NULL;
#endif
    if (svalues == NULL && entries == NULL) {
        return ENC_FALLBACK;
    }
    const EStep *plan = self->eplan;
    for (Py_ssize_t i = 0; i < self->nops; i++) {
        const EStep *st = &plan[i];
        PyObject *v;
#if DIRECT_DICTS
        if (next_svalues != NULL) {
            __builtin_prefetch(next_svalues[st->slot]);
        }
        else if (next_entries != NULL) {
            __builtin_prefetch(next_entries[i].me_value);
        }
        if (svalues != NULL) {
            v = svalues[st->slot];
        }
        else {
            v = entries[i].me_key == st->op->key ? entries[i].me_value : NULL;
        }
#else
        v = NULL;
#endif
        if (v == NULL) {
            return ENC_FALLBACK;
        }
        unsigned char *q = p + st->offset;
        uint64_t x;
        switch (st->code) {
        case E_U8:
            if (!uint_of(v, &x) || x > 0xFF) {
                return ENC_FALLBACK;
            }
            q[0] = (unsigned char)x;
            break;
        case E_U16: {
            if (!uint_of(v, &x) || x > 0xFFFF) {
                return ENC_FALLBACK;
            }
            uint16_t t = htons((uint16_t)x);
            memcpy(q, &t, 2);
            break;
        }
        case E_U32: {
            if (!uint_of(v, &x) || x > 0xFFFFFFFFULL) {
                return ENC_FALLBACK;
            }
            uint32_t t = htonl((uint32_t)x);
            memcpy(q, &t, 4);
            break;
        }
        case E_U64: {
            if (!uint_of(v, &x)) {
                return ENC_FALLBACK;
            }
            uint64_t t = __builtin_bswap64(x);
            memcpy(q, &t, 8);
            break;
        }
        case E_UINT:
            if (put_unsigned(q, v, st->op->length) != ENC_OK) {
                return ENC_FALLBACK;
            }
            break;
        case E_IP4:
            if (parse_ip4(v, q)) {
                break;
            }
            /* fall through: the twin's cache, as for IPv6 */
        default: /* E_IP6 */
            if (!PyUnicode_CheckExact(v) || put_cached_bytes(q, st->op->helper, v, st->op->length) != ENC_OK) {
                return ENC_FALLBACK;
            }
            break;
        }
    }
    return ENC_OK;
}

/* encode_messages for a codec with a fixed-length plan (its arguments, parsed). */
static PyObject *
encode_fixed_messages(CodecObject *self, PyObject *records, Py_ssize_t limit, PyObject *fallback,
                      unsigned long export_time, unsigned long sequence, unsigned long domain,
                      unsigned long template_id)
{
    const Py_ssize_t size = self->fixed_length;
    const Py_ssize_t per = limit / size;
    if (per < 1) { /* codec.py refuses such a message size first; never a message without room */
        return Py_BuildValue("([]n)", size);
    }
    Batch bt = {PySequence_Fast(records, "records must be a sequence"), NULL, 0, 0};
    if (bt.seq == NULL) {
        return NULL;
    }
    bt.items = PySequence_Fast_ITEMS(bt.seq);
    bt.count = PySequence_Fast_GET_SIZE(bt.seq);
    const Py_ssize_t count = bt.count;
    Buf b = {NULL, 0, 0}; /* a record that goes the general way is written here first */
    PyObject *messages = PyList_New(0);
    PyObject *result = NULL;
    if (messages == NULL) {
        goto done;
    }
    for (Py_ssize_t first = 0; first < count; first += per) {
        const Py_ssize_t k = count - first < per ? count - first : per;
        PyObject *msg = PyBytes_FromStringAndSize(NULL, 20 + k * size);
        if (msg == NULL) {
            goto done;
        }
        unsigned char *m = (unsigned char *)PyBytes_AS_STRING(msg);
        store_be(m, 10, 2);
        store_be(m + 2, (uint64_t)(20 + k * size), 2);
        store_be(m + 4, export_time, 4);
        store_be(m + 8, (uint32_t)(sequence + (unsigned long)first), 4);
        store_be(m + 12, domain, 4);
        store_be(m + 16, template_id, 2);
        store_be(m + 18, (uint64_t)(k * size + 4), 2);
        for (Py_ssize_t j = 0; j < k; j++) {
            const Py_ssize_t i = first + j;
            PyObject **items = bt.items; /* the same records, held in a tuple once Python ran */
            unsigned char *p = m + 20 + j * size;
#if DIRECT_DICTS
            /* Records arrive cold, each a chain of separate allocations: the dict of
             * record i+4, the keys table (or values) it points to at i+3, the entries
             * of i+2, fetched ahead, each stage once the one before it has arrived;
             * encode_planned fetches the values of i+1 field by field. */
            if (i + 4 < count) {
                __builtin_prefetch(items[i + 4]);
            }
            if (i + 3 < count && PyDict_CheckExact(items[i + 3])) {
                const PyDictObject *mp = (const PyDictObject *)items[i + 3];
                __builtin_prefetch(mp->ma_values != NULL ? (const void *)mp->ma_values : (const void *)mp->ma_keys);
            }
            if (i + 2 < count && PyDict_CheckExact(items[i + 2])) {
                PyObject *const *sv = record_split_values(self, items[i + 2]);
                if (sv != NULL) {
                    __builtin_prefetch(sv);
                    __builtin_prefetch((const char *)sv + 64);
                    __builtin_prefetch((const char *)sv + 128);
                    __builtin_prefetch((const char *)sv + 192);
                }
                else {
                    prefetch_entries(items[i + 2], self->nops);
                }
            }
#endif
            if (encode_planned(self, items[i], p, i + 1 < count ? items[i + 1] : NULL) == ENC_OK) {
                continue;
            }
            /* the general way: the encoder of every template, then the twin's */
            if (hold_batch(&bt) < 0) {
                Py_DECREF(msg);
                goto done;
            }
            int ran;
            b.len = 0;
            int rc = encode_one(self, bt.items[i], &b, &ran, NULL, &bt);
            if (rc == ENC_ERROR) {
                Py_DECREF(msg);
                goto done;
            }
            const unsigned char *from = b.data;
            Py_ssize_t n = b.len;
            PyObject *raw = NULL;
            if (rc == ENC_FALLBACK) {
                raw = PyObject_CallOneArg(fallback, bt.items[i]);
                if (raw == NULL) {
                    Py_DECREF(msg);
                    goto done;
                }
                if (!PyBytes_Check(raw)) {
                    Py_DECREF(raw);
                    Py_DECREF(msg);
                    PyErr_SetString(PyExc_TypeError, "the record encoder returned no bytes");
                    goto done;
                }
                from = (const unsigned char *)PyBytes_AS_STRING(raw);
                n = PyBytes_GET_SIZE(raw);
            }
            if (n != size) { /* neither encoder writes another length for a fixed-length template */
                PyErr_Format(PyExc_SystemError, "a record of a %zd-octet template was encoded in %zd octets", size, n);
                Py_XDECREF(raw);
                Py_DECREF(msg);
                goto done;
            }
            memcpy(p, from, (size_t)size);
            Py_XDECREF(raw);
        }
        int rc = PyList_Append(messages, msg);
        Py_DECREF(msg);
        if (rc < 0) {
            goto done;
        }
    }
    result = Py_BuildValue("(Oi)", messages, 0);
done:
    PyMem_Free(b.data);
    Py_XDECREF(messages);
    Py_DECREF(bt.seq);
    return result;
}

/* encode_messages(records, limit, fallback, export_time, sequence, domain, template_id)
 *   -> (messages, 0), or ([], n) when a record of n octets exceeds limit.
 * Records are cut into messages greedily, each holding as many as fit in `limit` octets
 * of set payload; each header's sequence number counts the records before it.
 *
 * Records are written into one scratch buffer of about a message's size, which is copied
 * out into a message whenever the next record does not fit (and moved to the front): the
 * buffer stays in the CPU's cache however many records there are. As with the twin, every
 * record is encoded (so that a record the twin refuses raises) before an oversized one
 * is reported. */
static PyObject *
codec_encode_messages(CodecObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "encode_messages(records, limit, fallback, export_time, sequence, domain, template_id)");
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (limit < 1) {
        PyErr_SetString(PyExc_ValueError, "limit must be positive");
        return NULL;
    }
    PyObject *fallback = args[2];
    unsigned long export_time = PyLong_AsUnsignedLong(args[3]);
    unsigned long sequence = PyLong_AsUnsignedLong(args[4]);
    unsigned long domain = PyLong_AsUnsignedLong(args[5]);
    unsigned long template_id = PyLong_AsUnsignedLong(args[6]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (self->eplan != NULL) {
        return encode_fixed_messages(self, args[0], limit, fallback, export_time, sequence, domain, template_id);
    }
    Batch bt = {PySequence_Fast(args[0], "records must be a sequence"), NULL, 0, 0};
    if (bt.seq == NULL) {
        return NULL;
    }
    bt.items = PySequence_Fast_ITEMS(bt.seq);
    bt.count = PySequence_Fast_GET_SIZE(bt.seq);
    const Py_ssize_t count = bt.count;
    Buf b = {NULL, 0, 0};
    PyObject *messages = PyList_New(0);
    PyObject *result = NULL;
    if (messages == NULL || buf_reserve(&b, limit + 3) < 0) {
        goto done;
    }
    Py_ssize_t first = 0;    /* first record of the message being filled */
    Py_ssize_t oversize = 0; /* octets of the first record too long for any message */
    uint32_t number = (uint32_t)sequence;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject **items = bt.items; /* the same records, held in a tuple once Python ran */
#if DIRECT_DICTS
        /* Records arrive cold (each dict, its entries and every value are separate
         * allocations): fetch ahead, the dict of record i+3, the entries of i+2, and
         * the values of i+1 one by one as the fields of record i are written, so that
         * encoding record i rarely waits for memory. (Fetched all at once, a burst of
         * as many misses as fields, the values came no sooner: measured, 2.3M against
         * 3.6M fixed-length records/s, presumably the CPU's queue of misses overflows.) */
        if (i + 3 < count) {
            __builtin_prefetch(items[i + 3]);
        }
        if (i + 2 < count && PyDict_CheckExact(items[i + 2])) {
            prefetch_entries(items[i + 2], self->nops);
        }
        const void *ahead = i + 1 < count && PyDict_CheckExact(items[i + 1]) ? record_entries(self, items[i + 1]) : NULL;
#endif
        const Py_ssize_t start = b.len;
        int ran;
#if !DIRECT_DICTS
        const void *ahead = NULL;
#endif
        int rc = encode_one(self, items[i], &b, &ran, ahead, &bt);
        if (rc == ENC_FALLBACK && hold_batch(&bt) < 0) { /* Python code is about to run */
            rc = ENC_ERROR;
        }
        if (rc == ENC_ERROR) {
            goto done;
        }
        if (rc == ENC_FALLBACK) {
            PyObject *raw = PyObject_CallOneArg(fallback, bt.items[i]);
            if (raw == NULL) {
                goto done;
            }
            if (!PyBytes_Check(raw)) {
                Py_DECREF(raw);
                PyErr_SetString(PyExc_TypeError, "the record encoder returned no bytes");
                goto done;
            }
            Py_ssize_t n = PyBytes_GET_SIZE(raw);
            if (buf_reserve(&b, n) < 0) {
                Py_DECREF(raw);
                goto done;
            }
            memcpy(b.data + b.len, PyBytes_AS_STRING(raw), (size_t)n);
            b.len += n;
            Py_DECREF(raw);
        }
        const Py_ssize_t n = b.len - start;
        if (n > limit || oversize) { /* no message will be sent: only errors matter now */
            if (oversize == 0) {
                oversize = n;
            }
            b.len = 0;
            continue;
        }
        if (b.len > limit) { /* record i opens the next message */
            if (emit_message(messages, b.data, start, export_time, number, domain, template_id) < 0) {
                goto done;
            }
            number += (uint32_t)(i - first);
            first = i;
            memmove(b.data, b.data + start, (size_t)n);
            b.len = n;
        }
    }
    if (oversize) {
        result = Py_BuildValue("([]n)", oversize);
        goto done;
    }
    if (count > first && emit_message(messages, b.data, b.len, export_time, number, domain, template_id) < 0) {
        goto done;
    }
    result = Py_BuildValue("(Oi)", messages, 0);
done:
    PyMem_Free(b.data);
    Py_XDECREF(messages);
    Py_DECREF(bt.seq);
    return result;
}

/* ------------------------------------------------------------------ the type */

static void
codec_dealloc(CodecObject *self)
{
    for (Py_ssize_t i = 0; i < self->nops; i++) {
        Py_XDECREF(self->ops[i].key);
        Py_XDECREF(self->ops[i].helper);
    }
    PyMem_Free(self->ops);
    if (self->marks != NULL) {
        for (Py_ssize_t i = 0; i < self->nops; i++) {
            Py_XDECREF(self->marks[i]);
        }
        PyMem_Free(self->marks);
    }
    PyMem_Free(self->split_index);
    PyMem_Free(self->plan);
    PyMem_Free(self->eplan);
    Py_XDECREF(self->split);
    Py_XDECREF(self->proto);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Whether copies of the prototype have the mirrored layout: keys in order, values
 * None, and a value written in place is what the dict then gives for its key. */
static int
check_direct(CodecObject *self)
{
#if DIRECT_DICTS
    PyObject *d = PyDict_Copy(self->proto);
    if (d == NULL) {
        return -1;
    }
    int ok = 0;
    UnicodeEntryMirror *e = direct_entries(d, self->nops);
    if (e != NULL) {
        ok = 1;
        for (Py_ssize_t i = 0; i < self->nops; i++) {
            if (e[i].me_key != self->ops[i].key || e[i].me_value != self->marks[i]) {
                ok = 0;
                break;
            }
        }
    }
    if (ok && self->nops > 0) {
        PyObject *probe = PyLong_FromLong(12345);
        if (probe == NULL) {
            Py_DECREF(d);
            return -1;
        }
        Py_DECREF(e[self->nops - 1].me_value);
        e[self->nops - 1].me_value = probe;
        ok = PyDict_GetItemWithError(d, self->ops[self->nops - 1].key) == probe && PyDict_GET_SIZE(d) == self->nops;
        PyErr_Clear();
    }
    Py_DECREF(d);
    return ok;
#else
    return 0;
#endif
}

/* Adopt a copy of `split`, a dict of the fields' keys in field order that shares its keys
 * table (an instance __dict__, made by accel.py), if it stays a split table once each
 * field's placeholder is stored in it through PyDict_SetItem: the value slot CPython itself
 * gives each field is then found by its placeholder. 1 adopted, 0 not, -1 error. */
static int
check_split(CodecObject *self, PyObject *split)
{
#if DIRECT_DICTS
    if (split == NULL || split == Py_None || !PyDict_CheckExact(split) || PyDict_GET_SIZE(split) != self->nops ||
        ((PyDictObject *)split)->ma_values == NULL) {
        return 0;
    }
    PyObject *d = PyDict_Copy(split);
    if (d == NULL) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < self->nops; i++) {
        if (PyDict_SetItem(d, self->ops[i].key, self->marks[i]) < 0) {
            Py_DECREF(d);
            return -1;
        }
    }
    Py_ssize_t *index = PyMem_Calloc((size_t)(self->nops ? self->nops : 1), sizeof(Py_ssize_t));
    if (index == NULL) {
        Py_DECREF(d);
        PyErr_NoMemory();
        return -1;
    }
    PyObject **slots = split_values(d, split);
    int ok = slots != NULL && PyDict_GET_SIZE(d) == self->nops;
    Py_ssize_t size = ((KeysMirror *)((PyDictObject *)d)->ma_keys)->dk_nentries;
    for (Py_ssize_t i = 0; ok && i < self->nops; i++) {
        index[i] = -1;
        for (Py_ssize_t j = 0; j < size; j++) {
            if (slots[j] == self->marks[i]) {
                index[i] = j;
            }
        }
        ok = index[i] >= 0 && PyDict_GetItemWithError(d, self->ops[i].key) == self->marks[i];
    }
    PyErr_Clear();
    if (!ok) {
        PyMem_Free(index);
        Py_DECREF(d);
        return 0;
    }
    self->split = d;
    self->split_index = index;
    return 1;
#else
    return 0;
#endif
}

/* A split-table prototype of the fields' keys made here, for templates with more keys
 * than CPython shares through a class (30, SHARED_KEYS_MAX_SIZE; the agent's templates
 * have 43). CPython 3.11 itself reads split tables of any size up to 250 keys (the
 * prefix of a values array holds the insertion order in bytes; the limit of 30 is only
 * where it stops adding keys to a class's shared table). The keys table is a copy of
 * the one CPython built for an ordinary dict of these keys (its hash index and entries,
 * in template order), marked split, with no room left: a key added to a record makes
 * CPython convert that record to an ordinary dict, as it does for any full shared table.
 * A record copied from it holds one array of values (about 400 octets for 43 fields)
 * where an ordinary dict of 43 keys holds a 1,520-octet table of its own, which is
 * allocated, copied, and freed key by key. NULL (no error) where this does not apply;
 * the result is checked again, as any split prototype, by check_split. */
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000
#define CRAFTED_SPLIT 1
#define DICT_KEYS_SPLIT_KIND 2
#define CRAFTED_MAX_KEYS 100 /* one-octet indices and a one-octet prefix, with room */
static PyObject *
crafted_split(CodecObject *self)
{
    const Py_ssize_t n = self->nops;
    if (n <= 30 || n > CRAFTED_MAX_KEYS) {
        return NULL;
    }
    PyObject *plain = PyDict_New();
    if (plain == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyDict_SetItem(plain, self->ops[i].key, self->marks[i]) < 0) {
            Py_DECREF(plain);
            return NULL;
        }
    }
    PyDictObject *pm = (PyDictObject *)plain;
    KeysMirror *pk = (KeysMirror *)pm->ma_keys;
    UnicodeEntryMirror *pe = (UnicodeEntryMirror *)(pk->dk_indices + ((size_t)1 << pk->dk_log2_index_bytes));
    int ok = pm->ma_values == NULL && pk->dk_kind == DICT_KEYS_UNICODE_KIND && pk->dk_nentries == n &&
             pm->ma_used == n && pk->dk_log2_size <= 7 && pk->dk_log2_index_bytes == pk->dk_log2_size;
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        ok = pe[i].me_key == self->ops[i].key && pe[i].me_value == self->marks[i];
    }
    if (!ok) {
        Py_DECREF(plain);
        return NULL;
    }
    const size_t usable = ((size_t)1 << pk->dk_log2_size) * 2 / 3;
    const size_t keys_size = sizeof(KeysMirror) + ((size_t)1 << pk->dk_log2_index_bytes) + usable * sizeof(UnicodeEntryMirror);
    const size_t prefix = ((size_t)n + 2 + sizeof(PyObject *) - 1) / sizeof(PyObject *) * sizeof(PyObject *);
    KeysMirror *k = PyObject_Malloc(keys_size);
    uint8_t *mem = PyMem_Malloc(prefix + (size_t)n * sizeof(PyObject *));
    PyObject *d = PyDict_New();
    if (k == NULL || mem == NULL || d == NULL) {
        PyObject_Free(k);
        PyMem_Free(mem);
        Py_XDECREF(d);
        Py_DECREF(plain);
        return PyErr_NoMemory();
    }
    memcpy(k, pk, keys_size);
    k->dk_refcnt = 1;
    k->dk_kind = DICT_KEYS_SPLIT_KIND;
    k->dk_version = 0;
    k->dk_usable = 0;
    UnicodeEntryMirror *e = (UnicodeEntryMirror *)(k->dk_indices + ((size_t)1 << k->dk_log2_index_bytes));
    PyObject **values = (PyObject **)(mem + prefix);
    mem[prefix - 1] = (uint8_t)prefix;
    mem[prefix - 2] = (uint8_t)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_INCREF(e[i].me_key);
        e[i].me_value = NULL;
        mem[prefix - 3 - i] = (uint8_t)i; /* insertion order: template order */
        values[i] = Py_NewRef(self->marks[i]);
    }
    Py_DECREF(plain);
    PyDictObject *mp = (PyDictObject *)d; /* empty: it holds the shared empty keys */
    ((KeysMirror *)mp->ma_keys)->dk_refcnt--;
    mp->ma_keys = (PyDictKeysObject *)k;
    mp->ma_values = (PyDictValues *)values;
    mp->ma_used = n;
    /* what the dict now says of itself: every key, in order, with its placeholder */
    ok = PyDict_GET_SIZE(d) == n;
    Py_ssize_t pos = 0, i = 0;
    PyObject *key, *value;
    while (ok && PyDict_Next(d, &pos, &key, &value)) {
        ok = i < n && key == self->ops[i].key && value == self->marks[i] &&
             PyDict_GetItemWithError(d, key) == self->marks[i];
        i++;
    }
    if (!ok || i != n || PyErr_Occurred()) {
        PyErr_Clear();
        Py_DECREF(d);
        return NULL;
    }
    return d;
}
#else
#define CRAFTED_SPLIT 0
#endif

/* Whether records can be made by fresh_split: one made and filled with the placeholders
 * must read back as a copy of the prototype does (each key its value, in field order).
 * Sets self->fresh; -1 on error. */
static int
check_fresh(CodecObject *self)
{
    self->fresh = 0;
#if FRESH_SPLIT
    if (self->split == NULL) {
        return 0;
    }
    PyObject *d = fresh_split(self);
    if (d == NULL) {
        return -1;
    }
    PyObject **slots = split_values(d, self->split);
    int ok = slots != NULL && PyDict_GET_SIZE(d) == self->nops;
    for (Py_ssize_t i = 0; ok && i < self->nops; i++) {
        slots[self->split_index[i]] = Py_NewRef(self->marks[i]);
    }
    Py_ssize_t pos = 0, i = 0;
    PyObject *key, *value;
    while (ok && PyDict_Next(d, &pos, &key, &value)) {
        ok = i < self->nops && key == self->ops[i].key && value == self->marks[i] &&
             PyDict_GetItemWithError(d, key) == self->marks[i];
        i++;
    }
    ok = ok && i == self->nops && !PyErr_Occurred();
    PyErr_Clear();
    Py_DECREF(d);
    self->fresh = ok;
#endif
    return 0;
}

/* Codec(fields): fields is a sequence of (key, kind, length, helper-or-None). */
static PyObject *
codec_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *fields, *split = NULL;
    static char *kwlist[] = {"fields", "split", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:Codec", kwlist, &fields, &split)) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(fields, "fields must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    CodecObject *self = (CodecObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    self->ops = PyMem_Calloc((size_t)(n ? n : 1), sizeof(Op));
    self->marks = PyMem_Calloc((size_t)(n ? n : 1), sizeof(PyObject *));
    self->proto = PyDict_New();
    if (self->ops == NULL || self->marks == NULL || self->proto == NULL) {
        goto error;
    }
    Py_ssize_t fixed = 0, nvar = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key, *helper;
        int kind;
        Py_ssize_t length;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "UinO:field", &key, &kind, &length, &helper)) {
            goto error;
        }
        if (kind < 0 || kind >= K_COUNT) {
            PyErr_Format(PyExc_ValueError, "field %zd: unknown kind %d", i, kind);
            goto error;
        }
        int integer = kind == K_UINT || kind == K_SINT;
        if (!IS_VAR(kind) && (length < 1 || length > 65534 || (integer && length > 8))) {
            PyErr_Format(PyExc_ValueError, "field %zd: length %zd does not suit kind %d", i, length, kind);
            goto error;
        }
        Op *op = &self->ops[i];
        Py_INCREF(key);
        PyUnicode_InternInPlace(&key);
        op->key = key;
        op->kind = kind;
        op->length = IS_VAR(kind) ? 0 : length;
        op->helper = helper == Py_None ? NULL : Py_NewRef(helper);
        self->nops = i + 1;
        if ((kind == K_MAC || kind == K_IP4 || kind == K_IP6 || kind == K_MILLIS || kind == K_NTP) &&
            op->helper == NULL) {
            PyErr_Format(PyExc_ValueError, "field %zd: kind %d needs an encode helper", i, kind);
            goto error;
        }
        self->marks[i] = PyLong_FromSsize_t(-1000000000 - i);
        if (self->marks[i] == NULL || PyDict_SetItem(self->proto, key, self->marks[i]) < 0) {
            goto error;
        }
        if (IS_VAR(kind)) {
            nvar++;
        }
        else {
            fixed += length;
        }
    }
    if (PyDict_GET_SIZE(self->proto) != n) {
        PyErr_SetString(PyExc_ValueError, "field keys repeat");
        goto error;
    }
    self->min_length = fixed + nvar;
    self->fixed_length = nvar ? -1 : fixed;
    if (self->min_length == 0) {
        PyErr_SetString(PyExc_ValueError, "records of zero length");
        goto error;
    }
    self->direct = check_direct(self);
    if (self->direct < 0 || check_split(self, split) < 0) {
        goto error;
    }
#if CRAFTED_SPLIT
    if (self->split == NULL) { /* none given, or not adoptable: more keys than a class shares */
        PyObject *crafted = crafted_split(self);
        if (crafted == NULL && PyErr_Occurred()) {
            goto error;
        }
        int rc = crafted != NULL ? check_split(self, crafted) : 0;
        Py_XDECREF(crafted);
        if (rc < 0) {
            goto error;
        }
    }
#endif
    if (check_fresh(self) < 0) {
        goto error;
    }
#if FRESH_SPLIT
    self->plan = make_plan(self);
#endif
    self->eplan = make_eplan(self);
    Py_DECREF(seq);
    return (PyObject *)self;
error:
    Py_DECREF(seq);
    Py_DECREF(self);
    return NULL;
}

static PyObject *
codec_get_min_length(CodecObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->min_length);
}

static PyObject *
codec_get_fixed_length(CodecObject *self, void *closure)
{
    if (self->fixed_length < 0) {
        Py_RETURN_NONE;
    }
    return PyLong_FromSsize_t(self->fixed_length);
}

/* _placeholder_refcounts() -> the reference counts of the fields' placeholders: the
 * tests check that decoding, answered or declined, leaves them as they were. */
static PyObject *
codec_placeholder_refcounts(CodecObject *self, PyObject *unused)
{
    PyObject *out = PyTuple_New(self->nops);
    for (Py_ssize_t i = 0; out != NULL && i < self->nops; i++) {
        PyObject *n = PyLong_FromSsize_t(Py_REFCNT(self->marks[i]));
        if (n == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyTuple_SET_ITEM(out, i, n);
    }
    return out;
}

static PyMethodDef codec_methods[] = {
    {"_placeholder_refcounts", (PyCFunction)codec_placeholder_refcounts, METH_NOARGS,
     "reference counts of the fields' placeholders (for tests)"},
    {"decode_set", (PyCFunction)(void (*)(void))codec_decode_set, METH_FASTCALL,
     "decode_set(buf, off, end) -> list of records, or None to let the pure-Python codec decide"},
    {"encode_messages", (PyCFunction)(void (*)(void))codec_encode_messages, METH_FASTCALL,
     "encode_messages(records, limit, fallback, export_time, sequence, domain, template_id)"
     " -> (messages, oversize)"},
    {NULL, NULL, 0, NULL},
};

static PyObject *
codec_get_planned(CodecObject *self, void *closure)
{
    return PyBool_FromLong(self->plan != NULL);
}

static PyObject *
codec_get_eplanned(CodecObject *self, void *closure)
{
    return PyBool_FromLong(self->eplan != NULL);
}

static PyGetSetDef codec_getset[] = {
    {"_planned", (getter)codec_get_planned, NULL, "whether sets are decoded by the fixed-length plan (for tests)", NULL},
    {"_eplanned", (getter)codec_get_eplanned, NULL, "whether batches are encoded by the fixed-length plan (for tests)", NULL},
    {"min_length", (getter)codec_get_min_length, NULL, "octets of the shortest record", NULL},
    {"fixed_length", (getter)codec_get_fixed_length, NULL, "octets of every record, or None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CodecType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "flowscope.ipfix._speedups.Codec",
    .tp_basicsize = sizeof(CodecObject),
    .tp_dealloc = (destructor)codec_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The compiled reader and writer of one template layout.",
    .tp_methods = codec_methods,
    .tp_getset = codec_getset,
    .tp_new = codec_new,
};

/* ------------------------------------------------------------------ data_records
 *
 * DataRecords(sets): the iterator of Message.data_records, every (template, record) of
 * `sets` (a list of (template, records list) tuples), in order. What the twin's
 * chain.from_iterable(zip(repeat(template), records) ...) gives, in one call per record
 * instead of four (chain, zip, repeat, the list's iterator). Each records list is read
 * as it is at each step, as a list iterator reads it; as zip does, the result tuple is
 * reused when no one else holds it. */
typedef struct {
    PyObject_HEAD
    PyObject *sets;  /* list of (template, list) tuples */
    Py_ssize_t set;  /* the set being read */
    Py_ssize_t next; /* its next record */
    PyObject *result;
} DataRecordsObject;

static PyTypeObject DataRecordsType;

static PyObject *
data_records_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *sets;
    if ((kwds != NULL && PyDict_GET_SIZE(kwds) != 0) || !PyArg_ParseTuple(args, "O!:DataRecords", &PyList_Type, &sets)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "DataRecords takes no keyword arguments");
        }
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(sets); i++) {
        PyObject *t = PyList_GET_ITEM(sets, i);
        if (!PyTuple_CheckExact(t) || PyTuple_GET_SIZE(t) != 2 || !PyList_CheckExact(PyTuple_GET_ITEM(t, 1))) {
            PyErr_SetString(PyExc_TypeError, "DataRecords takes a list of (template, list of records)");
            return NULL;
        }
    }
    PyObject *result = PyTuple_Pack(2, Py_None, Py_None);
    if (result == NULL) {
        return NULL;
    }
    DataRecordsObject *self = PyObject_GC_New(DataRecordsObject, type);
    if (self == NULL) {
        Py_DECREF(result);
        return NULL;
    }
    /* a copy: the sets iterated are the sets as they were passed */
    self->sets = PyList_GetSlice(sets, 0, PyList_GET_SIZE(sets));
    if (self->sets == NULL) {
        Py_DECREF(result);
        self->result = NULL;
        Py_DECREF(self);
        return NULL;
    }
    self->set = 0;
    self->next = 0;
    self->result = result;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyObject *
data_records_next(DataRecordsObject *self)
{
    PyObject *sets = self->sets;
    while (self->set < PyList_GET_SIZE(sets)) {
        PyObject *pair = PyList_GET_ITEM(sets, self->set);
        PyObject *records = PyTuple_GET_ITEM(pair, 1);
        if (self->next < PyList_GET_SIZE(records)) {
            PyObject *template = PyTuple_GET_ITEM(pair, 0);
            PyObject *record = PyList_GET_ITEM(records, self->next);
            self->next++;
            PyObject *result = self->result;
            if (Py_REFCNT(result) == 1) {
                Py_INCREF(result);
                PyObject *old0 = PyTuple_GET_ITEM(result, 0), *old1 = PyTuple_GET_ITEM(result, 1);
                if (old0 != template) { /* the set's template stays in place record after record */
                    PyTuple_SET_ITEM(result, 0, Py_NewRef(template));
                    Py_DECREF(old0);
                }
                PyTuple_SET_ITEM(result, 1, Py_NewRef(record));
                Py_DECREF(old1);
                if (!PyObject_GC_IsTracked(result)) { /* the collector may untrack a tuple of atoms */
                    PyObject_GC_Track(result);
                }
                return result;
            }
            return PyTuple_Pack(2, template, record);
        }
        self->set++;
        self->next = 0;
    }
    return NULL;
}

static int
data_records_traverse(DataRecordsObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->sets);
    Py_VISIT(self->result);
    return 0;
}

static int
data_records_clear(DataRecordsObject *self)
{
    Py_CLEAR(self->sets);
    Py_CLEAR(self->result);
    return 0;
}

static void
data_records_dealloc(DataRecordsObject *self)
{
    PyObject_GC_UnTrack(self);
    data_records_clear(self);
    PyObject_GC_Del(self);
}

static PyTypeObject DataRecordsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "flowscope.ipfix._speedups.DataRecords",
    .tp_basicsize = sizeof(DataRecordsObject),
    .tp_dealloc = (destructor)data_records_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "DataRecords(sets): every (template, record) of a list of (template, records), in order.",
    .tp_traverse = (traverseproc)data_records_traverse,
    .tp_clear = (inquiry)data_records_clear,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)data_records_next,
    .tp_new = data_records_new,
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "flowscope.ipfix._speedups",
    .m_doc = "C inner loops of the IPFIX record codec; template.py is the reference twin.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&CodecType) < 0 || PyType_Ready(&DataRecordsType) < 0) {
        return NULL;
    }
    init_octet_text();
    if (empty_text == NULL && (empty_text = PyUnicode_New(0, 0)) == NULL) {
        return NULL;
    }
    for (int i = 0; i <= 256; i++) {
        if (small_ints[i] == NULL && (small_ints[i] = PyLong_FromLong(i)) == NULL) {
            return NULL;
        }
    }
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Codec", (PyObject *)&CodecType) < 0 ||
        PyModule_AddObjectRef(m, "DataRecords", (PyObject *)&DataRecordsType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    static const char *names[K_COUNT] = {"UINT",    "SINT", "F32", "F64", "BOOL",    "MAC",     "SECONDS", "MILLIS",
                                         "NTP",     "IP4",  "IP6", "STR_VAR", "STR_FIX", "OCT_VAR", "OCT_FIX"};
    for (int k = 0; k < K_COUNT; k++) {
        if (PyModule_AddIntConstant(m, names[k], k) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}

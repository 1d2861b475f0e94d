/* flowscope.aggregator._aggr: the aggregation's per-record loops in C.
 *
 * Why it exists: AggregationProcess.ingest_many spends some 4-5 us a record in Python on
 * dict lookups, tuple building, integer objects and attribute traffic, the biggest stage
 * of the Flow Aggregator. This module runs the same loop (aggregator/aggregation.py,
 * AggregationProcess._ingest_py, is its pure-Python twin and the reference) over the same
 * objects: the flows dict, the Flows (this module's Flow type, below: their C fields read
 * and written in place), the process's shared-value and cost caches, its urgent list and
 * timer groups. A flow holding a value its C fields cannot (Flow.odd) is the twin's.
 *
 * Theory: compute, then commit. For each record it first checks every value is of the
 * type an agent sends (exact str / int / None where the twin would accept it, unsigned
 * 64-bit counters and times), then computes the flow's new state in locals, checking
 * every place where the twin would raise (a counter or throughput past 2^64, a switched
 * correction that goes negative). Only then does it write. Anything else - a record that
 * is no dict, lacks a field, carries an odd type or would overflow - is handed whole to
 * the twin (``fallback((rec,), exporter, domain, now, (corr_due, end_due))``), so a
 * malformed record gets exactly the twin's treatment (partial updates and all); the twin
 * adds its timers to this batch's groups, so timers keep record order. tests/aggregator/
 * test_aggregator_accel.py checks both give identical exports, stats and state on random
 * streams.
 *
 * build_record does aggregation.build_record's work for a flow (both sides' Kubernetes
 * fields merged through the process's merge cache, keyed by the two tuples' identity):
 * the values straight from the flow's fields into a copy of the layout's dict of
 * names (template order, str keys, as a dict built in Python). export does _export's:
 * that record, the counters reset, the flags, the ExportedFlow. ExportedFlows are made by
 * their type's allocator with their slots set here; configure_export checks that this
 * gives what their __init__ gives.
 *
 * Flow(key, flow_type, now): a flow (see below; aggregation.Flow is the twin's)
 * configure(twin_flow_class, v4_fields, v6_fields, meta_v4, meta_v6, labels, deltas, zero4,
 *           end_reasons, deny_actions, meta_index, constants, layouts, empty, defaults,
 *           owners, zero26)
 * ingest_many(proc, records, exporter, domain, now, fallback) -> records kept
 * build_record(flow, merge_cache) -> dict, or None (the twin's case)
 * configure_export(exported_flow_class, correlation_names)
 * export(flow, merge_cache, final) -> ExportedFlow, or None (the twin's case)
 * scan(flows, start, stop, horizon, merge_cache, out) -> (where it stopped, exported)
 * configure_snapshots(); Record; columns(flows, plan, objects); configure_ipfix(codes);
 * encode_sets(flows, limit): the export's snapshots and the sinks' reads of them (their
 * section, near the end)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <arpa/inet.h>
#include <stddef.h>

/* Flow.flags bits, as aggregation.py defines them (checked by configure's constants). */
#define HAS_SRC 1
#define HAS_DST 2
#define READY 4
#define CORRELATED 8
#define DIRTY 16
#define EXPORTED 32
#define ENDED_SRC 64
#define ENDED_DST 128
#define LONE 256
#define DENIED 512
#define QUEUED 1024
#define REMOVED 2048
#define IPV6 4096
#define END_WAIT 8192
#define NO_TWIN 16384
#define SINGLE (LONE | NO_TWIN)
#define UNTYPED 32768

#define INTRA_NODE 1
#define INTER_NODE 2
#define TO_EXTERNAL 3
#define FROM_EXTERNAL 4
#define FLOW_COST 1024
#define NC 26 /* counters of a flow */

enum { F_SRC, F_DST, F_SPORT, F_DPORT, F_PROTO, F_PT, F_OT, F_RPT, F_ROT, F_START, F_END, F_REASON, F_FT, F_TCP,
       N_FIELDS };
#define N_META_MAX 64

static PyObject *fields4[N_FIELDS], *fields6[N_FIELDS], *meta4[N_META_MAX], *meta6[N_META_MAX];
static PyObject *labels[2], *deltas[4], *zero4, *zero26, *end_reasons, *deny_actions;
static char end_reason[256], deny_action[256]; /* the two sets, for 0..255 */
static Py_ssize_t n_meta;

/* Every field name the loop reads gets an id; a record's items are walked once and each
 * key mapped to its id through a table keyed by the key object's address (the records
 * of one template share their key objects), so a record costs one pass over its items,
 * not one hash lookup per field. The table holds a reference to each key it knows (an
 * address cannot be reused while it is there) and is emptied when 3/4 full. */
#define N_IDS_MAX 160
#define KT_SIZE 1024
static PyObject *name_ids; /* dict: name -> id */
static Py_ssize_t n_ids;
static int id4[N_FIELDS], id6[N_FIELDS], mid4[N_META_MAX], mid6[N_META_MAX], lid[2], did[4];
static PyObject *kt_key[KT_SIZE];
static int kt_id[KT_SIZE], kt_used;

static void
kt_clear(void)
{
    for (int i = 0; i < KT_SIZE; i++)
        Py_CLEAR(kt_key[i]);
    kt_used = 0;
}

static void rl_clear(void); /* the maps of records read by position (below) */

/* The id of a record's key (-1: a field the loop does not read), or -2 on an error. */
static int
key_id(PyObject *k)
{
    size_t h = (((uintptr_t)k >> 4) * 0x9E3779B97F4A7C15ULL) >> 54; /* 10 bits */
    for (;;) {
        PyObject *at = kt_key[h];
        if (at == k)
            return kt_id[h];
        if (at == NULL)
            break;
        h = (h + 1) & (KT_SIZE - 1);
    }
    PyObject *v = PyDict_GetItemWithError(name_ids, k);
    if (v == NULL && PyErr_Occurred())
        return -2;
    int id = v == NULL ? -1 : (int)PyLong_AsLong(v);
    if (kt_used >= KT_SIZE * 3 / 4) {
        kt_clear();
        return id; /* cached from the next record on */
    }
    Py_INCREF(k);
    kt_key[h] = k;
    kt_id[h] = id;
    kt_used++;
    return id;
}

static int
name_id(PyObject *name)
{
    PyObject *v = PyDict_GetItemWithError(name_ids, name);
    if (v != NULL)
        return (int)PyLong_AsLong(v);
    if (PyErr_Occurred() || n_ids >= N_IDS_MAX)
        return -1;
    PyObject *id = PyLong_FromSsize_t(n_ids);
    if (id == NULL || PyDict_SetItem(name_ids, name, id) < 0) {
        Py_XDECREF(id);
        return -1;
    }
    Py_DECREF(id);
    return (int)n_ids++;
}
static Py_ssize_t i_src_pod, i_src_node, i_egress, i_dst_pod, i_dst_node, i_ingress;
static PyObject *s_flows, *s_stats, *s_shared, *s_shared_limit, *s_costs, *s_urgent, *s_corr_timeout,
    *s_max_flows, *s_max_flow_bytes, *s_flow_bytes, *s_cost, *s_push_timers;
static int configured;
/* The aggregated record's 4 layouts (flow family x exporter family): names in template
 * order, and for each the position of its value in build_record's slot order. */
#define N_OUT_MAX 96
static PyObject *out_names[4], *out_proto[4]; /* out_proto: dict.fromkeys(names), copied per record */

/* A record is a copy of its layout's out_proto with the values replaced. PyDict_SetItem
 * would find each of its 71 keys by hash again; on CPython 3.11 and 3.12, where a copied
 * dict of str keys is a "combined" table whose entries are (key, value) pairs in
 * insertion order, the values are written straight into those entries instead (as
 * ipfix/_speedups.c does for decoded records). The layout, mirrored in ipfix/_dictmirror.h, is checked by
 * configure for each layout (out_direct) and on every copy; anything else takes the
 * PyDict_SetItem way. */
#include "_dictmirror.h"
#include "_colout.h" /* columns(): the output columns, as collector/_rowcols.c fills them */
static int out_direct[4];

/* Whether layout i's copies can be written in place: the entries hold its names in order,
 * each value None, and a value written there is what a lookup then finds. */
static int
check_direct(int i)
{
    PyObject *d = PyDict_Copy(out_proto[i]);
    if (d == NULL)
        return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(out_names[i]);
    UnicodeEntryMirror *e = direct_entries(d, n);
    int ok = e != NULL && n > 0;
    for (Py_ssize_t j = 0; ok && j < n; j++)
        ok = e[j].me_key == PyTuple_GET_ITEM(out_names[i], j) && e[j].me_value == Py_None;
    if (ok) {
        PyObject *probe = PyLong_FromLong(12345);
        if (probe == NULL) {
            Py_DECREF(d);
            return -1;
        }
        Py_DECREF(e[n - 1].me_value);
        e[n - 1].me_value = probe;
        ok = PyDict_GetItemWithError(d, PyTuple_GET_ITEM(out_names[i], n - 1)) == probe && PyDict_GET_SIZE(d) == n;
        PyErr_Clear();
    }
    Py_DECREF(d);
    return ok;
}
static Py_ssize_t out_order[4][N_OUT_MAX], n_out;
static PyObject *zero_addr; /* "0.0.0.0": a flow's exporter when it has none */
static PyObject *empty_values, *meta_defaults[2]; /* aggregation._EMPTY, _META_DEFAULTS */
static int owner_of[N_META_MAX + 2];
#define CACHED_COST 1024

/* A non-negative exact int of at most two 30-bit digits read straight from its digits
 * (CPython 3.11's layout, longintrepr.h): 1 and *out set, or 0 for any other (the
 * caller then asks the C API). The ingest reads some 20 ints a record this way. */
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000 && PYLONG_BITS_IN_DIGIT == 30
static inline int
digits_u60(PyObject *v, uint64_t *out)
{
    Py_ssize_t n = Py_SIZE(v);
    const digit *d = ((PyLongObject *)v)->ob_digit;
    if (n == 0) {
        *out = 0;
        return 1;
    }
    if (n == 1) {
        *out = d[0];
        return 1;
    }
    if (n == 2) {
        *out = (uint64_t)d[0] | ((uint64_t)d[1] << PyLong_SHIFT);
        return 1;
    }
    return 0;
}
#else
static inline int
digits_u60(PyObject *v, uint64_t *out)
{
    (void)v;
    (void)out;
    return 0;
}
#endif

/* An exact int in 0..2^64-1 into *out; 0 when it is anything else (no error set). */
static int
as_u64(PyObject *v, uint64_t *out)
{
    if (!PyLong_CheckExact(v))
        return 0;
    if (digits_u60(v, out))
        return 1;
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *out = x;
    return 1;
}

static int
as_long(PyObject *v, long *out)
{
    if (!PyLong_CheckExact(v))
        return 0;
    uint64_t u;
    if (digits_u60(v, &u)) {
        *out = (long)u;
        return 1;
    }
    int overflow;
    long x = PyLong_AsLongAndOverflow(v, &overflow);
    if (overflow || (x == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    *out = x;
    return 1;
}

/* Truth of a validated meta value (None, exact str, exact int). */
static inline int
truthy(PyObject *v)
{
    if (v == Py_None)
        return 0;
    if (PyUnicode_CheckExact(v))
        return PyUnicode_GET_LENGTH(v) != 0;
    return PyObject_IsTrue(v); /* an exact int: cannot fail */
}

static uint64_t *u64_buffer(PyObject *o, Py_buffer *view, Py_ssize_t n);

/* The Flow type: one connection's state, with its counters inline.
 *
 * What aggregation.Flow (the pure-Python twin's class, slots and an array('Q')) holds,
 * in one object of some 310 bytes: no GC header (it is not tracked: what it refers to
 * never refers back), no counter array object, no key tuple (the flows dict is keyed by
 * the Flow itself: its hash and equality are its 5-tuple's, so a lookup by a key tuple
 * finds it), the ports, protocol, flags, reasons, types and observation domains as C
 * integers, the seconds in 32 bits. Every attribute reads and writes as the twin's do
 * (``key``, ``flow_type``, ``flags``, ``c`` (a view of the 26 counters that indexes,
 * slices, assigns and lists like the array), ``smeta``, ``dmeta``, ``sexp``, ``dexp``,
 * ``sdom``, ``ddom``, ``reason``, ``tcp_state``, ``last_seen``, ``sw``, ``correlation``),
 * so the twin's code runs on it unchanged. A value that is not what an agent sends (an
 * int of another range or type, a second past 2^32: only the twin, taking a malformed
 * record, writes one) is kept exactly, in the ``odd`` dict, and the C loops hand a flow
 * that has one to the twin: the compact form is used only where it is provably exact. */
typedef struct {
    PyObject_HEAD
    PyObject *src, *dst; /* the key's addresses (exact str); with sport, dport, proto the key */
    PyObject *smeta, *dmeta, *sexp, *dexp, *tcp, *last_seen, *sw;
    PyObject *odd; /* NULL, or a dict of the attributes held as objects (see above) */
    uint64_t n[22]; /* the counters at positions 0-15 and 18-23 */
    uint32_t s[4];  /* positions 16, 17, 24, 25: seconds (flowEndSeconds per side, the newest start, end) */
    uint32_t sdom, ddom, flags;
    uint16_t sport, dport;
    uint8_t proto, reason, flow_type;
} FlowObject;

static PyTypeObject FlowType;
#define IS_FLOW(o) Py_IS_TYPE((o), &FlowType)
#define FL(o) ((FlowObject *)(o))

enum { A_KEY, A_FLOW_TYPE, A_FLAGS, A_SDOM, A_SDOM_D, A_REASON, N_ODD_NAMES };
static const char *odd_name_s[N_ODD_NAMES] = {"key", "flow_type", "flags", "sdom", "ddom", "reason"};
static PyObject *odd_name[N_ODD_NAMES];

static inline int
c_is32(Py_ssize_t i)
{
    return i == 16 || i == 17 || i == 24 || i == 25;
}

/* The raw slot of counter i: in n (64 bits) or s (32). */
static inline uint64_t
c_raw(const FlowObject *f, Py_ssize_t i)
{
    if (i < 16)
        return f->n[i];
    if (i < 18)
        return f->s[i - 16];
    if (i < 24)
        return f->n[i - 2];
    return f->s[i - 22];
}

/* The 26 counters as the twin's array holds them (a flow without odd values). */
static inline void
load_c(const FlowObject *f, uint64_t *c)
{
    memcpy(c, f->n, 16 * 8);
    c[16] = f->s[0];
    c[17] = f->s[1];
    memcpy(c + 18, f->n + 16, 6 * 8);
    c[24] = f->s[2];
    c[25] = f->s[3];
}

/* ...and back: the caller checked the seconds fit in 32 bits. */
static inline void
store_c(FlowObject *f, const uint64_t *c)
{
    memcpy(f->n, c, 16 * 8);
    f->s[0] = (uint32_t)c[16];
    f->s[1] = (uint32_t)c[17];
    memcpy(f->n + 16, c + 18, 6 * 8);
    f->s[2] = (uint32_t)c[24];
    f->s[3] = (uint32_t)c[25];
}

static int
odd_set(FlowObject *f, PyObject *name, PyObject *v)
{
    if (f->odd == NULL && (f->odd = PyDict_New()) == NULL)
        return -1;
    return PyDict_SetItem(f->odd, name, v);
}

static int
odd_del(FlowObject *f, PyObject *name)
{
    if (f->odd == NULL)
        return 0;
    PyObject *v = PyDict_GetItemWithError(f->odd, name);
    if (v == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (PyDict_DelItem(f->odd, name) < 0)
        return -1;
    if (PyDict_GET_SIZE(f->odd) == 0)
        Py_CLEAR(f->odd);
    return 0;
}

/* odd[name] if the flow holds that attribute as an object: a borrowed reference, NULL
 * when it does not (no error), or NULL with an error. */
static inline PyObject *
odd_get(const FlowObject *f, PyObject *name)
{
    return f->odd == NULL ? NULL : PyDict_GetItemWithError(f->odd, name);
}

/* The key tuple (src, dst, sport, dport, proto): a new reference. */
static PyObject *
flow_key(FlowObject *f)
{
    PyObject *k = odd_get(f, odd_name[A_KEY]);
    if (k != NULL) {
        Py_INCREF(k);
        return k;
    }
    if (PyErr_Occurred())
        return NULL;
    PyObject *sp = PyLong_FromLong(f->sport), *dp = PyLong_FromLong(f->dport), *pr = PyLong_FromLong(f->proto);
    PyObject *t = sp && dp && pr ? PyTuple_Pack(5, f->src, f->dst, sp, dp, pr) : NULL;
    Py_XDECREF(sp);
    Py_XDECREF(dp);
    Py_XDECREF(pr);
    return t;
}

/* An exact int in 0..max into *out; 0 (no error set) when it is anything else. */
static int
small_uint(PyObject *v, unsigned long max, unsigned long *out)
{
    if (!PyLong_CheckExact(v))
        return 0;
    uint64_t u;
    if (digits_u60(v, &u)) {
        if (u > max)
            return 0;
        *out = (unsigned long)u;
        return 1;
    }
    int overflow;
    long x = PyLong_AsLongAndOverflow(v, &overflow);
    if (overflow || x < 0 || (unsigned long)x > max) {
        PyErr_Clear();
        return 0;
    }
    *out = (unsigned long)x;
    return 1;
}

/* Set the key: native when it is what the C loop makes (exact str addresses, exact int
 * ports and protocol in range), else held whole in odd. */
static int
flow_set_key(FlowObject *f, PyObject *key)
{
    unsigned long sp, dp, pr;
    if (PyTuple_CheckExact(key) && PyTuple_GET_SIZE(key) == 5 && PyUnicode_CheckExact(PyTuple_GET_ITEM(key, 0)) &&
        PyUnicode_CheckExact(PyTuple_GET_ITEM(key, 1)) && small_uint(PyTuple_GET_ITEM(key, 2), 65535, &sp) &&
        small_uint(PyTuple_GET_ITEM(key, 3), 65535, &dp) && small_uint(PyTuple_GET_ITEM(key, 4), 255, &pr)) {
        Py_INCREF(PyTuple_GET_ITEM(key, 0));
        Py_INCREF(PyTuple_GET_ITEM(key, 1));
        Py_XSETREF(f->src, PyTuple_GET_ITEM(key, 0));
        Py_XSETREF(f->dst, PyTuple_GET_ITEM(key, 1));
        f->sport = (uint16_t)sp;
        f->dport = (uint16_t)dp;
        f->proto = (uint8_t)pr;
        return odd_del(f, odd_name[A_KEY]);
    }
    if (PyObject_Hash(key) == -1) /* a dict key: unhashable is refused here, as the dict would */
        return -1;
    Py_INCREF(Py_None);
    Py_XSETREF(f->src, Py_None);
    Py_INCREF(Py_None);
    Py_XSETREF(f->dst, Py_None);
    return odd_set(f, odd_name[A_KEY], key);
}

/* The small integer attributes: their native field, its range and its odd name. */
static void *
int_field(FlowObject *f, int which, unsigned long *max, int *width)
{
    switch (which) {
    case A_FLOW_TYPE: *max = 255; *width = 1; return &f->flow_type;
    case A_REASON: *max = 255; *width = 1; return &f->reason;
    case A_FLAGS: *max = UINT32_MAX; *width = 4; return &f->flags;
    case A_SDOM: *max = UINT32_MAX; *width = 4; return &f->sdom;
    default: *max = UINT32_MAX; *width = 4; return &f->ddom;
    }
}

static PyObject *
flow_get_int(PyObject *self, void *closure)
{
    FlowObject *f = FL(self);
    int which = (int)(intptr_t)closure;
    PyObject *v = odd_get(f, odd_name[which]);
    if (v != NULL) {
        Py_INCREF(v);
        return v;
    }
    if (PyErr_Occurred())
        return NULL;
    unsigned long max;
    int width;
    void *p = int_field(f, which, &max, &width);
    return PyLong_FromUnsignedLong(width == 1 ? *(uint8_t *)p : *(uint32_t *)p);
}

static int
flow_set_int(PyObject *self, PyObject *v, void *closure)
{
    FlowObject *f = FL(self);
    int which = (int)(intptr_t)closure;
    if (v == NULL) {
        PyErr_Format(PyExc_AttributeError, "Flow.%s cannot be deleted", odd_name_s[which]);
        return -1;
    }
    unsigned long max, x;
    int width;
    void *p = int_field(f, which, &max, &width);
    if (small_uint(v, max, &x)) {
        if (width == 1)
            *(uint8_t *)p = (uint8_t)x;
        else
            *(uint32_t *)p = (uint32_t)x;
        return odd_del(f, odd_name[which]);
    }
    if (width == 1)
        *(uint8_t *)p = 0;
    else
        *(uint32_t *)p = 0;
    return odd_set(f, odd_name[which], v);
}

enum { O_SMETA, O_DMETA, O_SEXP, O_DEXP, O_TCP, O_LAST_SEEN, O_SW };

static PyObject **
obj_field(FlowObject *f, int which)
{
    switch (which) {
    case O_SMETA: return &f->smeta;
    case O_DMETA: return &f->dmeta;
    case O_SEXP: return &f->sexp;
    case O_DEXP: return &f->dexp;
    case O_TCP: return &f->tcp;
    case O_LAST_SEEN: return &f->last_seen;
    default: return &f->sw;
    }
}

static PyObject *
flow_get_obj(PyObject *self, void *closure)
{
    PyObject *v = *obj_field(FL(self), (int)(intptr_t)closure);
    Py_INCREF(v);
    return v;
}

static int
flow_set_obj(PyObject *self, PyObject *v, void *closure)
{
    if (v == NULL) {
        PyErr_SetString(PyExc_AttributeError, "a Flow's attributes cannot be deleted");
        return -1;
    }
    PyObject **p = obj_field(FL(self), (int)(intptr_t)closure);
    Py_INCREF(v);
    Py_SETREF(*p, v);
    return 0;
}

static PyObject *
flow_get_key(PyObject *self, void *closure)
{
    return flow_key(FL(self));
}

static PyObject *correlation_of(long ft, long f);
static PyObject *corr_names[7];
static PyObject *correlation_py; /* aggregation.Flow.correlation's getter: for a flow with odd values */

static PyObject *
flow_get_correlation(PyObject *self, void *closure)
{
    FlowObject *f = FL(self);
    if (f->odd == NULL && corr_names[0] != NULL) { /* configure_export gave the names */
        PyObject *r = correlation_of(f->flow_type, (long)f->flags);
        Py_INCREF(r);
        return r;
    }
    if (correlation_py == NULL) { /* not configured (the twin serves): the twin's rule, found here */
        PyObject *m = PyImport_ImportModule("flowscope.aggregator.aggregation");
        PyObject *cls = m ? PyObject_GetAttrString(m, "Flow") : NULL;
        PyObject *prop = cls ? PyObject_GetAttrString(cls, "correlation") : NULL;
        Py_XDECREF(m);
        Py_XDECREF(cls);
        correlation_py = prop ? PyObject_GetAttrString(prop, "fget") : NULL;
        Py_XDECREF(prop);
        if (correlation_py == NULL)
            return NULL;
    }
    return PyObject_CallOneArg(correlation_py, self);
}

/* ---- the counters' view: Flow.c -------------------------------------------------- */
typedef struct {
    PyObject_HEAD
    FlowObject *flow;
} CountersObject;

static PyTypeObject CountersType;

static PyObject *
c_get(FlowObject *f, Py_ssize_t i)
{
    if (c_is32(i) && f->odd != NULL) {
        PyObject *k = PyLong_FromSsize_t(i), *v = k ? PyDict_GetItemWithError(f->odd, k) : NULL;
        Py_XDECREF(k);
        if (v != NULL) {
            Py_INCREF(v);
            return v;
        }
        if (PyErr_Occurred())
            return NULL;
    }
    return PyLong_FromUnsignedLongLong(c_raw(f, i));
}

/* Counter i = v, as array('Q') takes it: an integer (or __index__) in 0..2^64-1, else
 * TypeError / OverflowError; a second past 2^32 is kept in odd. */
static int
c_set(FlowObject *f, Py_ssize_t i, PyObject *v)
{
    PyObject *iv = PyNumber_Index(v);
    if (iv == NULL)
        return -1;
    unsigned long long x = PyLong_AsUnsignedLongLong(iv);
    Py_DECREF(iv);
    if (x == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (i < 16) {
        f->n[i] = x;
        return 0;
    }
    if (i >= 18 && i < 24) {
        f->n[i - 2] = x;
        return 0;
    }
    uint32_t *p = &f->s[i < 18 ? i - 16 : i - 22];
    PyObject *k = PyLong_FromSsize_t(i);
    if (k == NULL)
        return -1;
    int r;
    if (x <= UINT32_MAX) {
        *p = (uint32_t)x;
        r = odd_del(f, k);
    } else {
        *p = 0;
        PyObject *xv = PyLong_FromUnsignedLongLong(x);
        r = xv ? odd_set(f, k, xv) : -1;
        Py_XDECREF(xv);
    }
    Py_DECREF(k);
    return r;
}

static Py_ssize_t
counters_len(PyObject *self)
{
    return NC;
}

static PyObject *
counters_list(FlowObject *f, Py_ssize_t start, Py_ssize_t stop, Py_ssize_t step, Py_ssize_t n)
{
    PyObject *l = PyList_New(n);
    if (l == NULL)
        return NULL;
    for (Py_ssize_t j = 0, i = start; j < n; j++, i += step) {
        PyObject *v = c_get(f, i);
        if (v == NULL) {
            Py_DECREF(l);
            return NULL;
        }
        PyList_SET_ITEM(l, j, v);
    }
    return l;
}

static PyObject *
counters_item(PyObject *self, Py_ssize_t i)
{
    if (i < 0 || i >= NC) {
        PyErr_SetString(PyExc_IndexError, "array index out of range");
        return NULL;
    }
    return c_get(((CountersObject *)self)->flow, i);
}

static PyObject *
counters_subscript(PyObject *self, PyObject *item)
{
    FlowObject *f = ((CountersObject *)self)->flow;
    if (PyIndex_Check(item)) {
        Py_ssize_t i = PyNumber_AsSsize_t(item, PyExc_IndexError);
        if (i == -1 && PyErr_Occurred())
            return NULL;
        if (i < 0)
            i += NC;
        return counters_item(self, i);
    }
    if (PySlice_Check(item)) { /* a list of the values (the twin's code lists, never keeps, slices) */
        Py_ssize_t start, stop, step;
        if (PySlice_Unpack(item, &start, &stop, &step) < 0)
            return NULL;
        Py_ssize_t n = PySlice_AdjustIndices(NC, &start, &stop, step);
        return counters_list(f, start, stop, step, n);
    }
    PyErr_SetString(PyExc_TypeError, "array indices must be integers");
    return NULL;
}

static int
counters_ass_subscript(PyObject *self, PyObject *item, PyObject *value)
{
    FlowObject *f = ((CountersObject *)self)->flow;
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "a Flow's counters cannot be deleted");
        return -1;
    }
    if (PyIndex_Check(item)) {
        Py_ssize_t i = PyNumber_AsSsize_t(item, PyExc_IndexError);
        if (i == -1 && PyErr_Occurred())
            return -1;
        if (i < 0)
            i += NC;
        if (i < 0 || i >= NC) {
            PyErr_SetString(PyExc_IndexError, "array assignment index out of range");
            return -1;
        }
        return c_set(f, i, value);
    }
    if (!PySlice_Check(item)) {
        PyErr_SetString(PyExc_TypeError, "array indices must be integers");
        return -1;
    }
    Py_ssize_t start, stop, step;
    if (PySlice_Unpack(item, &start, &stop, &step) < 0)
        return -1;
    Py_ssize_t n = PySlice_AdjustIndices(NC, &start, &stop, step);
    PyObject *seq = PySequence_Fast(value, "can only assign a sequence to a Flow's counters");
    if (seq == NULL)
        return -1;
    if (PySequence_Fast_GET_SIZE(seq) != n) { /* the array would change size: a Flow's cannot */
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "a Flow has 26 counters: a slice assignment must keep their number");
        return -1;
    }
    for (Py_ssize_t j = 0, i = start; j < n; j++, i += step) {
        if (c_set(f, i, PySequence_Fast_GET_ITEM(seq, j)) < 0) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    return 0;
}

static PyObject *
counters_tolist(PyObject *self, PyObject *unused)
{
    return counters_list(((CountersObject *)self)->flow, 0, NC, 1, NC);
}

static PyObject *
counters_iter(PyObject *self)
{
    PyObject *l = counters_tolist(self, NULL);
    if (l == NULL)
        return NULL;
    PyObject *it = PyObject_GetIter(l);
    Py_DECREF(l);
    return it;
}

static PyObject *
counters_richcompare(PyObject *self, PyObject *other, int op)
{
    PyObject *a = counters_tolist(self, NULL);
    if (a == NULL)
        return NULL;
    PyObject *b = Py_IS_TYPE(other, &CountersType) ? counters_tolist(other, NULL) : PySequence_List(other);
    if (b == NULL) {
        PyErr_Clear();
        Py_DECREF(a);
        Py_RETURN_NOTIMPLEMENTED;
    }
    PyObject *r = PyObject_RichCompare(a, b, op);
    Py_DECREF(a);
    Py_DECREF(b);
    return r;
}

static void
counters_dealloc(PyObject *self)
{
    Py_XDECREF(((CountersObject *)self)->flow);
    PyObject_Free(self);
}

static PyObject *
counters_repr(PyObject *self)
{
    PyObject *l = counters_tolist(self, NULL);
    if (l == NULL)
        return NULL;
    PyObject *r = PyUnicode_FromFormat("Flow.c(%R)", l);
    Py_DECREF(l);
    return r;
}

static PyMethodDef counters_methods[] = {
    {"tolist", counters_tolist, METH_NOARGS, "The 26 counters as a list of ints (as array.tolist)."},
    {NULL, NULL, 0, NULL},
};
static PySequenceMethods counters_as_sequence = {.sq_length = counters_len, .sq_item = counters_item};
static PyMappingMethods counters_as_mapping = {.mp_length = counters_len, .mp_subscript = counters_subscript,
                                               .mp_ass_subscript = counters_ass_subscript};
static PyTypeObject CountersType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "flowscope.aggregator._aggr.Counters",
    .tp_basicsize = sizeof(CountersObject),
    .tp_dealloc = counters_dealloc,
    .tp_repr = counters_repr,
    .tp_as_sequence = &counters_as_sequence,
    .tp_as_mapping = &counters_as_mapping,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A view of a Flow's 26 counters that reads and writes as array('Q') does.",
    .tp_richcompare = counters_richcompare,
    .tp_iter = counters_iter,
    .tp_methods = counters_methods,
};

static PyObject *
flow_get_c(PyObject *self, void *closure)
{
    CountersObject *v = PyObject_New(CountersObject, &CountersType);
    if (v == NULL)
        return NULL;
    Py_INCREF(self);
    v->flow = FL(self);
    return (PyObject *)v;
}

/* ---- the Flow type --------------------------------------------------------------- */
static PyObject *empty_str, *int_zero;

/* A new Flow as aggregation.Flow(key, flow_type, now) makes one. */
/* A fresh Flow: no counters, every object field None (tcp ""), last seen ``now``. */
static FlowObject *
flow_alloc(PyObject *now)
{
    FlowObject *f = (FlowObject *)PyObject_Malloc(sizeof(FlowObject));
    if (f == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memset((char *)f + sizeof(PyObject), 0, sizeof(FlowObject) - sizeof(PyObject));
    PyObject_Init((PyObject *)f, &FlowType);
    PyObject **objs[] = {&f->src, &f->dst, &f->smeta, &f->dmeta, &f->sexp, &f->dexp, &f->sw};
    for (size_t i = 0; i < sizeof objs / sizeof objs[0]; i++) {
        Py_INCREF(Py_None);
        *objs[i] = Py_None;
    }
    Py_INCREF(empty_str);
    f->tcp = empty_str;
    Py_INCREF(now);
    f->last_seen = now;
    return f;
}

static PyObject *
flow_make(PyObject *key, PyObject *flow_type, PyObject *now)
{
    FlowObject *f = flow_alloc(now);
    if (f == NULL)
        return NULL;
    if (flow_set_key(f, key) < 0 || flow_set_int((PyObject *)f, flow_type, (void *)(intptr_t)A_FLOW_TYPE) < 0) {
        Py_DECREF(f);
        return NULL;
    }
    return (PyObject *)f;
}

/* A new Flow of a key the C loop validated (what flow_make gives for that key). */
static PyObject *
flow_native(PyObject *src, PyObject *dst, uint16_t sport, uint16_t dport, uint8_t proto, uint8_t flow_type,
            PyObject *now)
{
    FlowObject *f = flow_alloc(now);
    if (f == NULL)
        return NULL;
    Py_INCREF(src);
    Py_SETREF(f->src, src);
    Py_INCREF(dst);
    Py_SETREF(f->dst, dst);
    f->sport = sport;
    f->dport = dport;
    f->proto = proto;
    f->flow_type = flow_type;
    return (PyObject *)f;
}

static PyObject *
flow_new(PyTypeObject *tp, PyObject *args, PyObject *kw)
{
    PyObject *key, *flow_type, *now;
    static char *kwlist[] = {"key", "flow_type", "now", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO:Flow", kwlist, &key, &flow_type, &now))
        return NULL;
    return flow_make(key, flow_type, now);
}

static void
flow_dealloc(PyObject *self)
{
    FlowObject *f = FL(self);
    Py_XDECREF(f->src);
    Py_XDECREF(f->dst);
    Py_XDECREF(f->smeta);
    Py_XDECREF(f->dmeta);
    Py_XDECREF(f->sexp);
    Py_XDECREF(f->dexp);
    Py_XDECREF(f->tcp);
    Py_XDECREF(f->last_seen);
    Py_XDECREF(f->sw);
    Py_XDECREF(f->odd);
    PyObject_Free(self);
}

/* Hashed and compared as its key tuple (the flows dict is keyed by the Flow). */
static Py_hash_t
flow_hash(PyObject *self)
{
    PyObject *k = flow_key(FL(self));
    if (k == NULL)
        return -1;
    Py_hash_t h = PyObject_Hash(k);
    Py_DECREF(k);
    return h;
}

static inline int
eq_uint(unsigned long mine, PyObject *theirs) /* 1, 0, -1 */
{
    unsigned long x;
    if (small_uint(theirs, ULONG_MAX >> 1, &x))
        return x == mine;
    PyObject *m = PyLong_FromUnsignedLong(mine);
    if (m == NULL)
        return -1;
    int r = PyObject_RichCompareBool(m, theirs, Py_EQ);
    Py_DECREF(m);
    return r;
}

static PyObject *
flow_richcompare(PyObject *self, PyObject *other, int op)
{
    if (op != Py_EQ && op != Py_NE)
        Py_RETURN_NOTIMPLEMENTED;
    FlowObject *f = FL(self);
    int eq;
    if (IS_FLOW(other) && f->odd == NULL && FL(other)->odd == NULL) {
        /* two keys of C fields (the ingest's lookup: flows.get with its probe Flow) */
        FlowObject *g = FL(other);
        eq = f->sport == g->sport && f->dport == g->dport && f->proto == g->proto;
        if (eq > 0)
            eq = PyObject_RichCompareBool(f->src, g->src, Py_EQ);
        if (eq > 0)
            eq = PyObject_RichCompareBool(f->dst, g->dst, Py_EQ);
        if (eq < 0)
            return NULL;
        if ((op == Py_EQ) == (eq > 0))
            Py_RETURN_TRUE;
        Py_RETURN_FALSE;
    }
    if (IS_FLOW(other) || f->odd != NULL || !PyTuple_CheckExact(other) || PyTuple_GET_SIZE(other) != 5) {
        if (!IS_FLOW(other) && !PyTuple_Check(other))
            Py_RETURN_NOTIMPLEMENTED;
        PyObject *a = flow_key(f), *b = IS_FLOW(other) ? flow_key(FL(other)) : (Py_INCREF(other), other);
        eq = a && b ? PyObject_RichCompareBool(a, b, Py_EQ) : -1;
        Py_XDECREF(a);
        Py_XDECREF(b);
    } else { /* the lookup of a key tuple: compared item by item, as tuples compare */
        eq = PyObject_RichCompareBool(f->src, PyTuple_GET_ITEM(other, 0), Py_EQ);
        if (eq > 0)
            eq = PyObject_RichCompareBool(f->dst, PyTuple_GET_ITEM(other, 1), Py_EQ);
        if (eq > 0)
            eq = eq_uint(f->sport, PyTuple_GET_ITEM(other, 2));
        if (eq > 0)
            eq = eq_uint(f->dport, PyTuple_GET_ITEM(other, 3));
        if (eq > 0)
            eq = eq_uint(f->proto, PyTuple_GET_ITEM(other, 4));
    }
    if (eq < 0)
        return NULL;
    if ((op == Py_EQ) == (eq > 0))
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

static PyObject *
flow_repr(PyObject *self)
{
    PyObject *k = flow_key(FL(self));
    if (k == NULL)
        return NULL;
    PyObject *r = PyUnicode_FromFormat("Flow(%R, flags=%u)", k, (unsigned)FL(self)->flags);
    Py_DECREF(k);
    return r;
}

static PyObject *
flow_sizeof(PyObject *self, PyObject *unused)
{
    Py_ssize_t n = sizeof(FlowObject);
    if (FL(self)->odd != NULL)
        n += _PyObject_SIZE(Py_TYPE(FL(self)->odd));
    return PyLong_FromSsize_t(n);
}

static PyObject *
flow_odd(PyObject *self, void *closure)
{
    /* the attributes held as objects (a copy), for the tests */
    return FL(self)->odd == NULL ? PyDict_New() : PyDict_Copy(FL(self)->odd);
}

#define INT_ATTR(name, which, doc) {name, flow_get_int, flow_set_int, doc, (void *)(intptr_t)(which)}
#define OBJ_ATTR(name, which, doc) {name, flow_get_obj, flow_set_obj, doc, (void *)(intptr_t)(which)}
static PyGetSetDef flow_getset[] = {
    {"key", flow_get_key, NULL, "The 5-tuple (source IP, destination IP, source port, destination port, protocol).", NULL},
    INT_ATTR("flow_type", A_FLOW_TYPE, "flowType"),
    INT_ATTR("flags", A_FLAGS, "aggregation's flag bits"),
    {"c", flow_get_c, NULL, "The 26 counters (a view that reads and writes as aggregation.Flow's array).", NULL},
    OBJ_ATTR("smeta", O_SMETA, "the source side's Kubernetes fields (a shared tuple) or None"),
    OBJ_ATTR("dmeta", O_DMETA, "the destination side's Kubernetes fields (a shared tuple) or None"),
    OBJ_ATTR("sexp", O_SEXP, "the source side's exporter address or None"),
    OBJ_ATTR("dexp", O_DEXP, "the destination side's exporter address or None"),
    INT_ATTR("sdom", A_SDOM, "the source side's observation domain"),
    INT_ATTR("ddom", A_SDOM_D, "the destination side's observation domain"),
    INT_ATTR("reason", A_REASON, "the newest record's flowEndReason"),
    OBJ_ATTR("tcp_state", O_TCP, "the newest record's tcpState"),
    OBJ_ATTR("last_seen", O_LAST_SEEN, "when the last record came (the caller's clock)"),
    OBJ_ATTR("sw", O_SW, "the switched correction (array('Q') of 4) or None"),
    {"correlation", flow_get_correlation, NULL, "How complete the record is (aggregation.Flow.correlation).", NULL},
    {"odd", flow_odd, NULL, "The attributes held as objects, not in C fields (a copy).", NULL},
    {NULL},
};
static PyMethodDef flow_methods[] = {
    {"__sizeof__", flow_sizeof, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};
static PyTypeObject FlowType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "flowscope.aggregator._aggr.Flow",
    .tp_basicsize = sizeof(FlowObject),
    .tp_dealloc = flow_dealloc,
    .tp_repr = flow_repr,
    .tp_hash = flow_hash,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Flow(key, flow_type, now): one connection's state, counters inline (see aggregation.Flow).",
    .tp_richcompare = flow_richcompare,
    .tp_methods = flow_methods,
    .tp_getset = flow_getset,
    .tp_new = flow_new,
};

static PyObject *
configure(PyObject *self, PyObject *args)
{
    PyObject *cls, *f4, *f6, *m4, *m6, *lab, *dl, *z4, *ends, *deny, *idx, *consts, *layouts, *empty, *defaults,
        *owners, *z26;
    if (!PyArg_ParseTuple(args, "OO!O!O!O!O!O!OOOO!O!O!OO!O!O", &cls, &PyTuple_Type, &f4, &PyTuple_Type, &f6,
                          &PyTuple_Type, &m4, &PyTuple_Type, &m6, &PyTuple_Type, &lab, &PyTuple_Type, &dl, &z4, &ends,
                          &deny, &PyTuple_Type, &idx, &PyDict_Type, &consts, &PyTuple_Type, &layouts, &empty,
                          &PyTuple_Type, &defaults, &PyTuple_Type, &owners, &z26))
        return NULL;
    Py_INCREF(z26);
    Py_XSETREF(zero26, z26);
    if (!PyFrozenSet_CheckExact(empty) || PyTuple_GET_SIZE(defaults) != 2 ||
        PyTuple_GET_SIZE(owners) != PyTuple_GET_SIZE(m4) + 2) {
        PyErr_SetString(PyExc_ValueError, "configure: merge tables of unexpected shapes");
        return NULL;
    }
    for (int i = 0; i < 2; i++) {
        PyObject *d = PyTuple_GET_ITEM(defaults, i);
        if (!PyTuple_CheckExact(d) || PyTuple_GET_SIZE(d) != PyTuple_GET_SIZE(m4) + 2) {
            PyErr_SetString(PyExc_ValueError, "configure: merge defaults of unexpected shapes");
            return NULL;
        }
        Py_INCREF(d);
        Py_XSETREF(meta_defaults[i], d);
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(owners); i++)
        owner_of[i] = PyObject_IsTrue(PyTuple_GET_ITEM(owners, i));
    Py_INCREF(empty);
    Py_XSETREF(empty_values, empty);
    if (PyTuple_GET_SIZE(layouts) != 4) {
        PyErr_SetString(PyExc_ValueError, "configure: 4 record layouts expected");
        return NULL;
    }
    n_out = -1;
    for (int i = 0; i < 4; i++) {
        PyObject *pair = PyTuple_GET_ITEM(layouts, i), *nm, *ord;
        if (!PyArg_ParseTuple(pair, "O!O!", &PyTuple_Type, &nm, &PyTuple_Type, &ord))
            return NULL;
        Py_ssize_t n = PyTuple_GET_SIZE(nm);
        if (n != PyTuple_GET_SIZE(ord) || n > N_OUT_MAX || (n_out >= 0 && n != n_out)) {
            PyErr_SetString(PyExc_ValueError, "configure: record layouts of unexpected sizes");
            return NULL;
        }
        n_out = n;
        for (Py_ssize_t j = 0; j < n; j++) {
            out_order[i][j] = PyLong_AsSsize_t(PyTuple_GET_ITEM(ord, j));
            if (out_order[i][j] < 0 || out_order[i][j] >= n) {
                PyErr_SetString(PyExc_ValueError, "configure: a record layout position out of range");
                return NULL;
            }
        }
        Py_INCREF(nm);
        Py_XSETREF(out_names[i], nm);
        PyObject *proto = PyDict_New();
        if (proto == NULL)
            return NULL;
        for (Py_ssize_t j = 0; j < n; j++)
            if (PyDict_SetItem(proto, PyTuple_GET_ITEM(nm, j), Py_None) < 0) {
                Py_DECREF(proto);
                return NULL;
            }
        Py_XSETREF(out_proto[i], proto);
        if ((out_direct[i] = check_direct(i)) < 0)
            return NULL;
    }
    if (PyTuple_GET_SIZE(f4) != N_FIELDS || PyTuple_GET_SIZE(f6) != N_FIELDS || PyTuple_GET_SIZE(lab) != 2 ||
        PyTuple_GET_SIZE(dl) != 4 || PyTuple_GET_SIZE(m4) != PyTuple_GET_SIZE(m6) ||
        PyTuple_GET_SIZE(m4) > N_META_MAX || PyTuple_GET_SIZE(idx) != 6) {
        PyErr_SetString(PyExc_ValueError, "configure: field lists of unexpected sizes");
        return NULL;
    }
    /* The constants this file is compiled with must be the module's. */
    static const struct { const char *name; long value; } expect[] = {
        {"HAS_SRC", HAS_SRC}, {"HAS_DST", HAS_DST}, {"READY", READY}, {"CORRELATED", CORRELATED},
        {"DIRTY", DIRTY}, {"EXPORTED", EXPORTED}, {"ENDED_SRC", ENDED_SRC}, {"ENDED_DST", ENDED_DST},
        {"LONE", LONE}, {"DENIED", DENIED}, {"QUEUED", QUEUED}, {"REMOVED", REMOVED}, {"IPV6", IPV6}, {"END_WAIT", END_WAIT},
        {"NO_TWIN", NO_TWIN}, {"UNTYPED", UNTYPED}, {"INTRA_NODE", INTRA_NODE}, {"INTER_NODE", INTER_NODE},
        {"TO_EXTERNAL", TO_EXTERNAL}, {"FROM_EXTERNAL", FROM_EXTERNAL}, {"FLOW_COST", FLOW_COST}, {"NC", NC},
    };
    for (size_t i = 0; i < sizeof expect / sizeof expect[0]; i++) {
        PyObject *v = PyDict_GetItemString(consts, expect[i].name);
        if (v == NULL || !PyLong_Check(v) || PyLong_AsLong(v) != expect[i].value) {
            PyErr_Format(PyExc_ValueError, "configure: constant %s differs from the C accelerator's (%ld)",
                         expect[i].name, expect[i].value);
            return NULL;
        }
    }
    /* the twin's Flow.correlation, for a Flow holding odd values */
    PyObject *prop = PyObject_GetAttrString(cls, "correlation"), *fget = prop ? PyObject_GetAttrString(prop, "fget") : NULL;
    Py_XDECREF(prop);
    if (fget == NULL)
        return NULL;
    Py_XSETREF(correlation_py, fget);
    for (int i = 0; i < N_FIELDS; i++) {
        Py_INCREF(PyTuple_GET_ITEM(f4, i));
        Py_XSETREF(fields4[i], PyTuple_GET_ITEM(f4, i));
        Py_INCREF(PyTuple_GET_ITEM(f6, i));
        Py_XSETREF(fields6[i], PyTuple_GET_ITEM(f6, i));
    }
    n_meta = PyTuple_GET_SIZE(m4);
    for (Py_ssize_t i = 0; i < n_meta; i++) {
        Py_INCREF(PyTuple_GET_ITEM(m4, i));
        Py_XSETREF(meta4[i], PyTuple_GET_ITEM(m4, i));
        Py_INCREF(PyTuple_GET_ITEM(m6, i));
        Py_XSETREF(meta6[i], PyTuple_GET_ITEM(m6, i));
    }
    for (int i = 0; i < 2; i++) {
        Py_INCREF(PyTuple_GET_ITEM(lab, i));
        Py_XSETREF(labels[i], PyTuple_GET_ITEM(lab, i));
    }
    for (int i = 0; i < 4; i++) {
        Py_INCREF(PyTuple_GET_ITEM(dl, i));
        Py_XSETREF(deltas[i], PyTuple_GET_ITEM(dl, i));
    }
    Py_INCREF(z4);
    Py_XSETREF(zero4, z4);
    Py_INCREF(ends);
    Py_XSETREF(end_reasons, ends);
    Py_INCREF(deny);
    Py_XSETREF(deny_actions, deny);
    for (int i = 0; i < 256; i++) {
        PyObject *v = PyLong_FromLong(i);
        int e = v ? PySet_Contains(ends, v) : -1, d = e < 0 ? -1 : PySet_Contains(deny, v);
        Py_XDECREF(v);
        if (d < 0)
            return NULL; /* not sets: an error, or a SystemError from PySet_Contains */
        end_reason[i] = (char)e;
        deny_action[i] = (char)d;
    }
    Py_ssize_t *ix[6] = {&i_src_pod, &i_src_node, &i_egress, &i_dst_pod, &i_dst_node, &i_ingress};
    for (int i = 0; i < 6; i++) {
        *ix[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(idx, i));
        if (*ix[i] < 0 || *ix[i] >= n_meta) {
            PyErr_SetString(PyExc_ValueError, "configure: a meta index out of range");
            return NULL;
        }
    }
    if (n_out != 3 + 5 + 8 + PyTuple_GET_SIZE(m4) + 2 + 4 + 16 + 2 + 2 + 4) {
        PyErr_SetString(PyExc_ValueError, "configure: the record layout does not hold build_record's values");
        return NULL;
    }
    if (zero_addr == NULL && (zero_addr = PyUnicode_InternFromString("0.0.0.0")) == NULL)
        return NULL;
    kt_clear();
    rl_clear();
    Py_XSETREF(name_ids, PyDict_New());
    if (name_ids == NULL)
        return NULL;
    n_ids = 0;
    int bad = 0;
    for (int i = 0; i < N_FIELDS; i++) {
        bad |= (id4[i] = name_id(fields4[i])) < 0;
        bad |= (id6[i] = name_id(fields6[i])) < 0;
    }
    for (Py_ssize_t i = 0; i < n_meta; i++) {
        bad |= (mid4[i] = name_id(meta4[i])) < 0;
        bad |= (mid6[i] = name_id(meta6[i])) < 0;
    }
    for (int i = 0; i < 2; i++)
        bad |= (lid[i] = name_id(labels[i])) < 0;
    for (int i = 0; i < 4; i++)
        bad |= (did[i] = name_id(deltas[i])) < 0;
    if (bad) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "configure: too many field names");
        return NULL;
    }
    configured = 1;
    Py_RETURN_NONE;
}

/* A buffer of n uint64 (an array('Q')): its pointer, or NULL (no error) when it is not one. */
static uint64_t *
u64_buffer(PyObject *o, Py_buffer *view, Py_ssize_t n)
{
    if (PyObject_GetBuffer(o, view, PyBUF_WRITABLE | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        return NULL;
    }
    if (view->len != n * 8 || view->itemsize != 8 || view->format == NULL || strcmp(view->format, "Q") != 0) {
        PyBuffer_Release(view);
        return NULL;
    }
    return (uint64_t *)view->buf;
}

typedef struct {
    PyObject *proc, *flows, *stats, *shared, *costs, *urgent, *corr_due, *end_due, *exporter, *domain, *now,
        *fallback, *deadline;
    Py_ssize_t shared_limit, max_flows;
    long long flow_bytes, max_flow_bytes;
    /* stats accumulated here, added at the end */
    long long received, created, correlated, late, resets, stale, cap, bytes;
    int domain_native; /* the observation domain is an exact int of 32 bits (dom): a Flow's C field takes it */
    uint32_t dom;
    uint64_t meta_hash; /* side_tuple's hash of the tuple it made last, for side_adopt */
} Ctx;

static int
add_stat(PyObject *stats, const char *name, long long n)
{
    if (n == 0)
        return 0;
    PyObject *v = PyObject_GetAttrString(stats, name);
    if (v == NULL)
        return -1;
    PyObject *d = PyLong_FromLongLong(n);
    PyObject *s = d ? PyNumber_Add(v, d) : NULL;
    Py_DECREF(v);
    Py_XDECREF(d);
    if (s == NULL)
        return -1;
    int r = PyObject_SetAttrString(stats, name, s);
    Py_DECREF(s);
    return r;
}

static int
flush_stats(Ctx *x)
{
    int r = 0;
    r |= add_stat(x->stats, "records_received", x->received);
    r |= add_stat(x->stats, "flows_created", x->created);
    r |= add_stat(x->stats, "flows_correlated", x->correlated);
    r |= add_stat(x->stats, "flows_late_correlated", x->late);
    r |= add_stat(x->stats, "counter_resets", x->resets);
    r |= add_stat(x->stats, "dropped_stale", x->stale);
    r |= add_stat(x->stats, "dropped_flow_cap", x->cap);
    r |= add_stat(x->stats, "dropped_flow_bytes", x->bytes);
    x->received = x->created = x->correlated = x->late = x->resets = x->stale = x->cap = x->bytes = 0;
    return r ? -1 : 0;
}

static int
store_flow_bytes(Ctx *x)
{
    PyObject *v = PyLong_FromLongLong(x->flow_bytes);
    if (v == NULL)
        return -1;
    int r = PyObject_SetAttr(x->proc, s_flow_bytes, v);
    Py_DECREF(v);
    return r;
}

static int
load_flow_bytes(Ctx *x)
{
    PyObject *v = PyObject_GetAttr(x->proc, s_flow_bytes);
    if (v == NULL)
        return -1;
    x->flow_bytes = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (x->flow_bytes == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* Push the batch's timer groups (proc._push_timers): one per kind, as the twin does. */
static int
push_timers(Ctx *x)
{
    PyObject **lists[2] = {&x->corr_due, &x->end_due};
    for (int what = 0; what < 2; what++) {
        if (PyList_GET_SIZE(*lists[what]) == 0)
            continue;
        PyObject *w = PyLong_FromLong(what);
        PyObject *r = w ? PyObject_CallMethodObjArgs(x->proc, s_push_timers, x->deadline, w, *lists[what], NULL) : NULL;
        Py_XDECREF(w);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
    }
    return 0;
}

/* The string cost of a side's Kubernetes fields: the process's cache, else proc._cost. */
static int
meta_cost(Ctx *x, PyObject *meta, long long *out)
{
    if (meta == Py_None) {
        *out = 0;
        return 0;
    }
    PyObject *mc = PyDict_GetItemWithError(x->costs, meta);
    if (mc != NULL) {
        Py_INCREF(mc);
    } else {
        if (PyErr_Occurred())
            return -1;
        mc = PyObject_CallMethodOneArg(x->proc, s_cost, meta);
        if (mc == NULL)
            return -1;
    }
    *out = PyLong_AsLongLong(mc);
    Py_DECREF(mc);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static PyObject *
intern_shared(Ctx *x, PyObject *v) /* shared.setdefault(v, v): a new reference */
{
    PyObject *got = PyDict_SetDefault(x->shared, v, v);
    Py_XINCREF(got);
    return got;
}

/* A side's Kubernetes fields as the shared tuple the flows hold, and its string cost.
 * The records of one Pod's connections carry equal values (the same Pod, Service and
 * policy): a small direct-mapped table keyed by the values finds the tuple made for the
 * previous such record without building, hashing or comparing a 27-item tuple (twice
 * for the cost cache, once for the shared one). Keyed by value, not identity: the
 * decoder's bounded caches hand out a new str when a colliding value evicted the old one
 * (every Pod's tuple then missed, measured: 98% misses on the pipeline benchmark's
 * records, all for "0.0.0.0"), and a Service port above 256 is a new int in every
 * record. The hash is made of the items' own hashes (a str caches its own; an int's is
 * its value), the comparison is by identity first, then by value (the items are exact
 * str, exact int or None, checked by the caller: no user code runs). A hit gives the
 * equal tuple a flow already shares, which is what the twin's shared.setdefault gives.
 * A miss builds the tuple as the twin does (its cost from the process's cache or
 * proc._cost), interned in proc._shared by side_adopt once a flow takes it. The table
 * has two ways per set (one way, 800 tuples in 4096 slots missed 12% of lookups on the
 * benchmark's 400 Pods); it keeps only tuples whose strings are short (CACHED_COST):
 * bounded, and never the keeper of a peer's 60 KB names. */
#define MC_SIZE 4096
static struct {
    PyObject *t;
    uint64_t h;
    long long cost;
} mcache[MC_SIZE];

/* The hash of a validated meta value (None, exact str, exact int); -1 on an error. */
static inline Py_hash_t
meta_hash(PyObject *v)
{
    if (v == Py_None)
        return 0x345678;
    if (PyUnicode_CheckExact(v)) {
        Py_hash_t h = ((PyASCIIObject *)v)->hash;
        return h != -1 ? h : PyObject_Hash(v);
    }
    return PyObject_Hash(v);
}

/* Whether two validated meta values are equal (no user code: exact str, int or None). */
static inline int
meta_same(PyObject *a, PyObject *b)
{
    if (a == b)
        return 1;
    if (Py_TYPE(a) != Py_TYPE(b) || a == Py_None || b == Py_None)
        return 0;
    if (PyUnicode_CheckExact(a)) {
        Py_ssize_t n = PyUnicode_GET_LENGTH(a);
        return n == PyUnicode_GET_LENGTH(b) && PyUnicode_KIND(a) == PyUnicode_KIND(b) &&
               memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)n * PyUnicode_KIND(a)) == 0;
    }
    return PyObject_RichCompareBool(a, b, Py_EQ) > 0; /* exact ints: cannot fail */
}

static PyObject *
side_tuple(Ctx *x, PyObject **mv, long long *cost, size_t *at) /* a new reference, or NULL */
{
    /* *at: MC_SIZE when the tuple is the shared one already (a hit), else the table's slot
     * for side_adopt, which shares it once a flow takes it: a record dropped (flow cap,
     * byte budget) leaves nothing behind in proc._shared, as with the twin. */
    Py_ssize_t n = n_meta + 2;
    uint64_t h = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_hash_t vh = meta_hash(mv[i]);
        if (vh == -1 && PyErr_Occurred())
            return NULL;
        h = (h ^ (uint64_t)vh) * 0x9E3779B97F4A7C15ULL;
    }
    h ^= h >> 29;
    size_t set = (size_t)(h >> 52) & (MC_SIZE - 2); /* two ways: set, set + 1 (the newer first) */
    for (size_t w = set; w < set + 2; w++) {
        PyObject *t = mcache[w].t;
        if (t == NULL || mcache[w].h != h)
            continue;
        Py_ssize_t i = 0;
        while (i < n && meta_same(PyTuple_GET_ITEM(t, i), mv[i]))
            i++;
        if (i == n) {
            *cost = mcache[w].cost;
            *at = MC_SIZE;
            Py_INCREF(t);
            return t;
        }
    }
    *at = set;
    x->meta_hash = h; /* for side_adopt */
    PyObject *meta = PyTuple_New(n);
    if (meta == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_INCREF(mv[i]);
        PyTuple_SET_ITEM(meta, i, mv[i]);
    }
    PyObject_GC_UnTrack(meta); /* None, str and int only (checked by the caller) */
    if (meta_cost(x, meta, cost) < 0) {
        Py_DECREF(meta);
        return NULL;
    }
    return meta;
}

/* The tuple side_tuple made, shared now that a flow holds it (interned in proc._shared as
 * the twin does, and remembered in the table when its strings are short): steals ``meta``,
 * returns a new reference or NULL. */
static PyObject *
side_adopt(Ctx *x, PyObject *meta, long long cost, size_t at)
{
    if (at == MC_SIZE)
        return meta;
    PyObject *sm = intern_shared(x, meta);
    Py_DECREF(meta);
    if (sm != NULL && cost <= CACHED_COST && PyTuple_CheckExact(sm) && PyTuple_GET_SIZE(sm) == n_meta + 2) {
        /* the set's newer way moves to the older one, whose tuple is let go */
        Py_XSETREF(mcache[at + 1].t, mcache[at].t);
        mcache[at + 1].cost = mcache[at].cost;
        mcache[at + 1].h = mcache[at].h;
        Py_INCREF(sm);
        mcache[at].t = sm;
        mcache[at].cost = cost;
        mcache[at].h = x->meta_hash;
    }
    return sm;
}

/* ---- a record's values by position (ingest side) ----------------------------------
 *
 * The decoder's records of one template are split-table dicts that share one keys table
 * (ipfix/_speedups.c, fresh_split): every record has its values at the same positions.
 * The first record of a keys table seen is read entry by entry (each key mapped to its
 * field id by key_id) into a map from field id to value position; every later record of
 * that table is read through the map, about 50 loads instead of a PyDict_Next walk and a
 * key_id lookup per item. A split table only grows (a new key appended: dk_nentries
 * rises, and the map is made again), and a deleted value is an empty slot, read as
 * absent, so the map gives what the walk gives. A map holds a reference to its first
 * record, which keeps the keys table (and so its address) alive. CPython 3.11 and 3.12
 * only (ipfix/_dictmirror.h); elsewhere, or for any other dict, the walk serves. */
#define RL_SLOTS 8
#define DICT_KEYS_SPLIT_KIND 2
static struct {
    PyObject *sample; /* the first record read with this map: holds the keys table */
    const void *keys;
    Py_ssize_t nentries;
    int16_t pos[N_IDS_MAX]; /* value position of each field id, -1 when the table lacks it */
} rlayout[RL_SLOTS];

static void
rl_clear(void)
{
    for (int i = 0; i < RL_SLOTS; i++) {
        Py_CLEAR(rlayout[i].sample);
        rlayout[i].keys = NULL;
    }
}

#if DIRECT_DICTS
typedef struct {
    PyObject *values[1];
} RecValuesMirror;

/* Fill by_id[0..n_ids) from rec's values by position: 1 done, 0 not a split table of a
 * known layout (the caller walks it), -1 an error. */
static int
read_by_position(PyObject *rec, PyObject **by_id)
{
    PyDictObject *mp = (PyDictObject *)rec;
    if (mp->ma_values == NULL)
        return 0;
    KeysMirror *k = (KeysMirror *)mp->ma_keys;
    PyObject **values = ((RecValuesMirror *)mp->ma_values)->values;
    size_t slot = (((uintptr_t)k >> 6) * 0x9E3779B97F4A7C15ULL) >> 61; /* 3 bits */
    if (rlayout[slot].keys != k || rlayout[slot].nentries != k->dk_nentries) {
        if (k->dk_kind != DICT_KEYS_SPLIT_KIND || k->dk_nentries > 4 * N_IDS_MAX)
            return 0;
        const UnicodeEntryMirror *entries =
            (const UnicodeEntryMirror *)(k->dk_indices + ((size_t)1 << k->dk_log2_index_bytes));
        int16_t pos[N_IDS_MAX];
        for (Py_ssize_t i = 0; i < n_ids; i++)
            pos[i] = -1;
        for (Py_ssize_t j = 0; j < k->dk_nentries; j++) {
            PyObject *key = entries[j].me_key;
            if (key == NULL || !PyUnicode_CheckExact(key))
                return 0;
            /* the mirror's check: what a lookup finds is this position's value */
            PyObject *v = PyDict_GetItemWithError(rec, key);
            if (v == NULL && PyErr_Occurred())
                return -1;
            if (v != values[j])
                return 0;
            int id = key_id(key);
            if (id == -2)
                return -1;
            if (id >= 0)
                pos[id] = (int16_t)j;
        }
        Py_INCREF(rec);
        Py_XSETREF(rlayout[slot].sample, rec);
        rlayout[slot].keys = k;
        rlayout[slot].nentries = k->dk_nentries;
        memcpy(rlayout[slot].pos, pos, sizeof pos);
    }
    const int16_t *pos = rlayout[slot].pos;
    for (Py_ssize_t i = 0; i < n_ids; i++)
        by_id[i] = pos[i] >= 0 ? values[pos[i]] : NULL;
    return 1;
}
#else
static int
read_by_position(PyObject *rec, PyObject **by_id)
{
    (void)rec;
    (void)by_id;
    return 0;
}
#endif

enum { DONE, FALLBACK, ERROR };

/* The flows dict's lookup and insertion by a hash computed once (CPython's own, exported
 * on 3.11 and 3.12), else the public calls that hash again. */
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000
#define KNOWN_HASH_GET(d, k, h) _PyDict_GetItem_KnownHash((d), (k), (h))
#define KNOWN_HASH_SET(d, k, v, h) _PyDict_SetItem_KnownHash((d), (k), (v), (h))
#else
#define KNOWN_HASH_GET(d, k, h) PyDict_GetItemWithError((d), (k))
#define KNOWN_HASH_SET(d, k, v, h) PyDict_SetItem((d), (k), (v))
#endif

/* ---- the flows dict's lookup without a key tuple (ingest side) ---------------------
 *
 * A Flow hashes as its key tuple (src, dst, sport, dport, proto). The lookup of a record's
 * flow used to build that tuple, hash it and compare it item by item with the Flow found;
 * here the hash is CPython's tuple hash (Objects/tupleobject.c, xxHash-based, the same on
 * 3.8 to 3.13) computed from the items' hashes (an address's str caches its own; an int
 * below 2^61 hashes as itself), checked against hash() of a real tuple once, and the
 * lookup's key is a Flow of this module's kept for the purpose (its fields set to the
 * record's, its addresses borrowed for the lookup only), which a stored Flow compares
 * with field by field (flow_richcompare). Where the check fails, the tuple serves. */
#if SIZEOF_VOID_P == 8
#define XXPRIME_1 ((Py_uhash_t)11400714785074694791ULL)
#define XXPRIME_2 ((Py_uhash_t)14029467366897019727ULL)
#define XXPRIME_5 ((Py_uhash_t)2870177450012600261ULL)
#define XXROTATE(x) ((x << 31) | (x >> 33))
#else
#define XXPRIME_1 ((Py_uhash_t)2654435761UL)
#define XXPRIME_2 ((Py_uhash_t)2246822519UL)
#define XXPRIME_5 ((Py_uhash_t)374761393UL)
#define XXROTATE(x) ((x << 13) | (x >> 19))
#endif
static FlowObject *probe;   /* the lookup's key */
static int key_hash_ok = 0; /* 1: key_hash5 is tuple's hash (checked), -1: it is not, 0: not checked yet */

static inline Py_hash_t
key_hash5(PyObject *src, PyObject *dst, unsigned long sp, unsigned long dp, unsigned long pr)
{
    Py_uhash_t lanes[5];
    Py_hash_t h0 = PyObject_Hash(src), h1 = h0 == -1 ? -1 : PyObject_Hash(dst);
    if (h1 == -1)
        return -1;
    lanes[0] = (Py_uhash_t)h0;
    lanes[1] = (Py_uhash_t)h1;
    lanes[2] = sp; /* 0..65535: an int's hash is itself */
    lanes[3] = dp;
    lanes[4] = pr;
    Py_uhash_t acc = XXPRIME_5;
    for (int i = 0; i < 5; i++) {
        acc += lanes[i] * XXPRIME_2;
        acc = XXROTATE(acc);
        acc *= XXPRIME_1;
    }
    acc += 5 ^ (XXPRIME_5 ^ 3527539UL);
    if (acc == (Py_uhash_t)-1)
        return 1546275796;
    return (Py_hash_t)acc;
}

/* Whether key_hash5 gives hash() of the tuple, on a few keys: 1, 0 or -1 on an error. */
static int
check_key_hash(void)
{
    static const char *addrs[] = {"10.0.0.1", "192.168.7.254", "fd00::1", ""};
    static const unsigned long ports[][3] = {{0, 0, 0}, {32768, 8080, 6}, {65535, 53, 17}, {1, 256, 255}};
    for (int i = 0; i < 4; i++) {
        PyObject *a = PyUnicode_FromString(addrs[i]), *b = PyUnicode_FromString(addrs[(i + 1) % 4]);
        PyObject *sp = PyLong_FromUnsignedLong(ports[i][0]), *dp = PyLong_FromUnsignedLong(ports[i][1]),
                 *pr = PyLong_FromUnsignedLong(ports[i][2]);
        PyObject *t = a && b && sp && dp && pr ? PyTuple_Pack(5, a, b, sp, dp, pr) : NULL;
        Py_hash_t want = t ? PyObject_Hash(t) : -1;
        Py_hash_t got = want == -1 ? -1 : key_hash5(a, b, ports[i][0], ports[i][1], ports[i][2]);
        Py_XDECREF(a);
        Py_XDECREF(b);
        Py_XDECREF(sp);
        Py_XDECREF(dp);
        Py_XDECREF(pr);
        Py_XDECREF(t);
        if (got == -1 && PyErr_Occurred())
            return -1;
        if (got != want)
            return 0;
    }
    return 1;
}

/* The flow of a validated key (exact str addresses, ports and protocol in range), a new
 * reference or NULL (an error set, or none: no error); *hash its hash. */
static PyObject *
find_flow(Ctx *x, PyObject **val, unsigned long sp, unsigned long dp, unsigned long pr, Py_hash_t *hash)
{
    *hash = -1;
    if (key_hash_ok == 0) {
        int ok = check_key_hash();
        if (ok < 0)
            return NULL;
        key_hash_ok = ok ? 1 : -1;
        if (ok && probe == NULL && (probe = flow_alloc(Py_None)) == NULL)
            return NULL;
    }
    PyObject *flow;
    static int probe_busy; /* a lookup that ran code which ingests (a key of a foreign type in flows) */
    if (key_hash_ok > 0 && !probe_busy) {
        *hash = key_hash5(val[F_SRC], val[F_DST], sp, dp, pr);
        if (*hash == -1)
            return NULL;
        PyObject *s0 = probe->src, *d0 = probe->dst; /* None, held by the probe */
        probe->src = val[F_SRC];
        probe->dst = val[F_DST];
        probe->sport = (uint16_t)sp;
        probe->dport = (uint16_t)dp;
        probe->proto = (uint8_t)pr;
        probe_busy = 1;
        flow = KNOWN_HASH_GET(x->flows, (PyObject *)probe, *hash);
        probe_busy = 0;
        probe->src = s0;
        probe->dst = d0;
    } else {
        PyObject *key = PyTuple_Pack(5, val[F_SRC], val[F_DST], val[F_SPORT], val[F_DPORT], val[F_PROTO]);
        if (key == NULL)
            return NULL;
        *hash = PyObject_Hash(key);
        flow = *hash == -1 ? NULL : KNOWN_HASH_GET(x->flows, key, *hash);
        Py_DECREF(key);
    }
    Py_XINCREF(flow);
    return flow;
}

/* Whether a rule action denies (in deny_actions): a table for the small ints agents send. */
static inline int
denies(PyObject *v)
{
    unsigned long a;
    if (small_uint(v, 255, &a))
        return deny_action[a];
    return PySet_Contains(deny_actions, v);
}

/* One record: DONE (taken or dropped, *taken says), FALLBACK (the twin must take it) or ERROR. */
static int
one(Ctx *x, PyObject *rec, int *taken)
{
    *taken = 0;
    if (!PyDict_CheckExact(rec))
        return FALLBACK;
    PyObject *by_id[N_IDS_MAX];
    int by_pos = read_by_position(rec, by_id);
    if (by_pos < 0)
        return ERROR;
    if (!by_pos) {
        memset(by_id, 0, sizeof(PyObject *) * n_ids);
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (PyDict_Next(rec, &pos, &k, &v)) {
            int id = key_id(k);
            if (id >= 0)
                by_id[id] = v;
            else if (id == -2)
                return ERROR;
        }
    }
    int v6 = by_id[id4[F_SRC]] == NULL; /* "sourceIPv4Address" not in rec */
    const int *fid = v6 ? id6 : id4, *mid = v6 ? mid6 : mid4;
    PyObject *val[N_FIELDS];
    for (int i = 0; i < N_FIELDS; i++) {
        val[i] = by_id[fid[i]];
        if (val[i] == NULL)
            return FALLBACK;
    }
    if (!PyUnicode_CheckExact(val[F_SRC]) || !PyUnicode_CheckExact(val[F_DST]) || !PyLong_CheckExact(val[F_SPORT]) ||
        !PyLong_CheckExact(val[F_DPORT]) || !PyLong_CheckExact(val[F_PROTO]))
        return FALLBACK;
    uint64_t pt, ot, rpt, rot, start, end;
    long reason, ft;
    if (!as_u64(val[F_PT], &pt) || !as_u64(val[F_OT], &ot) || !as_u64(val[F_RPT], &rpt) ||
        !as_u64(val[F_ROT], &rot) || !as_u64(val[F_START], &start) || !as_u64(val[F_END], &end) ||
        !as_long(val[F_REASON], &reason) || !as_long(val[F_FT], &ft))
        return FALLBACK;
    /* What a Flow holds in C fields: ports, protocol, reason and type as agents send them,
     * the seconds in 32 bits (an IPFIX dateTimeSeconds is); anything else is the twin's. */
    unsigned long sp_, dp_, pr_;
    if (!small_uint(val[F_SPORT], 65535, &sp_) || !small_uint(val[F_DPORT], 65535, &dp_) ||
        !small_uint(val[F_PROTO], 255, &pr_) || start > UINT32_MAX || end > UINT32_MAX || reason < 0 ||
        reason > 255 || ft < 0 || ft > 255 || !x->domain_native)
        return FALLBACK;
    PyObject *tcp = val[F_TCP];
    if (tcp != Py_None && !PyUnicode_CheckExact(tcp))
        return FALLBACK;
    PyObject *mv[N_META_MAX + 2];
    for (Py_ssize_t i = 0; i < n_meta; i++) {
        PyObject *m = by_id[mid[i]];
        if (m == NULL)
            return FALLBACK;
        if (m != Py_None && !PyUnicode_CheckExact(m) && !PyLong_CheckExact(m))
            return FALLBACK;
        mv[i] = m;
    }
    for (int i = 0; i < 2; i++) {
        PyObject *m = by_id[lid[i]];
        if (m == NULL)
            m = Py_None;
        else if (m != Py_None && !PyUnicode_CheckExact(m))
            return FALLBACK;
        mv[n_meta + i] = m;
    }

    /* The flow, or the state a new one starts with. */
    /* its hash, once: the lookup's, and a new flow's insertion (a Flow hashes as its key) */
    Py_hash_t hash;
    PyObject *flow = find_flow(x, val, sp_, dp_, pr_, &hash); /* a new reference */
    if (flow == NULL && PyErr_Occurred())
        return ERROR;
    int status = ERROR;
    PyObject *meta = NULL;
    size_t meta_at = MC_SIZE;
    Py_buffer swview;
    int have_sw = 0;
    uint64_t c[NC]; /* the flow's counters (a new flow's: zero), written back at the end */
    uint64_t *sw = NULL; /* sw: the flow's correction, NULL when None */
    long flags, flow_type;
    int is_new = flow == NULL;
    long long new_cost = 0;
    if (is_new) {
        if (PyDict_GET_SIZE(x->flows) >= x->max_flows) {
            x->received++;
            x->cap++;
            return DONE;
        }
        meta = side_tuple(x, mv, &new_cost, &meta_at);
        if (meta == NULL)
            goto out;
        if (x->flow_bytes + FLOW_COST + new_cost > x->max_flow_bytes) {
            x->received++;
            x->bytes++;
            status = DONE;
            goto out;
        }
        memset(c, 0, sizeof c);
        if (!ft) {
            ft = truthy(mv[i_src_pod]) && truthy(mv[i_dst_pod]) ? INTRA_NODE : INTER_NODE;
            flags = v6 ? (UNTYPED | IPV6) : UNTYPED;
        } else {
            flags = v6 ? IPV6 : 0;
        }
        flow_type = ft;
    } else {
        if (!IS_FLOW(flow) || FL(flow)->odd != NULL) { /* a flow holding odd values: the twin's */
            status = FALLBACK;
            goto out;
        }
        flags = FL(flow)->flags;
        flow_type = FL(flow)->flow_type;
        load_c(FL(flow), c);
        PyObject *so = FL(flow)->sw;
        if (so != Py_None) {
            sw = u64_buffer(so, &swview, 4);
            if (sw == NULL) {
                status = FALLBACK;
                goto out;
            }
            have_sw = 1;
        }
        if (!ft)
            ft = flow_type;
    }

    /* Which node sent it. */
    int side;
    if (ft == INTER_NODE) {
        int sp = truthy(mv[i_src_pod]), dp = truthy(mv[i_dst_pod]);
        if (sp && dp) {
            side = 0;
            ft = INTRA_NODE;
        } else if (sp) {
            side = 0;
        } else if (dp) {
            side = 1;
        } else if (truthy(mv[i_dst_node]) && !truthy(mv[i_src_node])) {
            side = 1;
        } else {
            side = 0;
            if (!truthy(mv[i_src_node]) && is_new)
                flags |= NO_TWIN;
        }
    } else if (ft == FROM_EXTERNAL) {
        side = 1;
    } else {
        side = 0;
    }
    if (ft != flow_type && ft == INTRA_NODE)
        flow_type = INTRA_NODE; /* written below (also for a stale record, as the twin does) */
    int o = side * 8;
    long seen = side ? HAS_DST : HAS_SRC;

    /* Counters, in locals. */
    uint64_t nc[NC];
    memcpy(nc, c, sizeof nc);
    int first = !(flags & seen);
    uint64_t prev_end = c[16 + side];
    uint64_t d[4];
    uint64_t tot[4] = {pt, ot, rpt, rot};
    int reset = 0;
    if (first) {
        for (int k = 0; k < 4; k++) {
            PyObject *dv = by_id[did[k]];
            if (dv == NULL) {
                d[k] = tot[k];
            } else if (!as_u64(dv, &d[k])) {
                status = FALLBACK;
                goto out;
            }
        }
    } else {
        if (pt < c[o] || ot < c[o + 1] || rpt < c[o + 2] || rot < c[o + 3]) {
            if (end < c[16 + side]) { /* an older report overtaken by a newer one */
                FL(flow)->flow_type = (uint8_t)flow_type;
                x->received++;
                x->stale++;
                status = DONE;
                goto out;
            }
            memcpy(d, tot, sizeof d);
            reset = 1;
        } else {
            for (int k = 0; k < 4; k++)
                d[k] = tot[k] - c[o + k];
        }
    }
    int switched = first && side == 0 && (flags & HAS_DST) && (flags & EXPORTED);
    uint64_t nsw[4];
    if (switched) {
        for (int k = 0; k < 4; k++) {
            __int128 v = (__int128)(sw ? sw[k] : 0) + (__int128)c[8 + k] - (__int128)c[12 + k];
            if (v < 0 || v > (__int128)UINT64_MAX) {
                status = FALLBACK;
                goto out;
            }
            nsw[k] = (uint64_t)v;
        }
    }
    for (int k = 0; k < 4; k++) {
        nc[o + k] = tot[k];
        if (nc[o + 4 + k] + d[k] < d[k]) { /* past 2^64: the twin raises OverflowError */
            status = FALLBACK;
            goto out;
        }
        nc[o + 4 + k] += d[k];
    }
    if (end > nc[16 + side])
        nc[16 + side] = end;
    int changed = d[0] || d[1] || d[2] || d[3] || first;
    __int128 span = (__int128)end - (__int128)(first ? start : prev_end);
    if (span > 0) {
        unsigned __int128 th = ((unsigned __int128)(first ? ot : d[1]) * 8) / (unsigned __int128)span;
        unsigned __int128 rth = ((unsigned __int128)(first ? rot : d[3]) * 8) / (unsigned __int128)span;
        if (th > UINT64_MAX || rth > UINT64_MAX) {
            status = FALLBACK;
            goto out;
        }
        nc[18 + 2 * side] = (uint64_t)th;
        nc[19 + 2 * side] = (uint64_t)rth;
        if (end >= c[25]) {
            nc[22] = (uint64_t)th;
            nc[23] = (uint64_t)rth;
        }
    }

    /* Commit. */
    if (is_new) {
        if (PyDict_GET_SIZE(x->shared) >= x->shared_limit)
            PyDict_Clear(x->shared);
        /* the addresses (and the destination port, as the twin does) shared by many flows */
        PyObject *k0 = intern_shared(x, val[F_SRC]), *k1 = intern_shared(x, val[F_DST]),
                 *k3 = intern_shared(x, val[F_DPORT]);
        Py_XDECREF(k3);
        if (k0 != NULL && k1 != NULL && k3 != NULL)
            flow = flow_native(k0, k1, (uint16_t)sp_, (uint16_t)dp_, (uint8_t)pr_, (uint8_t)flow_type, x->now);
        Py_XDECREF(k0);
        Py_XDECREF(k1);
        if (flow == NULL || KNOWN_HASH_SET(x->flows, flow, flow, hash) < 0) /* keyed by itself: its hash is its key's */
            goto out;
        x->flow_bytes += FLOW_COST;
        x->created++;
    } else {
        FL(flow)->flow_type = (uint8_t)flow_type;
    }
    if (reset)
        x->resets++;
    if (switched) {
        if (sw == NULL) {
            PyObject *nw = PySequence_GetSlice(zero4, 0, 4);
            if (nw == NULL)
                goto out;
            Py_SETREF(FL(flow)->sw, nw);
            sw = u64_buffer(nw, &swview, 4);
            if (sw == NULL) {
                PyErr_SetString(PyExc_SystemError, "zero4 is not an array('Q') of 4");
                goto out;
            }
            have_sw = 1;
        }
        memcpy(sw, nsw, sizeof nsw);
    }
    memcpy(c, nc, sizeof nc);

    /* Kubernetes fields: intern a side's tuple only when it changed (compared item by
     * item as tuples compare, without building the record's tuple when it did not). */
    PyObject **ms = side ? &FL(flow)->dmeta : &FL(flow)->smeta;
    PyObject *old = *ms;
    int eq;
    if (meta == NULL && PyTuple_CheckExact(old) && PyTuple_GET_SIZE(old) == n_meta + 2) {
        eq = 1;
        for (Py_ssize_t i = 0; i < n_meta + 2 && eq > 0; i++)
            eq = PyTuple_GET_ITEM(old, i) == mv[i] ? 1 /* the same object, mostly: no call */
                                                   : PyObject_RichCompareBool(PyTuple_GET_ITEM(old, i), mv[i], Py_EQ);
    } else {
        eq = old == Py_None ? 0 : -2; /* -2: something the twin put there, compared as it does */
    }
    if (eq == -1)
        goto out;
    if (eq <= 0 && meta == NULL && (meta = side_tuple(x, mv, &new_cost, &meta_at)) == NULL)
        goto out;
    if (eq == -2 && (eq = PyObject_RichCompareBool(old, meta, Py_EQ)) < 0)
        goto out;
    if (!eq) { /* meta: side_tuple's, its cost new_cost: shared now that this flow takes it */
        long long b;
        if (meta_cost(x, old, &b) < 0)
            goto out;
        meta = side_adopt(x, meta, new_cost, meta_at);
        meta_at = MC_SIZE;
        if (meta == NULL)
            goto out;
        Py_INCREF(meta);
        Py_SETREF(*ms, meta);
        x->flow_bytes += new_cost - b;
        changed = 1;
    }
    Py_INCREF(x->exporter);
    Py_SETREF(*(side ? &FL(flow)->dexp : &FL(flow)->sexp), x->exporter);
    *(side ? &FL(flow)->ddom : &FL(flow)->sdom) = x->dom;

    /* Times and state from the newest record. */
    int ended = end_reason[reason]; /* reason: 0..255 here */
    if (end >= c[25]) {
        c[25] = end;
        if (start)
            c[24] = start;
        if (FL(flow)->reason != reason) {
            if (ended)
                changed = 1;
            FL(flow)->reason = (uint8_t)reason;
        }
        if (tcp != Py_None) {
            PyObject *ot_ = FL(flow)->tcp;
            int same = ot_ == tcp ? 1 : PyObject_RichCompareBool(tcp, ot_, Py_EQ);
            if (same < 0)
                goto out;
            if (!same) {
                PyObject *st = intern_shared(x, tcp);
                if (st == NULL)
                    goto out;
                Py_SETREF(FL(flow)->tcp, st);
                changed = 1;
            }
        }
    }
    store_c(FL(flow), c); /* the seconds were checked to fit */
    Py_INCREF(x->now);
    Py_SETREF(FL(flow)->last_seen, x->now);
    flags |= seen;
    if (changed)
        flags |= DIRTY;

    /* Correlation, readiness, denial, end. */
    if (flow_type == INTER_NODE && !(flags & CORRELATED)) {
        if ((flags & HAS_SRC) && (flags & HAS_DST)) {
            flags |= CORRELATED | READY;
            if (flags & LONE)
                x->late++;
            else
                x->correlated++;
        } else if (is_new && !(flags & NO_TWIN)) {
            if (PyList_Append(x->corr_due, flow) < 0)
                goto out;
        }
    } else if (!(flags & READY)) {
        flags |= READY;
    }
    if ((flags & NO_TWIN) && !(flags & READY))
        flags |= READY;
    int ea = denies(mv[i_egress]), ia = ea < 0 ? -1 : denies(mv[i_ingress]);
    if (ea < 0 || ia < 0)
        goto out;
    if ((ea || ia) && !(flags & DENIED)) {
        flags |= DENIED | READY;
        if (side == 0 && ea && !(flags & CORRELATED))
            flags |= NO_TWIN;
        if (!(flags & EXPORTED) && !(flags & QUEUED)) {
            flags |= QUEUED;
            if (PyList_Append(x->urgent, flow) < 0)
                goto out;
        }
    }
    if (ended) {
        flags |= side ? ENDED_DST : ENDED_SRC;
        if (flow_type != INTER_NODE || (flags & SINGLE) || ((flags & ENDED_SRC) && (flags & ENDED_DST))) {
            if (!(flags & QUEUED)) {
                flags |= QUEUED;
                if (PyList_Append(x->urgent, flow) < 0)
                    goto out;
            }
        } else if ((flags & CORRELATED) && !(flags & END_WAIT)) {
            flags |= END_WAIT;
            if (PyList_Append(x->end_due, flow) < 0)
                goto out;
        }
    }
    FL(flow)->flags = (uint32_t)flags;
    x->received++;
    *taken = 1;
    status = DONE;
out:
    if (have_sw)
        PyBuffer_Release(&swview);
    Py_XDECREF(flow);
    Py_XDECREF(meta);
    return status;
}

static PyObject *
get_attr_obj(PyObject *o, PyObject *name)
{
    return PyObject_GetAttr(o, name);
}

static PyObject *
ingest_many(PyObject *self, PyObject *args)
{
    PyObject *proc, *records, *exporter, *domain, *now, *fallback;
    if (!PyArg_ParseTuple(args, "OOOOOO", &proc, &records, &exporter, &domain, &now, &fallback))
        return NULL;
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "_aggr.configure was not called");
        return NULL;
    }
    Ctx x;
    memset(&x, 0, sizeof x);
    x.proc = proc;
    x.exporter = exporter;
    x.domain = domain;
    x.now = now;
    x.fallback = fallback;
    PyObject *it = NULL, *lim = NULL, *mf = NULL, *mfb = NULL, *ct = NULL, *result = NULL;
    long long taken = 0;
    x.flows = get_attr_obj(proc, s_flows);
    x.stats = get_attr_obj(proc, s_stats);
    x.shared = get_attr_obj(proc, s_shared);
    x.costs = get_attr_obj(proc, s_costs);
    x.urgent = get_attr_obj(proc, s_urgent);
    lim = get_attr_obj(proc, s_shared_limit);
    mf = get_attr_obj(proc, s_max_flows);
    mfb = get_attr_obj(proc, s_max_flow_bytes);
    ct = get_attr_obj(proc, s_corr_timeout);
    x.corr_due = PyList_New(0);
    x.end_due = PyList_New(0);
    if (!x.flows || !x.stats || !x.shared || !x.costs || !x.urgent || !lim || !mf || !mfb || !ct || !x.corr_due ||
        !x.end_due)
        goto done;
    if (!PyDict_CheckExact(x.flows) || !PyDict_CheckExact(x.shared) || !PyDict_CheckExact(x.costs) ||
        !PyList_CheckExact(x.urgent)) {
        PyErr_SetString(PyExc_TypeError, "ingest_many: the process's stores are not dicts and a list");
        goto done;
    }
    x.shared_limit = PyLong_AsSsize_t(lim);
    x.max_flows = PyLong_AsSsize_t(mf);
    x.max_flow_bytes = PyLong_AsLongLong(mfb);
    if (PyErr_Occurred() || load_flow_bytes(&x) < 0)
        goto done;
    unsigned long dom;
    x.domain_native = small_uint(domain, UINT32_MAX, &dom);
    x.dom = x.domain_native ? (uint32_t)dom : 0;
    x.deadline = PyNumber_Add(now, ct);
    if (x.deadline == NULL)
        goto done;
    it = PyObject_GetIter(records);
    if (it == NULL)
        goto done;
    PyObject *rec;
    while ((rec = PyIter_Next(it)) != NULL) {
        int t;
        int s = one(&x, rec, &t);
        if (s == FALLBACK) {
            PyObject *one_rec = PyTuple_Pack(1, rec);
            PyObject *r = NULL;
            PyObject *due = one_rec ? PyTuple_Pack(2, x.corr_due, x.end_due) : NULL;
            if (due != NULL && store_flow_bytes(&x) == 0)
                r = PyObject_CallFunctionObjArgs(fallback, one_rec, exporter, domain, now, due, NULL);
            Py_XDECREF(due);
            Py_XDECREF(one_rec);
            if (r == NULL || load_flow_bytes(&x) < 0) {
                Py_XDECREF(r);
                Py_DECREF(rec);
                goto done;
            }
            taken += PyLong_AsLongLong(r);
            Py_DECREF(r);
        } else if (s == ERROR) {
            Py_DECREF(rec);
            goto done;
        } else {
            taken += t;
        }
        Py_DECREF(rec);
    }
    if (PyErr_Occurred())
        goto done;
    if (push_timers(&x) < 0)
        goto done;
    result = PyLong_FromLongLong(taken);
done:
    if (x.stats != NULL && x.proc != NULL) {
        /* what was counted and held is recorded even when an error ends the batch */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (flush_stats(&x) < 0 || store_flow_bytes(&x) < 0)
            Py_CLEAR(result);
        if (et != NULL)
            PyErr_Restore(et, ev, tb);
    }
    Py_XDECREF(it);
    Py_XDECREF(x.flows);
    Py_XDECREF(x.stats);
    Py_XDECREF(x.shared);
    Py_XDECREF(x.costs);
    Py_XDECREF(x.urgent);
    Py_XDECREF(x.corr_due);
    Py_XDECREF(x.end_due);
    Py_XDECREF(x.deadline);
    Py_XDECREF(lim);
    Py_XDECREF(mf);
    Py_XDECREF(mfb);
    Py_XDECREF(ct);
    return result;
}

/* The strings' length of a side's tuple (aggregation._meta_cost). */
static Py_ssize_t
str_cost(PyObject *meta)
{
    Py_ssize_t n = 0;
    if (meta == Py_None)
        return 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(meta); i++) {
        PyObject *v = PyTuple_GET_ITEM(meta, i);
        if (PyUnicode_CheckExact(v))
            n += PyUnicode_GET_LENGTH(v);
    }
    return n;
}

/* Both sides' Kubernetes fields merged (aggregation._merged's rule: each field from its
 * owner, else from the other side when the owner's is empty, else the default), cached in
 * the process's merge cache by the two tuples' identity (the flows share interned tuples):
 * key an int of their addresses, value (smeta, dmeta, merged), checked on a hit. A new
 * reference, or NULL with no error set when a value is one only the twin handles. */
static PyObject *
merged_meta(PyObject *cache, PyObject *smeta, PyObject *dmeta, int v6)
{
    uintptr_t a = (uintptr_t)smeta, b = (uintptr_t)dmeta;
    PyObject *ck = PyLong_FromUnsignedLongLong(((unsigned long long)a * 0x9E3779B97F4A7C15ULL) ^ (b >> 3) ^ (unsigned long long)v6);
    if (ck == NULL)
        return NULL;
    PyObject *got = PyDict_GetItemWithError(cache, ck);
    if (got != NULL && PyTuple_CheckExact(got) && PyTuple_GET_SIZE(got) == 3 && PyTuple_GET_ITEM(got, 0) == smeta &&
        PyTuple_GET_ITEM(got, 1) == dmeta) {
        Py_DECREF(ck);
        PyObject *m = PyTuple_GET_ITEM(got, 2);
        Py_INCREF(m);
        return m;
    }
    if (PyErr_Occurred()) {
        Py_DECREF(ck);
        return NULL;
    }
    Py_ssize_t n = n_meta + 2;
    PyObject *defaults = meta_defaults[v6];
    PyObject *m = PyTuple_New(n);
    if (m == NULL) {
        Py_DECREF(ck);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *own = owner_of[i] ? dmeta : smeta, *other = owner_of[i] ? smeta : dmeta;
        PyObject *x = own == Py_None ? Py_None : PyTuple_GET_ITEM(own, i);
        PyObject *y = other == Py_None ? Py_None : PyTuple_GET_ITEM(other, i);
        int xe = PySet_Contains(empty_values, x);
        int ye = xe > 0 ? PySet_Contains(empty_values, y) : 1;
        if (xe < 0 || ye < 0) { /* an unhashable value: the twin's to raise about */
            PyErr_Clear();
            Py_DECREF(m);
            Py_DECREF(ck);
            return NULL;
        }
        PyObject *v = xe && !ye ? y : (x == Py_None ? PyTuple_GET_ITEM(defaults, i) : x);
        Py_INCREF(v);
        PyTuple_SET_ITEM(m, i, v);
    }
    if (str_cost(smeta) <= CACHED_COST && str_cost(dmeta) <= CACHED_COST) {
        /* bounded like the twin's: cleared when full */
        PyObject *entry = PyTuple_Pack(3, smeta, dmeta, m);
        if (entry == NULL || (PyDict_GET_SIZE(cache) >= 65536 && (PyDict_Clear(cache), 0)) ||
            PyDict_SetItem(cache, ck, entry) < 0) {
            Py_XDECREF(entry);
            Py_DECREF(ck);
            Py_DECREF(m);
            return NULL;
        }
        Py_DECREF(entry);
    }
    Py_DECREF(ck);
    return m;
}

/* A flow's aggregated values, in build_record's slot order (see _slot_names): obj[j] a
 * borrowed reference (held by the flow or by merged), or NULL when the value is the C
 * number num[j]; li the layout (flow family x exporter family); merged a new reference. */
typedef struct {
    PyObject *obj[N_OUT_MAX];
    uint64_t num[N_OUT_MAX];
    PyObject *merged;
    int li;
} Gathered;

/* 1: g filled; 0: the twin's flow (no error set); -1: an error. */
static int
gather(PyObject *flow, PyObject *cache, Gathered *g)
{
    if (!configured || !IS_FLOW(flow) || FL(flow)->odd != NULL)
        return 0; /* odd values (a malformed record the twin took) are the twin's to lay out */
    FlowObject *fo = FL(flow);
    long f = fo->flags, flow_type = fo->flow_type;
    PyObject *sm = fo->smeta, *dm = fo->dmeta;
    if ((sm != Py_None && (!PyTuple_CheckExact(sm) || PyTuple_GET_SIZE(sm) != n_meta + 2)) ||
        (dm != Py_None && (!PyTuple_CheckExact(dm) || PyTuple_GET_SIZE(dm) != n_meta + 2)))
        return 0;
    PyObject *merged = merged_meta(cache, sm, dm, (f & IPV6) != 0);
    if (merged == NULL)
        return PyErr_Occurred() ? -1 : 0;
    int has_src = (f & HAS_SRC) != 0, has_dst = (f & HAS_DST) != 0, v6 = (f & IPV6) != 0;
    PyObject *exporter = has_src ? fo->sexp : fo->dexp;
    int t = PyObject_IsTrue(exporter);
    if (t < 0) {
        Py_DECREF(merged);
        return -1;
    }
    if (!t)
        exporter = zero_addr;
    if (!PyUnicode_CheckExact(exporter)) {
        Py_DECREF(merged);
        return 0;
    }
    int e6 = PyUnicode_FindChar(exporter, ':', 0, PyUnicode_GET_LENGTH(exporter), 1) >= 0;
    Py_buffer sv;
    uint64_t c[NC], *sw = NULL;
    load_c(fo, c);
    PyObject *swo = fo->sw;
    if (swo != Py_None) {
        sw = u64_buffer(swo, &sv, 4);
        if (sw == NULL) {
            Py_DECREF(merged);
            return 0;
        }
    }
    PyObject **obj = g->obj;
    uint64_t *num = g->num;
    Py_ssize_t n = 0;
#define NUM(v) (obj[n] = NULL, num[n++] = (v))
#define OBJ(o) (obj[n] = (o), n++)
    NUM(c[24]);
    NUM(c[25]);
    NUM(fo->reason);
    OBJ(fo->src);
    OBJ(fo->dst);
    NUM(fo->sport);
    NUM(fo->dport);
    NUM(fo->proto);
    const uint64_t *own = has_src ? c : c + 8;
    for (int k = 0; k < 4; k++)
        NUM(own[k]);
    for (int k = 0; k < 4; k++)
        NUM(has_src && sw ? (own[4 + k] > sw[k] ? own[4 + k] - sw[k] : 0) : own[4 + k]);
    for (Py_ssize_t i = 0; i < n_meta + 2; i++)
        OBJ(PyTuple_GET_ITEM(merged, i));
    NUM((uint64_t)((f & UNTYPED) && (f & NO_TWIN) && !(f & DENIED) ? 0 : flow_type));
    OBJ(fo->tcp);
    OBJ(exporter);
    NUM(has_src ? fo->sdom : fo->ddom);
    static const uint64_t zero8[8] = {0};
    const uint64_t *srcc = has_src ? c : NULL, *dstc = has_dst ? c + 8 : NULL;
    uint64_t ends[2] = {has_src ? c[16] : 0, has_dst ? c[17] : 0};
    uint64_t sth[2] = {has_src ? c[18] : 0, has_src ? c[19] : 0}, dth[2] = {has_dst ? c[20] : 0, has_dst ? c[21] : 0};
    if (flow_type == INTRA_NODE) { /* one node is both the source and the destination node */
        if (srcc == NULL)
            srcc = dstc;
        if (dstc == NULL)
            dstc = srcc;
        ends[0] = ends[1] = ends[0] > ends[1] ? ends[0] : ends[1];
        if (has_src) {
            dth[0] = sth[0];
            dth[1] = sth[1];
        } else {
            sth[0] = dth[0];
            sth[1] = dth[1];
        }
    }
    if (srcc == NULL)
        srcc = zero8;
    if (dstc == NULL)
        dstc = zero8;
    for (int k = 0; k < 8; k++)
        NUM(srcc[k]);
    for (int k = 0; k < 8; k++)
        NUM(dstc[k]);
    NUM(ends[0]);
    NUM(ends[1]);
    NUM(c[22]);
    NUM(c[23]);
    NUM(sth[0]);
    NUM(sth[1]);
    NUM(dth[0]);
    NUM(dth[1]);
#undef NUM
#undef OBJ
    if (sw != NULL)
        PyBuffer_Release(&sv);
    if (n != n_out) {
        Py_DECREF(merged);
        PyErr_SetString(PyExc_SystemError, "build_record: values and layout differ in length");
        return -1;
    }
    g->merged = merged;
    g->li = v6 * 2 + e6;
    return 1;
}

/* The record dict of layout li's values (build_record's slot order; NULL obj: the number). */
static PyObject *
dict_of(int li, PyObject *const *obj, const uint64_t *num)
{
    Py_ssize_t n = n_out;
    PyObject *names = out_names[li];
    /* A copy of the layout's dict of names: its keys table comes whole (str keys, the
     * template's order, the size it needs), and each value is then set in place. */
    PyObject *rec = PyDict_Copy(out_proto[li]);
    UnicodeEntryMirror *e = rec != NULL && out_direct[li] ? direct_entries(rec, n) : NULL;
    for (Py_ssize_t j = 0; e != NULL && j < n; j++) { /* in place (see check_direct) */
        Py_ssize_t at = out_order[li][j];
        PyObject *v = obj[at];
        if (v == NULL) {
            v = PyLong_FromUnsignedLongLong(num[at]);
            if (v == NULL) {
                Py_CLEAR(rec);
                break;
            }
        } else {
            Py_INCREF(v);
        }
        Py_SETREF(e[j].me_value, v);
    }
    for (Py_ssize_t j = 0; e == NULL && rec != NULL && j < n; j++) {
        Py_ssize_t at = out_order[li][j];
        PyObject *v = obj[at];
        int r;
        if (v == NULL) {
            v = PyLong_FromUnsignedLongLong(num[at]);
            r = v == NULL ? -1 : PyDict_SetItem(rec, PyTuple_GET_ITEM(names, j), v);
            Py_XDECREF(v);
        } else {
            r = PyDict_SetItem(rec, PyTuple_GET_ITEM(names, j), v);
        }
        if (r < 0)
            Py_CLEAR(rec);
    }
    return rec;
}

/* build_record(flow, merge_cache) -> dict: aggregation.build_record's record of a flow.
 * None when the flow holds something the twin alone handles (the caller then uses it). */
static PyObject *
record_of(PyObject *flow, PyObject *cache)
{
    Gathered g;
    int r = gather(flow, cache, &g);
    if (r <= 0) {
        if (r < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    PyObject *rec = dict_of(g.li, g.obj, g.num);
    Py_DECREF(g.merged);
    return rec;
}

static PyObject *
build_record(PyObject *self, PyObject *args)
{
    PyObject *flow, *cache;
    if (!PyArg_ParseTuple(args, "OO!", &flow, &PyDict_Type, &cache))
        return NULL;
    return record_of(flow, cache);
}

/* export(flow, merge_cache, final) -> ExportedFlow, or None (the twin's case):
 * AggregationProcess._export's work: the record, what the switched correction used up,
 * the deltas and throughputs reset, the flags (exported, clean), the ExportedFlow made
 * without running its __init__ (configure checks both agree). */
static PyObject *exported_class;
static Py_ssize_t ex_off[3]; /* record, correlation, final */
enum { C_INTRA, C_EXTERNAL, C_CORRELATED, C_DENIED, C_UNATTRIBUTED, C_UNCORRELATED, C_PENDING };

static PyObject *
correlation_of(long ft, long f) /* Flow.correlation: a borrowed reference */
{
    if (ft == INTRA_NODE || ((f & HAS_SRC) && (f & HAS_DST) && ft != INTER_NODE))
        return corr_names[C_INTRA];
    if (ft == TO_EXTERNAL || ft == FROM_EXTERNAL)
        return corr_names[C_EXTERNAL];
    if (f & CORRELATED)
        return corr_names[C_CORRELATED];
    if (f & NO_TWIN)
        return corr_names[(f & DENIED) ? C_DENIED : C_UNATTRIBUTED];
    if (f & LONE)
        return corr_names[C_UNCORRELATED];
    return corr_names[C_PENDING];
}

static PyObject *
new_exported(PyObject *record, PyObject *correlation, PyObject *final) /* steals record */
{
    PyTypeObject *tp = (PyTypeObject *)exported_class;
    PyObject *e = tp->tp_alloc(tp, 0);
    if (e == NULL) {
        Py_DECREF(record);
        return NULL;
    }
    Py_INCREF(correlation);
    Py_INCREF(final);
    *(PyObject **)((char *)e + ex_off[0]) = record;
    *(PyObject **)((char *)e + ex_off[1]) = correlation;
    *(PyObject **)((char *)e + ex_off[2]) = final;
    /* Not tracked by the cycle collector (as a Flow): it refers to its record (a dict of
     * str and int), a str and a bool, none of which refers back; a tick's 100k of them
     * would otherwise be walked by every collection until the sinks are done with them. */
    if (PyType_IS_GC(tp))
        PyObject_GC_UnTrack(e);
    return e;
}

static int snapshots_on; /* configure_snapshots ran: export makes Records */
static PyObject *snapshot_of(PyObject *flow, PyObject *cache);

static PyObject *
export_flow(PyObject *flow, PyObject *cache, PyObject *final)
{
    if (exported_class == NULL)
        Py_RETURN_NONE;
    /* the record: a snapshot (below) once configure_snapshots ran, else a dict; either checks the flow's slots */
    PyObject *rec = snapshots_on ? snapshot_of(flow, cache) : record_of(flow, cache);
    if (rec == NULL || rec == Py_None)
        return rec;
    FlowObject *fo = FL(flow); /* record_of took it: a Flow without odd values */
    long f = fo->flags, ft = fo->flow_type;
    Py_buffer sv;
    uint64_t *sw = NULL, *c = fo->n; /* the deltas are at 4-7 and 12-15 in n as in the array */
    PyObject *swo = fo->sw;
    if (swo != Py_None && (sw = u64_buffer(swo, &sv, 4)) == NULL) {
        Py_DECREF(rec);
        Py_RETURN_NONE;
    }
    int sw_left = 0;
    if (sw != NULL) { /* what the correction did not use up waits for the next delta */
        for (int k = 0; k < 4; k++) {
            sw[k] -= sw[k] < c[4 + k] ? sw[k] : c[4 + k];
            sw_left |= sw[k] != 0;
        }
        PyBuffer_Release(&sv);
    }
    memset(c + 4, 0, 4 * 8); /* the deltas, the throughputs (counters 18-23: n[16..21]) */
    memset(c + 12, 0, 4 * 8);
    memset(c + 16, 0, 6 * 8);
    if (sw != NULL && !sw_left) {
        Py_INCREF(Py_None);
        Py_SETREF(fo->sw, Py_None);
    }
    f = (f & ~DIRTY) | EXPORTED;
    fo->flags = (uint32_t)f;
    return new_exported(rec, correlation_of(ft, f), final);
}

static PyObject *
export(PyObject *self, PyObject *args)
{
    PyObject *flow, *cache, *final;
    if (!PyArg_ParseTuple(args, "OO!O", &flow, &PyDict_Type, &cache, &final))
        return NULL;
    return export_flow(flow, cache, final);
}

/* AggregationProcess._scan's loop over flows[start:stop] for the flows it only exports
 * or skips: a removed flow is skipped, a ready one with changes is exported (appended
 * to out, as _export(flow, final=False) does), and the scan stops at the first flow
 * whose inactivity timeout is over or that export hands back (not a Flow as it makes
 * them): the twin takes that one. Returns (where it stopped, how many it exported). */
static PyObject *
scan(PyObject *self, PyObject *args)
{
    PyObject *flows, *cache, *out;
    Py_ssize_t start, stop;
    double horizon;
    if (!PyArg_ParseTuple(args, "O!nndO!O!", &PyList_Type, &flows, &start, &stop, &horizon, &PyDict_Type, &cache,
                          &PyList_Type, &out))
        return NULL;
    if (stop > PyList_GET_SIZE(flows))
        stop = PyList_GET_SIZE(flows);
    Py_ssize_t i = start < 0 ? 0 : start, n = 0;
    for (; i < stop; i++) {
        PyObject *flow = PyList_GET_ITEM(flows, i);
        if (!IS_FLOW(flow) || FL(flow)->odd != NULL)
            break;
        PyObject *ls = FL(flow)->last_seen;
        long f = FL(flow)->flags;
        if (f & REMOVED)
            continue;
        double seen;
        if (PyFloat_CheckExact(ls))
            seen = PyFloat_AS_DOUBLE(ls);
        else
            break; /* an int clock (or anything else): compared by the twin */
        if (seen <= horizon)
            break;
        if (!((f & READY) && (f & DIRTY)))
            continue;
        Py_INCREF(flow);
        PyObject *e = export_flow(flow, cache, Py_False);
        Py_DECREF(flow);
        if (e == NULL)
            return NULL;
        if (e == Py_None) {
            Py_DECREF(e);
            break;
        }
        int r = PyList_Append(out, e);
        Py_DECREF(e);
        if (r < 0)
            return NULL;
        n++;
    }
    return Py_BuildValue("nn", i, n);
}

/* Bind export() to the ExportedFlow class and Flow.correlation's names (checked). */
static PyObject *
configure_export(PyObject *self, PyObject *args)
{
    PyObject *cls, *names;
    if (!PyArg_ParseTuple(args, "OO!", &cls, &PyTuple_Type, &names))
        return NULL;
    if (!configured || PyTuple_GET_SIZE(names) != 7) {
        PyErr_SetString(PyExc_ValueError, "configure_export: configure first, with 7 correlation names");
        return NULL;
    }
    PyObject *cdict = PyObject_GetAttrString(cls, "__dict__");
    if (cdict == NULL)
        return NULL;
    static const char *fields[3] = {"record", "correlation", "final"};
    for (int i = 0; i < 3; i++) {
        PyObject *d = PyMapping_GetItemString(cdict, fields[i]);
        if (d == NULL) {
            Py_DECREF(cdict);
            return NULL;
        }
        int ok = Py_IS_TYPE(d, &PyMemberDescr_Type) && ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX;
        if (ok)
            ex_off[i] = ((PyMemberDescrObject *)d)->d_member->offset;
        Py_DECREF(d);
        if (!ok) {
            Py_DECREF(cdict);
            PyErr_Format(PyExc_ValueError, "configure_export: ExportedFlow.%s is not a slot", fields[i]);
            return NULL;
        }
    }
    Py_DECREF(cdict);
    for (int i = 0; i < 7; i++) {
        PyObject *n = PyTuple_GET_ITEM(names, i);
        Py_INCREF(n);
        Py_XSETREF(corr_names[i], n);
    }
    Py_INCREF(cls);
    Py_XSETREF(exported_class, cls);
    /* the same object as ExportedFlow(record, correlation, final) makes? */
    PyObject *r = PyDict_New(), *a = r ? PyObject_CallFunction(cls, "OOO", r, corr_names[0], Py_True) : NULL;
    Py_XINCREF(r);
    PyObject *b = a ? new_exported(r, corr_names[0], Py_True) : NULL;
    int same = b != NULL && PyObject_RichCompareBool(a, b, Py_EQ) == 1;
    Py_XDECREF(r);
    Py_XDECREF(a);
    Py_XDECREF(b);
    if (!same) {
        Py_CLEAR(exported_class);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "configure_export: ExportedFlow's __init__ differs from the C one");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ==== the export's snapshots: Record, and what the sinks read from it ================
 *
 * Why: a dict of 71 values per exported flow (about 40 of them new int objects), which
 * the IPFIX sink and the ClickHouse sink then read back value by value, cost more than
 * the export itself. export() makes a Record instead: one object holding a copy of the
 * flow's numbers at export time (C integers, in build_record's slot order) and
 * references to its str objects and merged Kubernetes tuple (immutable, shared). It is
 * a read-only Mapping of the record's IE names (aggregation.py registers it with
 * collections.abc.Mapping): rec[name], len, iter (template order), in, get, keys,
 * values, items, == (as its dict), and dict(rec) is build_record's dict exactly. The sinks
 * do not ask it for names: columns() writes the ClickHouse sink's columns straight from
 * the C values, encode_records() the IPFIX sink's data records.
 *
 * configure_snapshots() -> None: binds the Record layout to configure's (call after it)
 * columns(flows, plan, objects) -> (columns, bad, final) or None
 * configure_ipfix(codes) / encode_sets(flows, limit) -> ([(payload, records)] x 4 layouts, [left flows]) or None
 */
enum { K_SRC = -1, K_DST = -2, K_TCP = -3, K_EXP = -4, K_META = -16 }; /* K_META - i: merged[i] */
static Py_ssize_t slot_kind[N_OUT_MAX], n_num;
static PyObject *name_pos[4]; /* per layout: dict name -> template position */

typedef struct {
    PyObject_VAR_HEAD
    PyObject *src, *dst, *merged, *tcp, *exporter;
    int li;
    uint64_t v[1]; /* n_num numbers: the slots whose slot_kind is >= 0 */
} RecordObject;

static PyTypeObject RecordType;
#define IS_RECORD(o) Py_IS_TYPE((o), &RecordType)
#define RC(o) ((RecordObject *)(o))

/* The value of slot s (a borrowed reference in *obj, or the number in *num with *obj NULL). */
static inline void
rec_slot(const RecordObject *r, Py_ssize_t s, PyObject **obj, uint64_t *num)
{
    Py_ssize_t k = slot_kind[s];
    *obj = k >= 0 ? NULL
           : k == K_SRC ? r->src
           : k == K_DST ? r->dst
           : k == K_TCP ? r->tcp
           : k == K_EXP ? r->exporter
                        : PyTuple_GET_ITEM(r->merged, K_META - k);
    *num = k >= 0 ? r->v[k] : 0;
}

static PyObject *
rec_value(const RecordObject *r, Py_ssize_t s) /* a new reference */
{
    PyObject *o;
    uint64_t x;
    rec_slot(r, s, &o, &x);
    if (o == NULL)
        return PyLong_FromUnsignedLongLong(x);
    Py_INCREF(o);
    return o;
}

static PyObject *
rec_dict(PyObject *self, PyObject *unused)
{
    RecordObject *r = RC(self);
    PyObject *obj[N_OUT_MAX];
    uint64_t num[N_OUT_MAX];
    for (Py_ssize_t s = 0; s < n_out; s++)
        rec_slot(r, s, &obj[s], &num[s]);
    return dict_of(r->li, obj, num);
}

static PyObject *
snapshot_of(PyObject *flow, PyObject *cache)
{
    Gathered g;
    int ok = gather(flow, cache, &g);
    if (ok <= 0) {
        if (ok < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    RecordObject *r = PyObject_NewVar(RecordObject, &RecordType, n_num);
    if (r == NULL) {
        Py_DECREF(g.merged);
        return NULL;
    }
    r->merged = g.merged; /* gather's reference */
    r->li = g.li;
    r->src = r->dst = r->tcp = r->exporter = NULL;
    for (Py_ssize_t s = 0; s < n_out; s++) {
        Py_ssize_t k = slot_kind[s];
        PyObject *o = g.obj[s];
        if ((k >= 0) != (o == NULL)) { /* gather and configure_snapshots disagree: a bug */
            Py_DECREF(r);
            PyErr_SetString(PyExc_SystemError, "Record: slot kinds differ from build_record's values");
            return NULL;
        }
        if (k >= 0) {
            r->v[k] = g.num[s];
        } else if (k > K_META) {
            PyObject **at = k == K_SRC ? &r->src : k == K_DST ? &r->dst : k == K_TCP ? &r->tcp : &r->exporter;
            Py_INCREF(o);
            *at = o;
        }
    }
    return (PyObject *)r;
}

static void
rec_dealloc(PyObject *self)
{
    RecordObject *r = RC(self);
    Py_XDECREF(r->src);
    Py_XDECREF(r->dst);
    Py_XDECREF(r->merged);
    Py_XDECREF(r->tcp);
    Py_XDECREF(r->exporter);
    Py_TYPE(self)->tp_free(self);
}

static Py_ssize_t
rec_len(PyObject *self)
{
    return n_out;
}

/* The slot of name in r's layout: >= 0, -1 not there (no error), -2 error. */
static Py_ssize_t
rec_find(const RecordObject *r, PyObject *name)
{
    PyObject *j = PyDict_GetItemWithError(name_pos[r->li], name);
    if (j == NULL)
        return PyErr_Occurred() ? -2 : -1;
    return out_order[r->li][PyLong_AsSsize_t(j)];
}

static PyObject *
rec_getitem(PyObject *self, PyObject *name)
{
    Py_ssize_t s = rec_find(RC(self), name);
    if (s < 0) {
        if (s == -1)
            PyErr_SetObject(PyExc_KeyError, name);
        return NULL;
    }
    return rec_value(RC(self), s);
}

static int
rec_contains(PyObject *self, PyObject *name)
{
    Py_ssize_t s = rec_find(RC(self), name);
    return s == -2 ? -1 : s >= 0;
}

static PyObject *
rec_get(PyObject *self, PyObject *args)
{
    PyObject *name, *dflt = Py_None;
    if (!PyArg_UnpackTuple(args, "get", 1, 2, &name, &dflt))
        return NULL;
    Py_ssize_t s = rec_find(RC(self), name);
    if (s == -2)
        return NULL;
    if (s == -1) {
        Py_INCREF(dflt);
        return dflt;
    }
    return rec_value(RC(self), s);
}

static PyObject *
rec_iter(PyObject *self)
{
    return PyObject_GetIter(out_names[RC(self)->li]);
}

static PyObject *
rec_view(PyObject *self, const char *which)
{
    PyObject *d = rec_dict(self, NULL);
    if (d == NULL)
        return NULL;
    PyObject *v = PyObject_CallMethod(d, which, NULL);
    Py_DECREF(d);
    return v;
}

static PyObject *rec_keys(PyObject *self, PyObject *unused) { return rec_view(self, "keys"); }
static PyObject *rec_values(PyObject *self, PyObject *unused) { return rec_view(self, "values"); }
static PyObject *rec_items(PyObject *self, PyObject *unused) { return rec_view(self, "items"); }

static PyObject *
rec_richcompare(PyObject *self, PyObject *other, int op)
{
    if (op != Py_EQ && op != Py_NE)
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *a = rec_dict(self, NULL);
    PyObject *b = a == NULL ? NULL : IS_RECORD(other) ? rec_dict(other, NULL) : (Py_INCREF(other), other);
    PyObject *res = b == NULL ? NULL : PyObject_RichCompare(a, b, op);
    Py_XDECREF(a);
    Py_XDECREF(b);
    return res;
}

static PyObject *
rec_repr(PyObject *self)
{
    PyObject *d = rec_dict(self, NULL);
    if (d == NULL)
        return NULL;
    PyObject *s = PyUnicode_FromFormat("Record(%R)", d);
    Py_DECREF(d);
    return s;
}

static PyObject *
rec_reduce(PyObject *self, PyObject *unused) /* pickles (and copies) as its dict */
{
    PyObject *d = rec_dict(self, NULL);
    return d == NULL ? NULL : Py_BuildValue("O(N)", (PyObject *)&PyDict_Type, d);
}

static PyObject *
rec_sizeof(PyObject *self, PyObject *unused)
{
    return PyLong_FromSsize_t(RecordType.tp_basicsize + n_num * (Py_ssize_t)sizeof(uint64_t));
}

static PyMethodDef rec_methods[] = {
    {"get", rec_get, METH_VARARGS, "rec.get(name[, default])"},
    {"keys", rec_keys, METH_NOARGS, "The IE names, in template order (a view of dict(rec))."},
    {"values", rec_values, METH_NOARGS, "The values, in template order."},
    {"items", rec_items, METH_NOARGS, "(name, value) pairs, in template order."},
    {"copy", rec_dict, METH_NOARGS, "The record as a dict (build_record's)."},
    {"__reduce__", rec_reduce, METH_NOARGS, NULL},
    {"__sizeof__", rec_sizeof, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};
static PyMappingMethods rec_as_mapping = {.mp_length = rec_len, .mp_subscript = rec_getitem};
static PySequenceMethods rec_as_sequence = {.sq_contains = rec_contains};

static PyTypeObject RecordType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "flowscope.aggregator._aggr.Record",
    .tp_basicsize = offsetof(RecordObject, v),
    .tp_itemsize = sizeof(uint64_t),
    .tp_dealloc = rec_dealloc,
    .tp_repr = rec_repr,
    .tp_as_mapping = &rec_as_mapping,
    .tp_as_sequence = &rec_as_sequence,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_MAPPING,
    .tp_doc = "An aggregated record as export() made it: a read-only Mapping of IE names (see _aggr.c).",
    .tp_richcompare = rec_richcompare,
    .tp_iter = rec_iter,
    .tp_methods = rec_methods,
};

/* configure_snapshots(): the Record's slot kinds from build_record's slot order (gather),
 * and a name -> position dict per layout. Called after configure and configure_export. */
static PyObject *
configure_snapshots(PyObject *self, PyObject *unused)
{
    if (!configured || exported_class == NULL || n_out <= 0) {
        PyErr_SetString(PyExc_ValueError, "configure_snapshots: configure and configure_export first");
        return NULL;
    }
    Py_ssize_t meta0 = 16, ft = meta0 + n_meta + 2, k = 0;
    for (Py_ssize_t s = 0; s < n_out; s++) {
        if (s == 3)
            slot_kind[s] = K_SRC;
        else if (s == 4)
            slot_kind[s] = K_DST;
        else if (s >= meta0 && s < ft)
            slot_kind[s] = K_META - (s - meta0);
        else if (s == ft + 1)
            slot_kind[s] = K_TCP;
        else if (s == ft + 2)
            slot_kind[s] = K_EXP;
        else
            slot_kind[s] = k++;
    }
    n_num = k;
    for (int li = 0; li < 4; li++) {
        PyObject *d = PyDict_New();
        if (d == NULL)
            return NULL;
        for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(out_names[li]); j++) {
            PyObject *pos = PyLong_FromSsize_t(j);
            if (pos == NULL || PyDict_SetItem(d, PyTuple_GET_ITEM(out_names[li], j), pos) < 0) {
                Py_XDECREF(pos);
                Py_DECREF(d);
                return NULL;
            }
            Py_DECREF(pos);
        }
        Py_XSETREF(name_pos[li], d);
    }
    snapshots_on = 1;
    Py_RETURN_NONE;
}

/* The record and correlation of an ExportedFlow as export() makes it (borrowed), or 0. */
static inline int
exported_parts(PyObject *e, RecordObject **rec, PyObject **corr, PyObject **final)
{
    if (exported_class == NULL || (PyObject *)Py_TYPE(e) != exported_class)
        return 0;
    PyObject *r = *(PyObject **)((char *)e + ex_off[0]);
    *corr = *(PyObject **)((char *)e + ex_off[1]);
    *final = *(PyObject **)((char *)e + ex_off[2]);
    if (r == NULL || !IS_RECORD(r) || *corr == NULL || *final == NULL)
        return 0;
    *rec = RC(r);
    return 1;
}

/* A text value of a str (exact, UTF-8): 1 with ptr/len, 0 not text (no error set). */
static inline int
snap_text(PyObject *v, const char **ptr, Py_ssize_t *len)
{
    if (!PyUnicode_CheckExact(v))
        return 0;
    if (PyUnicode_IS_COMPACT_ASCII(v)) { /* its UTF-8 is its data */
        *ptr = (const char *)PyUnicode_DATA(v);
        *len = PyUnicode_GET_LENGTH(v);
        return 1;
    }
    *ptr = PyUnicode_AsUTF8AndSize(v, len);
    if (*ptr == NULL) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* Truth as collector/_rowcols.c's transpose tells it (the Record holds its values). */
static inline int
snap_truth(PyObject *o, uint64_t x)
{
    if (o == NULL)
        return x != 0;
    if (o == Py_None)
        return 0;
    if (PyUnicode_CheckExact(o))
        return PyUnicode_GET_LENGTH(o) != 0;
    int t = PyObject_IsTrue(o);
    if (t < 0)
        PyErr_Clear();
    return t;
}

typedef struct {
    COLOUT_HEAD /* kind 0 integer (1, 2, 4, 8 bytes), 1 text */
    int folded; /* `a or b or ""` */
    unsigned long long maximum;
    Py_ssize_t a[4], b[4]; /* per layout: the slot of the element(s), -1 none */
} SnapCol;

/* columns(flows, plan, objects) -> (columns, bad, final) or None
 *
 * collector/_rowcols.c's transpose of the ExportedFlows' records and correlations, read
 * from the Records' C values instead of dicts: plan is (kind, width, element, element2
 * or None) per record column (collector.rows' plan, by name); columns as transpose's
 * (an integer column bytes of its width, a text column (offsets, data) or, objects true,
 * a list of str; the correlation column last); bad the left-out flows' indices (a value
 * its column cannot hold: the same checks as transpose); final the kept flows' final
 * flags as bytes of 0/1. None when a flow is not one export() made (the caller converts
 * the batch the dict way). */
static PyObject *
columns(PyObject *self, PyObject *args)
{
    PyObject *flows, *plan;
    int objects;
    if (!PyArg_ParseTuple(args, "O!O!p", &PyList_Type, &flows, &PyTuple_Type, &plan, &objects))
        return NULL;
    if (!snapshots_on)
        Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(flows), nplan = PyTuple_GET_SIZE(plan), ncols = nplan + 1, held = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        RecordObject *r;
        PyObject *c, *f;
        if (!exported_parts(PyList_GET_ITEM(flows, i), &r, &c, &f))
            Py_RETURN_NONE;
    }
    /* Each flow's record and correlation held, and its final flag read, before anything
     * else: a final flag's __bool__ (not what export() sets, but any object) may run code
     * that changes the list or the flows. */
    RecordObject **recs = PyMem_Calloc(n ? n : 1, sizeof(RecordObject *));
    PyObject **corrs = PyMem_Calloc(n ? n : 1, sizeof(PyObject *));
    char *fins = PyMem_Calloc(n ? n : 1, 1);
    SnapCol *cols = PyMem_Calloc(ncols, sizeof(SnapCol));
    const char **tptr = PyMem_Calloc(ncols, sizeof(char *));
    Py_ssize_t *tlen = PyMem_Calloc(ncols, sizeof(Py_ssize_t));
    PyObject **tobj = PyMem_Calloc(ncols, sizeof(PyObject *));
    uint64_t *ival = PyMem_Calloc(ncols, sizeof(uint64_t));
    PyObject *bad = PyList_New(0), *final = PyBytes_FromStringAndSize(NULL, n), *result = NULL;
    if (!recs || !corrs || !fins || !cols || !tptr || !tlen || !tobj || !ival || !bad || !final) {
        PyErr_NoMemory();
        goto done;
    }
    for (; held < n && held < PyList_GET_SIZE(flows); held++) {
        PyObject *f;
        if (!exported_parts(PyList_GET_ITEM(flows, held), &recs[held], &corrs[held], &f)) {
            PyErr_SetString(PyExc_RuntimeError, "columns: the batch changed while it was read");
            goto done;
        }
        Py_INCREF(recs[held]);
        Py_INCREF(corrs[held]);
        int t = PyBool_Check(f) ? f == Py_True : PyObject_IsTrue(f);
        if (t < 0) {
            held++;
            goto done;
        }
        fins[held] = (char)t;
    }
    if (held < n) {
        PyErr_SetString(PyExc_RuntimeError, "columns: the batch changed while it was read");
        goto done;
    }
    for (Py_ssize_t j = 0; j < ncols; j++) {
        SnapCol *c = &cols[j];
        if (j < nplan) {
            PyObject *spec = PyTuple_GET_ITEM(plan, j);
            if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 4) {
                PyErr_SetString(PyExc_ValueError, "plan entries are (kind, width, element, element2 or None)");
                goto done;
            }
            c->kind = (int)PyLong_AsLong(PyTuple_GET_ITEM(spec, 0));
            c->width = (int)PyLong_AsLong(PyTuple_GET_ITEM(spec, 1));
            if (PyErr_Occurred())
                goto done;
            if ((c->kind != 0 && c->kind != 1) ||
                (c->kind == 0 && c->width != 1 && c->width != 2 && c->width != 4 && c->width != 8)) {
                PyErr_SetString(PyExc_ValueError, "bad plan entry");
                goto done;
            }
            for (int li = 0; li < 4; li++) {
                RecordObject probe = {.li = li};
                PyObject *na = PyTuple_GET_ITEM(spec, 2), *nb = PyTuple_GET_ITEM(spec, 3);
                c->a[li] = rec_find(&probe, na);
                c->b[li] = nb == Py_None ? -1 : rec_find(&probe, nb);
                c->folded = nb != Py_None;
                if (c->a[li] == -2 || c->b[li] == -2)
                    goto done;
            }
        } else {
            c->kind = 1;
            for (int li = 0; li < 4; li++)
                c->a[li] = c->b[li] = -1;
        }
        if (c->kind == 0)
            c->maximum = c->width == 8 ? ~0ULL : ((1ULL << (8 * c->width)) - 1);
        if (colout_alloc((ColOut *)c, n, objects) < 0)
            goto done;
    }
    static PyObject *empty;
    if (empty == NULL && (empty = PyUnicode_New(0, 0)) == NULL)
        goto done;
    Py_ssize_t kept = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        RecordObject *r = recs[i];
        PyObject *corr = corrs[i];
        int li = r->li, ok = 1;
        for (Py_ssize_t j = 0; ok && j < nplan; j++) {
            SnapCol *c = &cols[j];
            PyObject *o = NULL;
            uint64_t x = 0;
            int present = c->a[li] >= 0;
            if (present)
                rec_slot(r, c->a[li], &o, &x);
            if (c->kind == 0) {
                if (!present) {
                    ival[j] = 0;
                } else if (o == NULL) {
                    ok = x <= c->maximum;
                    ival[j] = x;
                } else if (!PyLong_Check(o)) {
                    ok = 0;
                } else {
                    unsigned long long y = PyLong_AsUnsignedLongLong(o);
                    if (y == (unsigned long long)-1 && PyErr_Occurred()) {
                        PyErr_Clear();
                        ok = 0;
                    } else {
                        ok = y <= c->maximum;
                        ival[j] = y;
                    }
                }
                continue;
            }
            if (c->folded) { /* v4 or v6 or "" */
                if (!present || !snap_truth(o, x)) {
                    present = c->b[li] >= 0;
                    o = NULL;
                    x = 0;
                    if (present)
                        rec_slot(r, c->b[li], &o, &x);
                    if (present && !snap_truth(o, x))
                        present = 0;
                }
            }
            if (!present) {
                o = empty;
            } else if (o == NULL) { /* a number in a text column */
                ok = 0;
                break;
            }
            if (!snap_text(o, &tptr[j], &tlen[j]))
                ok = 0;
            tobj[j] = o;
        }
        if (ok) {
            ok = snap_text(corr, &tptr[nplan], &tlen[nplan]);
            tobj[nplan] = corr;
        }
        if (!ok) {
            PyObject *idx = PyLong_FromSsize_t(i);
            if (idx == NULL || PyList_Append(bad, idx) < 0) {
                Py_XDECREF(idx);
                goto done;
            }
            Py_DECREF(idx);
            continue;
        }
        PyBytes_AS_STRING(final)[kept] = fins[i];
        for (Py_ssize_t j = 0; j < ncols; j++) {
            SnapCol *c = &cols[j];
            if (c->kind == 0) {
                colout_put_int((ColOut *)c, kept, ival[j]);
            } else if (objects) {
                colout_put_obj((ColOut *)c, kept, tobj[j]);
            } else if (colout_put_text((ColOut *)c, kept, tptr[j], tlen[j]) < 0) {
                goto done;
            }
        }
        kept++;
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
    if (_PyBytes_Resize(&final, kept) < 0) {
        Py_DECREF(out);
        goto done;
    }
    result = Py_BuildValue("(NOO)", out, bad, final);

done:
    if (cols) {
        for (Py_ssize_t j = 0; j < ncols; j++) {
            colout_clear((ColOut *)&cols[j]);
        }
    }
    for (Py_ssize_t i = 0; i < held; i++) {
        Py_XDECREF(recs[i]);
        Py_XDECREF(corrs[i]);
    }
    PyMem_Free(recs);
    PyMem_Free(corrs);
    PyMem_Free(fins);
    PyMem_Free(cols);
    PyMem_Free(tptr);
    PyMem_Free(tlen);
    PyMem_Free(tobj);
    PyMem_Free(ival);
    Py_XDECREF(bad);
    Py_XDECREF(final);
    return result;
}

/* ---- the IPFIX sink's data records ----
 * Per layout, one code per template field (configure_ipfix): 1, 2, 4, 8 an unsigned
 * integer of that many octets, 'T' dateTimeSeconds, '4' / '6' an address, 'S' a
 * variable-length string: how flowscope.ipfix's codec encodes each (template.py's
 * plans). A value the codec would take some other way (an int subclass, a str that is
 * no address for inet_pton, a string past 65535 octets) leaves the record to the codec. */
typedef struct {
    char code;
    Py_ssize_t kind; /* slot_kind of the field's slot */
} IpfixOp;
static IpfixOp ipfix_ops[4][N_OUT_MAX];
static int ipfix_on;

static PyObject *
configure_ipfix(PyObject *self, PyObject *args)
{
    PyObject *codes;
    if (!PyArg_ParseTuple(args, "O!", &PyTuple_Type, &codes))
        return NULL;
    if (!snapshots_on || PyTuple_GET_SIZE(codes) != 4) {
        PyErr_SetString(PyExc_ValueError, "configure_ipfix: configure_snapshots first; 4 layouts' codes");
        return NULL;
    }
    for (int li = 0; li < 4; li++) {
        PyObject *b = PyTuple_GET_ITEM(codes, li);
        if (!PyBytes_Check(b) || PyBytes_GET_SIZE(b) != n_out) {
            PyErr_SetString(PyExc_ValueError, "configure_ipfix: one code per field of each layout");
            return NULL;
        }
        for (Py_ssize_t j = 0; j < n_out; j++) {
            char c = PyBytes_AS_STRING(b)[j];
            if (!(c == 1 || c == 2 || c == 4 || c == 8 || c == 'T' || c == '4' || c == '6' || c == 'S')) {
                PyErr_Format(PyExc_ValueError, "configure_ipfix: unknown code %d", (int)c);
                return NULL;
            }
            ipfix_ops[li][j].code = c;
            ipfix_ops[li][j].kind = slot_kind[out_order[li][j]];
        }
    }
    ipfix_on = 1;
    Py_RETURN_NONE;
}

typedef struct {
    char *p;
    Py_ssize_t len, cap;
} EncBuf;

static int
enc_room(EncBuf *b, Py_ssize_t need)
{
    if (b->len + need <= b->cap)
        return 0;
    Py_ssize_t ncap = b->cap * 2 > b->len + need ? b->cap * 2 : b->len + need + 256;
    char *np = PyMem_Realloc(b->p, ncap);
    if (np == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = np;
    b->cap = ncap;
    return 0;
}

/* An address str as inet_pton reads it, cached by the str object (the decoder interns
 * the addresses it reads, so the same objects come back): a reference is held, so no
 * other object can take a cached one's address. */
#define ADDR_CACHE 4096
static struct {
    PyObject *key;
    int v6;
    unsigned char addr[16];
} addr_cache[ADDR_CACHE];

static int
enc_addr(PyObject *o, int v6, unsigned char *out) /* 1 ok, 0 the codec's */
{
    size_t h = ((uintptr_t)o >> 4) % ADDR_CACHE;
    int w = v6 ? 16 : 4;
    if (addr_cache[h].key == o && addr_cache[h].v6 == v6) {
        memcpy(out, addr_cache[h].addr, w);
        return 1;
    }
    const char *s;
    Py_ssize_t n;
    if (!snap_text(o, &s, &n) || (Py_ssize_t)strlen(s) != n || n > 63) /* an embedded NUL: inet_pton would stop there */
        return 0;
    if (inet_pton(v6 ? AF_INET6 : AF_INET, s, out) != 1)
        return 0;
    Py_INCREF(o); /* keyed by the object and the family asked for ("0.0.0.0" may come in an IPv6 field) */
    Py_XSETREF(addr_cache[h].key, o);
    addr_cache[h].v6 = v6;
    memcpy(addr_cache[h].addr, out, w);
    return 1;
}

/* One data record of r into b: 1 done, 0 the codec's (b->len unchanged by the caller), -1 error. */
static int
enc_record(const RecordObject *r, EncBuf *b)
{
    const IpfixOp *ops = ipfix_ops[r->li];
    /* the fixed part first: at most 16 octets a field */
    if (enc_room(b, n_out * 16) < 0)
        return -1;
    for (Py_ssize_t j = 0; j < n_out; j++) {
        const IpfixOp *op = &ops[j];
        Py_ssize_t k = op->kind;
        char c = op->code;
        if (k >= 0 && (c == 8 || c == 4 || c == 'T' || c == 2 || c == 1)) { /* a C number */
            uint64_t x = r->v[k];
            int w = c == 'T' ? 4 : c;
            if (w < 8 && x >> (8 * w))
                return 0;
            x = __builtin_bswap64(x);
            if (enc_room(b, 8) < 0)
                return -1;
            memcpy(b->p + b->len, (char *)&x + (8 - w), w);
            b->len += w;
            continue;
        }
        if (k >= 0)
            return 0; /* a number where the template has an address or a string */
        PyObject *o = k == K_SRC ? r->src : k == K_DST ? r->dst : k == K_TCP ? r->tcp : k == K_EXP ? r->exporter
                      : PyTuple_GET_ITEM(r->merged, K_META - k);
        if (c == 1 || c == 2 || c == 4 || c == 8 || c == 'T') {
            int w = c == 'T' ? 4 : c;
            if (!PyLong_CheckExact(o))
                return 0;
            uint64_t x = PyLong_AsUnsignedLongLong(o);
            if (x == (uint64_t)-1 && PyErr_Occurred()) {
                PyErr_Clear();
                return 0;
            }
            if (w < 8 && x >> (8 * w))
                return 0;
            x = __builtin_bswap64(x);
            if (enc_room(b, 8) < 0)
                return -1;
            memcpy(b->p + b->len, (char *)&x + (8 - w), w);
            b->len += w;
            continue;
        }
        if (c == 'S') {
            const char *s;
            Py_ssize_t n;
            if (!snap_text(o, &s, &n) || n > 65535)
                return 0;
            if (enc_room(b, n + 3) < 0)
                return -1;
            if (n < 255) {
                b->p[b->len++] = (char)n;
            } else {
                b->p[b->len++] = (char)0xFF;
                b->p[b->len++] = (char)(n >> 8);
                b->p[b->len++] = (char)n;
            }
            memcpy(b->p + b->len, s, n);
            b->len += n;
            continue;
        }
        int v6 = c == '6';
        if (enc_room(b, 16) < 0 || !enc_addr(o, v6, (unsigned char *)b->p + b->len))
            return PyErr_Occurred() ? -1 : 0;
        b->len += v6 ? 16 : 4;
    }
    return 1;
}

/* encode_sets(flows, limit) -> (per layout a list of (payload, records), the flows left) or None
 * The IPFIX sink's data sets of a batch of ExportedFlows: each layout's records, as the
 * codec encodes their dicts, back to back in payloads of at most limit octets, filled
 * greedily as the codec fills a message (so the same records share a message); a flow
 * whose record is no Record, that holds a value the codec takes some other way, or that
 * alone exceeds limit, is left for the codec (the second list, in batch order). */
static int
flush_set(EncBuf *b, Py_ssize_t *count, PyObject *list)
{
    if (*count == 0)
        return 0;
    PyObject *item = Py_BuildValue("(y#n)", b->p, b->len, *count);
    if (item == NULL || PyList_Append(list, item) < 0) {
        Py_XDECREF(item);
        return -1;
    }
    Py_DECREF(item);
    b->len = 0;
    *count = 0;
    return 0;
}

static PyObject *
encode_sets(PyObject *self, PyObject *args)
{
    PyObject *flows;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "O!n", &PyList_Type, &flows, &limit))
        return NULL;
    if (!ipfix_on)
        Py_RETURN_NONE;
    PyObject *per[4] = {PyList_New(0), PyList_New(0), PyList_New(0), PyList_New(0)}, *left = PyList_New(0);
    PyObject *result = NULL;
    EncBuf bufs[4] = {{0}}, one = {PyMem_Malloc(1024), 0, 1024};
    Py_ssize_t counts[4] = {0};
    if (!per[0] || !per[1] || !per[2] || !per[3] || !left || one.p == NULL) {
        if (one.p == NULL)
            PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(flows); i++) {
        PyObject *e = PyList_GET_ITEM(flows, i), *corr, *fin;
        RecordObject *r;
        one.len = 0;
        int rc = exported_parts(e, &r, &corr, &fin) ? enc_record(r, &one) : 0;
        if (rc < 0)
            goto done;
        if (rc == 0 || one.len > limit) {
            if (PyList_Append(left, e) < 0)
                goto done;
            continue;
        }
        EncBuf *b = &bufs[r->li];
        if (b->len + one.len > limit && flush_set(b, &counts[r->li], per[r->li]) < 0)
            goto done;
        if (enc_room(b, one.len) < 0)
            goto done;
        memcpy(b->p + b->len, one.p, one.len);
        b->len += one.len;
        counts[r->li]++;
    }
    for (int li = 0; li < 4; li++)
        if (flush_set(&bufs[li], &counts[li], per[li]) < 0)
            goto done;
    result = Py_BuildValue("([OOOO]O)", per[0], per[1], per[2], per[3], left);
done:
    PyMem_Free(one.p);
    for (int li = 0; li < 4; li++) {
        PyMem_Free(bufs[li].p);
        Py_XDECREF(per[li]);
    }
    Py_XDECREF(left);
    return result;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS, "Bind the module to aggregation.py's Flow class, field names and constants."},
    {"ingest_many", ingest_many, METH_VARARGS, "AggregationProcess.ingest_many's loop (see the module docstring)."},
    {"build_record", build_record, METH_VARARGS, "aggregation.build_record's record of a flow, or None."},
    {"export", export, METH_VARARGS, "AggregationProcess._export of a flow, or None."},
    {"scan", scan, METH_VARARGS, "AggregationProcess._scan's loop where it only exports or skips flows."},
    {"configure_export", configure_export, METH_VARARGS, "Bind export() to ExportedFlow and the correlation names."},
    {"configure_snapshots", configure_snapshots, METH_NOARGS, "Make export() give Records (see the snapshots' section)."},
    {"columns", columns, METH_VARARGS, "The ClickHouse sink's columns of ExportedFlows with Records, or None."},
    {"configure_ipfix", configure_ipfix, METH_VARARGS, "The IPFIX sink's field codes per layout."},
    {"encode_sets", encode_sets, METH_VARARGS, "The IPFIX sink's data sets of ExportedFlows with Records."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_aggr", "The aggregation's per-record loop in C.", -1,
                                    methods};

PyMODINIT_FUNC
PyInit__aggr(void)
{
    struct { PyObject **slot; const char *name; } names[] = {
        {&s_flows, "flows"}, {&s_stats, "stats"}, {&s_shared, "_shared"}, {&s_shared_limit, "_shared_limit"},
        {&s_costs, "_costs"}, {&s_urgent, "_urgent"}, {&s_corr_timeout, "correlation_timeout"},
        {&s_max_flows, "max_flows"}, {&s_max_flow_bytes, "max_flow_bytes"}, {&s_flow_bytes, "flow_bytes"},
        {&s_cost, "_cost"}, {&s_push_timers, "_push_timers"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        *names[i].slot = PyUnicode_InternFromString(names[i].name);
        if (*names[i].slot == NULL)
            return NULL;
    }
    for (int i = 0; i < N_ODD_NAMES; i++)
        if ((odd_name[i] = PyUnicode_InternFromString(odd_name_s[i])) == NULL)
            return NULL;
    if ((empty_str = PyUnicode_New(0, 0)) == NULL || (int_zero = PyLong_FromLong(0)) == NULL ||
        PyType_Ready(&FlowType) < 0 || PyType_Ready(&CountersType) < 0 || PyType_Ready(&RecordType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&FlowType);
    if (PyModule_AddObject(m, "Flow", (PyObject *)&FlowType) < 0) {
        Py_DECREF(&FlowType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&RecordType);
    if (PyModule_AddObject(m, "Record", (PyObject *)&RecordType) < 0) {
        Py_DECREF(&RecordType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

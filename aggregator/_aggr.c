/* flowscope.aggregator._aggr: the aggregation's per-record loops in C.
 *
 * Why it exists: AggregationProcess.ingest_many spends some 4-5 us a record in Python on
 * dict lookups, tuple building, integer objects and attribute traffic, the biggest stage
 * of the Flow Aggregator. This module runs the same loop (aggregator/aggregation.py,
 * AggregationProcess._ingest_py, is its pure-Python twin and the reference) over the same
 * objects: the flows dict, the Flow instances (their slots read and written in place, their
 * counters through the array's buffer), the process's shared-value and cost caches, its
 * urgent list and timer groups.
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
 * the values straight from the counters' buffer into a copy of the layout's dict of
 * names (template order, str keys, as a dict built in Python). export does _export's:
 * that record, the counters reset, the flags, the ExportedFlow. New Flows and
 * ExportedFlows are made by their types' allocators with their slots set here; configure
 * checks that this gives what their __init__ gives.
 *
 * configure(flow_class, v4_fields, v6_fields, meta_v4, meta_v6, labels, deltas, zero4,
 *           end_reasons, deny_actions, meta_index, constants, layouts, empty, defaults,
 *           owners, zero26)
 * ingest_many(proc, records, exporter, domain, now, fallback) -> records kept
 * build_record(flow, merge_cache) -> dict, or None (the twin's case)
 * configure_export(exported_flow_class, correlation_names)
 * export(flow, merge_cache, final) -> ExportedFlow, or None (the twin's case)
 * scan(flows, start, stop, horizon, merge_cache, out) -> (where it stopped, exported)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <stdint.h>
#include <string.h>

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

enum { S_KEY, S_FLOW_TYPE, S_FLAGS, S_C, S_SMETA, S_DMETA, S_SEXP, S_DEXP, S_SDOM, S_DDOM, S_REASON, S_TCP,
       S_LAST_SEEN, S_SW, N_SLOTS };
static const char *slot_names[N_SLOTS] = {"key", "flow_type", "flags", "c", "smeta", "dmeta", "sexp", "dexp",
                                          "sdom", "ddom", "reason", "tcp_state", "last_seen", "sw"};
static Py_ssize_t slot_off[N_SLOTS];
#define SLOT(o, i) (*(PyObject **)((char *)(o) + slot_off[i]))

enum { F_SRC, F_DST, F_SPORT, F_DPORT, F_PROTO, F_PT, F_OT, F_RPT, F_ROT, F_START, F_END, F_REASON, F_FT, F_TCP,
       N_FIELDS };
#define N_META_MAX 64

static PyObject *flow_class, *fields4[N_FIELDS], *fields6[N_FIELDS], *meta4[N_META_MAX], *meta6[N_META_MAX];
static PyObject *labels[2], *deltas[4], *zero4, *zero26, *end_reasons, *deny_actions, *empty_str, *int_zero;
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
static Py_ssize_t out_order[4][N_OUT_MAX], n_out;
static PyObject *zero_addr; /* "0.0.0.0": a flow's exporter when it has none */
static PyObject *empty_values, *meta_defaults[2]; /* aggregation._EMPTY, _META_DEFAULTS */
static int owner_of[N_META_MAX + 2];
#define CACHED_COST 1024

static void
set_slot(PyObject *o, int i, PyObject *v) /* v: a new reference, stolen */
{
    PyObject *old = SLOT(o, i);
    SLOT(o, i) = v;
    Py_XDECREF(old);
}

static void
set_slot_borrowed(PyObject *o, int i, PyObject *v)
{
    Py_INCREF(v);
    set_slot(o, i, v);
}

/* An exact int in 0..2^64-1 into *out; 0 when it is anything else (no error set). */
static int
as_u64(PyObject *v, uint64_t *out)
{
    if (!PyLong_CheckExact(v))
        return 0;
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

/* A new Flow as Flow.__init__(key, flow_type, now) makes it, without running Python:
 * allocated by its type, its slots set here (configure checks both agree). Not tracked
 * by the cycle collector: what a Flow refers to (tuples of str and int, str, int, float,
 * arrays) never refers back to it, so it is never part of a cycle, and a store of 100k
 * flows is not walked by every full collection. A new reference, or NULL. */
static PyObject *
new_flow(PyObject *key, PyObject *flow_type, PyObject *now)
{
    PyTypeObject *tp = (PyTypeObject *)flow_class;
    PyObject *c = PySequence_GetSlice(zero26, 0, NC);
    if (c == NULL)
        return NULL;
    PyObject *flow = tp->tp_alloc(tp, 0);
    if (flow == NULL) {
        Py_DECREF(c);
        return NULL;
    }
    PyObject *init[N_SLOTS] = {
        [S_KEY] = key, [S_FLOW_TYPE] = flow_type, [S_FLAGS] = int_zero, [S_C] = c, [S_SMETA] = Py_None,
        [S_DMETA] = Py_None, [S_SEXP] = Py_None, [S_DEXP] = Py_None, [S_SDOM] = int_zero, [S_DDOM] = int_zero,
        [S_REASON] = int_zero, [S_TCP] = empty_str, [S_LAST_SEEN] = now, [S_SW] = Py_None,
    };
    for (int i = 0; i < N_SLOTS; i++) {
        if (i != S_C)
            Py_INCREF(init[i]);
        SLOT(flow, i) = init[i];
    }
    if (PyType_IS_GC(tp))
        PyObject_GC_UnTrack(flow);
    return flow;
}

/* Whether new_flow makes what Flow.__init__ makes (slot by slot, the counters by value). */
static int
check_new_flow(void)
{
    PyObject *key = Py_BuildValue("(ssiii)", "10.0.0.1", "10.0.0.2", 40000, 80, 6), *ft = PyLong_FromLong(2),
             *now = PyFloat_FromDouble(5.0);
    PyObject *a = key && ft && now ? PyObject_CallFunctionObjArgs(flow_class, key, ft, now, NULL) : NULL;
    PyObject *b = a ? new_flow(key, ft, now) : NULL;
    int ok = b != NULL;
    for (int i = 0; ok && i < N_SLOTS; i++) {
        PyObject *x = SLOT(a, i), *y = SLOT(b, i);
        ok = x != NULL && y != NULL && Py_TYPE(x) == Py_TYPE(y) && PyObject_RichCompareBool(x, y, Py_EQ) == 1;
    }
    Py_XDECREF(key);
    Py_XDECREF(ft);
    Py_XDECREF(now);
    Py_XDECREF(a);
    Py_XDECREF(b);
    if (PyErr_Occurred())
        return -1;
    if (!ok)
        PyErr_SetString(PyExc_ValueError, "configure: Flow.__init__ sets its slots otherwise than the C constructor");
    return ok ? 0 : -1;
}

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
    if (empty_str == NULL && ((empty_str = PyUnicode_New(0, 0)) == NULL || (int_zero = PyLong_FromLong(0)) == NULL))
        return NULL;
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
    PyObject *cdict = PyObject_GetAttrString(cls, "__dict__");
    if (cdict == NULL)
        return NULL;
    for (int i = 0; i < N_SLOTS; i++) {
        PyObject *d = PyMapping_GetItemString(cdict, slot_names[i]);
        if (d == NULL) {
            Py_DECREF(cdict);
            return NULL;
        }
        if (!Py_IS_TYPE(d, &PyMemberDescr_Type) || ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX) {
            Py_DECREF(d);
            Py_DECREF(cdict);
            PyErr_Format(PyExc_ValueError, "configure: Flow.%s is not a slot", slot_names[i]);
            return NULL;
        }
        slot_off[i] = ((PyMemberDescrObject *)d)->d_member->offset;
        Py_DECREF(d);
    }
    Py_DECREF(cdict);
    Py_INCREF(cls);
    Py_XSETREF(flow_class, cls);
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
    if (check_new_flow() < 0)
        return NULL;
    kt_clear();
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
 * The values of a record come from the decoder's caches, so the records of one Pod's
 * connections carry the very same objects: a small direct-mapped table keyed by the
 * values' identities finds the tuple made for the previous such record without building,
 * hashing or comparing a 27-item tuple (twice for the cost cache, once for the shared
 * one). A miss builds the tuple as the twin does (its cost from the process's cache or
 * proc._cost), interned in proc._shared by side_adopt once a flow takes it. The table keeps only tuples whose strings are
 * short (CACHED_COST): bounded, and never the keeper of a peer's 60 KB names. */
#define MC_SIZE 2048
static struct {
    PyObject *t;
    long long cost;
} mcache[MC_SIZE];

static PyObject *
side_tuple(Ctx *x, PyObject **mv, long long *cost, size_t *at) /* a new reference, or NULL */
{
    /* *at: MC_SIZE when the tuple is the shared one already (a hit), else the table's slot
     * for side_adopt, which shares it once a flow takes it: a record dropped (flow cap,
     * byte budget) leaves nothing behind in proc._shared, as with the twin. */
    Py_ssize_t n = n_meta + 2;
    uint64_t h = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        h = (h ^ ((uintptr_t)mv[i] >> 4)) * 0x9E3779B97F4A7C15ULL;
    *at = (size_t)(h >> 53) & (MC_SIZE - 1);
    PyObject *t = mcache[*at].t;
    if (t != NULL) {
        Py_ssize_t i = 0;
        while (i < n && PyTuple_GET_ITEM(t, i) == mv[i])
            i++;
        if (i == n) {
            *cost = mcache[*at].cost;
            *at = MC_SIZE;
            Py_INCREF(t);
            return t;
        }
    }
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
        Py_INCREF(sm);
        Py_XSETREF(mcache[at].t, sm);
        mcache[at].cost = cost;
    }
    return sm;
}

enum { DONE, FALLBACK, ERROR };

/* One record: DONE (taken or dropped, *taken says), FALLBACK (the twin must take it) or ERROR. */
static int
one(Ctx *x, PyObject *rec, int *taken)
{
    *taken = 0;
    if (!PyDict_CheckExact(rec))
        return FALLBACK;
    PyObject *by_id[N_IDS_MAX];
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
    PyObject *key = PyTuple_Pack(5, val[F_SRC], val[F_DST], val[F_SPORT], val[F_DPORT], val[F_PROTO]);
    if (key == NULL)
        return ERROR;
    PyObject *flow = PyDict_GetItemWithError(x->flows, key);
    if (flow == NULL && PyErr_Occurred()) {
        Py_DECREF(key);
        return ERROR;
    }
    int status = ERROR;
    PyObject *meta = NULL;
    size_t meta_at = MC_SIZE;
    Py_buffer cview, swview;
    int have_c = 0, have_sw = 0;
    uint64_t cz[NC];
    uint64_t *c, *sw = NULL; /* sw: the flow's correction, NULL when None */
    long flags, flow_type;
    int is_new = flow == NULL;
    long long new_cost = 0;
    if (is_new) {
        if (PyDict_GET_SIZE(x->flows) >= x->max_flows) {
            x->received++;
            x->cap++;
            Py_DECREF(key);
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
        memset(cz, 0, sizeof cz);
        c = cz;
        if (!ft) {
            ft = truthy(mv[i_src_pod]) && truthy(mv[i_dst_pod]) ? INTRA_NODE : INTER_NODE;
            flags = v6 ? (UNTYPED | IPV6) : UNTYPED;
        } else {
            flags = v6 ? IPV6 : 0;
        }
        flow_type = ft;
    } else {
        Py_INCREF(flow);
        PyObject *fo = SLOT(flow, S_FLAGS), *to = SLOT(flow, S_FLOW_TYPE), *co = SLOT(flow, S_C),
                 *so = SLOT(flow, S_SW);
        if (!Py_IS_TYPE(flow, (PyTypeObject *)flow_class) || fo == NULL || to == NULL || co == NULL || so == NULL ||
            !as_long(fo, &flags) || !as_long(to, &flow_type)) {
            status = FALLBACK;
            goto out;
        }
        c = u64_buffer(co, &cview, NC);
        if (c == NULL) {
            status = FALLBACK;
            goto out;
        }
        have_c = 1;
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
                PyObject *t = PyLong_FromLong(flow_type);
                if (t == NULL)
                    goto out;
                set_slot(flow, S_FLOW_TYPE, t);
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
        PyObject *k0 = intern_shared(x, val[F_SRC]), *k1 = intern_shared(x, val[F_DST]),
                 *k3 = intern_shared(x, val[F_DPORT]);
        PyObject *ikey = (k0 && k1 && k3) ? PyTuple_Pack(5, k0, k1, val[F_SPORT], k3, val[F_PROTO]) : NULL;
        Py_XDECREF(k0);
        Py_XDECREF(k1);
        Py_XDECREF(k3);
        if (ikey == NULL)
            goto out;
        PyObject_GC_UnTrack(ikey); /* str and int only: what the collector would find and do */
        PyObject *fto = PyLong_FromLong(flow_type);
        flow = fto ? new_flow(ikey, fto, x->now) : NULL;
        Py_XDECREF(fto);
        if (flow == NULL || PyDict_SetItem(x->flows, ikey, flow) < 0) {
            Py_DECREF(ikey);
            goto out;
        }
        Py_DECREF(ikey);
        x->flow_bytes += FLOW_COST;
        x->created++;
        c = u64_buffer(SLOT(flow, S_C), &cview, NC);
        if (c == NULL) {
            PyErr_SetString(PyExc_SystemError, "a new Flow's counters are not an array('Q') of 26");
            goto out;
        }
        have_c = 1;
    } else {
        PyObject *t = PyLong_FromLong(flow_type);
        if (t == NULL)
            goto out;
        set_slot(flow, S_FLOW_TYPE, t);
    }
    if (reset)
        x->resets++;
    if (switched) {
        if (sw == NULL) {
            PyObject *nw = PySequence_GetSlice(zero4, 0, 4);
            if (nw == NULL)
                goto out;
            set_slot(flow, S_SW, nw);
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
    int ms = side ? S_DMETA : S_SMETA;
    PyObject *old = SLOT(flow, ms);
    int eq;
    if (meta == NULL && PyTuple_CheckExact(old) && PyTuple_GET_SIZE(old) == n_meta + 2) {
        eq = 1;
        for (Py_ssize_t i = 0; i < n_meta + 2 && eq > 0; i++)
            eq = PyObject_RichCompareBool(PyTuple_GET_ITEM(old, i), mv[i], Py_EQ);
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
        set_slot_borrowed(flow, ms, meta);
        x->flow_bytes += new_cost - b;
        changed = 1;
    }
    set_slot_borrowed(flow, side ? S_DEXP : S_SEXP, x->exporter);
    set_slot_borrowed(flow, side ? S_DDOM : S_SDOM, x->domain);

    /* Times and state from the newest record. */
    int ended = PySet_Contains(end_reasons, val[F_REASON]);
    if (ended < 0)
        goto out;
    if (end >= c[25]) {
        c[25] = end;
        if (start)
            c[24] = start;
        long old_reason;
        PyObject *ro = SLOT(flow, S_REASON);
        int differs = PyLong_CheckExact(ro) && as_long(ro, &old_reason) ? old_reason != reason
                                                                           : PyObject_RichCompareBool(val[F_REASON], ro, Py_NE);
        if (differs < 0)
            goto out;
        if (differs) {
            if (ended)
                changed = 1;
            set_slot_borrowed(flow, S_REASON, val[F_REASON]);
        }
        if (tcp != Py_None) {
            PyObject *ot_ = SLOT(flow, S_TCP);
            int same = ot_ == tcp ? 1 : PyObject_RichCompareBool(tcp, ot_, Py_EQ);
            if (same < 0)
                goto out;
            if (!same) {
                PyObject *st = intern_shared(x, tcp);
                if (st == NULL)
                    goto out;
                set_slot(flow, S_TCP, st);
                changed = 1;
            }
        }
    }
    set_slot_borrowed(flow, S_LAST_SEEN, x->now);
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
    int ea = PySet_Contains(deny_actions, mv[i_egress]);
    int ia = ea < 0 ? -1 : PySet_Contains(deny_actions, mv[i_ingress]);
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
    PyObject *fl = PyLong_FromLong(flags);
    if (fl == NULL)
        goto out;
    set_slot(flow, S_FLAGS, fl);
    x->received++;
    *taken = 1;
    status = DONE;
out:
    if (have_c)
        PyBuffer_Release(&cview);
    if (have_sw)
        PyBuffer_Release(&swview);
    Py_XDECREF(flow);
    Py_XDECREF(meta);
    Py_DECREF(key);
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

/* build_record(flow, merge_cache) -> dict: aggregation.build_record's record of a flow.
 * None when the flow holds something the twin alone handles (the caller then uses it). */
static PyObject *
record_of(PyObject *flow, PyObject *cache)
{
    if (!configured || !Py_IS_TYPE(flow, (PyTypeObject *)flow_class))
        Py_RETURN_NONE;
    for (int i = 0; i < N_SLOTS; i++)
        if (SLOT(flow, i) == NULL)
            Py_RETURN_NONE;
    long f, flow_type;
    if (!as_long(SLOT(flow, S_FLAGS), &f) || !as_long(SLOT(flow, S_FLOW_TYPE), &flow_type) || flow_type < 0)
        Py_RETURN_NONE; /* a negative flowType (a malformed record the twin took) is the twin's to lay out */
    PyObject *key = SLOT(flow, S_KEY), *sm = SLOT(flow, S_SMETA), *dm = SLOT(flow, S_DMETA);
    if (!PyTuple_CheckExact(key) || PyTuple_GET_SIZE(key) != 5)
        Py_RETURN_NONE;
    if ((sm != Py_None && (!PyTuple_CheckExact(sm) || PyTuple_GET_SIZE(sm) != n_meta + 2)) ||
        (dm != Py_None && (!PyTuple_CheckExact(dm) || PyTuple_GET_SIZE(dm) != n_meta + 2)))
        Py_RETURN_NONE;
    PyObject *merged = merged_meta(cache, sm, dm, (f & IPV6) != 0);
    if (merged == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    int has_src = (f & HAS_SRC) != 0, has_dst = (f & HAS_DST) != 0, v6 = (f & IPV6) != 0;
    PyObject *exporter = has_src ? SLOT(flow, S_SEXP) : SLOT(flow, S_DEXP);
    int t = PyObject_IsTrue(exporter);
    if (t < 0) {
        Py_DECREF(merged);
        return NULL;
    }
    if (!t)
        exporter = zero_addr;
    if (!PyUnicode_CheckExact(exporter)) {
        Py_DECREF(merged);
        Py_RETURN_NONE;
    }
    int e6 = PyUnicode_FindChar(exporter, ':', 0, PyUnicode_GET_LENGTH(exporter), 1) >= 0;
    Py_buffer cv, sv;
    uint64_t *c = u64_buffer(SLOT(flow, S_C), &cv, NC), *sw = NULL;
    if (c == NULL) {
        Py_DECREF(merged);
        Py_RETURN_NONE;
    }
    PyObject *swo = SLOT(flow, S_SW);
    if (swo != Py_None) {
        sw = u64_buffer(swo, &sv, 4);
        if (sw == NULL) {
            PyBuffer_Release(&cv);
            Py_DECREF(merged);
            Py_RETURN_NONE;
        }
    }
    /* The values in build_record's slot order, as (new reference) objects; NULL: a C number. */
    PyObject *obj[N_OUT_MAX];
    uint64_t num[N_OUT_MAX];
    Py_ssize_t n = 0;
#define NUM(v) (obj[n] = NULL, num[n++] = (v))
#define OBJ(o) (obj[n] = (o), n++)
    NUM(c[24]);
    NUM(c[25]);
    OBJ(SLOT(flow, S_REASON));
    for (int i = 0; i < 5; i++)
        OBJ(PyTuple_GET_ITEM(key, i));
    const uint64_t *own = has_src ? c : c + 8;
    for (int k = 0; k < 4; k++)
        NUM(own[k]);
    for (int k = 0; k < 4; k++)
        NUM(has_src && sw ? (own[4 + k] > sw[k] ? own[4 + k] - sw[k] : 0) : own[4 + k]);
    for (Py_ssize_t i = 0; i < n_meta + 2; i++)
        OBJ(PyTuple_GET_ITEM(merged, i));
    NUM((uint64_t)((f & UNTYPED) && (f & NO_TWIN) && !(f & DENIED) ? 0 : flow_type));
    OBJ(SLOT(flow, S_TCP));
    OBJ(exporter);
    OBJ(has_src ? SLOT(flow, S_SDOM) : SLOT(flow, S_DDOM));
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
    PyBuffer_Release(&cv);
    if (n != n_out) {
        Py_DECREF(merged);
        PyErr_SetString(PyExc_SystemError, "build_record: values and layout differ in length");
        return NULL;
    }
    int li = v6 * 2 + e6;
    PyObject *names = out_names[li];
    /* A copy of the layout's dict of names: its keys table comes whole (str keys, the
     * template's order, the size it needs), and each value is then set in place. */
    PyObject *rec = PyDict_Copy(out_proto[li]);
    if (rec == NULL) {
        Py_DECREF(merged);
        return NULL;
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        Py_ssize_t at = out_order[li][j];
        PyObject *v = obj[at];
        int r;
        if (v == NULL) {
            v = PyLong_FromUnsignedLongLong(num[at]);
            if (v == NULL) {
                Py_DECREF(rec);
                Py_DECREF(merged);
                return NULL;
            }
            r = PyDict_SetItem(rec, PyTuple_GET_ITEM(names, j), v);
            Py_DECREF(v);
        } else {
            r = PyDict_SetItem(rec, PyTuple_GET_ITEM(names, j), v);
        }
        if (r < 0) {
            Py_DECREF(rec);
            Py_DECREF(merged);
            return NULL;
        }
    }
    Py_DECREF(merged);
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
static PyObject *corr_names[7];
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

static PyObject *
export_flow(PyObject *flow, PyObject *cache, PyObject *final)
{
    if (exported_class == NULL)
        Py_RETURN_NONE;
    PyObject *rec = record_of(flow, cache); /* checks the flow's slots */
    if (rec == NULL || rec == Py_None)
        return rec;
    long f, ft;
    Py_buffer cv, sv;
    uint64_t *c = NULL, *sw = NULL;
    PyObject *swo = SLOT(flow, S_SW);
    if (!as_long(SLOT(flow, S_FLAGS), &f) || !as_long(SLOT(flow, S_FLOW_TYPE), &ft) ||
        (c = u64_buffer(SLOT(flow, S_C), &cv, NC)) == NULL) {
        Py_DECREF(rec);
        Py_RETURN_NONE;
    }
    if (swo != Py_None && (sw = u64_buffer(swo, &sv, 4)) == NULL) {
        PyBuffer_Release(&cv);
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
    memset(c + 4, 0, 4 * 8); /* the deltas, the throughputs */
    memset(c + 12, 0, 4 * 8);
    memset(c + 18, 0, 6 * 8);
    PyBuffer_Release(&cv);
    if (sw != NULL && !sw_left)
        set_slot_borrowed(flow, S_SW, Py_None);
    f = (f & ~DIRTY) | EXPORTED;
    PyObject *fl = PyLong_FromLong(f);
    if (fl == NULL) {
        Py_DECREF(rec);
        return NULL;
    }
    set_slot(flow, S_FLAGS, fl);
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
        if (!Py_IS_TYPE(flow, (PyTypeObject *)flow_class))
            break;
        PyObject *fo = SLOT(flow, S_FLAGS), *ls = SLOT(flow, S_LAST_SEEN);
        long f;
        if (fo == NULL || ls == NULL || !as_long(fo, &f))
            break;
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

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS, "Bind the module to aggregation.py's Flow class, field names and constants."},
    {"ingest_many", ingest_many, METH_VARARGS, "AggregationProcess.ingest_many's loop (see the module docstring)."},
    {"build_record", build_record, METH_VARARGS, "aggregation.build_record's record of a flow, or None."},
    {"export", export, METH_VARARGS, "AggregationProcess._export of a flow, or None."},
    {"scan", scan, METH_VARARGS, "AggregationProcess._scan's loop where it only exports or skips flows."},
    {"configure_export", configure_export, METH_VARARGS, "Bind export() to ExportedFlow and the correlation names."},
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
    return PyModule_Create(&module);
}

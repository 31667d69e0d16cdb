/* The collector's row of a call or tool event, read straight off the wire.

   `read_row(value)` gives what `collector._rows.row_of(outrider.decode_event_head(value))`
   gives, as `(row, gap)`, with the record's bytes in the row's event slot
   (parsed by upb later, only where something needs the whole event) -- or None, and then the
   caller takes the upb path, which stays the reference. None is the answer to anything this
   reader does not take as it stands: another body, feature flags, a second body field, a
   known field with an unexpected wire type, groups, varints past 64 bits, truncation, bad
   UTF-8 in any string field. So it never accepts what upb would refuse, and it never has to
   merge messages or say why a record is bad. tests/unit/test_collector_fastrow.py holds it
   to upb on generated and mangled records. `gap` is `(sidecar_id, agent, sequence)` for
   `GapTracker`, or None when the event has no sidecar id or sequence (there is nothing to
   observe).

   Why native: reading a field of a upb message from Python costs about 500 instructions (a
   lookup by name, then a new object), and a call event's row reads about 25 of them. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    const uint8_t *p;
    Py_ssize_t n;
    int ascii; /* a string field's bytes are all ASCII */
} Span;

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_I32 = 5 };
enum { BODY_NONE = 0, BODY_CALL = 10, BODY_TOOL = 11 };

/* the last string made for each repeating slot: most events of a batch share them, and a
   shared str also keeps its hash for the dict lookups downstream */
enum { C_AGENT, C_VERSION, C_SIDECAR, C_MODEL, C_ERROR, C_SLOTS };
static PyObject *cache[C_SLOTS];
static PyObject *s_call, *s_tool;

#define INLINE static inline __attribute__((always_inline))

INLINE int read_varint(const uint8_t **pp, const uint8_t *end, uint64_t *out) {
    const uint8_t *p = *pp;
    if (p < end && *p < 0x80) { /* most tags, lengths and counts: one byte */
        *out = *p;
        *pp = p + 1;
        return 0;
    }
    uint64_t v = 0;
    for (int i = 0; i < 10; i++) {
        if (p >= end) return -1;
        uint8_t b = *p++;
        if (i == 9 && b > 1) return -1; /* past 64 bits: upb's to judge */
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            *pp = p;
            *out = v;
            return 0;
        }
    }
    return -1;
}

INLINE int read_len(const uint8_t **pp, const uint8_t *end, Span *out) {
    uint64_t n;
    if (read_varint(pp, end, &n) || n > (uint64_t)(end - *pp)) return -1;
    out->p = *pp;
    out->n = (Py_ssize_t)n;
    *pp += n;
    return 0;
}

INLINE int read_double(const uint8_t **pp, const uint8_t *end, double *out) {
    if (end - *pp < 8) return -1;
    uint64_t bits = 0;
    for (int i = 7; i >= 0; i--) bits = (bits << 8) | (*pp)[i]; /* little-endian on the wire */
    memcpy(out, &bits, sizeof bits);
    *pp += 8;
    return 0;
}

/* well-formed UTF-8 (no overlongs, surrogates or code points past U+10FFFF), as upb checks
   every string field of a proto3 message when it parses one: 2 when it is all ASCII, 1 when
   it is well-formed otherwise, 0 when it is not */
INLINE int utf8_ok(const uint8_t *s, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; n - i >= 8; i += 8) { /* ASCII, eight bytes at a time: nearly every string */
        uint64_t word;
        memcpy(&word, s + i, 8);
        if (word & 0x8080808080808080ULL) break;
    }
    while (i < n && s[i] < 0x80) i++;
    if (i == n) return 2;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        Py_ssize_t need = c < 0xC2 ? 0 : c < 0xE0 ? 1 : c < 0xF0 ? 2 : c < 0xF5 ? 3 : 0;
        if (need == 0 || n - i <= need) return 0;
        for (Py_ssize_t k = 1; k <= need; k++)
            if ((s[i + k] & 0xC0) != 0x80) return 0;
        uint8_t c1 = s[i + 1];
        if ((c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 >= 0xA0) || (c == 0xF0 && c1 < 0x90) ||
            (c == 0xF4 && c1 >= 0x90))
            return 0;
        i += need + 1;
    }
    return 1;
}

INLINE int read_string(const uint8_t **pp, const uint8_t *end, Span *out) {
    if (read_len(pp, end, out)) return -1;
    int ok = utf8_ok(out->p, out->n);
    out->ascii = ok == 2;
    return ok ? 0 : -1;
}

/* skip an unknown field; groups (3, 4) and the wire types that do not exist are upb's */
static int skip(const uint8_t **pp, const uint8_t *end, uint32_t wt) {
    uint64_t ignored;
    Span span;
    switch (wt) {
    case WT_VARINT:
        return read_varint(pp, end, &ignored);
    case WT_I64:
        if (end - *pp < 8) return -1;
        *pp += 8;
        return 0;
    case WT_LEN:
        return read_len(pp, end, &span);
    case WT_I32:
        if (end - *pp < 4) return -1;
        *pp += 4;
        return 0;
    default:
        return -1;
    }
}

INLINE int read_tag(const uint8_t **pp, const uint8_t *end, uint32_t *field, uint32_t *wt) {
    uint64_t tag;
    if (read_varint(pp, end, &tag) || tag >> 32 || (tag >> 3) == 0) return -1;
    *field = (uint32_t)(tag >> 3);
    *wt = (uint32_t)(tag & 7);
    return 0;
}

#define EXPECT(type) \
    if (wt != (type)) return -1

typedef struct {
    Span model, error_class;
    double latency, ttft, cost, wait;
    int64_t inputs, outputs, cached;
    int32_t outcome, tier;
    int degraded, intercepted;
} Detail;

/* outrider.v1.CallRecord; its other fields are read only to be checked */
static int read_call(const uint8_t *p, const uint8_t *end, Detail *d) {
    uint32_t field, wt;
    uint64_t v;
    Span ignored;
    while (p < end) {
        if (read_tag(&p, end, &field, &wt)) return -1;
        switch (field) {
        case 3: EXPECT(WT_LEN); if (read_string(&p, end, &d->model)) return -1; break;
        case 9: EXPECT(WT_LEN); if (read_string(&p, end, &d->error_class)) return -1; break;
        case 1: case 2: case 11: case 18: /* operation, provider, served_by, guard_hits */
            EXPECT(WT_LEN); if (read_string(&p, end, &ignored)) return -1; break;
        case 4: EXPECT(WT_I64); if (read_double(&p, end, &d->latency)) return -1; break;
        case 5: EXPECT(WT_I64); if (read_double(&p, end, &d->ttft)) return -1; break;
        case 10: EXPECT(WT_I64); if (read_double(&p, end, &d->cost)) return -1; break;
        case 15: EXPECT(WT_I64); if (read_double(&p, end, &d->wait)) return -1; break;
        case 6: EXPECT(WT_VARINT); if (read_varint(&p, end, &v)) return -1; d->inputs = (int64_t)v; break;
        case 7: EXPECT(WT_VARINT); if (read_varint(&p, end, &v)) return -1; d->outputs = (int64_t)v; break;
        case 17: EXPECT(WT_VARINT); if (read_varint(&p, end, &v)) return -1; d->cached = (int64_t)v; break;
        case 8: EXPECT(WT_VARINT); if (read_varint(&p, end, &v)) return -1; d->outcome = (int32_t)(uint32_t)v; break;
        case 14: EXPECT(WT_VARINT); if (read_varint(&p, end, &v)) return -1; d->tier = (int32_t)(uint32_t)v; break;
        case 12: EXPECT(WT_VARINT); if (read_varint(&p, end, &v)) return -1; d->degraded = v != 0; break;
        case 13: case 16: /* attempts, priority */
            EXPECT(WT_VARINT); if (read_varint(&p, end, &v)) return -1; break;
        default:
            if (skip(&p, end, wt)) return -1;
        }
    }
    return 0;
}

/* outrider.v1.ToolRecord */
static int read_tool(const uint8_t *p, const uint8_t *end, Detail *d) {
    uint32_t field, wt;
    uint64_t v;
    Span ignored;
    while (p < end) {
        if (read_tag(&p, end, &field, &wt)) return -1;
        switch (field) {
        case 4: EXPECT(WT_LEN); if (read_string(&p, end, &d->error_class)) return -1; break;
        case 1: case 8: case 9: case 10: /* tool_name, arguments_sha256, arguments_json, side_effects */
            EXPECT(WT_LEN); if (read_string(&p, end, &ignored)) return -1; break;
        case 2: EXPECT(WT_I64); if (read_double(&p, end, &d->latency)) return -1; break;
        case 3: EXPECT(WT_VARINT); if (read_varint(&p, end, &v)) return -1; d->outcome = (int32_t)(uint32_t)v; break;
        case 6: EXPECT(WT_VARINT); if (read_varint(&p, end, &v)) return -1; d->intercepted = v != 0; break;
        case 5: case 7: /* status_code, attempts */
            EXPECT(WT_VARINT); if (read_varint(&p, end, &v)) return -1; break;
        default:
            if (skip(&p, end, wt)) return -1;
        }
    }
    return 0;
}

typedef struct {
    Span event_id, agent, version, session, sidecar;
    int64_t stamp, sequence;
    int32_t role;
    int body;
    Span body_bytes;
} Head;

/* outrider.v1.Event: 0 when it is a call or tool event this reader takes */
static int read_event(const uint8_t *p, const uint8_t *end, Head *h) {
    uint32_t field, wt;
    uint64_t v;
    Span ignored;
    while (p < end) {
        if (read_tag(&p, end, &field, &wt)) return -1;
        switch (field) {
        case 1: EXPECT(WT_LEN); if (read_string(&p, end, &h->event_id)) return -1; break;
        case 3: EXPECT(WT_LEN); if (read_string(&p, end, &h->agent)) return -1; break;
        case 4: EXPECT(WT_LEN); if (read_string(&p, end, &h->version)) return -1; break;
        case 6: EXPECT(WT_LEN); if (read_string(&p, end, &h->session)) return -1; break;
        case 7: EXPECT(WT_LEN); if (read_string(&p, end, &h->sidecar)) return -1; break;
        case 8: case 9: case 22: /* rollout_id, unit_id, cohort */
            EXPECT(WT_LEN); if (read_string(&p, end, &ignored)) return -1; break;
        case 2: EXPECT(WT_VARINT); if (read_varint(&p, end, &v)) return -1; h->stamp = (int64_t)v; break;
        case 20: EXPECT(WT_VARINT); if (read_varint(&p, end, &v)) return -1; h->sequence = (int64_t)v; break;
        case 5: EXPECT(WT_VARINT); if (read_varint(&p, end, &v)) return -1; h->role = (int32_t)(uint32_t)v; break;
        case BODY_CALL: case BODY_TOOL:
            EXPECT(WT_LEN);
            if (h->body != BODY_NONE) return -1; /* a second body: upb merges or switches */
            h->body = (int)field;
            if (read_len(&p, end, &h->body_bytes)) return -1;
            break;
        case 12: case 13: case 14: case 15: case 16: case 17: case 18: case 19: case 21: case 23:
            return -1; /* the other bodies, and flags (a map the row does not carry) */
        default:
            if (skip(&p, end, wt)) return -1;
        }
    }
    return 0;
}

static PyObject *new_str(Span s) {
    if (!s.ascii) return PyUnicode_DecodeUTF8((const char *)s.p, s.n, "strict");
    PyObject *made = PyUnicode_New(s.n, 127); /* known ASCII: a copy, not a decode */
    if (made != NULL) memcpy(PyUnicode_1BYTE_DATA(made), s.p, (size_t)s.n);
    return made;
}

static PyObject *cached_str(int slot, Span s) {
    PyObject *last = cache[slot];
    if (last != NULL && PyUnicode_GET_LENGTH(last) == s.n && PyUnicode_IS_COMPACT_ASCII(last) &&
        memcmp(PyUnicode_DATA(last), s.p, (size_t)s.n) == 0) {
        Py_INCREF(last);
        return last;
    }
    PyObject *made = new_str(s);
    if (made == NULL) return NULL;
    Py_INCREF(made);
    Py_XSETREF(cache[slot], made);
    return made;
}

/* a tuple of the n objects, which it takes; NULL (and the objects released) when any is NULL,
   which only running out of memory makes */
static PyObject *tuple_of(Py_ssize_t n, PyObject **items) {
    PyObject *tuple = NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        if (items[i] == NULL) goto failed;
    if ((tuple = PyTuple_New(n)) == NULL) goto failed;
    for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(tuple, i, items[i]);
    return tuple;
failed:
    for (Py_ssize_t i = 0; i < n; i++) Py_XDECREF(items[i]);
    return NULL;
}

static PyObject *boolean(int value) { return Py_NewRef(value ? Py_True : Py_False); }

static PyObject *detail_of(int body, const Detail *d) {
    if (body == BODY_TOOL) {
        PyObject *items[] = {PyLong_FromLong(d->outcome), cached_str(C_ERROR, d->error_class),
                             PyFloat_FromDouble(d->latency), boolean(d->intercepted)};
        return tuple_of(4, items);
    }
    PyObject *items[] = {
        PyLong_FromLong(d->outcome),      cached_str(C_ERROR, d->error_class),
        PyFloat_FromDouble(d->latency),   PyFloat_FromDouble(d->ttft),
        PyLong_FromLongLong(d->inputs),   PyLong_FromLongLong(d->outputs),
        PyLong_FromLongLong(d->cached),   PyFloat_FromDouble(d->cost),
        PyLong_FromLong(d->tier),         boolean(d->degraded),
        PyFloat_FromDouble(d->wait),      cached_str(C_MODEL, d->model),
    };
    return tuple_of(12, items);
}

static PyObject *read_row(PyObject *module, PyObject *value) {
    (void)module;
    if (!PyBytes_CheckExact(value)) Py_RETURN_NONE;
    const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(value);
    const uint8_t *end = p + PyBytes_GET_SIZE(value);
    Head h;
    Detail d;
    memset(&h, 0, sizeof h);
    memset(&d, 0, sizeof d);
    if (read_event(p, end, &h) || h.body == BODY_NONE || h.event_id.n == 0 || h.agent.n == 0)
        Py_RETURN_NONE;
    const uint8_t *b = h.body_bytes.p, *b_end = b + h.body_bytes.n;
    if (h.body == BODY_CALL ? read_call(b, b_end, &d) : read_tool(b, b_end, &d)) Py_RETURN_NONE;

    /* (body, agent, event_id, stamp, version, role, session, event, detail); validated UTF-8
       decodes, so a NULL below means memory ran out: say so rather than fall back */
    PyObject *row[] = {
        Py_NewRef(h.body == BODY_CALL ? s_call : s_tool),
        cached_str(C_AGENT, h.agent),
        new_str(h.event_id),
        PyLong_FromLongLong(h.stamp),
        cached_str(C_VERSION, h.version),
        PyLong_FromLong(h.role),
        new_str(h.session),
        Py_NewRef(value),
        detail_of(h.body, &d),
    };
    PyObject *agent = row[1];
    PyObject *read[] = {tuple_of(9, row), Py_NewRef(Py_None)};
    if (read[0] != NULL && h.sidecar.n > 0 && h.sequence > 0) { /* what GapTracker observes */
        PyObject *gap[] = {cached_str(C_SIDECAR, h.sidecar), Py_NewRef(agent), PyLong_FromLongLong(h.sequence)};
        Py_SETREF(read[1], tuple_of(3, gap));
    }
    return tuple_of(2, read);
}

static PyObject *known_fields(void) {
    /* every field number of Event, CallRecord and ToolRecord this reader knows, for the test
       that fails when the schema grows and this file has not */
    return Py_BuildValue(
        "{s:(iiiiiiiiiiiiiiiiiiiiiii),s:(iiiiiiiiiiiiiiiiii),s:(iiiiiiiiii)}", "Event", 1, 2, 3, 4, 5, 6,
        7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, "CallRecord", 1, 2, 3, 4, 5, 6, 7,
        8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, "ToolRecord", 1, 2, 3, 4, 5, 6, 7, 8, 9, 10);
}

static PyMethodDef methods[] = {
    {"read_row", read_row, METH_O,
     "read_row(value, /) -> (row, gap) | None: the row of a call or tool event."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "collector._fastrow",
    .m_doc = "Rows of call and tool events, off the wire.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastrow(void) {
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) return NULL;
    s_call = PyUnicode_InternFromString("call");
    s_tool = PyUnicode_InternFromString("tool");
    PyObject *known = known_fields();
    if (s_call == NULL || s_tool == NULL || known == NULL || PyModule_AddObject(module, "KNOWN_FIELDS", known)) {
        Py_XDECREF(known);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}

/* The inner loop of `collector._buckets.sketch_add_many`: latencies into a DDSketch's dense bins.

   `add_run(values, start, bins, offset, low, high, total, multiplier, ln2, min_possible,
   key_offset)` goes through `values` from `start` as the Python loop there does, with the
   same arithmetic (libm's log, the same divisions and products, in order, so the same keys
   and the same sum), adding 1.0 to `bins[key - offset]` for each key in [low, high]. It stops
   at the first key outside them, which only the store can add (it grows the bins), and gives
   `(stop, total, binned, zeros, key)`: the index it stopped at (len(values) when done), the
   sum so far (that value included), the counts added, and the key to add. The caller adds
   it and goes on from stop + 1. tests/unit/test_collector_sketch_add.py holds both loops to
   ddsketch's own add, bit for bit. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

static PyObject *add_run(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *values, *bins;
    Py_ssize_t start, offset;
    long long key_offset;
    double low, high, total, multiplier, ln2, min_possible;
    if (!PyArg_ParseTuple(args, "O!nO!nddddddL", &PyList_Type, &values, &start, &PyList_Type, &bins,
                          &offset, &low, &high, &total, &multiplier, &ln2, &min_possible, &key_offset))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(values), size = PyList_GET_SIZE(bins);
    Py_ssize_t binned = 0, zeros = 0, i = start < 0 ? 0 : start;
    long long key = 0;
    for (; i < n; i++) {
        double value = PyFloat_AsDouble(PyList_GET_ITEM(values, i));
        if (value == -1.0 && PyErr_Occurred()) return NULL;
        total += value;
        if (!(value > min_possible)) {
            zeros++;
            continue;
        }
        key = (long long)ceil(log(value) / ln2 * multiplier) + key_offset;
        Py_ssize_t at = (Py_ssize_t)(key - offset);
        if (!(low <= (double)key && (double)key <= high) || at < 0 || at >= size) break;
        double count = PyFloat_AsDouble(PyList_GET_ITEM(bins, at));
        if (count == -1.0 && PyErr_Occurred()) return NULL;
        PyObject *grown = PyFloat_FromDouble(count + 1.0);
        if (grown == NULL) return NULL;
        PyList_SetItem(bins, at, grown); /* takes `grown`, releases the old count */
        binned++;
    }
    return Py_BuildValue("ndnnL", i, total, binned, zeros, key);
}

static PyMethodDef methods[] = {
    {"add_run", add_run, METH_VARARGS,
     "add_run(values, start, bins, offset, low, high, total, multiplier, ln2, min_possible, "
     "key_offset) -> (stop, total, binned, zeros, key)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "collector._fastsketch",
    .m_doc = "The inner loop of sketch_add_many.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastsketch(void) { return PyModule_Create(&module_def); }

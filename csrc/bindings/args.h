// Python numbers to checked C++ values, for both bindings (module.cpp, module_cuda.cpp). pybind11's
// own casters would wrap nothing but say only "incompatible function arguments" for an integer out
// of range, and turn a float32-overflowing double into inf; these name the argument and its range.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings/checks.h"

namespace pydiff {

namespace py = pybind11;

// An integer (int, numpy integer, anything with __index__; not a bool, not a float) as a Python int.
inline py::object index_arg(py::handle v, const char* name) {
  if (PyBool_Check(v.ptr()) || !PyIndex_Check(v.ptr()))
    throw py::type_error(std::string(name) + " must be an integer, got " +
                         std::string(py::str(py::type::of(v).attr("__name__"))));
  return py::reinterpret_steal<py::object>(PyNumber_Index(v.ptr()));
}

// An integer in [0, max]; `range` spells the interval for the message ("[0, 2**64)").
inline uint64_t uint_arg(py::handle v, const char* name, uint64_t max, const char* range) {
  const py::object i = index_arg(v, name);
  if (!i) throw py::error_already_set();
  bool ok = PyObject_RichCompareBool(i.ptr(), py::int_(0).ptr(), Py_GE) == 1;
  uint64_t u = 0;
  if (ok) {
    u = PyLong_AsUnsignedLongLong(i.ptr());
    if (PyErr_Occurred()) {  // above 2**64 - 1
      PyErr_Clear();
      ok = false;
    }
  }
  if (!ok || u > max)
    refuse(std::string(name) + " must be an integer in " + range + ", got " + std::string(py::str(i)));
  return u;
}

// An integer in [min, max] (signed); `note` follows the range in the message.
inline int64_t int_arg(py::handle v, const char* name, int64_t min, int64_t max, const char* note = "") {
  const py::object i = index_arg(v, name);
  if (!i) throw py::error_already_set();
  int overflow = 0;
  const long long s = PyLong_AsLongLongAndOverflow(i.ptr(), &overflow);
  if (overflow || s < min || s > max)
    refuse(std::string(name) + " must be an integer in [" + std::to_string(min) + ", " + std::to_string(max) +
           "]" + note + ", got " + std::string(py::str(i)));
  return s;
}

// A real number (float, int, numpy scalar: anything with __float__ or __index__) as float32.
inline float f32_arg(py::handle v, const char* name) {
  const PyNumberMethods* num = Py_TYPE(v.ptr())->tp_as_number;
  if (!(PyFloat_Check(v.ptr()) || PyIndex_Check(v.ptr()) || (num && num->nb_float)))
    throw py::type_error(std::string(name) + " must be a real number, got " +
                         std::string(py::str(py::type::of(v).attr("__name__"))));
  const double d = PyFloat_AsDouble(v.ptr());
  if (d == -1.0 && PyErr_Occurred()) {  // an int beyond a double's range, say
    PyErr_Clear();
    refuse(std::string(name) + " must be finite in float32 (|" + name + "| <= 3.40282347e+38), got " +
           std::string(py::str(v)));
  }
  return finite_f32(d, name);
}

// The noise stream's coordinates: a key of 64 bits, a step of 32 and an element offset (int64).
inline uint64_t seed_arg(py::handle v) {
  return uint_arg(v, "seed", UINT64_MAX, "[0, 2**64)");
}
inline uint32_t noise_step_arg(py::handle v, const char* name) {
  return uint32_t(uint_arg(v, name, UINT32_MAX, "[0, 2**32)"));
}
inline int64_t offset_arg(py::handle v) {
  return int64_t(uint_arg(v, "offset", kMaxNoiseEnd, "[0, 2**63 - 4]"));
}

}  // namespace pydiff

// fused_step_rows' per-row table for both bindings (module.cpp, module_cuda.cpp): a [B] NumPy array of
// STEP_PARAMS_DTYPE (StepParams' own layout, so that a caller fills named columns once per tick) or a
// sequence of pydiff._C.StepParams. Either way the rows are copied, as fused_step takes its StepParams by
// value: another Python thread may change the caller's table once the GIL is released, and the CUDA twin
// passes the copy to its kernels as arguments.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

#include "bindings/checks.h"
#include "pydiff/step_params.h"

namespace pydiff {

namespace py = pybind11;

// The structured dtype of StepParams: its fields by name at their offsets, its size with padding.
inline py::dtype make_step_params_dtype() {
  py::list names, formats, offsets;
  auto field = [&](const char* name, const char* format, size_t offset) {
    names.append(name);
    formats.append(format);
    offsets.append(offset);
  };
  field("alpha", "<f4", offsetof(StepParams, alpha));
  field("sigma", "<f4", offsetof(StepParams, sigma));
  field("prediction_type", "<i4", offsetof(StepParams, prediction_type));
  field("threshold_mode", "<i4", offsetof(StepParams, threshold_mode));
  field("clip_range", "<f4", offsetof(StepParams, clip_range));
  field("dynamic_ratio", "<f4", offsetof(StepParams, dynamic_ratio));
  field("sample_max_value", "<f4", offsetof(StepParams, sample_max_value));
  field("use_clipped_eps", "<i4", offsetof(StepParams, use_clipped_eps));
  field("c_x", "<f4", offsetof(StepParams, c_x));
  field("c_x0", "<f4", offsetof(StepParams, c_x0));
  field("c_eps", "<f4", offsetof(StepParams, c_eps));
  field("c_d", "<f4", offsetof(StepParams, c_d));
  field("c_noise", "<f4", offsetof(StepParams, c_noise));
  field("seed", "<u8", offsetof(StepParams, seed));
  field("noise_step", "<u4", offsetof(StepParams, noise_step));
  field("c_d2", "<f4", offsetof(StepParams, c_d2));
  field("c_d3", "<f4", offsetof(StepParams, c_d3));
  field("history_output", "<i4", offsetof(StepParams, history_output));
  py::dict spec;
  spec["names"] = names;
  spec["formats"] = formats;
  spec["offsets"] = offsets;
  spec["itemsize"] = sizeof(StepParams);
  return py::dtype::from_args(spec);
}

// Built once per module, and never destroyed (a static py::object would be released after the
// interpreter is gone).
inline const py::dtype& step_params_dtype() {
  static const py::dtype* dtype = new py::dtype(make_step_params_dtype());
  return *dtype;
}

// The rows of `params` for a batch of `batch` rows; `span` receives the table's bytes (for the overlap
// rules) when it is an array. A wrong type or dtype is a TypeError, a wrong shape a ValueError.
inline std::vector<StepParams> step_rows_arg(py::handle params, int64_t batch, Span& span) {
  std::vector<StepParams> rows;
  if (py::isinstance<py::array>(params)) {
    auto arr = py::reinterpret_borrow<py::array>(params);
    if (!arr.dtype().equal(step_params_dtype()))
      throw py::type_error(
          "params must have dtype pydiff._C.STEP_PARAMS_DTYPE (one StepParams per row), got " +
          std::string(py::str(arr.dtype())));
    if (arr.ndim() != 1 || arr.shape(0) != batch)
      throw py::value_error("params must have shape (" + std::to_string(batch) +
                            ",) (one StepParams per row of x), got " +
                            std::string(py::str(params.attr("shape"))));
    if (!(arr.flags() & py::array::c_style))
      throw py::value_error("params must be C-contiguous (use numpy.ascontiguousarray)");
    rows.resize(size_t(batch));
    if (batch) std::memcpy(rows.data(), arr.data(), size_t(batch) * sizeof(StepParams));
    span = Span{"params", reinterpret_cast<uintptr_t>(arr.data()), uint64_t(batch) * sizeof(StepParams)};
    return rows;
  }
  if (!py::isinstance<py::sequence>(params) || py::isinstance<py::str>(params))
    throw py::type_error(
        "params must be a numpy array of pydiff._C.STEP_PARAMS_DTYPE or a sequence of StepParams, got " +
        std::string(py::str(py::type::of(params).attr("__name__"))));
  const auto seq = py::reinterpret_borrow<py::sequence>(params);
  if (int64_t(seq.size()) != batch)
    throw py::value_error("params must hold " + std::to_string(batch) +
                          " StepParams (one per row of x), got " + std::to_string(seq.size()));
  rows.reserve(size_t(batch));
  for (size_t i = 0; i < seq.size(); ++i) {
    const py::object item = seq[i];
    if (!py::isinstance<StepParams>(item))
      throw py::type_error("params[" + std::to_string(i) + "] must be a pydiff._C.StepParams, got " +
                           std::string(py::str(py::type::of(item).attr("__name__"))));
    rows.push_back(item.cast<StepParams>());
  }
  return rows;
}

}  // namespace pydiff

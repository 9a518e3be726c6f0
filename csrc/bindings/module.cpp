// The single Python module, pydiff._C: array views, their validation, and the GIL.
// Nothing here casts or copies: a wrong dtype, shape or layout is an error naming the argument.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "bindings/args.h"
#include "bindings/checks.h"
#include "bindings/step_rows.h"
#include "ops/ops.h"

namespace py = pybind11;
using namespace pydiff;

namespace {

std::atomic<int> g_num_threads{0};  // 0: OpenMP's default

// OpenMP's default is capped too: OMP_NUM_THREADS=1000000 would kill the process as surely as
// set_num_threads(10**6) would (see kMaxNumThreads).
int num_threads() {
  const int n = g_num_threads.load();
  return n > 0 ? n : std::min(default_num_threads(), kMaxNumThreads);
}

struct View {
  float* ptr = nullptr;
  std::vector<int64_t> shape;
  int64_t size = 0;
};

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + (s.size() == 1 ? ",)" : ")");
}

View view_f32(py::handle obj, const char* name, bool writable) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + " must be a numpy.ndarray of float32, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!arr.dtype().equal(py::dtype::of<float>()))  // equivalent, not the same object: unpickled arrays
    throw py::type_error(std::string(name) + " must have dtype float32, got " +
                         std::string(py::str(arr.dtype())));
  if (!(arr.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous (use numpy.ascontiguousarray)");
  if (!(arr.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
    throw py::value_error(std::string(name) + " must be aligned");
  if (writable && !arr.writeable()) throw py::value_error(std::string(name) + " must be writeable");
  View v;
  // a read-only input (np.frombuffer, mmap_mode='r') is fine: only outputs need writing
  v.ptr = writable ? static_cast<float*>(arr.mutable_data())
                   : const_cast<float*>(static_cast<const float*>(arr.data()));
  for (py::ssize_t i = 0; i < arr.ndim(); ++i) v.shape.push_back(arr.shape(i));
  v.size = arr.size();
  return v;
}

void require_shape(const View& v, const std::vector<int64_t>& shape, const char* name, const char* what) {
  if (v.shape != shape)
    throw py::value_error(std::string(name) + " must have shape " + shape_str(shape) + " (" + what +
                          "), got " + shape_str(v.shape));
}

Span span(const View& v, const char* name) {
  return Span{name, reinterpret_cast<uintptr_t>(v.ptr), uint64_t(v.size) * 4};
}

// Every per-sample value finite: a NaN scale would give a sample of NaNs that no check reports.
void require_finite(const View& v, const char* name) {
  for (int64_t i = 0; i < v.size; ++i)
    if (!std::isfinite(v.ptr[i]))
      throw py::value_error(std::string(name) + " must be finite, got " + float_str(v.ptr[i]) + " at index " +
                            std::to_string(i));
}

// The arrays of one fused step, checked for dtype, shape and layout (the range rules come after).
struct StepCall {
  StepArrays a;
  StepSpans spans;
};

StepCall step_call(py::handle x_, py::handle model_output_, py::handle out_, bool guided,
                   py::handle guidance_scale_, py::handle scales_, py::handle x0_prev_, py::handle x0_out_,
                   py::handle thresholds_) {
  const View x = view_f32(x_, "x", false);
  const View mo = view_f32(model_output_, "model_output", false);
  const View out = view_f32(out_, "out", true);
  if (x.shape.empty()) throw py::value_error("x must have a batch dimension, got a scalar");
  const int64_t B = x.shape[0];
  const int64_t n = B ? x.size / B : 0;
  std::vector<int64_t> mo_shape = x.shape;
  if (guided) mo_shape[0] = 2 * B;
  require_shape(mo, mo_shape, "model_output", guided ? "the stacked [cond; uncond] batch" : "the same as x");
  require_shape(out, x.shape, "out", "the same as x");

  StepCall c;
  StepArrays& a = c.a;
  StepSpans& sp = c.spans;
  a.x = x.ptr;
  a.cond = mo.ptr;
  a.uncond = guided ? mo.ptr + B * n : nullptr;
  a.scale = f32_arg(guidance_scale_, "guidance_scale");
  a.out = out.ptr;
  a.batch = B;
  a.n = n;
  sp.x = span(x, "x");
  sp.model_output = span(mo, "model_output");
  sp.cond = Span{"model_output", reinterpret_cast<uintptr_t>(mo.ptr), uint64_t(B * n) * 4};
  if (guided) sp.uncond = Span{"model_output", reinterpret_cast<uintptr_t>(a.uncond), uint64_t(B * n) * 4};
  sp.out = span(out, "out");
  if (!scales_.is_none()) {
    const View s = view_f32(scales_, "guidance_scale", false);
    require_shape(s, {B}, "guidance_scale", "one scale per sample");
    require_finite(s, "guidance_scale");
    a.scales = s.ptr;
    sp.scales = span(s, "guidance_scale");
  }
  if (!x0_prev_.is_none()) {
    const View v = view_f32(x0_prev_, "x0_prev", false);
    require_shape(v, x.shape, "x0_prev", "the same as x");
    a.x0_prev = v.ptr;
    sp.x0_prev = span(v, "x0_prev");
  }
  if (!x0_out_.is_none()) {
    const View v = view_f32(x0_out_, "x0_out", true);
    require_shape(v, x.shape, "x0_out", "the same as x");
    a.x0_out = v.ptr;
    sp.x0_out = span(v, "x0_out");
  }
  if (!thresholds_.is_none()) {
    const View v = view_f32(thresholds_, "thresholds", true);
    require_shape(v, {B}, "thresholds", "one per sample");
    a.thresholds = v.ptr;
    sp.thresholds = span(v, "thresholds");
  }
  return c;
}

// `p` by value: another Python thread may change the caller's object once the GIL is released.
int64_t fused_step(py::handle x_, py::handle model_output_, py::handle out_, StepParams p, bool guided,
                   py::handle guidance_scale_, py::handle scales_, py::handle x0_prev_, py::handle x0_out_,
                   py::handle thresholds_, py::handle x0_prev2_, py::handle x0_prev3_) {
  StepCall c =
      step_call(x_, model_output_, out_, guided, guidance_scale_, scales_, x0_prev_, x0_out_, thresholds_);
  const std::vector<int64_t> shape = view_f32(x_, "x", false).shape;
  for (auto [arg, name, ptr, sp] : {std::tuple{x0_prev2_, "x0_prev2", &c.a.x0_prev2, &c.spans.x0_prev2},
                                    std::tuple{x0_prev3_, "x0_prev3", &c.a.x0_prev3, &c.spans.x0_prev3}}) {
    if (arg.is_none()) continue;
    const View v = view_f32(arg, name, false);
    require_shape(v, shape, name, "the same as x");
    *ptr = v.ptr;
    *sp = span(v, name);
  }
  check_step(p, c.spans, c.a.batch, c.a.n);
  const int nt = num_threads();
  py::gil_scoped_release nogil;
  return fused_step_cpu(c.a, p, nt);
}

// The rows are copied (step_rows_arg) for the same reason.
int64_t fused_step_rows(py::handle x_, py::handle model_output_, py::handle out_, py::handle params_,
                        bool guided, py::handle guidance_scale_, py::handle scales_, py::handle x0_prev_,
                        py::handle x0_out_, py::handle thresholds_) {
  StepCall c =
      step_call(x_, model_output_, out_, guided, guidance_scale_, scales_, x0_prev_, x0_out_, thresholds_);
  const std::vector<StepParams> rows = step_rows_arg(params_, c.a.batch, c.spans.params);
  check_step_rows(rows.data(), c.spans, c.a.batch, c.a.n);
  const int nt = num_threads();
  py::gil_scoped_release nogil;
  return fused_step_rows_cpu(c.a, rows.data(), nt);
}

void cfg_mix(py::handle cond_, py::handle uncond_, py::handle out_, py::handle scale_, py::handle scales_) {
  const View c = view_f32(cond_, "cond", false);
  const View u = view_f32(uncond_, "uncond", false);
  const View out = view_f32(out_, "out", true);
  if (c.shape.empty()) throw py::value_error("cond must have a batch dimension, got a scalar");
  require_shape(u, c.shape, "uncond", "the same as cond");
  require_shape(out, c.shape, "out", "the same as cond");
  const float scale = f32_arg(scale_, "scale");
  const int64_t B = c.shape[0], n = B ? c.size / B : 0;
  const float* scales = nullptr;
  Span scales_span;
  if (!scales_.is_none()) {
    const View s = view_f32(scales_, "scale", false);
    require_shape(s, {B}, "scale", "one scale per sample");
    require_finite(s, "scale");
    scales = s.ptr;
    scales_span = span(s, "scale");
  }
  check_cfg_mix(span(c, "cond"), span(u, "uncond"), scales_span, span(out, "out"));
  const int nt = num_threads();
  py::gil_scoped_release nogil;
  cfg_mix_cpu(c.ptr, u.ptr, scales, scale, out.ptr, B, n, nt);
}

void abs_quantile(py::handle x_, py::handle out_, py::handle q_, py::handle max_value_, bool clamp) {
  const View x = view_f32(x_, "x", false);
  const View out = view_f32(out_, "out", true);
  if (x.shape.empty()) throw py::value_error("x must have a batch dimension, got a scalar");
  const int64_t B = x.shape[0], n = B ? x.size / B : 0;
  require_shape(out, {B}, "out", "one value per sample");
  check_no_overlap(span(out, "out"), span(x, "x"));
  const float q = f32_arg(q_, "q"), max_value = f32_arg(max_value_, "max_value");
  if (!(q > 0.0f && q <= 1.0f)) throw py::value_error("q must be in (0, 1], got " + float_str(q));
  if (clamp && !(max_value >= 1.0f))
    throw py::value_error("max_value must be >= 1 (the quantile is clamped to [1, max_value]), got " +
                          float_str(max_value));
  if (n == 0 && B > 0) throw py::value_error("x has no elements per sample: the quantile is undefined");
  const int nt = num_threads();
  py::gil_scoped_release nogil;
  abs_quantile_cpu(x.ptr, q, max_value, clamp, out.ptr, B, n, nt);
}

void randn(py::handle out_, py::handle seed_, py::handle step_, py::handle offset_) {
  const View out = view_f32(out_, "out", true);
  const uint64_t seed = seed_arg(seed_);
  const uint32_t step = noise_step_arg(step_, "step");
  const int64_t offset = offset_arg(offset_);
  check_noise_range(uint64_t(offset), out.size);
  const int nt = num_threads();
  py::gil_scoped_release nogil;
  randn_cpu(seed, step, offset, out.ptr, out.size, nt);
}

// The parts of the DLPack ABI (dlpack.h 0.8 and 1.x) that dlpack_info reads.
struct DLDeviceAbi {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataTypeAbi {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensorAbi {
  void* data;
  DLDeviceAbi device;
  int32_t ndim;
  DLDataTypeAbi dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensorAbi {
  DLTensorAbi dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensorAbi*);
};
struct DLManagedTensorVersionedAbi {
  uint32_t major, minor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensorVersionedAbi*);
  uint64_t flags;
  DLTensorAbi dl_tensor;
};

// (data pointer, shape, strides in elements or None, dtype code, bits, lanes, read-only) of a DLPack capsule,
// which stays unconsumed: its producer's destructor frees it. The caller keeps the array alive.
py::tuple dlpack_info(const py::capsule& cap) {
  const char* name = cap.name();
  const DLTensorAbi* t = nullptr;
  bool read_only = false;
  if (name && std::strcmp(name, "dltensor") == 0) {
    t = &cap.get_pointer<DLManagedTensorAbi>()->dl_tensor;
  } else if (name && std::strcmp(name, "dltensor_versioned") == 0) {
    const auto* v = cap.get_pointer<DLManagedTensorVersionedAbi>();
    // dlpack.h: on another major version "it is not safe to access any other fields"
    if (v->major != 1) throw py::type_error("DLPack major version " + std::to_string(v->major) + " is not 1");
    read_only = (v->flags & 1u) != 0;  // DLPACK_FLAG_BITMASK_READ_ONLY
    t = &v->dl_tensor;
  } else
    throw py::type_error(std::string("not an unconsumed DLPack capsule (name ") + (name ? name : "null") +
                         ")");
  py::list shape, strides;
  for (int32_t i = 0; i < t->ndim; ++i) {
    shape.append(t->shape[i]);
    if (t->strides) strides.append(t->strides[i]);
  }
  const auto data = reinterpret_cast<uintptr_t>(t->data) + t->byte_offset;
  return py::make_tuple(data, py::tuple(shape),
                        t->strides ? py::object(py::tuple(strides)) : py::object(py::none()),
                        int(t->dtype.code), int(t->dtype.bits), int(t->dtype.lanes), read_only);
}

// StepParams' getters and checked setters: a field is refused as it is set, naming itself.
auto F(float StepParams::* f) {
  return [f](const StepParams& p) { return p.*f; };
}
auto F(float StepParams::* f, const char* name) {
  return [f, name](StepParams& p, py::handle v) { p.*f = f32_arg(v, name); };
}
auto I(int32_t StepParams::* f) {
  return [f](const StepParams& p) { return p.*f; };
}
// The enumerations and the flag are checked against their values by validate_step_params, which every
// op and pack_step_params call; here only that the number is an int32 (pybind11 would say no more
// than "incompatible function arguments").
auto I(int32_t StepParams::* f, const char* name) {
  return [f, name](StepParams& p, py::handle v) {
    p.*f =
        PyBool_Check(v.ptr()) ? int32_t(v.ptr() == Py_True) : int32_t(int_arg(v, name, INT32_MIN, INT32_MAX));
  };
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pydiff's native step kernels (CPU twin)";

  py::class_<StepParams>(m, "StepParams")
      .def(py::init([]() {
        StepParams p{};
        p.alpha = 1.0f;
        p.sigma = 0.0f;
        p.clip_range = 1.0f;
        p.dynamic_ratio = 0.995f;
        p.sample_max_value = 1.0f;
        return p;
      }))
      .def_property("alpha", F(&StepParams::alpha), F(&StepParams::alpha, "alpha"))
      .def_property("sigma", F(&StepParams::sigma), F(&StepParams::sigma, "sigma"))
      .def_property("prediction_type", I(&StepParams::prediction_type),
                    I(&StepParams::prediction_type, "prediction_type"))
      .def_property("threshold_mode", I(&StepParams::threshold_mode),
                    I(&StepParams::threshold_mode, "threshold_mode"))
      .def_property("clip_range", F(&StepParams::clip_range), F(&StepParams::clip_range, "clip_range"))
      .def_property("dynamic_ratio", F(&StepParams::dynamic_ratio),
                    F(&StepParams::dynamic_ratio, "dynamic_ratio"))
      .def_property("sample_max_value", F(&StepParams::sample_max_value),
                    F(&StepParams::sample_max_value, "sample_max_value"))
      .def_property("use_clipped_eps", I(&StepParams::use_clipped_eps),
                    I(&StepParams::use_clipped_eps, "use_clipped_eps"))
      .def_property("c_x", F(&StepParams::c_x), F(&StepParams::c_x, "c_x"))
      .def_property("c_x0", F(&StepParams::c_x0), F(&StepParams::c_x0, "c_x0"))
      .def_property("c_eps", F(&StepParams::c_eps), F(&StepParams::c_eps, "c_eps"))
      .def_property("c_d", F(&StepParams::c_d), F(&StepParams::c_d, "c_d"))
      .def_property("c_noise", F(&StepParams::c_noise), F(&StepParams::c_noise, "c_noise"))
      .def_property("c_d2", F(&StepParams::c_d2), F(&StepParams::c_d2, "c_d2"))
      .def_property("c_d3", F(&StepParams::c_d3), F(&StepParams::c_d3, "c_d3"))
      .def_property("history_output", I(&StepParams::history_output),
                    I(&StepParams::history_output, "history_output"))
      .def_property(
          "seed", [](const StepParams& p) { return p.seed; },
          [](StepParams& p, py::handle v) { p.seed = seed_arg(v); })
      .def_property(
          "noise_step", [](const StepParams& p) { return p.noise_step; },
          [](StepParams& p, py::handle v) { p.noise_step = noise_step_arg(v, "noise_step"); });
  m.def(
      "validate_step_params", [](const StepParams& p) { validate_step_params(p); }, py::arg("params"),
      "Raise ValueError for parameters the step kernels cannot take (both twins' rules).");
  m.def("dlpack_info", &dlpack_info, py::arg("capsule"),
        "(data pointer, shape, strides in elements or None, dtype code, bits, lanes, read-only) of a DLPack "
        "capsule.");
  m.attr("STEP_PARAMS_BYTES") = py::int_(sizeof(StepParams));
  m.def(
      "pack_step_params",
      [](const std::vector<StepParams>& rows) {
        for (const StepParams& r : rows) {
          validate_step_params(r);  // the device reads them on trust
          refuse_deep(r, "a CUDA step table");
        }
        return py::bytes(reinterpret_cast<const char*>(rows.data()), rows.size() * sizeof(StepParams));
      },
      py::arg("rows"),
      "The rows as the native struct's bytes: a step table for CUDA-graph replay (pydiff.cuda_graph).");

  m.def("fused_step", &fused_step, py::arg("x"), py::arg("model_output"), py::arg("out"), py::arg("params"),
        py::arg("guided") = false, py::arg("guidance_scale") = 1.0, py::arg("scales") = py::none(),
        py::arg("x0_prev") = py::none(), py::arg("x0_out") = py::none(), py::arg("thresholds") = py::none(),
        py::arg("x0_prev2") = py::none(), py::arg("x0_prev3") = py::none(),
        "One fused denoising step; returns how many elements had a non-finite input or output.");
  m.attr("STEP_PARAMS_DTYPE") = step_params_dtype();
  m.def(
      "validate_step_rows",
      [](py::handle params, int64_t batch, int64_t n, bool has_x0_prev) {
        check_extent(batch, n);
        StepSpans spans;
        const std::vector<StepParams> rows = step_rows_arg(params, batch, spans.params);
        if (has_x0_prev) spans.x0_prev.name = "x0_prev";
        check_step_rows(rows.data(), spans, batch, n);
      },
      py::arg("params"), py::arg("batch"), py::arg("n"), py::arg("has_x0_prev"),
      "Raise TypeError/ValueError for a per-row table that fused_step_rows (either twin) refuses for a "
      "batch of `batch` samples of `n` elements.");
  m.def("fused_step_rows", &fused_step_rows, py::arg("x"), py::arg("model_output"), py::arg("out"),
        py::arg("params"), py::arg("guided") = false, py::arg("guidance_scale") = 1.0,
        py::arg("scales") = py::none(), py::arg("x0_prev") = py::none(), py::arg("x0_out") = py::none(),
        py::arg("thresholds") = py::none(),
        "The fused step with a step per row: params holds B StepParams (a STEP_PARAMS_DTYPE array or a "
        "sequence); row b's noise is keyed by its own (seed, noise_step) and the element index within the "
        "sample. Returns the non-finite count.");
  m.def("cfg_mix", &cfg_mix, py::arg("cond"), py::arg("uncond"), py::arg("out"), py::arg("scale") = 1.0,
        py::arg("scales") = py::none());
  m.def("abs_quantile", &abs_quantile, py::arg("x"), py::arg("out"), py::arg("q"), py::arg("max_value") = 1.0,
        py::arg("clamp") = false);
  m.def("randn", &randn, py::arg("out"), py::arg("seed"), py::arg("step"), py::arg("offset") = 0);
  m.def(
      "set_num_threads",
      [](py::handle n) {
        g_num_threads.store(
            checked_num_threads(int_arg(n, "num_threads", 0, kMaxNumThreads, kNumThreadsNote)));
      },
      py::arg("num_threads"), "Threads the CPU kernels use: 0 (OpenMP's default) to MAX_NUM_THREADS.");
  m.def("get_num_threads", &num_threads);
  m.attr("MAX_NUM_THREADS") = kMaxNumThreads;
  m.attr("cuda_available") = false;
}

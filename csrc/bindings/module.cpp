// The single Python module, pydiff._C: array views, their validation, and the GIL.
// Nothing here casts or copies: a wrong dtype, shape or layout is an error naming the argument.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "ops/ops.h"

namespace py = pybind11;
using namespace pydiff;

namespace {

std::atomic<int> g_num_threads{0};  // 0: OpenMP's default

int num_threads() {
  const int n = g_num_threads.load();
  return n > 0 ? n : default_num_threads();
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
  if (!arr.dtype().equal(py::dtype::of<float>()))   // equivalent, not the same object: unpickled arrays
    throw py::type_error(std::string(name) + " must have dtype float32, got " +
                         std::string(py::str(arr.dtype())));
  if (!(arr.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous (use numpy.ascontiguousarray)");
  if (!(arr.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) throw py::value_error(std::string(name) + " must be aligned");
  if (writable && !arr.writeable()) throw py::value_error(std::string(name) + " must be writeable");
  View v;
  // a read-only input (np.frombuffer, mmap_mode='r') is fine: only outputs need writing
  v.ptr = writable ? static_cast<float*>(arr.mutable_data()) : const_cast<float*>(static_cast<const float*>(arr.data()));
  for (py::ssize_t i = 0; i < arr.ndim(); ++i) v.shape.push_back(arr.shape(i));
  v.size = arr.size();
  return v;
}

void require_shape(const View& v, const std::vector<int64_t>& shape, const char* name,
                   const char* what) {
  if (v.shape != shape)
    throw py::value_error(std::string(name) + " must have shape " + shape_str(shape) + " (" + what +
                          "), got " + shape_str(v.shape));
}

// Elementwise kernels tolerate an output that is exactly an input (same index), not a shifted overlap.
void require_no_partial_overlap(const View& a, const char* an, const float* b, int64_t bsize,
                                const char* bn) {
  const float *a0 = a.ptr, *a1 = a.ptr + a.size, *b0 = b, *b1 = b + bsize;
  if (a.size && bsize && a0 < b1 && b0 < a1 && (a0 != b0 || a.size != bsize))
    throw py::value_error(std::string(an) + " partially overlaps " + bn);
}

// Two outputs, or a buffer written between the kernel's passes, may share no element at all.
void require_no_overlap(const View& a, const char* an, const float* b, int64_t bsize, const char* bn) {
  const float *a0 = a.ptr, *a1 = a.ptr + a.size, *b0 = b, *b1 = b + bsize;
  if (a.size && bsize && a0 < b1 && b0 < a1)
    throw py::value_error(std::string(an) + " overlaps " + bn + " (they must be separate buffers)");
}


// The parameters both twins' kernels take on trust (the CUDA wrapper calls this through
// pydiff._C.validate_step_params: one place for the rules).
void validate_step_params(const StepParams& p) {
  if (p.prediction_type < kEpsilon || p.prediction_type > kVPrediction)
    throw py::value_error("prediction_type must be 0 (epsilon), 1 (sample) or 2 (v_prediction)");
  if (p.threshold_mode < kNoThreshold || p.threshold_mode > kDynamic)
    throw py::value_error("threshold_mode must be 0 (none), 1 (static) or 2 (dynamic)");
  if (p.threshold_mode == kDynamic && !(p.dynamic_ratio > 0.0f && p.dynamic_ratio <= 1.0f))
    throw py::value_error("dynamic_thresholding_ratio must be in (0, 1]");
  if (p.threshold_mode == kDynamic && !(p.sample_max_value >= 1.0f))
    throw py::value_error("sample_max_value must be >= 1");
  if (p.threshold_mode == kStaticClip && !(p.clip_range > 0.0f && p.clip_range <= 3.0e38f))
    throw py::value_error("clip_sample_range must be a positive finite number");
}

// `p` by value: another Python thread may change the caller's object once the GIL is released.
int64_t fused_step(py::handle x_, py::handle model_output_, py::handle out_, StepParams p,
                   bool guided, float guidance_scale, py::handle scales_, py::handle x0_prev_,
                   py::handle x0_out_, py::handle thresholds_) {
  const View x = view_f32(x_, "x", false);
  const View mo = view_f32(model_output_, "model_output", false);
  const View out = view_f32(out_, "out", true);
  if (x.shape.empty()) throw py::value_error("x must have a batch dimension, got a scalar");
  const int64_t B = x.shape[0];
  const int64_t n = B ? x.size / B : 0;
  std::vector<int64_t> mo_shape = x.shape;
  if (guided) mo_shape[0] = 2 * B;
  require_shape(mo, mo_shape, "model_output",
                guided ? "the stacked [cond; uncond] batch" : "the same as x");
  require_shape(out, x.shape, "out", "the same as x");
  require_no_partial_overlap(out, "out", x.ptr, x.size, "x");
  require_no_partial_overlap(out, "out", mo.ptr, B * n, "model_output");
  if (guided) require_no_partial_overlap(out, "out", mo.ptr + B * n, B * n, "model_output");

  StepArrays a;
  a.x = x.ptr;
  a.cond = mo.ptr;
  a.uncond = guided ? mo.ptr + B * n : nullptr;
  a.scale = guidance_scale;
  a.out = out.ptr;
  a.batch = B;
  a.n = n;
  if (!scales_.is_none()) {
    const View s = view_f32(scales_, "guidance_scale", false);
    require_shape(s, {B}, "guidance_scale", "one scale per sample");
    a.scales = s.ptr;
  }
  if (!x0_prev_.is_none()) {
    const View v = view_f32(x0_prev_, "x0_prev", false);
    require_shape(v, x.shape, "x0_prev", "the same as x");
    require_no_partial_overlap(out, "out", v.ptr, v.size, "x0_prev");
    a.x0_prev = v.ptr;
  } else if (p.c_d != 0.0f) {
    throw py::value_error("x0_prev is required when c_d != 0 (a multistep update)");
  }
  if (!x0_out_.is_none()) {
    const View v = view_f32(x0_out_, "x0_out", true);
    require_shape(v, x.shape, "x0_out", "the same as x");
    require_no_overlap(v, "x0_out", out.ptr, out.size, "out");
    require_no_partial_overlap(v, "x0_out", x.ptr, x.size, "x");
    require_no_partial_overlap(v, "x0_out", mo.ptr, B * n, "model_output");
    if (guided) require_no_partial_overlap(v, "x0_out", mo.ptr + B * n, B * n, "model_output");
    if (a.x0_prev) require_no_partial_overlap(v, "x0_out", a.x0_prev, x.size, "x0_prev");
    a.x0_out = v.ptr;
  }
  if (!thresholds_.is_none()) {
    const View v = view_f32(thresholds_, "thresholds", true);
    require_shape(v, {B}, "thresholds", "one per sample");
    // written between the statistics and the update pass: it may touch nothing the step reads or writes
    require_no_overlap(v, "thresholds", x.ptr, x.size, "x");
    require_no_overlap(v, "thresholds", mo.ptr, mo.size, "model_output");
    require_no_overlap(v, "thresholds", out.ptr, out.size, "out");
    if (a.x0_prev) require_no_overlap(v, "thresholds", a.x0_prev, x.size, "x0_prev");
    if (a.x0_out) require_no_overlap(v, "thresholds", a.x0_out, x.size, "x0_out");
    a.thresholds = v.ptr;
  }
  validate_step_params(p);
  if (p.threshold_mode == kDynamic && B > 0 && n == 0)
    throw py::value_error("x has no elements per sample: the dynamic threshold is undefined");
  const int nt = num_threads();
  py::gil_scoped_release nogil;
  return fused_step_cpu(a, p, nt);
}

void cfg_mix(py::handle cond_, py::handle uncond_, py::handle out_, float scale, py::handle scales_) {
  const View c = view_f32(cond_, "cond", false);
  const View u = view_f32(uncond_, "uncond", false);
  const View out = view_f32(out_, "out", true);
  if (c.shape.empty()) throw py::value_error("cond must have a batch dimension, got a scalar");
  require_shape(u, c.shape, "uncond", "the same as cond");
  require_shape(out, c.shape, "out", "the same as cond");
  require_no_partial_overlap(out, "out", c.ptr, c.size, "cond");
  require_no_partial_overlap(out, "out", u.ptr, u.size, "uncond");
  const int64_t B = c.shape[0], n = B ? c.size / B : 0;
  const float* scales = nullptr;
  if (!scales_.is_none()) {
    const View s = view_f32(scales_, "scale", false);
    require_shape(s, {B}, "scale", "one scale per sample");
    scales = s.ptr;
  }
  const int nt = num_threads();
  py::gil_scoped_release nogil;
  cfg_mix_cpu(c.ptr, u.ptr, scales, scale, out.ptr, B, n, nt);
}

void abs_quantile(py::handle x_, py::handle out_, float q, float max_value, bool clamp) {
  const View x = view_f32(x_, "x", false);
  const View out = view_f32(out_, "out", true);
  if (x.shape.empty()) throw py::value_error("x must have a batch dimension, got a scalar");
  const int64_t B = x.shape[0], n = B ? x.size / B : 0;
  require_shape(out, {B}, "out", "one value per sample");
  require_no_overlap(out, "out", x.ptr, x.size, "x");
  if (!(q > 0.0f && q <= 1.0f)) throw py::value_error("ratio must be in (0, 1]");
  if (clamp && !(max_value >= 1.0f)) throw py::value_error("sample_max_value must be >= 1");
  if (n == 0 && B > 0) throw py::value_error("x has no elements per sample: the quantile is undefined");
  const int nt = num_threads();
  py::gil_scoped_release nogil;
  abs_quantile_cpu(x.ptr, q, max_value, clamp, out.ptr, B, n, nt);
}

void randn(py::handle out_, uint64_t seed, uint32_t step, int64_t offset) {
  const View out = view_f32(out_, "out", true);
  if (offset < 0) throw py::value_error("offset must be >= 0");
  const int nt = num_threads();
  py::gil_scoped_release nogil;
  randn_cpu(seed, step, offset, out.ptr, out.size, nt);
}

// The parts of the DLPack ABI (dlpack.h 0.8 and 1.x) that dlpack_info reads.
struct DLDeviceAbi { int32_t device_type; int32_t device_id; };
struct DLDataTypeAbi { uint8_t code; uint8_t bits; uint16_t lanes; };
struct DLTensorAbi {
  void* data;
  DLDeviceAbi device;
  int32_t ndim;
  DLDataTypeAbi dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensorAbi { DLTensorAbi dl_tensor; void* manager_ctx; void (*deleter)(DLManagedTensorAbi*); };
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
    throw py::type_error(std::string("not an unconsumed DLPack capsule (name ") + (name ? name : "null") + ")");
  py::list shape, strides;
  for (int32_t i = 0; i < t->ndim; ++i) {
    shape.append(t->shape[i]);
    if (t->strides) strides.append(t->strides[i]);
  }
  const auto data = reinterpret_cast<uintptr_t>(t->data) + t->byte_offset;
  return py::make_tuple(data, py::tuple(shape), t->strides ? py::object(py::tuple(strides)) : py::object(py::none()),
                        int(t->dtype.code), int(t->dtype.bits), int(t->dtype.lanes), read_only);
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
      .def_readwrite("alpha", &StepParams::alpha)
      .def_readwrite("sigma", &StepParams::sigma)
      .def_readwrite("prediction_type", &StepParams::prediction_type)
      .def_readwrite("threshold_mode", &StepParams::threshold_mode)
      .def_readwrite("clip_range", &StepParams::clip_range)
      .def_readwrite("dynamic_ratio", &StepParams::dynamic_ratio)
      .def_readwrite("sample_max_value", &StepParams::sample_max_value)
      .def_readwrite("use_clipped_eps", &StepParams::use_clipped_eps)
      .def_readwrite("c_x", &StepParams::c_x)
      .def_readwrite("c_x0", &StepParams::c_x0)
      .def_readwrite("c_eps", &StepParams::c_eps)
      .def_readwrite("c_d", &StepParams::c_d)
      .def_readwrite("c_noise", &StepParams::c_noise)
      .def_readwrite("seed", &StepParams::seed)
      .def_readwrite("noise_step", &StepParams::noise_step);
  m.def("validate_step_params", &validate_step_params, py::arg("params"),
        "Raise ValueError for parameters the step kernels cannot take (both twins' rules).");
  m.def("dlpack_info", &dlpack_info, py::arg("capsule"),
        "(data pointer, shape, strides in elements or None, dtype code, bits, lanes, read-only) of a DLPack "
        "capsule.");
  m.attr("STEP_PARAMS_BYTES") = py::int_(sizeof(StepParams));
  m.def(
      "pack_step_params",
      [](const std::vector<StepParams>& rows) {
        for (const StepParams& r : rows) validate_step_params(r);  // the device reads them on trust
        return py::bytes(reinterpret_cast<const char*>(rows.data()), rows.size() * sizeof(StepParams));
      },
      py::arg("rows"),
      "The rows as the native struct's bytes: a step table for CUDA-graph replay (pydiff.cuda_graph).");

  m.def("fused_step", &fused_step, py::arg("x"), py::arg("model_output"), py::arg("out"),
        py::arg("params"), py::arg("guided") = false, py::arg("guidance_scale") = 1.0f,
        py::arg("scales") = py::none(), py::arg("x0_prev") = py::none(),
        py::arg("x0_out") = py::none(), py::arg("thresholds") = py::none(),
        "One fused denoising step; returns how many elements had a non-finite input or output.");
  m.def("cfg_mix", &cfg_mix, py::arg("cond"), py::arg("uncond"), py::arg("out"),
        py::arg("scale") = 1.0f, py::arg("scales") = py::none());
  m.def("abs_quantile", &abs_quantile, py::arg("x"), py::arg("out"), py::arg("q"),
        py::arg("max_value") = 1.0f, py::arg("clamp") = false);
  m.def("randn", &randn, py::arg("out"), py::arg("seed"), py::arg("step"), py::arg("offset") = 0);
  m.def("set_num_threads", [](int n) {
    if (n < 0) throw py::value_error("num_threads must be >= 0 (0: the OpenMP default)");
    g_num_threads.store(n);
  });
  m.def("get_num_threads", &num_threads);
  m.attr("cuda_available") = false;
}

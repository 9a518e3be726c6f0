// pydiff._C_cuda: the CUDA twin's entry points. Arrays arrive as device pointers that
// pydiff/cuda.py has already validated (dtype, shape, contiguity, device); a stream is an integer
// handle (0: the legacy default stream). Each launch makes the arrays' device current for its
// duration. Nothing here synchronises with the host. The numbers (extents, scalars, the noise
// stream's coordinates) and the buffers' overlaps are checked here by the CPU twin's rules
// (bindings/checks.h, bindings/args.h), before anything is queued.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings/args.h"
#include "bindings/checks.h"
#include "bindings/step_rows.h"
#include "ops/ops.h"
#include "ops/ops_cuda.h"

#include <cuda_runtime_api.h>

namespace py = pybind11;
using namespace pydiff;

namespace {

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void check(int err, const char* what) {
  if (err != 0)
    throw std::runtime_error(std::string(what) + " failed to launch (cudaError " + std::to_string(err) + ")");
}

// Makes `device` current for a launch and restores the caller's device after: kernels, streams and
// stream-ordered allocations all belong to the current device (-1: leave it as it is).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (device < 0) return;
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) {
      check(cudaSetDevice(device), "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool switched_ = false;
};

// `consumer` waits (on the device, not the host) for the work queued so far on `producer`: what the
// CUDA Array Interface's `stream` key asks of a consumer. 1 and 2 are the legacy and per-thread
// default streams, as in the interface and the runtime's cudaStreamLegacy / cudaStreamPerThread.
void stream_wait(uintptr_t consumer, uintptr_t producer, int device) {
  DeviceGuard guard(device);
  cudaEvent_t e;
  check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
  int err = cudaEventRecord(e, reinterpret_cast<cudaStream_t>(producer));
  if (err == 0) err = cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(consumer), e, 0);
  cudaEventDestroy(e);  // released once the wait is satisfied
  check(err, "stream_wait");
}

Span dspan(const char* name, uintptr_t p, uint64_t bytes) {
  return p ? Span{name, p, bytes} : Span{};
}

void check_device(int device) {
  if (device < -1)
    throw py::value_error("device must be >= -1 (-1: the current device), got " + std::to_string(device));
}

// The arrays of one fused step on the device, and their spans for the overlap rules.
struct StepCall {
  StepArraysCuda a;
  StepSpans spans;
};

StepCall step_call(uintptr_t x, uintptr_t model_output, uintptr_t out, int64_t batch, int64_t n, int storage,
                   bool guided, py::handle scale_, uintptr_t scales, uintptr_t x0_prev, uintptr_t x0_out,
                   uintptr_t thresholds, uintptr_t nonfinite, uintptr_t param_table, uintptr_t step_counter,
                   uintptr_t workspace, size_t workspace_bytes, int device) {
  if (storage < kFloat32 || storage > kBFloat16)
    throw py::value_error("storage must be 0 (f32), 1 (f16) or 2 (bf16)");
  if (param_table && !step_counter) throw py::value_error("a param_table needs a step_counter");
  check_extent(batch, n);
  check_device(device);
  const float scale = f32_arg(scale_, "guidance_scale");
  const size_t elem = storage == kFloat32 ? 4 : 2;
  const uint64_t bytes = uint64_t(batch * n) * elem;
  if (bytes && (!x || !model_output || !out))
    throw py::value_error("x, model_output and out must be device pointers");
  StepCall c;
  StepSpans& sp = c.spans;
  sp.x = dspan("x", x, bytes);
  sp.model_output = dspan("model_output", model_output, guided ? 2 * bytes : bytes);
  sp.cond = dspan("model_output", model_output, bytes);
  if (guided) sp.uncond = dspan("model_output", model_output + bytes, bytes);
  sp.scales = dspan("guidance_scale", scales, uint64_t(batch) * 4);
  sp.x0_prev = dspan("x0_prev", x0_prev, bytes);
  sp.x0_out = dspan("x0_out", x0_out, bytes);
  sp.out = dspan("out", out, bytes);
  sp.thresholds = dspan("thresholds", thresholds, uint64_t(batch) * 4);
  sp.nonfinite = dspan("nonfinite", nonfinite, 8);
  sp.step_counter = dspan("step_counter", param_table ? step_counter : 0, 4);
  sp.workspace = dspan("workspace", workspace, workspace_bytes);
  StepArraysCuda& a = c.a;
  a.x = ptr<const void>(x);
  a.cond = ptr<const void>(model_output);
  a.uncond = guided ? ptr<const char>(model_output) + batch * n * elem : nullptr;
  a.scales = ptr<const float>(scales);
  a.scale = scale;
  a.x0_prev = ptr<const void>(x0_prev);
  a.x0_out = ptr<void>(x0_out);
  a.out = ptr<void>(out);
  a.thresholds = ptr<float>(thresholds);
  a.nonfinite = ptr<unsigned long long>(nonfinite);
  a.batch = batch;
  a.n = n;
  a.storage = storage;
  a.param_table = ptr<const StepParams>(param_table);
  a.step_counter = param_table ? ptr<int32_t>(step_counter) : nullptr;
  a.workspace = ptr<void>(workspace);
  a.workspace_bytes = workspace_bytes;
  return c;
}

void fused_step(uintptr_t x, uintptr_t model_output, uintptr_t out, int64_t batch, int64_t n, int storage,
                const StepParams& p, bool guided, py::handle scale_, uintptr_t scales, uintptr_t x0_prev,
                uintptr_t x0_out, uintptr_t thresholds, uintptr_t nonfinite, uintptr_t stream,
                uintptr_t param_table, uintptr_t step_counter, uintptr_t workspace, size_t workspace_bytes,
                int device) {
  const StepCall c =
      step_call(x, model_output, out, batch, n, storage, guided, scale_, scales, x0_prev, x0_out, thresholds,
                nonfinite, param_table, step_counter, workspace, workspace_bytes, device);
  refuse_deep(p, "the CUDA twin's fused_step");
  check_step(p, c.spans, batch, n);
  int err;
  {
    py::gil_scoped_release nogil;
    DeviceGuard guard(device);
    err = fused_step_cuda(c.a, p, reinterpret_cast<cudaStream_t>(stream));
  }
  check(err, "fused_step");
}

// params: the host table of the rows (bindings/step_rows.h), copied and checked here; the kernels
// take the copy as their arguments.
void fused_step_rows(uintptr_t x, uintptr_t model_output, uintptr_t out, int64_t batch, int64_t n,
                     int storage, py::handle params, bool guided, py::handle scale_, uintptr_t scales,
                     uintptr_t x0_prev, uintptr_t x0_out, uintptr_t thresholds, uintptr_t nonfinite,
                     uintptr_t stream, uintptr_t workspace, size_t workspace_bytes, int device) {
  StepCall c = step_call(x, model_output, out, batch, n, storage, guided, scale_, scales, x0_prev, x0_out,
                         thresholds, nonfinite, 0, 0, workspace, workspace_bytes, device);
  const std::vector<StepParams> rows = step_rows_arg(params, batch, c.spans.params);
  check_step_rows(rows.data(), c.spans, batch, n);
  int err;
  {
    py::gil_scoped_release nogil;
    DeviceGuard guard(device);
    err = fused_step_rows_cuda(c.a, rows.data(), reinterpret_cast<cudaStream_t>(stream));
  }
  check(err, "fused_step_rows");
}

void randn(uintptr_t out, int64_t count, py::handle seed_, py::handle step_, py::handle offset_,
           uintptr_t stream, int device) {
  const uint64_t seed = seed_arg(seed_);
  const uint32_t step = noise_step_arg(step_, "step");
  const int64_t offset = offset_arg(offset_);
  check_noise_range(uint64_t(offset), count);
  check_device(device);
  if (count && !out) throw py::value_error("out must be a device pointer");
  int err;
  {
    py::gil_scoped_release nogil;
    DeviceGuard guard(device);
    err = randn_cuda(seed, step, offset, ptr<float>(out), count, reinterpret_cast<cudaStream_t>(stream));
  }
  check(err, "randn");
}

void cfg_mix(uintptr_t cond, uintptr_t uncond, uintptr_t out, int64_t batch, int64_t n, py::handle scale_,
             uintptr_t scales, uintptr_t stream) {
  check_extent(batch, n);
  const float scale = f32_arg(scale_, "scale");
  const uint64_t bytes = uint64_t(batch * n) * 4;
  if (bytes && (!cond || !uncond || !out))
    throw py::value_error("cond, uncond and out must be device pointers");
  check_cfg_mix(dspan("cond", cond, bytes), dspan("uncond", uncond, bytes),
                dspan("scale", scales, uint64_t(batch) * 4), dspan("out", out, bytes));
  int err;
  {
    py::gil_scoped_release nogil;
    err = cfg_mix_cuda(ptr<const float>(cond), ptr<const float>(uncond), ptr<const float>(scales), scale,
                       ptr<float>(out), batch, n, reinterpret_cast<cudaStream_t>(stream));
  }
  check(err, "cfg_mix");
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pydiff's native step kernels (CUDA twin)";
  py::module_::import("pydiff._C");  // StepParams is defined there
  m.def("fused_step", &fused_step, py::arg("x"), py::arg("model_output"), py::arg("out"), py::arg("batch"),
        py::arg("n"), py::arg("storage"), py::arg("params"), py::arg("guided"), py::arg("scale"),
        py::arg("scales"), py::arg("x0_prev"), py::arg("x0_out"), py::arg("thresholds"), py::arg("nonfinite"),
        py::arg("stream"), py::arg("param_table") = 0, py::arg("step_counter") = 0, py::arg("workspace") = 0,
        py::arg("workspace_bytes") = 0, py::arg("device") = -1);
  m.def("fused_step_rows", &fused_step_rows, py::arg("x"), py::arg("model_output"), py::arg("out"),
        py::arg("batch"), py::arg("n"), py::arg("storage"), py::arg("params"), py::arg("guided"),
        py::arg("scale"), py::arg("scales"), py::arg("x0_prev"), py::arg("x0_out"), py::arg("thresholds"),
        py::arg("nonfinite"), py::arg("stream"), py::arg("workspace") = 0, py::arg("workspace_bytes") = 0,
        py::arg("device") = -1);
  m.def("stream_wait", &stream_wait, py::arg("consumer"), py::arg("producer"), py::arg("device") = -1,
        "Make stream `consumer` wait for the work queued on `producer` (no host synchronisation).");
  m.def(
      "workspace_bytes",
      [](int64_t batch, int64_t n) {
        check_extent(batch, n);
        return fused_step_workspace_bytes(batch, n);
      },
      py::arg("batch"), py::arg("n"),
      "Scratch bytes of one dynamic-thresholding step for `batch` samples of `n` elements.");
  m.def("randn", &randn, py::arg("out"), py::arg("count"), py::arg("seed"), py::arg("step"),
        py::arg("offset"), py::arg("stream"), py::arg("device") = -1);
  m.def("cfg_mix", &cfg_mix, py::arg("cond"), py::arg("uncond"), py::arg("out"), py::arg("batch"),
        py::arg("n"), py::arg("scale"), py::arg("scales"), py::arg("stream"));
  m.def("device_count", []() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return n;
  });
  m.def(
      "pointer_device", [](uintptr_t p) { return pointer_device(ptr<const void>(p)); },
      "The CUDA device a pointer lives on, or -1 for host memory.");
}

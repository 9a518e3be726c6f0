// The range rules of the native boundary, written once for both bindings (module.cpp, the CPU
// twin; module_cuda.cpp, the CUDA twin), so that both refuse the same arguments with the same words.
// Plain C++ with no Python in it, so that ctest runs the rules (csrc/tests/test_checks.cpp): each
// rule throws std::invalid_argument, which pybind11 raises as ValueError.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>

#include "pydiff/step_params.h"

namespace pydiff {

// More threads than this is refused. libgomp starts every thread it is asked for and dies
// (SIGSEGV) when pthread_create fails, which on ordinary limits happens somewhere between a few
// thousand and a million threads; the kernels gain nothing beyond one thread per hardware thread,
// and no CPU has 1024 of those. A fixed number rather than a multiple of omp_get_num_procs(), so
// that a thread count valid on one machine is valid on every machine.
constexpr int kMaxNumThreads = 1024;

// offset + count of a noise draw may not exceed this: the kernels index the stream with int64 and
// the CUDA twin rounds the end up to a whole Philox block of 4 (offset + count + 3), which must
// not overflow.
constexpr uint64_t kMaxNoiseEnd = (uint64_t(1) << 63) - 4;

// Elements of one [B, n] array (and of the stacked [2B, n] model output, in bytes) stay far from
// int64's and size_t's limits.
constexpr int64_t kMaxElements = int64_t(1) << 60;

[[noreturn]] inline void refuse(const std::string& message) {
  throw std::invalid_argument(message);
}

inline std::string float_str(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

// A Python float as the float32 the kernels compute with. A value float32 cannot hold (1e39) would
// become inf (and the conversion is undefined behaviour in C++), so it is refused like NaN and inf.
inline float finite_f32(double v, const char* name) {
  if (!(std::fabs(v) <= double(FLT_MAX)))
    refuse(std::string(name) + " must be finite in float32 (|" + name + "| <= 3.40282347e+38), got " +
           float_str(v));
  return static_cast<float>(v);
}

// 0 keeps OpenMP's default (OMP_NUM_THREADS, else the core count, capped at kMaxNumThreads).
constexpr const char* kNumThreadsNote = " (0: OpenMP's default)";
inline int checked_num_threads(int64_t n) {
  if (n < 0 || n > kMaxNumThreads)
    refuse("num_threads must be an integer in [0, " + std::to_string(kMaxNumThreads) + "]" + kNumThreadsNote +
           ", got " + std::to_string(n));
  return int(n);
}

// offset is already known to be in [0, kMaxNoiseEnd]; count is the number of elements drawn.
inline void check_noise_range(uint64_t offset, int64_t count) {
  if (count < 0) refuse("count must be >= 0, got " + std::to_string(count));
  if (uint64_t(count) > kMaxNoiseEnd - offset)
    refuse(
        "offset + count must be at most 2**63 - 4 (the noise stream's element indices are int64), got "
        "offset " +
        std::to_string(offset) + " and count " + std::to_string(count));
}

// The extent of a [batch, n] launch (the CUDA twin takes it as numbers, not as an array's shape).
inline void check_extent(int64_t batch, int64_t n) {
  if (batch < 0) refuse("batch must be >= 0, got " + std::to_string(batch));
  if (n < 0) refuse("n must be >= 0, got " + std::to_string(n));
  if (n != 0 && batch > kMaxElements / n)
    refuse("batch * n must be at most 2**60 elements, got " + std::to_string(batch) + " * " +
           std::to_string(n));
}

// A buffer as a byte range; name == nullptr: the argument was not given.
struct Span {
  const char* name = nullptr;
  uintptr_t begin = 0;
  uint64_t bytes = 0;
};

inline bool spans_overlap(const Span& a, const Span& b) {
  if (!a.name || !b.name || a.bytes == 0 || b.bytes == 0) return false;
  // differences, not ends: no sum can wrap whatever the pointers are
  return a.begin <= b.begin ? b.begin - a.begin < a.bytes : a.begin - b.begin < b.bytes;
}

// Elementwise kernels tolerate an output that is exactly an input (same index), not a shifted overlap.
inline void check_no_partial_overlap(const Span& out, const Span& in) {
  if (spans_overlap(out, in) && (out.begin != in.begin || out.bytes != in.bytes))
    refuse(std::string(out.name) + " partially overlaps " + in.name);
}

// Two outputs, a buffer written between a kernel's passes, or a per-sample input ([B], read by
// every element of its sample) and an output, may share no element at all.
inline void check_no_overlap(const Span& a, const Span& b) {
  if (spans_overlap(a, b))
    refuse(std::string(a.name) + " overlaps " + b.name + " (they must be separate buffers)");
}

// The parameters both twins' kernels take on trust. The float fields are also checked as they are
// set (StepParams' setters); here again because a StepParams reaches the kernels by other paths.
inline void validate_step_params(const StepParams& p) {
  const struct {
    const char* name;
    float v;
  } fields[] = {{"alpha", p.alpha},
                {"sigma", p.sigma},
                {"clip_range", p.clip_range},
                {"dynamic_ratio", p.dynamic_ratio},
                {"sample_max_value", p.sample_max_value},
                {"c_x", p.c_x},
                {"c_x0", p.c_x0},
                {"c_eps", p.c_eps},
                {"c_d", p.c_d},
                {"c_noise", p.c_noise},
                {"c_d2", p.c_d2},
                {"c_d3", p.c_d3}};
  for (const auto& f : fields) finite_f32(double(f.v), f.name);
  if (p.prediction_type < kEpsilon || p.prediction_type > kVPrediction)
    refuse("prediction_type must be 0 (epsilon), 1 (sample) or 2 (v_prediction), got " +
           std::to_string(p.prediction_type));
  if (p.threshold_mode < kNoThreshold || p.threshold_mode > kDynamic)
    refuse("threshold_mode must be 0 (none), 1 (static) or 2 (dynamic), got " +
           std::to_string(p.threshold_mode));
  if (p.use_clipped_eps != 0 && p.use_clipped_eps != 1)
    refuse("use_clipped_eps must be 0 or 1, got " + std::to_string(p.use_clipped_eps));
  if (p.history_output != 0 && p.history_output != 1)
    refuse("history_output must be 0 or 1, got " + std::to_string(p.history_output));
  if (p.threshold_mode == kDynamic && !(p.dynamic_ratio > 0.0f && p.dynamic_ratio <= 1.0f))
    refuse("dynamic_thresholding_ratio must be in (0, 1], got " + float_str(p.dynamic_ratio));
  if (p.threshold_mode == kDynamic && !(p.sample_max_value >= 1.0f))
    refuse("sample_max_value must be >= 1, got " + float_str(p.sample_max_value));
  if (p.threshold_mode == kStaticClip && !(p.clip_range > 0.0f && p.clip_range <= 3.0e38f))
    refuse("clip_sample_range must be a positive finite number, got " + float_str(p.clip_range));
}

// The buffers of one fused step (x, out, x0_prev, x0_out: [B, n]; cond and uncond: the halves of
// model_output; scales and thresholds: [B]; params: fused_step_rows' per-row table, [B] StepParams),
// for the rules that do not depend on how the arrays arrived. model_output is the whole [B or 2B, n]
// buffer.
struct StepSpans {
  Span x, model_output, cond, uncond, scales, x0_prev, x0_out, out, thresholds, params;
  Span x0_prev2, x0_prev3;  // a deep multistep step's older history (the CPU twin's fused_step)
  // the CUDA twin's device scalars and scratch: written, so they may touch nothing
  Span nonfinite, step_counter, workspace;
};

// The overlap rules of every fused step, one StepParams or a table of them.
inline void check_step_buffers(const StepSpans& s) {
  // the outputs the element loop writes where it reads its inputs
  for (const Span* o : {&s.out, &s.x0_out}) {
    for (const Span* in : {&s.x, &s.cond, &s.uncond, &s.x0_prev, &s.x0_prev2, &s.x0_prev3})
      check_no_partial_overlap(*o, *in);
    check_no_overlap(*o, s.scales);
    check_no_overlap(*o, s.params);
  }
  check_no_overlap(s.x0_out, s.out);
  // written between the statistics and the update pass: it may touch nothing the step reads or writes
  for (const Span* o :
       {&s.x, &s.model_output, &s.out, &s.x0_prev, &s.x0_out, &s.scales, &s.params, &s.x0_prev2, &s.x0_prev3})
    check_no_overlap(s.thresholds, *o);
  for (const Span* w : {&s.nonfinite, &s.step_counter, &s.workspace})
    for (const Span* o : {&s.x, &s.model_output, &s.out, &s.x0_prev, &s.x0_out, &s.scales, &s.thresholds,
                          &s.params, &s.nonfinite, &s.step_counter, &s.workspace})
      if (w != o) check_no_overlap(*w, *o);
}

// The rules of one StepParams given what the step has: an x0 history, samples of n elements.
inline void check_step_params(const StepParams& p, const StepSpans& s, int64_t batch, int64_t n) {
  validate_step_params(p);
  if (p.c_d != 0.0f && !s.x0_prev.name) refuse("x0_prev is required when c_d != 0 (a multistep update)");
  if (p.c_d2 != 0.0f && !(s.x0_prev.name && s.x0_prev2.name))
    refuse("x0_prev and x0_prev2 are required when c_d2 != 0 (a deep multistep update)");
  if (p.c_d3 != 0.0f && !(s.x0_prev2.name && s.x0_prev3.name))
    refuse("x0_prev2 and x0_prev3 are required when c_d3 != 0 (a deep multistep update)");
  if (p.threshold_mode == kDynamic && batch > 0 && n == 0)
    refuse("x has no elements per sample: the dynamic threshold is undefined");
}

inline void check_step(const StepParams& p, const StepSpans& s, int64_t batch, int64_t n) {
  check_step_params(p, s, batch, n);
  check_step_buffers(s);
}

// A deep multistep step (c_d2, c_d3 or history_output): the CPU twin's fused_step alone takes one.
inline bool is_deep(const StepParams& p) {
  return p.c_d2 != 0.0f || p.c_d3 != 0.0f || p.history_output != 0;
}

inline void refuse_deep(const StepParams& p, const char* op) {
  if (is_deep(p))
    refuse(std::string(op) +
           " does not take deep multistep steps (c_d2, c_d3, history_output): use the CPU twin's fused_step");
}

// fused_step_rows: every row by fused_step's rules, its index in the message ("params[3]: ...").
inline void check_step_rows(const StepParams* rows, const StepSpans& s, int64_t batch, int64_t n) {
  for (int64_t b = 0; b < batch; ++b) try {
      refuse_deep(rows[b], "fused_step_rows");
      check_step_params(rows[b], s, 1, n);
    } catch (const std::invalid_argument& e) {
      refuse("params[" + std::to_string(b) + "]: " + e.what());
    }
  check_step_buffers(s);
}

// cond, uncond, out: [B, n]; scales: [B] or absent.
inline void check_cfg_mix(const Span& cond, const Span& uncond, const Span& scales, const Span& out) {
  check_no_partial_overlap(out, cond);
  check_no_partial_overlap(out, uncond);
  check_no_overlap(out, scales);
}

}  // namespace pydiff

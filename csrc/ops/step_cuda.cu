// CUDA twin of the step kernels: indexing, reductions and launches only; the formulas are the
// host+device functions of csrc/math, unchanged. Built with --fmad=false so that it rounds as the
// CPU twin does. Never run on a GPU in this project's CI (no GPU there): tests/gpu checks it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>

#include "math/philox.h"
#include "math/step.h"
#include "ops/ops_cuda.h"

namespace pydiff {
namespace {

constexpr int kThreads = 256;

template <class T> __device__ __forceinline__ float load(const void* p, int64_t i);
template <> __device__ __forceinline__ float load<float>(const void* p, int64_t i) {
  return static_cast<const float*>(p)[i];
}
template <> __device__ __forceinline__ float load<__half>(const void* p, int64_t i) {
  return __half2float(static_cast<const __half*>(p)[i]);
}
template <> __device__ __forceinline__ float load<__nv_bfloat16>(const void* p, int64_t i) {
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}
template <class T> __device__ __forceinline__ void store(void* p, int64_t i, float v);
template <> __device__ __forceinline__ void store<float>(void* p, int64_t i, float v) {
  static_cast<float*>(p)[i] = v;
}
template <> __device__ __forceinline__ void store<__half>(void* p, int64_t i, float v) {
  static_cast<__half*>(p)[i] = __float2half_rn(v);
}
template <> __device__ __forceinline__ void store<__nv_bfloat16>(void* p, int64_t i, float v) {
  static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
}

int blocks_for(int64_t work) {
  const int64_t b = (work + kThreads - 1) / kThreads;
  return int(b < 65535 * 8 ? (b > 0 ? b : 1) : 65535 * 8);
}

// ---------------------------------------------------------------- dynamic-threshold selection
// Per-sample state of the exact quantile selection (see select_threshold in step_cpu.cpp).
struct Selection {
  unsigned long long above_one;  // |x0| > 1
  unsigned long long at_max;     // |x0| >= sample_max_value
  unsigned int max_le_one_bits;  // bits of the largest |x0| <= 1 (non-negative floats order as ints)
  int selecting;                 // 1 while the radix passes run for this sample
  long long rank[2];             // ranks of v_lo, v_hi among the values > 1
  unsigned int prefix[2];        // their float bits, decided 8 bits per pass
  int need_lo;                   // v_lo is among the values > 1 (else it is max_le_one)
  float w;
  float s;                       // the threshold
};

template <class T, int PRED, bool GUIDED>
__device__ __forceinline__ float abs_raw_x0(const StepArraysCuda& a, const StepParams& p, int64_t e, int64_t b) {
  const float s = a.scales ? a.scales[b] : a.scale;
  const float u = GUIDED ? load<T>(a.uncond, e) : 0.0f;
  return fabsf(raw_x0<PRED, GUIDED>(p, load<T>(a.x, e), load<T>(a.cond, e), u, s));
}

template <class T, int PRED, bool GUIDED>
__global__ void threshold_stats_kernel(StepArraysCuda a, StepParams p, Selection* sel) {
  const int64_t total = a.batch * a.n;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / a.n;
    const float v = abs_raw_x0<T, PRED, GUIDED>(a, p, e, b);
    if (v > 1.0f) atomicAdd(&sel[b].above_one, 1ull);
    if (v >= p.sample_max_value) atomicAdd(&sel[b].at_max, 1ull);
    if (v <= 1.0f) atomicMax(&sel[b].max_le_one_bits, float_bits(v));
  }
}

__global__ void threshold_plan_kernel(StepParams p, int64_t batch, int64_t n, Selection* sel) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  Selection& s = sel[b];
  int64_t lo, hi;
  float w;
  quantile_rank(p.dynamic_ratio, n, lo, hi, w);
  const int64_t first_above = n - int64_t(s.above_one);
  s.w = w;
  s.selecting = 0;
  if (hi < first_above) {
    s.s = 1.0f;
  } else if (lo >= n - int64_t(s.at_max)) {
    s.s = p.sample_max_value;
  } else {
    s.selecting = 1;
    s.need_lo = lo >= first_above;
    s.rank[0] = s.need_lo ? lo - first_above : 0;
    s.rank[1] = hi - first_above;
    s.prefix[0] = s.prefix[1] = 0u;
  }
}

// One radix pass: histogram the 8 bits at `shift` of |x0| > 1 whose higher bits match each target's prefix.
template <class T, int PRED, bool GUIDED>
__global__ void threshold_histogram_kernel(StepArraysCuda a, StepParams p, const Selection* sel, int shift,
                                           unsigned long long* hist /* [B, 2, 256] */) {
  const int64_t total = a.batch * a.n;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / a.n;
    if (!sel[b].selecting) continue;
    const float v = abs_raw_x0<T, PRED, GUIDED>(a, p, e, b);
    if (!(v > 1.0f)) continue;
    const unsigned int bits = float_bits(v);
    for (int t = 0; t < 2; ++t) {
      const bool match = shift == 24 || (bits >> (shift + 8)) == (sel[b].prefix[t] >> (shift + 8));
      if (match) atomicAdd(&hist[(b * 2 + t) * 256 + ((bits >> shift) & 255u)], 1ull);
    }
  }
}

__global__ void threshold_scan_kernel(int64_t batch, int shift, Selection* sel, unsigned long long* hist) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= batch || !sel[b].selecting) return;
  for (int t = 0; t < 2; ++t) {
    unsigned long long* h = hist + (b * 2 + t) * 256;
    long long cum = 0;
    for (int d = 0; d < 256; ++d) {
      const long long c = (long long)h[d];
      if (cum + c > sel[b].rank[t]) {
        sel[b].prefix[t] |= unsigned(d) << shift;
        sel[b].rank[t] -= cum;
        break;
      }
      cum += c;
    }
    for (int d = 0; d < 256; ++d) h[d] = 0ull;  // ready for the next pass
  }
}

__global__ void threshold_finish_kernel(StepParams p, int64_t batch, Selection* sel, float* thresholds) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  Selection& s = sel[b];
  if (s.selecting) {
    const float v_lo = s.need_lo ? bits_float(s.prefix[0]) : bits_float(s.max_le_one_bits);
    const float v_hi = bits_float(s.prefix[1]);
    s.s = clamp_threshold(torch_lerp(v_lo, v_hi, s.w), p.sample_max_value);
  }
  if (thresholds) thresholds[b] = s.s;
}

// ---------------------------------------------------------------- the fused step
// One thread per group of 4 consecutive elements: one Philox block gives their 4 normals.
template <class T, int PRED, bool GUIDED>
__global__ void fused_step_kernel(StepArraysCuda a, StepParams p, const Selection* sel) {
  const int64_t total = a.batch * a.n;
  const int64_t groups = (total + 3) / 4;
  const bool has_noise = p.c_noise != 0.0f;
  const bool has_prev = a.x0_prev != nullptr;
  const bool clipped_eps = p.use_clipped_eps && p.threshold_mode != kNoThreshold;
  unsigned int bad = 0;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups; g += int64_t(gridDim.x) * blockDim.x) {
    float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (has_noise) normal4(p.seed, p.noise_step, uint64_t(g), z);
    for (int k = 0; k < 4; ++k) {
      const int64_t e = 4 * g + k;
      if (e >= total) break;
      const int64_t b = e / a.n;
      const float s = a.scales ? a.scales[b] : a.scale;
      float limit, divisor;
      threshold_limits(p, sel ? sel[b].s : 1.0f, limit, divisor);
      const float x = load<T>(a.x, e);
      const float c = load<T>(a.cond, e);
      const float u = GUIDED ? load<T>(a.uncond, e) : 0.0f;
      const float prev = has_prev ? load<T>(a.x0_prev, e) : x;  // any finite value when c_d == 0
      float x0, m;
      const float r = step_element<PRED, GUIDED>(p, x, c, u, s, limit, divisor, clipped_eps, prev, z[k], x0, m);
      bad += !(fabsf(m) <= FLT_MAX) | !(fabsf(r) <= FLT_MAX);
      store<T>(a.out, e, r);
      if (a.x0_out) store<T>(a.x0_out, e, x0);
    }
  }
  if (a.nonfinite) {
    for (int off = 16; off > 0; off >>= 1) bad += __shfl_down_sync(0xffffffffu, bad, off);
    if ((threadIdx.x & 31) == 0 && bad) atomicAdd(a.nonfinite, (unsigned long long)bad);
  }
}

template <class T, int PRED, bool GUIDED>
int launch(const StepArraysCuda& a, const StepParams& p, cudaStream_t stream) {
  const int64_t total = a.batch * a.n;
  Selection* sel = nullptr;
  unsigned long long* hist = nullptr;
  if (p.threshold_mode == kDynamic) {
    // Stream-ordered allocations: no synchronisation, and capturable in a CUDA graph.
    if (cudaError_t e = cudaMallocAsync(reinterpret_cast<void**>(&sel), sizeof(Selection) * a.batch, stream)) return e;
    if (cudaError_t e = cudaMallocAsync(reinterpret_cast<void**>(&hist), sizeof(unsigned long long) * a.batch * 512, stream))
      return e;
    cudaMemsetAsync(sel, 0, sizeof(Selection) * a.batch, stream);
    cudaMemsetAsync(hist, 0, sizeof(unsigned long long) * a.batch * 512, stream);
    threshold_stats_kernel<T, PRED, GUIDED><<<blocks_for(total), kThreads, 0, stream>>>(a, p, sel);
    const int sample_blocks = int((a.batch + kThreads - 1) / kThreads);
    threshold_plan_kernel<<<sample_blocks, kThreads, 0, stream>>>(p, a.batch, a.n, sel);
    for (int shift = 24; shift >= 0; shift -= 8) {
      threshold_histogram_kernel<T, PRED, GUIDED><<<blocks_for(total), kThreads, 0, stream>>>(a, p, sel, shift, hist);
      threshold_scan_kernel<<<sample_blocks, kThreads, 0, stream>>>(a.batch, shift, sel, hist);
    }
    threshold_finish_kernel<<<sample_blocks, kThreads, 0, stream>>>(p, a.batch, sel, a.thresholds);
  }
  fused_step_kernel<T, PRED, GUIDED><<<blocks_for((total + 3) / 4), kThreads, 0, stream>>>(a, p, sel);
  if (sel) {
    cudaFreeAsync(sel, stream);
    cudaFreeAsync(hist, stream);
  }
  return int(cudaGetLastError());
}

template <class T>
int dispatch_prediction(const StepArraysCuda& a, const StepParams& p, cudaStream_t stream) {
  const bool guided = a.uncond != nullptr;
  switch (p.prediction_type * 2 + int(guided)) {
    case kEpsilon * 2: return launch<T, kEpsilon, false>(a, p, stream);
    case kEpsilon * 2 + 1: return launch<T, kEpsilon, true>(a, p, stream);
    case kSample * 2: return launch<T, kSample, false>(a, p, stream);
    case kSample * 2 + 1: return launch<T, kSample, true>(a, p, stream);
    case kVPrediction * 2: return launch<T, kVPrediction, false>(a, p, stream);
    default: return launch<T, kVPrediction, true>(a, p, stream);
  }
}

__global__ void randn_kernel(uint64_t seed, uint32_t step, int64_t offset, float* out, int64_t count) {
  // Thread per group of the stream; writes the part of its group that falls in [offset, offset + count).
  const int64_t g0 = offset >> 2, g1 = (offset + count + 3) >> 2;
  for (int64_t g = g0 + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < g1; g += int64_t(gridDim.x) * blockDim.x) {
    float z[4];
    normal4(seed, step, uint64_t(g), z);
    for (int k = 0; k < 4; ++k) {
      const int64_t e = 4 * g + k;
      if (e >= offset && e < offset + count) out[e - offset] = z[k];
    }
  }
}

__global__ void cfg_mix_kernel(const float* cond, const float* uncond, const float* scales, float scale, float* out,
                               int64_t batch, int64_t n) {
  const int64_t total = batch * n;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x)
    out[e] = cfg_mix(cond[e], uncond[e], scales ? scales[e / n] : scale);
}

}  // namespace

int fused_step_cuda(const StepArraysCuda& a, const StepParams& p, cudaStream_t stream) {
  if (a.batch == 0 || a.n == 0) return 0;
  switch (a.storage) {
    case kFloat16: return dispatch_prediction<__half>(a, p, stream);
    case kBFloat16: return dispatch_prediction<__nv_bfloat16>(a, p, stream);
    default: return dispatch_prediction<float>(a, p, stream);
  }
}

int randn_cuda(uint64_t seed, uint32_t step, int64_t offset, float* out, int64_t count, cudaStream_t stream) {
  if (count == 0) return 0;
  randn_kernel<<<blocks_for((count + 7) / 4), kThreads, 0, stream>>>(seed, step, offset, out, count);
  return int(cudaGetLastError());
}

int cfg_mix_cuda(const float* cond, const float* uncond, const float* scales, float scale, float* out, int64_t batch,
                 int64_t n, cudaStream_t stream) {
  if (batch * n == 0) return 0;
  cfg_mix_kernel<<<blocks_for(batch * n), kThreads, 0, stream>>>(cond, uncond, scales, scale, out, batch, n);
  return int(cudaGetLastError());
}

int pointer_device(const void* ptr) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state of this query
    return -1;
  }
  return attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged ? attr.device : -1;
}

}  // namespace pydiff

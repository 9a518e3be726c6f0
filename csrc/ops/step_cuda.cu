// CUDA twin of the step kernels: indexing, reductions and launches only; the formulas are the
// host+device functions of csrc/math, unchanged. Built with --fmad=false so that it rounds as the
// CPU twin does. CI has no GPU: there it runs on csrc/tests/cuda_emu, a CPU emulator of the CUDA
// it uses (ctest: test_cuda_emu, bit for bit against the CPU twin); tests/gpu checks it on a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <type_traits>

#include "math/philox.h"
#include "math/step.h"
#include "ops/ops_cuda.h"

// `PYDIFF_LAUNCH(grid, block, stream, kernel)(args...)` is `kernel<<<grid, block, 0, stream>>>(args...)`,
// or the emulator's launch.
#if defined(PYDIFF_CUDA_EMULATION)
#define PYDIFF_LAUNCH(grid, block, stream, ...) ::pydiff_emu::launch(grid, block, stream, __VA_ARGS__)
#else
#define PYDIFF_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif

namespace pydiff {
namespace {

constexpr int kThreads = 256;

template <class T>
__device__ __forceinline__ float load(const void* p, int64_t i);
template <>
__device__ __forceinline__ float load<float>(const void* p, int64_t i) {
  return static_cast<const float*>(p)[i];
}
template <>
__device__ __forceinline__ float load<__half>(const void* p, int64_t i) {
  return __half2float(static_cast<const __half*>(p)[i]);
}
template <>
__device__ __forceinline__ float load<__nv_bfloat16>(const void* p, int64_t i) {
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}
template <class T>
__device__ __forceinline__ void store(void* p, int64_t i, float v);
template <>
__device__ __forceinline__ void store<float>(void* p, int64_t i, float v) {
  static_cast<float*>(p)[i] = v;
}
template <>
__device__ __forceinline__ void store<__half>(void* p, int64_t i, float v) {
  static_cast<__half*>(p)[i] = __float2half_rn(v);
}
template <>
__device__ __forceinline__ void store<__nv_bfloat16>(void* p, int64_t i, float v) {
  static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
}

int blocks_for(int64_t work) {
  const int64_t b = (work + kThreads - 1) / kThreads;
  return int(b < 65535 * 8 ? (b > 0 ? b : 1) : 65535 * 8);
}

// The step's scalars: by value, or for CUDA-graph replay the current row of a device table.
__device__ __forceinline__ StepParams params_of(const StepArraysCuda& a, const StepParams& p) {
  return a.param_table ? a.param_table[*a.step_counter] : p;
}

// ---------------------------------------------------------------- vector access
// Four consecutive elements per thread: one Philox block gives their 4 normals (the CPU twin's
// grouping), and aligned groups move as one 16-byte (float32) or 8-byte (16-bit) access.
template <class T>
struct Vec4;
template <>
struct Vec4<float> {
  using type = float4;
};
template <>
struct Vec4<__half> {
  using type = uint2;
};
template <>
struct Vec4<__nv_bfloat16> {
  using type = uint2;
};

template <class T>
__device__ __forceinline__ void load4(const void* p, int64_t e, bool vec, int64_t total, float v[4]) {
  if (vec) {
    const typename Vec4<T>::type raw = static_cast<const typename Vec4<T>::type*>(p)[e >> 2];
    T t[4];
    static_assert(sizeof t == sizeof raw, "four elements make one vector");
    memcpy(t, &raw, sizeof t);  // not a cast: the vector is no T object (strict aliasing)
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = load<T>(t, k);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = e + k < total ? load<T>(p, e + k) : 0.0f;
  }
}

template <class T>
__device__ __forceinline__ void store4(void* p, int64_t e, bool vec, int64_t total, const float v[4]) {
  if (vec) {
    T t[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) store<T>(t, k, v[k]);
    typename Vec4<T>::type raw;
    memcpy(&raw, t, sizeof raw);
    static_cast<typename Vec4<T>::type*>(p)[e >> 2] = raw;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (e + k < total) store<T>(p, e + k, v[k]);
  }
}

// ---------------------------------------------------------------- dynamic-threshold selection
// Per-sample exact quantile of |x0| (see threshold_from_stats in step_cpu.cpp): the same two counts
// settle most samples; otherwise a radix select finds the values of ranks lo and hi among |x0| > 1
// (non-negative floats order as their bits do). The first pass reads the inputs once, counts,
// histograms the top 8 bits and compacts the values > 1 (usually a few percent) into the workspace.
// Then one block per sample fixes the top 8 bits from that histogram and the other 24 in two passes
// of 12 bits over the compacted values, in shared memory: two launches in all, not one per pass (the
// earlier design's nine launches cost more than the work in a typical step). The price: one SM
// streams a sample's compacted values twice, which grows with their count, a few percent of the
// sample in a typical step but all of it when the quantile lies far above 1.
struct Selection {
  unsigned long long above_one;  // |x0| > 1: also the number of compacted values
  unsigned long long at_max;     // |x0| >= sample_max_value
  unsigned int max_le_one_bits;  // bits of the largest |x0| <= 1
  int selecting;                 // 1 while the radix passes run for this sample
  long long rank[2];             // ranks of v_lo, v_hi among the values > 1, within the current prefix
  unsigned int prefix[2];        // their float bits, decided from the top
  int need_lo;                   // v_lo is among the values > 1 (else it is max_le_one)
  float w;
  float s;  // the threshold
};

constexpr int64_t kHistBins = 256;    // per sample: the first pass's histogram of the top 8 bits
constexpr int kSelectThreads = 1024;  // the select kernel's block, one per sample
constexpr int kWideBits = 12;         // bits per pass of the select kernel: 24 = 2 x 12
constexpr int kWideBins = 1 << kWideBits;

size_t align256(size_t v) {
  return (v + 255) / 256 * 256;
}
size_t selection_bytes(int64_t batch) {
  return align256(sizeof(Selection) * size_t(batch));
}
size_t zeroed_bytes(int64_t batch) {  // the part of the workspace cleared before each step
  return selection_bytes(batch) + align256(sizeof(unsigned long long) * size_t(kHistBins) * size_t(batch));
}

// Adds 1 to bin `bin` of a shared histogram for every lane with `valid`, one atomic per distinct bin
// of the warp (the first passes see only a few distinct top bytes). All 32 lanes must call it.
__device__ __forceinline__ void warp_histogram_add(unsigned int* h, bool valid, unsigned int bin) {
  const unsigned int key = valid ? bin : 0xFFFFFFFFu;
  const unsigned int peers = __match_any_sync(0xFFFFFFFFu, key);
  const int lane = threadIdx.x & 31;
  if (valid && lane == __ffs(peers) - 1) atomicAdd(&h[bin], unsigned(__popc(peers)));
}

// Pass 1, grid (blocks per sample, batch): each block reads kStatsGroups x kThreads groups of four
// elements of one sample (no element needs a division to find its sample) and gives the counts, the
// top-8-bit histogram of every |x0| > 1 (no prefix to match yet, so it serves both targets), and those
// values compacted to vals[b * n, b * n + above_one) in any order. A thread holds its |x0| values in
// registers until the block has reserved its slots: one reservation (two barriers, one global atomic)
// per block, and loads independent of each other, all in flight at once. Groups load as one vector
// when `vec` (aligned arrays, n a multiple of 4).
constexpr int kStatsGroups = 4;

// Sample b's part of the pass, under its params p (a block's samples all share theirs).
template <class T, int PRED, bool GUIDED>
__device__ __forceinline__ void threshold_stats(const StepArraysCuda& a, const StepParams& p, int64_t b,
                                                Selection* sel, unsigned long long* hist, float* vals,
                                                bool vec) {
  const int lane = threadIdx.x & 31;
  __shared__ unsigned int h[256];
  __shared__ unsigned int block_count;
  __shared__ unsigned long long block_base;
  for (int i = threadIdx.x; i < 256; i += blockDim.x) h[i] = 0u;
  if (threadIdx.x == 0) block_count = 0u;
  __syncthreads();
  const float scale = a.scales ? a.scales[b] : a.scale;
  const int64_t begin = b * a.n, end = begin + a.n, groups = (a.n + 3) / 4;
  const int64_t g0 = int64_t(blockIdx.x) * blockDim.x * kStatsGroups + threadIdx.x;
  float v[kStatsGroups][4];
  unsigned long long at_max = 0;
  unsigned int max_le = 0u, mine = 0u;
#pragma unroll
  for (int i = 0; i < kStatsGroups; ++i) {
    const int64_t g = g0 + int64_t(i) * blockDim.x;  // consecutive threads, consecutive groups
    float xv[4], cv[4], uv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const bool group_valid = g < groups;
    if (group_valid) {
      load4<T>(a.x, begin + 4 * g, vec, end, xv);
      load4<T>(a.cond, begin + 4 * g, vec, end, cv);
      if (GUIDED) load4<T>(a.uncond, begin + 4 * g, vec, end, uv);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const bool valid = group_valid && 4 * g + k < a.n;
      v[i][k] = valid ? fabsf(raw_x0<PRED, GUIDED>(p, xv[k], cv[k], uv[k], scale)) : 0.0f;
      const bool gt1 = valid && v[i][k] > 1.0f;
      mine += gt1;
      at_max += valid && v[i][k] >= p.sample_max_value;
      if (valid && v[i][k] <= 1.0f) max_le = max(max_le, float_bits(v[i][k]));
      if (__ballot_sync(0xFFFFFFFFu, gt1)) warp_histogram_add(h, gt1, float_bits(v[i][k]) >> 24);
      if (!valid) v[i][k] = 0.0f;  // not compacted below (0 is not > 1)
    }
  }
  // Slots: the warp's by a prefix sum, the block's by one atomic on the sample's counter (a global
  // atomic per warp serialised at the L2).
  unsigned int incl = mine;
  for (int off = 1; off < 32; off <<= 1) {
    const unsigned int up = __shfl_up_sync(0xFFFFFFFFu, incl, off);
    if (lane >= off) incl += up;
  }
  const unsigned int warp_total = __shfl_sync(0xFFFFFFFFu, incl, 31);
  unsigned int warp_base = 0u;
  if (lane == 31 && warp_total) warp_base = atomicAdd(&block_count, warp_total);
  warp_base = __shfl_sync(0xFFFFFFFFu, warp_base, 31);
  __syncthreads();
  if (threadIdx.x == 0)
    block_base = block_count ? atomicAdd(&sel[b].above_one, (unsigned long long)block_count) : 0ull;
  __syncthreads();
  unsigned long long pos = block_base + warp_base + (incl - mine);
#pragma unroll
  for (int i = 0; i < kStatsGroups; ++i)
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (v[i][k] > 1.0f) vals[begin + int64_t(pos++)] = v[i][k];
  for (int off = 16; off > 0; off >>= 1) {
    at_max += __shfl_down_sync(0xFFFFFFFFu, at_max, off);
    max_le = max(max_le, __shfl_down_sync(0xFFFFFFFFu, max_le, off));
  }
  if (lane == 0) {
    if (at_max) atomicAdd(&sel[b].at_max, at_max);
    if (max_le) atomicMax(&sel[b].max_le_one_bits, max_le);
  }
  for (int i = threadIdx.x; i < 256; i += blockDim.x)  // h is complete: the barriers above came after it
    if (h[i]) atomicAdd(&hist[b * kHistBins + i], (unsigned long long)h[i]);
}

template <class T, int PRED, bool GUIDED>
__global__ void threshold_stats_kernel(StepArraysCuda a, StepParams p0, Selection* sel,
                                       unsigned long long* hist, float* vals, bool vec) {
  threshold_stats<T, PRED, GUIDED>(a, params_of(a, p0), blockIdx.y, sel, hist, vals, vec);
}

// One block per sample: after it, each target's prefix holds 8 more bits (at `shift`, from the
// histograms h[t][0..BINS) of the values that match its higher bits) and its rank is the rank within
// them. Each thread owns BINS / kSelectThreads consecutive bins (at least one); a block-wide scan of
// the owners' sums finds the bin holding each rank.
template <int BINS>
__device__ void settle_digits(const unsigned int (&h)[2][BINS], Selection& st, int shift) {
  constexpr int kPer = BINS >= kSelectThreads ? BINS / kSelectThreads : 1;
  constexpr int kWarps = kSelectThreads / 32;
  __shared__ unsigned long long warp_base[2][kWarps];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, first = tid * kPer;
  unsigned long long mine[2] = {0ull, 0ull}, incl[2];
  for (int t = 0; t < 2; ++t) {
    for (int i = 0; i < kPer; ++i) mine[t] += first + i < BINS ? h[t][first + i] : 0u;
    incl[t] = mine[t];
    for (int off = 1; off < 32; off <<= 1) {  // inclusive scan over the warp
      const unsigned long long up = __shfl_up_sync(0xFFFFFFFFu, incl[t], off);
      if (lane >= off) incl[t] += up;
    }
    if (lane == 31) warp_base[t][warp] = incl[t];
  }
  __syncthreads();
  if (warp == 0) {  // the warps' totals, scanned into each warp's exclusive base
    for (int t = 0; t < 2; ++t) {
      const unsigned long long total = lane < kWarps ? warp_base[t][lane] : 0ull;
      unsigned long long scan = total;
      for (int off = 1; off < 32; off <<= 1) {
        const unsigned long long up = __shfl_up_sync(0xFFFFFFFFu, scan, off);
        if (lane >= off) scan += up;
      }
      if (lane < kWarps) warp_base[t][lane] = scan - total;
    }
  }
  __syncthreads();
  const long long rank[2] = {st.rank[0], st.rank[1]};
  __syncthreads();  // every thread has read the ranks before their owners rewrite them
  for (int t = 0; t < 2; ++t) {
    long long before = (long long)(warp_base[t][warp] + incl[t] - mine[t]);
    if (before <= rank[t] && rank[t] < before + (long long)mine[t]) {  // exactly one thread holds the rank
      for (int i = 0; i < kPer; ++i) {
        const long long c = h[t][first + i];
        if (rank[t] < before + c) {
          st.prefix[t] |= unsigned(first + i) << shift;
          st.rank[t] = rank[t] - before;
          break;
        }
        before += c;
      }
    }
  }
  __syncthreads();
}

// One block of kSelectThreads per sample, after the first pass: decides whether sample b needs the
// select at all (the CPU twin's two shortcuts), else selects v_lo and v_hi, and computes the threshold.
__device__ __forceinline__ void select_threshold(const StepArraysCuda& a, const StepParams& p, int64_t b,
                                                 Selection* sel, const unsigned long long* hist,
                                                 const float* vals) {
  const int tid = threadIdx.x;
  __shared__ Selection st;
  __shared__ unsigned int h8[2][256];
  __shared__ unsigned int h12[2][kWideBins];
  if (tid == 0) {
    st = sel[b];
    int64_t lo, hi;
    float w;
    quantile_rank(p.dynamic_ratio, a.n, lo, hi, w);
    const int64_t first_above = a.n - int64_t(st.above_one);  // sorted position of the first value > 1
    st.w = w;
    st.selecting = 0;
    if (hi < first_above) {
      st.s = 1.0f;  // the lerp of two values <= 1, clamped
    } else if (lo >= a.n - int64_t(st.at_max)) {
      st.s = p.sample_max_value;  // the lerp of two values >= sample_max_value, clamped
    } else {
      st.selecting = 1;
      st.need_lo = lo >= first_above;
      st.rank[0] = st.need_lo ? lo - first_above : 0;
      st.rank[1] = hi - first_above;
      st.prefix[0] = st.prefix[1] = 0u;
    }
  }
  __syncthreads();
  if (st.selecting) {  // uniform over the block
    for (int d = tid; d < 256; d += blockDim.x) h8[0][d] = h8[1][d] = unsigned(hist[b * kHistBins + d]);
    __syncthreads();
    settle_digits(h8, st, 24);  // the top 8 bits, from the first pass's histogram
    const float* v = vals + b * a.n;
    const int64_t count = int64_t(st.above_one);
    for (int shift = 32 - 8 - kWideBits; shift >= 0; shift -= kWideBits) {
      for (int i = tid; i < 2 * kWideBins; i += blockDim.x) h12[i / kWideBins][i % kWideBins] = 0u;
      __syncthreads();
      const unsigned int want0 = st.prefix[0] >> (shift + kWideBits),
                         want1 = st.prefix[1] >> (shift + kWideBits);
      // kLoads loads in flight per thread before their histogram updates: one block streams a
      // sample's compacted values, and one load at a time would wait on each.
      constexpr int kLoads = 8;
      for (int64_t j0 = tid; j0 < count; j0 += int64_t(kLoads) * blockDim.x) {
        unsigned int bits[kLoads];
#pragma unroll
        for (int u = 0; u < kLoads; ++u) {
          const int64_t j = j0 + int64_t(u) * blockDim.x;
          bits[u] = j < count ? float_bits(v[j]) : 0u;
        }
#pragma unroll
        for (int u = 0; u < kLoads; ++u) {
          if (j0 + int64_t(u) * blockDim.x >= count) break;
          const unsigned int digit = (bits[u] >> shift) & (kWideBins - 1);
          if ((bits[u] >> (shift + kWideBits)) == want0) atomicAdd(&h12[0][digit], 1u);
          if ((bits[u] >> (shift + kWideBits)) == want1) atomicAdd(&h12[1][digit], 1u);
        }
      }
      __syncthreads();
      settle_digits(h12, st, shift);
    }
    if (tid == 0) {
      const float v_lo = st.need_lo ? bits_float(st.prefix[0]) : bits_float(st.max_le_one_bits);
      st.s = clamp_threshold(torch_lerp(v_lo, bits_float(st.prefix[1]), st.w), p.sample_max_value);
    }
  }
  if (tid == 0) {
    sel[b].s = st.s;
    if (a.thresholds) a.thresholds[b] = st.s;
  }
}

__global__ void __launch_bounds__(kSelectThreads, 1)
    threshold_select_kernel(StepArraysCuda a, StepParams p0, Selection* sel, const unsigned long long* hist,
                            const float* vals) {
  select_threshold(a, params_of(a, p0), blockIdx.x, sel, hist, vals);
}

// ---------------------------------------------------------------- the fused step
template <class T, int PRED, bool GUIDED>
__global__ void fused_step_kernel(StepArraysCuda a, StepParams p0, const Selection* sel, bool aligned) {
  const StepParams p = params_of(a, p0);
  const int64_t total = a.batch * a.n;
  const int64_t groups = (total + 3) / 4;
  const bool has_noise = p.c_noise != 0.0f;
  const bool has_prev = a.x0_prev != nullptr;
  const bool clipped_eps = p.use_clipped_eps && p.threshold_mode != kNoThreshold;
  const bool small = total <= 0xFFFFFFFFll;
  unsigned int bad = 0;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e0 = 4 * g;
    const bool vec = aligned && e0 + 4 <= total;
    // Loads first, then the noise: the Philox rounds run while the loads are in flight. (Noise first
    // made every warp of a wave compute, then every warp wait on memory, the two phases adding up.)
    float x[4], c[4], u[4] = {0.0f, 0.0f, 0.0f, 0.0f}, prev[4], r[4], x0[4];
    load4<T>(a.x, e0, vec, total, x);
    load4<T>(a.cond, e0, vec, total, c);
    if (GUIDED) load4<T>(a.uncond, e0, vec, total, u);
    if (has_prev) load4<T>(a.x0_prev, e0, vec, total, prev);
    float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (has_noise) normal4(p.seed, p.noise_step, uint64_t(g), z);
    // The sample of the group's first element, then step across a sample boundary inside the group.
    int64_t b = small ? int64_t(uint32_t(e0) / uint32_t(a.n)) : e0 / a.n;
    int64_t next = (b + 1) * a.n;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (e0 + k >= next) {
        ++b;
        next += a.n;
      }
      const int64_t bb = b < a.batch ? b : a.batch - 1;  // padding lanes of the last group
      const float s = a.scales ? a.scales[bb] : a.scale;
      float limit, divisor;
      threshold_limits(p, sel ? sel[bb].s : 1.0f, limit, divisor);
      float m;
      r[k] = step_element<PRED, GUIDED>(p, x[k], c[k], u[k], s, limit, divisor, clipped_eps,
                                        has_prev ? prev[k] : x[k], z[k], x0[k], m);
      if (e0 + k < total) bad += !(fabsf(m) <= FLT_MAX) | !(fabsf(r[k]) <= FLT_MAX);
    }
    store4<T>(a.out, e0, vec, total, r);
    if (a.x0_out) store4<T>(a.x0_out, e0, vec, total, x0);
  }
  if (a.nonfinite) {
    for (int off = 16; off > 0; off >>= 1) bad += __shfl_down_sync(0xffffffffu, bad, off);
    if ((threadIdx.x & 31) == 0 && bad) atomicAdd(a.nonfinite, (unsigned long long)bad);
  }
}

// ---------------------------------------------------------------- the fused step, a step per row
// fused_step_rows: each row carries its own StepParams. They travel as a kernel argument, up to
// kRowsPerLaunch rows per launch (the 4 KB argument limit of every CUDA version), so nothing is copied
// to the device or synchronised, and a captured graph holds them. Grids are (blocks, rows of the chunk):
// a block's elements all belong to one row, so its params, its prediction-type branch and its noise
// stream are uniform over the block.
constexpr int kRowsPerLaunch = 32;

struct RowChunk {
  StepParams rows[kRowsPerLaunch];
  int64_t first;  // the batch index of rows[0]
  int32_t count;  // rows in this chunk
};

// Calls f(std::integral_constant<int, PRED>{}) for the row's prediction type (a device switch).
template <class F>
__device__ __forceinline__ void with_prediction(int32_t prediction_type, F&& f) {
  switch (prediction_type) {
    case kEpsilon:
      f(std::integral_constant<int, kEpsilon>{});
      break;
    case kSample:
      f(std::integral_constant<int, kSample>{});
      break;
    default:
      f(std::integral_constant<int, kVPrediction>{});
  }
}

template <class T, bool GUIDED>
__global__ void threshold_stats_rows_kernel(StepArraysCuda a, RowChunk c, Selection* sel,
                                            unsigned long long* hist, float* vals, bool vec) {
  const StepParams p = c.rows[blockIdx.y];
  if (p.threshold_mode != kDynamic) return;  // the whole block
  with_prediction(p.prediction_type, [&](auto pred) {
    threshold_stats<T, decltype(pred)::value, GUIDED>(a, p, c.first + blockIdx.y, sel, hist, vals, vec);
  });
}

__global__ void __launch_bounds__(kSelectThreads, 1)
    threshold_select_rows_kernel(StepArraysCuda a, RowChunk c, Selection* sel, const unsigned long long* hist,
                                 const float* vals) {
  const StepParams p = c.rows[blockIdx.x];
  if (p.threshold_mode != kDynamic) return;  // the whole block
  select_threshold(a, p, c.first + blockIdx.x, sel, hist, vals);
}

// Row b = c.first + blockIdx.y; its groups of four elements 4g .. 4g+3 within the sample, the Philox
// block g of its own stream (the CPU twin's numbering within the sample). vec: aligned arrays and
// n % 4 == 0, so that no group crosses a row.
template <class T, int PRED, bool GUIDED>
__device__ __forceinline__ unsigned int step_row(const StepArraysCuda& a, const StepParams& p, int64_t b,
                                                 const Selection* sel, bool vec) {
  const int64_t groups = (a.n + 3) / 4, begin = b * a.n, end = begin + a.n;
  const bool has_noise = p.c_noise != 0.0f;
  const bool has_prev = a.x0_prev != nullptr && p.c_d != 0.0f;  // a row without history reads x
  const bool clipped_eps = p.use_clipped_eps && p.threshold_mode != kNoThreshold;
  const float s = a.scales ? a.scales[b] : a.scale;
  float limit, divisor;
  threshold_limits(p, p.threshold_mode == kDynamic ? sel[b].s : 1.0f, limit, divisor);
  unsigned int bad = 0;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e0 = begin + 4 * g;
    float x[4], cv[4], u[4] = {0.0f, 0.0f, 0.0f, 0.0f}, prev[4] = {0.0f, 0.0f, 0.0f, 0.0f}, r[4], x0[4];
    load4<T>(a.x, e0, vec, end, x);
    load4<T>(a.cond, e0, vec, end, cv);
    if (GUIDED) load4<T>(a.uncond, e0, vec, end, u);
    if (has_prev) load4<T>(a.x0_prev, e0, vec, end, prev);
    float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (has_noise) normal4(p.seed, p.noise_step, uint64_t(g), z);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float m;
      r[k] = step_element<PRED, GUIDED>(p, x[k], cv[k], u[k], s, limit, divisor, clipped_eps,
                                        has_prev ? prev[k] : x[k], z[k], x0[k], m);
      if (e0 + k < end) bad += !(fabsf(m) <= FLT_MAX) | !(fabsf(r[k]) <= FLT_MAX);
    }
    store4<T>(a.out, e0, vec, end, r);
    if (a.x0_out) store4<T>(a.x0_out, e0, vec, end, x0);
  }
  return bad;
}

template <class T, bool GUIDED>
__global__ void fused_step_rows_kernel(StepArraysCuda a, RowChunk c, const Selection* sel, bool vec) {
  const StepParams p = c.rows[blockIdx.y];
  unsigned int bad = 0;
  with_prediction(p.prediction_type, [&](auto pred) {
    bad = step_row<T, decltype(pred)::value, GUIDED>(a, p, c.first + blockIdx.y, sel, vec);
  });
  if (a.nonfinite) {
    for (int off = 16; off > 0; off >>= 1) bad += __shfl_down_sync(0xffffffffu, bad, off);
    if ((threadIdx.x & 31) == 0 && bad) atomicAdd(a.nonfinite, (unsigned long long)bad);
  }
}

__global__ void advance_kernel(int32_t* counter) {
  *counter += 1;
}

bool aligned_for_vectors(const StepArraysCuda& a) {
  const uintptr_t mask = (a.storage == kFloat32 ? 16 : 8) - 1;
  auto ok = [&](const void* p) { return (reinterpret_cast<uintptr_t>(p) & mask) == 0; };
  return ok(a.x) && ok(a.cond) && ok(a.uncond) && ok(a.x0_prev) && ok(a.x0_out) && ok(a.out);
}

template <class T, int PRED, bool GUIDED>
int launch(const StepArraysCuda& a, const StepParams& p, cudaStream_t stream) {
  const int64_t total = a.batch * a.n;
  Selection* sel = nullptr;
  void* owned = nullptr;
  if (p.threshold_mode == kDynamic) {
    if (a.batch > 65535) return int(cudaErrorInvalidValue);  // grid.y is the sample
    const size_t need = fused_step_workspace_bytes(a.batch, a.n);
    void* ws = a.workspace;
    if (!ws || a.workspace_bytes < need) {
      // Stream-ordered: no synchronisation, and capturable in a CUDA graph.
      if (cudaError_t e = cudaMallocAsync(&owned, need, stream)) return int(e);
      ws = owned;
    }
    sel = static_cast<Selection*>(ws);
    auto* hist = reinterpret_cast<unsigned long long*>(static_cast<char*>(ws) + selection_bytes(a.batch));
    auto* vals = reinterpret_cast<float*>(static_cast<char*>(ws) + zeroed_bytes(a.batch));
    cudaMemsetAsync(ws, 0, zeroed_bytes(a.batch), stream);
    const int64_t per_block = int64_t(kThreads) * kStatsGroups;  // groups
    const dim3 stats_grid(unsigned(((a.n + 3) / 4 + per_block - 1) / per_block), unsigned(a.batch));
    PYDIFF_LAUNCH(stats_grid, kThreads, stream, threshold_stats_kernel<T, PRED, GUIDED>)(
        a, p, sel, hist, vals, aligned_for_vectors(a) && a.n % 4 == 0);
    PYDIFF_LAUNCH(unsigned(a.batch), kSelectThreads, stream, threshold_select_kernel)(a, p, sel, hist, vals);
  }
  PYDIFF_LAUNCH(blocks_for((total + 3) / 4), kThreads, stream, fused_step_kernel<T, PRED, GUIDED>)(
      a, p, sel, aligned_for_vectors(a));
  if (a.step_counter) PYDIFF_LAUNCH(1, 1, stream, advance_kernel)(a.step_counter);
  if (owned) cudaFreeAsync(owned, stream);
  return int(cudaGetLastError());
}

template <class T>
int dispatch_prediction(const StepArraysCuda& a, const StepParams& p, cudaStream_t stream) {
  const bool guided = a.uncond != nullptr;
  switch (p.prediction_type * 2 + int(guided)) {
    case kEpsilon * 2:
      return launch<T, kEpsilon, false>(a, p, stream);
    case kEpsilon * 2 + 1:
      return launch<T, kEpsilon, true>(a, p, stream);
    case kSample * 2:
      return launch<T, kSample, false>(a, p, stream);
    case kSample * 2 + 1:
      return launch<T, kSample, true>(a, p, stream);
    case kVPrediction * 2:
      return launch<T, kVPrediction, false>(a, p, stream);
    default:
      return launch<T, kVPrediction, true>(a, p, stream);
  }
}

template <class T, bool GUIDED>
int launch_rows(const StepArraysCuda& a, const StepParams* rows, cudaStream_t stream) {
  bool any_dynamic = false;
  for (int64_t b = 0; b < a.batch; ++b) any_dynamic = any_dynamic || rows[b].threshold_mode == kDynamic;
  Selection* sel = nullptr;
  unsigned long long* hist = nullptr;
  float* vals = nullptr;
  void* owned = nullptr;
  if (any_dynamic) {  // the workspace of fused_step's, for the whole batch; rows of other modes skip it
    const size_t need = fused_step_workspace_bytes(a.batch, a.n);
    void* ws = a.workspace;
    if (!ws || a.workspace_bytes < need) {
      if (cudaError_t e = cudaMallocAsync(&owned, need, stream)) return int(e);
      ws = owned;
    }
    sel = static_cast<Selection*>(ws);
    hist = reinterpret_cast<unsigned long long*>(static_cast<char*>(ws) + selection_bytes(a.batch));
    vals = reinterpret_cast<float*>(static_cast<char*>(ws) + zeroed_bytes(a.batch));
    cudaMemsetAsync(ws, 0, zeroed_bytes(a.batch), stream);
  }
  const bool vec = aligned_for_vectors(a) && a.n % 4 == 0;
  const int64_t groups = (a.n + 3) / 4;
  for (int64_t first = 0; first < a.batch; first += kRowsPerLaunch) {
    RowChunk c{};
    c.first = first;
    c.count = int32_t(a.batch - first < kRowsPerLaunch ? a.batch - first : kRowsPerLaunch);
    bool chunk_dynamic = false;
    for (int32_t r = 0; r < c.count; ++r) {
      c.rows[r] = rows[first + r];
      chunk_dynamic = chunk_dynamic || c.rows[r].threshold_mode == kDynamic;
    }
    if (chunk_dynamic) {
      const int64_t per_block = int64_t(kThreads) * kStatsGroups;  // groups
      const dim3 stats_grid(unsigned((groups + per_block - 1) / per_block), unsigned(c.count));
      PYDIFF_LAUNCH(stats_grid, kThreads, stream, threshold_stats_rows_kernel<T, GUIDED>)(a, c, sel, hist,
                                                                                          vals, vec);
      PYDIFF_LAUNCH(unsigned(c.count), kSelectThreads, stream, threshold_select_rows_kernel)(a, c, sel, hist,
                                                                                             vals);
    }
    // as many blocks in all as fused_step's grid would have for these rows
    const int64_t per_row = (blocks_for(groups * c.count) + c.count - 1) / c.count;
    const dim3 grid(unsigned(per_row), unsigned(c.count));
    PYDIFF_LAUNCH(grid, kThreads, stream, fused_step_rows_kernel<T, GUIDED>)(a, c, sel, vec);
  }
  if (owned) cudaFreeAsync(owned, stream);
  return int(cudaGetLastError());
}

template <class T>
int dispatch_rows(const StepArraysCuda& a, const StepParams* rows, cudaStream_t stream) {
  return a.uncond ? launch_rows<T, true>(a, rows, stream) : launch_rows<T, false>(a, rows, stream);
}

__global__ void randn_kernel(uint64_t seed, uint32_t step, int64_t offset, float* out, int64_t count) {
  // Thread per group of the stream; writes the part of its group that falls in [offset, offset + count).
  const int64_t g0 = offset >> 2, g1 = (offset + count + 3) >> 2;
  for (int64_t g = g0 + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < g1;
       g += int64_t(gridDim.x) * blockDim.x) {
    float z[4];
    normal4(seed, step, uint64_t(g), z);
    for (int k = 0; k < 4; ++k) {
      const int64_t e = 4 * g + k;
      if (e >= offset && e < offset + count) out[e - offset] = z[k];
    }
  }
}

__global__ void cfg_mix_kernel(const float* cond, const float* uncond, const float* scales, float scale,
                               float* out, int64_t batch, int64_t n) {
  const int64_t total = batch * n;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x)
    out[e] = cfg_mix(cond[e], uncond[e], scales ? scales[e / n] : scale);
}

}  // namespace

size_t fused_step_workspace_bytes(int64_t batch, int64_t n) {
  return zeroed_bytes(batch) + sizeof(float) * size_t(batch) * size_t(n);
}

int fused_step_cuda(const StepArraysCuda& a, const StepParams& p, cudaStream_t stream) {
  if (a.batch == 0 || a.n == 0) return 0;
  switch (a.storage) {
    case kFloat16:
      return dispatch_prediction<__half>(a, p, stream);
    case kBFloat16:
      return dispatch_prediction<__nv_bfloat16>(a, p, stream);
    default:
      return dispatch_prediction<float>(a, p, stream);
  }
}

int fused_step_rows_cuda(const StepArraysCuda& a, const StepParams* rows, cudaStream_t stream) {
  if (a.batch == 0 || a.n == 0) return 0;
  if (a.param_table || a.step_counter) return int(cudaErrorInvalidValue);  // the rows are the table
  switch (a.storage) {
    case kFloat16:
      return dispatch_rows<__half>(a, rows, stream);
    case kBFloat16:
      return dispatch_rows<__nv_bfloat16>(a, rows, stream);
    default:
      return dispatch_rows<float>(a, rows, stream);
  }
}

int randn_cuda(uint64_t seed, uint32_t step, int64_t offset, float* out, int64_t count, cudaStream_t stream) {
  if (count == 0) return 0;
  PYDIFF_LAUNCH(blocks_for((count + 7) / 4), kThreads, stream, randn_kernel)(seed, step, offset, out, count);
  return int(cudaGetLastError());
}

int cfg_mix_cuda(const float* cond, const float* uncond, const float* scales, float scale, float* out,
                 int64_t batch, int64_t n, cudaStream_t stream) {
  if (batch * n == 0) return 0;
  PYDIFF_LAUNCH(blocks_for(batch * n), kThreads, stream, cfg_mix_kernel)(cond, uncond, scales, scale, out,
                                                                         batch, n);
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

// CPU twin of the step kernels: indexing, blocking, threading. The formulas are in csrc/math.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "math/philox.h"
#include "math/step.h"
#include "ops/ops.h"

namespace pydiff {
namespace {

constexpr int64_t kChunk = 16384;  // elements per work item: big enough to amortise scheduling
constexpr int64_t kBlock = 256;    // elements per noise block (fits on the stack, in L1)
constexpr int64_t kSerialBelow = 32768;  // below this many elements threads cost more than they save

struct Item {
  int64_t sample, begin, end;
};

std::vector<Item> make_items(int64_t batch, int64_t n) {
  std::vector<Item> items;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < n; i += kChunk) items.push_back({b, i, std::min(n, i + kChunk)});
  return items;
}

int threads_for(int64_t total, int num_threads) {
  if (num_threads < 1) num_threads = default_num_threads();
  return total < kSerialBelow ? 1 : num_threads;
}

// Normals of stream (seed, step) for elements [begin, begin + count) into dst.
void fill_normals(uint64_t seed, uint32_t step, int64_t begin, int64_t count, float* dst) {
  const int64_t end = begin + count;
  int64_t g = begin >> 2;
  // Unaligned head and tail go through a scratch quad; the aligned middle is written directly.
  float quad[4];
  const int64_t head_end = std::min(end, (g + 1) << 2);
  if ((begin & 3) != 0) {
    normal4(seed, step, uint64_t(g), quad);
    for (int64_t e = begin; e < head_end; ++e) dst[e - begin] = quad[e & 3];
    ++g;
  }
  const int64_t g_full_end = end >> 2;
  for (; g < g_full_end; ++g) normal4(seed, step, uint64_t(g), dst + ((g << 2) - begin));
  if ((g << 2) < end && (g << 2) >= begin) {
    normal4(seed, step, uint64_t(g), quad);
    for (int64_t e = g << 2; e < end; ++e) dst[e - begin] = quad[e & 3];
  }
}

// Where x0 comes from: the fused step derives it from x and the network output(s).
struct ModelSource {
  const StepArrays& a;
  const StepParams& p;
  float scale(int64_t b) const { return a.scales ? a.scales[b] : a.scale; }
  void x0_eps(int64_t b, int64_t i, float s, float& x0, float& eps) const {
    const int64_t k = b * a.n + i;
    model_x0_eps(p, a.x[k], a.cond[k], a.uncond ? a.uncond + k : nullptr, s, x0, eps);
  }
};

struct AbsStats {
  int64_t above_one = 0;  // |x0| > 1
  int64_t at_max = 0;     // |x0| >= sample_max_value
  float max_le_one = 0.0f;
};

// Per-sample selection of the quantile of |x0|, exact, O(n): two counts settle most samples
// (the threshold is clamped to [1, max]); the rest select among the values above 1 only.
template <class AbsAt>
float select_threshold(const AbsAt& abs_at, int64_t n, const AbsStats& st, float q, float max_value,
                       bool clamp, std::vector<float>& scratch) {
  int64_t lo, hi;
  float w;
  quantile_rank(q, n, lo, hi, w);
  const int64_t first_above = n - st.above_one;  // sorted position of the first value > 1
  if (clamp) {
    if (hi < first_above) return 1.0f;                      // lerp of two values <= 1
    if (lo >= n - st.at_max) return max_value;              // lerp of two values >= max
  }
  // Candidates: the values above 1, or all values when not clamping.
  scratch.clear();
  const bool all = !clamp || lo < first_above - 1;
  const float floor_v = all ? -1.0f : 1.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = abs_at(i);
    if (v > floor_v || all) scratch.push_back(v);
  }
  const int64_t base = all ? 0 : first_above;
  float v_lo, v_hi;
  if (lo < base) {  // lo is the largest value <= 1, hi the smallest value > 1
    v_lo = st.max_le_one;
    v_hi = *std::min_element(scratch.begin(), scratch.end());
  } else {
    auto nth = scratch.begin() + (lo - base);
    std::nth_element(scratch.begin(), nth, scratch.end());
    v_lo = *nth;
    v_hi = hi == lo ? v_lo : *std::min_element(nth + 1, scratch.end());
  }
  const float s = torch_lerp(v_lo, v_hi, w);
  return clamp ? clamp_threshold(s, max_value) : s;
}

}  // namespace

int default_num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int64_t fused_step_cpu(const StepArrays& a, const StepParams& p, int num_threads) {
  const int64_t B = a.batch, n = a.n;
  if (B == 0 || n == 0) return 0;
  const std::vector<Item> items = make_items(B, n);
  const int64_t num_items = int64_t(items.size());
  const int nt = threads_for(B * n, num_threads);
  const ModelSource src{a, p};

  // Dynamic thresholding needs each sample's quantile before any element can be finished.
  std::vector<float> s_dyn(size_t(B), 1.0f);
  if (p.threshold_mode == kDynamic) {
    std::vector<AbsStats> stats(static_cast<size_t>(num_items));
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t it = 0; it < num_items; ++it) {
      const Item& item = items[size_t(it)];
      const float s = src.scale(item.sample);
      int64_t above = 0, at_max = 0;
      float mx = 0.0f;
      for (int64_t i = item.begin; i < item.end; ++i) {
        float x0, eps;
        src.x0_eps(item.sample, i, s, x0, eps);
        const float v = std::fabs(x0);
        above += v > 1.0f;
        at_max += v >= p.sample_max_value;
        mx = (v <= 1.0f && v > mx) ? v : mx;
      }
      stats[size_t(it)] = {above, at_max, mx};
    }
    std::vector<AbsStats> per_sample(static_cast<size_t>(B));
    for (int64_t it = 0; it < num_items; ++it) {
      AbsStats& t = per_sample[size_t(items[size_t(it)].sample)];
      const AbsStats& u = stats[size_t(it)];
      t.above_one += u.above_one;
      t.at_max += u.at_max;
      t.max_le_one = std::max(t.max_le_one, u.max_le_one);
    }
#pragma omp parallel num_threads(std::min<int64_t>(nt, B))
    {
      std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < B; ++b) {
        const float s = src.scale(b);
        auto abs_at = [&](int64_t i) {
          float x0, eps;
          src.x0_eps(b, i, s, x0, eps);
          return std::fabs(x0);
        };
        s_dyn[size_t(b)] = select_threshold(abs_at, n, per_sample[size_t(b)], p.dynamic_ratio,
                                            p.sample_max_value, true, scratch);
      }
    }
    if (a.thresholds)
      for (int64_t b = 0; b < B; ++b) a.thresholds[b] = s_dyn[size_t(b)];
  }

  int64_t nonfinite = 0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : nonfinite)
  for (int64_t it = 0; it < num_items; ++it) {
    const Item& item = items[size_t(it)];
    const int64_t b = item.sample;
    const float s = src.scale(b);
    const float sd = s_dyn[size_t(b)];
    float z[kBlock];
    for (int64_t blk = item.begin; blk < item.end; blk += kBlock) {
      const int64_t len = std::min(kBlock, item.end - blk);
      const int64_t k0 = b * n + blk;
      if (p.c_noise != 0.0f) fill_normals(p.seed, p.noise_step, k0, len, z);
      int64_t bad = 0;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t k = k0 + j;
        float x0, eps;
        src.x0_eps(b, blk + j, s, x0, eps);
        threshold_x0(p, a.x[k], sd, x0, eps);
        const float prev = a.x0_prev ? a.x0_prev[k] : 0.0f;
        const float r = linear_update(p, a.x[k], x0, eps, prev, p.c_noise != 0.0f ? z[j] : 0.0f);
        a.out[k] = r;
        if (a.x0_out) a.x0_out[k] = x0;
        // A non-finite network output can vanish behind a clamp, so it is counted on its own.
        const bool finite_in = std::fabs(a.cond[k]) <= FLT_MAX &&
                               (!a.uncond || std::fabs(a.uncond[k]) <= FLT_MAX);
        bad += !(finite_in && std::fabs(r) <= FLT_MAX);
      }
      nonfinite += bad;
    }
  }
  return nonfinite;
}

void cfg_mix_cpu(const float* cond, const float* uncond, const float* scales, float scale,
                 float* out, int64_t batch, int64_t n, int num_threads) {
  const int nt = threads_for(batch * n, num_threads);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    const float s = scales ? scales[b] : scale;
    for (int64_t i = b * n; i < (b + 1) * n; ++i) out[i] = cfg_mix(cond[i], uncond[i], s);
  }
}

void abs_quantile_cpu(const float* x, float q, float max_value, bool clamp, float* s, int64_t batch,
                      int64_t n, int num_threads) {
  if (n == 0) return;
  const int nt = threads_for(batch * n, num_threads);
#pragma omp parallel num_threads(std::min<int64_t>(nt, std::max<int64_t>(batch, 1)))
  {
    std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * n;
      AbsStats st;
      for (int64_t i = 0; i < n; ++i) {
        const float v = std::fabs(xb[i]);
        st.above_one += v > 1.0f;
        st.at_max += v >= max_value;
        st.max_le_one = (v <= 1.0f && v > st.max_le_one) ? v : st.max_le_one;
      }
      auto abs_at = [xb](int64_t i) { return std::fabs(xb[i]); };
      s[b] = select_threshold(abs_at, n, st, q, max_value, clamp, scratch);
    }
  }
}

void randn_cpu(uint64_t seed, uint32_t step, int64_t offset, float* out, int64_t count,
               int num_threads) {
  const int nt = threads_for(count, num_threads);
  const int64_t chunks = (count + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * kChunk;
    fill_normals(seed, step, offset + begin, std::min(kChunk, count - begin), out + begin);
  }
}

}  // namespace pydiff

// CPU twin of the step kernels: indexing, blocking, threading. The formulas are in csrc/math.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <exception>
#include <memory>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "math/philox.h"
#include "math/step.h"
#include "ops/noise_cpu.h"
#include "ops/ops.h"
#include "ops/select_cpu.h"

namespace pydiff {
namespace {

constexpr int64_t kChunk = 16384;        // elements per work item: big enough to amortise scheduling
constexpr int64_t kBlock = 512;          // elements per block of noise (on the stack, in L1)
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
  float quad[4];
  if ((begin & 3) != 0) {  // unaligned head
    normal4(seed, step, uint64_t(g), quad);
    for (int64_t e = begin; e < std::min(end, (g + 1) << 2); ++e) dst[e - begin] = quad[e & 3];
    ++g;
  }
  const int64_t g_full_end = end >> 2;
  if (g < g_full_end) normal_groups(seed, step, uint64_t(g), g_full_end - g, dst + ((g << 2) - begin));
  g = std::max(g, g_full_end);
  if ((g << 2) < end) {  // unaligned tail
    normal4(seed, step, uint64_t(g), quad);
    for (int64_t e = g << 2; e < end; ++e) dst[e - begin] = quad[e & 3];
  }
}

// The statistics of |x0| that settle most dynamic thresholds, and what a selection needs otherwise.
// The values > 1 split in two: "mid", 1 < v < sample_max_value, the only ones a selection can
// return (they are written out for it), and "top", v >= sample_max_value, of which only the smallest
// can matter (as the upper end of a lerp). NaN is in neither and counts with the values <= 1.
// Minima and maxima over the bits: non-negative floats order as their bits.
struct AbsStats {
  int64_t above_one = 0;         // |x0| > 1
  int64_t at_max = 0;            // |x0| >= sample_max_value
  int64_t mid = 0;               // 1 < |x0| < sample_max_value
  uint32_t max_le_one = 0;       // bits of the largest |x0| <= 1 (+0 when none)
  uint32_t min_above_one = ~0u;  // bits of the smallest |x0| > 1
  uint32_t min_top = ~0u;        // bits of the smallest |x0| > 1 and >= sample_max_value
  void merge(const AbsStats& o) {
    above_one += o.above_one;
    at_max += o.at_max;
    mid += o.mid;
    max_le_one = std::max(max_le_one, o.max_le_one);
    min_above_one = std::min(min_above_one, o.min_above_one);
    min_top = std::min(min_top, o.min_top);
  }
};

// Adds the values value(0) .. value(m - 1) (|x0|) to st, storing them in vals (a block in L1); with
// mid_out, appends their mid values at mid_out + st.mid (room for m + 16 more). One loop with 32-bit
// counters, so that it vectorises with the computation of the values.
template <class Value>
[[gnu::always_inline]] inline void add_abs_stats(const Value& value, float* vals, int64_t m, float smax,
                                                 AbsStats& st, float* mid_out) {
  int32_t a = 0, at = 0;
  uint32_t mx = st.max_le_one, mn = st.min_above_one, mt = st.min_top;
  for (int64_t j = 0; j < m; ++j) {
    const float v = value(j);
    vals[j] = v;
    const uint32_t b = float_bits(v);
    const uint32_t above = 0u - uint32_t(v > 1.0f), ge = 0u - uint32_t(v >= smax);
    a -= int32_t(above);
    at -= int32_t(ge);
    mx = std::max(mx, b & (0u - uint32_t(v <= 1.0f)));
    mn = std::min(mn, b | ~above);
    mt = std::min(mt, b | ~(above & ge));
  }
  st.above_one += a;
  st.at_max += at;
  st.max_le_one = mx;
  st.min_above_one = mn;
  st.min_top = mt;
  if (mid_out) st.mid += compact_between(vals, m, 1.0f, smax, mid_out + st.mid);
}

// Scratch space of one thread's selections, reused across samples.
struct SelectScratch {
  std::vector<float> values, bucket;
  std::vector<uint32_t> hist;
};

// The k-th smallest of v[0, count) and, when want_next, the (k+1)-th; every value is a non-negative
// float whose bits lie in [lo_bits, hi_bits]. A radix pass: a histogram of the top bits of
// (bits - lo_bits), as many buckets as about a quarter of the values (64 to 2048), finds the bucket
// that holds rank k; nth_element runs on it alone. Buckets order as their values.
void select_kth(const float* v, int64_t count, int64_t k, bool want_next, float& vk, float& vk1,
                SelectScratch& sc, uint32_t lo_bits, uint32_t hi_bits) {
  if (count <= 64) {
    sc.bucket.assign(v, v + count);
    auto nth = sc.bucket.begin() + k;
    std::nth_element(sc.bucket.begin(), nth, sc.bucket.end());
    vk = *nth;
    vk1 = want_next ? *std::min_element(nth + 1, sc.bucket.end()) : vk;
    return;
  }
  int bucket_bits = 6;
  while (bucket_bits < 11 && (int64_t(4) << bucket_bits) < count) ++bucket_bits;
  const int64_t buckets = int64_t(1) << bucket_bits;
  int shift = 0;
  while (((hi_bits - lo_bits) >> shift) >= uint32_t(buckets)) ++shift;
  auto key = [&](float f) { return (float_bits(f) - lo_bits) >> shift; };
  // Four interleaved histograms when there are many values: consecutive values often share a
  // bucket, and a single histogram would serialise on that counter.
  const int lanes = count > 8 * buckets ? 4 : 1;
  sc.hist.assign(size_t(lanes * buckets), 0u);
  uint32_t* hist = sc.hist.data();
  if (lanes == 4) {
    for (int64_t i = 0; i < count; ++i) ++hist[(i & 3) * buckets + key(v[i])];
    for (int64_t i = 0; i < buckets; ++i)
      hist[i] += hist[buckets + i] + hist[2 * buckets + i] + hist[3 * buckets + i];
  } else {
    for (int64_t i = 0; i < count; ++i) ++hist[key(v[i])];
  }
  int64_t b = 0, before = 0;
  while (before + int64_t(hist[b]) <= k) before += hist[b++];
  const uint32_t want = uint32_t(b);
  sc.bucket.resize(size_t(hist[b]) + 1);  // a spare slot: the branch-free gather writes before it counts
  float* bucket = sc.bucket.data();
  int64_t m = 0;
  for (int64_t i = 0; i < count; ++i) {
    bucket[m] = v[i];
    m += key(v[i]) == want;
  }
  sc.bucket.resize(size_t(hist[b]));
  const int64_t kin = k - before;
  auto nth = sc.bucket.begin() + kin;
  std::nth_element(sc.bucket.begin(), nth, sc.bucket.end());
  vk = *nth;
  if (!want_next) {
    vk1 = vk;
  } else if (kin + 1 < int64_t(sc.bucket.size())) {
    vk1 = *std::min_element(nth + 1, sc.bucket.end());
  } else {  // the (k+1)-th opens the next non-empty bucket
    int64_t b2 = b + 1;
    while (hist[b2] == 0) ++b2;
    float mn = bits_float(0x7f800000u);
    for (int64_t i = 0; i < count; ++i)
      if (key(v[i]) == uint32_t(b2)) mn = std::min(mn, v[i]);
    vk1 = mn;
  }
}

// The per-sample threshold of Imagen's dynamic thresholding, exactly torch.quantile's value, in
// O(n) and without a sort: the counts settle most samples (the quantile is clamped to
// [1, max_value]); only otherwise does gather_mid(dst) write the sample's mid values (room for
// st.mid + 16), for a selection among them alone.
template <class GatherMid>
float threshold_from_stats(int64_t n, const AbsStats& st, const GatherMid& gather_mid, float q,
                           float max_value, SelectScratch& sc) {
  int64_t lo, hi;
  float w;
  quantile_rank(q, n, lo, hi, w);
  const int64_t first_above = n - st.above_one;  // sorted position of the first value > 1
  if (hi < first_above) return 1.0f;             // the lerp of two values <= 1
  if (lo >= n - st.at_max) return max_value;     // the lerp of two values >= max_value
  float v_lo, v_hi;
  if (lo < first_above) {  // lo is the largest value <= 1, hi the smallest value > 1
    v_lo = bits_float(st.max_le_one);
    v_hi = bits_float(st.min_above_one);
  } else {
    const int64_t r = lo - first_above;  // rank among the values > 1: the mid values, then the top
    if (r >= st.mid) return max_value;   // both among the top (only when max_value < 1)
    sc.values.resize(size_t(st.mid) + 16);
    gather_mid(sc.values.data());
    const bool next_in_mid = hi != lo && r + 1 < st.mid;
    select_kth(sc.values.data(), st.mid, r, next_in_mid, v_lo, v_hi, sc, st.min_above_one,
               float_bits(max_value));
    if (hi != lo && !next_in_mid) v_hi = bits_float(st.min_top);  // hi opens the top
  }
  return clamp_threshold(torch_lerp(v_lo, v_hi, w), max_value);
}

// The unclamped quantile of all n values (pydiff.ops.abs_quantile).
float quantile_of(const float* v, int64_t n, float q, SelectScratch& sc) {
  int64_t lo, hi;
  float w;
  quantile_rank(q, n, lo, hi, w);
  float v_lo, v_hi;
  select_kth(v, n, lo, hi != lo, v_lo, v_hi, sc, 0u, 0x7f800000u);
  return torch_lerp(v_lo, v_hi, w);
}

// The element loop of the fused step over one block. Coefficients in a local and no pointer into
// them, so the compiler keeps them in registers and vectorises the loop. Inlined into its caller: as
// a call of its own (GCC 12, from the dispatching lambda of fused_step_impl) the scalar fallback of
// the vectorised loop ran, 4-8x slower at (16, 3, 64, 64). z is the caller's own noise buffer, which
// nothing else aliases: without __restrict the loop has more pointer pairs than GCC will check at run
// time (vect-max-version-for-alias-checks, 10) once z's address escapes to the noise loops, and only
// the scalar loop is built.
template <int PRED, bool GUIDED, bool PLAIN>
[[gnu::always_inline]] inline int64_t step_block(const StepParams& params, const float* x, const float* c,
                                                 const float* u, const float s, const float limit,
                                                 const float divisor, const bool clipped_eps,
                                                 const float* prev, const float* __restrict z, float* x0o,
                                                 float* out, const int64_t len) {
  StepParams p{};
  p.alpha = params.alpha;
  p.sigma = params.sigma;
  p.c_x = params.c_x;
  p.c_x0 = params.c_x0;
  p.c_eps = params.c_eps;
  p.c_d = params.c_d;
  p.c_noise = params.c_noise;
  int32_t bad = 0;  // 32-bit like the floats, so that the counter vectorises with them
  for (int64_t j = 0; j < len; ++j) {
    float x0, m;
    const float r = PLAIN ? step_element_plain<PRED, GUIDED>(p, x[j], c[j], u[j], s, x0, m)
                          : step_element<PRED, GUIDED>(p, x[j], c[j], u[j], s, limit, divisor, clipped_eps,
                                                       prev[j], z[j], x0, m);
    // m is non-finite exactly when a network output is; it can vanish behind a clamp, so it is counted.
    bad += int32_t(!(std::fabs(m) <= FLT_MAX)) | int32_t(!(std::fabs(r) <= FLT_MAX));
    out[j] = r;
    x0o[j] = x0;
  }
  return bad;
}

// step_block for a deep multistep step (StepParams' c_d2, c_d3, history_output): h1..h3 the last steps'
// history values, ho this step's.
template <int PRED, bool GUIDED>
[[gnu::always_inline]] inline int64_t step_block_deep(
    const StepParams& params, const float* x, const float* c, const float* u, const float s,
    const float limit, const float divisor, const bool clipped_eps, const float* h1, const float* h2,
    const float* h3, const float* __restrict z, float* ho, float* out, const int64_t len) {
  StepParams p{};
  p.alpha = params.alpha;
  p.sigma = params.sigma;
  p.c_x = params.c_x;
  p.c_x0 = params.c_x0;
  p.c_eps = params.c_eps;
  p.c_d = params.c_d;
  p.c_d2 = params.c_d2;
  p.c_d3 = params.c_d3;
  p.c_noise = params.c_noise;
  p.history_output = params.history_output;
  int32_t bad = 0;
  for (int64_t j = 0; j < len; ++j) {
    float h, m;
    const float r = step_element_deep<PRED, GUIDED>(p, x[j], c[j], u[j], s, limit, divisor, clipped_eps,
                                                    h1[j], h2[j], h3[j], z[j], h, m);
    bad += int32_t(!(std::fabs(m) <= FLT_MAX)) | int32_t(!(std::fabs(r) <= FLT_MAX));
    out[j] = r;
    ho[j] = h;
  }
  return bad;
}

// The statistics of |x0| over one chunk (add_abs_stats), computed block by block in L1 from the
// step's inputs; with mid_out, the chunk's mid values are written there (room for len + 16).
template <int PRED, bool GUIDED>
void abs_stats_block(const StepParams& params, const float* x, const float* c, const float* u, const float s,
                     const int64_t len, AbsStats& st, float* mid_out) {
  StepParams p{};
  p.alpha = params.alpha;
  p.sigma = params.sigma;
  const float smax = params.sample_max_value;
  float vals[kBlock];
  for (int64_t blk = 0; blk < len; blk += kBlock) {
    const int64_t m = std::min(kBlock, len - blk);
    const float *xb = x + blk, *cb = c + blk, *ub = u + blk;
    add_abs_stats([&](int64_t j) { return std::fabs(raw_x0<PRED, GUIDED>(p, xb[j], cb[j], ub[j], s)); }, vals,
                  m, smax, st, mid_out);
  }
}

// Calls f(Pred<PRED>{}, Guided<GUIDED>{}) for a prediction type and guidance known at run time:
// the element loops' template choice, made once per work item (a row's own in fused_step_rows).
template <int P>
using Pred = std::integral_constant<int, P>;
template <bool G>
using Guided = std::integral_constant<bool, G>;

template <class F>
decltype(auto) with_kernel(int32_t prediction_type, bool guided, F&& f) {
  switch (prediction_type * 2 + int(guided)) {
    case kEpsilon * 2:
      return f(Pred<kEpsilon>{}, Guided<false>{});
    case kEpsilon * 2 + 1:
      return f(Pred<kEpsilon>{}, Guided<true>{});
    case kSample * 2:
      return f(Pred<kSample>{}, Guided<false>{});
    case kSample * 2 + 1:
      return f(Pred<kSample>{}, Guided<true>{});
    case kVPrediction * 2:
      return f(Pred<kVPrediction>{}, Guided<false>{});
    default:
      return f(Pred<kVPrediction>{}, Guided<true>{});
  }
}

// How the samples of a call map to step params and noise. fused_step: one StepParams for the batch,
// its noise numbered over the whole batch (element b * n + i), x0_prev read whenever given.
struct OneStep {
  const StepParams& p;
  const StepParams& of(int64_t) const { return p; }
  int64_t noise_offset(int64_t b, int64_t n) const { return b * n; }
  bool reads_prev(const StepParams&) const { return true; }
  bool any_dynamic(int64_t) const { return p.threshold_mode == kDynamic; }
};

// fused_step_rows: row b has its own StepParams and its own noise stream (seed, noise_step) numbered
// within the sample (element i), so nothing of a row depends on its position or its neighbours. A row
// whose c_d is 0 reads x where x0_prev would be (as fused_step without x0_prev does): a row with no
// history may hold anything in x0_prev.
struct PerRow {
  const StepParams* rows;
  const StepParams& of(int64_t b) const { return rows[b]; }
  int64_t noise_offset(int64_t, int64_t) const { return 0; }
  bool reads_prev(const StepParams& p) const { return p.c_d != 0.0f; }
  bool any_dynamic(int64_t batch) const {
    for (int64_t b = 0; b < batch; ++b)
      if (rows[b].threshold_mode == kDynamic) return true;
    return false;
  }
};

template <class Rows>
int64_t fused_step_impl(const StepArrays& a, const Rows& rows, int num_threads) {
  const int64_t B = a.batch, n = a.n;
  const bool guided = a.uncond != nullptr;
  const std::vector<Item> items = make_items(B, n);
  const int64_t num_items = int64_t(items.size());
  const int nt = threads_for(B * n, num_threads);
  const float* uncond = guided ? a.uncond : a.cond;  // read only when guided
  auto scale_of = [&](int64_t b) { return a.scales ? a.scales[b] : a.scale; };

  // Dynamic thresholding needs each sample's quantile of |x0| before any element can be finished:
  // one pass computes x0 and its statistics and writes out the few values a selection can return
  // (those in (1, sample_max_value)); a selection among them runs only for the samples that the
  // counts do not settle. Each work item writes into its own stretch of `mids`.
  std::vector<float> s_dyn(static_cast<size_t>(B), 1.0f);
  if (rows.any_dynamic(B)) {
    constexpr int64_t kMidStride = kChunk + 16;
    std::unique_ptr<float[]> mids(new float[size_t(num_items * kMidStride)]);
    std::vector<AbsStats> stats(static_cast<size_t>(num_items));
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t it = 0; it < num_items; ++it) {
      const Item& item = items[size_t(it)];
      const StepParams& p = rows.of(item.sample);
      if (p.threshold_mode != kDynamic) continue;
      const int64_t off = item.sample * n + item.begin;
      with_kernel(p.prediction_type, guided, [&](auto pred, auto g) {
        abs_stats_block<decltype(pred)::value, decltype(g)::value>(
            p, a.x + off, a.cond + off, uncond + off, scale_of(item.sample), item.end - item.begin,
            stats[size_t(it)], mids.get() + it * kMidStride);
      });
    }
    const int64_t items_per_sample = (n + kChunk - 1) / kChunk;  // make_items: a sample's items in a row
    std::vector<AbsStats> per_sample(static_cast<size_t>(B));
    for (int64_t it = 0; it < num_items; ++it)
      per_sample[size_t(items[size_t(it)].sample)].merge(stats[size_t(it)]);
    // an exception may not leave an OpenMP region (std::terminate): keep the first, rethrow after
    std::exception_ptr failure;
#pragma omp parallel num_threads(int(std::min<int64_t>(nt, B)))
    {
      SelectScratch scratch;
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < B; ++b) try {
          const StepParams& p = rows.of(b);
          if (p.threshold_mode != kDynamic) continue;
          auto gather_mid = [&](float* dst) {  // the mid values of the sample's items, one after another
            for (int64_t it = b * items_per_sample; it < (b + 1) * items_per_sample; ++it) {
              const int64_t m = stats[size_t(it)].mid;
              std::memcpy(dst, mids.get() + it * kMidStride, size_t(m) * sizeof(float));
              dst += m;
            }
          };
          s_dyn[size_t(b)] = threshold_from_stats(n, per_sample[size_t(b)], gather_mid, p.dynamic_ratio,
                                                  p.sample_max_value, scratch);
        } catch (...) {
#pragma omp critical(pydiff_failure)
          if (!failure) failure = std::current_exception();
        }
    }
    if (failure) std::rethrow_exception(failure);
    if (a.thresholds)
      for (int64_t b = 0; b < B; ++b)
        if (rows.of(b).threshold_mode == kDynamic) a.thresholds[b] = s_dyn[size_t(b)];
  }

  int64_t nonfinite = 0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : nonfinite)
  for (int64_t it = 0; it < num_items; ++it) {
    const Item& item = items[size_t(it)];
    const int64_t b = item.sample;
    const StepParams& p = rows.of(b);
    const bool has_noise = p.c_noise != 0.0f;
    const bool has_prev = a.x0_prev != nullptr && rows.reads_prev(p);
    const bool clipped_eps = p.use_clipped_eps && p.threshold_mode != kNoThreshold;
    const bool deep = p.c_d2 != 0.0f || p.c_d3 != 0.0f || p.history_output != 0;
    const bool plain = p.threshold_mode == kNoThreshold && !has_noise && p.c_d == 0.0f && !deep;
    const int64_t noise0 = rows.noise_offset(b, n) - b * n;  // noise element of array element k: k + noise0
    const float s = scale_of(b);
    float limit, divisor;
    threshold_limits(p, s_dyn[size_t(b)], limit, divisor);
    float z[kBlock];
    float x0_scratch[kBlock];
    if (!has_noise) std::fill(z, z + kBlock, 0.0f);
    nonfinite += with_kernel(p.prediction_type, guided, [&](auto pred, auto g) {
      constexpr int PRED = decltype(pred)::value;
      constexpr bool GUIDED = decltype(g)::value;
      int64_t bad = 0;
      for (int64_t blk = item.begin; blk < item.end; blk += kBlock) {
        const int64_t len = std::min(kBlock, item.end - blk);
        const int64_t k0 = b * n + blk;
        if (has_noise) fill_normals(p.seed, p.noise_step, k0 + noise0, len, z);
        const float* prev = has_prev ? a.x0_prev + k0 : a.x + k0;  // any finite values when c_d == 0
        float* x0o = a.x0_out ? a.x0_out + k0 : x0_scratch;
        if (deep) {
          const float* prev2 = a.x0_prev2 ? a.x0_prev2 + k0 : a.x + k0;
          const float* prev3 = a.x0_prev3 ? a.x0_prev3 + k0 : a.x + k0;
          bad += step_block_deep<PRED, GUIDED>(p, a.x + k0, a.cond + k0, uncond + k0, s, limit, divisor,
                                               clipped_eps, prev, prev2, prev3, z, x0o, a.out + k0, len);
          continue;
        }
        bad += plain ? step_block<PRED, GUIDED, true>(p, a.x + k0, a.cond + k0, uncond + k0, s, limit,
                                                      divisor, clipped_eps, prev, z, x0o, a.out + k0, len)
                     : step_block<PRED, GUIDED, false>(p, a.x + k0, a.cond + k0, uncond + k0, s, limit,
                                                       divisor, clipped_eps, prev, z, x0o, a.out + k0, len);
      }
      return bad;
    });
  }
  return nonfinite;
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
  if (a.batch == 0 || a.n == 0) return 0;
  return fused_step_impl(a, OneStep{p}, num_threads);
}

int64_t fused_step_rows_cpu(const StepArrays& a, const StepParams* rows, int num_threads) {
  if (a.batch == 0 || a.n == 0) return 0;
  return fused_step_impl(a, PerRow{rows}, num_threads);
}

void cfg_mix_cpu(const float* cond, const float* uncond, const float* scales, float scale, float* out,
                 int64_t batch, int64_t n, int num_threads) {
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
  std::exception_ptr failure;  // as in fused_step_cpu: rethrown after the region
#pragma omp parallel num_threads(int(std::min<int64_t>(nt, std::max<int64_t>(batch, 1))))
  {
    SelectScratch scratch;
    std::vector<float> mid;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b) try {
        const float* xb = x + b * n;
        AbsStats st;
        int64_t nans = 0;
        if (clamp) mid.resize(size_t(n) + 16);
        float vals[kBlock];
        for (int64_t blk = 0; blk < n; blk += kBlock) {
          const int64_t m = std::min(kBlock, n - blk);
          int32_t nan_count = 0;
          for (int64_t j = 0; j < m; ++j) nan_count += int32_t(xb[blk + j] != xb[blk + j]);
          nans += nan_count;
          const float* v = xb + blk;
          if (clamp)
            add_abs_stats([&](int64_t j) { return std::fabs(v[j]); }, vals, m, max_value, st, mid.data());
        }
        // torch.quantile gives NaN for a row with a NaN; so do we.
        auto gather_mid = [&](float* dst) { std::memcpy(dst, mid.data(), size_t(st.mid) * sizeof(float)); };
        if (nans) {
          s[b] = bits_float(0x7fc00000u);
        } else if (clamp) {
          s[b] = threshold_from_stats(n, st, gather_mid, q, max_value, scratch);
        } else {
          std::vector<float>& all = scratch.values;
          all.resize(size_t(n));
          for (int64_t i = 0; i < n; ++i) all[size_t(i)] = std::fabs(xb[i]);
          s[b] = quantile_of(all.data(), n, q, scratch);
        }
      } catch (...) {
#pragma omp critical(pydiff_failure)
        if (!failure) failure = std::current_exception();
      }
  }
  if (failure) std::rethrow_exception(failure);
}

void randn_cpu(uint64_t seed, uint32_t step, int64_t offset, float* out, int64_t count, int num_threads) {
  const int nt = threads_for(count, num_threads);
  const int64_t chunks = (count + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * kChunk;
    fill_normals(seed, step, offset + begin, std::min(kChunk, count - begin), out + begin);
  }
}

}  // namespace pydiff

// The CUDA twin's kernels (csrc/ops/step_cuda.cu, this very source) run on the CPU emulator of
// csrc/tests/cuda_emu and compared with the CPU twin bit for bit: the fused step in every mode
// (prediction types, guidance with scalar and per-sample scales, no / static / dynamic thresholding,
// the update terms, noise, x0 history, float32 / float16 / bfloat16 storage, aligned and unaligned
// arrays, the step table and counter, caller and own workspace), the noise stream, the CFG mix, and
// fused_step_rows (a step per row: mixed modes in one call, chunks of rows, each row = the row alone).
// The dynamic threshold's device selection (counts, compaction, the block-per-sample radix select) must give
// exactly the CPU twin's quantile. What the emulator cannot show, a GPU's speed and races, is
// tests/gpu's.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "ops/ops.h"
#include "ops/step_cuda.cu"
#include "tests/check.h"

using namespace pydiff;

// Storage round trips: the values a device array of that type holds.
static uint16_t to_storage_bits(float v, int storage) {
  if (storage == kFloat16) {
    const __half h = __float2half_rn(v);
    uint16_t b;
    std::memcpy(&b, &h, 2);
    return b;
  }
  const __nv_bfloat16 h = __float2bfloat16_rn(v);
  return h.bits;
}
static float from_storage_bits(uint16_t b, int storage) {
  if (storage == kFloat16) {
    __half h;
    std::memcpy(&h, &b, 2);
    return __half2float(h);
  }
  return __bfloat162float(__nv_bfloat16{b});
}

// A device array of `storage` holding `v` (rounded to the storage type; `v` is updated to what it
// holds), at an element offset of 1 when `unaligned` (no vector loads then).
struct DeviceArray {
  std::vector<float> f32;
  std::vector<uint16_t> f16;
  int storage = kFloat32;
  bool unaligned = false;
  void* ptr() {
    return storage == kFloat32 ? static_cast<void*>(f32.data() + unaligned)
                               : static_cast<void*>(f16.data() + unaligned);
  }
  static DeviceArray make(std::vector<float>& v, int storage, bool unaligned) {
    DeviceArray d;
    d.storage = storage;
    d.unaligned = unaligned;
    if (storage == kFloat32) {
      d.f32.assign(v.size() + 1, std::nanf(""));  // the spare element is the guard
      std::copy(v.begin(), v.end(), d.f32.begin() + unaligned);
    } else {
      d.f16.assign(v.size() + 1, to_storage_bits(std::nanf(""), storage));
      for (size_t i = 0; i < v.size(); ++i) {
        d.f16[i + unaligned] = to_storage_bits(v[i], storage);
        v[i] = from_storage_bits(d.f16[i + unaligned], storage);
      }
    }
    return d;
  }
  static DeviceArray empty(size_t n, int storage, bool unaligned) {
    std::vector<float> v(n, std::nanf(""));
    return make(v, storage, unaligned);
  }
  float at(size_t i) const {
    return storage == kFloat32 ? f32[i + unaligned] : from_storage_bits(f16[i + unaligned], storage);
  }
  // The one element outside the array (before it when unaligned, else after it): never written.
  float guard() const {
    const size_t g = unaligned ? 0 : (storage == kFloat32 ? f32.size() : f16.size()) - 1;
    return storage == kFloat32 ? f32[g] : from_storage_bits(f16[g], storage);
  }
};

// Compares a device result with the CPU twin's, rounded to the storage type: bit for bit.
static int mismatches(const DeviceArray& got, const std::vector<float>& want, int storage, size_t& first) {
  int bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const float w =
        storage == kFloat32 ? want[i] : from_storage_bits(to_storage_bits(want[i], storage), storage);
    const float g = got.at(i);
    const bool same = float_bits(g) == float_bits(w) || (std::isnan(g) && std::isnan(w));
    if (!same && bad++ == 0) first = i;
  }
  return bad;
}

struct Case {
  int64_t batch, n;
  int pred, mode, storage;
  bool guided, per_sample_scales, with_prev, with_x0_out, with_noise, clipped_eps, unaligned, table,
      own_workspace, inject_nan;
  float x0_scale;          // spread of the raw x0: below, around or above the dynamic threshold's range
  float max_value = 1.5f;  // sample_max_value
};

static int dynamic_selected = 0, dynamic_cases = 0;

static void run_case(const Case& c, std::mt19937& gen) {
  const int64_t total = c.batch * c.n;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> ud(0.05f, 0.95f);
  StepParams p{};
  const float ab = ud(gen);
  p.alpha = std::sqrt(ab);
  p.sigma = std::sqrt(1.0f - ab);
  p.prediction_type = c.pred;
  p.threshold_mode = c.mode;
  p.clip_range = 1.0f;
  p.dynamic_ratio = 0.995f;
  p.sample_max_value = c.max_value;
  p.use_clipped_eps = c.clipped_eps;
  p.c_x = ud(gen);
  p.c_x0 = ud(gen);
  p.c_eps = ud(gen) - 0.5f;
  p.c_d = c.with_prev ? ud(gen) - 0.5f : 0.0f;
  p.c_noise = c.with_noise ? ud(gen) : 0.0f;
  p.seed = (uint64_t(gen()) << 32) | gen();
  p.noise_step = gen() % 1000;
  // x0 ~ x0_scale * N(0, 1) whatever the prediction type: x = alpha x0 + sigma eps, and the output
  // the prediction of that x0 (guided: the halves straddle it).
  std::vector<float> x(total), cond(total), uncond(total), prev(total), scales(c.batch);
  for (auto& s : scales) s = 1.0f + 4.0f * ud(gen);
  const float scale = 1.0f + 4.0f * ud(gen);
  for (int64_t i = 0; i < total; ++i) {
    const float x0 = c.x0_scale * nd(gen), eps = nd(gen);
    x[i] = p.alpha * x0 + p.sigma * eps;
    const float target = c.pred == kEpsilon ? eps : (c.pred == kSample ? x0 : p.alpha * eps - p.sigma * x0);
    cond[i] = target + 0.01f * nd(gen);
    uncond[i] = target + 0.01f * nd(gen);
    prev[i] = 0.5f * nd(gen);
  }
  if (c.inject_nan) cond[total / 2] = std::nanf("");
  auto dx = DeviceArray::make(x, c.storage, c.unaligned);
  auto dcond = DeviceArray::make(cond, c.storage, c.unaligned);
  auto duncond = DeviceArray::make(uncond, c.storage, c.unaligned);
  auto dprev = DeviceArray::make(prev, c.storage, c.unaligned);
  auto dout = DeviceArray::empty(total, c.storage, c.unaligned);
  auto dx0 = DeviceArray::empty(total, c.storage, c.unaligned);
  std::vector<float> thresholds(c.batch, -1.0f);

  // The CPU twin on the values the device arrays hold.
  StepArrays ca;
  ca.x = x.data();
  ca.cond = cond.data();
  ca.uncond = c.guided ? uncond.data() : nullptr;
  ca.scales = c.per_sample_scales ? scales.data() : nullptr;
  ca.scale = scale;
  ca.x0_prev = c.with_prev ? prev.data() : nullptr;
  std::vector<float> want_out(total), want_x0(total), want_thr(c.batch, -1.0f);
  ca.x0_out = c.with_x0_out ? want_x0.data() : nullptr;
  ca.out = want_out.data();
  ca.thresholds = want_thr.data();
  ca.batch = c.batch;
  ca.n = c.n;
  const int64_t want_bad = fused_step_cpu(ca, p, 1);

  StepArraysCuda ga;
  ga.x = dx.ptr();
  ga.cond = dcond.ptr();
  ga.uncond = c.guided ? duncond.ptr() : nullptr;
  ga.scales = c.per_sample_scales ? scales.data() : nullptr;
  ga.scale = scale;
  ga.x0_prev = c.with_prev ? dprev.ptr() : nullptr;
  ga.x0_out = c.with_x0_out ? dx0.ptr() : nullptr;
  ga.out = dout.ptr();
  ga.thresholds = thresholds.data();
  unsigned long long nonfinite = 0;
  ga.nonfinite = &nonfinite;
  ga.batch = c.batch;
  ga.n = c.n;
  ga.storage = c.storage;
  std::vector<StepParams> table;
  int32_t counter = 1;
  StepParams by_value = p;
  if (c.table) {  // row 1 of three, as a CUDA-graph replay reads it; the by-value params only lend the modes
    StepParams other = p;
    other.alpha = 0.3f;
    other.c_x = 7.0f;
    table = {other, p, other};
    ga.param_table = table.data();
    ga.step_counter = &counter;
    by_value = other;
  }
  std::vector<unsigned char> workspace;
  if (!c.own_workspace) {
    workspace.assign(fused_step_workspace_bytes(c.batch, c.n) + 256, 0xAB);  // dirty: the step clears it
    const uintptr_t a = reinterpret_cast<uintptr_t>(workspace.data());
    ga.workspace = workspace.data() + ((256 - a % 256) % 256);
    ga.workspace_bytes = fused_step_workspace_bytes(c.batch, c.n);
  }
  const int err = fused_step_cuda(ga, by_value, nullptr);

  char what[200];
  std::snprintf(
      what, sizeof what,
      "B=%lld n=%lld pred=%d mode=%d storage=%d guided=%d scales=%d prev=%d x0=%d noise=%d clipped=%d "
      "unaligned=%d table=%d own_ws=%d nan=%d x0_scale=%g",
      (long long)c.batch, (long long)c.n, c.pred, c.mode, c.storage, c.guided, c.per_sample_scales,
      c.with_prev, c.with_x0_out, c.with_noise, c.clipped_eps, c.unaligned, c.table, c.own_workspace,
      c.inject_nan, c.x0_scale);
  CHECK(err == 0, "%s: launch error %d", what, err);
  size_t first = 0;
  const int bad_out = mismatches(dout, want_out, c.storage, first);
  CHECK(bad_out == 0, "%s: %d of x_prev differ, first at %zu: %.9g vs %.9g", what, bad_out, first,
        dout.at(first), want_out[first]);
  if (c.with_x0_out) {
    const int bad_x0 = mismatches(dx0, want_x0, c.storage, first);
    CHECK(bad_x0 == 0, "%s: %d of x0 differ, first at %zu", what, bad_x0, first);
  }
  CHECK(std::isnan(dout.guard()) && std::isnan(dx0.guard()), "%s: a write outside the output arrays", what);
  if (c.mode == kDynamic) {
    ++dynamic_cases;
    for (int64_t b = 0; b < c.batch; ++b) {
      CHECK(float_bits(thresholds[b]) == float_bits(want_thr[b]),
            "%s: threshold of sample %lld: %.9g vs %.9g", what, (long long)b, thresholds[b], want_thr[b]);
      dynamic_selected += want_thr[b] > 1.0f && want_thr[b] < p.sample_max_value;
    }
  }
  CHECK(int64_t(nonfinite) == want_bad, "%s: non-finite count %llu vs %lld", what, nonfinite,
        (long long)want_bad);
  if (c.table) CHECK(counter == 2, "%s: the step counter is %d, not 2", what, counter);
}

static void test_fused_step_matches_the_cpu_twin() {
  std::mt19937 gen(11);
  const int64_t shapes[][2] = {{1, 1}, {1, 7}, {3, 5}, {2, 64}, {4, 1000}, {3, 4099}, {2, 12288}};
  const float spreads[] = {0.3f, 0.45f, 0.6f, 3.0f};  // s = 1, inside (1, 1.5), = 1.5
  int k = 0;
  for (const auto& shape : shapes)
    for (int mode = kNoThreshold; mode <= kDynamic; ++mode)
      for (int pred = kEpsilon; pred <= kVPrediction; ++pred)
        for (int variant = 0; variant < 4; ++variant, ++k) {
          Case c{};
          c.batch = shape[0];
          c.n = shape[1];
          c.mode = mode;
          c.pred = pred;
          c.storage = k % 5 == 3 ? kFloat16 : (k % 5 == 4 ? kBFloat16 : kFloat32);
          c.guided = variant != 0;
          c.per_sample_scales = variant == 2;
          c.with_prev = variant >= 2;
          c.with_x0_out = variant != 1;
          c.with_noise = variant == 1 || variant == 3;
          c.clipped_eps = variant == 3;
          c.unaligned = k % 7 == 5;
          c.table = k % 6 == 4;
          c.own_workspace = k % 4 == 1;
          c.inject_nan = k % 11 == 7;
          c.x0_scale = spreads[k % 4];
          run_case(c, gen);
        }
  // Bigger samples: many blocks per sample in the first pass, the select streaming more values per
  // thread than one round of loads; then 16 samples of 70,000.
  Case big{2,    150001, kEpsilon, kDynamic, kFloat32, true,  false, true,
           true, true,   false,    false,    false,    false, false, 0.55f};
  run_case(big, gen);
  Case looping{16,    70000, kVPrediction, kDynamic, kFloat32, true,  true,  false,
               false, true,  true,         false,    true,     false, false, 0.5f};
  run_case(looping, gen);
  // Most values above 1 and the threshold still inside (1, max): the select streams a long list.
  Case wide{2,     40000, kSample, kDynamic, kFloat32, false, false, false, true,
            false, false, false,   false,    false,    false, 2.0f,  10.0f};
  run_case(wide, gen);
  k += 3;
  CHECK(dynamic_selected >= 20, "only %d dynamic thresholds were selected inside (1, max) in %d cases",
        dynamic_selected, dynamic_cases);
  std::printf("fused step: %d cases, %d dynamic (%d thresholds selected inside (1, max))\n", k, dynamic_cases,
              dynamic_selected);
}

static void test_noise_and_cfg_mix_match_the_cpu_twin() {
  for (int64_t offset :
       {int64_t(0), int64_t(1), int64_t(3), int64_t(4), int64_t(1001), (int64_t(1) << 34) + 3})
    for (int64_t count : {1, 2, 5, 64, 4099}) {
      std::vector<float> want(count), got(count, std::nanf(""));
      randn_cpu(99, 17, offset, want.data(), count, 1);
      CHECK(randn_cuda(99, 17, offset, got.data(), count, nullptr) == 0, "randn launch");
      int bad = 0;
      for (int64_t i = 0; i < count; ++i) bad += float_bits(got[i]) != float_bits(want[i]);
      CHECK(bad == 0, "randn offset=%lld count=%lld: %d differ", (long long)offset, (long long)count, bad);
    }
  std::mt19937 gen(3);
  std::normal_distribution<float> nd;
  const int64_t B = 3, n = 1001;
  std::vector<float> cond(B * n), uncond(B * n), scales{1.5f, 3.0f, 7.5f}, want(B * n), got(B * n);
  for (auto& v : cond) v = nd(gen);
  for (auto& v : uncond) v = nd(gen);
  for (const float* s : {static_cast<const float*>(nullptr), static_cast<const float*>(scales.data())}) {
    cfg_mix_cpu(cond.data(), uncond.data(), s, 4.0f, want.data(), B, n, 1);
    CHECK(cfg_mix_cuda(cond.data(), uncond.data(), s, 4.0f, got.data(), B, n, nullptr) == 0, "cfg launch");
    int bad = 0;
    for (int64_t i = 0; i < B * n; ++i) bad += float_bits(got[i]) != float_bits(want[i]);
    CHECK(bad == 0, "cfg_mix (per-sample scales %d): %d differ", s != nullptr, bad);
  }
}

// fused_step_rows: every row at its own step (its own prediction type, thresholding, coefficients and
// noise key) in one call. The CUDA twin equals the CPU twin bit for bit, across chunks of rows
// (kRowsPerLaunch), storage types and alignments; and each row equals fused_step_cuda on that row alone.
struct RowsCase {
  int64_t batch, n;
  int storage;
  bool guided, per_sample_scales, with_prev, with_x0_out, unaligned, own_workspace;
};

static int rows_selected = 0;

static void run_rows_case(const RowsCase& c, std::mt19937& gen) {
  const int64_t total = c.batch * c.n;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> ud(0.05f, 0.95f);
  const float spreads[] = {0.3f, 0.45f, 0.6f, 3.0f};
  std::vector<StepParams> rows(size_t(c.batch));
  std::vector<float> x(total), cond(total), uncond(total), prev(total), scales(c.batch);
  for (int64_t b = 0; b < c.batch; ++b) {
    StepParams& p = rows[size_t(b)];
    const float ab = ud(gen);
    p.alpha = std::sqrt(ab);
    p.sigma = std::sqrt(1.0f - ab);
    p.prediction_type = int32_t(gen() % 3);
    p.threshold_mode = int32_t(gen() % 3);
    p.clip_range = 1.0f;
    p.dynamic_ratio = b % 2 ? 0.995f : 0.9f;
    p.sample_max_value = b % 3 ? 1.5f : 2.5f;
    p.use_clipped_eps = int32_t(gen() % 2);
    p.c_x = ud(gen);
    p.c_x0 = ud(gen);
    p.c_eps = ud(gen) - 0.5f;
    p.c_d = c.with_prev && gen() % 2 ? ud(gen) - 0.5f : 0.0f;
    p.c_noise = gen() % 3 ? ud(gen) : 0.0f;
    p.seed = (uint64_t(gen()) << 32) | gen();
    p.noise_step = gen() % 4 ? gen() % 1000 : 0xFFFFFFFFu;
    scales[size_t(b)] = 1.0f + 4.0f * ud(gen);
    const float spread = spreads[gen() % 4];
    for (int64_t i = b * c.n; i < (b + 1) * c.n; ++i) {
      const float x0 = spread * nd(gen), eps = nd(gen);
      x[i] = p.alpha * x0 + p.sigma * eps;
      const float target = p.prediction_type == kEpsilon
                               ? eps
                               : (p.prediction_type == kSample ? x0 : p.alpha * eps - p.sigma * x0);
      cond[i] = target + 0.01f * nd(gen);
      uncond[i] = target + 0.01f * nd(gen);
      prev[i] = 0.5f * nd(gen);
    }
  }
  const float scale = 1.0f + 4.0f * ud(gen);
  auto dx = DeviceArray::make(x, c.storage, c.unaligned);
  auto dcond = DeviceArray::make(cond, c.storage, c.unaligned);
  auto duncond = DeviceArray::make(uncond, c.storage, c.unaligned);
  auto dprev = DeviceArray::make(prev, c.storage, c.unaligned);
  auto dout = DeviceArray::empty(total, c.storage, c.unaligned);
  auto dx0 = DeviceArray::empty(total, c.storage, c.unaligned);
  std::vector<float> thresholds(c.batch, -1.0f);

  StepArrays ca;
  ca.x = x.data();
  ca.cond = cond.data();
  ca.uncond = c.guided ? uncond.data() : nullptr;
  ca.scales = c.per_sample_scales ? scales.data() : nullptr;
  ca.scale = scale;
  ca.x0_prev = c.with_prev ? prev.data() : nullptr;
  std::vector<float> want_out(total), want_x0(total), want_thr(c.batch, -1.0f);
  ca.x0_out = c.with_x0_out ? want_x0.data() : nullptr;
  ca.out = want_out.data();
  ca.thresholds = want_thr.data();
  ca.batch = c.batch;
  ca.n = c.n;
  const int64_t want_bad = fused_step_rows_cpu(ca, rows.data(), 1);

  StepArraysCuda ga;
  ga.x = dx.ptr();
  ga.cond = dcond.ptr();
  ga.uncond = c.guided ? duncond.ptr() : nullptr;
  ga.scales = c.per_sample_scales ? scales.data() : nullptr;
  ga.scale = scale;
  ga.x0_prev = c.with_prev ? dprev.ptr() : nullptr;
  ga.x0_out = c.with_x0_out ? dx0.ptr() : nullptr;
  ga.out = dout.ptr();
  ga.thresholds = thresholds.data();
  unsigned long long nonfinite = 0;
  ga.nonfinite = &nonfinite;
  ga.batch = c.batch;
  ga.n = c.n;
  ga.storage = c.storage;
  std::vector<unsigned char> workspace;
  if (!c.own_workspace) {
    workspace.assign(fused_step_workspace_bytes(c.batch, c.n) + 256, 0xAB);
    const uintptr_t a = reinterpret_cast<uintptr_t>(workspace.data());
    ga.workspace = workspace.data() + ((256 - a % 256) % 256);
    ga.workspace_bytes = fused_step_workspace_bytes(c.batch, c.n);
  }
  const int err = fused_step_rows_cuda(ga, rows.data(), nullptr);

  char what[160];
  std::snprintf(what, sizeof what,
                "rows B=%lld n=%lld storage=%d guided=%d scales=%d prev=%d x0=%d unaligned=%d own_ws=%d",
                (long long)c.batch, (long long)c.n, c.storage, c.guided, c.per_sample_scales, c.with_prev,
                c.with_x0_out, c.unaligned, c.own_workspace);
  CHECK(err == 0, "%s: launch error %d", what, err);
  size_t first = 0;
  const int bad_out = mismatches(dout, want_out, c.storage, first);
  CHECK(bad_out == 0, "%s: %d of x_prev differ, first at %zu (row %lld): %.9g vs %.9g", what, bad_out, first,
        (long long)(first / size_t(c.n)), dout.at(first), want_out[first]);
  if (c.with_x0_out) {
    const int bad_x0 = mismatches(dx0, want_x0, c.storage, first);
    CHECK(bad_x0 == 0, "%s: %d of x0 differ, first at %zu", what, bad_x0, first);
  }
  CHECK(std::isnan(dout.guard()) && std::isnan(dx0.guard()), "%s: a write outside the output arrays", what);
  for (int64_t b = 0; b < c.batch; ++b) {
    CHECK(float_bits(thresholds[b]) == float_bits(want_thr[b]), "%s: threshold of row %lld: %.9g vs %.9g",
          what, (long long)b, thresholds[b], want_thr[b]);
    if (rows[size_t(b)].threshold_mode != kDynamic)
      CHECK(thresholds[b] == -1.0f, "%s: row %lld has no dynamic threshold, yet it was written", what,
            (long long)b);
    else
      rows_selected += want_thr[b] > 1.0f && want_thr[b] < rows[size_t(b)].sample_max_value;
  }
  CHECK(int64_t(nonfinite) == want_bad, "%s: non-finite count %llu vs %lld", what, nonfinite,
        (long long)want_bad);

  // Each row against fused_step_cuda on the row alone (x0_prev given when its c_d != 0).
  for (int64_t b = 0; b < c.batch; ++b) {
    const StepParams& p = rows[size_t(b)];
    auto slice = [&](const std::vector<float>& v) {
      return std::vector<float>(v.begin() + b * c.n, v.begin() + (b + 1) * c.n);
    };
    std::vector<float> xb = slice(x), cb = slice(cond), ub = slice(uncond), pb = slice(prev);
    auto sx = DeviceArray::make(xb, c.storage, c.unaligned);
    auto sc = DeviceArray::make(cb, c.storage, c.unaligned);
    auto su = DeviceArray::make(ub, c.storage, c.unaligned);
    auto sp = DeviceArray::make(pb, c.storage, c.unaligned);
    auto so = DeviceArray::empty(size_t(c.n), c.storage, c.unaligned);
    StepArraysCuda one;
    one.x = sx.ptr();
    one.cond = sc.ptr();
    one.uncond = c.guided ? su.ptr() : nullptr;
    one.scales = c.per_sample_scales ? scales.data() + b : nullptr;
    one.scale = scale;
    one.x0_prev = c.with_prev && p.c_d != 0.0f ? sp.ptr() : nullptr;
    one.out = so.ptr();
    one.batch = 1;
    one.n = c.n;
    one.storage = c.storage;
    CHECK(fused_step_cuda(one, p, nullptr) == 0, "%s: single-row launch", what);
    int differ = 0;
    for (int64_t i = 0; i < c.n; ++i)
      differ += float_bits(so.at(size_t(i))) != float_bits(dout.at(size_t(b * c.n + i)));
    CHECK(differ == 0, "%s: row %lld: %d elements differ from fused_step on the row alone", what,
          (long long)b, differ);
  }
}

static void test_fused_step_rows_match_the_cpu_twin() {
  std::mt19937 gen(29);
  const int64_t shapes[][2] = {{1, 1}, {3, 5}, {5, 64}, {37, 7}, {4, 1000}, {3, 4099}, {2, 12288}, {33, 40}};
  int k = 0;
  for (const auto& shape : shapes)
    for (int variant = 0; variant < 4; ++variant, ++k) {
      RowsCase c{};
      c.batch = shape[0];
      c.n = shape[1];
      c.storage = k % 5 == 3 ? kFloat16 : (k % 5 == 4 ? kBFloat16 : kFloat32);
      c.guided = variant != 0;
      c.per_sample_scales = variant >= 2;
      c.with_prev = variant != 1;
      c.with_x0_out = variant != 2;
      c.unaligned = k % 7 == 5;
      c.own_workspace = k % 3 == 1;
      run_rows_case(c, gen);
    }
  CHECK(rows_selected >= 10, "only %d dynamic thresholds of rows were selected inside (1, max)",
        rows_selected);
  std::printf("fused step rows: %d cases (%d thresholds selected inside (1, max))\n", k, rows_selected);
}

int main() {
  test_fused_step_matches_the_cpu_twin();
  test_noise_and_cfg_mix_match_the_cpu_twin();
  test_fused_step_rows_match_the_cpu_twin();
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}

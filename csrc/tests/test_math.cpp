// C++ unit tests of csrc/math and the CPU ops (ctest). The NumPy oracle covers the rest.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "math/philox.h"
#include "math/step.h"
#include "ops/noise_cpu.h"
#include "ops/ops.h"
#include "tests/check.h"

using namespace pydiff;

static void test_philox_known_answer() {
  // Known-answer vector of Random123's kat_vectors: philox4x32 10 rounds, all-ones counter and key.
  const U32x4 r = philox4x32_10(0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu);
  CHECK(r.v[0] == 0x408f276du && r.v[1] == 0x41c83b0eu && r.v[2] == 0xa20bc7c6u && r.v[3] == 0x6d5451fdu,
        "philox KAT mismatch: %08x %08x %08x %08x", r.v[0], r.v[1], r.v[2], r.v[3]);
  const U32x4 z = philox4x32_10(0, 0, 0, 0, 0, 0);
  CHECK(z.v[0] == 0x6627e8d5u && z.v[1] == 0xe169c58du && z.v[2] == 0xbc57ac4cu && z.v[3] == 0x9b00dbd8u,
        "philox zero KAT mismatch: %08x %08x %08x %08x", z.v[0], z.v[1], z.v[2], z.v[3]);
}

static void test_log_and_sincos() {
  double worst_log = 0, worst_trig = 0;
  for (uint32_t k = 1; k <= (1u << 24); k += 997) {
    const float u = float(k) * 5.9604644775390625e-08f;
    worst_log = std::max(worst_log, std::fabs(double(log_unit(u)) - std::log(double(u))));
    float c, s;
    sincos_2pi(float(k - 1) * 5.9604644775390625e-08f, c, s);
    const double a = 2 * M_PI * double(k - 1) * 5.9604644775390625e-08;
    worst_trig = std::max({worst_trig, std::fabs(c - std::cos(a)), std::fabs(s - std::sin(a))});
  }
  CHECK(worst_log < 2e-6, "log_unit error %g", worst_log);
  CHECK(worst_trig < 1e-6, "sincos_2pi error %g", worst_trig);
}

static void test_normal_moments() {
  const int64_t n = 1 << 20;
  std::vector<float> z(n);
  randn_cpu(1234, 7, 0, z.data(), n, 2);
  double m = 0, v = 0;
  for (float x : z) m += x;
  m /= n;
  for (float x : z) v += (x - m) * (x - m);
  v /= n;
  CHECK(std::fabs(m) < 5.0 / std::sqrt(double(n)), "mean %g", m);
  CHECK(std::fabs(v - 1) < 0.01, "variance %g", v);
  // Any offset and thread count gives the same values.
  std::vector<float> part(1000);
  randn_cpu(1234, 7, 333, part.data(), 1000, 1);
  CHECK(std::equal(part.begin(), part.end(), z.begin() + 333), "offset noise differs");
}

static uint64_t fnv1a(const std::vector<float>& z) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (float v : z) h = (h ^ float_bits(v)) * 0x100000001b3ull;
  return h;
}

// The vector noise loops (AVX-512, AVX2, whichever this CPU has) against the scalar loop, bit for
// bit, at every alignment of a run's head and tail and across the 2^32 boundary of the group counter;
// and the stream against the hashes of the values it had before the vector loops existed.
static void test_noise_paths_bit_identical() {
  const SimdIsa best = set_simd_isa(kSimdAvx512);
  std::printf("noise ISA on this CPU: %d\n", int(best));
  struct Case {
    uint64_t seed;
    uint32_t step;
    int64_t offset, count;
    uint64_t hash;  // FNV-1a of the float bits, from the scalar build of 2026-12-03 (commit a6b68d8)
  };
  const Case golden[] = {{1234, 7, 5, 100003, 0xd3d036811a45f108ull},
                         {~0ull, ~0u, (int64_t(1) << 34) - 3, 4099, 0x7d93074a09578722ull}};
  for (int isa = kSimdScalar; isa <= int(best); ++isa) {
    set_simd_isa(SimdIsa(isa));
    for (const Case& c : golden) {
      std::vector<float> z(size_t(c.count));
      randn_cpu(c.seed, c.step, c.offset, z.data(), c.count, 2);
      CHECK(fnv1a(z) == c.hash, "isa %d: stream (%llu, %u) hash %llx, want %llx", isa,
            (unsigned long long)c.seed, c.step, (unsigned long long)fnv1a(z), (unsigned long long)c.hash);
    }
    for (uint64_t g0 : {uint64_t(0), uint64_t(3), (uint64_t(1) << 32) - 5, ~uint64_t(0) - 40})
      for (int64_t count : {1, 7, 8, 15, 16, 17, 33, 200}) {
        std::vector<float> got(size_t(4 * count)), want(size_t(4 * count));
        normal_groups(99, 3, g0, count, got.data());
        normal_groups_scalar(99, 3, g0, count, want.data());
        CHECK(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0,
              "isa %d: groups %llu + %lld differ from the scalar loop", isa, (unsigned long long)g0,
              (long long)count);
      }
  }
  set_simd_isa(best);
}

static void test_quantile_selection() {
  std::mt19937 gen(5);
  std::normal_distribution<float> nd(0.0f, 1.3f);
  for (int64_t n : {1, 2, 3, 7, 100, 4097, 100000}) {
    std::vector<float> x(n);
    for (auto& v : x) v = nd(gen);
    std::vector<float> a(n);
    for (int64_t i = 0; i < n; ++i) a[i] = std::fabs(x[i]);
    std::sort(a.begin(), a.end());
    for (float q : {0.5f, 0.9f, 0.995f, 1.0f}) {
      int64_t lo, hi;
      float w;
      quantile_rank(q, n, lo, hi, w);
      const float want = torch_lerp(a[lo], a[hi], w);
      float got;
      abs_quantile_cpu(x.data(), q, 1.0f, false, &got, 1, n, 1);
      CHECK(got == want, "quantile n=%lld q=%g: %.9g vs %.9g", (long long)n, q, got, want);
      abs_quantile_cpu(x.data(), q, 1.7f, true, &got, 1, n, 1);
      CHECK(got == clamp_threshold(want, 1.7f), "clamped quantile n=%lld q=%g", (long long)n, q);
    }
  }
}

int main() {
  test_philox_known_answer();
  test_log_and_sincos();
  test_normal_moments();
  test_noise_paths_bit_identical();
  test_quantile_selection();
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}

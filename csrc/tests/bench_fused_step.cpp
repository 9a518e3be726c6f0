// The fused step at (16, 3, 64, 64) against a copy of the same bytes, from C++: no Python, no output
// allocation, the minimum of many calls, so that its ratios hold on a loaded machine, where the
// Python benchmark's medians do not. Built with the tests, never run by ctest:
//   build/t/bench_fused_step [threads]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "ops/ops.h"

using namespace pydiff;

int main(int argc, char** argv) {
  const int64_t B = 16, n = 3 * 64 * 64, N = B * n;
  const int nt = argc > 1 ? std::atoi(argv[1]) : 2;
  std::mt19937 gen(0);
  std::normal_distribution<float> nd;
  // a good model's inputs at guidance 5: x_t from x0 ~ N(0, 0.5^2), predictions within 0.02 of eps,
  // so that with sample_max_value 1.5 the dynamic threshold is really selected
  std::vector<float> x(N), c(N), u(N), out(N), src(2 * N), dst(2 * N), th(B);
  const float alpha = 0.6f, sigma = 0.8f;
  for (int64_t i = 0; i < N; ++i) {
    const float e = nd(gen);
    x[i] = alpha * 0.5f * nd(gen) + sigma * e;
    c[i] = e + 0.02f * nd(gen);
    u[i] = e + 0.02f * nd(gen);
  }
  struct Case {
    const char* name;
    int32_t mode;
    bool noise;
  };
  const Case cases[] = {{"ddim", kNoThreshold, false},
                        {"ddpm (noise)", kNoThreshold, true},
                        {"ddim + dynamic", kDynamic, false},
                        {"ddpm + dynamic", kDynamic, true}};
  std::printf("simd isa %d, %d threads\n", int(simd_isa()), nt);
  for (const Case& cs : cases) {
    StepParams p{};
    p.alpha = alpha;
    p.sigma = sigma;
    p.prediction_type = kEpsilon;
    p.threshold_mode = cs.mode;
    p.dynamic_ratio = 0.995f;
    p.sample_max_value = 1.5f;
    p.c_x = 0.9f;
    p.c_x0 = 0.2f;
    p.c_eps = 0.3f;
    p.c_noise = cs.noise ? 0.1f : 0.0f;
    p.seed = 1;
    p.noise_step = 3;
    StepArrays a;
    a.x = x.data();
    a.cond = c.data();
    a.uncond = u.data();
    a.scale = 5.0f;
    a.out = out.data();
    a.thresholds = th.data();
    a.batch = B;
    a.n = n;
    double best = 1e9, best_copy = 1e9;
    for (int r = 0; r < 300; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      fused_step_cpu(a, p, nt);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      t0 = std::chrono::steady_clock::now();  // the floor: 4 arrays' bytes, read and written once
#pragma omp parallel for num_threads(nt)
      for (int k = 0; k < nt; ++k) {
        const int64_t h = 2 * N / nt;
        std::memcpy(dst.data() + k * h, src.data() + k * h, size_t(h) * sizeof(float));
      }
      best_copy =
          std::min(best_copy, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::printf("%-16s %7.3f ms   floor %6.3f ms   %5.2fx\n", cs.name, best * 1e3, best_copy * 1e3,
                best / best_copy);
  }
  return 0;
}

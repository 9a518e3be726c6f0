// Launch-shape experiment for the fused step (issue 3: the step at >= 70% of a copy's bandwidth also
// at the small shapes). Times csrc/ops/step_cuda.cu's own kernel at several block sizes, and a
// one-element-per-thread variant, against cudaMemcpyAsync of as many bytes; each figure is 20
// launches in one CUDA graph, median of 15 replays, as benchmarks/bench_gpu.py times them. Results of
// the H200 run (and of a launch-bounds variant since removed): benchmarks/results/gpu/step_launch.txt.
//   nvcc -std=c++17 --fmad=false -O3 -arch=sm_90 -Icsrc -Icsrc/include benchmarks/cuda/step_launch.cu -o
//   /tmp/sl && /tmp/sl
// (benchmarks/gpu_check.sh runs it, and Nsight Compute's stall reasons of the three kernels at 4x3x64x64.)
#include "ops/step_cuda.cu"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <vector>

namespace pydiff {
namespace {

// One element per thread, grid (blocks per sample, batch): no division to find the sample, 32-bit
// indices within it; with noise, the element's lane of its group's Philox block.
template <class T, int PRED, bool GUIDED>
__global__ void fused_step_kernel_1(StepArraysCuda a, StepParams p0, const Selection* sel) {
  const StepParams p = params_of(a, p0);
  const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  unsigned int bad = 0;
  if (i < a.n) {
    const int64_t e = b * a.n + i;
    const float x = load<T>(a.x, e), c = load<T>(a.cond, e), u = GUIDED ? load<T>(a.uncond, e) : 0.0f;
    const float prev = a.x0_prev ? load<T>(a.x0_prev, e) : x;
    float z = 0.0f;
    if (p.c_noise != 0.0f) {
      const U32x4 r = noise_block(p.seed, p.noise_step, uint64_t(e >> 2));
      const int lane = int(e & 3);
      float z0, z1;
      box_muller(lane < 2 ? r.v[0] : r.v[2], lane < 2 ? r.v[1] : r.v[3], z0, z1);
      z = (lane & 1) ? z1 : z0;
    }
    const float s = a.scales ? a.scales[b] : a.scale;
    float limit, divisor, x0, m;
    threshold_limits(p, sel ? sel[b].s : 1.0f, limit, divisor);
    const bool clipped_eps = p.use_clipped_eps && p.threshold_mode != kNoThreshold;
    const float r = step_element<PRED, GUIDED>(p, x, c, u, s, limit, divisor, clipped_eps, prev, z, x0, m);
    store<T>(a.out, e, r);
    if (a.x0_out) store<T>(a.x0_out, e, x0);
    bad = !(fabsf(m) <= FLT_MAX) | !(fabsf(r) <= FLT_MAX);
  }
  if (a.nonfinite) {
    for (int off = 16; off > 0; off >>= 1) bad += __shfl_down_sync(0xffffffffu, bad, off);
    if ((threadIdx.x & 31) == 0 && bad) atomicAdd(a.nonfinite, (unsigned long long)bad);
  }
}

// Lean: the plain step alone (no thresholding, noise, x0 history or x0 output, no non-finite counter,
// no step table), the code a DDIM step needs: how much of the small shapes' gap is the shipped
// kernel's size (its instructions fetched anew by each SM) rather than its arithmetic.
template <class T, int PRED, bool GUIDED>
__global__ void lean_step_kernel(StepArraysCuda a, StepParams p, bool aligned) {
  const int64_t total = a.batch * a.n, groups = (total + 3) / 4;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e0 = 4 * g;
    const bool vec = aligned && e0 + 4 <= total;
    float x[4], c[4], u[4] = {0.0f, 0.0f, 0.0f, 0.0f}, r[4];
    load4<T>(a.x, e0, vec, total, x);
    load4<T>(a.cond, e0, vec, total, c);
    if (GUIDED) load4<T>(a.uncond, e0, vec, total, u);
    int64_t b = int64_t(uint32_t(e0) / uint32_t(a.n)), next = (b + 1) * a.n;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (e0 + k >= next) {
        ++b;
        next += a.n;
      }
      const int64_t bb = b < a.batch ? b : a.batch - 1;
      float x0, m;
      r[k] = step_element_plain<PRED, GUIDED>(p, x[k], c[k], u[k], a.scales ? a.scales[bb] : a.scale, x0, m);
    }
    store4<T>(a.out, e0, vec, total, r);
  }
}

// The floor: the same accesses (three float4 loads, one store per thread) and no arithmetic.
__global__ void memory_only_kernel(const float4* x, const float4* c, const float4* u, float4* out,
                                   int64_t groups) {
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (g >= groups) return;
  const float4 a = x[g], b = c[g], d = u[g];
  out[g] = make_float4(a.x + b.x + d.x, a.y + b.y + d.y, a.z + b.z + d.z, a.w + b.w + d.w);
}

__global__ void fill_kernel(float* v, int64_t n, uint32_t salt) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ salt;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    v[i] = (float(h & 0xFFFFFF) / 16777216.0f - 0.5f) * 3.0f;
  }
}

template <class F>
float graph_us(F launch, cudaStream_t s) {
  for (int i = 0; i < 3; ++i) launch();
  cudaStreamSynchronize(s);
  cudaGraph_t g;
  cudaGraphExec_t ge;
  cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
  for (int i = 0; i < 20; ++i) launch();
  cudaStreamEndCapture(s, &g);
  cudaGraphInstantiate(&ge, g, 0);
  cudaGraphLaunch(ge, s);
  cudaStreamSynchronize(s);
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<float> t;
  for (int r = 0; r < 15; ++r) {
    cudaEventRecord(a, s);
    cudaGraphLaunch(ge, s);
    cudaEventRecord(b, s);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms * 1000.0f / 20);
  }
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

void run(const char* only) {
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  const int64_t shapes[][4] = {{4, 3, 64, 64},   {16, 3, 64, 64},   {4, 3, 256, 256},
                               {1, 4, 128, 128}, {16, 3, 256, 256}, {4, 3, 1024, 1024}};
  Selection* sel;
  cudaMalloc(&sel, sizeof(Selection) * 16);
  std::vector<Selection> hs(16);
  for (auto& v : hs) v.s = 1.25f;
  cudaMemcpy(sel, hs.data(), sizeof(Selection) * 16, cudaMemcpyHostToDevice);
  std::printf("%-16s %8s %8s | %-28s %s\n", "shape", "copy_us", "cur_us", "4/thread x threads: us (frac)",
              "1/thread x threads: us (frac) | ddpm+noise+dyn-sel: cur, 1/thread 256");
  for (const auto& sh : shapes) {
    const int64_t B = sh[0], n = sh[1] * sh[2] * sh[3], total = B * n;
    char name[64];
    std::snprintf(name, sizeof name, "%lldx%lldx%lldx%lld", (long long)sh[0], (long long)sh[1],
                  (long long)sh[2], (long long)sh[3]);
    if (only && std::strcmp(only, name) != 0) continue;
    float *x, *both, *out, *src, *dst;
    cudaMalloc(&x, total * 4);
    cudaMalloc(&both, 2 * total * 4);
    cudaMalloc(&out, total * 4);
    cudaMalloc(&src, total * 8);
    cudaMalloc(&dst, total * 8);
    fill_kernel<<<1024, 256, 0, s>>>(x, total, 1u);
    fill_kernel<<<1024, 256, 0, s>>>(both, 2 * total, 2u);
    StepArraysCuda a;
    a.x = x;
    a.cond = both;
    a.uncond = both + total;
    a.scale = 5.0f;
    a.out = out;
    a.batch = B;
    a.n = n;
    StepParams p{};
    p.alpha = 0.6f;
    p.sigma = 0.8f;
    p.prediction_type = kEpsilon;
    p.threshold_mode = kNoThreshold;
    p.clip_range = 1.0f;
    p.dynamic_ratio = 0.995f;
    p.sample_max_value = 1.5f;
    p.c_x = 0.9f;
    p.c_x0 = 0.3f;
    p.c_eps = 0.2f;
    p.seed = 7;
    p.noise_step = 3;
    const bool al = aligned_for_vectors(a);
    const float copy =
        graph_us([&] { cudaMemcpyAsync(dst, src, total * 8, cudaMemcpyDeviceToDevice, s); }, s);
    const float cur = graph_us([&] { fused_step_cuda(a, p, s); }, s);
    std::printf("%-13s %8.2f %8.2f |", name, copy, cur);
    for (int th : {64, 128, 256}) {
      const int blocks = int((total / 4 + th - 1) / th);
      const float t = graph_us(
          [&] { fused_step_kernel<float, kEpsilon, true><<<blocks, th, 0, s>>>(a, p, nullptr, al); }, s);
      std::printf(" %d:%.2f(%.2f)", th, t, copy / t);
    }
    const float floor_us = graph_us(
        [&] {
          memory_only_kernel<<<int((total / 4 + 255) / 256), 256, 0, s>>>(
              reinterpret_cast<const float4*>(x), reinterpret_cast<const float4*>(both),
              reinterpret_cast<const float4*>(both + total), reinterpret_cast<float4*>(out), total / 4);
        },
        s);
    const float lean_us = graph_us(
        [&] { lean_step_kernel<float, kEpsilon, true><<<blocks_for(total / 4), kThreads, 0, s>>>(a, p, al); },
        s);
    std::printf(" floor:%.2f(%.2f) lean:%.2f(%.2f) |", floor_us, copy / floor_us, lean_us, copy / lean_us);
    for (int th : {128, 256, 512}) {
      const dim3 blocks(unsigned((n + th - 1) / th), unsigned(B));
      const float t = graph_us(
          [&] { fused_step_kernel_1<float, kEpsilon, true><<<blocks, th, 0, s>>>(a, p, nullptr); }, s);
      std::printf(" %d:%.2f(%.2f)", th, t, copy / t);
    }
    StepParams q = p;
    q.threshold_mode = kDynamic;
    q.c_noise = 0.3f;
    const float t_dyn4 = graph_us(
        [&] {
          fused_step_kernel<float, kEpsilon, true><<<blocks_for(total / 4), kThreads, 0, s>>>(a, q, sel, al);
        },
        s);
    const float t_dyn1 = graph_us(
        [&] {
          fused_step_kernel_1<float, kEpsilon, true>
              <<<dim3(unsigned((n + 255) / 256), unsigned(B)), 256, 0, s>>>(a, q, sel);
        },
        s);
    StepParams qn = q;
    qn.c_noise = 0.0f;
    const float t_sel = graph_us(
        [&] {
          fused_step_kernel<float, kEpsilon, true><<<blocks_for(total / 4), kThreads, 0, s>>>(a, qn, sel, al);
        },
        s);
    const float t_sel1 = graph_us(
        [&] {
          fused_step_kernel_1<float, kEpsilon, true>
              <<<dim3(unsigned((n + 255) / 256), unsigned(B)), 256, 0, s>>>(a, qn, sel);
        },
        s);
    std::printf(" | dyn+noise %.2f, 1/thread %.2f, dyn no noise %.2f, 1/thread %.2f\n", t_dyn4, t_dyn1, t_sel,
                t_sel1);
    std::fflush(stdout);
    cudaFree(x);
    cudaFree(both);
    cudaFree(out);
    cudaFree(src);
    cudaFree(dst);
  }
  std::printf("last error: %s\n", cudaGetErrorString(cudaGetLastError()));
}

}  // namespace
}  // namespace pydiff

int main(int argc, char** argv) {  // argv[1]: one shape alone, e.g. 4x3x64x64 (for ncu)
  pydiff::run(argc > 1 ? argv[1] : nullptr);
  return 0;
}

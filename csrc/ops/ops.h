// Declarations of the native ops. Each has a CPU twin (*_cpu.cpp) and, when built with
// PYDIFF_CUDA, a CUDA twin (*_cuda.cu) taking device pointers and a stream.
#pragma once
#include <cstdint>

#include "pydiff/step_params.h"

namespace pydiff {

// The arrays of one fused step. Every array is C-contiguous float32, sample-major.
struct StepArrays {
  const float* x = nullptr;       // [B, n]  x_t
  const float* cond = nullptr;    // [B, n]  model output (the conditional half under guidance)
  const float* uncond = nullptr;  // [B, n]  unconditional half, or null: no guidance mix
  const float* scales = nullptr;  // [B]     per-sample guidance scales, or null: `scale`
  float scale = 1.0f;
  const float* x0_prev = nullptr;   // [B, n]  previous x0 (multistep solvers), or null
  const float* x0_prev2 = nullptr;  // [B, n]  the history value before it (deep steps only), or null
  const float* x0_prev3 = nullptr;  // [B, n]  and the one before that, or null
  float* x0_out = nullptr;          // [B, n]  the thresholded x0 of this step, or null
  float* out = nullptr;             // [B, n]  x_{t-1}
  float* thresholds = nullptr;      // [B]     the dynamic threshold s per sample, or null
  int64_t batch = 0;
  int64_t n = 0;  // elements per sample
};

// One denoising step: guidance mix, prediction conversion, thresholding, update, noise.
// Returns how many elements had a non-finite network output or produced a non-finite x_{t-1}.
int64_t fused_step_cpu(const StepArrays& a, const StepParams& p, int num_threads);

// The same step with every row at a step of its own (step-level batching): rows [B], row b's
// coefficients, prediction type, thresholding and noise key. Row b's noise is element i of stream
// (rows[b].seed, rows[b].noise_step) for element i of the sample (not of the batch), so a row's result
// is that of fused_step_cpu on the row alone, at any position and beside any neighbours. x0_prev is
// read only for rows with c_d != 0 (the others may hold anything there); thresholds[b] is written
// for the rows with dynamic thresholding only. Returns the non-finite count, as fused_step_cpu.
int64_t fused_step_rows_cpu(const StepArrays& a, const StepParams* rows, int num_threads);

// out = uncond + scale * (cond - uncond); scales [B] or null (then `scale`).  All [B, n].
void cfg_mix_cpu(const float* cond, const float* uncond, const float* scales, float scale, float* out,
                 int64_t batch, int64_t n, int num_threads);

// Per-sample q-quantile of |x| (torch.quantile, linear), clamped to [1, max_value] when
// clamp is set. x [B, n] -> s [B].
void abs_quantile_cpu(const float* x, float q, float max_value, bool clamp, float* s, int64_t batch,
                      int64_t n, int num_threads);

// count standard normals of noise stream (seed, step), elements offset .. offset + count.
void randn_cpu(uint64_t seed, uint32_t step, int64_t offset, float* out, int64_t count, int num_threads);

int default_num_threads();

// The instruction set of the CPU twin's hand-vectorised loops (the noise, the threshold's compaction):
// the widest this CPU has (AVX-512F, AVX2, else scalar loops), or PYDIFF_SIMD_ISA=scalar|avx2|avx512
// from the environment, capped at what the CPU has. Every path gives the same bits; set_simd_isa (tests,
// benchmarks) returns the one it chose.
enum SimdIsa : int { kSimdScalar = 0, kSimdAvx2 = 1, kSimdAvx512 = 2 };
SimdIsa simd_isa();
SimdIsa set_simd_isa(SimdIsa wanted);

}  // namespace pydiff

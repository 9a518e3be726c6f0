// The CUDA twin's host entry points: device pointers and a stream in, nothing synchronised.
#pragma once
#include <cstddef>
#include <cstdint>

#include "pydiff/step_params.h"

typedef struct CUstream_st* cudaStream_t;

namespace pydiff {

enum StorageType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// As StepArrays, on the device. x, cond/uncond, x0_prev, x0_out and out share one storage type
// (float32, float16 or bfloat16; arithmetic is float32); scales and thresholds are float32.
struct StepArraysCuda {
  const void* x = nullptr;        // [B, n]
  const void* cond = nullptr;     // [B, n]
  const void* uncond = nullptr;   // [B, n] or null
  const float* scales = nullptr;  // [B] or null
  float scale = 1.0f;
  const void* x0_prev = nullptr;            // [B, n] or null
  void* x0_out = nullptr;                   // [B, n] or null
  void* out = nullptr;                      // [B, n]
  float* thresholds = nullptr;              // [B] or null
  unsigned long long* nonfinite = nullptr;  // one counter the step adds to, or null
  int64_t batch = 0;
  int64_t n = 0;
  int32_t storage = kFloat32;

  // For CUDA-graph replay: the step's scalars come from param_table[*step_counter] (device
  // memory) instead of the StepParams passed by value, and the step adds 1 to *step_counter when
  // it is done. Every row shares the by-value params' prediction type and thresholding mode.
  const StepParams* param_table = nullptr;  // [T] or null
  int32_t* step_counter = nullptr;          // [1] or null

  // Scratch for dynamic thresholding, fused_step_workspace_bytes(batch, n) bytes; null: the step
  // allocates it stream-ordered (cudaMallocAsync) and frees it after.
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// The scratch one dynamic-thresholding step needs for `batch` samples of `n` elements.
size_t fused_step_workspace_bytes(int64_t batch, int64_t n);

// One fused step on `stream`. Dynamic thresholding selects each sample's quantile exactly on the
// device (radix select over the float bits of |x0|, after the same count shortcuts as the CPU
// twin). Returns a cudaError_t value (0: launched).
int fused_step_cuda(const StepArraysCuda& a, const StepParams& p, cudaStream_t stream);

// fused_step_rows_cpu's step on `stream`: rows [B] in host memory, row b's StepParams (coefficients,
// modes, noise key; its noise numbered within the sample). The rows travel as kernel arguments, 32 rows
// per launch: nothing is copied or synchronised, and rows may be freed once this returns. param_table
// and step_counter must be null. Returns a cudaError_t value (0: launched).
int fused_step_rows_cuda(const StepArraysCuda& a, const StepParams* rows, cudaStream_t stream);

// Noise stream (seed, step), elements offset .. offset + count, into float32 out.
int randn_cuda(uint64_t seed, uint32_t step, int64_t offset, float* out, int64_t count, cudaStream_t stream);

// out = uncond + scale * (cond - uncond), float32, [B, n].
int cfg_mix_cuda(const float* cond, const float* uncond, const float* scales, float scale, float* out,
                 int64_t batch, int64_t n, cudaStream_t stream);

// The device a pointer lives on, or -1 for host memory (cudaPointerGetAttributes).
int pointer_device(const void* ptr);

}  // namespace pydiff

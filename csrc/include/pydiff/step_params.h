// Plain-data boundary between the bindings and the kernels (CPU and CUDA alike).
#pragma once
#include <cstdint>

namespace pydiff {

enum PredictionType : int32_t { kEpsilon = 0, kSample = 1, kVPrediction = 2 };
enum ThresholdMode : int32_t { kNoThreshold = 0, kStaticClip = 1, kDynamic = 2 };

// Everything one denoising step needs besides the arrays. The step-dependent scalars are
// computed once per step on the host (pydiff/samplers) and passed by value.
struct StepParams {
  // Model-output conversion at the current timestep: x_t = a * x0 + s * eps.
  float alpha;  // sqrt(alpha_bar_t)
  float sigma;  // sqrt(1 - alpha_bar_t)
  int32_t prediction_type;

  // Thresholding of the x0 prediction.
  int32_t threshold_mode;
  float clip_range;         // static clip to [-clip_range, clip_range]
  float dynamic_ratio;      // quantile of |x0| per sample (Imagen's p)
  float sample_max_value;   // the quantile is clamped to [1, sample_max_value]
  int32_t use_clipped_eps;  // re-derive eps from the thresholded x0 (DDIM use_clipped_model_output)

  // The update, linear in everything the step knows:
  //   x_prev = c_x * x + c_x0 * x0 + c_eps * eps + c_d * (x0 - x0_prev) + c_noise * z
  float c_x, c_x0, c_eps, c_d, c_noise;

  // In-kernel noise z ~ N(0, 1): Philox4x32-10 keyed by seed, counter (element / 4, noise_step).
  uint64_t seed;
  uint32_t noise_step;

  // Deeper multistep history (DPM-Solver++ 3M, UniPC, PLMS): with history values h (this step's,
  // written to x0_out) and h1, h2, h3 (the last three steps'), the update's c_d term is
  // c_d * (h - h1), plus c_d2 * (h1 - h2) + c_d3 * (h2 - h3). h is x0, or the (guided) network output m when
  // history_output. The CPU twin's fused_step only; fused_step_rows and the CUDA twin refuse them.
  float c_d2, c_d3;
  int32_t history_output;
};

}  // namespace pydiff

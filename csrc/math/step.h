// The per-element formulas of a denoising step. Every kernel, CPU or CUDA, calls these and only
// these; the NumPy oracle in pydiff/reference mirrors them line by line.
#pragma once
#include "pydiff/common.h"
#include "pydiff/step_params.h"

namespace pydiff {

// Classifier-free guidance (Ho & Salimans 2022) in diffusers' convention: s = 1 + w.
PYDIFF_HOST_DEVICE float cfg_mix(float cond, float uncond, float scale) {
  return uncond + scale * (cond - uncond);
}

// The model output as x0 and eps, from x_t = alpha * x0 + sigma * eps (DDPM eq. 4 / v-param of
// Salimans & Ho 2022), in diffusers' operation order.
PYDIFF_HOST_DEVICE void predict_x0_eps(int32_t prediction_type, float x, float out, float alpha,
                                       float sigma, float& x0, float& eps) {
  if (prediction_type == kEpsilon) {
    x0 = (x - sigma * out) / alpha;
    eps = out;
  } else if (prediction_type == kSample) {
    x0 = out;
    eps = (x - alpha * x0) / sigma;
  } else {  // kVPrediction
    x0 = alpha * x - sigma * out;
    eps = alpha * out + sigma * x;
  }
}

PYDIFF_HOST_DEVICE float eps_from_x0(float x, float x0, float alpha, float sigma) {
  return (x - alpha * x0) / sigma;
}

PYDIFF_HOST_DEVICE float clamp_sym(float v, float r) { return v < -r ? -r : (v > r ? r : v); }

// Imagen's dynamic thresholding, given the per-sample threshold s >= 1: clip to [-s, s], divide by s.
PYDIFF_HOST_DEVICE float dynamic_clamp(float x0, float s) { return clamp_sym(x0, s) / s; }

// The step's update, linear in what it knows (DDPM eq. 7, DDIM eq. 12, DPM-Solver++ 2M).
PYDIFF_HOST_DEVICE float linear_update(const StepParams& p, float x, float x0, float eps,
                                       float x0_prev, float z) {
  float r = p.c_x0 * x0 + p.c_x * x;
  r = r + p.c_eps * eps;
  if (p.c_d != 0.0f) r = r + p.c_d * (x0 - x0_prev);
  if (p.c_noise != 0.0f) r = r + p.c_noise * z;
  return r;
}

// The x0 prediction before thresholding, from the raw network output(s): CFG mix (when an
// unconditional half is given), then the prediction-type conversion.
PYDIFF_HOST_DEVICE void model_x0_eps(const StepParams& p, float x, float cond, const float* uncond,
                                     float scale, float& x0, float& eps) {
  const float m = uncond ? cfg_mix(cond, *uncond, scale) : cond;
  predict_x0_eps(p.prediction_type, x, m, p.alpha, p.sigma, x0, eps);
}

// Thresholding of x0 and the eps that goes with it.
PYDIFF_HOST_DEVICE void threshold_x0(const StepParams& p, float x, float s_dyn, float& x0, float& eps) {
  if (p.threshold_mode == kStaticClip) {
    x0 = clamp_sym(x0, p.clip_range);
  } else if (p.threshold_mode == kDynamic) {
    x0 = dynamic_clamp(x0, s_dyn);
  }
  if (p.use_clipped_eps && p.threshold_mode != kNoThreshold) eps = eps_from_x0(x, x0, p.alpha, p.sigma);
}

// ---- The dynamic-threshold quantile, exactly as torch.quantile(..., interpolation="linear") ----

// Rank q * (n - 1) of the quantile in the ascending order of n values: torch computes it in the
// input's precision (float32), so we do too below 2^24 elements; above, torch refuses and we use
// float64 so that the rank stays exact.
PYDIFF_HOST_DEVICE void quantile_rank(float q, int64_t n, int64_t& lo, int64_t& hi, float& w) {
  if (n - 1 < (int64_t(1) << 24)) {
    const float rank = q * float(n - 1);
    lo = int64_t(rank);
    w = rank - float(lo);
    hi = w > 0.0f ? lo + 1 : lo;
  } else {
    const double rank = double(q) * double(n - 1);
    lo = int64_t(rank);
    w = float(rank - double(lo));
    hi = rank > double(lo) ? lo + 1 : lo;
  }
  if (hi > n - 1) hi = n - 1;
}

// torch.lerp's formula, which is what torch.quantile interpolates with.
PYDIFF_HOST_DEVICE float torch_lerp(float a, float b, float w) {
  return w < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

PYDIFF_HOST_DEVICE float clamp_threshold(float s, float sample_max_value) {
  return s < 1.0f ? 1.0f : (s > sample_max_value ? sample_max_value : s);
}

}  // namespace pydiff

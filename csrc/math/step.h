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
// Salimans & Ho 2022), in diffusers' operation order, except that a division by a per-step
// constant is a multiplication by its reciprocal (at most 1 ulp apart; keeps the loops free of
// divisions). PRED is a PredictionType.
template <int PRED>
PYDIFF_HOST_DEVICE void predict_x0_eps(float x, float out, float alpha, float sigma, float& x0, float& eps) {
  if (PRED == kEpsilon) {
    x0 = (x - sigma * out) * (1.0f / alpha);
    eps = out;
  } else if (PRED == kSample) {
    x0 = out;
    eps = (x - alpha * x0) * (1.0f / sigma);
  } else {  // kVPrediction
    x0 = alpha * x - sigma * out;
    eps = alpha * out + sigma * x;
  }
}

PYDIFF_HOST_DEVICE float eps_from_x0(float x, float x0, float alpha, float sigma) {
  return (x - alpha * x0) * (1.0f / sigma);
}

// `use_a ? a : b` for a flag that is the same for every element, as a bit blend: exact, and the
// CPU loops vectorise it (GCC will not vectorise a select on a loop-invariant bool).
PYDIFF_HOST_DEVICE float select_uniform(bool use_a, float a, float b) {
  const uint32_t mask = 0u - uint32_t(use_a);
  return bits_float((float_bits(a) & mask) | (float_bits(b) & ~mask));
}

PYDIFF_HOST_DEVICE float clamp_sym(float v, float r) {
  return v < -r ? -r : (v > r ? r : v);
}

// Thresholding of x0 as one formula for every mode: clip to [-limit, limit], divide by divisor
// (as a multiplication by its reciprocal, computed once per sample).
// No threshold: (inf, 1); static clipping: (clip_range, 1); Imagen's dynamic thresholding with the
// per-sample quantile s: (s, s). Dividing by 1 is exact, so each mode rounds as if written alone.
PYDIFF_HOST_DEVICE void threshold_limits(const StepParams& p, float s_dyn, float& limit, float& divisor) {
  limit = p.threshold_mode == kStaticClip
              ? p.clip_range
              : (p.threshold_mode == kDynamic ? s_dyn : bits_float(0x7f800000u));  // +inf
  divisor = p.threshold_mode == kDynamic ? s_dyn : 1.0f;
}

PYDIFF_HOST_DEVICE float threshold(float x0, float limit, float inv_divisor) {
  return clamp_sym(x0, limit) * inv_divisor;
}

// The step's update, linear in what it knows (DDPM eq. 7, DDIM eq. 12, DPM-Solver++ 2M):
//   x_prev = c_x0 x0 + c_x x + c_eps eps + c_d (x0 - x0_prev) + c_noise z.
// Terms whose coefficient is 0 add an exact +0, so the rounding is that of the sampler's own formula.
PYDIFF_HOST_DEVICE float linear_update(const StepParams& p, float x, float x0, float eps, float x0_prev,
                                       float z) {
  float r = p.c_x0 * x0 + p.c_x * x;
  r = r + p.c_eps * eps;
  r = r + p.c_d * (x0 - x0_prev);
  r = r + p.c_noise * z;
  return r;
}

// One element of the fused step. cond/uncond are the raw network outputs (uncond ignored unless
// GUIDED); x0_prev is the previous step's x0 (any finite value when the step has none: c_d is then
// 0 and the term an exact 0); clipped_eps: re-derive eps from the thresholded x0. Writes that x0
// and the guided network output m (non-finite exactly when an input is) and returns x_{t-1}.
// Written without branches (selects only) so that the CPU loops vectorise.
template <int PRED, bool GUIDED>
PYDIFF_HOST_DEVICE float step_element(const StepParams& p, float x, float cond, float uncond, float scale,
                                      float limit, float divisor, bool clipped_eps, float x0_prev, float z,
                                      float& x0_out, float& m_out) {
  const float m = GUIDED ? cfg_mix(cond, uncond, scale) : cond;
  float x0, eps;
  predict_x0_eps<PRED>(x, m, p.alpha, p.sigma, x0, eps);
  x0 = threshold(x0, limit, 1.0f / divisor);
  const float eps_c = eps_from_x0(x, x0, p.alpha, p.sigma);
  eps = select_uniform(clipped_eps, eps_c, eps);
  x0_out = x0;
  m_out = m;
  return linear_update(p, x, x0, eps, x0_prev, z);
}

// The update of a deep multistep step (StepParams' c_d2, c_d3, history_output): linear_update with the
// history values h (this step's), h1, h2, h3 (the last three steps'), term by term in the same order.
PYDIFF_HOST_DEVICE float linear_update_deep(const StepParams& p, float x, float x0, float eps, float h,
                                            float h1, float h2, float h3, float z) {
  float r = p.c_x0 * x0 + p.c_x * x;
  r = r + p.c_eps * eps;
  r = r + p.c_d * (h - h1);
  r = r + p.c_d2 * (h1 - h2);
  r = r + p.c_d3 * (h2 - h3);
  r = r + p.c_noise * z;
  return r;
}

// step_element for a deep multistep step: writes the history value h (x0, or the guided network output m
// when history_output: PLMS combines past outputs, diffusers converting them at the current step)
// to h_out and reads the last three steps' h1, h2, h3 (any finite values where their coefficient is 0).
template <int PRED, bool GUIDED>
PYDIFF_HOST_DEVICE float step_element_deep(const StepParams& p, float x, float cond, float uncond,
                                           float scale, float limit, float divisor, bool clipped_eps,
                                           float h1, float h2, float h3, float z, float& h_out,
                                           float& m_out) {
  const float m = GUIDED ? cfg_mix(cond, uncond, scale) : cond;
  float x0, eps;
  predict_x0_eps<PRED>(x, m, p.alpha, p.sigma, x0, eps);
  x0 = threshold(x0, limit, 1.0f / divisor);
  const float eps_c = eps_from_x0(x, x0, p.alpha, p.sigma);
  eps = select_uniform(clipped_eps, eps_c, eps);
  const float h = select_uniform(p.history_output != 0, m, x0);
  h_out = h;
  m_out = m;
  return linear_update_deep(p, x, x0, eps, h, h1, h2, h3, z);
}

// The same step when it has no thresholding, no x0 history and no noise (DDIM with eta = 0, the
// last step of DPM-Solver++): the terms that would add an exact 0 are left out, so it rounds as
// step_element does (signed zeros aside) with half the arithmetic.
template <int PRED, bool GUIDED>
PYDIFF_HOST_DEVICE float step_element_plain(const StepParams& p, float x, float cond, float uncond,
                                            float scale, float& x0_out, float& m_out) {
  const float m = GUIDED ? cfg_mix(cond, uncond, scale) : cond;
  float x0, eps;
  predict_x0_eps<PRED>(x, m, p.alpha, p.sigma, x0, eps);
  x0_out = x0;
  m_out = m;
  float r = p.c_x0 * x0 + p.c_x * x;
  return r + p.c_eps * eps;
}

// The x0 prediction before thresholding (the dynamic threshold's statistics need it first).
template <int PRED, bool GUIDED>
PYDIFF_HOST_DEVICE float raw_x0(const StepParams& p, float x, float cond, float uncond, float scale) {
  const float m = GUIDED ? cfg_mix(cond, uncond, scale) : cond;
  float x0, eps;
  predict_x0_eps<PRED>(x, m, p.alpha, p.sigma, x0, eps);
  return x0;
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

// torch.lerp's formula, which is what torch.quantile interpolates with, with its multiply-add fused
// as torch's compiled kernels have it (CPU and CUDA): one rounding, not two. fmaf is explicit, so
// it holds under -ffp-contract=off / --fmad=false too.
PYDIFF_HOST_DEVICE float torch_lerp(float a, float b, float w) {
  return w < 0.5f ? fmaf(w, b - a, a) : fmaf(-(b - a), 1.0f - w, b);
}

PYDIFF_HOST_DEVICE float clamp_threshold(float s, float sample_max_value) {
  return s < 1.0f ? 1.0f : (s > sample_max_value ? sample_max_value : s);
}

}  // namespace pydiff

"""The kernel's enums (csrc/include/pydiff/step_params.h) in Python, once: each member's value is
the C++ code, each lower-case name the setting users write (diffusers' `prediction_type`, the
package format's `thresholding`)."""

from __future__ import annotations

import enum


class PredictionType(enum.IntEnum):
    """What a network predicts (`PredictionType` in step_params.h)."""

    EPSILON = 0  # kEpsilon: the noise
    SAMPLE = 1  # kSample: x0 itself
    V_PREDICTION = 2  # kVPrediction: v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)

    @property
    def setting(self) -> str:
        return self.name.lower()


class Thresholding(enum.IntEnum):
    """How the step clamps its x0 estimate (`ThresholdMode` in step_params.h)."""

    NONE = 0  # kNoThreshold
    STATIC = 1  # kStaticClip: clip to [-clip_sample_range, clip_sample_range] (DDPM's clip_sample)
    DYNAMIC = 2  # kDynamic: Imagen's per-sample percentile threshold (Saharia et al. 2022, Sec. 2.3)

    @property
    def setting(self) -> str:
        return self.name.lower()


PREDICTION_TYPES = tuple(p.setting for p in PredictionType)  # ("epsilon", "sample", "v_prediction")
THRESHOLDINGS = tuple(t.setting for t in Thresholding)  # ("none", "static", "dynamic")

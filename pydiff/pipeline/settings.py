"""Per-stage sampling settings: manifest recommendations, overridden per call, validated up front."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from pydiff.guidance import check_interval
from pydiff.package import FLOAT32_MAX, MAX_STEPS, RECOMMENDED_DEFAULTS, Package, Stage
from pydiff.samplers import SAMPLERS, make_sampler
from pydiff.schedules import Schedule
from pydiff.step_params import THRESHOLDINGS

# Used when a manifest's `recommended` block leaves a key out (defined with the manifest's rules).
FALLBACK = RECOMMENDED_DEFAULTS


@dataclass(frozen=True)
class StageSettings:
    sampler: str
    steps: int
    guidance_scale: np.ndarray  # float32 [B] per-sample scales
    eta: float
    thresholding: str  # "none" | "static" | "dynamic"
    dynamic_thresholding_ratio: float
    sample_max_value: float
    clip_sample_range: float
    noise_aug_level: int | None  # super-resolution stages only
    strength: float | None = None  # img2img only
    jump_length: int | None = None  # inpaint (RePaint resampling) only
    jump_n_sample: int | None = None
    guidance_interval: tuple[float, float] | None = None  # noise levels sigma guided; None: all

    @property
    def uses_guidance(self) -> bool:
        return bool(np.any(self.guidance_scale != 1.0))

    def as_dict(self) -> dict:
        g = self.guidance_scale
        d = {
            "sampler": self.sampler,
            "steps": self.steps,
            "guidance_scale": float(g[0]) if np.all(g == g[0]) else [float(v) for v in g],
            "eta": self.eta,
            "thresholding": self.thresholding,
        }
        if self.thresholding == "dynamic":
            d["dynamic_thresholding_ratio"] = self.dynamic_thresholding_ratio
            d["sample_max_value"] = self.sample_max_value
        elif self.thresholding == "static":
            d["clip_sample_range"] = self.clip_sample_range
        if self.noise_aug_level is not None:
            d["noise_aug_level"] = self.noise_aug_level
        if self.strength is not None:
            d["strength"] = self.strength
        if self.jump_n_sample is not None:
            d["jump_length"] = self.jump_length
            d["jump_n_sample"] = self.jump_n_sample
        if self.guidance_interval is not None:
            d["guidance_interval"] = list(self.guidance_interval)
        return d


def per_stage(value: Any, what: str, package: Package, stages: list[Stage]) -> dict[str, Any]:
    """A setting given once for all stages, or as a dict keyed by stage name -> {stage: value}."""
    names = [s.name for s in stages]
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in package.stage_names]
        if unknown:
            raise ValueError(
                f"{what}: unknown stage {unknown[0]!r}; this package's stages are {package.stage_names}"
            )
        not_run = [k for k in value if k not in names]
        if not_run:
            raise ValueError(f"{what}: stage {not_run[0]!r} does not run in this call (stages run: {names})")
        return {n: value.get(n) for n in names}
    return {n: value for n in names}


def _finite(v, what) -> float:
    """A real number finite in float32, the precision the kernels use it in (1e39 passes
    math.isfinite but is inf in float32)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what}: expected a number, got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:  # an integer beyond float64
        raise ValueError(
            f"{what}: must be finite in float32, got an integer of {int(v).bit_length()} bits"
        ) from None
    if not math.isfinite(f):
        raise ValueError(f"{what}: must be finite, got {f}")
    if abs(f) > FLOAT32_MAX:
        raise ValueError(f"{what}: must be finite in float32 (|x| <= {FLOAT32_MAX:.4g}), got {v!r}")
    return f


MAX_BATCH = 4096  # images in one call; so also the most guidance scales a call takes


def guidance_array(value, what: str, n_prompts: int, num_images: int) -> np.ndarray:
    """A scale, or one per prompt, or one per image -> float32 [n_prompts * num_images]."""
    B = n_prompts * num_images
    if isinstance(value, (list, tuple, np.ndarray)):
        n = value.size if isinstance(value, np.ndarray) else len(value)
        if n > MAX_BATCH:  # before converting anything
            raise ValueError(f"{what}: {n} guidance scales; at most one per image ({MAX_BATCH})")
        try:
            flat = np.asarray(value, dtype=object).ravel().tolist()
        except ValueError as e:  # ragged nesting
            raise ValueError(f"{what}: expected a flat list of numbers ({e})") from None
        vals = [_finite(v, f"{what}[{i}]") for i, v in enumerate(flat)]
        if len(vals) == n_prompts:
            return np.repeat(np.asarray(vals, np.float32), num_images)
        if len(vals) == B:
            return np.asarray(vals, np.float32)
        raise ValueError(
            f"{what}: {len(vals)} guidance scales for {n_prompts} prompt(s) x "
            f"{num_images} image(s); give one, one per prompt or one per image"
        )
    return np.full(B, _finite(value, what), np.float32)


def resolve(
    package: Package,
    stages: list[Stage],
    *,
    n_prompts: int,
    num_images: int,
    steps=None,
    sampler=None,
    guidance_scale=None,
    thresholding=None,
    eta=None,
    noise_aug_level=None,
    strength=None,
    jump_length=None,
    jump_n_sample=None,
    guidance_interval=None,
    inpaint: bool = False,
) -> dict[str, StageSettings]:
    """Merge per-call settings with each stage's `recommended`, validating every value."""
    steps_ = per_stage(steps, "steps", package, stages)
    sampler_ = per_stage(sampler, "sampler", package, stages)
    guid_ = per_stage(guidance_scale, "guidance_scale", package, stages)
    thr_ = per_stage(thresholding, "thresholding", package, stages)
    eta_ = per_stage(eta, "eta", package, stages)
    aug_ = per_stage(noise_aug_level, "noise_aug_level", package, stages)
    str_ = per_stage(strength, "strength", package, stages)
    jl_ = per_stage(jump_length, "jump_length", package, stages)
    jn_ = per_stage(jump_n_sample, "jump_n_sample", package, stages)
    gi_ = per_stage(guidance_interval, "guidance_interval", package, stages)
    if not inpaint and (jump_length is not None or jump_n_sample is not None):
        raise ValueError("jump_length and jump_n_sample are RePaint's inpainting settings")
    samplers = tuple(SAMPLERS)
    out: dict[str, StageSettings] = {}
    for st in stages:
        rec = {**FALLBACK, **{k_: v for k_, v in st.recommended.items() if k_ != "inpaint"}}
        if inpaint:  # the package's inpainting recommendation (RePaint resampling, guidance)
            rec.update(st.recommended.get("inpaint") or {})
        n = st.name

        s = sampler_[n] if sampler_[n] is not None else rec["sampler"]
        if not isinstance(s, str):
            raise TypeError(f"sampler for stage {n!r}: expected a name, got {type(s).__name__}")
        if s not in samplers:
            raise ValueError(f"unknown sampler {s!r} for stage {n!r}; choose one of {list(samplers)}")

        k = steps_[n] if steps_[n] is not None else rec["steps"]
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"steps for stage {n!r}: expected an integer, got {k!r}")
        T = int(st.scheduler.get("num_train_timesteps", 1000))
        if not 1 <= int(k) <= min(MAX_STEPS, T):
            raise ValueError(f"steps for stage {n!r} must be in 1..{min(MAX_STEPS, T)}, got {k}")

        g = guid_[n] if guid_[n] is not None else rec["guidance_scale"]
        g = guidance_array(g, f"guidance_scale for stage {n!r}", n_prompts, num_images)
        gi = check_interval(
            gi_[n] if gi_[n] is not None else rec["guidance_interval"], f"guidance_interval for stage {n!r}"
        )

        e = _finite(eta_[n] if eta_[n] is not None else rec["eta"], f"eta for stage {n!r}")
        if e < 0:
            raise ValueError(f"eta for stage {n!r} must be >= 0, got {e}")
        if e != 0 and s != "ddim":
            raise ValueError(f"eta for stage {n!r}: eta applies to the 'ddim' sampler only, not {s!r}")

        th = thr_[n] if thr_[n] is not None else rec["thresholding"]
        if th is True:
            th = "dynamic"
        elif th is False:
            th = "none"
        if th not in THRESHOLDINGS:
            raise ValueError(
                f"thresholding for stage {n!r}: expected one of {list(THRESHOLDINGS)} or a bool, got {th!r}"
            )

        lvl = None
        if st.is_super_resolution:
            lvl = aug_[n] if aug_[n] is not None else st.noise_aug_level
            T_aug = int(st.noise_aug_scheduler.get("num_train_timesteps", 1000))
            top = T_aug - 1 if st.noise_aug_max_level is None else st.noise_aug_max_level
            if isinstance(lvl, bool) or not isinstance(lvl, (int, np.integer)) or not 0 <= lvl <= top:
                trained = "" if top == T_aug - 1 else f" (the levels stage {n!r} was trained on)"
                raise ValueError(
                    f"noise_aug_level for stage {n!r} must be an integer in 0..{top}{trained}, got {lvl!r}"
                )
            lvl = int(lvl)
        elif isinstance(noise_aug_level, Mapping) and noise_aug_level.get(n) is not None:
            raise ValueError(f"noise_aug_level: stage {n!r} is not a super-resolution stage")

        sv = None
        if strength is not None:
            sv = str_[n] if str_[n] is not None else 1.0
            sv = _finite(sv, f"strength for stage {n!r}")
            if not 0.0 < sv <= 1.0:
                raise ValueError(f"strength for stage {n!r} must be in (0, 1], got {sv}")
            if int(int(k) * sv) < 1:
                raise ValueError(
                    f"strength {sv} with {k} steps runs no step for stage {n!r}; raise strength or steps"
                )

        jl = jn = None
        for what, given in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
            if st.has_mask_channel and isinstance(given, Mapping) and given.get(n) is not None:
                raise ValueError(f"{what}: stage {n!r} inpaints through its mask inputs, not RePaint")
        if inpaint and not st.has_mask_channel:
            cls = SAMPLERS[s]
            if cls.network_evals_per_step > 1 or cls.history_output:
                raise ValueError(
                    f"sampler {s!r} for stage {n!r} cannot inpaint by RePaint (its evaluations within "
                    f"a step take x as the previous one left it); use ddpm, ddim, dpmpp_2m, euler or "
                    f"euler_ancestral"
                )
            jl = jl_[n] if jl_[n] is not None else rec["jump_length"]
            jn = jn_[n] if jn_[n] is not None else rec["jump_n_sample"]
            for what, v in (("jump_length", jl), ("jump_n_sample", jn)):
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                    raise ValueError(f"{what} for stage {n!r} must be a positive integer, got {v!r}")
            jl, jn = int(jl), int(jn)
            if jn > 1 and jl >= int(k):
                raise ValueError(
                    f"jump_length {jl} must be less than the {k} steps of stage {n!r} to "
                    f"resample (jump_n_sample {jn}); shorten the jumps or use "
                    f"jump_n_sample=1"
                )
            if int(k) * jn > MAX_STEPS:
                raise ValueError(
                    f"jump_n_sample {jn} x {k} steps for stage {n!r} is over the {MAX_STEPS}-step limit"
                )

        if s == "ddim" and e > 1:  # beyond 1 eta can ask for more noise than a step holds
            try:
                make_sampler("ddim", Schedule.from_config(dict(st.scheduler)), int(k), eta=e)
            except ValueError as err:
                raise ValueError(f"eta for stage {n!r}: {err}") from None

        out[n] = StageSettings(
            sampler=s,
            steps=int(k),
            guidance_scale=g,
            eta=e,
            thresholding=th,
            dynamic_thresholding_ratio=_finite(rec["dynamic_thresholding_ratio"], "ratio"),
            sample_max_value=_finite(rec["sample_max_value"], "sample_max_value"),
            clip_sample_range=_finite(rec["clip_sample_range"], "clip_sample_range"),
            noise_aug_level=lvl,
            strength=sv,
            jump_length=jl,
            jump_n_sample=jn,
            guidance_interval=gi,
        )
    return out

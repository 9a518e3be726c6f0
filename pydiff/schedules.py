"""Noise schedules in diffusers' vocabulary (``scheduler_config.json``) and timestep spacing."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any

import numpy as np

from pydiff.errors import ScheduleError
from pydiff.step_params import PREDICTION_TYPES

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
MAX_TRAIN_TIMESTEPS = 100000  # the arrays are float64 [T]; refuse absurd sizes before allocating
MAX_CONFIG_BYTES = 16 << 20  # a config with 100000 trained_betas is about 2.5 MB
MAX_JSON_DEPTH = 32  # configs and manifests nest about 5 deep; deeper is refused, never a RecursionError
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # the schedule's settings are used in float32
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")

# Keys of diffusers' DDPM / DDIM / DPM-Solver configs that change nothing in pydiff's samplers:
# ignored without a warning. (lower_order_final: with the final step to sigma 0, as here, diffusers'
# 2M takes a first-order last step whatever it says.)
_KNOWN_IGNORED = {
    "_class_name",
    "_diffusers_version",
    "skip_prk_steps",
    "lower_order_final",
    "flow_shift",
    "time_shift_type",
}  # the last two: only with flow sigmas / shifting
# Keys that change the math, with the values pydiff implements (diffusers' defaults; None, which
# diffusers writes for "default", too). Any other value is a ScheduleError, not a silently different
# sampler.
_SUPPORTED_ONLY = {
    "algorithm_type": ("dpmsolver++",),
    "solver_order": (2,),
    "solver_type": ("midpoint",),
    "final_sigmas_type": ("zero",),
    "euler_at_final": (False,),
    "lambda_min_clipped": (-math.inf,),
    "rescale_betas_zero_snr": (False,),
    "use_karras_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
}
# diffusers' "_log" variance types have the same standard deviation (exp(log(v) / 2) = sqrt(v))
_VARIANCE_ALIASES = {"fixed_small_log": "fixed_small", "fixed_large_log": "fixed_large"}
# diffusers' defaults that differ from DDPMScheduler's (pydiff's), by the config's _class_name:
# DPM-Solver has no clip_sample and spaces its timesteps by linspace
_CLASS_DEFAULTS = {
    "DPMSolverMultistepScheduler": {"clip_sample": False, "timestep_spacing": "linspace"},
    "DPMSolverSinglestepScheduler": {"clip_sample": False},
}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):  # 1e999 parses as inf
        raise ValueError(f"the number {text} is out of range")
    return v


def json_depth(value: Any) -> int:
    """How deep `value` nests lists and objects (a scalar: 0), found without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))
    return deepest


def parse_json_bytes(raw: bytes, max_depth: int = MAX_JSON_DEPTH, *, strict: bool = True) -> Any:
    """JSON from bytes in UTF-8 (a BOM allowed), at most `max_depth` levels of nesting; `strict`:
    NaN, Infinity and numbers beyond float range refused (diffusers writes -Infinity into
    scheduler configs, so those are read with strict=False). Every problem is a ValueError whose
    message says what is wrong (no RecursionError, no UnicodeDecodeError)."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError("UTF-16 text; JSON files here are UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        if strict:
            data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
        else:
            data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise ValueError(f"JSON nested too deeply (over {max_depth} levels)") from None
    # ValueError: NaN / Infinity literals, out-of-range numbers, integers over Python's digit limit
    if json_depth(data) > max_depth:
        raise ValueError(f"JSON nested too deeply (over {max_depth} levels)")
    return data


def _cosine_betas(T: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the squared-cosine alpha-bar (Nichol & Dhariwal 2021, eq. 17), as diffusers' betas_for_alpha_bar."""

    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)], np.float32)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A discrete-time diffusion schedule with diffusers' meaning and defaults (DDPMScheduler).

    ``alphas_cumprod`` is float64, computed from float32 betas as diffusers builds them.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    set_alpha_to_one: bool = True

    def __post_init__(self):
        if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        T = self.num_train_timesteps
        if not isinstance(T, (int, np.integer)) or isinstance(T, bool) or not 1 <= T <= MAX_TRAIN_TIMESTEPS:
            raise ScheduleError(
                f"num_train_timesteps must be an integer in 1..{MAX_TRAIN_TIMESTEPS}, got {T!r}"
            )
        for name, allowed in (
            ("beta_schedule", BETA_SCHEDULES),
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_spacing", TIMESTEP_SPACINGS),
            ("variance_type", VARIANCE_TYPES),
        ):
            v = getattr(self, name)
            if v not in allowed:
                raise ScheduleError(f"unknown {name} {v!r}; expected one of {', '.join(allowed)}")
        if not (0 < self.dynamic_thresholding_ratio <= 1):
            raise ScheduleError(
                f"dynamic_thresholding_ratio must be in (0, 1], got {self.dynamic_thresholding_ratio}"
            )
        if not self.sample_max_value >= 1:
            raise ScheduleError(f"sample_max_value must be >= 1, got {self.sample_max_value}")
        if not self.clip_sample_range > 0:
            raise ScheduleError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")
        off = self.steps_offset
        if isinstance(off, bool) or not isinstance(off, (int, np.integer)) or not 0 <= off < T:
            raise ScheduleError(f"steps_offset must be an integer in 0..{T - 1}, got {off!r}")
        for name in (
            "beta_start",
            "beta_end",
            "clip_sample_range",
            "dynamic_thresholding_ratio",
            "sample_max_value",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise ScheduleError(f"{name} must be a number, got {v!r}")
            if not abs(float(v)) <= _FLOAT32_MAX:  # NaN fails too
                raise ScheduleError(f"{name} must be finite in float32, got {v!r}")
        if self.trained_betas is not None and len(self.trained_betas) != T:
            raise ScheduleError(
                f"trained_betas has {len(self.trained_betas)} values for num_train_timesteps={T}"
            )
        betas = self.betas
        if betas.shape != (T,) or not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas >= 1):
            raise ScheduleError("betas must be num_train_timesteps values in (0, 1)")

    # ------------------------------------------------------------------ derived arrays
    @property
    def betas(self) -> np.ndarray:
        T = self.num_train_timesteps
        if self.trained_betas is not None:
            return np.asarray(self.trained_betas, np.float32)
        if self.beta_schedule == "linear":
            return np.linspace(self.beta_start, self.beta_end, T, dtype=np.float32)
        if self.beta_schedule == "scaled_linear":
            return np.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=np.float32) ** 2
        return _cosine_betas(T)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas.astype(np.float64))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: dict | str | os.PathLike) -> "Schedule":
        """A schedule from a diffusers ``scheduler_config.json`` (path) or its dict.

        Unknown keys are ignored with a warning; invalid values raise ScheduleError.
        """
        if not isinstance(config, dict):
            config = _read_config(config)
        elif json_depth(config) > MAX_JSON_DEPTH:
            raise ScheduleError(f"a scheduler config nested over {MAX_JSON_DEPTH} levels")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in config.items():
            if not isinstance(key, str):
                raise ScheduleError(f"scheduler config keys are strings, got {key!r}")
            if key in fields:
                if value is None and key != "trained_betas":
                    continue  # diffusers writes None for "the default"
                if key == "variance_type" and isinstance(value, str):
                    value = _VARIANCE_ALIASES.get(value, value)
                kwargs[key] = _check_type(key, value, fields[key].default)
            elif key in _SUPPORTED_ONLY:
                supported = _SUPPORTED_ONLY[key]
                # same type as well as equal: 2.0 is no solver order and `true` no 1
                if value is not None and not any(type(value) is type(v) and value == v for v in supported):
                    raise ScheduleError(
                        f"{key}={value!r} is not implemented by pydiff's samplers "
                        f"(supported: {', '.join(map(repr, supported))})"
                    )
            elif key not in _KNOWN_IGNORED and not key.startswith("_"):
                unknown.append(key)
        class_name = config.get("_class_name")
        if class_name is not None and not isinstance(class_name, str):
            raise ScheduleError(f"_class_name must be a string, got {class_name!r}")
        if class_name is None:
            class_name = _infer_class(config)
        for key, value in _CLASS_DEFAULTS.get(class_name, {}).items():
            if config.get(key) is None:
                kwargs[key] = value
        if unknown:
            warnings.warn(
                f"scheduler config keys ignored by pydiff: {', '.join(sorted(unknown))}", stacklevel=2
            )
        return cls(**kwargs)

    def to_config(self) -> dict:
        d = dataclasses.asdict(self)
        d["trained_betas"] = list(self.trained_betas) if self.trained_betas is not None else None
        return d

    def replace(self, **changes) -> "Schedule":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ forward process
    def add_noise(self, x0: np.ndarray, noise: np.ndarray, t) -> np.ndarray:
        """The forward process q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I) (DDPM eq. 4); t an int or [B] ints."""
        t = np.asarray(t)
        if np.any(t < 0) or np.any(t >= self.num_train_timesteps):
            raise ScheduleError(f"timesteps must be in [0, {self.num_train_timesteps - 1}]")
        abar = self.alphas_cumprod[t].astype(np.float32)
        if abar.ndim == 1:
            abar = abar.reshape((-1,) + (1,) * (np.ndim(x0) - 1))
        return (np.sqrt(abar) * x0 + np.sqrt(np.float32(1) - abar) * noise).astype(np.float32)


def _read_config(path) -> dict:
    """A scheduler_config.json file as a dict; a file that is not one is a ScheduleError."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise ScheduleError(f"a scheduler config is a dict or a path, got {type(path).__name__}")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ScheduleError(f"{path}: cannot read the scheduler config ({e.strerror or e})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ScheduleError(f"{path}: over the {MAX_CONFIG_BYTES}-byte limit of a scheduler config")
    try:
        config = parse_json_bytes(raw, strict=False)
    except ValueError as e:
        raise ScheduleError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ScheduleError(f"{path}: a scheduler config must be a JSON object")
    return config


# Keys only diffusers' DPM-Solver configs have: a config without `_class_name` that has one of them
# is a DPM-Solver config, and takes that class's defaults (not DDPMScheduler's).
_DPM_SOLVER_KEYS = frozenset(
    {
        "algorithm_type",
        "solver_order",
        "solver_type",
        "lower_order_final",
        "euler_at_final",
        "final_sigmas_type",
        "lambda_min_clipped",
        "use_lu_lambdas",
    }
)


def _infer_class(config: dict) -> str | None:
    """The diffusers class a config without `_class_name` comes from, when its keys say."""
    keys = sorted(_DPM_SOLVER_KEYS & config.keys())
    if not keys:
        return None
    warnings.warn(
        f"scheduler config without _class_name: taken as DPMSolverMultistepScheduler's "
        f"(it has {', '.join(keys)}), so clip_sample and timestep_spacing default to that "
        f"class's False and 'linspace'; add \"_class_name\" to say so",
        stacklevel=3,
    )
    return "DPMSolverMultistepScheduler"


def _check_type(key: str, value, default):
    if key == "trained_betas":
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise ScheduleError("trained_betas must be a list of numbers")
        if len(value) > MAX_TRAIN_TIMESTEPS:
            raise ScheduleError(f"trained_betas has over {MAX_TRAIN_TIMESTEPS} values")
        try:
            return tuple(float(v) for v in value)
        except OverflowError:  # an integer beyond float range
            raise ScheduleError("trained_betas must be numbers in (0, 1)") from None
        return tuple(float(v) for v in value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ScheduleError(f"{key} must be true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScheduleError(f"{key} must be an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ScheduleError(f"{key} must be a finite number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float range
            raise ScheduleError(
                f"{key} must be a finite number, got an integer of {value.bit_length()} bits"
            ) from None
        if not math.isfinite(value):
            raise ScheduleError(f"{key} must be a finite number, got {value!r}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ScheduleError(f"{key} must be a string, got {value!r}")
    return value


def timesteps(schedule: Schedule, steps: int, sampler: str = "ddim") -> np.ndarray:
    """The int64 training timesteps a sampler visits, as diffusers' ``set_timesteps`` makes them.

    DDPM and DDIM space ``steps`` points; DPM-Solver++ spaces ``steps + 1`` and drops the last
    (diffusers' DPMSolverMultistepScheduler).
    """
    T = schedule.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"steps must be an integer, got {steps!r}")
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, num_train_timesteps={T}], got {steps}")
    spacing, offset = schedule.timestep_spacing, schedule.steps_offset
    if sampler == "dpmpp_2m":
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ratio = T // (steps + 1)
            ts = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1] + offset
        else:
            ts = np.arange(T, 0, -T / steps).round() - 1
    else:
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, steps).round()[::-1]
        elif spacing == "leading":
            ts = (np.arange(0, steps) * (T // steps)).round()[::-1] + offset
        else:
            ts = np.round(np.arange(T, 0, -T / steps)) - 1
    ts = ts.astype(np.int64)
    if ts.max() >= T or ts.min() < 0:
        raise ValueError(f"steps_offset={offset} puts timesteps outside [0, {T - 1}]")
    if np.any(np.diff(ts) >= 0):
        raise ValueError(
            f"steps={steps} with {spacing!r} spacing repeats timesteps for {sampler} "
            f"(num_train_timesteps={T}); use fewer steps"
        )
    return ts

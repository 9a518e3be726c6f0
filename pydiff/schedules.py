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

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
SOLVER_TYPES = ("midpoint", "heun", "bh1", "bh2")  # DPM-Solver's and UniPC's (Zhao et al. 2023, B(h))
SIGMA_SPACINGS = ("karras", "exponential", "beta")  # the use_*_sigmas keys, by name

# diffusers' "_log" variance types have the same standard deviation (exp(log(v) / 2) = sqrt(v))
_VARIANCE_ALIASES = {"fixed_small_log": "fixed_small", "fixed_large_log": "fixed_large"}

_BASE = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
)
_THRESHOLD = ("thresholding", "dynamic_thresholding_ratio", "sample_max_value")
_CLIP = ("clip_sample", "clip_sample_range")
_SPACED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
_NOT_YET = (False, (False,))  # (the class's default, the values pydiff implements)
_ZERO_SNR = {"rescale_betas_zero_snr": _NOT_YET}
_NO_EDM = {"sigma_min": (None, (None,)), "sigma_max": (None, (None,))}
_NO_FLOW = {"use_flow_sigmas": _NOT_YET, "use_dynamic_shifting": _NOT_YET}


@dataclasses.dataclass(frozen=True)
class SchedulerClass:
    """How pydiff reads one diffusers scheduler class's config: the sampler it is, the Schedule
    fields the class reads, the class's own values of the Schedule fields where they differ from
    DDPMScheduler's (the defaults of the fields it reads and the fixed behaviour of those it does
    not: Euler never clips), and its other keys as (class default, values pydiff implements)."""

    sampler: str
    keys: tuple
    defaults: dict = dataclasses.field(default_factory=dict)
    only: dict = dataclasses.field(default_factory=dict)
    ignored: tuple = ()  # keys the class reads that change nothing here (flow_shift without flow sigmas)


_NO_CLIP = {"clip_sample": False}
_LINSPACE = {"clip_sample": False, "timestep_spacing": "linspace"}
# Each as its __init__ defaults it in diffusers 0.30-0.42 (tests/test_samplers_config.py checks them).
SCHEDULER_CLASSES = {
    "DDPMScheduler": SchedulerClass("ddpm", _BASE + _THRESHOLD + _CLIP + ("variance_type",), only=_ZERO_SNR),
    "DDIMScheduler": SchedulerClass(
        "ddim", _BASE + _THRESHOLD + _CLIP + ("set_alpha_to_one",), only=_ZERO_SNR
    ),
    "PNDMScheduler": SchedulerClass(
        "pndm",
        _BASE + ("set_alpha_to_one",),
        {"clip_sample": False, "set_alpha_to_one": False},
        {"skip_prk_steps": (False, (True,))},
    ),
    "EulerDiscreteScheduler": SchedulerClass(
        "euler",
        _BASE + _SPACED + ("final_sigmas_type",),
        _LINSPACE,
        {
            **_ZERO_SNR,
            **_NO_EDM,
            "interpolation_type": ("linear", ("linear",)),
            "timestep_type": ("discrete", ("discrete",)),
        },
    ),
    "EulerAncestralDiscreteScheduler": SchedulerClass("euler_ancestral", _BASE, _LINSPACE, _ZERO_SNR),
    "HeunDiscreteScheduler": SchedulerClass(
        "heun", _BASE + _SPACED + _CLIP, {**_LINSPACE, "beta_start": 0.00085, "beta_end": 0.012}
    ),
    "DPMSolverMultistepScheduler": SchedulerClass(
        "dpmpp_2m",
        _BASE
        + _THRESHOLD
        + _SPACED
        + ("final_sigmas_type", "lower_order_final", "euler_at_final", "solver_order", "solver_type"),
        _LINSPACE,
        {
            **_ZERO_SNR,
            **_NO_FLOW,
            "algorithm_type": ("dpmsolver++", ("dpmsolver++", "sde-dpmsolver++")),
            "use_lu_lambdas": _NOT_YET,
            "lambda_min_clipped": (-math.inf, (-math.inf,)),
            "variance_type": (None, (None,)),  # "learned"/"learned_range": the network's extra channels
        },
        ("flow_shift", "time_shift_type"),
    ),
    "UniPCMultistepScheduler": SchedulerClass(
        "unipc",
        _BASE
        + _THRESHOLD
        + _SPACED
        + ("final_sigmas_type", "lower_order_final", "solver_order", "solver_type", "disable_corrector"),
        {**_LINSPACE, "solver_type": "bh2"},
        {
            **_ZERO_SNR,
            **_NO_FLOW,
            **_NO_EDM,
            "predict_x0": (True, (True,)),
            "solver_p": (None, (None,)),
            "shift_terminal": (None, (None,)),
        },
        ("flow_shift", "time_shift_type"),
    ),
    "LCMScheduler": SchedulerClass(
        "lcm",
        _BASE + _THRESHOLD + _CLIP + ("set_alpha_to_one", "original_inference_steps", "timestep_scaling"),
        {"clip_sample": False, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"},
        _ZERO_SNR,
    ),
}
# A config without `_class_name` is read with DDPMScheduler's defaults and DDIM's set_alpha_to_one
# (pydiff's own package manifests), or as DPMSolverMultistepScheduler's when it has that class's keys.
_NO_CLASS = SchedulerClass(
    "ddpm", _BASE + _THRESHOLD + _CLIP + ("variance_type", "set_alpha_to_one"), only=_ZERO_SNR
)
# diffusers classes pydiff has no sampler for, with what to use instead
_REFUSED_CLASSES = {
    "KDPM2AncestralDiscreteScheduler": "euler_ancestral (EulerAncestralDiscreteScheduler)",
    "KDPM2DiscreteScheduler": "heun (HeunDiscreteScheduler)",
    "LMSDiscreteScheduler": "dpmpp_2m (DPMSolverMultistepScheduler)",
    "DPMSolverSinglestepScheduler": "dpmpp_2m (DPMSolverMultistepScheduler)",
    "DPMSolverSDEScheduler": "dpmpp_2m_sde (DPMSolverMultistepScheduler, algorithm_type sde-dpmsolver++)",
    "DEISMultistepScheduler": "unipc or dpmpp_2m",
    "EDMEulerScheduler": "nothing yet: EDM's preconditioning (sigma_data, rho) is not implemented",
    "EDMDPMSolverMultistepScheduler": "nothing yet: EDM's preconditioning (sigma_data, rho) is not implemented",
    "FlowMatchEulerDiscreteScheduler": "nothing: flow matching (shift) is not a DDPM-family schedule",
    "FlowMatchHeunDiscreteScheduler": "nothing: flow matching (shift) is not a DDPM-family schedule",
    "TCDScheduler": "lcm (LCMScheduler)",
}
# Keys of the EDM and flow-matching families: a config without `_class_name` that has one is refused,
# never read as a DDPM config.
_OTHER_FAMILY_KEYS = frozenset(
    {"rho", "sigma_data", "sigma_min", "sigma_max", "shift", "base_shift", "max_shift"}
)
# Keys some class above reads: in another class's config they change nothing (as in diffusers)
_ALL_KEYS = frozenset(
    {k for c in SCHEDULER_CLASSES.values() for k in (*c.keys, *c.only, *c.ignored)}
    | set(_NO_CLASS.keys)
    | {"_class_name", "_diffusers_version"}
)
# Keys a config without `_class_name` may have at any value (pydiff's older manifests, DPM leftovers)
_IGNORED_WITHOUT_CLASS = frozenset({"skip_prk_steps", "lower_order_final", "flow_shift", "time_shift_type"})
# The fields that are sampler options rather than the noise schedule: to_config writes them only
# when set, so that its output reads back as the same schedule whatever class it is read as.
_OPTION_FIELDS = (
    *_SPACED,
    "final_sigmas_type",
    "lower_order_final",
    "euler_at_final",
    "solver_order",
    "solver_type",
    "disable_corrector",
    "original_inference_steps",
    "timestep_scaling",
)


def scheduler_class(config: dict) -> str | None:
    """The diffusers class a scheduler config is read as: its `_class_name`, or the class its keys
    say (None: DDPMScheduler's defaults with DDIM's set_alpha_to_one)."""
    name = config.get("_class_name")
    if name is not None and not isinstance(name, str):
        raise ScheduleError(f"_class_name must be a string, got {name!r}")
    return name if name is not None else _infer_class(config)


def sampler_for_config(config: dict) -> str:
    """The pydiff sampler that reproduces a scheduler config's class (DPM-Solver by its
    algorithm_type and solver_order: dpmpp_2m, dpmpp_2m_sde or dpmpp_3m)."""
    name = scheduler_class(config)
    if name is None:
        return "ddpm"
    _check_class(name)
    if name == "DPMSolverMultistepScheduler":
        if config.get("algorithm_type") == "sde-dpmsolver++":
            return "dpmpp_2m_sde"
        if config.get("solver_order") == 3:
            return "dpmpp_3m"
    return SCHEDULER_CLASSES[name].sampler


def _check_class(name: str) -> SchedulerClass:
    if name in SCHEDULER_CLASSES:
        return SCHEDULER_CLASSES[name]
    instead = _REFUSED_CLASSES.get(name)
    hint = f"; use {instead}" if instead else ""
    raise ScheduleError(
        f"_class_name {name!r} has no pydiff sampler{hint} (pydiff reads the configs of "
        f"{', '.join(SCHEDULER_CLASSES)})"
    )


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
    # Sampler options of diffusers' Euler, Heun, DPM-Solver, UniPC and LCM configs (same meaning).
    use_karras_sigmas: bool = False  # Karras et al. (2022) eq. 5, rho = 7
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False  # Lee et al. (2024), Beta(0.6, 0.6)
    final_sigmas_type: str = "zero"
    lower_order_final: bool = True
    euler_at_final: bool = False
    solver_order: int | None = None  # None: the sampler's own (2 for UniPC)
    solver_type: str | None = None  # None: the sampler's own (midpoint for DPM-Solver, bh2 for UniPC)
    disable_corrector: tuple = ()  # UniPC: steps whose corrector is skipped
    original_inference_steps: int = 50  # LCM
    timestep_scaling: float = 10.0  # LCM

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
        self._check_options()
        betas = self.betas
        if betas.shape != (T,) or not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas >= 1):
            raise ScheduleError("betas must be num_train_timesteps values in (0, 1)")

    def _check_options(self) -> None:
        for name in (*_SPACED, "lower_order_final", "euler_at_final"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ScheduleError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if sum(bool(getattr(self, k)) for k in _SPACED) > 1:
            raise ScheduleError(f"at most one of {', '.join(_SPACED)} may be true")
        if self.final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ScheduleError(
                f"unknown final_sigmas_type {self.final_sigmas_type!r}; expected one of {', '.join(FINAL_SIGMAS_TYPES)}"
            )
        order = self.solver_order
        if order is not None and (
            isinstance(order, bool) or not isinstance(order, (int, np.integer)) or not 1 <= order <= 3
        ):
            raise ScheduleError(f"solver_order must be 1, 2 or 3, got {order!r}")
        if self.solver_type is not None and self.solver_type not in SOLVER_TYPES:
            raise ScheduleError(
                f"unknown solver_type {self.solver_type!r}; expected one of {', '.join(SOLVER_TYPES)}"
            )
        dc = self.disable_corrector
        if not isinstance(dc, tuple) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in dc
        ):
            raise ScheduleError(f"disable_corrector must be a list of step indices >= 0, got {dc!r}")
        n = self.original_inference_steps
        if (
            isinstance(n, bool)
            or not isinstance(n, (int, np.integer))
            or not 1 <= n <= self.num_train_timesteps
        ):
            raise ScheduleError(
                f"original_inference_steps must be an integer in 1..{self.num_train_timesteps}, got {n!r}"
            )
        ts = self.timestep_scaling
        if (
            isinstance(ts, bool)
            or not isinstance(ts, (int, float, np.integer, np.floating))
            or not 0 < ts <= 1e6
        ):
            raise ScheduleError(f"timestep_scaling must be a number in (0, 1e6], got {ts!r}")

    @property
    def sigma_spacing(self) -> str | None:
        """'karras', 'exponential' or 'beta' (the use_*_sigmas key that is true), or None."""
        for name, key in zip(SIGMA_SPACINGS, _SPACED):
            if getattr(self, key):
                return name
        return None

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

        The config's ``_class_name`` decides the defaults (each class's own: linspace spacing and no
        clipping for Euler, DPM-Solver and UniPC, ...) and which keys count (those its class reads; a
        key of another class changes nothing, as in diffusers). A class without a pydiff sampler, or a
        setting pydiff does not implement, is a ScheduleError that says what to use instead; keys no
        class reads are ignored with a warning; invalid values raise ScheduleError.
        """
        if not isinstance(config, dict):
            config = _read_config(config)
        elif json_depth(config) > MAX_JSON_DEPTH:
            raise ScheduleError(f"a scheduler config nested over {MAX_JSON_DEPTH} levels")
        for key in config:
            if not isinstance(key, str):
                raise ScheduleError(f"scheduler config keys are strings, got {key!r}")
        name = scheduler_class(config)
        if name is None:
            family = sorted(_OTHER_FAMILY_KEYS & config.keys())
            if family:
                raise ScheduleError(
                    f"a scheduler config with {', '.join(family)} and no _class_name: an EDM or "
                    f"flow-matching schedule, which pydiff does not sample (add _class_name if it is "
                    f"one of {', '.join(SCHEDULER_CLASSES)})"
                )
        spec = _NO_CLASS if name is None else _check_class(name)
        where = name or "a config without _class_name"
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = dict(spec.defaults)
        unknown = []
        for key, value in config.items():
            if key in spec.only:
                default, supported = spec.only[key]
                # same type as well as equal: 2.0 is no solver order and `true` no 1
                if value is not None and not any(type(value) is type(v) and value == v for v in supported):
                    raise ScheduleError(
                        f"{key}={value!r} is not implemented by pydiff's samplers for {where} "
                        f"(supported: {', '.join(map(repr, supported))})"
                    )
            elif key in spec.keys:
                if value is None and key != "trained_betas":
                    continue  # diffusers writes None for "the default"
                if key == "variance_type" and value in ("learned", "learned_range"):
                    raise ScheduleError(
                        f"variance_type={value!r} (learned variances, Nichol & Dhariwal 2021, as DeepFloyd "
                        f"IF's stages use) is not implemented by pydiff's fused step: use 'fixed_small' "
                        f"(the network's variance channels dropped), or the ddim / dpmpp_2m samplers"
                    )
                if key == "variance_type" and isinstance(value, str):
                    value = _VARIANCE_ALIASES.get(value, value)
                if key == "disable_corrector" and isinstance(value, list):
                    value = tuple(value)
                if (
                    key == "solver_type"
                    and name == "DPMSolverMultistepScheduler"
                    and value
                    in (
                        "bh1",
                        "bh2",
                        "logrho",
                    )
                ):
                    value = "midpoint"  # diffusers' DPM-Solver reads UniPC's and DEIS's solver types so
                if (
                    key == "solver_type"
                    and name == "UniPCMultistepScheduler"
                    and value in ("midpoint", "heun", "logrho")
                ):
                    value = "bh2"  # and diffusers' UniPC reads DPM-Solver's and DEIS's as bh2
                kwargs[key] = _check_type(key, value, fields[key].default)
            elif name is None and key in _ALL_KEYS and not key.startswith("_"):
                default = fields[key].default if key in fields else None
                if value is not None and value != default and key not in _IGNORED_WITHOUT_CLASS:
                    raise ScheduleError(
                        f"{key}={value!r} in a config without _class_name: DDPMScheduler does not read "
                        f"it; add the _class_name of the scheduler it belongs to"
                    )
            elif key not in _ALL_KEYS and not key.startswith("_"):
                unknown.append(key)
        for key, (default, supported) in spec.only.items():
            if key not in config and not any(type(default) is type(v) and default == v for v in supported):
                raise ScheduleError(
                    f"{where}: {key} defaults to {default!r}, which pydiff does not implement: set "
                    f"{key} to {' or '.join(map(repr, supported))} in the config"
                )
        if name == "DPMSolverMultistepScheduler":
            algorithm = config.get("algorithm_type") or "dpmsolver++"
            if algorithm == "sde-dpmsolver++" and kwargs.get("solver_order", 2) == 3:
                raise ScheduleError(
                    "algorithm_type='sde-dpmsolver++' with solver_order=3 is not implemented "
                    "(dpmpp_2m_sde is second order; dpmpp_3m is the third-order ODE solver)"
                )
        if unknown:
            warnings.warn(
                f"scheduler config keys ignored by pydiff: {', '.join(sorted(unknown))}", stacklevel=2
            )
        return cls(**kwargs)

    def to_config(self) -> dict:
        d = dataclasses.asdict(self)
        d["trained_betas"] = list(self.trained_betas) if self.trained_betas is not None else None
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key in _OPTION_FIELDS:  # written only when set (see _OPTION_FIELDS)
            if d[key] == defaults[key]:
                del d[key]
        if "disable_corrector" in d:
            d["disable_corrector"] = list(self.disable_corrector)
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

    DDPM and DDIM space ``steps`` points; DPM-Solver++ and UniPC space ``steps + 1`` and drop the
    last (diffusers' DPMSolverMultistepScheduler, UniPCMultistepScheduler); LCM takes its own
    (``lcm_timesteps``).
    """
    T = schedule.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"steps must be an integer, got {steps!r}")
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, num_train_timesteps={T}], got {steps}")
    if sampler == "lcm":
        return lcm_timesteps(schedule, steps)
    spacing, offset = schedule.timestep_spacing, schedule.steps_offset
    if sampler in ("dpmpp_2m", "unipc"):
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


def lcm_timesteps(schedule: Schedule, steps: int) -> np.ndarray:
    """The int64 timesteps of LCMScheduler: `steps` of the `original_inference_steps` distillation
    timesteps k - 1, 2 k - 1, ..., n k - 1 (k = T // n), from the last, evenly spaced in index."""
    n = schedule.original_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"steps must be an integer, got {steps!r}")
    if not 1 <= steps <= n:
        raise ValueError(
            f"steps must be in [1, original_inference_steps={n}] for lcm (its timesteps are a subset of "
            f"the distillation schedule's), got {steps}"
        )
    k = schedule.num_train_timesteps // n
    origin = (np.arange(1, n + 1, dtype=np.int64) * k - 1)[::-1]
    index = np.floor(np.linspace(0, n, num=steps, endpoint=False)).astype(np.int64)
    return origin[index].copy()


# ---------------------------------------------------------------------- noise levels (sigma = sigma_t / alpha_t)
def train_sigmas(schedule: Schedule) -> np.ndarray:
    """float32 [T] noise levels sqrt((1 - abar_t) / abar_t) of the training timesteps, from float32 abar
    as diffusers' Euler, Heun, DPM-Solver and UniPC schedulers compute them."""
    abar = schedule.alphas_cumprod.astype(np.float32)
    return ((1 - abar) / abar) ** np.float32(0.5)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timesteps of noise levels, by linear interpolation in log sigma between
    neighbouring training timesteps (k-diffusion's and diffusers' ``_sigma_to_t``)."""
    sigmas = np.asarray(sigmas, np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigmas.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n noise levels from sigma_max to sigma_min, uniform in sigma^(1/rho) (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n noise levels from sigma_max to sigma_min, uniform in log sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """n noise levels from sigma_max to sigma_min at the quantiles of Beta(a, b) (Lee et al. 2024,
    "Beta Sampling is All You Need"), as diffusers' ``_convert_to_beta``."""
    qs = 1 - np.linspace(0, 1, n)
    return np.array([sigma_min + beta_ppf(float(q), a, b) * (sigma_max - sigma_min) for q in qs])


def _betainc(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below the mean: use the symmetry
        return 1.0 - _betainc(1.0 - x, b, a)
    front = (
        math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
        / a
    )
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / (c if abs(c) > tiny else tiny)
        f *= c * d
        if abs(1.0 - c * d) < 1e-16:
            break
    return front * (f - 1.0)


def beta_ppf(q: float, a: float, b: float) -> float:
    """The q-quantile of Beta(a, b) (scipy.stats.beta.ppf), by bisection on I_x(a, b) to float64 precision."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _betainc(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


_SPACING_FUNCTIONS = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}


def sigma_schedule(schedule: Schedule, steps: int, family: str) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps float64 [N], sigmas float32 [N + 1]) as diffusers' ``set_timesteps`` makes them.

    family 'euler' (Euler, Euler ancestral and Heun: fractional timesteps, spaced sigmas between the
    interpolated ends), 'dpm' (DPM-Solver: integer timesteps, spaced sigmas between the trained ends)
    or 'unipc' (as 'dpm'; Karras timesteps always rounded, a spaced schedule's sigma_min final is
    its own last sigma). The last sigma is 0 or, with final_sigmas_type 'sigma_min', the smallest.
    """
    T = schedule.num_train_timesteps
    base = train_sigmas(schedule)
    spacing = schedule.sigma_spacing
    sigma_last = 0.0 if schedule.final_sigmas_type == "zero" else float(base[0])
    if family == "euler":
        if schedule.timestep_spacing == "linspace":
            timesteps(schedule, steps, "ddim")  # the same checks of steps
            ts = np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].astype(np.float64)
        else:
            ts = timesteps(schedule, steps, "ddim").astype(np.float64)
        sig = np.interp(ts, np.arange(T), base)
        if spacing:
            sig = _SPACING_FUNCTIONS[spacing](float(sig[-1]), float(sig[0]), steps)
            ts = sigma_to_t(sig, np.log(base)).astype(np.float32).astype(np.float64)
    elif family in ("dpm", "unipc"):
        ts = timesteps(schedule, steps, "dpmpp_2m").astype(np.float64)
        if spacing:
            sig = _SPACING_FUNCTIONS[spacing](float(base[0]), float(base[-1]), steps)
            ts = sigma_to_t(sig, np.log(base))
            if spacing == "karras" and (family == "unipc" or schedule.beta_schedule != "squaredcos_cap_v2"):
                ts = ts.round()
            ts = np.trunc(ts)  # diffusers casts them to int64
            if family == "unipc" and schedule.final_sigmas_type == "sigma_min":
                sigma_last = float(sig[-1])
        else:
            sig = np.interp(ts, np.arange(T), base)
    else:
        raise ValueError(f"unknown sigma family {family!r}")
    return ts, np.concatenate([sig, [sigma_last]]).astype(np.float32)

"""The cascaded pipeline: base stage, then super-resolution stages, on one backend.

Randomness (documented contract; the same seed gives the same images on the same backend): each
image j has its own seed s_j (`Plan.seeds`: from ``seed=s``, s_j = (s + j * 0x9E3779B97F4A7C15)
mod 2**64, so s_0 = s; or one per image from ``generator=``) and its own generator
``numpy.random.Generator(numpy.random.PCG64(s_j))``; for each stage in order, its x_T is
``rng_j.standard_normal((1, C, R, R), dtype=float32)``, then (super-resolution stages) its
augmentation noise of the shape of its `low_res`; img2img uses the x_T draw as the noise of
``schedule.add_noise(image, noise, t_start)``; ``latents=`` replaces the first stage's x_T draw.
The sampler's own per-step noise (DDPM, eta > 0) at step i is the core's counter-based stream
``pydiff.ops.randn((1, C, R, R), (s_j + stage index) mod 2**64, i)`` for image j. So an image
depends on its own seed only: it is the same alone or anywhere in a batch (to the network's float32
rounding at another batch size). RePaint's noise (inpainting, `pydiff.repaint`) is still keyed by
``(s_0 + stage index) mod 2**64`` over the whole batch: inpainted images depend on their batch.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pydiff import imageio, ops
from pydiff.backends import create_backend
from pydiff.backends.guidance_models import load_guidance_model
from pydiff.backends.vae import load_vae
from pydiff.errors import CallbackError, ModelOutputError, NetworkRunError, NonFiniteError, PackageError
from pydiff.package import Package, Stage, load_package
from pydiff.pipeline import conditioning
from pydiff.pipeline.requests import (
    REQUESTS,
    ColorizeRequest,
    GenerateRequest,
    Img2ImgRequest,
    InpaintRequest,
    Plan,
    Request,
    UpscaleRequest,
)
from pydiff.pipeline.result import result
from pydiff.pipeline.settings import StageSettings
from pydiff.samplers import SAMPLERS, make_sampler
from pydiff.sampling import repaint, repaint_schedule, sample
from pydiff.schedules import Schedule


class Pipeline:
    """A model package loaded on a backend; `generate`, `inpaint`, `img2img`, `upscale`.

    Safe to share between threads: per-call state lives in the call; the ONNX Runtime sessions
    and the cached empty-prompt encoding are read-only after construction.
    """

    def __init__(self, path=None, backend: str = "auto", **backend_options: Any):

        package = path if isinstance(path, Package) else load_package(path)
        self.package = package
        self.backend = create_backend(backend, package, **backend_options)
        self._schedules = {}
        self._aug_schedules = {}
        for st in package.stages:
            self._schedules[st.name] = self._schedule(st.scheduler, f"stages[{st.index}].scheduler")
            if st.is_super_resolution:
                self._aug_schedules[st.name] = self._schedule(
                    st.noise_aug_scheduler, f"stages[{st.index}].noise_aug.scheduler"
                )
        self._uncond_lock = threading.Lock()
        self._empty_encoding: tuple[np.ndarray, np.ndarray] | None = None
        self._guidance_runtimes: dict[str, Any] = {}  # guidance model name -> runtime (lazy)
        # a latent package's autoencoder (the decoder turns the last stage's latents into images)
        self.vae = load_vae(package, providers=getattr(self.backend, "providers", None))

    def _schedule(self, config, key):
        try:
            return Schedule.from_config(dict(config))
        except (ValueError, TypeError, KeyError) as e:
            raise PackageError(f"{self.package.manifest_path}: {key}: {e}") from None

    # ---------------------------------------------------------------- public API

    @property
    def stages(self) -> list[str]:
        return self.package.stage_names

    def __repr__(self) -> str:
        return f"Pipeline({self.package.name!r}, stages={self.stages}, backend={self.backend.name!r})"

    def generate(self, prompt=None, **kwargs):
        """Images for `prompt` (a string or a list: one batch) or `class_label` (int or list).

        Per-stage settings (steps, sampler, guidance_scale, thresholding, eta, noise_aug_level)
        default to the manifest's `recommended` and may be dicts keyed by stage name.
        `guidance_scale` may be a list: one scale per prompt or per image. `guidance_interval`
        (sigma_lo, sigma_hi) guides only the steps whose noise level sigma_t = sqrt((1 - abar_t) /
        abar_t) is in (sigma_lo, sigma_hi], one network pass at the others (Kynkaanniemi et al.
        2024); "all" guides every step; default the manifest's. Returns a list of PIL
        images (`output_type="pil"`) or float32 [B, H, W, C] in [0, 1] (`"numpy"`, or `"np"`), or
        the last stage's samples [B, C, R, R] unclipped (`"latent"`: a latent package's latents
        before the VAE), prompt-major (all images of prompt 0 first), carrying `.images`, `.seeds`
        (one per image: ``seed=seeds[j]`` remakes image j alone) and `.settings`
        (pydiff.pipeline.result). `callback(stage, i, t, x)` runs after each step; if it returns an
        array, that replaces x.

        diffusers' spellings are accepted: `num_inference_steps` (steps), `num_images_per_prompt`
        (num_images), `generator` (an int, one int per image, or a numpy.random.Generator: the
        seeds), `height` / `width` (the package's image size: its networks have fixed shapes),
        `latents` (the first stage's x_T), `output_type="np"`.

        `guidance_type`: "cfg" (default: classifier-free guidance with `guidance_scale`) or
        "classifier" (the package's classifier guidance model: the stage network runs
        unconditionally, with the label "no class", and the classifier's gradient of
        log p(class_label | x_t) guides it at `classifier_scale`, a number or one per prompt or
        image; default the guidance model's `recommended.scale`) or "clip" (the package's CLIP
        guidance model: its stage runs on the empty prompt, guided by grad f(x_t) . g(prompt) at
        `clip_scale`; later stages run as usual with classifier-free guidance).
        """
        return self.run(GenerateRequest(prompt=prompt, **kwargs))

    def inpaint(self, image, mask, prompt=None, **kwargs):
        """Regenerate where `mask` is 1 (white), keep the rest of `image`.

        Stages with mask inputs (`mask`, `masked_image`) are conditioned on them; every other
        stage runs RePaint (Lugmayr et al. 2022, `pydiff.repaint`): after each step the kept region
        is replaced by the original noised to the level x is at, and with `jump_n_sample` R > 1
        every `jump_length` L steps the last L are redone R - 1 more times from re-noised x, so
        that the new region settles into the kept one. Both may be dicts keyed by stage name; the
        defaults, and the guidance used while inpainting, are the package's `recommended.inpaint`
        (bundled shapes: base L 10, R 10, guidance 3), else L 10, R 1. Image and mask must be the
        same size; each stage sees them resized to its resolution (a low-resolution pixel is
        regenerated when at least half of it is). Other keywords as in `generate`.
        """
        return self.run(InpaintRequest(image=image, mask=mask, prompt=prompt, **kwargs))

    def img2img(self, image, prompt=None, *, strength=0.75, **kwargs):
        """SDEdit (Meng et al. 2022): noise `image` to an intermediate time and denoise from there.

        Each stage starts at step ``steps - int(steps * strength)`` from ``schedule.add_noise(
        image resized to the stage, noise, t_start)``; `strength` in (0, 1] (1 = from pure noise)
        may be a dict keyed by stage name. Other keywords as in `generate`.
        """
        return self.run(Img2ImgRequest(image=image, prompt=prompt, strength=strength, **kwargs))

    def colorize(self, image, prompt=None, **kwargs):
        """Palette colorization (Saharia et al. 2022): colour images from a grey `image` (PIL 'L' or
        an HxW(x1) array; a colour image is taken by its BT.601 luma), on a package whose stage is
        conditioned on it (`image_condition`). The prompt, if the stage takes text, says the
        colours. Other keywords as in `generate`."""
        return self.run(ColorizeRequest(image=image, prompt=prompt, **kwargs))

    def upscale(self, image, prompt=None, *, stage=None, **kwargs):
        """Super-resolve a user image (SR3, Saharia et al. 2021) with a super-resolution stage.

        `stage`: the first stage to run (default: the first super-resolution stage); it and every
        later stage run. The image is resized to the stage's `low_res_resolution` if needed.
        """
        return self.run(UpscaleRequest(image=image, prompt=prompt, stage=stage, **kwargs))

    def run(self, request: Request):
        """Validate `request` (a GenerateRequest, InpaintRequest, Img2ImgRequest or
        UpscaleRequest), then run it; returns its images."""
        return self.execute(self.plan(request))

    def plan(self, request: Request | None = None, /, **kwargs) -> Plan:
        """Validate a call and return its plan; raises ValueError/TypeError before any work.

        `request`: a request object; or, as keywords, `kind=` ("generate", "inpaint", "img2img",
        "upscale"; default "generate") and that kind's fields."""
        if request is None:
            kind = kwargs.pop("kind", "generate")
            if kind not in REQUESTS:
                raise ValueError(f"unknown call kind {kind!r}; choose one of {list(REQUESTS)}")
            if kind != "inpaint" and {"jump_length", "jump_n_sample"} & kwargs.keys():
                raise ValueError("jump_length and jump_n_sample are RePaint's inpainting settings")
            request = REQUESTS[kind](**kwargs)
        elif kwargs:
            raise TypeError("plan() takes a request object or keywords, not both")
        if not isinstance(request, Request):
            raise TypeError(f"plan() takes a Request, got {type(request).__name__}")
        return request.plan(self.package)

    # ---------------------------------------------------------------- execution

    def _empty(self):
        with self._uncond_lock:
            if self._empty_encoding is None:
                self._empty_encoding = self.backend.text_encoder.encode([""])
            return self._empty_encoding

    def generators(self, plan: Plan) -> list[np.random.Generator]:
        """One generator per image, PCG64 of its seed: what `stage_inputs` draws from."""
        return [np.random.Generator(np.random.PCG64(s)) for s in plan.image_seeds()]

    def execute(self, plan: Plan):
        """Run a validated plan; returns the images in `plan.output_type` (module docstring: the
        draws), as a pydiff.pipeline.result ImageList / ImageArray."""

        B = plan.batch
        rng = self.generators(plan)
        if self.vae is not None and plan.image is not None:  # img2img in latent space (SDEdit on z)
            side = self.package.image_resolution
            plan = dataclasses.replace(plan, image=self.vae.encode(imageio.resize(plan.image, side)))
        text = self.text_conditions(plan)
        x_prev = None
        if plan.init_low_res is not None:
            x_prev = np.repeat(plan.init_low_res, B, axis=0)
        for st in plan.stages:
            named = f"stage {st.name!r} ({st.onnx.name})"
            try:
                x_prev = self._run_stage(plan, st, rng, text, x_prev)
            except (NonFiniteError, ModelOutputError) as e:  # say which network misbehaved
                if str(e).startswith(f"stage {st.name!r}"):  # the stage model named itself
                    raise
                raise type(e)(f"{named}: {e}") from e
            except CallbackError as e:
                gm = plan.guidance_model
                if e.source == "guidance_fn" and gm is not None:  # the package's guidance model
                    raise ModelOutputError(
                        f"stage {st.name!r}: guidance model {gm.name!r} ({gm.onnx.name}): {e}"
                    ) from e
                raise CallbackError(f"stage {st.name!r}: {e}", e.source) from e  # the caller's callback
        return self.output(plan, x_prev)

    def output(self, plan: Plan, x: np.ndarray):
        """What a call returns for the last stage's samples `x` [B, C, R, R]: decoded by the VAE
        (a latent package), clipped to [-1, 1] and converted to `plan.output_type`, or `x` itself
        for "latent"; an ImageList / ImageArray with the plan's seeds and settings."""
        settings = {name: s.as_dict() for name, s in plan.settings.items()}
        kw = dict(seeds=plan.image_seeds(), settings=settings, output_type=plan.output_type)
        if plan.output_type == "latent":
            return result(np.asarray(x, np.float32), **kw)
        if self.vae is not None:
            x = self.vae.decode(x)
        x = np.clip(x, -1.0, 1.0)
        unit = kept_pixels(plan, imageio.to_numpy(x))
        if plan.output_type == "numpy":
            return result(unit, **kw)
        return result(imageio.unit_to_pil(unit), **kw)

    def _text_conditions(self, plan: Plan):
        """The prompts' encodings; the text encoder's failures and NaN named as its own."""
        encoder = self.backend.text_encoder
        te = self.package.text_encoder
        where = f"the text encoder ({te.onnx.name if te is not None else '?'})"
        try:
            cond, uncond = conditioning.text_conditions(encoder, plan, self._empty())
        except (ValueError, TypeError):
            raise
        except Exception as e:  # ONNX Runtime's own exception types
            raise NetworkRunError(f"{where}: ONNX Runtime failed: {_first_line(e)}") from e
        for c in (cond, uncond):
            states = c["encoder_hidden_states"]
            if not np.all(np.isfinite(states)):
                raise ModelOutputError(f"{where}: NaN or Inf in its output (encoder_hidden_states)")
        return cond, uncond

    def _guidance_runtime(self, spec):
        """The ONNX Runtime guidance model for a manifest entry, created on first use."""
        with self._uncond_lock:
            rt = self._guidance_runtimes.get(spec.name)
            if rt is None:
                try:
                    rt = load_guidance_model(spec, providers=getattr(self.backend, "providers", None))
                except ValueError as e:
                    raise PackageError(str(e)) from None
                self._guidance_runtimes[spec.name] = rt
            return rt

    def stage_inputs(self, plan: Plan, st: Stage, rng, text, x_prev):
        """What stage `st` starts from: (x_T, cond, uncond, known, keep), drawing from `rng` in the
        documented order (module docstring): x_T, then a super-resolution stage's augmentation noise
        of the previous stage's images `x_prev`. `rng`: one generator per image (`generators(plan)`:
        each image's draws from its own), or one generator for the whole batch (the draws before
        per-image seeds). `text`: `conditioning.text_conditions`'s output."""
        s = plan.settings[st.name]
        R = st.resolution
        x = _normal(rng, plan.batch, (st.channels, R, R))
        if plan.latents is not None and st.index == plan.stages[0].index:
            x = plan.latents.copy()  # diffusers' latents=: the caller's x_T, after the same draw
        low = None
        if st.is_super_resolution:
            up = imageio.upsample_bilinear(np.clip(x_prev, -1.0, 1.0), R)
            aug_noise = _normal(rng, plan.batch, up.shape[1:])
            low = np.asarray(
                self._aug_schedules[st.name].add_noise(up, aug_noise, s.noise_aug_level), np.float32
            )
        known, keep = conditioning.resized(plan, st)
        cond, uncond = conditioning.stage_conditions(
            plan, st, text, low_res=low, noise_level=s.noise_aug_level, known=known, keep=keep
        )
        return x, cond, uncond, known, keep

    def schedule(self, stage: str) -> Schedule:
        """The schedule stage `stage` samples with (built once, from the manifest)."""
        return self._schedules[stage]

    def text_conditions(self, plan: Plan):
        """(cond, uncond) token states of `plan`'s prompts, or None for a package without text."""
        if not any(s.conditioning == "text" for s in plan.stages):
            return None
        return self._text_conditions(plan)

    def _run_stage(self, plan: Plan, st: Stage, rng, text, x_prev):
        s = plan.settings[st.name]
        sched = self._schedules[st.name]
        R = st.resolution
        x, cond, uncond, known, keep = self.stage_inputs(plan, st, rng, text, x_prev)

        start_step = 0
        if plan.kind == "img2img":
            # whole levels skipped, in steps (Heun evaluates each level twice: diffusers' t_start * order)
            start_step = (s.steps - int(s.steps * s.strength)) * SAMPLERS[s.sampler].network_evals_per_step
            x = _noised_to_step(sched, s, start_step, known, x)
        resample = plan.kind == "inpaint" and not st.has_mask_channel

        guided = st.conditioning != "none" and s.uses_guidance
        guidance_fn = None
        target = conditioning.guidance_model_target(plan, st, text)
        if target is not None:
            guided = False  # the guidance model, not classifier-free guidance, conditions
            guidance_fn = _checked_guidance(
                self._guidance_runtime(plan.guidance_model).guidance_fn(*target, plan.guidance_model_scale),
                plan.guidance_model,
            )
        g = s.guidance_scale
        gscale = float(g[0]) if np.all(g == g[0]) else g
        thr = threshold_kwargs(s)
        user_cb = plan.callback

        total = s.steps - start_step
        if resample:
            total = sum(op[0] == "step" for op in repaint_schedule(s.steps, s.jump_length, s.jump_n_sample))
        with tqdm(
            total=total,
            desc=f"{st.name} {R}x{R}",
            unit="step",
            disable=not plan.progress,
            file=sys.stderr,
            leave=True,
        ) as bar:

            def callback(i, t, xt):
                bar.update(1)
                if user_cb is not None:
                    return user_cb(st.name, i, t, xt)  # checked by the sampler (CallbackError)
                return None

            seeds = [(sj + st.index) % 2**64 for sj in plan.image_seeds()]
            common = dict(
                schedule=sched,
                sampler=s.sampler,
                steps=s.steps,
                eta=s.eta,
                guidance_scale=gscale if guided else 1.0,
                guidance_interval=s.guidance_interval if guided else None,
                cond=cond,
                uncond=uncond if guided else None,
                seed=seeds[0],
                callback=callback,
                progress=False,
                guidance_fn=guidance_fn,
                **thr,
            )
            model = self.backend.model(st.name)
            if resample:  # RePaint: the kept region replaced after every step, with resampling
                x0 = repaint(
                    model,
                    x,
                    known,
                    1.0 - keep,
                    jump_length=s.jump_length,
                    jump_n_sample=s.jump_n_sample,
                    **common,
                )
            else:
                noise = None
                if len(seeds) > 1 and _stochastic(sched, s, thr):  # each image's noise from its own seed
                    noise = _per_image_noise(seeds)
                x0 = sample(model, x, start_step=start_step, noise=noise, **common)
        return np.asarray(x0, np.float32)


def kept_pixels(plan: Plan, unit: np.ndarray) -> np.ndarray:
    """Inpainting's output [B, H, W, C] in [0, 1] with the input image's own values where the mask
    keeps it: (1 - m) * image + m * generated, so that m = 0 gives the input bit for bit (a uint8
    input's pixels come back as they were) and m = 1 the generated value. Other plans, or an input
    of another size than the output (kept only at its own resolution), pass through."""
    if plan.kind != "inpaint" or plan.image_unit is None or plan.image_unit.shape != unit.shape[1:]:
        return unit
    m = plan.mask[0, 0][None, :, :, None]  # 1 = generate
    return ((1.0 - m) * plan.image_unit[None] + m * unit).astype(np.float32)


def _normal(rng, batch: int, shape: tuple) -> np.ndarray:
    """float32 standard normals [batch, *shape]: row j from rng[j] (one generator per image), or the
    whole batch from one generator."""
    if isinstance(rng, np.random.Generator):
        return rng.standard_normal((batch, *shape), dtype=np.float32)
    if len(rng) != batch:
        raise ValueError(f"{len(rng)} generators for a batch of {batch}")
    return np.concatenate([g.standard_normal((1, *shape), dtype=np.float32) for g in rng])


def _stochastic(schedule: Schedule, s: StageSettings, thr: dict) -> bool:
    """Whether any step of the stage's sampler adds noise (DDPM, DDIM with eta > 0)."""
    smp = make_sampler(s.sampler, schedule, s.steps, eta=s.eta, **thr)
    return any(smp.coefficients(i).c_noise != 0.0 for i in range(len(smp.timesteps)))


def _per_image_noise(seeds: list[int]):
    """`pydiff.sample`'s noise(i, shape): image j's normals are the in-kernel stream (seeds[j], i)
    over its own elements, the noise it gets alone (the fused step adds them bit for bit alike)."""

    def noise(i, shape):
        one = (1, *shape[1:])
        return np.concatenate([ops.randn(one, sj, i) for sj in seeds])

    return noise


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _checked_guidance(fn, spec):
    """`fn` (a package guidance model's guidance_fn), its failures named by the model and file:
    ONNX Runtime's errors and a gradient that is not finite in float32 are the model's."""
    where = f"guidance model {spec.name!r} ({spec.onnx.name})"

    def checked(x, t):
        try:
            g = fn(x, t)
        except (ValueError, TypeError):
            raise
        except Exception as e:  # ONNX Runtime's own exception types
            raise NetworkRunError(f"{where}: ONNX Runtime failed: {_first_line(e)}") from e
        g = np.asarray(g)
        if g.dtype.kind != "f" or g.shape != x.shape:
            raise ModelOutputError(f"{where}: returned {g.dtype} {g.shape} for a sample of shape {x.shape}")
        with np.errstate(over="ignore", invalid="ignore"):
            g = g.astype(np.float32, copy=False)
        if not np.all(np.isfinite(g)):
            raise ModelOutputError(f"{where}: NaN or Inf in its gradient (in float32)")
        return g

    return checked


def _noised_to_step(schedule: Schedule, s: StageSettings, step: int, image, noise) -> np.ndarray:
    """SDEdit's start: `image` noised to the level the sampler's step `step` runs at. At an integer
    timestep of the schedule's own noise levels, the forward process at that t (diffusers'
    add_noise); where the sampler's levels are its own (Karras / exponential / beta sigmas, the
    Euler family's fractional timesteps), alpha x0 + sigma eps at the step's level."""
    smp = make_sampler(s.sampler, schedule, s.steps, eta=s.eta, **threshold_kwargs(s))
    t = float(smp.timesteps[step])
    if t.is_integer() and schedule.sigma_spacing is None:
        return np.asarray(schedule.add_noise(image, noise, int(t)), np.float32)
    c = smp.coefficients(step)
    return (np.float32(c.alpha) * image + np.float32(c.sigma) * noise).astype(np.float32)


def threshold_kwargs(s: StageSettings) -> dict:
    """The core's thresholding keywords for a stage's setting (diffusers' vocabulary)."""
    if s.thresholding == "dynamic":
        return {
            "thresholding": True,
            "dynamic_thresholding_ratio": s.dynamic_thresholding_ratio,
            "sample_max_value": s.sample_max_value,
            "clip_sample": False,
        }
    if s.thresholding == "static":
        return {"thresholding": False, "clip_sample": True, "clip_sample_range": s.clip_sample_range}
    return {"thresholding": False, "clip_sample": False}

"""The cascaded pipeline: base stage, then super-resolution stages, on one backend.

Randomness (documented contract; the same seed gives the same images on the same backend):
``rng = numpy.random.Generator(numpy.random.PCG64(seed))``; for each stage in order, x_T is
``rng.standard_normal((B, C, R, R), dtype=float32)``, then (super-resolution stages) the
augmentation noise of the same shape as `low_res`; img2img uses the x_T draw as the noise of
``schedule.add_noise(image, noise, t_start)``. The sampler's own per-step noise (DDPM, eta > 0),
and RePaint's noise for the kept region and its jumps (`pydiff.repaint`), come from the core's
counter-based generator seeded with ``(seed + stage index) mod 2**64``. Images depend on the
batch they are made in (batch composition changes the draws), not on threads or timing.
"""
from __future__ import annotations

import secrets
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pydiff import imageio
from pydiff.backends import create_backend
from pydiff.backends.guidance_models import load_guidance_model
from pydiff.errors import ModelOutputError, NonFiniteError, PackageError
from pydiff.package import Package, Stage, load_package
from pydiff.pipeline.settings import StageSettings, guidance_array, resolve
from pydiff.sampling import repaint, repaint_schedule, sample
from pydiff.schedules import Schedule, timesteps

OUTPUT_TYPES = ("pil", "numpy")
GUIDANCE_TYPES = ("cfg", "classifier", "clip")
MAX_BATCH = 4096
MAX_SEED = 2**64 - 1


@dataclass
class _Plan:
    """Everything one call needs, validated; nothing in it is shared between calls."""

    stages: list[Stage]
    settings: dict[str, StageSettings]
    n_prompts: int
    num_images: int
    prompts: list[str] | None            # one per prompt (not per image)
    negative_prompts: list[str] | None
    class_labels: list[int] | None
    seed: int
    output_type: str
    progress: bool
    callback: Callable | None
    mode: str = "generate"               # generate | inpaint | img2img | upscale
    image: np.ndarray | None = None      # [1, C, H, W] in [-1, 1]
    mask: np.ndarray | None = None       # [1, 1, H, W] in [0, 1], 1 = generate
    init_low_res: np.ndarray | None = None  # [1, 3, h, w] (upscale)
    guidance_type: str = "cfg"           # cfg | classifier | clip
    guidance_model: Any = None           # the package's GuidanceModelSpec used (not cfg)
    guidance_model_scale: np.ndarray | None = None   # float32 [B] scale of its gradient

    @property
    def batch(self) -> int:
        return self.n_prompts * self.num_images


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
            self._schedules[st.name] = self._schedule(st.scheduler,
                                                      f"stages[{st.index}].scheduler")
            if st.is_super_resolution:
                self._aug_schedules[st.name] = self._schedule(
                    st.noise_aug_scheduler, f"stages[{st.index}].noise_aug.scheduler")
        self._uncond_lock = threading.Lock()
        self._empty_encoding: tuple[np.ndarray, np.ndarray] | None = None
        self._guidance_runtimes: dict[str, Any] = {}     # guidance model name -> runtime (lazy)

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
        return (f"Pipeline({self.package.name!r}, stages={self.stages}, "
                f"backend={self.backend.name!r})")

    def generate(self, prompt=None, *, class_label=None, negative_prompt=None, num_images=1,
                 steps=None, sampler=None, guidance_scale=None, thresholding=None, eta=None,
                 seed=None, noise_aug_level=None, output_type="pil", progress=True,
                 callback=None, guidance_type=None, classifier_scale=None, clip_scale=None):
        """Images for `prompt` (a string or a list: one batch) or `class_label` (int or list).

        Per-stage settings (steps, sampler, guidance_scale, thresholding, eta, noise_aug_level)
        default to the manifest's `recommended` and may be dicts keyed by stage name.
        `guidance_scale` may be a list: one scale per prompt or per image. Returns a list of PIL
        images (`output_type="pil"`) or float32 [B, H, W, C] in [0, 1] (`"numpy"`), prompt-major
        (all images of prompt 0 first). `callback(stage, i, t, x)` runs after each step; if it
        returns an array, that replaces x.

        `guidance_type`: "cfg" (default: classifier-free guidance with `guidance_scale`) or
        "classifier" (the package's classifier guidance model: the stage network runs
        unconditionally, with the label "no class", and the classifier's gradient of
        log p(class_label | x_t) guides it at `classifier_scale`, a number or one per prompt or
        image; default the guidance model's `recommended.scale`) or "clip" (the package's CLIP
        guidance model: its stage runs on the empty prompt, guided by grad f(x_t) . g(prompt) at
        `clip_scale`; later stages run as usual with classifier-free guidance).
        """
        plan = self.plan(prompt=prompt, class_label=class_label, negative_prompt=negative_prompt,
                         num_images=num_images, steps=steps, sampler=sampler,
                         guidance_scale=guidance_scale, thresholding=thresholding, eta=eta,
                         seed=seed, noise_aug_level=noise_aug_level, output_type=output_type,
                         progress=progress, callback=callback, guidance_type=guidance_type,
                         classifier_scale=classifier_scale, clip_scale=clip_scale)
        return self.execute(plan)

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
        return self.execute(self.plan(prompt=prompt, mode="inpaint", image=image, mask=mask,
                                      **kwargs))

    def img2img(self, image, prompt=None, *, strength=0.75, **kwargs):
        """SDEdit (Meng et al. 2022): noise `image` to an intermediate time and denoise from there.

        Each stage starts at step ``steps - int(steps * strength)`` from ``schedule.add_noise(
        image resized to the stage, noise, t_start)``; `strength` in (0, 1] (1 = from pure noise)
        may be a dict keyed by stage name. Other keywords as in `generate`.
        """
        return self.execute(self.plan(prompt=prompt, mode="img2img", image=image,
                                      strength=strength, **kwargs))

    def upscale(self, image, prompt=None, *, stage=None, **kwargs):
        """Super-resolve a user image (SR3, Saharia et al. 2021) with a super-resolution stage.

        `stage`: the first stage to run (default: the first super-resolution stage); it and every
        later stage run. The image is resized to the stage's `low_res_resolution` if needed.
        """
        return self.execute(self.plan(prompt=prompt, mode="upscale", image=image,
                                      start_stage=stage, **kwargs))

    # ---------------------------------------------------------------- planning (validation)

    def plan(self, *, prompt=None, class_label=None, negative_prompt=None, num_images=1,
             steps=None, sampler=None, guidance_scale=None, thresholding=None, eta=None, seed=None,
             noise_aug_level=None, output_type="pil", progress=True, callback=None,
             mode="generate", image=None, mask=None, strength=None, start_stage=None,
             guidance_type=None, classifier_scale=None, clip_scale=None, jump_length=None,
             jump_n_sample=None) -> _Plan:
        """Validate a call and return its plan; raises ValueError/TypeError before any work."""
        pkg = self.package
        stages = list(pkg.stages)
        if mode == "upscale":
            if start_stage is None:
                sr = [s for s in stages if s.is_super_resolution]
                if not sr:
                    raise ValueError(f"package {pkg.name!r} has no super-resolution stage to "
                                     f"upscale with")
                start = sr[0]
            else:
                if start_stage not in pkg.stage_names:
                    raise ValueError(f"unknown stage {start_stage!r}; this package's stages are "
                                     f"{pkg.stage_names}")
                start = pkg.stage(start_stage)
                if not start.is_super_resolution:
                    raise ValueError(f"stage {start_stage!r} is not a super-resolution stage")
            stages = stages[start.index:]
        elif stages[0].is_super_resolution:
            raise ValueError(f"package {pkg.name!r} starts with a super-resolution stage; use "
                             f"upscale(image, ...)")

        # -- prompts / classes
        has_text = any(s.conditioning == "text" for s in stages)
        class_stages = [s for s in stages if s.conditioning == "class"]
        prompts = negative = labels = None
        n_from_prompt = n_from_class = None
        if prompt is not None:
            if not has_text:
                hint = "; use class_label=" if class_stages else ""
                raise ValueError(f"package {pkg.name!r} is not text-conditional{hint}")
            prompts = self._str_list(prompt, "prompt")
            n_from_prompt = len(prompts)
        if negative_prompt is not None:
            if not has_text:
                raise ValueError(f"negative_prompt: package {pkg.name!r} is not text-conditional")
            negative = self._str_list(negative_prompt, "negative_prompt")
        # a text package with a classifier guidance model takes class labels for it alone
        labels_for_classifier = (guidance_type == "classifier" and not class_stages
                                 and pkg.guidance_model("classifier") is not None)
        if class_label is not None:
            if not class_stages and not labels_for_classifier:
                raise ValueError(f"class_label: package {pkg.name!r} is not class-conditional"
                                 + ("; give a prompt" if has_text else ""))
            raw = class_label if isinstance(class_label, (list, tuple, np.ndarray)) else [class_label]
            raw = list(np.asarray(raw, dtype=object).ravel()) if isinstance(raw, np.ndarray) else list(raw)
            if not raw:
                raise ValueError("class_label: empty list")
            labels = []
            for i, c in enumerate(raw):
                if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
                    raise TypeError(f"class_label[{i}]: expected an integer, got {c!r}")
                for s in class_stages:
                    if not 0 <= int(c) < s.num_classes:
                        raise ValueError(f"class_label {int(c)} out of range for stage {s.name!r} "
                                         f"(0..{s.num_classes - 1})")
                labels.append(int(c))
            n_from_class = len(labels)
        if n_from_prompt and n_from_class and n_from_prompt != n_from_class:
            if n_from_prompt == 1:
                prompts = prompts * n_from_class
            elif n_from_class == 1:
                labels = labels * n_from_prompt
            else:
                raise ValueError(f"{n_from_prompt} prompts but {n_from_class} class labels")
        n_prompts = max(n_from_prompt or 1, n_from_class or 1)
        if has_text and prompts is None:
            prompts = [""] * n_prompts            # unconditional
        if negative is not None:
            if len(negative) == 1:
                negative = negative * n_prompts
            elif len(negative) != n_prompts:
                raise ValueError(f"{len(negative)} negative prompts for {n_prompts} prompts")
        if class_stages and labels is None:
            labels = [None] * n_prompts           # unconditional (num_classes)
        elif labels is not None and len(labels) == 1 and n_prompts > 1:
            labels = labels * n_prompts

        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) \
                or num_images < 1:
            raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
        if n_prompts * int(num_images) > MAX_BATCH:
            raise ValueError(f"{n_prompts} prompt(s) x {num_images} images is over the batch "
                             f"limit {MAX_BATCH}")
        if seed is None:
            seed = secrets.randbits(53)   # exact in JSON readers that use doubles (jq, JavaScript)
        elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
                or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in 0..2**64-1, got {seed!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable(stage, i, t, x)")

        gtype = "cfg" if guidance_type is None else guidance_type
        if gtype not in GUIDANCE_TYPES:
            raise ValueError(f"guidance_type must be one of {list(GUIDANCE_TYPES)}, got {gtype!r}")
        gspec = None
        if classifier_scale is not None and gtype != "classifier":
            raise ValueError('classifier_scale needs guidance_type="classifier"')
        if clip_scale is not None and gtype != "clip":
            raise ValueError('clip_scale needs guidance_type="clip"')
        if gtype != "cfg":
            gspec = pkg.guidance_model(gtype)
            if gspec is None:
                raise ValueError(f"guidance_type {gtype!r}: package {pkg.name!r} has no {gtype} "
                                 f"guidance model (manifest guidance_models)")
            if gspec.stage not in [s_.name for s_ in stages]:
                raise ValueError(f"guidance_type {gtype!r}: its stage {gspec.stage!r} does not run "
                                 f"in this call")
            if guidance_scale is not None and not (isinstance(guidance_scale, dict)
                                                   and gspec.stage not in guidance_scale):
                raise ValueError(f"guidance_scale is the classifier-free scale; with guidance_type "
                                 f"{gtype!r} give {gtype}_scale (guidance_scale may still set "
                                 f"other stages', as a dict)")
            if gtype == "clip" and (prompts is None or all(p_ == "" for p_ in prompts)):
                raise ValueError("CLIP guidance needs a prompt (the text to guide to)")
            if gtype == "classifier":
                if labels is None or any(c is None for c in labels):
                    raise ValueError("classifier guidance needs class_label (the class to guide to)")
                for c in labels:
                    if not 0 <= c < gspec.num_classes:
                        raise ValueError(f"class_label {c} out of range for the classifier "
                                         f"{gspec.name!r} (0..{gspec.num_classes - 1})")
            default = gspec.recommended.get("scale", 1.0)
            given = classifier_scale if gtype == "classifier" else clip_scale
            gscale = guidance_array(default if given is None else given, f"{gtype}_scale",
                                    n_prompts, int(num_images))

        settings = resolve(pkg, stages, n_prompts=n_prompts, num_images=int(num_images),
                           steps=steps, sampler=sampler, guidance_scale=guidance_scale,
                           thresholding=thresholding, eta=eta, noise_aug_level=noise_aug_level,
                           strength=strength if mode == "img2img" else None,
                           jump_length=jump_length, jump_n_sample=jump_n_sample,
                           inpaint=mode == "inpaint")
        for st_ in stages:   # a class network without a "no class" label: labels given, no CFG
            if st_.conditioning != "class" or st_.unconditional_class:
                continue
            if labels is None or any(c is None for c in labels):
                raise ValueError(f"stage {st_.name!r} has no unconditional class (its manifest's "
                                 f"unconditional_class is false): give class_label")
            if settings[st_.name].uses_guidance:
                raise ValueError(f"stage {st_.name!r} has no unconditional class, so no classifier-free "
                                 f"guidance: use guidance_scale=1.0")
            if gspec is not None and gspec.kind == "classifier" and gspec.stage == st_.name:
                raise ValueError(f"classifier guidance feeds stage {st_.name!r} the unconditional "
                                 f"class, which it lacks")
        plan = _Plan(stages=stages, settings=settings, n_prompts=n_prompts,
                     num_images=int(num_images), prompts=prompts, negative_prompts=negative,
                     class_labels=labels, seed=int(seed), output_type=output_type,
                     progress=bool(progress), callback=callback, mode=mode,
                     guidance_type=gtype, guidance_model=gspec,
                     guidance_model_scale=gscale if gspec is not None else None)

        # -- images
        final = stages[-1]
        if mode in ("inpaint", "img2img"):
            if image is None:
                raise ValueError(f"{mode}: an image is required")
            plan.image = imageio.to_model_array(image, final.channels, "image")
            h, w = plan.image.shape[2:]
            if h != w:
                raise ValueError(f"image is {w}x{h}; the models make square images, crop or pad it")
        if mode == "inpaint":
            if mask is None:
                raise ValueError("inpaint: a mask is required (white / 1 = regenerate)")
            plan.mask = imageio.mask_to_array(mask, "mask")
            if plan.mask.shape[2:] != plan.image.shape[2:]:
                raise ValueError(f"mask is {plan.mask.shape[3]}x{plan.mask.shape[2]} but the image "
                                 f"is {plan.image.shape[3]}x{plan.image.shape[2]}; they must match")
        if mode == "upscale":
            if image is None:
                raise ValueError("upscale: an image is required")
            low = imageio.to_model_array(image, 3, "image")
            h, w = low.shape[2:]
            if h != w:
                raise ValueError(f"image is {w}x{h}; the models make square images, crop or pad it")
            plan.init_low_res = imageio.resize(low, stages[0].low_res_resolution)
        return plan

    @staticmethod
    def _str_list(value, what) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError(f"{what}: empty list")
            for i, p in enumerate(value):
                if not isinstance(p, str):
                    raise TypeError(f"{what}[{i}]: expected a string, got {type(p).__name__}")
            return list(value)
        raise TypeError(f"{what}: expected a string or a list of strings, got {type(value).__name__}")

    # ---------------------------------------------------------------- execution

    def _empty(self):
        with self._uncond_lock:
            if self._empty_encoding is None:
                self._empty_encoding = self.backend.text_encoder.encode([""])
            return self._empty_encoding

    def _text_conditions(self, plan: _Plan):
        k = plan.num_images
        states, mask = self.backend.text_encoder.encode(plan.prompts)
        cond = {"encoder_hidden_states": np.repeat(states, k, axis=0),
                "encoder_attention_mask": np.repeat(mask, k, axis=0)}
        if plan.negative_prompts is not None:
            us, um = self.backend.text_encoder.encode(plan.negative_prompts)
            us, um = np.repeat(us, k, axis=0), np.repeat(um, k, axis=0)
        else:
            es, em = self._empty()
            us = np.repeat(es, plan.batch, axis=0)
            um = np.repeat(em, plan.batch, axis=0)
        return cond, {"encoder_hidden_states": us, "encoder_attention_mask": um}

    def execute(self, plan: _Plan):
        """Run a validated plan; returns the images in `plan.output_type`."""

        B = plan.batch
        rng = np.random.Generator(np.random.PCG64(plan.seed))
        text = None
        if any(s.conditioning == "text" for s in plan.stages):
            text = self._text_conditions(plan)
        x_prev = None
        if plan.init_low_res is not None:
            x_prev = np.repeat(plan.init_low_res, B, axis=0)
        for st in plan.stages:
            try:
                x_prev = self._run_stage(plan, st, rng, text, x_prev)
            except (NonFiniteError, ModelOutputError) as e:   # say which network misbehaved
                raise type(e)(f"stage {st.name!r} ({st.onnx.name}): {e}") from e
        x = np.clip(x_prev, -1.0, 1.0)
        if plan.output_type == "numpy":
            return imageio.to_numpy(x)
        return imageio.to_pil(x)

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

    def _run_stage(self, plan: _Plan, st: Stage, rng, text, x_prev):
        B = plan.batch
        s = plan.settings[st.name]
        sched = self._schedules[st.name]
        R = st.resolution
        x = rng.standard_normal((B, st.channels, R, R), dtype=np.float32)

        cond: dict[str, np.ndarray] = {}
        uncond: dict[str, np.ndarray] = {}
        if st.conditioning == "text":
            cond.update(text[0])
            uncond.update(text[1])
        elif st.conditioning == "class":
            labels = [st.num_classes if c is None else c for c in plan.class_labels]
            cond["class_labels"] = np.repeat(np.asarray(labels, np.int64), plan.num_images)
            uncond["class_labels"] = np.full(B, st.num_classes, np.int64)
        if st.is_super_resolution:
            # Noise-conditioning augmentation (Ho et al. 2021, Cascaded Diffusion Models, Sec. 4.1)
            up = imageio.upsample_bilinear(np.clip(x_prev, -1.0, 1.0), R)
            aug_noise = rng.standard_normal(up.shape, dtype=np.float32)
            level = s.noise_aug_level
            low = np.asarray(self._aug_schedules[st.name].add_noise(up, aug_noise, level),
                             np.float32)
            for d in (cond, uncond):
                d["low_res"] = low
                d["noise_level"] = np.full(B, level, np.float32)

        known = keep = None
        if plan.image is not None:
            known = np.repeat(imageio.resize(plan.image, R), B, axis=0)
        if plan.mask is not None:
            m = imageio.resize(plan.mask, R) if plan.mask.shape[2] != R else plan.mask
            m = (m >= 0.5).astype(np.float32)
            keep = np.repeat(1.0 - m, B, axis=0)          # 1 where the original is kept
        if st.has_mask_channel:
            gen = np.ones((B, 1, R, R), np.float32) if keep is None else 1.0 - keep
            masked = np.zeros((B, 3, R, R), np.float32) if known is None else known * (1.0 - gen)
            for d in (cond, uncond):
                d["mask"] = gen
                d["masked_image"] = masked.astype(np.float32)

        start_step = 0
        ts = None
        if plan.mode == "img2img":
            start_step = s.steps - int(s.steps * s.strength)
            ts = _timesteps(sched, s.steps, s.sampler)
            x = np.asarray(sched.add_noise(known, x, int(ts[start_step])), np.float32)
        resample = plan.mode == "inpaint" and not st.has_mask_channel

        guided = st.conditioning != "none" and s.uses_guidance
        guidance_fn = None
        gm = plan.guidance_model
        if gm is not None and gm.stage == st.name:
            guided = False          # the guidance model, not classifier-free guidance, conditions
            if gm.kind == "classifier":
                want = np.repeat(np.asarray(plan.class_labels, np.int64), plan.num_images)
                if st.conditioning == "class":   # the network itself gets "no class"
                    cond["class_labels"] = np.full(B, st.num_classes, np.int64)
                guidance_fn = self._guidance_runtime(gm).guidance_fn(want, plan.guidance_model_scale)
            elif gm.kind == "clip":
                # the network gets the unconditional (empty-prompt) encoding; CLIP gets the prompt's
                states, mask = cond["encoder_hidden_states"], cond["encoder_attention_mask"]
                cond["encoder_hidden_states"] = uncond["encoder_hidden_states"]
                cond["encoder_attention_mask"] = uncond["encoder_attention_mask"]
                guidance_fn = self._guidance_runtime(gm).guidance_fn(states, mask,
                                                                     plan.guidance_model_scale)
        g = s.guidance_scale
        gscale = float(g[0]) if np.all(g == g[0]) else g
        thr = _threshold_kwargs(s)
        user_cb = plan.callback
        from tqdm.auto import tqdm

        total = s.steps - start_step
        if resample:
            total = sum(op[0] == "step" for op in repaint_schedule(s.steps, s.jump_length,
                                                                         s.jump_n_sample))
        with tqdm(total=total, desc=f"{st.name} {R}x{R}", unit="step",
                  disable=not plan.progress, file=sys.stderr, leave=True) as bar:
            def callback(i, t, xt):
                bar.update(1)
                if user_cb is not None:
                    r = user_cb(st.name, i, t, xt)
                    if r is not None:
                        return np.asarray(r, np.float32)
                return None

            common = dict(schedule=sched, sampler=s.sampler, steps=s.steps, eta=s.eta,
                          guidance_scale=gscale if guided else 1.0, cond=cond,
                          uncond=uncond if guided else None, seed=(plan.seed + st.index) % 2**64,
                          callback=callback, progress=False, guidance_fn=guidance_fn, **thr)
            if resample:    # RePaint: the kept region replaced after every step, with resampling
                result = repaint(self.backend.model(st.name), x, known, 1.0 - keep,
                                      jump_length=s.jump_length, jump_n_sample=s.jump_n_sample,
                                      **common)
            else:
                result = sample(self.backend.model(st.name), x, start_step=start_step, **common)
        return np.asarray(result, np.float32)


def _timesteps(schedule, steps, sampler):
    """The int64 timesteps the sampler visits (they depend on the sampler, e.g. DPM-Solver++)."""
    return np.asarray(timesteps(schedule, steps, sampler))


def _threshold_kwargs(s: StageSettings) -> dict:
    """The core's thresholding keywords for a stage's setting (diffusers' vocabulary)."""
    if s.thresholding == "dynamic":
        return {"thresholding": True, "dynamic_thresholding_ratio": s.dynamic_thresholding_ratio,
                "sample_max_value": s.sample_max_value, "clip_sample": False}
    if s.thresholding == "static":
        return {"thresholding": False, "clip_sample": True,
                "clip_sample_range": s.clip_sample_range}
    return {"thresholding": False, "clip_sample": False}

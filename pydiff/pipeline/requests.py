"""One request object per call kind (generate, inpaint, img2img, upscale), each validating itself
against a package into a `Plan`: everything one call needs, checked before any work.

The fields are `Pipeline.generate`'s keywords (documented there); each kind adds its own inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from pydiff import imageio
from pydiff.backends.text_encoder import check_prompt
from pydiff.package import GUIDANCE_KINDS, GuidanceModelSpec, Package, Stage
from pydiff.pipeline.settings import MAX_BATCH, StageSettings, guidance_array, resolve
from pydiff.sampling import random_seed

OUTPUT_TYPES = ("pil", "numpy", "latent")
OUTPUT_ALIASES = {"np": "numpy"}  # diffusers' spelling
MASK_CONVENTIONS = ("diffusers", "glide")  # InpaintRequest.mask_convention
GUIDANCE_TYPES = ("cfg", *GUIDANCE_KINDS)  # classifier-free, or a guidance model of the package
MAX_SEED = 2**64 - 1
GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: spreads the images' seeds over the seed space


def image_seed(seed: int, image: int) -> int:
    """The seed of image `image` of a call given one `seed`: image 0's is `seed` itself, so a
    one-image call is the same as before per-image seeds, and image j is remade alone by
    ``generate(..., seed=image_seed(seed, j))`` (its `.seeds[j]`)."""
    return (int(seed) + image * GOLDEN) % 2**64


def _seed(v, what: str) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not 0 <= v <= MAX_SEED:
        raise ValueError(f"{what} must be an integer in 0..2**64-1, got {v!r}")
    return int(v)


def resolve_seeds(seed, generator, batch: int) -> list[int]:
    """One seed per image from `seed` (an int: image j gets image_seed(seed, j); None: a fresh one)
    or diffusers' `generator`: an int (as seed), a list of ints (one per image), or a
    numpy.random.Generator (the seeds are drawn from it, so it advances as a torch generator would)."""
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if generator is None:
        base = random_seed() if seed is None else _seed(seed, "seed")
        return [image_seed(base, j) for j in range(batch)]
    if isinstance(generator, np.random.Generator):
        return [int(v) for v in generator.integers(0, 2**53, size=batch)]  # 53 bits: exact in JSON
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"generator: {len(generator)} seeds for {batch} images; give one per image")
        return [_seed(g, f"generator[{i}]") for i, g in enumerate(generator)]
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, (bool, np.bool_)):
        base = _seed(generator, "generator")
        return [image_seed(base, j) for j in range(batch)]
    if type(generator).__module__.startswith("torch"):
        raise TypeError(
            "generator: pydiff draws with NumPy, not torch: pass the seed itself "
            "(generator=torch.Generator().manual_seed(s) -> generator=s), a list of seeds, or a "
            "numpy.random.Generator"
        )
    raise TypeError(
        f"generator: expected an int, a list of ints (one per image) or a numpy.random.Generator, "
        f"got {type(generator).__name__}"
    )


@dataclass
class Plan:
    """Everything one call needs, validated; nothing in it is shared between calls."""

    kind: str  # generate | inpaint | img2img | upscale
    stages: list[Stage]
    settings: dict[str, StageSettings]
    n_prompts: int
    num_images: int
    prompts: list[str] | None  # one per prompt (not per image)
    negative_prompts: list[str] | None
    class_labels: list[int | None] | None
    seed: int
    output_type: str
    progress: bool
    callback: Callable | None
    image: np.ndarray | None = None  # [1, C, H, W] in [-1, 1]
    mask: np.ndarray | None = None  # [1, 1, H, W] in [0, 1], 1 = generate
    image_unit: np.ndarray | None = None  # [H, W, C] in [0, 1]: an inpainting input as given (kept pixels)
    init_low_res: np.ndarray | None = None  # [1, 3, h, w] (upscale)
    guidance_type: str = "cfg"  # cfg | classifier | clip
    guidance_model: GuidanceModelSpec | None = None  # the package's guidance model used (not cfg)
    guidance_model_scale: np.ndarray | None = None  # float32 [B] scale of its gradient
    seeds: list[int] = field(default_factory=list)  # one per image; image j's draws depend on it only
    latents: np.ndarray | None = None  # float32 [B, C, R, R]: x_T of the first stage (diffusers' latents=)
    latent: bool = False  # a latent package: images are RGB, encoded by its VAE before sampling

    @property
    def batch(self) -> int:
        return self.n_prompts * self.num_images

    def image_seeds(self) -> list[int]:
        """`seeds`, or for a plan made without them, image_seed(seed, j) per image."""
        return list(self.seeds) if self.seeds else [image_seed(self.seed, j) for j in range(self.batch)]


def _str_list(value, what) -> list[str]:
    """One prompt or a list of them, each checked (type, length, valid Unicode) before any work."""
    if isinstance(value, str):
        return [check_prompt(value, what)]
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{what}: empty list")
        if len(value) > MAX_BATCH:
            raise ValueError(f"{what}: {len(value)} prompts; over the batch limit {MAX_BATCH}")
        return [check_prompt(p, f"{what}[{i}]") for i, p in enumerate(value)]
    raise TypeError(f"{what}: expected a string or a list of strings, got {type(value).__name__}")


def _square_image(image, channels: int) -> np.ndarray:
    a = imageio.to_model_array(image, channels, "image")
    h, w = a.shape[2:]
    if h != w:
        raise ValueError(f"image is {w}x{h}; the models make square images, crop or pad it")
    return a


@dataclass(kw_only=True)
class Request:
    """The settings every call kind shares; `plan(package)` validates them (ValueError / TypeError)."""

    kind: ClassVar[str] = "generate"

    prompt: str | list[str] | None = None
    class_label: int | list[int] | None = None
    negative_prompt: str | list[str] | None = None
    num_images: int = 1
    steps: Any = None
    sampler: Any = None
    guidance_scale: Any = None
    guidance_interval: Any = None  # (sigma_lo, sigma_hi): classifier-free guidance only there
    thresholding: Any = None
    eta: Any = None
    seed: int | None = None
    noise_aug_level: Any = None
    output_type: str = "pil"
    progress: bool = True
    callback: Callable | None = None
    guidance_type: str | None = None
    classifier_scale: Any = None
    clip_scale: Any = None
    # diffusers' spellings (docs/from-diffusers.md): aliases of the settings above, or checks
    num_inference_steps: Any = None  # steps
    num_images_per_prompt: int | None = None  # num_images
    generator: Any = None  # seed: an int, one int per image, or a numpy.random.Generator
    height: int | None = None  # must be the package's image size (its networks have fixed shapes)
    width: int | None = None
    latents: Any = None  # x_T of the first stage, [B or 1, C, R, R]
    callback_on_step_end: Callable | None = None  # fn(None, i, t, {"latents": x}) -> dict (see plan)
    callback_on_step_end_tensor_inputs: Any = None  # ["latents"] only

    # ------------------------------------------------------------ what each kind adds

    def stages(self, package: Package) -> list[Stage]:
        """The stages this call runs (all of them, but for upscale)."""
        stages = list(package.stages)
        if stages[0].is_super_resolution:
            raise ValueError(
                f"package {package.name!r} starts with a super-resolution stage; use upscale(image, ...)"
            )
        return stages

    def stage_options(self) -> dict:
        """The kind's own per-stage settings, for `settings.resolve`."""
        return {}

    def add_images(self, plan: Plan) -> None:
        """Validate the kind's images into the plan."""

    # ------------------------------------------------------------ the shared validation

    def plan(self, package: Package) -> Plan:
        """Validate this request against `package`; raises ValueError/TypeError before any work."""
        pkg = package
        stages = self.stages(pkg)
        conditioned = [st.name for st in stages if st.image_condition is not None]
        if conditioned and self.kind != "colorize":
            raise ValueError(
                f"package {pkg.name!r}: stage {conditioned[0]!r} is conditioned on an image "
                f"({stages[0].image_condition} input, Palette-style): use colorize(image, prompt)"
            )
        if self.kind == "colorize" and not conditioned:
            raise ValueError(
                f"package {pkg.name!r} has no stage conditioned on a grey image; colorize needs one "
                f"(docs/model-package.md: image_condition)"
            )
        prompts, negative, labels, n_prompts = self._conditioning(pkg, stages)
        num_images = _alias(
            self.num_images, 1, self.num_images_per_prompt, "num_images", "num_images_per_prompt"
        )
        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
            raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
        num_images = int(num_images)
        if n_prompts * num_images > MAX_BATCH:
            raise ValueError(
                f"{n_prompts} prompt(s) x {num_images} images is over the batch limit {MAX_BATCH}"
            )
        steps = _alias(self.steps, None, self.num_inference_steps, "steps", "num_inference_steps")
        seeds = resolve_seeds(self.seed, self.generator, n_prompts * num_images)
        seed = seeds[0]
        output_type = OUTPUT_ALIASES.get(self.output_type, self.output_type)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"output_type must be one of {[*OUTPUT_TYPES, *OUTPUT_ALIASES]}, got {self.output_type!r}"
            )
        last = stages[-1]
        if output_type != "latent" and pkg.vae is None and last.channels not in (1, 3):
            raise ValueError(
                f"stage {last.name!r} samples {last.channels}-channel arrays (latents) and package "
                f"{pkg.name!r} has no VAE to decode them: use output_type='latent', or import the "
                f"model with its VAE (pydiff import diffusers PIPELINE_DIR OUT)"
            )
        side = pkg.image_resolution
        for what, v in (("height", self.height), ("width", self.width)):
            if v is not None and (isinstance(v, bool) or v != side):
                raise ValueError(
                    f"{what}={v!r}: package {pkg.name!r} makes {side}x{side} images (its networks "
                    f"have fixed shapes); leave {what} out or give {side}"
                )
        if self.callback is not None and not callable(self.callback):
            raise TypeError("callback must be callable(stage, i, t, x)")
        callback = _step_end_callback(self) if self.callback_on_step_end is not None else self.callback

        gtype, gspec, gscale, labels = self._guidance_model(
            pkg, stages, prompts, labels, n_prompts, num_images
        )
        settings = resolve(
            pkg,
            stages,
            n_prompts=n_prompts,
            num_images=num_images,
            steps=steps,
            sampler=self.sampler,
            guidance_scale=self.guidance_scale,
            guidance_interval=self.guidance_interval,
            thresholding=self.thresholding,
            eta=self.eta,
            noise_aug_level=self.noise_aug_level,
            **self.stage_options(),
        )
        for st in stages:  # a class network without a "no class" label: labels given, no CFG
            if st.conditioning != "class" or st.unconditional_class:
                continue
            if labels is None or any(c is None for c in labels):
                raise ValueError(
                    f"stage {st.name!r} has no unconditional class (its manifest's "
                    f"unconditional_class is false): give class_label"
                )
            if settings[st.name].uses_guidance:
                raise ValueError(
                    f"stage {st.name!r} has no unconditional class, so no classifier-free "
                    f"guidance: use guidance_scale=1.0"
                )
            if gspec is not None and gspec.kind == "classifier" and gspec.stage == st.name:
                raise ValueError(
                    f"classifier guidance feeds stage {st.name!r} the unconditional class, which it lacks"
                )
        plan = Plan(
            kind=self.kind,
            stages=stages,
            settings=settings,
            n_prompts=n_prompts,
            num_images=num_images,
            prompts=prompts,
            negative_prompts=negative,
            class_labels=labels,
            seed=int(seed),
            seeds=seeds,
            output_type=output_type,
            progress=bool(self.progress),
            callback=callback,
            guidance_type=gtype,
            guidance_model=gspec,
            guidance_model_scale=gscale,
        )
        if self.latents is not None:
            plan.latents = _latents(self.latents, plan.batch, stages[0])
        if pkg.vae is not None:
            plan.latent = True
            if self.kind not in ("generate", "img2img"):
                raise ValueError(
                    f"{self.kind} on a latent package ({pkg.name!r}, with a VAE) is not supported yet: "
                    f"generate and img2img only"
                )
            if self.kind == "img2img" and pkg.vae.encoder is None:
                raise ValueError(
                    f"img2img on package {pkg.name!r}: its VAE has no encoder (manifest vae.encoder); "
                    f"import the model again with the encoder"
                )
        self.add_images(plan)
        return plan

    def _conditioning(self, pkg: Package, stages: list[Stage]):
        """(prompts, negative prompts, class labels, number of prompts), broadcast to each other."""
        has_text = any(s.conditioning == "text" for s in stages)
        class_stages = [s for s in stages if s.conditioning == "class"]
        prompts = negative = labels = None
        n_from_prompt = n_from_class = None
        if self.prompt is not None:
            if not has_text:
                hint = "; use class_label=" if class_stages else ""
                raise ValueError(f"package {pkg.name!r} is not text-conditional{hint}")
            prompts = _str_list(self.prompt, "prompt")
            n_from_prompt = len(prompts)
        if self.negative_prompt is not None:
            if not has_text:
                raise ValueError(f"negative_prompt: package {pkg.name!r} is not text-conditional")
            negative = _str_list(self.negative_prompt, "negative_prompt")
        # a text package with a classifier guidance model takes class labels for it alone
        labels_for_classifier = (
            self.guidance_type == "classifier"
            and not class_stages
            and pkg.guidance_model("classifier") is not None
        )
        if self.class_label is not None:
            if not class_stages and not labels_for_classifier:
                raise ValueError(
                    f"class_label: package {pkg.name!r} is not class-conditional"
                    + ("; give a prompt" if has_text else "")
                )
            raw = self.class_label
            raw = raw if isinstance(raw, (list, tuple, np.ndarray)) else [raw]
            raw = list(np.asarray(raw, dtype=object).ravel()) if isinstance(raw, np.ndarray) else list(raw)
            if not raw:
                raise ValueError("class_label: empty list")
            labels = []
            for i, c in enumerate(raw):
                if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
                    raise TypeError(f"class_label[{i}]: expected an integer, got {c!r}")
                for s in class_stages:
                    if not 0 <= int(c) < s.num_classes:
                        raise ValueError(
                            f"class_label {int(c)} out of range for stage {s.name!r} (0..{s.num_classes - 1})"
                        )
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
            prompts = [""] * n_prompts  # unconditional
        if negative is not None:
            if len(negative) == 1:
                negative = negative * n_prompts
            elif len(negative) != n_prompts:
                raise ValueError(f"{len(negative)} negative prompts for {n_prompts} prompts")
        if class_stages and labels is None:
            labels = [None] * n_prompts  # unconditional (num_classes)
        elif labels is not None and len(labels) == 1 and n_prompts > 1:
            labels = labels * n_prompts
        return prompts, negative, labels, n_prompts

    def _guidance_model(self, pkg, stages, prompts, labels, n_prompts, num_images):
        """(guidance type, the package's guidance model or None, its [B] scale or None, labels)."""
        gtype = "cfg" if self.guidance_type is None else self.guidance_type
        if gtype not in GUIDANCE_TYPES:
            raise ValueError(f"guidance_type must be one of {list(GUIDANCE_TYPES)}, got {gtype!r}")
        if self.classifier_scale is not None and gtype != "classifier":
            raise ValueError('classifier_scale needs guidance_type="classifier"')
        if self.clip_scale is not None and gtype != "clip":
            raise ValueError('clip_scale needs guidance_type="clip"')
        if gtype == "cfg":
            return gtype, None, None, labels
        gspec = pkg.guidance_model(gtype)
        if gspec is None:
            raise ValueError(
                f"guidance_type {gtype!r}: package {pkg.name!r} has no {gtype} guidance model "
                f"(manifest guidance_models)"
            )
        if gspec.stage not in [s.name for s in stages]:
            raise ValueError(f"guidance_type {gtype!r}: its stage {gspec.stage!r} does not run in this call")
        g = self.guidance_scale
        if g is not None and not (isinstance(g, dict) and gspec.stage not in g):
            raise ValueError(
                f"guidance_scale is the classifier-free scale; with guidance_type {gtype!r} give "
                f"{gtype}_scale (guidance_scale may still set other stages', as a dict)"
            )
        if gtype == "clip" and (prompts is None or all(p == "" for p in prompts)):
            raise ValueError("CLIP guidance needs a prompt (the text to guide to)")
        if gtype == "classifier":
            if (labels is None or all(c is None for c in labels)) and gspec.class_names and prompts:
                labels = _labels_from_prompts(gspec, prompts)
            if labels is None or any(c is None for c in labels):
                raise ValueError(
                    "classifier guidance needs class_label (the class to guide to)"
                    + (
                        ", or a prompt that is one of the classifier's class_names"
                        if gspec.class_names
                        else ""
                    )
                )
            for c in labels:
                if not 0 <= c < gspec.num_classes:
                    raise ValueError(
                        f"class_label {c} out of range for the classifier {gspec.name!r} "
                        f"(0..{gspec.num_classes - 1})"
                    )
        default = gspec.recommended.get("scale", 1.0)
        given = self.classifier_scale if gtype == "classifier" else self.clip_scale
        scale = guidance_array(default if given is None else given, f"{gtype}_scale", n_prompts, num_images)
        return gtype, gspec, scale, labels


def _alias(value, default, alias, name: str, alias_name: str):
    """`value`, or diffusers' `alias` for it; both given (and different) is an error."""
    if alias is None:
        return value
    if value is not None and value != default and value != alias:
        raise ValueError(f"{name}={value!r} and {alias_name}={alias!r}: give one of them")
    return alias


def _step_end_callback(req: "Request"):
    """diffusers' `callback_on_step_end(pipe, i, t, callback_kwargs)` as pydiff's callback: it gets
    None for the pipeline (no diffusers pipeline object here) and {"latents": x}; a "latents" in
    the dict it returns replaces x (the cascade's stages each call it, counting steps from 0)."""
    fn = req.callback_on_step_end
    if req.callback is not None:
        raise ValueError("give callback or callback_on_step_end, not both")
    if not callable(fn):
        raise TypeError("callback_on_step_end must be callable(pipe, i, t, callback_kwargs)")
    inputs = req.callback_on_step_end_tensor_inputs
    if inputs is not None and list(inputs) != ["latents"]:
        raise ValueError(f"callback_on_step_end_tensor_inputs: only ['latents'] is available, got {inputs!r}")

    def callback(stage, i, t, x):
        out = fn(None, i, t, {"latents": x})
        if isinstance(out, dict) and out.get("latents") is not None and out["latents"] is not x:
            return out["latents"]
        return None

    return callback


def _latents(value, batch: int, st: Stage) -> np.ndarray:
    """diffusers' `latents=`: x_T of the first stage, float32 [B or 1, C, R, R], finite."""
    if hasattr(value, "__dlpack__") and not isinstance(value, np.ndarray):
        value = np.from_dlpack(value)
    a = np.asarray(value)
    if a.dtype.kind != "f":
        raise TypeError(f"latents: expected floating point, got {a.dtype}")
    want = (st.channels, st.resolution, st.resolution)
    if a.ndim != 4 or a.shape[1:] != want or a.shape[0] not in (1, batch):
        raise ValueError(
            f"latents: expected shape [{batch} or 1, {', '.join(map(str, want))}], got {a.shape}"
        )
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise ValueError("latents: NaN or Inf")
    return np.ascontiguousarray(np.broadcast_to(a, (batch, *want)))


def _labels_from_prompts(gspec: GuidanceModelSpec, prompts: list[str]) -> list[int]:
    """A prompt that names one of the classifier's classes is that class's label."""
    index = {name: i for i, name in enumerate(gspec.class_names)}
    labels = []
    for i, p in enumerate(prompts):
        if p not in index:
            near = [n for n in gspec.class_names if p and (p in n or n in p)][:3]
            raise ValueError(
                f"prompt[{i}] {p!r} is not one of the {len(index)} class_names of the classifier "
                f"{gspec.name!r}" + (f" (close: {near})" if near else "") + "; give class_label, or list "
                "the names with pydiff.load(...).package.guidance_model('classifier').class_names "
                "or `pydiff info --model PACKAGE --json`"
            )
        labels.append(index[p])
    return labels


@dataclass(kw_only=True)
class GenerateRequest(Request):
    """Images from prompts or class labels (`Pipeline.generate`)."""

    kind: ClassVar[str] = "generate"


@dataclass(kw_only=True)
class InpaintRequest(Request):
    """Regenerate where `mask` is 1 (white), keep the rest of `image` (`Pipeline.inpaint`)."""

    kind: ClassVar[str] = "inpaint"
    image: Any
    mask: Any
    jump_length: Any = None
    jump_n_sample: Any = None
    # "diffusers": white / 1 = regenerate (diffusers' inpainting pipelines, the default);
    # "glide": 1 = keep (GLIDE's mask channel, and OpenAI's edits API, where transparent = regenerate)
    mask_convention: str = "diffusers"

    def stage_options(self) -> dict:
        return {"jump_length": self.jump_length, "jump_n_sample": self.jump_n_sample, "inpaint": True}

    def add_images(self, plan: Plan) -> None:
        if self.image is None:
            raise ValueError("inpaint: an image is required")
        if self.mask_convention not in MASK_CONVENTIONS:
            raise ValueError(
                f"mask_convention must be one of {list(MASK_CONVENTIONS)} ('diffusers': white / 1 = "
                f"regenerate; 'glide': 1 = keep), got {self.mask_convention!r}"
            )
        plan.image = _square_image(self.image, plan.stages[-1].channels)
        plan.image_unit = imageio.to_unit_array(self.image, plan.stages[-1].channels, "image")
        if self.mask is None:
            raise ValueError("inpaint: a mask is required (white / 1 = regenerate)")
        plan.mask = imageio.mask_to_array(self.mask, "mask")
        if self.mask_convention == "glide":
            plan.mask = (1.0 - plan.mask).astype(np.float32)  # 0 and 1 swap exactly
        if plan.mask.shape[2:] != plan.image.shape[2:]:
            raise ValueError(
                f"mask is {plan.mask.shape[3]}x{plan.mask.shape[2]} but the image is "
                f"{plan.image.shape[3]}x{plan.image.shape[2]}; they must match"
            )


@dataclass(kw_only=True)
class Img2ImgRequest(Request):
    """SDEdit: noise `image` to an intermediate time and denoise from there (`Pipeline.img2img`)."""

    kind: ClassVar[str] = "img2img"
    image: Any
    strength: Any = 0.75

    def stage_options(self) -> dict:
        return {"strength": self.strength}

    def add_images(self, plan: Plan) -> None:
        if self.image is None:
            raise ValueError("img2img: an image is required")
        plan.image = _square_image(self.image, 3 if plan.latent else plan.stages[-1].channels)


@dataclass(kw_only=True)
class UpscaleRequest(Request):
    """Super-resolve a user image from a super-resolution stage on (`Pipeline.upscale`)."""

    kind: ClassVar[str] = "upscale"
    image: Any
    stage: str | None = None

    def stages(self, package: Package) -> list[Stage]:
        stages = list(package.stages)
        if self.stage is None:
            sr = [s for s in stages if s.is_super_resolution]
            if not sr:
                raise ValueError(f"package {package.name!r} has no super-resolution stage to upscale with")
            start = sr[0]
        else:
            if self.stage not in package.stage_names:
                raise ValueError(
                    f"unknown stage {self.stage!r}; this package's stages are {package.stage_names}"
                )
            start = package.stage(self.stage)
            if not start.is_super_resolution:
                raise ValueError(f"stage {self.stage!r} is not a super-resolution stage")
        return stages[start.index :]

    def add_images(self, plan: Plan) -> None:
        if self.image is None:
            raise ValueError("upscale: an image is required")
        low = _square_image(self.image, 3)
        plan.init_low_res = imageio.resize(low, plan.stages[0].low_res_resolution)


@dataclass(kw_only=True)
class ColorizeRequest(Request):
    """Palette colorization: a colour image from a grey one (`Pipeline.colorize`), on a package whose
    stage takes the image's luma as its `image_condition` input."""

    kind: ClassVar[str] = "colorize"
    image: Any

    def add_images(self, plan: Plan) -> None:
        if self.image is None:
            raise ValueError("colorize: an image is required")
        try:
            plan.image = _square_image(self.image, 1)  # a grey image as it is
        except ValueError as e:
            if "channel" not in str(e):
                raise
            plan.image = imageio.to_grey(_square_image(self.image, 3))  # a colour one: its BT.601 luma


REQUESTS: dict[str, type[Request]] = {
    r.kind: r for r in (GenerateRequest, InpaintRequest, Img2ImgRequest, UpscaleRequest, ColorizeRequest)
}

__all__ = [
    "Plan",
    "Request",
    "GenerateRequest",
    "InpaintRequest",
    "Img2ImgRequest",
    "UpscaleRequest",
    "ColorizeRequest",
    "REQUESTS",
    "random_seed",
    "image_seed",
    "resolve_seeds",
    "OUTPUT_TYPES",
]

"""The per-stage conditioning of a planned call, built in one place: what each stage network sees
beside x_t, for the conditional and the unconditional pass.

- text: the prompts' token states and mask (per image), the negative prompts' or the empty
  prompt's for the unconditional pass;
- class: the labels, "no class" (index num_classes) for the unconditional pass;
- super-resolution: the previous stage's image, upsampled and noised (noise-conditioning
  augmentation, Ho et al. 2021, Cascaded Diffusion Models, Sec. 4.1) at `noise_level`;
- mask channels (GLIDE-style inpainting stages): the mask and the kept image;
- a guidance model's stage: the network runs unconditionally (classifier: "no class" or the empty
  prompt; CLIP: the empty prompt) and the guidance model carries the condition.
"""

from __future__ import annotations

import numpy as np

from pydiff import imageio
from pydiff.package import Stage
from pydiff.pipeline.requests import Plan

Conditions = dict[str, np.ndarray]


def text_conditions(
    encoder, plan: Plan, empty: tuple[np.ndarray, np.ndarray]
) -> tuple[Conditions, Conditions]:
    """(cond, uncond) token states [B, L, D] and masks [B, L], one row per image, prompt-major.
    `empty`: the encoder's output for [""] (cached by the pipeline)."""
    k = plan.num_images
    states, mask = encoder.encode(plan.prompts)
    cond = {
        "encoder_hidden_states": np.repeat(states, k, axis=0),
        "encoder_attention_mask": np.repeat(mask, k, axis=0),
    }
    if plan.negative_prompts is not None:
        us, um = encoder.encode(plan.negative_prompts)
        us, um = np.repeat(us, k, axis=0), np.repeat(um, k, axis=0)
    else:
        es, em = empty
        us = np.repeat(es, plan.batch, axis=0)
        um = np.repeat(em, plan.batch, axis=0)
    return cond, {"encoder_hidden_states": us, "encoder_attention_mask": um}


def stage_conditions(
    plan: Plan,
    st: Stage,
    text: tuple[Conditions, Conditions] | None,
    *,
    low_res: np.ndarray | None = None,
    noise_level: int | None = None,
    known: np.ndarray | None = None,
    keep: np.ndarray | None = None,
) -> tuple[Conditions, Conditions]:
    """(cond, uncond) for stage `st`: every input of its network but x_t and t, batch B each.

    low_res [B, 3, R, R]: the augmented low-resolution image (super-resolution stages);
    known [B, C, R, R] / keep [B, 1, R, R]: the user image and where it is kept (inpainting).
    """
    B = plan.batch
    R = st.resolution
    cond: Conditions = {}
    uncond: Conditions = {}
    if st.conditioning == "text":
        cond.update(text[0])
        uncond.update(text[1])
    elif st.conditioning == "class":
        labels = [st.num_classes if c is None else c for c in plan.class_labels]
        cond["class_labels"] = np.repeat(np.asarray(labels, np.int64), plan.num_images)
        uncond["class_labels"] = np.full(B, st.num_classes, np.int64)
    if st.is_super_resolution:
        for d in (cond, uncond):
            d["low_res"] = low_res
            d["noise_level"] = np.full(B, noise_level, np.float32)
    if st.image_condition is not None:  # Palette: the image (its grey, resized) in both halves
        for d in (cond, uncond):
            d["image_condition"] = known.astype(np.float32)
    if st.has_mask_channel:
        gen = np.ones((B, 1, R, R), np.float32) if keep is None else 1.0 - keep
        masked = np.zeros((B, 3, R, R), np.float32) if known is None else known * (1.0 - gen)
        for d in (cond, uncond):
            d["mask"] = gen
            d["masked_image"] = masked.astype(np.float32)
    gm = plan.guidance_model
    if gm is not None and gm.stage == st.name:
        # the guidance model, not classifier-free guidance, carries the condition: the network
        # runs on the unconditional inputs
        if st.conditioning == "class":
            cond["class_labels"] = np.full(B, st.num_classes, np.int64)
        elif st.conditioning == "text":
            cond["encoder_hidden_states"] = uncond["encoder_hidden_states"]
            cond["encoder_attention_mask"] = uncond["encoder_attention_mask"]
    return cond, uncond


def guidance_model_target(plan: Plan, st: Stage, text: tuple[Conditions, Conditions] | None):
    """What the guidance model of `st` guides to: class labels [B] (classifier) or the prompts'
    token states and mask (CLIP); None when no guidance model guides this stage."""
    gm = plan.guidance_model
    if gm is None or gm.stage != st.name:
        return None
    if gm.kind == "classifier":
        return (np.repeat(np.asarray(plan.class_labels, np.int64), plan.num_images),)
    return text[0]["encoder_hidden_states"], text[0]["encoder_attention_mask"]


def resized(plan: Plan, st: Stage) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(known [B, C, R, R], keep [B, 1, R, R]): the user image at the stage's resolution and where it
    is kept (a low-resolution pixel is regenerated when at least half of it is)."""
    B, R = plan.batch, st.resolution
    known = keep = None
    if plan.image is not None:
        known = np.repeat(imageio.resize(plan.image, R), B, axis=0)
    if plan.mask is not None:
        m = imageio.resize(plan.mask, R) if plan.mask.shape[2] != R else plan.mask
        m = (m >= 0.5).astype(np.float32)
        keep = np.repeat(1.0 - m, B, axis=0)  # 1 where the original is kept
    return known, keep

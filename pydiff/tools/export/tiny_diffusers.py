"""Tiny random-weight diffusers components built from configs (no hub access), for the tests and
benchmarks that compare pydiff with diffusers' own pipelines: a CLIP tokenizer with a byte-level
vocabulary, UNets, a CLIP text model and an AutoencoderKL small enough to run in seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path


def _libs():
    import diffusers  # the components are diffusers' and transformers' own classes
    import torch
    import transformers

    return torch, diffusers, transformers


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's byte-level alphabet."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer with the byte alphabet and a few merges (vocab 525 tokens)."""
    torch, diffusers, transformers = _libs()
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [
        "r e",
        "re d</w>",
        "c i",
        "ci r",
        "cir c",
        "circ l",
        "circl e</w>",
        "b l",
        "bl u",
        "blu e</w>",
        "o n</w>",
    ]
    for m in merges:
        a, b = m.split()
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return transformers.CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77
    )


def tiny_unet2d(**kw):
    """A UNet2DModel (8x8, channels (32, 32), one attention level); `kw` overrides its config."""
    torch, diffusers, transformers = _libs()
    torch.manual_seed(0)
    cfg = dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    cfg.update(kw)
    return diffusers.UNet2DModel(**cfg)


def sd_components(tmp: Path, *, scaling_factor=0.18215, scheduler=None, size: int = 8, width: int = 32):
    """StableDiffusionPipeline's keyword arguments: a UNet on `size`x`size` latents, a two-layer CLIP
    text model, an AutoencoderKL (x2) and the tiny tokenizer (written under `tmp`), a DDIM scheduler."""
    torch, diffusers, transformers = _libs()
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(width, 2 * width),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=2 * size,
        scaling_factor=scaling_factor,
    )
    te = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-5,
            num_attention_heads=4,
            num_hidden_layers=2,
            pad_token_id=1,
            vocab_size=1000,
        )
    )
    sched = scheduler or diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=te,
        tokenizer=tiny_clip_tokenizer(tmp / "tok"),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


__all__ = ["tiny_clip_tokenizer", "tiny_unet2d", "sd_components"]

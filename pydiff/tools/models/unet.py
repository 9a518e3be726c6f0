"""A small conditional U-Net eps-predictor (DDPM, Ho et al. 2020; conditioning as in Imagen,
GLIDE, SR3 and Palette) that exports to ONNX with the input names of docs/model-package.md.

Conditioning:
- time: sinusoidal embedding -> MLP -> added in every residual block;
- class: learnt embedding (index `num_classes` = "no class") added to the time embedding;
- text: token embeddings [B, L, D] with a mask [B, L]; the masked-mean pooled embedding is added
  to the time embedding, and cross-attention layers attend over the tokens (Imagen);
- image (SR3 / Palette / GLIDE): `low_res` (and `mask`, `masked_image`) concatenated to the input
  channels; `noise_level` (the augmentation timestep of `low_res`) embedded like the time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class UNetConfig:
    in_channels: int = 3  # channels of `sample` (the output has the same number)
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = (1, 2)  # levels (0 = full resolution) with attention
    self_attention: bool = True  # self-attention at attn_levels (off for crop-trained SR)
    head_dim: int = 32
    dropout: float = 0.0
    num_groups: int = 8
    conditioning: str = "none"  # "none" | "class" | "text"
    num_classes: int | None = None
    text_dim: int | None = None  # D of encoder_hidden_states
    cross_attention: bool = True  # text: cross-attention at attn_levels
    low_res: bool = False  # SR: concat `low_res` and embed `noise_level`
    inpaint: bool = False  # concat `mask` (1 ch) and `masked_image` (3 ch)
    image_condition: int = 0  # Palette: concat `image_condition` (this many channels), e.g. 1 grey

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attn_levels"] = list(self.attn_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        d = dict(d)
        d["channel_mult"] = tuple(d["channel_mult"])
        d["attn_levels"] = tuple(d["attn_levels"])
        return cls(**d)

    def input_names(self) -> list[str]:
        """The stage inputs in the package's fixed names, in forward() order."""
        names = ["sample", "timestep"]
        if self.conditioning == "text":
            names += ["encoder_hidden_states", "encoder_attention_mask"]
        elif self.conditioning == "class":
            names += ["class_labels"]
        if self.low_res:
            names += ["low_res", "noise_level"]
        if self.inpaint:
            names += ["mask", "masked_image"]
        if self.image_condition:
            names += ["image_condition"]
        return names


PRESETS: dict[str, UNetConfig] = {
    # 8x8 grey digits, 10 classes.
    "digits": UNetConfig(
        in_channels=1,
        base_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=2,
        attn_levels=(1,),
        conditioning="class",
        num_classes=10,
    ),
    # shapes base stage, 16x16, text cross-attention at 8x8 and 4x4.
    "shapes-base": UNetConfig(
        in_channels=3,
        base_channels=48,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_levels=(1, 2),
        conditioning="text",
        text_dim=384,
    ),
    # shapes 16->64 super-resolution; trained on 32x32 crops, so no self-attention; the text
    # enters through the pooled embedding and per-pixel cross-attention at the lowest level.
    "shapes-sr64": UNetConfig(
        in_channels=3,
        base_channels=32,
        channel_mult=(1, 2, 3),
        num_res_blocks=1,
        attn_levels=(2,),
        self_attention=False,
        conditioning="text",
        text_dim=384,
        low_res=True,
    ),
    # Palette colorization at 64x64: the colour image from its grey (1 channel concatenated); like
    # the SR stage, fully convolutional and trained on 32x32 crops, the caption through the pooled
    # embedding and cross-attention at the lowest level (dropped half the time: grey alone works)
    "shapes-colorize": UNetConfig(
        in_channels=3,
        base_channels=32,
        channel_mult=(1, 2, 3),
        num_res_blocks=1,
        attn_levels=(2,),
        self_attention=False,
        conditioning="text",
        text_dim=384,
        image_condition=1,
    ),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of float timesteps [B] (Vaswani et al. 2017; DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


def _attention(q, k, v, heads: int, bias=None):
    """Multi-head attention: q [B, N, C], k, v [B, M, C], bias [B, 1, 1, M] -> [B, N, C]."""
    b, n, c = q.shape
    m = k.shape[1]
    d = c // heads
    q = q.reshape(b, n, heads, d).transpose(1, 2)
    k = k.reshape(b, m, heads, d).transpose(1, 2)
    v = v.reshape(b, m, heads, d).transpose(1, 2)
    w = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(d))
    if bias is not None:
        w = w + bias
    w = torch.softmax(w, dim=-1)
    return torch.matmul(w, v).transpose(1, 2).reshape(b, n, c)


class AttnBlock(nn.Module):
    """Self-attention over pixels and/or cross-attention from pixels to text tokens."""

    def __init__(self, ch: int, head_dim: int, groups: int, self_attn: bool, ctx_dim: int | None):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.self_attn = self_attn
        if self_attn:
            self.norm = nn.GroupNorm(groups, ch)
            self.qkv = nn.Linear(ch, 3 * ch)
            self.proj = nn.Linear(ch, ch)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        self.cross = ctx_dim is not None
        if self.cross:
            self.norm_x = nn.GroupNorm(groups, ch)
            self.q = nn.Linear(ch, ch)
            self.kv = nn.Linear(ctx_dim, 2 * ch)
            self.proj_x = nn.Linear(ch, ch)
            nn.init.zeros_(self.proj_x.weight)
            nn.init.zeros_(self.proj_x.bias)

    def forward(self, x, ctx=None, ctx_bias=None):
        b, c, h, w = x.shape
        if self.self_attn:
            t = self.norm(x).reshape(b, c, h * w).transpose(1, 2)
            q, k, v = self.qkv(t).chunk(3, dim=-1)
            x = x + self.proj(_attention(q, k, v, self.heads)).transpose(1, 2).reshape(b, c, h, w)
        if self.cross and ctx is not None:
            t = self.norm_x(x).reshape(b, c, h * w).transpose(1, 2)
            k, v = self.kv(ctx).chunk(2, dim=-1)
            out = _attention(self.q(t), k, v, self.heads, ctx_bias)
            x = x + self.proj_x(out).transpose(1, 2).reshape(b, c, h, w)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.base_channels
        temb = 4 * ch
        g = cfg.num_groups
        self.time_mlp = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        if cfg.conditioning == "class":
            self.class_emb = nn.Embedding(cfg.num_classes + 1, temb)
        ctx_dim = None
        if cfg.conditioning == "text":
            self.pool_proj = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, temb))
            if cfg.cross_attention:
                self.ctx_norm = nn.LayerNorm(cfg.text_dim)
                ctx_dim = cfg.text_dim
        if cfg.low_res:
            self.noise_level_mlp = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        cin = cfg.in_channels + (3 if cfg.low_res else 0) + (4 if cfg.inpaint else 0) + cfg.image_condition
        self.conv_in = nn.Conv2d(cin, ch, 3, padding=1)

        def attn(c, level):
            if level not in cfg.attn_levels:
                return None
            if not cfg.self_attention and ctx_dim is None:
                return None
            return AttnBlock(c, cfg.head_dim, g, cfg.self_attention, ctx_dim)

        self.down = nn.ModuleList()
        skips = [ch]
        cur = ch
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                out = ch * mult
                self.down.append(
                    nn.ModuleList(
                        [ResBlock(cur, out, temb, g, cfg.dropout), attn(out, level) or nn.Identity()]
                    )
                )
                cur = out
                skips.append(cur)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)
        last = len(cfg.channel_mult) - 1
        self.mid1 = ResBlock(cur, cur, temb, g, cfg.dropout)
        self.mid_attn = (
            AttnBlock(cur, cfg.head_dim, g, cfg.self_attention, ctx_dim)
            if (cfg.self_attention or ctx_dim is not None)
            else None
        )
        self.mid2 = ResBlock(cur, cur, temb, g, cfg.dropout)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                out = ch * mult
                self.up.append(
                    nn.ModuleList(
                        [
                            ResBlock(cur + skips.pop(), out, temb, g, cfg.dropout),
                            attn(out, level) or nn.Identity(),
                        ]
                    )
                )
                cur = out
            if level != 0:
                self.up.append(
                    nn.ModuleList(
                        [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cur, cur, 3, padding=1)]
                    )
                )
        del last
        self.norm_out = nn.GroupNorm(g, cur)
        self.conv_out = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        class_labels=None,
        low_res=None,
        noise_level=None,
        mask=None,
        masked_image=None,
        image_condition=None,
    ):
        """sample [B, C, H, W], timestep [B] float -> eps prediction [B, C, H, W]."""
        cfg = self.cfg
        emb = self.time_mlp(timestep_embedding(timestep, cfg.base_channels))
        ctx = ctx_bias = None
        if cfg.conditioning == "class":
            emb = emb + self.class_emb(class_labels)
        elif cfg.conditioning == "text":
            m = encoder_attention_mask.to(encoder_hidden_states.dtype)
            pooled = (encoder_hidden_states * m[:, :, None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)
            emb = emb + self.pool_proj(pooled)
            if cfg.cross_attention:
                ctx = self.ctx_norm(encoder_hidden_states)
                ctx_bias = ((1.0 - m) * -1e4)[:, None, None, :]  # padding tokens get no weight
        x = sample
        if cfg.low_res:
            emb = emb + self.noise_level_mlp(timestep_embedding(noise_level, cfg.base_channels))
            x = torch.cat([x, low_res], dim=1)
        if cfg.inpaint:
            x = torch.cat([x, mask, masked_image], dim=1)
        if cfg.image_condition:
            x = torch.cat([x, image_condition], dim=1)
        h = self.conv_in(x)
        hs = [h]
        for blk in self.down:
            if len(blk) == 1:
                h = blk[0](h)
            else:
                h = blk[0](h, emb)
                if isinstance(blk[1], AttnBlock):
                    h = blk[1](h, ctx, ctx_bias)
            hs.append(h)
        h = self.mid1(h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h, ctx, ctx_bias)
        h = self.mid2(h, emb)
        for blk in self.up:
            if isinstance(blk[0], nn.Upsample):
                h = blk[1](blk[0](h))
            else:
                h = blk[0](torch.cat([h, hs.pop()], dim=1), emb)
                if isinstance(blk[1], AttnBlock):
                    h = blk[1](h, ctx, ctx_bias)
        return self.conv_out(F.silu(self.norm_out(h)))


def build_model(cfg: UNetConfig | dict) -> UNet:
    if isinstance(cfg, dict):
        cfg = UNetConfig.from_dict(cfg)
    return UNet(cfg)

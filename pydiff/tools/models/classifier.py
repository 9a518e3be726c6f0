"""A noise-aware classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, Sec. 4),
and the module that exports its input gradient grad_x log p(y | x_t, t) to ONNX.

The classifier is a small conv net: SiLU activations (smooth, so that its input gradient is
informative), the time entering every conv block through a sinusoidal embedding -> MLP -> per-channel
scale and shift (as the U-Net's FiLM-style time conditioning), global mean pooling, a linear head.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ClassifierConfig:
    in_channels: int = 1
    resolution: int = 8
    num_classes: int = 10
    channels: tuple[int, ...] = (32, 64, 64)  # per conv block; block k > 0 halves the size if it can
    time_dim: int = 64

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        d = dict(d)
        d["channels"] = tuple(d["channels"])
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of float timesteps t [B] -> [B, dim] (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=1)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.film = nn.Linear(time_dim, 2 * cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride=stride) if (cin != cout or stride != 1) else nn.Identity()

    def forward(self, x, temb):
        scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.conv1(x))
        h = h * (1 + scale) + shift
        h = F.silu(self.conv2(h))
        return self.skip(x) + h


class NoisyClassifier(nn.Module):
    """logits [B, num_classes] = f(x_t [B, C, H, W], t [B])."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.time_dim, cfg.time_dim), nn.SiLU(), nn.Linear(cfg.time_dim, cfg.time_dim)
        )
        blocks, cin, size = [], cfg.in_channels, cfg.resolution
        for k, c in enumerate(cfg.channels):
            stride = 2 if k > 0 and size >= 4 else 1
            size = (size + stride - 1) // stride
            blocks.append(_Block(cin, c, cfg.time_dim, stride))
            cin = c
        self.blocks = nn.ModuleList(blocks)
        self.final_size = size  # spatial side of the last block's output
        self.head = nn.Linear(cin, cfg.num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.cfg.time_dim))
        h = x
        for b in self.blocks:
            h = b(h, temb)
        return self.head(F.silu(h).mean(dim=(2, 3)))


def _dsilu(a: torch.Tensor) -> torch.Tensor:
    """d silu(a) / da = sigmoid(a) (1 + a (1 - sigmoid(a)))."""
    s = torch.sigmoid(a)
    return s * (1 + a * (1 - s))


def _conv_backward(g: torch.Tensor, conv: nn.Conv2d, in_size: tuple[int, int]) -> torch.Tensor:
    """grad of a conv's input from the grad of its output (the transposed convolution)."""
    sh, sw = conv.stride
    ph, pw = conv.padding
    kh, kw = conv.kernel_size
    oh, ow = g.shape[2], g.shape[3]
    # output_padding recovers the input rows/columns a strided conv never reached with its last step
    op = (in_size[0] - ((oh - 1) * sh - 2 * ph + kh), in_size[1] - ((ow - 1) * sw - 2 * pw + kw))
    return F.conv_transpose2d(g, conv.weight, stride=conv.stride, padding=conv.padding, output_padding=op)


def _forward_saved(c: NoisyClassifier, sample, timestep):
    """The classifier's trunk, keeping what the explicit backward pass needs."""
    temb = c.time_mlp(timestep_embedding(timestep, c.cfg.time_dim))
    h = sample
    saved = []
    for b in c.blocks:
        scale, shift = b.film(temb)[:, :, None, None].chunk(2, dim=1)
        a1 = b.conv1(h)
        h1 = F.silu(a1) * (1 + scale) + shift
        a2 = b.conv2(h1)
        saved.append((h, a1, scale, a2))
        h = b.skip(h) + F.silu(a2)
    return h, saved, F.silu(h).mean(dim=(2, 3))


def _backward_from_pooled(c: NoisyClassifier, h, saved, g_pooled):
    """grad of the input [B, C, H, W] from the grad of the pooled features [B, C_last]."""
    g = g_pooled[:, :, None, None] * _dsilu(h) * (1.0 / (c.final_size * c.final_size))
    for b, (x_in, a1, scale, a2) in zip(reversed(c.blocks), reversed(saved)):
        size = (x_in.shape[2], x_in.shape[3])
        g_a2 = g * _dsilu(a2)
        g_a1 = _conv_backward(g_a2, b.conv2, (a1.shape[2], a1.shape[3])) * (1 + scale) * _dsilu(a1)
        g_x = _conv_backward(g_a1, b.conv1, size)
        g = g_x + (_conv_backward(g, b.skip, size) if isinstance(b.skip, nn.Conv2d) else g)
    return g


class ClassifierGradient(nn.Module):
    """forward(sample [B, C, H, W], timestep [B], class_labels int64 [B]) ->
    (grad_x log p(y | x_t, t) [B, C, H, W], log p(y | x_t, t) [B]).

    The input gradient for classifier guidance (Dhariwal & Nichol 2021, Algorithm 1), written out
    as an explicit backward pass (transposed convolutions, SiLU derivatives, softmax), because the
    TorchScript exporter cannot trace torch.autograd.grad (it would bake the forward activations in
    as constants). tests/test_guidance_models.py checks it against torch.autograd.
    """

    def __init__(self, classifier: NoisyClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, sample, timestep, class_labels):
        c = self.classifier
        h, saved, pooled = _forward_saved(c, sample, timestep)
        logp = torch.log_softmax(c.head(pooled), dim=1)
        onehot = F.one_hot(class_labels.long(), c.cfg.num_classes).to(logp.dtype)
        sel = (logp * onehot).sum(1)
        # d log softmax(z)[y] / dz = onehot(y) - softmax(z)
        g_pooled = (onehot - torch.exp(logp)) @ c.head.weight
        return _backward_from_pooled(c, h, saved, g_pooled), sel


class NoisyCLIP(nn.Module):
    """A CLIP (Radford et al. 2021) trained on noised images, as GLIDE's noise-aware CLIP:
    image side f(x_t, t) = normalize(NoisyClassifier(x_t, t)) (its head is the projection, with
    `num_classes` = the embedding size), text side g(c) = normalize(W pool(states, mask) + b), the
    masked mean of the frozen text encoder's token states through a learned projection."""

    def __init__(self, image_cfg: ClassifierConfig, text_dim: int):
        super().__init__()
        self.image = NoisyClassifier(image_cfg)
        self.text_proj = nn.Linear(text_dim, image_cfg.num_classes)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, states, mask):
        m = mask.to(states.dtype)[:, :, None]
        pooled = (states * m).sum(1) / m.sum(1).clamp_min(1.0)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def encode_image(self, x, t):
        return F.normalize(self.image(x, t), dim=-1)


class CLIPGradient(nn.Module):
    """forward(sample, timestep, encoder_hidden_states [B, L, D], encoder_attention_mask [B, L]) ->
    (grad_x f(x_t, t) . g(c) [B, C, H, W], f(x_t, t) . g(c) [B]): CLIP guidance (GLIDE, Nichol et
    al. 2022, Sec. 3.2), the cosine similarity's gradient written out like ClassifierGradient's."""

    def __init__(self, clip: NoisyCLIP):
        super().__init__()
        self.clip = clip

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask):
        c = self.clip.image
        txt = self.clip.encode_text(encoder_hidden_states, encoder_attention_mask)  # [B, E], unit
        h, saved, pooled = _forward_saved(c, sample, timestep)
        z = c.head(pooled)
        n = torch.sqrt((z * z).sum(1, keepdim=True))
        zh = z / n
        sim = (zh * txt).sum(1)
        # d (z / |z|) . u / dz = (u - ((z / |z|) . u) z / |z|) / |z|
        g_z = (txt - sim[:, None] * zh) / n
        return _backward_from_pooled(c, h, saved, g_z @ c.head.weight), sim


def autograd_gradient(classifier: NoisyClassifier, sample, timestep, class_labels):
    """The same (grad, log p) by torch.autograd: the reference ClassifierGradient is checked against."""
    x = sample.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(classifier(x, timestep), dim=1)
    sel = logp.gather(1, class_labels[:, None].long())[:, 0]
    (grad,) = torch.autograd.grad(sel.sum(), x)
    return grad, sel.detach()


def autograd_clip_gradient(clip: NoisyCLIP, sample, timestep, states, mask):
    """The same (grad, similarity) by torch.autograd: the reference CLIPGradient is checked against."""
    x = sample.detach().clone().requires_grad_(True)
    sim = (clip.encode_image(x, timestep) * clip.encode_text(states, mask)).sum(1)
    (grad,) = torch.autograd.grad(sim.sum(), x)
    return grad, sim.detach()

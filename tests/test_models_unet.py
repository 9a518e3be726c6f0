"""The conditional U-Net: shapes, conditioning paths, and that each kind learns a few steps."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from pydiff.tools.models import PRESETS, UNet, UNetConfig  # noqa: E402


def tiny(**kw) -> UNetConfig:
    base = dict(
        in_channels=3,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_levels=(1,),
        head_dim=8,
        num_groups=4,
    )
    base.update(kw)
    return UNetConfig(**base)


KINDS = {
    "none": tiny(),
    "class": tiny(in_channels=1, conditioning="class", num_classes=3),
    "text": tiny(conditioning="text", text_dim=12),
    "sr": tiny(conditioning="text", text_dim=12, low_res=True, self_attention=False),
    "inpaint": tiny(conditioning="text", text_dim=12, inpaint=True),
}


def inputs(cfg: UNetConfig, b=4, r=8, seed=0):
    """Named inputs for a batch of b images of r x r."""
    g = torch.Generator().manual_seed(seed)
    kw = {
        "sample": torch.randn(b, cfg.in_channels, r, r, generator=g),
        "timestep": torch.rand(b, generator=g) * 999,
    }
    if cfg.conditioning == "class":
        kw["class_labels"] = torch.arange(b) % (cfg.num_classes + 1)
    if cfg.conditioning == "text":
        kw["encoder_hidden_states"] = torch.randn(b, 5, cfg.text_dim, generator=g)
        kw["encoder_attention_mask"] = (
            torch.arange(5)[None] < torch.tensor([[2], [5], [3], [4]])[:b]
        ).float()
    if cfg.low_res:
        kw["low_res"] = torch.randn(b, 3, r, r, generator=g)
        kw["noise_level"] = torch.rand(b, generator=g) * 100
    if cfg.inpaint:
        kw["mask"] = (torch.rand(b, 1, r, r, generator=g) > 0.5).float()
        kw["masked_image"] = torch.randn(b, 3, r, r, generator=g)
    return kw


@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_shape_and_input_names(kind):
    cfg = KINDS[kind]
    m = UNet(cfg)
    kw = inputs(cfg)
    assert list(kw) == cfg.input_names()
    assert m(**kw).shape == kw["sample"].shape
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg


def test_padding_tokens_are_ignored():
    cfg = KINDS["text"]
    torch.manual_seed(0)
    m = UNet(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        kw = inputs(cfg)
        a = m(**kw)
        kw["encoder_hidden_states"][0, 2:] = torch.randn(3, cfg.text_dim)  # sample 0 has 2 real tokens
        b = m(**kw)
    torch.testing.assert_close(a[0], b[0])


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_learns(kind):
    """L_simple on one fixed tiny batch falls within a few steps."""
    cfg = KINDS[kind]
    torch.manual_seed(0)
    m = UNet(cfg)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    kw = inputs(cfg, seed=1)
    x0 = kw.pop("sample")
    g = torch.Generator().manual_seed(2)
    eps = torch.randn(x0.shape, generator=g)
    xt = 0.6 * x0 + 0.8 * eps
    losses = []
    for _ in range(12):
        loss = ((m(xt, **kw) - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_presets_build():
    for name, cfg in PRESETS.items():
        assert UNet(cfg).cfg is cfg, name

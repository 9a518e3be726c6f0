"""`pydiff bench` on a tiny package: the pipeline's cascade equals the diffusers-style torch loop."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnx")
pytest.importorskip("torch")
pytest.importorskip("diffusers")

from pydiff.tools import bench  # noqa: E402
from pydiff.tools.testing import make_tiny_package, tiny_torch_modules  # noqa: E402


def _tolerance(thresholding: str) -> float:
    """How far the two cascades' images may be apart. The peer runs torch's networks, pydiff ONNX
    Runtime's, about 2e-7 apart. The tiny package's cosine schedule has sqrt(alpha_bar) = 4.9e-5 at
    t = 999, so an epsilon network's x0 there carries that difference times 2e4, and the x0 values
    below the dynamic threshold's clamp keep it: diffusers' own step moves by 1e-3 when it is fed ORT's
    outputs instead of torch's (2026-12-03). Static clipping and no thresholding keep 1e-4."""
    return 2e-3 if thresholding == "dynamic" else 1e-4


@pytest.mark.parametrize(
    "sampler,prediction_type,guidance,thresholding",
    [
        ("ddim", "epsilon", 3.0, "dynamic"),
        ("dpmpp_2m", "epsilon", 3.0, "dynamic"),
        # the bundled SR stage's case: v-prediction without classifier-free guidance (diffusers then
        # runs the conditional half only, `do_classifier_free_guidance` false)
        ("dpmpp_2m", "v_prediction", 1.0, "dynamic"),
        ("ddim", "v_prediction", 3.0, "dynamic"),
        # static clipping: DDIM's clip_sample; DPM-Solver++ has none in diffusers (the peer uses its
        # thresholding with sample_max_value 1, the same clip), so without it the images differ by ~1
        ("dpmpp_2m", "epsilon", 3.0, "static"),
        ("ddim", "v_prediction", 3.0, "static"),
        ("dpmpp_2m", "v_prediction", 1.0, "static"),
    ],
)
def test_bench_report_and_agreement_with_diffusers(
    tmp_path, sampler, prediction_type, guidance, thresholding
):
    from pydiff import ops

    if not ops.native_available():
        pytest.skip("the benchmark times the native core")
    pkg = make_tiny_package(tmp_path / "tiny", sampler=sampler, steps=4, prediction_type=prediction_type)
    rep = bench.run_benchmark(
        pkg,
        modules=tiny_torch_modules(pkg),
        batch=2,
        repeats=1,
        warmup=0,
        guidance_scale=guidance,
        thresholding=thresholding,
        progress=False,
    )
    assert all(
        s["guidance_scale"] == guidance and s["thresholding"] == thresholding for s in rep["stages"].values()
    )
    # same x_T, augmentation noise, networks and settings: the cascades agree (CFG, dynamic
    # thresholding, noise-conditioning augmentation, bilinear upsampling, the sampler)
    assert rep["max_abs_image_diff"] < _tolerance(thresholding), rep["max_abs_image_diff"]
    for side in ("pydiff", "torch"):
        d = rep["sides"][side]
        assert d["seconds_per_batch"] > 0 and d["images_per_s"] > 0
        assert set(d["stages"]) == {"base", "sr16"}
    assert rep["speedup"] > 0
    assert "speedup" in bench.format_table(rep)
    json.dumps(rep)
    bench.bar_chart(rep, tmp_path / "chart.png")
    from PIL import Image

    with Image.open(tmp_path / "chart.png") as im:
        assert im.size[0] > 100


def test_peer_runs_the_unconditional_half_only_with_guidance(tmp_path):
    """Like diffusers' pipelines, the peer evaluates the network on B samples per step without
    guidance and on 2B (conditional + unconditional) with it: what the timings compare."""
    import torch

    from pydiff import ops

    if not ops.native_available():
        pytest.skip("the benchmark times the native core")
    pkg = make_tiny_package(tmp_path / "tiny", sampler="dpmpp_2m", steps=3)
    seen: dict = {}

    class Recording(torch.nn.Module):
        def __init__(self, name, inner):
            super().__init__()
            self.name, self.inner = name, inner

        def forward(self, sample, **kw):
            seen.setdefault(self.name, set()).add(sample.shape[0])
            return self.inner(sample, **kw)

    mods = {k: Recording(k, m) for k, m in tiny_torch_modules(pkg).items()}
    for g, batches in ((1.0, {3}), (3.0, {6})):
        seen.clear()
        rep = bench.run_benchmark(
            pkg, modules=mods, batch=3, repeats=1, warmup=0, guidance_scale=g, progress=False
        )
        assert rep["max_abs_image_diff"] < _tolerance("dynamic")
        # (batch 2: check_same_networks' one forward pass per stage on random inputs)
        assert {k: v - {2} for k, v in seen.items()} == {"base": batches, "sr16": batches}, (g, seen)


def test_static_clip_to_another_range_with_dpmpp_is_refused(tmp_path):
    pkg = make_tiny_package(tmp_path / "tiny", sampler="dpmpp_2m", steps=2, thresholding="static")
    m = json.loads((pkg / "manifest.json").read_text())
    for st in m["stages"]:
        st["recommended"]["clip_sample_range"] = 0.5
    (pkg / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        ValueError, match=r"static clipping to \+-0\.5 with dpmpp_2m has no diffusers equivalent"
    ):
        bench.run_benchmark(
            pkg, modules=tiny_torch_modules(pkg), batch=1, repeats=1, warmup=0, progress=False
        )

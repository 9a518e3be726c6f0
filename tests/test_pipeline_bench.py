"""`pydiff bench` on a tiny package: the pipeline's cascade equals the diffusers-style torch loop."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("torch")
pytest.importorskip("diffusers")

from pydiff import bench  # noqa: E402
from pydiff.testing import make_tiny_package, tiny_torch_modules  # noqa: E402


@pytest.mark.parametrize("sampler,prediction_type,guidance,thresholding", [
    ("ddim", "epsilon", 3.0, "dynamic"), ("dpmpp_2m", "epsilon", 3.0, "dynamic"),
    # the bundled SR stage's case: v-prediction without classifier-free guidance (diffusers then
    # runs the conditional half only, `do_classifier_free_guidance` false)
    ("dpmpp_2m", "v_prediction", 1.0, "dynamic"), ("ddim", "v_prediction", 3.0, "dynamic"),
    # static clipping: DDIM's clip_sample; DPM-Solver++ has none in diffusers (the peer uses its
    # thresholding with sample_max_value 1, the same clip), so without it the images differ by ~1
    ("dpmpp_2m", "epsilon", 3.0, "static"), ("ddim", "v_prediction", 3.0, "static"),
    ("dpmpp_2m", "v_prediction", 1.0, "static")])
def test_bench_report_and_agreement_with_diffusers(tmp_path, sampler, prediction_type, guidance,
                                                   thresholding):
    from pydiff import ops

    if not ops.native_available():
        pytest.skip("the benchmark times the native core")
    pkg = make_tiny_package(tmp_path / "tiny", sampler=sampler, steps=4, prediction_type=prediction_type)
    rep = bench.run_benchmark(pkg, modules=tiny_torch_modules(pkg), batch=2, repeats=1, warmup=0,
                              guidance_scale=guidance, thresholding=thresholding, progress=False)
    assert all(s["guidance_scale"] == guidance and s["thresholding"] == thresholding
               for s in rep["stages"].values())
    # same x_T, augmentation noise, networks and settings: the cascades agree (CFG, dynamic
    # thresholding, noise-conditioning augmentation, bilinear upsampling, the sampler)
    assert rep["max_abs_image_diff"] < 1e-4, rep["max_abs_image_diff"]
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

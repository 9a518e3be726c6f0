"""The mask-channel (GLIDE-style) inpainting training task: its masks, its inputs, and the
fine-tune's start from an exported stage."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pydiff import imageio  # noqa: E402
from pydiff.package import bundled_path  # noqa: E402
from pydiff.tools.data import shapes as S  # noqa: E402
from pydiff.tools.training.from_package import torch_module  # noqa: E402
from pydiff.tools.training.tasks import MASK_KINDS, mask_at, occlusion_masks  # noqa: E402
from pydiff.tools.training.trainer import TrainConfig, Trainer, init_weights  # noqa: E402

BASE = bundled_path("shapes") / "base.onnx"
TEXT = str(bundled_path("shapes") / "text_encoder")


def test_masks_are_binary_and_cover_every_kind():
    rng = np.random.default_rng(0)
    specs = S.sample_specs(rng, 400)
    m = occlusion_masks(rng, specs)
    assert m.shape == (400, 1, 64, 64) and m.dtype == np.float32
    assert set(np.unique(m)) <= {0.0, 1.0}
    share = m.mean(axis=(1, 2, 3))
    assert np.mean(share == 1.0) > 0.05  # the whole image: plain generation
    assert np.mean((share > 0) & (share < 1)) > 0.8  # partial masks
    assert len(MASK_KINDS) == 6


def test_a_stage_mask_is_made_as_the_pipeline_makes_it():
    # pydiff.pipeline.conditioning.resized: imageio.resize, then regenerated where >= 0.5
    rng = np.random.default_rng(1)
    m64 = occlusion_masks(rng, S.sample_specs(rng, 8))
    np.testing.assert_array_equal(mask_at(m64, 16), (imageio.resize(m64, 16) >= 0.5).astype(np.float32))
    assert mask_at(m64, 64) is m64


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):  # the caption embeddings are encoded once for the module
    return tmp_path_factory.mktemp("inpaint-run")


def test_the_batch_holds_the_masked_image(run_dir):
    cfg = TrainConfig.for_task("shapes-base-inpaint", text_encoder=TEXT)
    tr = Trainer(cfg, run_dir)
    b = tr.task.batch(np.random.default_rng(2), 6)
    assert b["mask"].shape == (6, 1, 16, 16) and b["masked_image"].shape == (6, 3, 16, 16)
    torch.testing.assert_close(b["masked_image"], b["x0"] * (1 - b["mask"]), rtol=0, atol=0)
    sr = Trainer(TrainConfig.for_task("shapes-sr64-inpaint", text_encoder=TEXT, batch_size=4), run_dir)
    b = sr.task.batch(np.random.default_rng(3), 4)
    assert b["mask"].shape == (4, 1, 32, 32)  # cropped with x0 and low_res
    torch.testing.assert_close(b["masked_image"], b["x0"] * (1 - b["mask"]), rtol=0, atol=0)


def test_the_fine_tune_starts_as_the_network_it_came_from(run_dir):
    cfg = TrainConfig.for_task("shapes-base-inpaint", text_encoder=TEXT, init_from=str(BASE))
    tr = Trainer(cfg, run_dir)
    src = torch_module(BASE)
    b = tr.task.batch(np.random.default_rng(4), 4)
    t = torch.tensor([10.0, 300.0, 600.0, 990.0])
    with torch.no_grad():
        got = tr.model.eval()(b["x0"], t, **{k: v for k, v in b.items() if k != "x0"})
        want = src(b["x0"], t, b["encoder_hidden_states"], b["encoder_attention_mask"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    w = tr.model.conv_in.weight
    assert w.shape[1] == 7 and torch.all(w[:, 3:] == 0)


def test_init_from_refuses_another_network(run_dir):
    cfg = TrainConfig.for_task("shapes-sr64-inpaint", text_encoder=TEXT)
    model = Trainer(cfg, run_dir).model
    with pytest.raises(ValueError, match="differs"):
        init_weights(model, BASE)


def test_init_from_keeps_what_the_source_predicts(run_dir):
    sr = str(bundled_path("shapes") / "sr64.onnx")  # a v-prediction stage
    with pytest.raises(ValueError, match="--prediction-type v_prediction"):
        Trainer(TrainConfig.for_task("shapes-sr64-inpaint", text_encoder=TEXT, init_from=sr), run_dir)
    cfg = TrainConfig.for_task(
        "shapes-sr64-inpaint", text_encoder=TEXT, init_from=sr, prediction_type="v_prediction"
    )
    assert Trainer(cfg, run_dir).model.conv_in.weight.shape[1] == 10  # 3 + low_res 3 + mask 1 + image 3


def test_the_colorize_task_conditions_on_the_grey_of_its_target(run_dir):
    tr = Trainer(TrainConfig.for_task("shapes-colorize", text_encoder=TEXT, batch_size=4), run_dir)
    b = tr.task.batch(np.random.default_rng(5), 4)
    assert b["x0"].shape == (4, 3, 32, 32) and b["image_condition"].shape == (4, 1, 32, 32)
    np.testing.assert_array_equal(b["image_condition"].numpy(), imageio.to_grey(b["x0"].numpy()))
    assert tr.model.conv_in.weight.shape[1] == 4
    white = np.ones((1, 3, 2, 2), np.float32)
    np.testing.assert_allclose(imageio.to_grey(white), 1.0, atol=1e-6)  # [-1, 1] onto itself
    np.testing.assert_allclose(imageio.to_grey(-white), -1.0, atol=1e-6)
